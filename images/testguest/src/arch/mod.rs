//! x86_64 specifics: ring-0 entry and descriptor tables (asm), page tables, CPU helpers,
//! the local APIC, TSC timing and AP bring-up.

pub mod apic;
pub mod cpu;
pub mod entry;
pub mod gdt;
pub mod idt;
pub mod paging;
pub mod smp;
pub mod time;
