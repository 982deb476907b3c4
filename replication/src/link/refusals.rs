//! A log of refused connections for listeners that anyone can reach: the first
//! [`REFUSALS_LOGGED`] of each minute are logged one by one, the rest counted and reported once the
//! minute is over, so a flood of connections cannot flood the log.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Refusals logged one by one per minute.
pub const REFUSALS_LOGGED: u32 = 20;

/// The refusals of one listener.
pub struct RefusalLog {
    /// Put before each line: what refused (empty for a VM's own receiver).
    listener: &'static str,
    window: Instant,
    logged: u32,
    unlogged: u64,
}

impl RefusalLog {
    pub fn new(listener: &'static str) -> Self {
        Self {
            listener,
            window: Instant::now(),
            logged: 0,
            unlogged: 0,
        }
    }

    /// Notes one refusal of `peer` (`None`: the listener could not accept at all) for `reason`.
    pub fn refused(&mut self, peer: Option<SocketAddr>, reason: &str) {
        let listener = self.listener;
        if self.window.elapsed() >= Duration::from_secs(60) {
            if self.unlogged > 0 {
                tracing::warn!(
                    "{listener}refused {} more connections in the last minute without logging each",
                    self.unlogged
                );
            }
            (self.window, self.logged, self.unlogged) = (Instant::now(), 0, 0);
        }
        if self.logged >= REFUSALS_LOGGED {
            self.unlogged += 1;
            return;
        }
        self.logged += 1;
        match peer {
            Some(peer) => tracing::warn!(%peer, "{listener}refused a connection: {reason}"),
            None => tracing::warn!("{listener}{reason}"),
        }
    }

    /// Refusals counted but not logged in this minute.
    pub fn unlogged(&self) -> u64 {
        self.unlogged
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_past_the_budget_are_counted_not_logged() {
        let mut log = RefusalLog::new("test: ");
        for _ in 0..REFUSALS_LOGGED + 5 {
            log.refused(None, "full");
        }
        assert_eq!((log.logged, log.unlogged()), (REFUSALS_LOGGED, 5));
    }
}
