//! Static page tables: identity map of 0..4 GiB with 2 MiB pages, User|RW|Present at every
//! level (everything runs in ring 3), PCD|PWT (uncached) on 3..4 GiB (MMIO window, IOAPIC, LAPIC).
//! Built entirely by the assembler and linker, so ring 0 only has to load CR3. Accessed/Dirty
//! bits are preset so the MMU never writes these pages. No 1 GiB pages (they triple-fault on the
//! test host). CR3 < 4 GiB, so the AP trampoline can load it from 32-bit code.

/// Present | RW | User | Accessed.
pub const TABLE_FLAGS: u64 = 0x27;
/// Present | RW | User | PS (2 MiB) | Accessed | Dirty.
pub const PAGE_FLAGS: u64 = 0xe7;
/// PAGE_FLAGS | PWT | PCD: uncached.
pub const PAGE_FLAGS_UC: u64 = PAGE_FLAGS | 0x18;

core::arch::global_asm!(
    r#"
    .pushsection .data.pagetables, "aw"
    .balign 4096
    .global tg_pml4
tg_pml4:
    .quad tg_pdpt + {table}
    .fill 511, 8, 0

    .balign 4096
tg_pdpt:
    .quad tg_pd + 0x0000 + {table}
    .quad tg_pd + 0x1000 + {table}
    .quad tg_pd + 0x2000 + {table}
    .quad tg_pd + 0x3000 + {table}
    .fill 508, 8, 0

    .balign 4096
tg_pd:
    .set tg_pd_i, 0
    .rept 1536
    .quad (tg_pd_i << 21) + {page}
    .set tg_pd_i, tg_pd_i + 1
    .endr
    .rept 512
    .quad (tg_pd_i << 21) + {page_uc}
    .set tg_pd_i, tg_pd_i + 1
    .endr
    .popsection
    "#,
    table = const TABLE_FLAGS,
    page = const PAGE_FLAGS,
    page_uc = const PAGE_FLAGS_UC,
);

unsafe extern "C" {
    /// The PML4 (4 KiB aligned, below 4 GiB).
    pub static tg_pml4: [u64; 512];
}

/// Physical (= virtual) address of the PML4, as loaded into CR3.
pub fn pml4_addr() -> u64 {
    core::ptr::addr_of!(tg_pml4) as u64
}
