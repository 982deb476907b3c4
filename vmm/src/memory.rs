//! Guest RAM: sizing, the regions around the MMIO hole, and the VMM-side dirty bitmap.
//!
//! Guest memory is a `GuestMemoryMmap` with an `AtomicBitmap` per region: every write the VMM (or a
//! device model) makes through vm-memory marks the page dirty, so checkpoints see pages that devices,
//! not only vCPUs, dirtied.

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::arch::layout::{FOUR_GIB, MMIO_HOLE_START};

/// Guest memory with a dirty bitmap per region.
pub type GuestMemory = GuestMemoryMmap<AtomicBitmap>;

/// The page size dirty tracking works in.
pub const PAGE_SIZE: usize = 4096;

/// The smallest guest accepted, in MiB.
pub const MIN_MEMORY_MIB: u64 = 16;

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory of {mib} MiB is too small: at least {MIN_MEMORY_MIB} MiB is needed")]
    TooSmall { mib: u64 },
    #[error("guest memory of {mib} MiB exceeds this host's {host_mib} MiB of RAM")]
    LargerThanHost { mib: u64, host_mib: u64 },
    #[error("cannot map {mib} MiB of guest memory: {source}")]
    Map {
        mib: u64,
        source: vm_memory::mmap::FromRangesError,
    },
}

/// The RAM ranges of a guest of `size` bytes: below the MMIO hole, and the rest above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    if size <= MMIO_HOLE_START {
        vec![(GuestAddress(0), size as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_HOLE_START as usize),
            (GuestAddress(FOUR_GIB), (size - MMIO_HOLE_START) as usize),
        ]
    }
}

/// Total RAM of this host in MiB, from /proc/meminfo.
pub fn host_memory_mib() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// Checks a requested size against the minimum and the host's RAM.
pub fn validate_size(mib: u64) -> Result<(), MemoryError> {
    if mib < MIN_MEMORY_MIB {
        return Err(MemoryError::TooSmall { mib });
    }
    if let Some(host_mib) = host_memory_mib() {
        if mib > host_mib {
            return Err(MemoryError::LargerThanHost { mib, host_mib });
        }
    }
    Ok(())
}

/// Maps `mib` MiB of anonymous guest memory (not reserved up front) with dirty bitmaps.
pub fn create_guest_memory(mib: u64) -> Result<GuestMemory, MemoryError> {
    validate_size(mib)?;
    GuestMemory::from_ranges(&ram_ranges(mib << 20))
        .map_err(|source| MemoryError::Map { mib, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn small_guest_is_one_region() {
        assert_eq!(ram_ranges(64 << 20), vec![(GuestAddress(0), 64 << 20)]);
    }

    #[test]
    fn large_guest_skips_the_mmio_hole() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0], (GuestAddress(0), MMIO_HOLE_START as usize));
        assert_eq!(r[1].0, GuestAddress(FOUR_GIB));
        assert_eq!(r[0].1 + r[1].1, 4 << 30);
    }

    #[test]
    fn sizes_are_validated() {
        assert!(matches!(
            validate_size(1),
            Err(MemoryError::TooSmall { mib: 1 })
        ));
        assert!(matches!(
            validate_size(1 << 40),
            Err(MemoryError::LargerThanHost { .. })
        ));
    }

    #[test]
    fn vmm_writes_mark_pages_dirty() {
        let mem = create_guest_memory(16).unwrap();
        mem.write_obj(0xabu8, GuestAddress(5 * PAGE_SIZE as u64 + 7))
            .unwrap();
        let region = mem.find_region(GuestAddress(0)).unwrap();
        let bitmap = region.bitmap();
        use vm_memory::bitmap::Bitmap;
        assert!(bitmap.dirty_at(5 * PAGE_SIZE));
        assert!(!bitmap.dirty_at(6 * PAGE_SIZE));
    }
}
