//! Running virtio-net on the event loop: frames from the TAP into the receive queue, frames from the
//! transmit queue through the output gate to the TAP. The queue plumbing (activation, notifications,
//! budget, guest-error reports) is `crate::virtio::device_queues`, shared with virtio-blk.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::EventSet;

use super::device::{
    NetCounters, VirtioNet, NET_HDR_LEN, RX_QUEUE, TX_QUEUE, VIRTIO_NET_F_GUEST_CSUM,
};
use crate::output_gate::{OutputGate, OutputSink};
use crate::virtio::device_queues::{pop_chain, Drained, GuestErrorLog, QueueEvent, QUEUE_BUDGET};
use crate::virtio::GuestMemoryMmap;

/// The `virtio_net_hdr_v1` a received frame goes to the guest with, from the TAP's (`tap`): one
/// buffer; the TAP's checksum and segmentation fields only if the driver accepts partial checksums
/// (`guest_csum`; the TAP is told the same, `device.rs`), else none.
fn rx_header(tap: &[u8], guest_csum: bool) -> [u8; NET_HDR_LEN] {
    let mut h = [0u8; NET_HDR_LEN];
    if guest_csum {
        h[..10].copy_from_slice(&tap[..10]);
    }
    h[10..12].copy_from_slice(&1u16.to_le_bytes()); // num_buffers
    h
}

/// Writes one received frame (as read from the TAP: header, then the frame) into the next receive
/// buffer on `queue`. Returns `None` when the driver has no buffer available or the queue is stopped
/// (the frame is not consumed), `Some(false)` if the queue is broken (stop using it), `Some(true)`
/// once the buffer went back to the driver (holding the frame, or dropped because the frame was
/// malformed or the buffer unusable).
pub fn deliver_frame(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    packet: &[u8],
    guest_csum: bool,
    counters: &mut NetCounters,
    errors: &mut GuestErrorLog,
) -> Option<bool> {
    let chain = pop_chain(queue, mem, errors)?;
    let head = chain.head_index();
    let written = match (packet.split_at_checked(NET_HDR_LEN), chain.writer(mem)) {
        // Shorter than its header: nothing to deliver.
        (None, _) => {
            counters.rx_dropped += 1;
            0
        }
        (Some((tap_header, frame)), Ok(mut w))
            if w.available_bytes() >= NET_HDR_LEN + frame.len() =>
        {
            let header = rx_header(tap_header, guest_csum);
            match w.write_all(&header).and_then(|_| w.write_all(frame)) {
                Ok(()) => {
                    counters.rx_frames += 1;
                    w.bytes_written()
                }
                Err(e) => {
                    errors.report(format_args!("cannot write received frame: {e}"));
                    counters.rx_dropped += 1;
                    0
                }
            }
        }
        (Some((_, frame)), _) => {
            errors.report(format_args!(
                "receive buffer {head} unusable; frame of {} bytes dropped",
                frame.len()
            ));
            counters.rx_dropped += 1;
            0
        }
    };
    match queue.add_used(mem, head, written as u32) {
        Ok(()) => Some(true),
        Err(e) => {
            errors.report(format_args!("cannot return receive buffer {head}: {e}"));
            Some(false)
        }
    }
}

impl VirtioNet {
    /// Moves frames from the TAP to the guest until the TAP is empty, the guest has no buffers, or
    /// the turn's budget is spent (then the loop comes back).
    pub fn process_rx(&mut self) {
        let Some((active, errors)) = self.queues.active_with_errors() else {
            return;
        };
        let mem = &active.memory;
        let mut delivered = false;
        let mut budget_exhausted = true;
        for _ in 0..QUEUE_BUDGET {
            let len = match self.rx_pending {
                Some(len) => len,
                None => match self.tap.read_frame(&mut self.rx_buf) {
                    Ok(len) => len,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        budget_exhausted = false;
                        break;
                    }
                    Err(e) => {
                        tracing::warn!("virtio-net {}: TAP read failed: {e}", self.tap.name());
                        budget_exhausted = false;
                        break;
                    }
                },
            };
            match deliver_frame(
                &mut active.queues[RX_QUEUE],
                mem,
                &self.rx_buf[..len],
                self.acked_features & VIRTIO_NET_F_GUEST_CSUM != 0,
                &mut self.counters,
                errors,
            ) {
                Some(true) => self.rx_pending = None,
                Some(false) => {
                    self.rx_pending = None;
                    budget_exhausted = false;
                    break;
                }
                None => {
                    // No buffer: keep the frame until the driver adds some (rx queue notification).
                    self.rx_pending = Some(len);
                    budget_exhausted = false;
                    break;
                }
            }
            delivered = true;
        }
        if delivered {
            active.signal_used(RX_QUEUE);
        }
        // The TAP is edge-triggered: frames left behind need the loop to come back by itself.
        if budget_exhausted {
            self.queues.requeue(RX_QUEUE);
        }
    }

    /// Sends the frames the guest queued, through the output gate, up to the turn's budget.
    pub fn process_tx(&mut self) {
        let Some((active, errors)) = self.queues.active_with_errors() else {
            return;
        };
        let mut tx = TxPath {
            buf: &mut self.tx_buf,
            gate: self.gate.as_mut(),
            sink: &mut self.tap,
            counters: &mut self.counters,
            errors,
        };
        let drained = tx.drain(&mut active.queues[TX_QUEUE], &active.memory, QUEUE_BUDGET);
        if drained.used {
            active.signal_used(TX_QUEUE);
        }
        if drained.budget_exhausted {
            self.queues.requeue(TX_QUEUE);
        }
    }
}

