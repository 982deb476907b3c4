//! What a protected guest writes to a disk, for its standby (replication/src/protection). Inactive
//! (recording nothing) unless protection started it. Two modes:
//!
//! - **Tracking**, during the first copy of the image: which blocks ([`BLOCK`] bytes) were written
//!   since the copier last read them — a bitmap, no data, so a guest may write any amount while a
//!   long copy runs. The copier clears a block's bit *before* it reads the block; a write marks it
//!   *after* it landed: every write is either in what the copier read or marked to be read again.
//! - **Recording**, once protected: every completed write with its data, in order, and whether the
//!   guest flushed, so that the writes of epoch N travel with checkpoint N and reach the standby's
//!   image only when it commits (Remus' disk buffering).
//!
//! Back-pressure, not failure: beyond a soft limit — blocks waiting for their copy, or bytes
//! recorded since the last checkpoint took them — the journal says it is [full](WriteJournal::is_full)
//! and the device stops taking requests off its queue (the guest's disk slows to what the link and
//! the standby take) until the copier or a checkpoint makes room, which the journal signals on its
//! [room eventfd](WriteJournal::room_event).

use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The unit of dirty tracking during the first copy.
pub const BLOCK: u64 = 64 << 10;

/// Default limit on the bytes recorded between two checkpoints before the device waits.
pub const DEFAULT_RECORD_LIMIT: usize = 32 << 20;

/// Default limit on the bytes of blocks waiting for their (second) copy before the device waits.
pub const DEFAULT_DIRTY_LIMIT: u64 = 64 << 20;

/// One write the guest completed: `data` at byte `offset` of the image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskWrite {
    pub offset: u64,
    pub data: Vec<u8>,
}

/// An epoch's writes, as a checkpoint takes them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EpochWrites {
    /// In the order they completed.
    pub writes: Vec<DiskWrite>,
    /// Whether the guest flushed the disk during the epoch.
    pub flushed: bool,
}

enum Mode {
    Off,
    Tracking {
        /// One bit per block.
        dirty: Vec<u64>,
        dirty_blocks: u64,
    },
    Recording {
        epoch: EpochWrites,
        bytes: usize,
    },
}

struct Inner {
    mode: Mode,
    /// The device found the journal full and waits for room.
    waiting: bool,
    /// Tracking: bytes of blocks waiting for their copy beyond which the device waits.
    dirty_limit: u64,
}

/// The journal of one disk; clones share it (the device records, the epoch loop takes).
#[derive(Clone)]
pub struct WriteJournal {
    inner: Arc<Mutex<Inner>>,
    room: Arc<EventFd>,
    capacity: u64,
    record_limit: usize,
}

impl WriteJournal {
    /// An inactive journal for an image of `capacity` bytes, with the default limits.
    pub fn new(capacity: u64) -> std::io::Result<Self> {
        Self::with_limits(capacity, DEFAULT_RECORD_LIMIT, DEFAULT_DIRTY_LIMIT)
    }

    /// An inactive journal whose device waits beyond `record_limit` bytes recorded between two
    /// takes, or `dirty_limit` bytes of blocks waiting for their copy.
    pub fn with_limits(
        capacity: u64,
        record_limit: usize,
        dirty_limit: u64,
    ) -> std::io::Result<Self> {
        Ok(Self {
            inner: Arc::new(Mutex::new(Inner {
                mode: Mode::Off,
                waiting: false,
                dirty_limit,
            })),
            room: Arc::new(EventFd::new(EFD_NONBLOCK)?),
            capacity,
            record_limit,
        })
    }

    /// Signalled when a full journal has room again: the device takes requests off its queue.
    pub fn room_event(&self) -> &EventFd {
        &self.room
    }

    /// Starts tracking written blocks for a first copy (dropping anything kept before).
    pub fn start_tracking(&self) {
        let words = self.capacity.div_ceil(BLOCK).div_ceil(64) as usize;
        self.set_mode(Mode::Tracking {
            dirty: vec![0; words],
            dirty_blocks: 0,
        });
    }

