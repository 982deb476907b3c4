//! The block device interface the key-value log is written against: whole 512-byte sectors,
//! synchronous. The guest implements it on virtio-blk (`virtio::blk::Disk`); tests on a `Vec`.

/// Bytes per sector (virtio-blk's unit, whatever the device's block size).
pub const SECTOR_SIZE: usize = 512;

/// A disk of `sectors()` 512-byte sectors. Buffers are whole sectors.
pub trait BlockDev {
    type Error: core::fmt::Debug + core::fmt::Display;

    /// Size in sectors.
    fn sectors(&self) -> u64;
    /// Reads `buf.len() / SECTOR_SIZE` sectors starting at `sector`.
    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), Self::Error>;
    /// Writes `buf.len() / SECTOR_SIZE` sectors starting at `sector`.
    fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), Self::Error>;
    /// Makes every completed write durable.
    fn flush(&mut self) -> Result<(), Self::Error>;
}

/// An in-memory disk for tests, which can also simulate torn writes.
#[cfg(test)]
pub mod mem {
    use super::{BlockDev, SECTOR_SIZE};
    use alloc::vec;
    use alloc::vec::Vec;

    #[derive(Debug)]
    pub struct MemError(pub &'static str);

    impl core::fmt::Display for MemError {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            f.write_str(self.0)
        }
    }

    pub struct MemDisk {
        pub data: Vec<u8>,
        /// When set, a write stores only its first N sectors and then fails (a crash mid-write).
        pub tear_after_sectors: Option<usize>,
        pub writes: usize,
        pub flushes: usize,
        pub reads: usize,
    }

    impl MemDisk {
        pub fn new(sectors: usize) -> Self {
            MemDisk {
                data: vec![0; sectors * SECTOR_SIZE],
                tear_after_sectors: None,
                writes: 0,
                flushes: 0,
                reads: 0,
            }
        }

        fn range(&self, sector: u64, len: usize) -> Result<core::ops::Range<usize>, MemError> {
            if !len.is_multiple_of(SECTOR_SIZE) {
                return Err(MemError("not whole sectors"));
            }
            let start = usize::try_from(sector).map_err(|_| MemError("sector"))? * SECTOR_SIZE;
            let end = start + len;
            if end > self.data.len() {
                return Err(MemError("beyond the end of the disk"));
            }
            Ok(start..end)
        }
    }

    impl BlockDev for MemDisk {
        type Error = MemError;

        fn sectors(&self) -> u64 {
            (self.data.len() / SECTOR_SIZE) as u64
        }

        fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), MemError> {
            let r = self.range(sector, buf.len())?;
            buf.copy_from_slice(&self.data[r]);
            self.reads += 1;
            Ok(())
        }

        fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), MemError> {
            let r = self.range(sector, buf.len())?;
            self.writes += 1;
            if let Some(n) = self.tear_after_sectors {
                let n = (n * SECTOR_SIZE).min(buf.len());
                self.data[r.start..r.start + n].copy_from_slice(&buf[..n]);
                return Err(MemError("torn write"));
            }
            self.data[r].copy_from_slice(buf);
            Ok(())
        }

        fn flush(&mut self) -> Result<(), MemError> {
            self.flushes += 1;
            Ok(())
        }
    }
}