/// The transmit path between a queue and a sink, separate from the device so it can be fuzzed.
pub struct TxPath<'a> {
    pub buf: &'a mut Vec<u8>,
    pub gate: &'a mut dyn OutputGate,
    pub sink: &'a mut dyn OutputSink,
    pub counters: &'a mut NetCounters,
    pub errors: &'a mut GuestErrorLog,
}

impl TxPath<'_> {
    /// Sends up to `budget` frames from `queue`. While the gate is full (it holds its byte cap of
    /// unreleased output) the frames stay in the queue — transmit pauses, nothing is dropped — until
    /// a release makes room.
    pub fn drain(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap, budget: usize) -> Drained {
        let mut drained = Drained::default();
        for _ in 0..budget {
            if self.gate.is_full() {
                self.counters.tx_paused += 1;
                return drained;
            }
            let Some(chain) = pop_chain(queue, mem, self.errors) else {
                return drained;
            };
            let head = chain.head_index();
            match chain.reader(mem) {
                Ok(mut r)
                    if r.available_bytes() <= self.buf.len()
                        && r.available_bytes() > NET_HDR_LEN =>
                {
                    let len = r.available_bytes();
                    match r.read_exact(&mut self.buf[..len]) {
                        // Header and frame: the TAP takes the driver's header as it is.
                        Ok(()) => match self.gate.submit(&self.buf[..len], self.sink) {
                            Ok(()) => self.counters.tx_frames += 1,
                            Err(e) => {
                                // A full TAP queue drops the frame, as a congested link would.
                                tracing::debug!("virtio-net: frame dropped: {e}");
                                self.counters.tx_dropped += 1;
                            }
                        },
                        Err(e) => {
                            self.errors
                                .report(format_args!("cannot read transmit chain {head}: {e}"));
                            self.counters.tx_dropped += 1;
                        }
                    }
                }
                Ok(r) => {
                    self.errors.report(format_args!(
                        "transmit chain {head} of {} bytes rejected",
                        r.available_bytes()
                    ));
                    self.counters.tx_dropped += 1;
                }
                Err(e) => {
                    self.errors
                        .report(format_args!("transmit chain {head} unusable: {e}"));
                    self.counters.tx_dropped += 1;
                }
            }
            if let Err(e) = queue.add_used(mem, head, 0) {
                self.errors
                    .report(format_args!("cannot return transmit buffer {head}: {e}"));
                return drained;
            }
            drained.used = true;
        }
        drained.budget_exhausted = true;
        drained
    }
}