    /// Starts recording writes with their data (dropping anything kept before).
    pub fn start_recording(&self) {
        self.set_mode(Mode::Recording {
            epoch: EpochWrites::default(),
            bytes: 0,
        });
    }

    /// Stops and drops what was kept; a device waiting for room goes on.
    pub fn stop(&self) {
        self.set_mode(Mode::Off);
    }

    fn set_mode(&self, mode: Mode) {
        let mut inner = self.lock();
        inner.mode = mode;
        self.wake_if_room(&mut inner);
    }

    /// Whether writes are tracked or recorded.
    pub fn is_active(&self) -> bool {
        !matches!(self.lock().mode, Mode::Off)
    }

    /// Whether a write must hand over its data ([`WriteJournal::record`]).
    pub fn records_data(&self) -> bool {
        matches!(self.lock().mode, Mode::Recording { .. })
    }

    /// A completed write of `data` at `offset`: recorded with its data, or its blocks marked.
    pub fn record(&self, offset: u64, data: Vec<u8>) {
        let len = data.len() as u64;
        let mut inner = self.lock();
        match &mut inner.mode {
            Mode::Off => {}
            Mode::Tracking {
                dirty,
                dirty_blocks,
            } => mark(dirty, dirty_blocks, offset, len, self.capacity),
            Mode::Recording { epoch, bytes } => {
                *bytes += data.len();
                epoch.writes.push(DiskWrite { offset, data });
            }
        }
    }

    /// A completed write of `len` bytes at `offset` whose data was not handed over: its blocks
    /// are marked when tracking; when recording (started while the write was under way), its
    /// data is read back from the image with `read_back(offset, len)`, in pieces of at most
    /// [`super::request::PIECE_BYTES`].
    pub fn written(
        &self,
        offset: u64,
        len: u64,
        mut read_back: impl FnMut(u64, usize) -> std::io::Result<Vec<u8>>,
    ) -> std::io::Result<()> {
        if self.records_data() {
            let piece = super::request::PIECE_BYTES as u64;
            for at in (offset..offset + len).step_by(piece as usize) {
                let n = piece.min(offset + len - at) as usize;
                let data = read_back(at, n)?;
                self.record(at, data);
            }
        } else {
            let mut inner = self.lock();
            if let Mode::Tracking {
                dirty,
                dirty_blocks,
            } = &mut inner.mode
            {
                mark(dirty, dirty_blocks, offset, len, self.capacity);
            }
        }
        Ok(())
    }

    /// The guest flushed the disk.
    pub fn record_flush(&self) {
        if let Mode::Recording { epoch, .. } = &mut self.lock().mode {
            epoch.flushed = true;
        }
    }

    /// Whether the device must wait before taking another request: too many blocks wait for
    /// their copy, or too many bytes were recorded since the last take. The journal then signals
    /// [`WriteJournal::room_event`] once it has room.
    pub fn is_full(&self) -> bool {
        let mut inner = self.lock();
        let full = self.over_limit(&inner);
        if full {
            inner.waiting = true;
        }
        full
    }

    /// Tracking: sets how many bytes of written blocks may wait for their copy before the device
    /// waits (lowered while the first copy converges).
    pub fn set_dirty_limit(&self, bytes: u64) {
        let mut inner = self.lock();
        inner.dirty_limit = bytes;
        self.wake_if_room(&mut inner);
    }

    fn over_limit(&self, inner: &Inner) -> bool {
        match &inner.mode {
            Mode::Off => false,
            Mode::Tracking { dirty_blocks, .. } => dirty_blocks * BLOCK > inner.dirty_limit,
            Mode::Recording { bytes, .. } => *bytes > self.record_limit,
        }
    }

    fn wake_if_room(&self, inner: &mut Inner) {
        if inner.waiting && !self.over_limit(inner) {
            inner.waiting = false;
            if let Err(e) = self.room.write(1) {
                tracing::error!("write journal: cannot signal room: {e}");
            }
        }
    }

