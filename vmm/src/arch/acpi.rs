//! ACPI tables (RSDP, XSDT, FADT, MADT, DSDT) built with `acpi_tables` and written below 1 MiB.
//!
//! The platform is hardware-reduced ACPI: power-off and reset go through the sleep control and reset
//! registers of [`devices::legacy::AcpiPmDevice`], which the FADT describes.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};
use devices::legacy::{AcpiPmDevice, SerialDevice};
use vm_memory::{Bytes, GuestAddress};
use zerocopy::{Immutable, IntoBytes};

use super::layout::{ACPI_TABLES_END, IOAPIC_START, LAPIC_START, RSDP_START};
use crate::memory::GuestMemory;

const OEM_ID: [u8; 6] = *b"FTVMM ";
const OEM_TABLE_ID: [u8; 8] = *b"FTVMMACP";
const OEM_REVISION: u32 = 1;

/// Errors writing the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("ACPI tables need {needed} bytes but only {available} are reserved below 1 MiB")]
    TooLarge { needed: u64, available: u64 },
    #[error("cannot write ACPI table {table} at {addr:#x}: {source}")]
    Write {
        table: &'static str,
        addr: u64,
        source: vm_memory::GuestMemoryError,
    },
    #[error("{0} vCPUs do not fit in the MADT (at most 255)")]
    TooManyVcpus(usize),
}

/// MADT Interrupt Source Override (type 2), missing from `acpi_tables`.
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct InterruptSourceOverride {
    r#type: u8,
    length: u8,
    bus: u8,
    source: u8,
    gsi: u32,
    flags: u16,
}

impl Aml for InterruptSourceOverride {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(self.as_bytes());
    }
}

/// MADT Local APIC NMI (type 4), missing from `acpi_tables`.
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct LocalApicNmi {
    r#type: u8,
    length: u8,
    processor_uid: u8,
    flags: u16,
    lint: u8,
}

impl Aml for LocalApicNmi {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(self.as_bytes());
    }
}

/// Something that describes itself in the DSDT (legacy devices now; virtio-mmio devices later).
pub trait DsdtDevice {
    /// Appends the device's AML to `sink`.
    fn append_aml(&self, sink: &mut dyn AmlSink);
}

/// COM1 as a PNP0501 device.
pub struct Com1;

impl DsdtDevice for Com1 {
    fn append_aml(&self, sink: &mut dyn AmlSink) {
        let base = SerialDevice::COM1_BASE as u16;
        aml::Device::new(
            "COM1".into(),
            vec![
                &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
                &aml::Name::new("_UID".into(), &aml::ZERO),
                &aml::Name::new(
                    "_CRS".into(),
                    &aml::ResourceTemplate::new(vec![
                        &aml::IO::new(base, base, 1, SerialDevice::LEN as u8),
                        &aml::Interrupt::new(true, true, false, false, SerialDevice::COM1_IRQ),
                    ]),
                ),
            ],
        )
        .to_aml_bytes(sink);
    }
}

/// The CMOS real-time clock as a PNP0B00 device (Linux's rtc_cmos binds to it).
pub struct Rtc;

impl DsdtDevice for Rtc {
    fn append_aml(&self, sink: &mut dyn AmlSink) {
        let base = devices::legacy::cmos::PORT_BASE as u16;
        aml::Device::new(
            "RTC_".into(),
            vec![
                &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0B00")),
                &aml::Name::new(
                    "_CRS".into(),
                    &aml::ResourceTemplate::new(vec![
                        &aml::IO::new(base, base, 1, devices::legacy::cmos::PORT_LEN as u8),
                        &aml::Interrupt::new(true, true, false, false, RTC_IRQ),
                    ]),
                ),
            ],
        )
        .to_aml_bytes(sink);
    }
}

/// The RTC's ISA interrupt (its alarm and periodic interrupts are not offered; see
/// `devices/src/legacy/cmos.rs`).
const RTC_IRQ: u32 = 8;

fn dsdt(devices: &[&dyn DsdtDevice]) -> Sdt {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let mut body = Vec::new();
    // \_S5_: the sleep type the OS writes to the sleep control register to power off.
    aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&AcpiPmDevice::S5_SLEEP_TYPE]),
    )
    .to_aml_bytes(&mut body);
    let mut sb_children = Vec::new();
    for d in devices {
        d.append_aml(&mut sb_children);
    }
    // \_SB_ scope wrapping the devices' pre-serialised AML.
    let raw = RawAml(sb_children);
    aml::Scope::new("_SB_".into(), vec![&raw]).to_aml_bytes(&mut body);
    dsdt.append_slice(&body);
    dsdt
}

