//! ACPI tables (RSDP, XSDT, FADT, MADT, DSDT; FACS and MCFG on q35) built with `acpi_tables`, as
//! one [`AcpiTables`] set with the links between its tables, placed in one of two ways:
//!
//! - [`fixed_layout`]: written below 1 MiB at fixed addresses, for kernels ftvmm loads itself.
//! - [`table_loader`]: handed to UEFI firmware through fw_cfg (`etc/acpi/tables`, `etc/acpi/rsdp`
//!   and the `etc/table-loader` script that tells it how to place, link and checksum them), as
//!   QEMU does; OVMF installs them for the OS.
//!
//! Two platforms ([`AcpiPlatform`]): direct-boot guests are hardware-reduced ACPI (power-off and
//! reset through the sleep control and reset registers of [`devices::legacy::AcpiPmDevice`]);
//! firmware-booted q35 guests have ICH9's fixed-hardware PM block
//! ([`devices::legacy::Ich9PmBlock`]), reset through port 0xCF9 and the ECAM window in the MCFG.

pub mod fixed_layout;
pub mod table_loader;

use acpi_tables::aml;
use acpi_tables::facs::FACS;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};
use devices::legacy::{AcpiPmDevice, Ich9PmBlock, SerialDevice};
use zerocopy::{Immutable, IntoBytes};

use super::layout::{IOAPIC_START, LAPIC_START, PCI_ECAM_START};

pub use fixed_layout::write_acpi_tables;

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

fn dsdt(platform: AcpiPlatform, devices: &[&dyn DsdtDevice]) -> Vec<u8> {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let mut body = Vec::new();
    // \_S5_: the sleep type the OS writes to the sleep control register (PM1_CNT on q35) to power
    // off.
    let s5: u8 = match platform {
        AcpiPlatform::HardwareReduced => AcpiPmDevice::S5_SLEEP_TYPE,
        AcpiPlatform::Q35 => Ich9PmBlock::S5_SLEEP_TYPE as u8,
    };
    aml::Name::new("_S5_".into(), &aml::Package::new(vec![&s5, &s5])).to_aml_bytes(&mut body);
    let mut sb_children = Vec::new();
    if platform == AcpiPlatform::Q35 {
        pci_root_bridge(&mut sb_children);
    }
    for d in devices {
        d.append_aml(&mut sb_children);
    }
    // \_SB_ scope wrapping the devices' pre-serialised AML.
    let raw = RawAml(sb_children);
    aml::Scope::new("_SB_".into(), vec![&raw]).to_aml_bytes(&mut body);
    dsdt.append_slice(&body);
    dsdt.as_slice().to_vec()
}

/// The q35 PCI root bridge `PCI0` (PCI Express, `PNP0A08`): bus 0, the configuration ports, the
/// rest of the I/O space and the 32-bit memory window where the firmware places BARs, and the
/// `_PRT` routing each device's INTx pins to IOAPIC pins 16 to 23. Windows
/// finds PCI devices only below such a bridge; Linux then takes its windows from here.
fn pci_root_bridge(sink: &mut dyn AmlSink) {
    use super::layout::{PCI_MMIO_WINDOW_END, PCI_MMIO_WINDOW_START};
    let io_config = aml::IO::new(0xcf8, 0xcf8, 1, 8);
    let io_below = aml::AddressSpace::new_io(0x0000u16, 0x0cf7u16, None);
    let io_above = aml::AddressSpace::new_io(0x0d00u16, 0xffffu16, None);
    let memory = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        PCI_MMIO_WINDOW_START as u32,
        (PCI_MMIO_WINDOW_END - 1) as u32,
        None,
    );
    let buses = aml::AddressSpace::new_bus_number(0x00u16, 0x00u16);
    // _PRT: every device's INTA..INTD to an IOAPIC pin (GSI), as pci_device_manager.rs wires them.
    let entries: Vec<(u32, u8, u32)> = (0..32u8)
        .flat_map(|device| {
            (0..4u8).map(move |pin| {
                let address = (u32::from(device) << 16) | 0xffff;
                (address, pin, super::layout::intx_gsi(device, pin))
            })
        })
        .collect();
    let routes: Vec<aml::Package> = entries
        .iter()
        .map(|(address, pin, gsi)| aml::Package::new(vec![address, pin, &aml::ZERO, gsi]))
        .collect();
    let prt = aml::Package::new(routes.iter().map(|r| r as &dyn Aml).collect());
    aml::Device::new(
        "PCI0".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A08")),
            &aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A03")),
            &aml::Name::new("_ADR".into(), &aml::ZERO),
            &aml::Name::new("_SEG".into(), &aml::ZERO),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_BBN".into(), &aml::ZERO),
            &aml::Name::new("_PRT".into(), &prt),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &buses, &io_config, &io_below, &io_above, &memory,
                ]),
            ),
        ],
    )
    .to_aml_bytes(sink);
}

