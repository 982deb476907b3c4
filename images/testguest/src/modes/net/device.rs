//! The first virtio-net device (virtio-drivers' `VirtIONetRaw`) as a smoltcp `Device`, with
//! buffers managed here so that sending does not wait for the device:
//!
//! * receive: `QUEUE_SIZE` buffers always posted on the receive queue; a completed one is lent
//!   to smoltcp and posted again afterwards.
//! * transmit: `TX_BUFFERS` buffers; a frame is built in a free one and submitted, and buffers
//!   whose transmission completed are reaped before the next frame (no wait for the device
//!   unless every buffer is in flight).
//!
//! Buffers are allocated once and never freed or moved (the device lives as long as the
//! guest). Receive buffers are kept as raw pointers: smoltcp sends replies from inside the
//! receive token's `consume`, so a received frame is read while the device is borrowed again.

use crate::virtio::hal::TgHal;
use crate::virtio::probe::{self, Slot};
use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;
use core::ptr::NonNull;
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use virtio_drivers::device::net::VirtIONetRaw;
use virtio_drivers::transport::mmio::{MmioTransport, MmioVersion};

/// Descriptors per queue (the device must offer at least this many).
const QUEUE_SIZE: usize = 64;
/// Frames in flight to the device at most.
const TX_BUFFERS: usize = 32;
/// Buffer: virtio-net header (12 bytes) + a 1514-byte Ethernet frame, rounded up.
const BUFFER_LEN: usize = 2048;
/// Largest Ethernet frame sent (no VLAN tag, no FCS).
const MTU: usize = 1514;

type Raw = VirtIONetRaw<TgHal, MmioTransport<'static>, QUEUE_SIZE>;

/// Frame counters.
#[derive(Default, Clone, Copy, Debug)]
pub struct Stats {
    pub rx: u64,
    pub tx: u64,
    pub rx_errors: u64,
    pub tx_errors: u64,
}

struct Inner {
    raw: Raw,
    /// Leaked `BUFFER_LEN`-byte allocations, owned by the device while posted.
    rx_bufs: Vec<NonNull<[u8]>>,
    /// Receive-queue token -> index in `rx_bufs`.
    rx_by_token: [Option<usize>; QUEUE_SIZE],
    tx_bufs: Vec<Box<[u8]>>,
    tx_free: Vec<usize>,
    /// Transmit-queue token -> (index in `tx_bufs`, bytes submitted).
    tx_by_token: [Option<(usize, usize)>; QUEUE_SIZE],
    stats: Stats,
}

impl Inner {
    /// Posts receive buffer `i`.
    fn post_rx(&mut self, i: usize) {
        // SAFETY: rx_bufs[i] is a live, leaked allocation; nothing else refers to it while it is
        // posted (until its token comes back and receive_complete is called with it).
        match unsafe { self.raw.receive_begin(self.rx_bufs[i].as_mut()) } {
            Ok(t) if usize::from(t) < QUEUE_SIZE => self.rx_by_token[usize::from(t)] = Some(i),
            _ => self.stats.rx_errors += 1,
        }
    }

    /// Takes every completed transmission back into the free list.
    fn reap_tx(&mut self) {
        while let Some(t) = self.raw.poll_transmit() {
            let Some((i, len)) = self
                .tx_by_token
                .get_mut(usize::from(t))
                .and_then(Option::take)
            else {
                // A token we never submitted: the used ring is corrupt; stop reaping.
                self.stats.tx_errors += 1;
                return;
            };
            // SAFETY: the same buffer (and length) that transmit_begin got for this token.
            if unsafe { self.raw.transmit_complete(t, &self.tx_bufs[i][..len]) }.is_err() {
                self.stats.tx_errors += 1;
            }
            self.tx_free.push(i);
        }
    }
}

pub struct NetDevice {
    inner: RefCell<Inner>,
    pub slot: Slot,
}

