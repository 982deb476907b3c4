//! What a protected guest writes to a disk, kept per epoch so that the writes of epoch N travel with
//! checkpoint N and reach the standby's image only when it commits (Remus' disk buffering,
//! replication/src/protection). Inactive (recording nothing) unless protection started it.

use std::sync::{Arc, Mutex};

/// One write the guest completed: `data` at byte `offset` of the image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskWrite {
    pub offset: u64,
    pub data: Vec<u8>,
}

#[derive(Default)]
struct Recording {
    writes: Vec<DiskWrite>,
    bytes: usize,
    /// More was written since the last take than the cap allows: the epoch cannot be sent.
    overflowed: bool,
}

/// The journal of one disk; clones share it (the device records, the epoch loop takes).
#[derive(Clone, Default)]
pub struct WriteJournal {
    recording: Arc<Mutex<Option<Recording>>>,
    cap_bytes: usize,
}

/// The writes since the last take exceed the journal's cap.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("the guest wrote more than {cap_bytes} bytes to one disk within one epoch")]
pub struct JournalOverflow {
    pub cap_bytes: usize,
}

/// Default bound on the bytes one disk's journal holds between two takes.
pub const DEFAULT_JOURNAL_CAP: usize = 256 << 20;

impl WriteJournal {
    /// An inactive journal holding at most `cap_bytes` between takes once started.
    pub fn with_cap(cap_bytes: usize) -> Self {
        Self {
            recording: Arc::default(),
            cap_bytes,
        }
    }

    /// Starts recording (dropping anything recorded before).
    pub fn start(&self) {
        *self.lock() = Some(Recording::default());
    }

    /// Stops recording and drops what was recorded.
    pub fn stop(&self) {
        *self.lock() = None;
    }

    /// Whether writes are being recorded.
    pub fn is_active(&self) -> bool {
        self.lock().is_some()
    }

    /// Records a completed write (nothing when inactive).
    pub fn record(&self, offset: u64, data: Vec<u8>) {
        let cap = self.cap_bytes;
        if let Some(r) = self.lock().as_mut() {
            if r.overflowed {
                return;
            }
            r.bytes += data.len();
            if r.bytes > cap {
                r.overflowed = true;
                r.writes = Vec::new();
                return;
            }
            r.writes.push(DiskWrite { offset, data });
        }
    }

    /// The writes recorded since the last take, in the order they completed; recording goes on.
    pub fn take(&self) -> Result<Vec<DiskWrite>, JournalOverflow> {
        let cap_bytes = self.cap_bytes;
        let mut guard = self.lock();
        let Some(r) = guard.as_mut() else {
            return Ok(Vec::new());
        };
        let taken = std::mem::take(r);
        if taken.overflowed {
            return Err(JournalOverflow { cap_bytes });
        }
        Ok(taken.writes)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Recording>> {
        self.recording.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_only_while_started_and_in_order() {
        let j = WriteJournal::with_cap(1024);
        j.record(0, b"ignored".to_vec());
        assert!(!j.is_active());
        j.start();
        j.record(512, b"a".to_vec());
        j.record(0, b"b".to_vec());
        let shared = j.clone();
        shared.record(512, b"c".to_vec());
        let taken = j.take().unwrap();
        assert_eq!(
            taken
                .iter()
                .map(|w| (w.offset, w.data.clone()))
                .collect::<Vec<_>>(),
            vec![
                (512, b"a".to_vec()),
                (0, b"b".to_vec()),
                (512, b"c".to_vec())
            ]
        );
        assert!(j.take().unwrap().is_empty(), "a take empties the journal");
        j.stop();
        j.record(0, b"x".to_vec());
        assert!(j.take().unwrap().is_empty());
    }

    #[test]
    fn more_than_the_cap_in_one_epoch_is_an_error_not_a_partial_epoch() {
        let j = WriteJournal::with_cap(8);
        j.start();
        j.record(0, [1; 6].to_vec());
        j.record(8, [2; 6].to_vec());
        assert_eq!(j.take(), Err(JournalOverflow { cap_bytes: 8 }));
        j.record(0, [3; 4].to_vec());
        assert_eq!(j.take().unwrap().len(), 1, "the next epoch starts afresh");
    }
}
