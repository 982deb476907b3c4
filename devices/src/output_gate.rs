//! The output gate: everything a protected guest sends to the outside world passes through here.
//!
//! Under replication, output produced in epoch N may leave the host only once the standby has
//! acknowledged epoch N's checkpoint (the Remus output-commit rule). Devices therefore never write
//! guest output to the world directly: they hand it to an [`OutputGate`], which either releases it
//! at once ([`PassThroughGate`], for unprotected guests) or holds it per epoch and releases it on
//! commit (the replication crate's gate).

use std::io;

/// Where released output goes (a TAP device; the serial console is not gated).
pub trait OutputSink {
    /// Sends one unit of output (a frame, a chunk of bytes).
    fn send(&mut self, data: &[u8]) -> io::Result<()>;
}

/// The gate between a device and its sink.
pub trait OutputGate: Send {
    /// The guest produced `data`; the gate sends it through `sink` now or holds it.
    fn submit(&mut self, data: &[u8], sink: &mut dyn OutputSink) -> io::Result<()>;

    /// Sends everything held for epochs up to and including `epoch` through `sink`.
    /// Returns how many units were released.
    fn release_through(&mut self, epoch: u64, sink: &mut dyn OutputSink) -> io::Result<usize> {
        self.release_through_while(epoch, sink, &|| true)
    }

    /// As [`OutputGate::release_through`], asking `permitted` before each unit: once it says no,
    /// the rest stays held (for a later release). Replication asks whether the standby still counts
    /// this primary alive, so that a primary stopped in the middle of a release sends nothing more
    /// once it wakes.
    fn release_through_while(
        &mut self,
        epoch: u64,
        sink: &mut dyn OutputSink,
        permitted: &dyn Fn() -> bool,
    ) -> io::Result<usize>;

    /// Units currently held back.
    fn held(&self) -> usize;

    /// Bytes currently held back.
    fn held_bytes(&self) -> usize {
        0
    }

    /// Output submitted from now on belongs to `epoch` (the previous epochs' checkpoints were taken).
    fn begin_epoch(&mut self, _epoch: u64) {}

    /// Whether the gate holds as much as it may: the device must pause transmit (never drop) until
    /// a release makes room.
    fn is_full(&self) -> bool {
        false
    }
}

/// A gate that holds nothing: output leaves as soon as the guest produces it.
#[derive(Debug, Default)]
pub struct PassThroughGate {
    released: u64,
}

impl PassThroughGate {
    /// A new pass-through gate.
    pub fn new() -> Self {
        Self::default()
    }

    /// Units released so far.
    pub fn released(&self) -> u64 {
        self.released
    }
}

impl OutputGate for PassThroughGate {
    fn submit(&mut self, data: &[u8], sink: &mut dyn OutputSink) -> io::Result<()> {
        sink.send(data)?;
        self.released += 1;
        Ok(())
    }

    fn release_through_while(
        &mut self,
        _epoch: u64,
        _sink: &mut dyn OutputSink,
        _permitted: &dyn Fn() -> bool,
    ) -> io::Result<usize> {
        Ok(0)
    }

    fn held(&self) -> usize {
        0
    }
}

/// The replication gate: output is tagged with the epoch it was produced in and held until that
/// epoch's checkpoint is committed on the standby ([`OutputGate::release_through`]). It holds at most
/// its byte cap; beyond it the device pauses transmit (back-pressure on the guest) until a commit.
#[derive(Debug)]
pub struct EpochGate {
    epoch: u64,
    held: std::collections::VecDeque<(u64, Vec<u8>)>,
    held_bytes: usize,
    cap_bytes: usize,
}

/// Default byte cap of an [`EpochGate`]: several epochs of a fast NIC's output.
pub const DEFAULT_GATE_CAP_BYTES: usize = 32 << 20;

impl EpochGate {
    /// A gate whose output belongs to `epoch` until told otherwise, with the default cap.
    pub fn new(epoch: u64) -> Self {
        Self::with_cap(epoch, DEFAULT_GATE_CAP_BYTES)
    }

    /// As [`EpochGate::new`], holding at most `cap_bytes` (at least one frame is always taken).
    pub fn with_cap(epoch: u64, cap_bytes: usize) -> Self {
        Self {
            epoch,
            held: Default::default(),
            held_bytes: 0,
            cap_bytes,
        }
    }
}