    /// Bytes of the blocks written since the copier read them (tracking).
    pub fn dirty_bytes(&self) -> u64 {
        match &self.lock().mode {
            Mode::Tracking { dirty_blocks, .. } => (dirty_blocks * BLOCK).min(self.capacity),
            _ => 0,
        }
    }

    /// Tracking: the copier is about to read `len` bytes at `offset`: their blocks are no longer
    /// dirty (a write from now on marks them again).
    pub fn clear(&self, offset: u64, len: u64) {
        let mut inner = self.lock();
        if let Mode::Tracking {
            dirty,
            dirty_blocks,
        } = &mut inner.mode
        {
            let first = offset / BLOCK;
            let last = (offset + len).min(self.capacity).div_ceil(BLOCK);
            for block in first..last {
                let (word, bit) = ((block / 64) as usize, block % 64);
                if dirty[word] & (1 << bit) != 0 {
                    dirty[word] &= !(1 << bit);
                    *dirty_blocks -= 1;
                }
            }
        }
        self.wake_if_room(&mut inner);
    }

    /// Tracking: clears and returns up to `max_bytes` of written blocks (runs of `(offset, len)`,
    /// lowest first, within the image), for the copier to read again.
    pub fn take_dirty(&self, max_bytes: u64) -> Vec<(u64, u64)> {
        let mut inner = self.lock();
        let runs = match &mut inner.mode {
            Mode::Tracking {
                dirty,
                dirty_blocks,
            } => take_runs(dirty, dirty_blocks, max_bytes, self.capacity),
            _ => Vec::new(),
        };
        self.wake_if_room(&mut inner);
        runs
    }

    /// At the first checkpoint, with the device idle: the blocks still waiting for their copy
    /// (their content now is the checkpoint's), and from here on every write is recorded.
    pub fn finish_tracking(&self) -> Vec<(u64, u64)> {
        let mut inner = self.lock();
        let runs = match &mut inner.mode {
            Mode::Tracking {
                dirty,
                dirty_blocks,
            } => take_runs(dirty, dirty_blocks, u64::MAX, self.capacity),
            _ => Vec::new(),
        };
        inner.mode = Mode::Recording {
            epoch: EpochWrites::default(),
            bytes: 0,
        };
        self.wake_if_room(&mut inner);
        runs
    }