impl NetDevice {
    /// Initialises the first virtio-net device (virtio 1.x over MMIO version 2 only).
    pub fn open_first() -> Result<NetDevice, String> {
        let slot = probe::find(probe::DEVICE_NET).ok_or("no virtio-net device")?;
        let transport =
            probe::transport(&slot).map_err(|e| format!("slot {}: transport: {e}", slot.index))?;
        if transport.version() != MmioVersion::Modern {
            return Err(format!(
                "slot {}: virtio-mmio version {:?}, want 2",
                slot.index,
                transport.version()
            ));
        }
        let raw = Raw::new(transport).map_err(|e| {
            format!(
                "slot {}: virtio-net init (queue size {QUEUE_SIZE}): {e}",
                slot.index
            )
        })?;
        let buf = || vec![0u8; BUFFER_LEN].into_boxed_slice();
        let mut inner = Inner {
            raw,
            rx_bufs: (0..QUEUE_SIZE)
                .map(|_| NonNull::from(Box::leak(buf())))
                .collect(),
            rx_by_token: [None; QUEUE_SIZE],
            tx_bufs: (0..TX_BUFFERS).map(|_| buf()).collect(),
            tx_free: (0..TX_BUFFERS).rev().collect(),
            tx_by_token: [None; QUEUE_SIZE],
            stats: Stats::default(),
        };
        for i in 0..QUEUE_SIZE {
            inner.post_rx(i);
        }
        if inner.stats.rx_errors != 0 {
            return Err(format!(
                "slot {}: could not post the receive buffers",
                slot.index
            ));
        }
        Ok(NetDevice {
            inner: RefCell::new(inner),
            slot,
        })
    }

    /// The MAC address from the device's config space.
    pub fn mac(&self) -> [u8; 6] {
        self.inner.borrow().raw.mac_address()
    }

    /// Frame and error counters.
    pub fn stats(&self) -> Stats {
        self.inner.borrow().stats
    }
}

/// A received frame: `len` bytes at `off` in receive buffer `buf`. Dropping it (consumed or
/// not) posts the buffer again.
pub struct RxToken<'a> {
    dev: &'a NetDevice,
    buf: usize,
    off: usize,
    len: usize,
}

pub struct TxToken<'a> {
    dev: &'a NetDevice,
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        let buf = self.dev.inner.borrow().rx_bufs[self.buf];
        // SAFETY: the buffer is a live, leaked allocation that the device gave back
        // (receive_complete) and that is posted again only when this token is dropped, after
        // `f`; nothing writes it meanwhile. off + len <= BUFFER_LEN was checked in receive().
        let frame = unsafe { &buf.as_ref()[self.off..self.off + self.len] };
        f(frame)
    }
}

impl Drop for RxToken<'_> {
    fn drop(&mut self) {
        self.dev.inner.borrow_mut().post_rx(self.buf);
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut guard = self.dev.inner.borrow_mut();
        let inner = &mut *guard;
        // transmit() handed out this token only with a free buffer; wait for one otherwise.
        let i = loop {
            if let Some(i) = inner.tx_free.pop() {
                break i;
            }
            inner.reap_tx();
            core::hint::spin_loop();
        };
        let buf = &mut inner.tx_bufs[i];
        let hdr = inner.raw.fill_buffer_header(buf).unwrap_or(0);
        let len = len.min(buf.len() - hdr);
        let r = f(&mut buf[hdr..hdr + len]);
        let total = hdr + len;
        // SAFETY: tx_bufs[i] is a boxed slice that is neither moved nor touched until its token
        // is reaped (reap_tx calls transmit_complete with the same slice).
        match unsafe { inner.raw.transmit_begin(&inner.tx_bufs[i][..total]) } {
            Ok(t) if usize::from(t) < QUEUE_SIZE => {
                inner.tx_by_token[usize::from(t)] = Some((i, total));
                inner.stats.tx += 1;
            }
            _ => {
                inner.tx_free.push(i);
                inner.stats.tx_errors += 1;
            }
        }
        r
    }
}

impl phy::Device for NetDevice {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        let (buf, off, len) = {
            let mut guard = self.inner.borrow_mut();
            let inner = &mut *guard;
            let t = inner.raw.poll_receive()?;
            let Some(i) = inner
                .rx_by_token
                .get_mut(usize::from(t))
                .and_then(Option::take)
            else {
                inner.stats.rx_errors += 1;
                return None;
            };
            // SAFETY: the same buffer that receive_begin got for this token, now given back.
            match unsafe { inner.raw.receive_complete(t, inner.rx_bufs[i].as_mut()) } {
                Ok((hdr, len)) if hdr + len <= BUFFER_LEN => {
                    inner.stats.rx += 1;
                    (i, hdr, len)
                }
                _ => {
                    inner.stats.rx_errors += 1;
                    inner.post_rx(i);
                    return None;
                }
            }
        };
        Some((
            RxToken {
                dev: self,
                buf,
                off,
                len,
            },
            TxToken { dev: self },
        ))
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxToken<'_>> {
        let mut inner = self.inner.borrow_mut();
        inner.reap_tx();
        (!inner.tx_free.is_empty() && inner.raw.can_send()).then_some(TxToken { dev: self })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MTU;
        caps
    }
}