impl OutputGate for EpochGate {
    fn submit(&mut self, data: &[u8], _sink: &mut dyn OutputSink) -> io::Result<()> {
        self.held_bytes += data.len();
        self.held.push_back((self.epoch, data.to_vec()));
        Ok(())
    }

    fn release_through_while(
        &mut self,
        epoch: u64,
        sink: &mut dyn OutputSink,
        permitted: &dyn Fn() -> bool,
    ) -> io::Result<usize> {
        let mut released = 0;
        while self.held.front().is_some_and(|(e, _)| *e <= epoch) && permitted() {
            if let Some((_, data)) = self.held.pop_front() {
                self.held_bytes -= data.len();
                // A frame the network cannot take now is dropped, as a congested link would.
                if let Err(e) = sink.send(&data) {
                    tracing::debug!("gated output dropped on release: {e}");
                }
                released += 1;
            }
        }
        Ok(released)
    }

    fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    fn held(&self) -> usize {
        self.held.len()
    }

    fn begin_epoch(&mut self, epoch: u64) {
        self.epoch = epoch;
    }

    fn is_full(&self) -> bool {
        self.held_bytes >= self.cap_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Once the permit is withdrawn mid-release, nothing more leaves; the rest goes with a later
    /// release.
    #[test]
    fn a_release_stops_where_its_permit_is_withdrawn() {
        let mut gate = EpochGate::new(1);
        let mut sink = Collect::default();
        for frame in [b"a", b"b", b"c"] {
            gate.submit(frame, &mut sink).unwrap();
        }
        let left = std::cell::Cell::new(2);
        let permit = || {
            left.set(left.get() - 1);
            left.get() >= 0
        };
        assert_eq!(
            gate.release_through_while(1, &mut sink, &permit).unwrap(),
            2
        );
        assert_eq!(sink.0, vec![b"a".to_vec(), b"b".to_vec()]);
        assert_eq!(gate.held(), 1);
        assert_eq!(gate.release_through(1, &mut sink).unwrap(), 1);
        assert_eq!(sink.0.len(), 3);
    }

    #[derive(Default)]
    struct Collect(Vec<Vec<u8>>);
    impl OutputSink for Collect {
        fn send(&mut self, data: &[u8]) -> io::Result<()> {
            self.0.push(data.to_vec());
            Ok(())
        }
    }

    #[test]
    fn epoch_gate_holds_output_until_its_epoch_commits() {
        let mut gate = EpochGate::new(1);
        let mut sink = Collect::default();
        gate.submit(b"e1-a", &mut sink).unwrap();
        gate.begin_epoch(2);
        gate.submit(b"e2-a", &mut sink).unwrap();
        assert!(sink.0.is_empty());
        assert_eq!(gate.held(), 2);
        assert_eq!(gate.release_through(0, &mut sink).unwrap(), 0);
        assert_eq!(gate.release_through(1, &mut sink).unwrap(), 1);
        assert_eq!(sink.0, vec![b"e1-a".to_vec()]);
        assert_eq!(gate.release_through(5, &mut sink).unwrap(), 1);
        assert_eq!(gate.held(), 0);
    }

    #[test]
    fn epoch_gate_is_full_at_its_cap_until_a_release() {
        let mut gate = EpochGate::with_cap(1, 8);
        let mut sink = Collect::default();
        gate.submit(b"12345", &mut sink).unwrap();
        assert!(!gate.is_full());
        gate.submit(b"678", &mut sink).unwrap();
        assert!(gate.is_full());
        assert_eq!(gate.held_bytes(), 8);
        gate.release_through(1, &mut sink).unwrap();
        assert!(!gate.is_full());
        assert_eq!(gate.held_bytes(), 0);
    }

    #[test]
    fn pass_through_releases_immediately() {
        let mut gate = PassThroughGate::new();
        let mut sink = Collect::default();
        gate.submit(b"frame1", &mut sink).unwrap();
        gate.submit(b"frame2", &mut sink).unwrap();
        assert_eq!(sink.0, vec![b"frame1".to_vec(), b"frame2".to_vec()]);
        assert_eq!(gate.held(), 0);
        assert_eq!(gate.release_through(7, &mut sink).unwrap(), 0);
        assert_eq!(gate.released(), 2);
    }
}
