//! Placing an [`AcpiTables`] set at fixed guest addresses below 1 MiB, where a kernel ftvmm loads
//! itself finds the RSDP (its address is also handed over in `boot_params` or PVH start info).

use vm_memory::{Bytes, GuestAddress};

use super::{AcpiError, AcpiPlatform, AcpiTables, DsdtDevice};
use crate::arch::layout::{ACPI_TABLES_END, RSDP_START};
use crate::memory::GuestMemory;

fn align8(v: u64) -> u64 {
    (v + 7) & !7
}

/// Builds the hardware-reduced tables for a guest with `vcpus` vCPUs and `devices` in the DSDT,
/// writes them from [`RSDP_START`] on (the RSDP first), and returns the RSDP's address.
pub fn write_acpi_tables(
    mem: &GuestMemory,
    vcpus: usize,
    devices: &[&dyn DsdtDevice],
) -> Result<u64, AcpiError> {
    let mut set = AcpiTables::build(AcpiPlatform::HardwareReduced, vcpus, devices)?;
    let rsdp = set.rsdp();
    let mut addresses = vec![0u64; set.tables.len()];
    addresses[rsdp] = RSDP_START;
    let mut next = align8(RSDP_START + set.tables[rsdp].bytes.len() as u64);
    for (index, table) in set.tables.iter().enumerate() {
        if index != rsdp {
            addresses[index] = next;
            next = align8(next + table.bytes.len() as u64);
        }
    }
    if next > ACPI_TABLES_END {
        return Err(AcpiError::TooLarge {
            needed: next - RSDP_START,
            available: ACPI_TABLES_END - RSDP_START,
        });
    }
    for link in &set.links {
        let value = addresses[link.target].to_le_bytes();
        let field = &mut set.tables[link.table].bytes[link.offset..];
        field[..usize::from(link.size)].copy_from_slice(&value[..usize::from(link.size)]);
    }
    for (table, addr) in set.tables.iter_mut().zip(&addresses) {
        table.update_checksums();
        mem.write_slice(&table.bytes, GuestAddress(*addr))
            .map_err(|source| AcpiError::Write {
                table: table.name,
                addr: *addr,
                source,
            })?;
    }
    Ok(RSDP_START)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::acpi::Com1;

    fn checksum_ok(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    fn table_at(mem: &GuestMemory, addr: u64) -> Vec<u8> {
        let len: u32 = mem.read_obj(GuestAddress(addr + 4)).unwrap();
        let mut v = vec![0u8; len as usize];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    #[test]
    fn tables_are_linked_and_checksummed() {
        let mem = crate::memory::create_guest_memory(16).unwrap();
        let rsdp_addr = write_acpi_tables(&mem, 8, &[&Com1]).unwrap();
        let mut rsdp = [0u8; 36];
        mem.read_slice(&mut rsdp, GuestAddress(rsdp_addr)).unwrap();
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert!(checksum_ok(&rsdp[..20]) && checksum_ok(&rsdp));
        let xsdt_addr = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
        let xsdt = table_at(&mem, xsdt_addr);
        assert_eq!(&xsdt[..4], b"XSDT");
        assert!(checksum_ok(&xsdt));
        let entries: Vec<u64> = xsdt[36..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let sigs: Vec<Vec<u8>> = entries
            .iter()
            .map(|a| table_at(&mem, *a)[..4].to_vec())
            .collect();
        assert_eq!(sigs, vec![b"FACP".to_vec(), b"APIC".to_vec()]);
        for a in &entries {
            assert!(checksum_ok(&table_at(&mem, *a)));
        }
        let madt = table_at(&mem, entries[1]);
        // Count Processor Local APIC structures.
        let mut off = 44;
        let mut lapics = 0;
        while off < madt.len() {
            if madt[off] == 0 {
                lapics += 1;
            }
            off += madt[off + 1] as usize;
        }
        assert_eq!(lapics, 8);
        let fadt = table_at(&mem, entries[0]);
        let dsdt_addr = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        let dsdt = table_at(&mem, dsdt_addr);
        assert_eq!(&dsdt[..4], b"DSDT");
        assert!(checksum_ok(&dsdt));
        assert!(dsdt.windows(4).any(|w| w == b"_S5_"));
    }

    #[test]
    fn too_many_vcpus_is_an_error() {
        let mem = crate::memory::create_guest_memory(16).unwrap();
        assert!(matches!(
            write_acpi_tables(&mem, 300, &[]),
            Err(AcpiError::TooManyVcpus(300))
        ));
    }
}