/// Already-serialised AML.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

/// The FADT, with its DSDT (and FACS) pointers left zero for [`AcpiTables`] to link.
fn fadt(platform: AcpiPlatform) -> Vec<u8> {
    let io_reg = |addr: u64| GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, addr);
    // IAPC_BOOT_ARCH: no VGA (bit 2), and no 8042 (bit 1 clear). The i8042 at 0x60/0x64 is there
    // only for its reset line (command 0xFE); it has no keyboard and does not answer the
    // controller's probe, so announcing it made Linux wait out that probe ("Can't read CTR": 1.4 s
    // of a nested boot, ~0.5 s on native KVM). The CMOS RTC is there (bit 5 clear).
    let boot_arch = 1u16 << 2;
    let mut b = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    match platform {
        AcpiPlatform::HardwareReduced => {
            b = b.flag(Flags::HwReducedAcpi);
            b.sleep_control_reg = io_reg(AcpiPmDevice::BASE);
            b.sleep_status_reg = io_reg(AcpiPmDevice::BASE + AcpiPmDevice::SLEEP_STATUS_OFFSET);
            b.reset_reg = io_reg(AcpiPmDevice::BASE + AcpiPmDevice::RESET_OFFSET);
            b.reset_value = AcpiPmDevice::RESET_VALUE;
        }
        AcpiPlatform::Q35 => {
            // Fixed hardware: ICH9's PM1 event and control blocks and its timer. No SMI command
            // port: the platform is always in ACPI mode (SCI_EN reads 1).
            b = b.flag(Flags::Wbinvd).flag(Flags::ProcC1);
            let pm = |offset: u64| (Ich9PmBlock::BASE + offset) as u32;
            b.sci_int = u16::from(SCI_IRQ).into();
            b.pm1a_evt_blk = pm(Ich9PmBlock::PM1_STATUS_OFFSET).into();
            b.pm1_evt_len = 4;
            b.pm1a_cnt_blk = pm(Ich9PmBlock::PM1_CONTROL_OFFSET).into();
            b.pm1_cnt_len = 2;
            b.pm_tmr_blk = pm(Ich9PmBlock::TIMER_OFFSET).into();
            b.pm_tmr_len = 4;
            b.reset_reg = io_reg(Q35_RESET_CONTROL_PORT);
            b.reset_value = Q35_RESET_VALUE;
            b.century = devices::legacy::cmos::CENTURY_INDEX;
        }
    }
    b.iapc_boot_arch = boot_arch.into();
    let mut out = Vec::new();
    b.finalize().to_aml_bytes(&mut out);
    out
}

/// The SCI's interrupt line on q35 (ISA IRQ 9, level-triggered).
const SCI_IRQ: u8 = 9;
/// q35's reset control register and the value that resets (RST_CPU | SYS_RST).
const Q35_RESET_CONTROL_PORT: u64 = 0xcf9;
const Q35_RESET_VALUE: u8 = 0x06;

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

/// Which ACPI platform the tables describe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcpiPlatform {
    /// Hardware-reduced ACPI: direct-boot guests.
    HardwareReduced,
    /// q35 with ICH9's fixed-hardware PM block and an ECAM window: firmware-booted guests.
    Q35,
}

/// One table of a set: its name (for errors), bytes, and how its checksums are computed.
#[derive(Clone, Debug)]
pub struct AcpiTable {
    pub name: &'static str,
    pub bytes: Vec<u8>,
}

impl AcpiTable {
    fn is_rsdp(&self) -> bool {
        self.name == "RSDP"
    }

