//! A virtio-blk disk (virtio-drivers' `VirtIOBlk`) as a `BlockDev`: large transfers are split
//! into requests of at most `max_request` bytes, each one synchronous (submit, notify, poll the
//! used ring).

use super::hal::TgHal;
use super::probe::{self, Slot};
use alloc::format;
use alloc::string::String;
use testguest::blockdev::{BlockDev, SECTOR_SIZE};
use virtio_drivers::device::blk::VirtIOBlk;
use virtio_drivers::transport::mmio::{MmioTransport, MmioVersion};

/// Default largest request (bytes).
pub const DEFAULT_MAX_REQUEST: usize = 512 * 1024;

pub struct Disk {
    blk: VirtIOBlk<TgHal, MmioTransport<'static>>,
    pub slot: Slot,
    max_request: usize,
}

impl Disk {
    /// Opens the first virtio-blk device.
    pub fn open_first() -> Result<Disk, String> {
        let slot = probe::find(probe::DEVICE_BLOCK).ok_or("no virtio-blk device")?;
        Disk::open(slot)
    }

    /// Initialises the device in `slot` (virtio 1.x over MMIO version 2 only).
    pub fn open(slot: Slot) -> Result<Disk, String> {
        let transport =
            probe::transport(&slot).map_err(|e| format!("slot {}: transport: {e}", slot.index))?;
        if transport.version() != MmioVersion::Modern {
            return Err(format!(
                "slot {}: virtio-mmio version {:?}, want 2",
                slot.index,
                transport.version()
            ));
        }
        let blk = VirtIOBlk::<TgHal, _>::new(transport)
            .map_err(|e| format!("slot {}: virtio-blk init: {e}", slot.index))?;
        Ok(Disk {
            blk,
            slot,
            max_request: DEFAULT_MAX_REQUEST,
        })
    }

    /// Sets the largest request, rounded down to whole sectors (at least one).
    pub fn set_max_request(&mut self, bytes: usize) {
        self.max_request = (bytes / SECTOR_SIZE).max(1) * SECTOR_SIZE;
    }

    pub fn max_request(&self) -> usize {
        self.max_request
    }

    /// Whether the device offered (and the driver accepted) VIRTIO_BLK_F_RO.
    pub fn readonly(&self) -> bool {
        self.blk.readonly()
    }

    /// Size in bytes.
    pub fn bytes(&self) -> u64 {
        self.blk.capacity() * SECTOR_SIZE as u64
    }

    /// The device's ID string (VIRTIO_BLK_T_GET_ID).
    pub fn device_id(&mut self) -> Result<String, virtio_drivers::Error> {
        let mut id = [0u8; 20];
        let n = self.blk.device_id(&mut id)?;
        Ok(id[..n]
            .iter()
            .map(|&b| {
                if (0x20..0x7f).contains(&b) {
                    char::from(b)
                } else {
                    '?'
                }
            })
            .collect())
    }

    fn check(&self, sector: u64, len: usize) -> Result<(), virtio_drivers::Error> {
        let sectors = (len / SECTOR_SIZE) as u64;
        if !len.is_multiple_of(SECTOR_SIZE)
            || sector
                .checked_add(sectors)
                .is_none_or(|e| e > self.sectors())
        {
            return Err(virtio_drivers::Error::InvalidParam);
        }
        Ok(())
    }
}

impl BlockDev for Disk {
    type Error = virtio_drivers::Error;

    fn sectors(&self) -> u64 {
        self.blk.capacity()
    }

    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), Self::Error> {
        self.check(sector, buf.len())?;
        let mut s = sector;
        for chunk in buf.chunks_mut(self.max_request) {
            self.blk.read_blocks(s as usize, chunk)?;
            s += (chunk.len() / SECTOR_SIZE) as u64;
        }
        Ok(())
    }

    fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), Self::Error> {
        self.check(sector, buf.len())?;
        let mut s = sector;
        for chunk in buf.chunks(self.max_request) {
            self.blk.write_blocks(s as usize, chunk)?;
            s += (chunk.len() / SECTOR_SIZE) as u64;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), Self::Error> {
        self.blk.flush()
    }
}

impl Drop for Disk {
    /// virtio-drivers stops the queue before it resets the device, and waits for QueueReady to
    /// read back 0 without a bound; a device that ignores the write would hang the guest. So
    /// the stop is tried here first, and the device reset if it does not take.
    fn drop(&mut self) {
        if !probe::stop_queue(&self.slot, 0) {
            crate::println!(
                "testguest: virtio WARN slot={} queue 0 still reads QueueReady=1 after the driver wrote 0 (virtio 1.x 4.2.2.2); resetting the device instead",
                self.slot.index
            );
            probe::reset(&self.slot);
        }
    }
}
