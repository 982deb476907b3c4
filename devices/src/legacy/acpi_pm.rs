//! ACPI hardware-reduced sleep control, sleep status and reset registers (described by the FADT).
//!
//! Writing `SLP_EN | SLP_TYP=5` to the sleep control register powers the machine off; writing
//! [`AcpiPmDevice::RESET_VALUE`] to the reset register resets it.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::guest_exit::{GuestExitEvent, GuestExitRequest};

/// The three registers, at `BASE` (sleep control), `BASE + 1` (sleep status) and `BASE + 4` (reset).
pub struct AcpiPmDevice {
    exit: Arc<GuestExitEvent>,
}

impl AcpiPmDevice {
    /// I/O port of the sleep control register.
    pub const BASE: u64 = 0x600;
    /// Length of the port range.
    pub const LEN: u64 = 8;
    /// Offset of the sleep status register.
    pub const SLEEP_STATUS_OFFSET: u64 = 1;
    /// Offset of the reset register.
    pub const RESET_OFFSET: u64 = 4;
    /// The value the FADT says to write to the reset register.
    pub const RESET_VALUE: u8 = 1;
    /// The sleep type of S5 (soft off), as the DSDT's `_S5_` object says.
    pub const S5_SLEEP_TYPE: u8 = 5;
    const SLP_EN: u8 = 1 << 5;

    /// The registers, sending requests to `exit`.
    pub fn new(exit: Arc<GuestExitEvent>) -> Self {
        Self { exit }
    }
}

impl BusDevice for AcpiPmDevice {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Sleep status: never "woken"; the other registers read as zero.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            0 if value & Self::SLP_EN != 0 => {
                let sleep_type = (value >> 2) & 0x7;
                if sleep_type == Self::S5_SLEEP_TYPE {
                    self.exit.request(GuestExitRequest::PowerOff);
                } else {
                    crate::guest_warn!(
                        "guest asked for unsupported sleep type {sleep_type}; ignored"
                    );
                }
            }
            Self::RESET_OFFSET if value == Self::RESET_VALUE => {
                self.exit.request(GuestExitRequest::Reset)
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> (AcpiPmDevice, Arc<GuestExitEvent>) {
        let exit = Arc::new(GuestExitEvent::new().unwrap());
        (AcpiPmDevice::new(exit.clone()), exit)
    }

    #[test]
    fn s5_powers_off() {
        let (mut dev, exit) = device();
        dev.write(0, &[0x34]);
        assert_eq!(exit.requested(), Some(GuestExitRequest::PowerOff));
    }

    #[test]
    fn other_sleep_states_and_writes_without_slp_en_are_ignored() {
        let (mut dev, exit) = device();
        dev.write(0, &[5 << 2]);
        dev.write(0, &[(3 << 2) | 0x20]);
        dev.write(AcpiPmDevice::RESET_OFFSET, &[0x7]);
        assert_eq!(exit.requested(), None);
    }

    #[test]
    fn reset_register_resets() {
        let (mut dev, exit) = device();
        dev.write(AcpiPmDevice::RESET_OFFSET, &[AcpiPmDevice::RESET_VALUE]);
        assert_eq!(exit.requested(), Some(GuestExitRequest::Reset));
    }
}
