//! Finding virtio-mmio devices: slot `i` has its registers at `MMIO_BASE + i * SLOT_SIZE`; a
//! device answers the magic "virt" at offset 0 and its device ID at offset 8. Probing stops at
//! the first slot without the magic (an empty slot reads as all-ones).

use core::ptr::NonNull;
use virtio_drivers::transport::mmio::{MmioError, MmioTransport, VirtIOHeader};

pub const MMIO_BASE: usize = 0xd000_0000;
pub const SLOT_SIZE: usize = 0x1000;
/// Slots looked at, at most.
pub const MAX_SLOTS: usize = 64;
const MAGIC: u32 = 0x7472_6976;
const REG_MAGIC: usize = 0x00;
const REG_VERSION: usize = 0x04;
const REG_DEVICE_ID: usize = 0x08;

/// Virtio device IDs used here.
pub const DEVICE_NET: u32 = 1;
pub const DEVICE_BLOCK: u32 = 2;

/// A virtio-mmio slot that holds a device.
#[derive(Clone, Copy, Debug)]
pub struct Slot {
    pub index: usize,
    pub addr: usize,
    pub device_id: u32,
    pub version: u32,
}

fn read_reg(addr: usize) -> u32 {
    // SAFETY: addr is a 4-byte-aligned register in the virtio-mmio window, identity mapped
    // uncached and user-accessible; reading it has no side effect on the device.
    unsafe { core::ptr::with_exposed_provenance::<u32>(addr).read_volatile() }
}

/// Every device, in slot order.
pub fn scan() -> impl Iterator<Item = Slot> {
    (0..MAX_SLOTS)
        .map(|index| {
            let addr = MMIO_BASE + index * SLOT_SIZE;
            (index, addr, read_reg(addr + REG_MAGIC))
        })
        .take_while(|&(_, _, magic)| magic == MAGIC)
        .map(|(index, addr, _)| Slot {
            index,
            addr,
            device_id: read_reg(addr + REG_DEVICE_ID),
            version: read_reg(addr + REG_VERSION),
        })
}

/// The first device of type `device_id`.
pub fn find(device_id: u32) -> Option<Slot> {
    scan().find(|s| s.device_id == device_id)
}

/// The virtio-drivers transport of `slot`. Each slot must have at most one transport at a time.
pub fn transport(slot: &Slot) -> Result<MmioTransport<'static>, MmioError> {
    let header = NonNull::new(core::ptr::with_exposed_provenance_mut::<VirtIOHeader>(
        slot.addr,
    ))
    .ok_or(MmioError::BadMagic(0))?;
    // SAFETY: the slot is a 4 KiB virtio-mmio register window (header and config space),
    // identity mapped for the whole run, and the caller uses one transport per slot.
    unsafe { MmioTransport::new(header, SLOT_SIZE) }
}

const REG_QUEUE_SEL: usize = 0x30;
const REG_QUEUE_READY: usize = 0x44;
const REG_STATUS: usize = 0x70;
/// Reads of QueueReady allowed for a stopped queue to read back 0.
const STOP_POLLS: u32 = 1000;

fn write_reg(addr: usize, value: u32) {
    // SAFETY: addr is a 4-byte-aligned register in the virtio-mmio window, identity mapped
    // uncached and user-accessible.
    unsafe { core::ptr::with_exposed_provenance_mut::<u32>(addr).write_volatile(value) }
}

/// Stops `queue` the way virtio 1.x (4.2.2.2) tells a driver to: writes 0 to QueueReady and
/// reads it back. Returns whether it read back 0 (virtio-drivers waits for that without a
/// bound when it drops a device, so this is checked first).
pub fn stop_queue(slot: &Slot, queue: u32) -> bool {
    write_reg(slot.addr + REG_QUEUE_SEL, queue);
    write_reg(slot.addr + REG_QUEUE_READY, 0);
    (0..STOP_POLLS).any(|_| read_reg(slot.addr + REG_QUEUE_READY) == 0)
}

/// Resets the device (Status = 0).
pub fn reset(slot: &Slot) {
    write_reg(slot.addr + REG_STATUS, 0);
}
