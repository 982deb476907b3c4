//! The two chipset functions of QEMU's q35 platform that UEFI firmware (OVMF) programs: the MCH
//! host bridge at 00:00.0 and the ICH9 LPC bridge at 00:1f.0.
//!
//! OVMF tells q35 from i440fx by the host bridge's device ID, then writes the registers below and
//! reads them back. They hold what the firmware writes (with the hardware's read-only bits); the
//! VMM places the windows they describe at fixed addresses that match what OVMF programs
//! ([`Q35_ECAM_BASE`] for the MCH's PCIEXBAR, the ACPI PM block at ICH9's PMBASE `0x600`), and
//! [`PciHostBridge::ecam_window`] / [`Ich9Lpc::pm_base`] tell it what the firmware asked for.
//!
//! Host bridge (MCH) registers: PCIEXBAR (`0x60`, 64 bits: base, length, enable) and PAM0–6
//! (`0x90..0x97`, the BIOS shadow attributes; RAM is always RAM here, so they are storage).
//!
//! LPC bridge (ICH9) registers: PMBASE (`0x40`), ACPI_CNTL (`0x44`, ACPI_EN and the SCI line),
//! PIRQA–H routing (`0x60..0x64`, `0x68..0x6c`) and RCBA (`0xf0`). The LPC's class (ISA bridge) is
//! what makes OVMF's SIO bus driver create COM1 and the PS/2 keyboard: OVMF's console is COM1.

use super::configuration::PciConfiguration;
use super::{PciAddress, PciClassCode, PciDevice, PciIdentity};

/// Where the platform puts the ECAM window OVMF programs into PCIEXBAR (its
/// `PcdPciExpressBaseAddress`): 256 buses, 256 MiB.
pub const Q35_ECAM_BASE: u64 = 0xb000_0000;

/// Intel.
const INTEL: u16 = 0x8086;
/// QEMU's subsystem vendor (Red Hat / Qumranet) and subsystem ID, as on QEMU's q35.
const QEMU_SUBSYSTEM_VENDOR_ID: u16 = 0x1af4;
const QEMU_SUBSYSTEM_ID: u16 = 0x1100;

/// The q35 host bridge (Intel 82G33/P35 MCH, `8086:29c0`), as QEMU presents it.
pub struct PciHostBridge {
    configuration: PciConfiguration,
}

impl PciHostBridge {
    /// Intel.
    pub const VENDOR_ID: u16 = INTEL;
    /// The q35 MCH's device ID.
    pub const DEVICE_ID: u16 = 0x29c0;
    /// PCIEXBAR: the ECAM window's base (bits 35:26), length (2:1) and enable (0).
    pub const PCIEXBAR: usize = 0x60;
    /// PAM0, the first of the seven BIOS shadow attribute registers.
    pub const PAM0: usize = 0x90;
    const PAM_COUNT: usize = 7;

    /// The host bridge with its identity and chipset registers, no BARs or capabilities.
    pub fn q35() -> Self {
        let identity = PciIdentity {
            vendor_id: Self::VENDOR_ID,
            device_id: Self::DEVICE_ID,
            revision: 0,
            class_code: PciClassCode {
                class: 0x06,
                subclass: 0x00,
                prog_if: 0x00,
            },
            subsystem_vendor_id: QEMU_SUBSYSTEM_VENDOR_ID,
            subsystem_id: QEMU_SUBSYSTEM_ID,
        };
        let mut configuration = PciConfiguration::new(&identity);
        let pciexbar_mask = 0x0000_000f_fc00_0007u64.to_le_bytes();
        let registers: [(usize, &[u8], &[u8]); 2] = [
            (Self::PCIEXBAR, &[0; 8], &pciexbar_mask),
            (
                Self::PAM0,
                &[0; Self::PAM_COUNT],
                &[0x30, 0x33, 0x33, 0x33, 0x33, 0x33, 0x33],
            ),
        ];
        for (reg, value, mask) in registers {
            configuration
                .set_device_register(reg, value, mask)
                .expect("the MCH registers are inside the device-specific space");
        }
        Self { configuration }
    }

