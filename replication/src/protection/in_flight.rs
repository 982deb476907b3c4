//! The checkpoints the epoch loop has sent and the standby has not yet committed: the loop takes
//! the next one on time whatever the last one's commit takes, up to [`MAX_IN_FLIGHT`] at once, and
//! the standby commits them strictly in order. A checkpoint leaves this window only when its
//! `Committed` comes (its output may then leave); if protection ends first, the dirty sets of all
//! of them go back to the tracker, so that whoever tracks next sees those pages again.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use vmm::dirty::{DirtySet, DirtyTracker};

/// Most checkpoints on their way to the standby at once.
pub(super) const MAX_IN_FLIGHT: usize = 3;

/// A checkpoint sent (or being sent) and not yet committed.
#[derive(Debug)]
pub(super) struct SentCheckpoint {
    pub(super) epoch: u64,
    pub(super) pages: u64,
    /// Writes that waited for the copy of their page (`copy_on_write.rs`).
    pub(super) write_faults: u64,
    /// Bytes of page data it took on the link.
    pub(super) page_bytes: u64,
    pub(super) pause: Duration,
    /// Of the pause, the time it took to stop the vCPUs.
    pub(super) stopping: Duration,
    /// The end of its pause: its commit latency runs from here.
    pub(super) taken_at: Instant,
    /// Its dirty set, folded back if it is never committed.
    pub(super) set: DirtySet,
}

#[derive(Default)]
pub(super) struct InFlight {
    sent: VecDeque<SentCheckpoint>,
}

impl InFlight {
    pub(super) fn is_full(&self) -> bool {
        self.sent.len() >= MAX_IN_FLIGHT
    }

    pub(super) fn is_empty(&self) -> bool {
        self.sent.is_empty()
    }

    /// The oldest checkpoint not yet committed.
    pub(super) fn oldest(&self) -> Option<u64> {
        self.sent.front().map(|c| c.epoch)
    }

    pub(super) fn push(&mut self, checkpoint: SentCheckpoint) {
        debug_assert!(self
            .sent
            .back()
            .is_none_or(|c| c.epoch + 1 == checkpoint.epoch));
        self.sent.push_back(checkpoint);
    }

    /// The standby committed `epoch`, which must be the oldest in flight: commits come in order,
    /// one per checkpoint.
    pub(super) fn commit(&mut self, epoch: u64) -> Result<SentCheckpoint, String> {
        match self.sent.front() {
            Some(oldest) if oldest.epoch == epoch => Ok(self.sent.pop_front().expect("non-empty")),
            Some(oldest) => Err(format!(
                "the standby committed checkpoint {epoch} where {} was due",
                oldest.epoch
            )),
            None => Err(format!(
                "the standby committed checkpoint {epoch}, which was never sent"
            )),
        }
    }

    /// None of these will be committed: their dirty sets go back to `tracker`.
    pub(super) fn fold_back(&mut self, tracker: &mut DirtyTracker) {
        for checkpoint in self.sent.drain(..) {
            tracker.fold_back(&checkpoint.set);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(epoch: u64) -> SentCheckpoint {
        SentCheckpoint {
            epoch,
            pages: 0,
            write_faults: 0,
            page_bytes: 0,
            pause: Duration::ZERO,
            stopping: Duration::ZERO,
            taken_at: Instant::now(),
            set: DirtySet::default(),
        }
    }

    #[test]
    fn commits_come_in_order_and_only_for_what_was_sent() {
        let mut window = InFlight::default();
        assert!(window.commit(0).unwrap_err().contains("never sent"));
        for epoch in 0..MAX_IN_FLIGHT as u64 {
            assert!(!window.is_full());
            window.push(sent(epoch));
        }
        assert!(window.is_full());
        assert_eq!(window.oldest(), Some(0));
        // A commit of a later checkpoint before the oldest one would release output early.
        let err = window.commit(1).unwrap_err();
        assert!(
            err.contains("committed checkpoint 1 where 0 was due"),
            "{err}"
        );
        assert_eq!(window.commit(0).unwrap().epoch, 0);
        assert_eq!(window.commit(1).unwrap().epoch, 1);
        assert!(!window.is_full());
        assert_eq!(window.commit(2).unwrap().epoch, 2);
        assert!(window.is_empty());
    }
}
