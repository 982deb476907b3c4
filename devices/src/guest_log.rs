//! Log lines a guest can cause at will (a register written in a loop, a device reprogrammed, a
//! queue broken on purpose) must not flood the log: [`guest_warn!`](crate::guest_warn) and
//! [`guest_error!`](crate::guest_error) log at most [`LINES_PER_MINUTE`] lines a minute from each
//! call site, count the rest, and say how many were left out with the next line they log.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines one call site logs per minute.
pub const LINES_PER_MINUTE: u32 = 10;
const WINDOW: Duration = Duration::from_secs(60);

/// One call site's allowance.
pub struct LogBudget(Mutex<Allowance>);

struct Allowance {
    window: Option<Instant>,
    logged: u32,
    left_out: u64,
}

impl LogBudget {
    pub const fn new() -> Self {
        Self(Mutex::new(Allowance {
            window: None,
            logged: 0,
            left_out: 0,
        }))
    }

    /// Whether a line may be logged now (`Some`: how many were left out since the last one), at
    /// `now`.
    pub fn admit_at(&self, now: Instant) -> Option<u64> {
        let mut a = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if a.window
            .is_none_or(|start| now.duration_since(start) >= WINDOW)
        {
            a.window = Some(now);
            a.logged = 0;
        }
        if a.logged >= LINES_PER_MINUTE {
            a.left_out += 1;
            return None;
        }
        a.logged += 1;
        Some(std::mem::take(&mut a.left_out))
    }

    /// [`LogBudget::admit_at`] now.
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(Instant::now())
    }
}

impl Default for LogBudget {
    fn default() -> Self {
        Self::new()
    }
}

/// `tracing::event!` at `level` for what a guest can cause, with an allowance of its own at each
/// place it is written: what [`guest_warn!`](crate::guest_warn) and
/// [`guest_error!`](crate::guest_error) expand to.
#[doc(hidden)]
#[macro_export]
macro_rules! guest_event {
    ($level:expr, $($arg:tt)+) => {{
        static BUDGET: $crate::guest_log::LogBudget = $crate::guest_log::LogBudget::new();
        if let Some(left_out) = BUDGET.admit() {
            if left_out > 0 {
                tracing::event!($level, left_out, $($arg)+);
            } else {
                tracing::event!($level, $($arg)+);
            }
        }
    }};
}

/// `tracing::warn!` for what a guest can cause, rate limited per call site (`crate::guest_log`).
#[macro_export]
macro_rules! guest_warn {
    ($($arg:tt)+) => {
        $crate::guest_event!(tracing::Level::WARN, $($arg)+)
    };
}

/// `tracing::error!` for what a guest can cause, rate limited per call site (`crate::guest_log`).
#[macro_export]
macro_rules! guest_error {
    ($($arg:tt)+) => {
        $crate::guest_event!(tracing::Level::ERROR, $($arg)+)
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_site_logs_its_allowance_a_minute_and_counts_the_rest() {
        let budget = LogBudget::new();
        let t0 = Instant::now();
        for _ in 0..LINES_PER_MINUTE {
            assert_eq!(budget.admit_at(t0), Some(0));
        }
        for _ in 0..5 {
            assert_eq!(budget.admit_at(t0 + Duration::from_secs(30)), None);
        }
        assert_eq!(budget.admit_at(t0 + WINDOW), Some(5));
        assert_eq!(budget.admit_at(t0 + WINDOW), Some(0));
    }

    #[test]
    fn the_macros_compile_with_captured_arguments() {
        let port = 0x604;
        for _ in 0..3 {
            crate::guest_warn!("guest wrote port {port:#x}");
            crate::guest_error!(port, "guest broke port {}", port);
        }
    }
}
