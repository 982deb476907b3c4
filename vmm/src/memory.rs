//! Guest RAM: sizing, the regions around the MMIO hole, and the VMM-side dirty bitmap.
//!
//! Guest memory is a `GuestMemoryMmap` with an `AtomicBitmap` per region: every write the VMM (or a
//! device model) makes through vm-memory marks the page dirty, so checkpoints see pages that devices,
//! not only vCPUs, dirtied.
//!
//! Each region is mapped at a 2 MiB-aligned address of the VMM and advised for transparent huge
//! pages (`MADV_HUGEPAGE`): KVM backs a guest page with a 2 MiB mapping only when the guest-physical
//! and host-virtual addresses agree modulo 2 MiB and the host page is huge. An unaligned mapping
//! costs a 4 KiB fault per page touched (measured in the nested tier, docs/benchmarks.md: ~29,400
//! faults for one Linux boot against ~400 aligned). The mappings live as long as the process: a VM
//! process maps its RAM once.

use std::io;

use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};

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
    Map { mib: u64, source: io::Error },
    #[error("cannot set up the guest memory region at {base:#x}: {reason}")]
    Region { base: u64, reason: String },
}

/// The alignment of guest RAM in the VMM's address space: one x86 large page.
pub const RAM_ALIGN: usize = 2 << 20;

/// Maps `size` bytes of anonymous, private, not-reserved memory at a `RAM_ALIGN`-aligned address
/// and advises it for transparent huge pages. The mapping is never unmapped (see the module doc).
fn map_aligned(size: usize) -> io::Result<*mut u8> {
    let len = size
        .checked_add(RAM_ALIGN)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
    // SAFETY: a new anonymous mapping at an address the kernel chooses; nothing else is touched.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let base = base as usize;
    let start = base.next_multiple_of(RAM_ALIGN);
    let (head, tail) = (start - base, base + len - (start + size));
    // SAFETY: both ranges lie inside the mapping made above and outside [start, start + size),
    // and nothing refers to them.
    unsafe {
        if head > 0 {
            libc::munmap(base as *mut libc::c_void, head);
        }
        if tail > 0 {
            libc::munmap((start + size) as *mut libc::c_void, tail);
        }
    }
    // SAFETY: advice on the range mapped above. It fails harmlessly (EINVAL) where transparent
    // huge pages are compiled out; the memory then stays in 4 KiB pages.
    let _ = unsafe { libc::madvise(start as *mut libc::c_void, size, libc::MADV_HUGEPAGE) };
    Ok(start as *mut u8)
}

/// The RAM ranges of a guest of `size` bytes: below the MMIO hole, and the rest above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    ram_ranges_split(size, MMIO_HOLE_START)
}

/// The RAM ranges of a guest of `size` bytes whose RAM below 4 GiB ends at `low_ram_end` at the
/// latest: that much from 0, and the rest above 4 GiB.
pub fn ram_ranges_split(size: u64, low_ram_end: u64) -> Vec<(GuestAddress, usize)> {
    if size <= low_ram_end {
        vec![(GuestAddress(0), size as usize)]
    } else {
        vec![
            (GuestAddress(0), low_ram_end as usize),
            (GuestAddress(FOUR_GIB), (size - low_ram_end) as usize),
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

/// Maps `mib` MiB of anonymous guest memory (not reserved up front, 2 MiB-aligned, advised for
/// huge pages) with dirty bitmaps.
pub fn create_guest_memory(mib: u64) -> Result<GuestMemory, MemoryError> {
    create_guest_memory_split(mib, MMIO_HOLE_START)
}

/// [`create_guest_memory`] with RAM below 4 GiB ending at `low_ram_end` at the latest
/// ([`ram_ranges_split`]).
pub fn create_guest_memory_split(mib: u64, low_ram_end: u64) -> Result<GuestMemory, MemoryError> {
    validate_size(mib)?;
    let mut regions = Vec::new();
    for (base, size) in ram_ranges_split(mib << 20, low_ram_end) {
        let ptr = map_aligned(size).map_err(|source| MemoryError::Map { mib, source })?;
        let region_error = |reason: String| MemoryError::Region {
            base: base.0,
            reason,
        };
        // SAFETY: `ptr` and `size` are exactly the mapping map_aligned made, which stays mapped
        // for the life of the process.
        let mapping = unsafe {
            MmapRegionBuilder::new_with_bitmap(size, AtomicBitmap::with_len(size))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
                .with_raw_mmap_pointer(ptr)
        }
        .build()
        .map_err(|e| region_error(e.to_string()))?;
        let region = GuestRegionMmap::new(mapping, base)
            .ok_or_else(|| region_error("the region overflows the address space".into()))?;
        regions.push(region);
    }
    GuestMemory::from_regions(regions).map_err(|e| MemoryError::Region {
        base: 0,
        reason: e.to_string(),
    })
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
        let split = ram_ranges_split(3 << 30, 2 << 30);
        assert_eq!(
            split,
            vec![
                (GuestAddress(0), 2 << 30),
                (GuestAddress(FOUR_GIB), 1 << 30)
            ]
        );
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
    fn regions_are_mapped_at_huge_page_aligned_addresses() {
        let mem = create_guest_memory(18).unwrap();
        for region in mem.iter() {
            assert_eq!(region.as_ptr() as usize % RAM_ALIGN, 0);
        }
        // The whole range is usable.
        mem.write_obj(0x5au8, GuestAddress((18 << 20) - 1)).unwrap();
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress((18 << 20) - 1)).unwrap(),
            0x5a
        );
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
