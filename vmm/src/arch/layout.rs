//! The x86_64 guest physical memory map, and the q35 PCI interrupt routing. `docs/boot-abi.md`
//! documents the same map for guest authors.

/// Boot GDT.
pub const BOOT_GDT_START: u64 = 0x500;
/// Boot IDT (empty).
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`, followed by its memory map.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH memory map entries (after the start info).
pub const PVH_MEMMAP_START: u64 = 0x6040;
/// Linux `boot_params` ("zero page").
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the 64-bit entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Boot page tables: PML4, PDPT, PD (identity map of the first 1 GiB with 2 MiB pages).
pub const PML4_START: u64 = 0x9000;
pub const PDPT_START: u64 = 0xa000;
pub const PD_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line accepted, NUL included.
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Start of the EBDA / BIOS area that is not RAM in the e820 map.
pub const EBDA_START: u64 = 0x9fc00;
/// Where the ACPI RSDP and the tables after it live.
pub const RSDP_START: u64 = 0xe0000;
/// End of the area reserved for ACPI tables.
pub const ACPI_TABLES_END: u64 = 0x100000;
/// Start of high memory: kernels load here.
pub const HIMEM_START: u64 = 0x100000;
/// The MMIO hole below 4 GiB: no RAM from here to 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xd000_0000;
/// First address after 4 GiB.
pub const FOUR_GIB: u64 = 0x1_0000_0000;
/// Window for virtio-mmio devices inside the MMIO hole.
pub const VIRTIO_MMIO_START: u64 = MMIO_HOLE_START;
/// The IOAPIC's MMIO base.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// The local APIC's MMIO base.
pub const LAPIC_START: u64 = 0xfee0_0000;
/// KVM's TSS (VMX only, three pages) and identity-map page sit just below 0xff00_0000, inside the
/// hole and below the largest firmware ROM (which ends at 4 GiB), where QEMU puts them.
pub const KVM_TSS_ADDRESS: u64 = 0xfeff_d000;
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfeff_c000;
/// The q35 platform's PCI Express configuration (ECAM) window, for firmware-booted guests.
pub const PCI_ECAM_START: u64 = devices::pci::Q35_ECAM_BASE;
/// Where OVMF puts 32-bit PCI memory BARs on q35: from the end of the ECAM window to 0xfc00_0000.
pub const PCI_MMIO_WINDOW_START: u64 = PCI_ECAM_START + (256 << 20);
pub const PCI_MMIO_WINDOW_END: u64 = 0xfc00_0000;

/// The first IOAPIC pin for PCI INTx lines on q35: pins 16 to 23.
pub const INTX_FIRST_GSI: u32 = 16;
/// IOAPIC pins for INTx lines.
pub const INTX_GSIS: u32 = 8;

/// The GSI that pin `pin` (0 = INTA) of PCI device `device` is wired to on q35, the usual swizzle
/// over IOAPIC pins 16 to 23: the DSDT's `_PRT` says so, and the VMM raises that line.
pub fn intx_gsi(device: u8, pin: u8) -> u32 {
    INTX_FIRST_GSI + (u32::from(device) + u32::from(pin)) % INTX_GSIS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intx_lines_swizzle_over_ioapic_pins_16_to_23() {
        assert_eq!(intx_gsi(2, 0), 18);
        assert_eq!(intx_gsi(6, 0), 22);
        assert_eq!(intx_gsi(7, 1), 16);
        assert_eq!(intx_gsi(0x1f, 3), 18);
    }
}