    /// The ECAM window PCIEXBAR enables: its base and length in bytes; `None` while disabled or
    /// with the reserved length encoding.
    pub fn ecam_window(&self) -> Option<(u64, u64)> {
        let mut bytes = [0u8; 8];
        self.configuration.read(Self::PCIEXBAR, &mut bytes);
        let value = u64::from_le_bytes(bytes);
        if value & 1 == 0 {
            return None;
        }
        let buses: u64 = match (value >> 1) & 0x3 {
            0 => 256,
            1 => 128,
            2 => 64,
            _ => return None,
        };
        let length = buses << 20;
        Some((value & 0xf_f000_0000 & !(length - 1), length))
    }
}

impl PciDevice for PciHostBridge {
    fn configuration(&self) -> &PciConfiguration {
        &self.configuration
    }

    fn configuration_mut(&mut self) -> &mut PciConfiguration {
        &mut self.configuration
    }
}

/// The ICH9 LPC (ISA) bridge at 00:1f.0 (`8086:2918`).
pub struct Ich9Lpc {
    configuration: PciConfiguration,
}

impl Ich9Lpc {
    /// Where the LPC bridge sits, as on QEMU's q35 (OVMF looks there).
    pub const ADDRESS: PciAddress = PciAddress {
        bus: 0,
        device: 0x1f,
        function: 0,
    };
    /// The LPC bridge's device ID.
    pub const DEVICE_ID: u16 = 0x2918;
    /// PMBASE: the ACPI power-management I/O block's base (bits 15:7; bit 0 reads 1, "I/O").
    pub const PMBASE: usize = 0x40;
    /// ACPI_CNTL: ACPI_EN (bit 7) and the SCI's interrupt line (bits 2:0).
    pub const ACPI_CNTL: usize = 0x44;
    /// ACPI_EN in [`Self::ACPI_CNTL`].
    pub const ACPI_EN: u8 = 0x80;
    /// PIRQA–D routing; PIRQE–H follow at `0x68`.
    pub const PIRQA_ROUT: usize = 0x60;
    const PIRQE_ROUT: usize = 0x68;
    /// RCBA: the root complex register block's base (bits 31:14) and enable (bit 0).
    pub const RCBA: usize = 0xf0;

    /// The LPC bridge with its reset register values.
    pub fn new() -> Self {
        let identity = PciIdentity {
            vendor_id: INTEL,
            device_id: Self::DEVICE_ID,
            revision: 2,
            class_code: PciClassCode {
                class: 0x06,
                subclass: 0x01,
                prog_if: 0x00,
            },
            subsystem_vendor_id: QEMU_SUBSYSTEM_VENDOR_ID,
            subsystem_id: QEMU_SUBSYSTEM_ID,
        };
        let mut configuration = PciConfiguration::new(&identity);
        // Each PIRQ routing register starts disabled (bit 7) and takes a line number in 3:0.
        let routing = [0x80u8; 4];
        let routing_mask = [0x8fu8; 4];
        let registers: [(usize, &[u8], &[u8]); 5] = [
            (Self::PMBASE, &[1, 0, 0, 0], &[0x80, 0xff, 0, 0]),
            (Self::ACPI_CNTL, &[0], &[0x87]),
            (Self::PIRQA_ROUT, &routing, &routing_mask),
            (Self::PIRQE_ROUT, &routing, &routing_mask),
            (Self::RCBA, &[0; 4], &[0x01, 0xc0, 0xff, 0xff]),
        ];
        for (reg, value, mask) in registers {
            configuration
                .set_device_register(reg, value, mask)
                .expect("the LPC registers are inside the device-specific space");
        }
        Self { configuration }
    }