    /// The checksums of the table: (checksum byte offset, start, length). An SDT has one over
    /// its whole length; the RSDP one over its first 20 bytes and an extended one over all 36.
    pub fn checksums(&self) -> Vec<(usize, usize, usize)> {
        if self.is_rsdp() {
            vec![(8, 0, 20), (32, 0, self.bytes.len())]
        } else {
            vec![(9, 0, self.bytes.len())]
        }
    }

    /// Recomputes the table's checksums after its bytes changed.
    pub fn update_checksums(&mut self) {
        for (at, start, len) in self.checksums() {
            self.bytes[at] = 0;
            let sum = self.bytes[start..start + len]
                .iter()
                .fold(0u8, |a, b| a.wrapping_add(*b));
            self.bytes[at] = sum.wrapping_neg();
        }
    }
}

/// A pointer field in one table that must hold another table's address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcpiLink {
    /// The table holding the pointer, by index in the set.
    pub table: usize,
    /// The pointer's offset in it.
    pub offset: usize,
    /// The pointer's width in bytes (4 or 8).
    pub size: u8,
    /// The table pointed to, by index.
    pub target: usize,
}

/// Every table of a guest, with the links between them; the RSDP is the last table. Pointer
/// fields hold zero until a placement fills them in.
#[derive(Clone, Debug)]
pub struct AcpiTables {
    pub tables: Vec<AcpiTable>,
    pub links: Vec<AcpiLink>,
}

impl AcpiTables {
    /// The tables of a `platform` guest with `vcpus` vCPUs and `devices` in its DSDT.
    pub fn build(
        platform: AcpiPlatform,
        vcpus: usize,
        devices: &[&dyn DsdtDevice],
    ) -> Result<Self, AcpiError> {
        let mut set = Self {
            tables: Vec::new(),
            links: Vec::new(),
        };
        let dsdt = set.add("DSDT", dsdt(platform, devices));
        let fadt = set.add("FADT", fadt(platform));
        set.link(fadt, FADT_X_DSDT_OFFSET, 8, dsdt);
        let mut xsdt_entries = vec![fadt, set.add("MADT", madt(vcpus)?)];
        if platform == AcpiPlatform::Q35 {
            let facs = set.add("FACS", FACS::new().as_bytes().to_vec());
            set.link(fadt, FADT_X_FIRMWARE_CTRL_OFFSET, 8, facs);
            xsdt_entries.push(set.add("MCFG", mcfg()));
        }
        let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
        for _ in &xsdt_entries {
            xsdt.add_entry(0u64);
        }
        let mut xsdt_bytes = Vec::new();
        xsdt.to_aml_bytes(&mut xsdt_bytes);
        let xsdt = set.add("XSDT", xsdt_bytes);
        for (i, entry) in xsdt_entries.into_iter().enumerate() {
            set.link(xsdt, SDT_HEADER_LEN + 8 * i, 8, entry);
        }
        let mut rsdp = Vec::new();
        Rsdp::new(OEM_ID, 0).to_aml_bytes(&mut rsdp);
        let rsdp = set.add("RSDP", rsdp);
        set.link(rsdp, RSDP_XSDT_OFFSET, 8, xsdt);
        Ok(set)
    }

    fn add(&mut self, name: &'static str, bytes: Vec<u8>) -> usize {
        self.tables.push(AcpiTable { name, bytes });
        self.tables.len() - 1
    }

    fn link(&mut self, table: usize, offset: usize, size: u8, target: usize) {
        self.links.push(AcpiLink {
            table,
            offset,
            size,
            target,
        });
    }

    /// The index of the RSDP.
    pub fn rsdp(&self) -> usize {
        self.tables.len() - 1
    }
}

/// Length of an SDT header (where the XSDT's entries start).
const SDT_HEADER_LEN: usize = 36;
/// Offsets of the FADT's 64-bit FACS and DSDT pointers.
const FADT_X_FIRMWARE_CTRL_OFFSET: usize = 132;
const FADT_X_DSDT_OFFSET: usize = 140;
/// Offset of the RSDP's XSDT pointer.
const RSDP_XSDT_OFFSET: usize = 24;

/// The MCFG: the ECAM window of PCI segment 0, buses 0 to 255.
fn mcfg() -> Vec<u8> {
    let mut mcfg = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    mcfg.add_ecam(PCI_ECAM_START, 0, 0, 255);
    let mut out = Vec::new();
    mcfg.to_aml_bytes(&mut out);
    out
}
