//! A virtio-blk queue driven by hand (virtio-drivers' `VirtQueue` without its block driver), for
//! the requests a well-behaved driver never makes: a hostile guest's. It negotiates nothing but
//! VIRTIO_F_VERSION_1, so the device holds it to no `seg_max` or `size_max`.

use super::hal::TgHal;
use super::probe::{self, Slot};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::Transport;
use virtio_drivers::transport::mmio::MmioTransport;

bitflags::bitflags! {
    /// The only feature this driver accepts.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    struct Features: u64 {
        const VERSION_1 = 1 << 32;
    }
}

/// The device's queue size: a chain may use every descriptor.
const QUEUE_SIZE: usize = 256;
const VIRTIO_BLK_T_OUT: u32 = 1;

pub struct RawBlk {
    transport: MmioTransport<'static>,
    queue: VirtQueue<TgHal, QUEUE_SIZE>,
}

impl RawBlk {
    /// Initialises the device in `slot` with one request queue.
    pub fn open(slot: &Slot) -> Result<RawBlk, String> {
        let mut transport =
            probe::transport(slot).map_err(|e| format!("slot {}: transport: {e}", slot.index))?;
        transport.begin_init(Features::VERSION_1);
        let queue = VirtQueue::new(&mut transport, 0, false, false)
            .map_err(|e| format!("slot {}: queue: {e}", slot.index))?;
        transport.finish_init();
        Ok(RawBlk { transport, queue })
    }

    /// The most data segments one request can carry: every descriptor but the header's and the
    /// status byte's.
    pub const MAX_SEGMENTS: usize = QUEUE_SIZE - 2;

    /// One write request of `segments` data segments that all name `data`, at `sector`: the
    /// device is asked to write `segments × data.len()` bytes from `data.len()` of memory.
    /// Returns the status byte the device wrote.
    pub fn write_repeated(
        &mut self,
        sector: u64,
        data: &[u8],
        segments: usize,
    ) -> Result<u8, String> {
        let mut header = [0u8; 16];
        header[0..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
        header[8..16].copy_from_slice(&sector.to_le_bytes());
        let mut inputs: Vec<&[u8]> = Vec::with_capacity(segments + 1);
        inputs.push(&header);
        inputs.extend(core::iter::repeat_n(data, segments));
        let mut status = [0xffu8];
        let mut outputs = [&mut status[..]];
        self.queue
            .add_notify_wait_pop(&inputs, &mut outputs, &mut self.transport)
            .map_err(|e| format!("request: {e}"))?;
        Ok(status[0])
    }
}

impl Drop for RawBlk {
    fn drop(&mut self) {
        self.transport.queue_unset(0);
        self.transport
            .set_status(virtio_drivers::transport::DeviceStatus::empty());
    }
}