    /// The I/O base of the ACPI PM block, once the firmware enabled it (ACPI_EN).
    pub fn pm_base(&self) -> Option<u16> {
        let mut control = [0u8; 1];
        self.configuration.read(Self::ACPI_CNTL, &mut control);
        if control[0] & Self::ACPI_EN == 0 {
            return None;
        }
        let mut base = [0u8; 2];
        self.configuration.read(Self::PMBASE, &mut base);
        Some(u16::from_le_bytes(base) & !1)
    }
}

impl Default for Ich9Lpc {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for Ich9Lpc {
    fn configuration(&self) -> &PciConfiguration {
        &self.configuration
    }

    fn configuration_mut(&mut self) -> &mut PciConfiguration {
        &mut self.configuration
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read32(device: &dyn PciDevice, reg: usize) -> u32 {
        let mut data = [0u8; 4];
        device.configuration().read(reg, &mut data);
        u32::from_le_bytes(data)
    }

    #[test]
    fn pciexbar_enables_the_ecam_window_ovmf_programs() {
        let mut mch = PciHostBridge::q35();
        assert_eq!(mch.ecam_window(), None);
        // As OVMF does: the upper half, then base | 256 buses | enable.
        mch.config_write(PciHostBridge::PCIEXBAR + 4, &0u32.to_le_bytes());
        mch.config_write(
            PciHostBridge::PCIEXBAR,
            &(Q35_ECAM_BASE as u32 | 1).to_le_bytes(),
        );
        assert_eq!(mch.ecam_window(), Some((Q35_ECAM_BASE, 256 << 20)));
        // Reserved length encoding.
        mch.config_write(PciHostBridge::PCIEXBAR, &[0x07]);
        assert_eq!(mch.ecam_window(), None);
    }

    #[test]
    fn pam_registers_keep_their_writable_bits() {
        let mut mch = PciHostBridge::q35();
        mch.config_write(PciHostBridge::PAM0, &[0xff, 0xff]);
        let mut data = [0u8; 2];
        mch.config_read(PciHostBridge::PAM0, &mut data);
        assert_eq!(data, [0x30, 0x33]);
    }

    #[test]
    fn pmbase_and_acpi_enable_as_ovmf_sets_them() {
        let mut lpc = Ich9Lpc::new();
        assert_eq!(
            read32(&lpc, Ich9Lpc::PMBASE),
            1,
            "the I/O space bit reads 1"
        );
        assert_eq!(lpc.pm_base(), None);
        lpc.config_write(Ich9Lpc::PMBASE, &0x0600u32.to_le_bytes());
        lpc.config_write(Ich9Lpc::ACPI_CNTL, &[Ich9Lpc::ACPI_EN]);
        assert_eq!(read32(&lpc, Ich9Lpc::PMBASE), 0x601);
        assert_eq!(lpc.pm_base(), Some(0x600));
        // Bits below 128-byte alignment do not stick.
        lpc.config_write(Ich9Lpc::PMBASE, &0x0645u32.to_le_bytes());
        assert_eq!(lpc.pm_base(), Some(0x600));
    }

    #[test]
    fn the_lpc_is_an_isa_bridge_with_disabled_pirq_routes() {
        let lpc = Ich9Lpc::new();
        assert_eq!(read32(&lpc, 0x08) >> 8, 0x06_01_00);
        assert_eq!(read32(&lpc, Ich9Lpc::PIRQA_ROUT), 0x8080_8080);
        let mut lpc = lpc;
        lpc.config_write(Ich9Lpc::PIRQA_ROUT, &[0x0a, 0x0b, 0xff, 0x7f]);
        assert_eq!(read32(&lpc, Ich9Lpc::PIRQA_ROUT), 0x0f8f_0b0a);
        lpc.config_write(Ich9Lpc::RCBA, &0xfed1_c001u32.to_le_bytes());
        assert_eq!(read32(&lpc, Ich9Lpc::RCBA), 0xfed1_c001);
    }
}