/// Already-serialised AML.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let io_reg = |addr: u64| GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, addr);
    let mut b = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    b.sleep_control_reg = io_reg(AcpiPmDevice::BASE);
    b.sleep_status_reg = io_reg(AcpiPmDevice::BASE + AcpiPmDevice::SLEEP_STATUS_OFFSET);
    b.reset_reg = io_reg(AcpiPmDevice::BASE + AcpiPmDevice::RESET_OFFSET);
    b.reset_value = AcpiPmDevice::RESET_VALUE;
    // IAPC_BOOT_ARCH: no VGA (bit 2), no CMOS RTC (bit 5), and no 8042 (bit 1 clear). The i8042
    // at 0x60/0x64 is there only for its reset line (command 0xFE); it has no keyboard and does
    // not answer the controller's probe, so announcing it made Linux wait out that probe ("Can't
    // read CTR": 1.4 s of a nested boot, ~0.5 s on native KVM). Reset goes through RESET_REG.
    b.iapc_boot_arch = ((1u16 << 2) | (1 << 5)).into();
    let mut out = Vec::new();
    b.finalize().to_aml_bytes(&mut out);
    out
}

fn madt(vcpus: usize) -> Result<Vec<u8>, AcpiError> {
    let count = u8::try_from(vcpus)
        .ok()
        .filter(|c| *c < 255)
        .ok_or(AcpiError::TooManyVcpus(vcpus))?;
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_START as u32),
    );
    for id in 0..count {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_START as u32, 0));
    // ISA IRQ 0 (PIT) is wired to IOAPIC pin 2 on a PC; IRQ 9 (SCI) is level/active-high.
    madt.add_structure(InterruptSourceOverride {
        r#type: 2,
        length: 10,
        bus: 0,
        source: 0,
        gsi: 2,
        flags: 0,
    });
    madt.add_structure(LocalApicNmi {
        r#type: 4,
        length: 6,
        processor_uid: 0xff,
        flags: 0,
        lint: 1,
    });
    let mut out = Vec::new();
    madt.to_aml_bytes(&mut out);
    Ok(out)
}

fn align8(v: u64) -> u64 {
    (v + 7) & !7
}

/// Builds every table for a guest with `vcpus` vCPUs and `devices` in the DSDT, writes them from
/// [`RSDP_START`] on, and returns the RSDP's address.
pub fn write_acpi_tables(
    mem: &GuestMemory,
    vcpus: usize,
    devices: &[&dyn DsdtDevice],
) -> Result<u64, AcpiError> {
    let mut tables: Vec<(&'static str, u64, Vec<u8>)> = Vec::new();
    let mut next = align8(RSDP_START + Rsdp::len() as u64);
    let mut place = |name: &'static str, bytes: Vec<u8>, tables: &mut Vec<_>| {
        let addr = next;
        next = align8(addr + bytes.len() as u64);
        tables.push((name, addr, bytes));
        addr
    };
    let dsdt_addr = place("DSDT", dsdt(devices).as_slice().to_vec(), &mut tables);
    let fadt_addr = place("FADT", fadt(dsdt_addr), &mut tables);
    let madt_addr = place("MADT", madt(vcpus)?, &mut tables);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let mut xsdt_bytes = Vec::new();
    xsdt.to_aml_bytes(&mut xsdt_bytes);
    let xsdt_addr = place("XSDT", xsdt_bytes, &mut tables);
    let mut rsdp = Vec::new();
    Rsdp::new(OEM_ID, xsdt_addr).to_aml_bytes(&mut rsdp);
    tables.push(("RSDP", RSDP_START, rsdp));

    let end = tables
        .iter()
        .map(|(_, a, b)| a + b.len() as u64)
        .max()
        .unwrap_or(RSDP_START);
    if end > ACPI_TABLES_END {
        return Err(AcpiError::TooLarge {
            needed: end - RSDP_START,
            available: ACPI_TABLES_END - RSDP_START,
        });
    }
    for (table, addr, bytes) in &tables {
        mem.write_slice(bytes, GuestAddress(*addr))
            .map_err(|source| AcpiError::Write {
                table,
                addr: *addr,
                source,
            })?;
    }
    Ok(RSDP_START)
}

#[cfg(test)]
mod tests {
    use super::*;

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
