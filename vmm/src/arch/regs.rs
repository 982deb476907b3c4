//! Boot-time CPU state: GDT, identity page tables, segment and control registers, general
//! registers, FPU, MSRs and the local APIC's LINT pins.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use super::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDPT_START, PD_START, PML4_START,
};
use crate::memory::GuestMemory;

/// Errors setting up boot CPU state.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("cannot write boot {what} to guest memory at {addr:#x}: {source}")]
    WriteMemory {
        what: &'static str,
        addr: u64,
        source: vm_memory::GuestMemoryError,
    },
    #[error("KVM rejected the boot {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("KVM set only {set} of {total} boot MSRs")]
    PartialMsrs { set: usize, total: usize },
    #[error("cannot build the boot MSR list: {0}")]
    MsrList(String),
}

/// How the vCPU enters the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMode {
    /// Linux 64-bit boot protocol: long mode, paging on, `rsi` = boot_params.
    Long64 { entry: u64, boot_params: u64 },
    /// PVH: 32-bit protected mode, paging off, `ebx` = hvm_start_info.
    Pvh32 { entry: u64, start_info: u64 },
}

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// A GDT entry from flags, base and limit (the usual packing).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
}

/// The KVM segment described by a GDT entry at `index`.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let limit_raw = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base: (((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000)),
        limit: if g == 1 {
            (limit_raw << 12) | 0xfff
        } else {
            limit_raw
        },
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(((entry >> 47) & 1) == 0),
        padding: 0,
    }
}

fn write<T: vm_memory::ByteValued>(
    mem: &GuestMemory,
    what: &'static str,
    val: T,
    addr: u64,
) -> Result<(), RegsError> {
    mem.write_obj(val, GuestAddress(addr))
        .map_err(|source| RegsError::WriteMemory { what, addr, source })
}

/// Writes the identity map of the first 1 GiB (2 MiB pages) used by the 64-bit entry.
pub fn write_boot_page_tables(mem: &GuestMemory) -> Result<(), RegsError> {
    write(mem, "PML4", PDPT_START | 0x03, PML4_START)?;
    write(mem, "PDPT", PD_START | 0x03, PDPT_START)?;
    for i in 0..512u64 {
        // Present | RW | PS (2 MiB).
        write(mem, "PD", (i << 21) | 0x83, PD_START + i * 8)?;
    }
    Ok(())
}

/// Sets segment, control and paging registers for `mode`, writing the GDT/IDT to guest memory.
pub fn setup_sregs(mem: &GuestMemory, vcpu: &VcpuFd, mode: EntryMode) -> Result<(), RegsError> {
    let long = matches!(mode, EntryMode::Long64 { .. });
    let code = if long {
        gdt_entry(0xa09b, 0, 0xfffff) // 64-bit code, DPL 0
    } else {
        gdt_entry(0xc09b, 0, 0xfffff) // 32-bit flat code
    };
    let gdt = [
        gdt_entry(0, 0, 0),
        code,
        gdt_entry(0xc093, 0, 0xfffff), // data
        gdt_entry(0x808b, 0, 0xfffff), // TSS
    ];
    for (i, e) in gdt.iter().enumerate() {
        write(mem, "GDT", *e, BOOT_GDT_START + i as u64 * 8)?;
    }
    write(mem, "IDT", 0u64, BOOT_IDT_START)?;

    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(|source| RegsError::Kvm {
        what: "sregs",
        source,
    })?;
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    let code_seg = segment_from_gdt(gdt[1], 1);
    let data_seg = segment_from_gdt(gdt[2], 2);
    sregs.cs = code_seg;
    sregs.ds = data_seg;
    sregs.es = data_seg;
    sregs.fs = data_seg;
    sregs.gs = data_seg;
    sregs.ss = data_seg;
    sregs.tr = segment_from_gdt(gdt[3], 3);
    if long {
        write_boot_page_tables(mem)?;
        sregs.cr3 = PML4_START;
        sregs.cr4 = X86_CR4_PAE;
        sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
        sregs.efer = EFER_LME | EFER_LMA;
    } else {
        sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
        sregs.cr4 = 0;
        sregs.efer = 0;
    }
    vcpu.set_sregs(&sregs).map_err(|source| RegsError::Kvm {
        what: "sregs",
        source,
    })
}

