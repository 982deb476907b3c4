//! Running virtio-net on the event loop: frames from the TAP into the receive queue, frames from the
//! transmit queue through the output gate to the TAP.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::QueueT;
use vmm_sys_util::epoll::EventSet;

use super::device::{VirtioNet, NET_HDR_LEN};

/// `virtio_net_hdr_v1` for a received frame: no offloads, one buffer.
fn rx_header() -> [u8; NET_HDR_LEN] {
    let mut h = [0u8; NET_HDR_LEN];
    h[10..12].copy_from_slice(&1u16.to_le_bytes()); // num_buffers
    h
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
            let Some(chain) = active.rx_queue.pop_descriptor_chain(mem) else {
                // No buffer: keep the frame until the driver adds some (rx queue notification).
                self.rx_pending = Some(len);
                break;
            };
            self.rx_pending = None;
            let head = chain.head_index();
            let written = match chain.writer(mem) {
                Ok(mut w) if w.available_bytes() >= NET_HDR_LEN + len => {
                    match w
                        .write_all(&rx_header())
                        .and_then(|_| w.write_all(&self.rx_buf[..len]))
                    {
                        Ok(()) => {
                            self.counters.rx_frames += 1;
                            w.bytes_written()
                        }
                        Err(e) => {
                            tracing::debug!("virtio-net: cannot write received frame: {e}");
                            self.counters.rx_dropped += 1;
                            0
                        }
                    }
                }
                Ok(_) | Err(_) => {
                    tracing::debug!(
                        "virtio-net: receive buffer {head} unusable; frame of {len} bytes dropped"
                    );
                    self.counters.rx_dropped += 1;
                    0
                }
            };
            if let Err(e) = active.rx_queue.add_used(mem, head, written as u32) {
                tracing::warn!("virtio-net: cannot return receive buffer {head}: {e}");
                break;
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
        let mem = &active.memory;
        let mut completed = false;
        while let Some(chain) = active.tx_queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            match chain.reader(mem) {
                Ok(mut r)
                    if r.available_bytes() <= self.tx_buf.len()
                        && r.available_bytes() > NET_HDR_LEN =>
                {
                    let len = r.available_bytes();
                    match r.read_exact(&mut self.tx_buf[..len]) {
                        Ok(()) => match self
                            .gate
                            .submit(&self.tx_buf[NET_HDR_LEN..len], &mut self.tap)
                        {
                            Ok(()) => self.counters.tx_frames += 1,
                            Err(e) => {
                                // A full TAP queue drops the frame, as a congested link would.
                                tracing::debug!(
                                    "virtio-net {}: frame dropped: {e}",
                                    self.tap.name()
                                );
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
            if let Err(e) = active.tx_queue.add_used(mem, head, 0) {
                tracing::warn!("virtio-net: cannot return transmit buffer {head}: {e}");
                break;
            }
            completed = true;
        }
        if completed {
            active.interrupt.signal_used_queue();
        }
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
