//! The VMM's ACPI tables, read with the `acpi` crate (an independent parser, so its checksum and
//! layout checks test the VMM's tables): RSDP from boot_params (else the BIOS area search), the
//! table list, and the MADT's local APICs and IOAPICs. Physical memory is identity-mapped, so
//! "mapping" is just a cast.

use crate::bootparams;
use acpi::madt::{Madt, MadtEntry};
use acpi::sdt::Signature;
use acpi::{AcpiError, AcpiHandler, AcpiTables, PhysicalMapping};
use alloc::vec::Vec;
use core::ptr::NonNull;

/// Maps physical memory 1:1 (our page tables identity-map 0..4 GiB).
#[derive(Clone, Copy, Debug)]
pub struct IdentityHandler;

impl AcpiHandler for IdentityHandler {
    unsafe fn map_physical_region<T>(
        &self,
        physical_address: usize,
        size: usize,
    ) -> PhysicalMapping<Self, T> {
        let virt = NonNull::new(core::ptr::with_exposed_provenance_mut::<T>(
            physical_address,
        ))
        .expect("ACPI structure at physical address 0");
        // SAFETY: identity mapping; the caller (acpi) vouches for the address and size.
        unsafe { PhysicalMapping::new(physical_address, virt, size, size, *self) }
    }

    fn unmap_physical_region<T>(_region: &PhysicalMapping<Self, T>) {}
}

/// The ACPI tables, from `boot_params.acpi_rsdp_addr` or, if that is 0, the BIOS-area search.
pub fn load() -> Result<(AcpiTables<IdentityHandler>, u64), AcpiError> {
    let rsdp = bootparams::rsdp_addr();
    if rsdp != 0 {
        // SAFETY: the VMM says an RSDP is there; the crate validates signature and checksums.
        let tables = unsafe { AcpiTables::from_rsdp(IdentityHandler, rsdp as usize)? };
        Ok((tables, rsdp))
    } else {
        // SAFETY: the EBDA and 0xe0000..0x100000 are identity-mapped RAM/ROM in this VM.
        let tables = unsafe { AcpiTables::search_for_rsdp_bios(IdentityHandler)? };
        Ok((tables, 0))
    }
}

/// Signatures of the valid tables listed in the RSDT/XSDT (the crate skips, and logs nothing
/// for, entries whose header or checksum is bad).
pub fn signatures(tables: &AcpiTables<IdentityHandler>) -> Vec<Signature> {
    tables.headers().map(|h| h.signature).collect()
}

/// A processor-local APIC entry (type 0, or type 9 for x2APIC).
#[derive(Clone, Copy, Debug)]
pub struct LapicEntry {
    pub acpi_id: u32,
    pub apic_id: u32,
    pub enabled: bool,
    pub online_capable: bool,
    pub x2apic: bool,
}

/// An IOAPIC entry.
#[derive(Clone, Copy, Debug)]
pub struct IoapicEntry {
    pub id: u8,
    pub addr: u32,
    pub gsi_base: u32,
}

/// What the MADT says.
#[derive(Debug)]
pub struct MadtInfo {
    pub lapic_addr: u64,
    pub pcat_compat: bool,
    pub lapics: Vec<LapicEntry>,
    pub ioapics: Vec<IoapicEntry>,
}

impl MadtInfo {
    /// Entries of processors that are enabled now.
    pub fn enabled(&self) -> impl Iterator<Item = &LapicEntry> {
        self.lapics.iter().filter(|l| l.enabled)
    }
}

pub fn read_madt(tables: &AcpiTables<IdentityHandler>) -> Result<MadtInfo, AcpiError> {
    let madt = tables.find_table::<Madt>()?;
    let madt = madt.get();
    let mut info = MadtInfo {
        lapic_addr: u64::from(madt.local_apic_address),
        pcat_compat: madt.supports_8259(),
        lapics: Vec::new(),
        ioapics: Vec::new(),
    };
    for entry in madt.entries() {
        match entry {
            MadtEntry::LocalApic(e) => {
                let flags = e.flags;
                info.lapics.push(LapicEntry {
                    acpi_id: u32::from(e.processor_id),
                    apic_id: u32::from(e.apic_id),
                    enabled: flags & 1 != 0,
                    online_capable: flags & 2 != 0,
                    x2apic: false,
                });
            }
            MadtEntry::LocalX2Apic(e) => {
                let flags = e.flags;
                info.lapics.push(LapicEntry {
                    acpi_id: e.processor_uid,
                    apic_id: e.x2apic_id,
                    enabled: flags & 1 != 0,
                    online_capable: flags & 2 != 0,
                    x2apic: true,
                });
            }
            MadtEntry::IoApic(e) => info.ioapics.push(IoapicEntry {
                id: e.io_apic_id,
                addr: e.io_apic_address,
                gsi_base: e.global_system_interrupt_base,
            }),
            MadtEntry::LocalApicAddressOverride(e) => info.lapic_addr = e.local_apic_address,
            _ => {}
        }
    }
    Ok(info)
}
