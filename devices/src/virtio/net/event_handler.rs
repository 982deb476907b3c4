//! Running virtio-net on the event loop: frames from the TAP into the receive queue, frames from the
//! transmit queue through the output gate to the TAP.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::EventSet;

use super::device::{NetCounters, VirtioNet, NET_HDR_LEN};
use crate::output_gate::{OutputGate, OutputSink};
use crate::virtio::GuestMemoryMmap;

/// `virtio_net_hdr_v1` for a received frame: no offloads, one buffer.
fn rx_header() -> [u8; NET_HDR_LEN] {
    let mut h = [0u8; NET_HDR_LEN];
    h[10..12].copy_from_slice(&1u16.to_le_bytes()); // num_buffers
    h
}

/// Writes one received frame into the next receive buffer on `queue`. Returns `None` when the driver
/// has no buffer available (the frame is not consumed), `Some(false)` if the queue is broken (stop
/// using it), `Some(true)` once the buffer went back to the driver (holding the frame, or dropped
/// because the buffer was unusable).
pub fn deliver_frame(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    frame: &[u8],
    counters: &mut NetCounters,
) -> Option<bool> {
    let chain = queue.pop_descriptor_chain(mem)?;
    let head = chain.head_index();
    let written = match chain.writer(mem) {
        Ok(mut w) if w.available_bytes() >= NET_HDR_LEN + frame.len() => {
            match w.write_all(&rx_header()).and_then(|_| w.write_all(frame)) {
                Ok(()) => {
                    counters.rx_frames += 1;
                    w.bytes_written()
                }
                Err(e) => {
                    tracing::debug!("virtio-net: cannot write received frame: {e}");
                    counters.rx_dropped += 1;
                    0
                }
            }
        }
        Ok(_) | Err(_) => {
            tracing::debug!(
                "virtio-net: receive buffer {head} unusable; frame of {} bytes dropped",
                frame.len()
            );
            counters.rx_dropped += 1;
            0
        }
    };
    match queue.add_used(mem, head, written as u32) {
        Ok(()) => Some(true),
        Err(e) => {
            tracing::warn!("virtio-net: cannot return receive buffer {head}: {e}");
            Some(false)
        }
    }
}

impl VirtioNet {
    /// Moves frames from the TAP to the guest until the TAP is empty or the guest has no buffers.
    pub fn process_rx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = &active.memory;
        let mut delivered = false;
        loop {
            let len = match self.rx_pending {
                Some(len) => len,
                None => match self.tap.read_frame(&mut self.rx_buf) {
                    Ok(len) => len,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        tracing::warn!("virtio-net {}: TAP read failed: {e}", self.tap.name());
                        break;
                    }
                },
            };
            match deliver_frame(
                &mut active.rx_queue,
                mem,
                &self.rx_buf[..len],
                &mut self.counters,
            ) {
                Some(true) => self.rx_pending = None,
                Some(false) => {
                    self.rx_pending = None;
                    break;
                }
                None => {
                    // No buffer: keep the frame until the driver adds some (rx queue notification).
                    self.rx_pending = Some(len);
                    break;
                }
            }
            delivered = true;
        }
        if delivered {
            active.interrupt.signal_used_queue();
        }
    }

    /// Sends every frame the guest queued, through the output gate.
    pub fn process_tx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mut tx = TxPath {
            buf: &mut self.tx_buf,
            gate: self.gate.as_mut(),
            sink: &mut self.tap,
            counters: &mut self.counters,
        };
        if tx.drain(&mut active.tx_queue, &active.memory) {
            active.interrupt.signal_used_queue();
        }
    }
}

/// The transmit path between a queue and a sink, separate from the device so it can be fuzzed.
pub struct TxPath<'a> {
    pub buf: &'a mut Vec<u8>,
    pub gate: &'a mut dyn OutputGate,
    pub sink: &'a mut dyn OutputSink,
    pub counters: &'a mut NetCounters,
}

