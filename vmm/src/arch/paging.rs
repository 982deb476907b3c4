//! Guest page-table walks, for reading guest code at a virtual address (crash reports, and the
//! instruction-emulation fallback).

use kvm_bindings::kvm_sregs;
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemory;

const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_LA57: u64 = 1 << 12;
const EFER_LMA: u64 = 1 << 10;
const PRESENT: u64 = 1;
const PAGE_SIZE_BIT: u64 = 1 << 7;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Translates a linear address to a guest physical one with the vCPU's current paging mode.
/// Returns `None` for unmapped addresses and for paging modes it does not walk (32-bit non-PAE).
pub fn translate(mem: &GuestMemory, sregs: &kvm_sregs, linear: u64) -> Option<u64> {
    if sregs.cr0 & CR0_PG == 0 {
        return Some(linear & 0xffff_ffff);
    }
    if sregs.efer & EFER_LMA == 0 {
        if sregs.cr4 & CR4_PAE == 0 {
            return None;
        }
        // 32-bit PAE: 4-entry PDPT, then PD and PT.
        let pdpte: u64 = mem
            .read_obj(GuestAddress(
                (sregs.cr3 & 0xffff_ffe0) + ((linear >> 30) & 3) * 8,
            ))
            .ok()?;
        return walk(mem, pdpte, linear, &[21, 12]);
    }
    let levels: &[u32] = if sregs.cr4 & CR4_LA57 != 0 {
        &[48, 39, 30, 21, 12]
    } else {
        &[39, 30, 21, 12]
    };
    walk(mem, (sregs.cr3 & ADDR_MASK) | PRESENT, linear, levels)
}

/// Walks from the table `entry` points at through `shifts` (one per level).
fn walk(mem: &GuestMemory, mut entry: u64, linear: u64, shifts: &[u32]) -> Option<u64> {
    for (level, &shift) in shifts.iter().enumerate() {
        if entry & PRESENT == 0 {
            return None;
        }
        let index = (linear >> shift) & 0x1ff;
        entry = mem
            .read_obj(GuestAddress((entry & ADDR_MASK) + index * 8))
            .ok()?;
        if entry & PRESENT == 0 {
            return None;
        }
        let is_leaf = shift == 12 || (entry & PAGE_SIZE_BIT != 0 && level > 0);
        if is_leaf {
            let page_mask = (1u64 << shift) - 1;
            return Some((entry & ADDR_MASK & !page_mask) | (linear & page_mask));
        }
    }
    None
}

/// Reads up to `buf.len()` bytes at a linear address, page by page; returns how many were read.
pub fn read_linear(mem: &GuestMemory, sregs: &kvm_sregs, linear: u64, buf: &mut [u8]) -> usize {
    let mut done = 0;
    while done < buf.len() {
        let addr = linear.wrapping_add(done as u64);
        let Some(phys) = translate(mem, sregs, addr) else {
            break;
        };
        let in_page = (4096 - (addr & 0xfff)) as usize;
        let n = in_page.min(buf.len() - done);
        if mem
            .read_slice(&mut buf[done..done + n], GuestAddress(phys))
            .is_err()
        {
            break;
        }
        done += n;
    }
    done
}

/// Writes `data` at a linear address, page by page; returns how many bytes were written.
pub fn write_linear(mem: &GuestMemory, sregs: &kvm_sregs, linear: u64, data: &[u8]) -> usize {
    let mut done = 0;
    while done < data.len() {
        let addr = linear.wrapping_add(done as u64);
        let Some(phys) = translate(mem, sregs, addr) else {
            break;
        };
        let in_page = (4096 - (addr & 0xfff)) as usize;
        let n = in_page.min(data.len() - done);
        if mem
            .write_slice(&data[done..done + n], GuestAddress(phys))
            .is_err()
        {
            break;
        }
        done += n;
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_the_boot_identity_map_and_4k_pages() {
        let mem = crate::memory::create_guest_memory(16).unwrap();
        crate::arch::regs::write_boot_page_tables(&mem).unwrap();
        let sregs = kvm_sregs {
            cr0: CR0_PG | 1,
            cr4: CR4_PAE,
            efer: EFER_LMA | (1 << 8),
            cr3: crate::arch::layout::PML4_START,
            ..Default::default()
        };
        assert_eq!(translate(&mem, &sregs, 0x12_3456), Some(0x12_3456));
        assert_eq!(translate(&mem, &sregs, 1 << 30), None);
        // Point PD entry 1 (2-4 MiB) at a 4 KiB page table mapping virtual 2 MiB to physical 0x30_0000.
        let pt = 0x40_0000u64;
        mem.write_obj(pt | 3, GuestAddress(crate::arch::layout::PD_START + 8))
            .unwrap();
        mem.write_obj(0x30_0000u64 | 3, GuestAddress(pt)).unwrap();
        assert_eq!(translate(&mem, &sregs, 0x20_0010), Some(0x30_0010));
        mem.write_slice(b"\x0f\x0b", GuestAddress(0x30_0010))
            .unwrap();
        let mut buf = [0u8; 2];
        assert_eq!(read_linear(&mem, &sregs, 0x20_0010, &mut buf), 2);
        assert_eq!(&buf, b"\x0f\x0b");
    }

    #[test]
    fn paging_off_is_identity() {
        let mem = crate::memory::create_guest_memory(16).unwrap();
        assert_eq!(translate(&mem, &kvm_sregs::default(), 0x1234), Some(0x1234));
    }
}