    /// Recording: the writes since the last take (recording goes on).
    pub fn take(&self) -> EpochWrites {
        let mut inner = self.lock();
        let taken = match &mut inner.mode {
            Mode::Recording { epoch, bytes } => {
                *bytes = 0;
                std::mem::take(epoch)
            }
            _ => EpochWrites::default(),
        };
        self.wake_if_room(&mut inner);
        taken
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Marks the blocks of `len` bytes at `offset`.
fn mark(dirty: &mut [u64], dirty_blocks: &mut u64, offset: u64, len: u64, capacity: u64) {
    if len == 0 || offset >= capacity {
        return;
    }
    let first = offset / BLOCK;
    let last = (offset + len).min(capacity).div_ceil(BLOCK);
    for block in first..last {
        let (word, bit) = ((block / 64) as usize, block % 64);
        if dirty[word] & (1 << bit) == 0 {
            dirty[word] |= 1 << bit;
            *dirty_blocks += 1;
        }
    }
}

/// Clears and returns up to `max_bytes` of marked blocks as runs within `capacity`.
fn take_runs(
    dirty: &mut [u64],
    dirty_blocks: &mut u64,
    max_bytes: u64,
    capacity: u64,
) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut taken = 0u64;
    for (w, word) in dirty.iter_mut().enumerate() {
        while *word != 0 {
            if taken >= max_bytes {
                return runs;
            }
            let bit = word.trailing_zeros() as u64;
            *word &= !(1 << bit);
            *dirty_blocks -= 1;
            let offset = (w as u64 * 64 + bit) * BLOCK;
            let len = BLOCK.min(capacity - offset);
            taken += len;
            match runs.last_mut() {
                Some((start, run)) if *start + *run == offset => *run += len,
                _ => runs.push((offset, len)),
            }
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_only_while_recording_and_in_order() {
        let j = WriteJournal::new(1 << 20).unwrap();
        j.record(0, b"ignored".to_vec());
        assert!(!j.is_active());
        j.start_recording();
        j.record(512, b"a".to_vec());
        j.record(0, b"b".to_vec());
        let shared = j.clone();
        shared.record(512, b"c".to_vec());
        j.record_flush();
        let taken = j.take();
        assert!(taken.flushed);
        assert_eq!(
            taken
                .writes
                .iter()
                .map(|w| (w.offset, w.data.clone()))
                .collect::<Vec<_>>(),
            vec![
                (512, b"a".to_vec()),
                (0, b"b".to_vec()),
                (512, b"c".to_vec())
            ]
        );
        assert_eq!(
            j.take(),
            EpochWrites::default(),
            "a take empties the journal"
        );
        j.stop();
        j.record(0, b"x".to_vec());
        assert!(j.take().writes.is_empty());
    }

    #[test]
    fn tracking_marks_blocks_and_the_copier_clears_them() {
        // Three and a half blocks.
        let j = WriteJournal::new(3 * BLOCK + BLOCK / 2).unwrap();
        j.start_tracking();
        assert!(!j.records_data());
        // Any amount of data keeps one bit per block.
        for _ in 0..100 {
            j.record(BLOCK - 1, vec![1; 2]);
        }
        j.written(3 * BLOCK + 10, 5, |_, _| {
            unreachable!("tracking reads nothing")
        })
        .unwrap();
        assert_eq!(j.dirty_bytes(), 3 * BLOCK);
        // The copier reads block 1 on its pass.
        j.clear(BLOCK, BLOCK);
        assert_eq!(
            j.take_dirty(u64::MAX),
            vec![(0, BLOCK), (3 * BLOCK, BLOCK / 2)]
        );
        assert_eq!(j.dirty_bytes(), 0);
        // At the first checkpoint what is left is handed over, and recording starts.
        j.record(2 * BLOCK, vec![2; 8]);
        assert_eq!(j.finish_tracking(), vec![(2 * BLOCK, BLOCK)]);
        assert!(j.records_data());
        j.written(0, 3, |_, n| Ok(vec![9; n])).unwrap();
        assert_eq!(
            j.take().writes,
            vec![DiskWrite {
                offset: 0,
                data: vec![9, 9, 9]
            }]
        );
    }

    #[test]
    fn take_dirty_hands_out_at_most_what_is_asked_lowest_first() {
        let j = WriteJournal::new(64 * BLOCK).unwrap();
        j.start_tracking();
        for b in [5u64, 6, 7, 40, 63] {
            j.record(b * BLOCK, vec![0; 1]);
        }
        assert_eq!(j.take_dirty(2 * BLOCK), vec![(5 * BLOCK, 2 * BLOCK)]);
        assert_eq!(
            j.take_dirty(u64::MAX),
            vec![(7 * BLOCK, BLOCK), (40 * BLOCK, BLOCK), (63 * BLOCK, BLOCK)]
        );
    }

    /// Beyond its limit a journal is full, and says when it has room again.
    #[test]
    fn a_full_journal_signals_room_when_taken() {
        let j = WriteJournal::with_limits(1 << 30, 100, 2 * BLOCK).unwrap();
        j.start_recording();
        j.record(0, vec![0; 80]);
        assert!(!j.is_full());
        j.record(0, vec![0; 80]);
        assert!(j.is_full(), "160 bytes recorded, limit 100");
        assert!(j.room_event().read().is_err(), "no room yet");
        j.take();
        assert!(!j.is_full());
        assert_eq!(j.room_event().read().unwrap(), 1, "room signalled");

        j.start_tracking();
        for b in 0..3 {
            j.record(b * BLOCK, vec![0; 1]);
        }
        assert!(j.is_full(), "three blocks wait, limit two");
        j.take_dirty(BLOCK);
        assert!(!j.is_full());
        assert_eq!(j.room_event().read().unwrap(), 1, "room signalled");
    }
}