impl MutEventSubscriber for VirtioNet {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match self.queues.handle(&events, ops) {
            QueueEvent::Activated => {
                if !self.tap_watched {
                    match ops.add(Events::new(
                        &self.tap,
                        EventSet::IN | EventSet::EDGE_TRIGGERED,
                    )) {
                        Ok(()) => self.tap_watched = true,
                        Err(e) => tracing::error!(
                            "virtio-net {}: cannot watch the TAP: {e}",
                            self.tap.name()
                        ),
                    }
                }
                self.process_tx();
                self.process_rx();
            }
            QueueEvent::Notified(RX_QUEUE) => self.process_rx(),
            QueueEvent::Notified(_) => self.process_tx(),
            QueueEvent::Other if events.fd() == self.tap.as_raw_fd() => self.process_rx(),
            QueueEvent::Other => {
                let _ = ops.remove(events);
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.queues.init(ops);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output_gate::PassThroughGate;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    #[derive(Default)]
    struct Frames(Vec<Vec<u8>>);
    impl OutputSink for Frames {
        fn send(&mut self, data: &[u8]) -> io::Result<()> {
            self.0.push(data.to_vec());
            Ok(())
        }
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn queue_with(mem: &GuestMemoryMmap, descs: &[(u64, u32, bool)]) -> Queue {
        let q = MockSplitQueue::new(mem, 16);
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .map(|&(a, l, w)| {
                RawDescriptor::from(Descriptor::new(
                    a,
                    l,
                    if w { VRING_DESC_F_WRITE as u16 } else { 0 },
                    0,
                ))
            })
            .collect();
        q.build_desc_chain(&raw).unwrap();
        q.create_queue().unwrap()
    }

    fn tx(mem: &GuestMemoryMmap, descs: &[(u64, u32, bool)]) -> (Frames, NetCounters) {
        let mut queue = queue_with(mem, descs);
        let mut buf = vec![0u8; NET_HDR_LEN + 2048];
        let mut gate = PassThroughGate::new();
        let mut sink = Frames::default();
        let mut counters = NetCounters::default();
        let mut errors = GuestErrorLog::new("test");
        let mut path = TxPath {
            buf: &mut buf,
            gate: &mut gate,
            sink: &mut sink,
            counters: &mut counters,
            errors: &mut errors,
        };
        assert!(path.drain(&mut queue, mem, QUEUE_BUDGET).used);
        (sink, counters)
    }

    /// A queue holding `n` transmit chains of one 64-byte frame each (header + payload).
    fn frames_queue(mem: &GuestMemoryMmap, n: u64) -> Queue {
        let q = MockSplitQueue::new(mem, 16);
        let raw: Vec<RawDescriptor> = (0..n)
            .map(|i| {
                mem.write_slice(&[i as u8; 64], GuestAddress(0x8000 + i * 0x100))
                    .unwrap();
                RawDescriptor::from(Descriptor::new(0x8000 + i * 0x100, 64, 0, 0))
            })
            .collect();
        q.build_multiple_desc_chains(&raw).unwrap();
        q.create_queue().unwrap()
    }

    #[test]
    fn transmit_takes_at_most_its_budget_per_turn() {
        let m = mem();
        let mut queue = frames_queue(&m, 3);
        let (mut buf, mut gate, mut sink) =
            (vec![0u8; 2048], PassThroughGate::new(), Frames::default());
        let (mut counters, mut errors) = (NetCounters::default(), GuestErrorLog::new("test"));
        let mut path = TxPath {
            buf: &mut buf,
            gate: &mut gate,
            sink: &mut sink,
            counters: &mut counters,
            errors: &mut errors,
        };
        let first = path.drain(&mut queue, &m, 2);
        assert!(first.used && first.budget_exhausted);
        let second = path.drain(&mut queue, &m, 2);
        assert!(second.used && !second.budget_exhausted);
        assert_eq!(sink.0.len(), 3);
    }

    #[test]
    fn a_full_gate_pauses_transmit_and_drops_nothing() {
        let m = mem();
        let mut queue = frames_queue(&m, 3);
        // Room for one frame (header and payload) only.
        let mut gate = crate::output_gate::EpochGate::with_cap(1, 64);
        let (mut buf, mut sink) = (vec![0u8; 2048], Frames::default());
        let (mut counters, mut errors) = (NetCounters::default(), GuestErrorLog::new("test"));
        let mut path = TxPath {
            buf: &mut buf,
            gate: &mut gate,
            sink: &mut sink,
            counters: &mut counters,
            errors: &mut errors,
        };
        let drained = path.drain(&mut queue, &m, QUEUE_BUDGET);
        assert!(drained.used && !drained.budget_exhausted);
        assert_eq!(path.counters.tx_frames, 1);
        assert_eq!(path.counters.tx_paused, 1);
        assert_eq!(path.counters.tx_dropped, 0);
        // The checkpoint commits: the held frame leaves and transmit goes on where it stopped.
        assert_eq!(path.gate.release_through(1, path.sink).unwrap(), 1);
        path.drain(&mut queue, &m, QUEUE_BUDGET);
        assert_eq!(path.counters.tx_frames, 2);
        assert_eq!(path.gate.release_through(1, path.sink).unwrap(), 1);
        path.drain(&mut queue, &m, QUEUE_BUDGET);
        assert_eq!(path.gate.release_through(1, path.sink).unwrap(), 1);
        assert_eq!(path.counters.tx_frames, 3);
        assert_eq!(path.counters.tx_dropped, 0);
        let payloads: Vec<u8> = sink.0.iter().map(|f| f[0]).collect();
        assert_eq!(payloads, vec![0, 1, 2], "in order, none lost");
    }

    #[test]
    fn transmit_passes_the_drivers_header_and_gathers_descriptors() {
        let m = mem();
        // NEEDS_CSUM, csum_start 34, csum_offset 16: the TAP finishes the checksum.
        let header = [1, 0, 0, 0, 0, 0, 34, 0, 16, 0, 0, 0];
        m.write_slice(&header, GuestAddress(0x8000)).unwrap();
        m.write_slice(b"hello ", GuestAddress(0x9000)).unwrap();
        m.write_slice(b"world", GuestAddress(0xa000)).unwrap();
        let (frames, c) = tx(
            &m,
            &[
                (0x8000, NET_HDR_LEN as u32, false),
                (0x9000, 6, false),
                (0xa000, 5, false),
            ],
        );
        assert_eq!(frames.0, vec![[&header[..], b"hello world"].concat()]);
        assert_eq!(c.tx_frames, 1);
    }

    #[test]
    fn malformed_transmit_chains_are_dropped() {
        let m = mem();
        // Header only, no payload.
        let (frames, c) = tx(&m, &[(0x8000, NET_HDR_LEN as u32, false)]);
        assert!(frames.0.is_empty());
        assert_eq!(c.tx_dropped, 1);
        // Larger than any frame.
        let (frames, c) = tx(&m, &[(0x8000, 0x8000, false)]);
        assert!(frames.0.is_empty());
        assert_eq!(c.tx_dropped, 1);
        // Outside guest memory.
        let (frames, c) = tx(&m, &[(0xffff_0000_0000, 64, false)]);
        assert!(frames.0.is_empty());
        assert_eq!(c.tx_dropped, 1);
    }

    /// A frame as the TAP delivers it: its header (NEEDS_CSUM | DATA_VALID, TCPv4 segments of 1448
    /// bytes), then the frame.
    fn from_tap(frame: &[u8]) -> Vec<u8> {
        [&[3u8, 1, 66, 0, 0xa8, 5, 34, 0, 16, 0, 0, 0][..], frame].concat()
    }

    #[test]
    fn receive_writes_header_and_frame_or_drops_when_too_small() {
        let m = mem();
        let mut counters = NetCounters::default();
        let mut errors = GuestErrorLog::new("test");
        let mut q = queue_with(&m, &[(0x8000, 2048, true)]);
        let packet = from_tap(b"frame!");
        assert_eq!(
            deliver_frame(&mut q, &m, &packet, true, &mut counters, &mut errors),
            Some(true)
        );
        let mut got = [0u8; NET_HDR_LEN + 6];
        m.read_slice(&mut got, GuestAddress(0x8000)).unwrap();
        assert_eq!(&got[..10], &packet[..10], "the TAP's offload fields");
        assert_eq!(&got[NET_HDR_LEN..], b"frame!");
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
        // No more buffers: the frame is kept by the caller.
        assert_eq!(
            deliver_frame(
                &mut q,
                &m,
                &from_tap(b"next"),
                true,
                &mut counters,
                &mut errors
            ),
            None
        );
        // A buffer too small for header + frame: returned empty, frame dropped.
        let mut q = queue_with(&m, &[(0x8000, 8, true)]);
        assert_eq!(
            deliver_frame(&mut q, &m, &packet, true, &mut counters, &mut errors),
            Some(true)
        );
        assert_eq!(counters.rx_dropped, 1);
        // A read-only buffer cannot receive.
        let mut q = queue_with(&m, &[(0x8000, 2048, false)]);
        assert_eq!(
            deliver_frame(&mut q, &m, &packet, true, &mut counters, &mut errors),
            Some(true)
        );
        assert_eq!(counters.rx_dropped, 2);
        // Shorter than a header: dropped.
        let mut q = queue_with(&m, &[(0x8000, 2048, true)]);
        assert_eq!(
            deliver_frame(&mut q, &m, &[0u8; 5], true, &mut counters, &mut errors),
            Some(true)
        );
        assert_eq!(counters.rx_dropped, 3);
    }

    #[test]
    fn a_driver_without_partial_checksums_gets_no_offload_fields() {
        let m = mem();
        let (mut counters, mut errors) = (NetCounters::default(), GuestErrorLog::new("test"));
        let mut q = queue_with(&m, &[(0x8000, 2048, true)]);
        let packet = from_tap(b"frame!");
        assert_eq!(
            deliver_frame(&mut q, &m, &packet, false, &mut counters, &mut errors),
            Some(true)
        );
        let mut got = [0u8; NET_HDR_LEN];
        m.read_slice(&mut got, GuestAddress(0x8000)).unwrap();
        assert_eq!(got, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
    }
}
