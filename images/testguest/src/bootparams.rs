//! Read-only view of the Linux `boot_params` ("zero page") that the VMM passes in rsi: command
//! line pointer and size, ACPI RSDP address, e820 map (offsets per docs/boot-abi.md).

use crate::arch::entry::tg_boot_params;

const OFF_ACPI_RSDP_ADDR: usize = 0x070;
const OFF_E820_ENTRIES: usize = 0x1e8;
const OFF_CMD_LINE_PTR: usize = 0x228;
const OFF_CMDLINE_SIZE: usize = 0x238;
const OFF_E820_TABLE: usize = 0x2d0;
const E820_MAX: usize = 128;
/// Longest command line read (boot-abi.md: at most 4096 bytes with the NUL).
const CMDLINE_MAX: usize = 4096;

/// Address of boot_params as passed by the VMM (0 if none).
pub fn addr() -> usize {
    // SAFETY: written once by `_start` before ring 3 runs.
    unsafe { core::ptr::read_volatile(core::ptr::addr_of!(tg_boot_params)) as usize }
}

fn read<T: Copy>(off: usize) -> Option<T> {
    let base = addr();
    if base == 0 {
        return None;
    }
    // SAFETY: boot_params is a 4 KiB page of identity-mapped RAM; fields may be unaligned.
    Some(unsafe { core::ptr::read_unaligned(core::ptr::with_exposed_provenance::<T>(base + off)) })
}

/// The command line bytes (without the NUL); empty if there is none.
pub fn cmdline() -> &'static [u8] {
    let ptr = read::<u32>(OFF_CMD_LINE_PTR).unwrap_or(0) as usize;
    if ptr == 0 {
        return &[];
    }
    let size = read::<u32>(OFF_CMDLINE_SIZE).unwrap_or(0) as usize;
    let max = if size == 0 {
        CMDLINE_MAX
    } else {
        size.min(CMDLINE_MAX)
    };
    // SAFETY: the VMM placed a NUL-terminated command line at `ptr` in identity-mapped RAM;
    // reading stops at the NUL or after `max` bytes. It is never written afterwards.
    unsafe {
        let p = core::ptr::with_exposed_provenance::<u8>(ptr);
        let mut len = 0;
        while len < max && p.add(len).read_volatile() != 0 {
            len += 1;
        }
        core::slice::from_raw_parts(p, len)
    }
}

/// `acpi_rsdp_addr` (0 if unset).
pub fn rsdp_addr() -> u64 {
    read::<u64>(OFF_ACPI_RSDP_ADDR).unwrap_or(0)
}

/// One e820 entry.
#[derive(Clone, Copy, Debug)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The e820 map.
pub fn e820() -> impl Iterator<Item = E820Entry> {
    let n = usize::from(read::<u8>(OFF_E820_ENTRIES).unwrap_or(0)).min(E820_MAX);
    (0..n).filter_map(|i| {
        let off = OFF_E820_TABLE + i * 20;
        Some(E820Entry {
            addr: read(off)?,
            size: read(off + 8)?,
            kind: read(off + 16)?,
        })
    })
}
