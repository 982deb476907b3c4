//! x86_64 platform support: memory map, boot protocols, CPUID, boot CPU state and ACPI tables.

pub mod acpi;
pub mod boot;
pub mod cpu_template;
pub mod cpuid;
pub mod emulate;
pub mod firmware;
pub mod hyperv;
pub mod layout;
pub mod paging;
pub mod regs;