/// Sets the general registers for `mode`.
pub fn setup_regs(vcpu: &VcpuFd, mode: EntryMode) -> Result<(), RegsError> {
    let regs = match mode {
        EntryMode::Long64 { entry, boot_params } => kvm_regs {
            rflags: 0x2,
            rip: entry,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: boot_params,
            ..Default::default()
        },
        EntryMode::Pvh32 { entry, start_info } => kvm_regs {
            rflags: 0x2,
            rip: entry,
            rbx: start_info,
            ..Default::default()
        },
    };
    vcpu.set_regs(&regs).map_err(|source| RegsError::Kvm {
        what: "regs",
        source,
    })
}

/// Sets the x87/SSE control words to their reset values.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(|source| RegsError::Kvm {
        what: "FPU state",
        source,
    })
}

mod msr_index {
    pub const IA32_SYSENTER_CS: u32 = 0x174;
    pub const IA32_SYSENTER_ESP: u32 = 0x175;
    pub const IA32_SYSENTER_EIP: u32 = 0x176;
    pub const IA32_TSC: u32 = 0x10;
    pub const IA32_MISC_ENABLE: u32 = 0x1a0;
    pub const IA32_MTRR_DEF_TYPE: u32 = 0x2ff;
    pub const STAR: u32 = 0xc000_0081;
    pub const LSTAR: u32 = 0xc000_0082;
    pub const CSTAR: u32 = 0xc000_0083;
    pub const SYSCALL_MASK: u32 = 0xc000_0084;
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
}

/// The MSR values every vCPU starts with.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    use msr_index::*;
    let e = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        e(IA32_SYSENTER_CS, 0),
        e(IA32_SYSENTER_ESP, 0),
        e(IA32_SYSENTER_EIP, 0),
        e(STAR, 0),
        e(CSTAR, 0),
        e(KERNEL_GS_BASE, 0),
        e(SYSCALL_MASK, 0),
        e(LSTAR, 0),
        e(IA32_TSC, 0),
        e(IA32_MISC_ENABLE, 1),               // fast strings
        e(IA32_MTRR_DEF_TYPE, (1 << 11) | 6), // MTRRs on, default write-back
    ]
}

/// Writes [`boot_msrs`] to the vCPU.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let entries = boot_msrs();
    let msrs = Msrs::from_entries(&entries).map_err(|e| RegsError::MsrList(format!("{e:?}")))?;
    let set = vcpu.set_msrs(&msrs).map_err(|source| RegsError::Kvm {
        what: "MSRs",
        source,
    })?;
    if set != entries.len() {
        return Err(RegsError::PartialMsrs {
            set,
            total: entries.len(),
        });
    }
    Ok(())
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn set_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Configures LINT0 as ExtINT (the PIC) and LINT1 as NMI, as firmware does.
pub fn setup_lint(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut lapic = vcpu.get_lapic().map_err(|source| RegsError::Kvm {
        what: "LAPIC",
        source,
    })?;
    for (off, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[off + i] as u8);
        let val = set_delivery_mode(u32::from_le_bytes(bytes), mode);
        for (i, b) in val.to_le_bytes().iter().enumerate() {
            lapic.regs[off + i] = *b as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(|source| RegsError::Kvm {
        what: "LAPIC",
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_round_trip_into_segments() {
        let code = gdt_entry(0xa09b, 0, 0xfffff);
        assert_eq!(code, 0x00af_9b00_0000_ffff);
        let seg = segment_from_gdt(code, 1);
        assert_eq!(seg.selector, 8);
        assert_eq!(seg.l, 1);
        assert_eq!(seg.present, 1);
        assert_eq!(seg.type_, 0xb);
        assert_eq!(seg.limit, 0xffff_ffff);
        let data = segment_from_gdt(gdt_entry(0xc093, 0, 0xfffff), 2);
        assert_eq!((data.db, data.l, data.type_), (1, 0, 3));
        assert_eq!(segment_from_gdt(0, 0).unusable, 1);
    }

    #[test]
    fn delivery_mode_only_touches_its_bits() {
        assert_eq!(set_delivery_mode(0x0001_00ff, APIC_MODE_NMI), 0x0001_04ff);
        assert_eq!(set_delivery_mode(0x700, APIC_MODE_EXTINT), 0x700);
    }

    #[test]
    fn boot_page_tables_identity_map_one_gib() {
        let mem = crate::memory::create_guest_memory(16).unwrap();
        write_boot_page_tables(&mem).unwrap();
        let pde: u64 = mem.read_obj(GuestAddress(PD_START + 511 * 8)).unwrap();
        assert_eq!(pde, (511 << 21) | 0x83);
        let pml4e: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4e & !0xfff, PDPT_START);
    }
}