impl TxPath<'_> {
    /// Sends every frame on `queue`; returns whether any descriptor was returned to the driver.
    pub fn drain(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut completed = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            match chain.reader(mem) {
                Ok(mut r)
                    if r.available_bytes() <= self.buf.len()
                        && r.available_bytes() > NET_HDR_LEN =>
                {
                    let len = r.available_bytes();
                    match r.read_exact(&mut self.buf[..len]) {
                        Ok(()) => match self.gate.submit(&self.buf[NET_HDR_LEN..len], self.sink) {
                            Ok(()) => self.counters.tx_frames += 1,
                            Err(e) => {
                                // A full TAP queue drops the frame, as a congested link would.
                                tracing::debug!("virtio-net: frame dropped: {e}");
                                self.counters.tx_dropped += 1;
                            }
                        },
                        Err(e) => {
                            tracing::debug!("virtio-net: cannot read frame {head}: {e}");
                            self.counters.tx_dropped += 1;
                        }
                    }
                }
                Ok(r) => {
                    tracing::debug!(
                        "virtio-net: transmit chain {head} of {} bytes rejected",
                        r.available_bytes()
                    );
                    self.counters.tx_dropped += 1;
                }
                Err(e) => {
                    tracing::debug!("virtio-net: transmit chain {head} unusable: {e}");
                    self.counters.tx_dropped += 1;
                }
            }
            if let Err(e) = queue.add_used(mem, head, 0) {
                tracing::warn!("virtio-net: cannot return transmit buffer {head}: {e}");
                break;
            }
            completed = true;
        }
        completed
    }
}

impl MutEventSubscriber for VirtioNet {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.activate_event.as_raw_fd() {
            let _ = self.activate_event.read();
            if let Some(active) = &self.active {
                for (evt, what) in [
                    (&active.rx_event, "receive queue"),
                    (&active.tx_event, "transmit queue"),
                ] {
                    if let Err(e) = ops.add(Events::new(evt, EventSet::IN)) {
                        tracing::error!(
                            "virtio-net {}: cannot watch the {what}: {e}",
                            self.tap.name()
                        );
                    }
                }
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
            }
            self.process_tx();
            self.process_rx();
            return;
        }
        if fd == self.tap.as_raw_fd() {
            self.process_rx();
            return;
        }
        let which = self
            .active
            .as_ref()
            .map(|a| (a.rx_event.as_raw_fd(), a.tx_event.as_raw_fd()));
        match which {
            Some((rx, _)) if fd == rx => {
                if let Some(a) = &self.active {
                    let _ = a.rx_event.read();
                }
                self.process_rx();
            }
            Some((_, tx)) if fd == tx => {
                if let Some(a) = &self.active {
                    let _ = a.tx_event.read();
                }
                self.process_tx();
            }
            _ => {
                let _ = ops.remove(events);
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.activate_event, EventSet::IN)) {
            tracing::error!(
                "virtio-net {}: cannot watch activation: {e}",
                self.tap.name()
            );
        }
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
        let mut path = TxPath {
            buf: &mut buf,
            gate: &mut gate,
            sink: &mut sink,
            counters: &mut counters,
        };
        assert!(path.drain(&mut queue, mem));
        (sink, counters)
    }

    #[test]
    fn transmit_strips_the_header_and_gathers_descriptors() {
        let m = mem();
        m.write_slice(&[0u8; NET_HDR_LEN], GuestAddress(0x8000))
            .unwrap();
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
        assert_eq!(frames.0, vec![b"hello world".to_vec()]);
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

    #[test]
    fn receive_writes_header_and_frame_or_drops_when_too_small() {
        let m = mem();
        let mut counters = NetCounters::default();
        let mut q = queue_with(&m, &[(0x8000, 2048, true)]);
        assert_eq!(
            deliver_frame(&mut q, &m, b"frame!", &mut counters),
            Some(true)
        );
        let mut got = [0u8; NET_HDR_LEN + 6];
        m.read_slice(&mut got, GuestAddress(0x8000)).unwrap();
        assert_eq!(&got[NET_HDR_LEN..], b"frame!");
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
        // No more buffers: the frame is kept by the caller.
        assert_eq!(deliver_frame(&mut q, &m, b"next", &mut counters), None);
        // A buffer too small for header + frame: returned empty, frame dropped.
        let mut q = queue_with(&m, &[(0x8000, 8, true)]);
        assert_eq!(
            deliver_frame(&mut q, &m, b"frame!", &mut counters),
            Some(true)
        );
        assert_eq!(counters.rx_dropped, 1);
        // A read-only buffer cannot receive.
        let mut q = queue_with(&m, &[(0x8000, 2048, false)]);
        assert_eq!(
            deliver_frame(&mut q, &m, b"frame!", &mut counters),
            Some(true)
        );
        assert_eq!(counters.rx_dropped, 2);
    }
}
