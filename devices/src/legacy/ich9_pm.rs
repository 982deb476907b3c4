//! The ICH9 chipset's ACPI power-management I/O block, as firmware-booted (q35) guests see it at
//! PMBASE (`0x600`, where OVMF puts it):
//!
//! | offset | register | here |
//! |---|---|---|
//! | 0 | PM1_STS (16 bits) | write 1 to clear; nothing ever sets a bit (no power button yet) |
//! | 2 | PM1_EN (16 bits) | held |
//! | 4 | PM1_CNT (16 bits) | SCI_EN (bit 0) always reads 1: the platform is always in ACPI mode. `SLP_EN` (bit 13) with `SLP_TYP` (bits 12:10) 0, the q35 S5 type, powers off |
//! | 8 | PM_TMR (32 bits) | 3.579545 MHz, 24 bits: OVMF times its delays with it |
//!
//! The hardware-reduced registers of direct-boot guests are [`super::AcpiPmDevice`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::bus::BusDevice;
use crate::guest_exit::{GuestExitEvent, GuestExitRequest};

/// The registers and the timer's value, for snapshots.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ich9PmState {
    pub status: u16,
    pub enable: u16,
    pub control: u16,
    pub timer: u32,
}

/// The ICH9 PM1 event and control registers and the PM timer.
pub struct Ich9PmBlock {
    exit: Arc<GuestExitEvent>,
    timer_start: Instant,
    status: u16,
    enable: u16,
    control: u16,
}

impl Ich9PmBlock {
    /// The I/O port OVMF programs into ICH9's PMBASE.
    pub const BASE: u64 = 0x600;
    /// Ports from [`Self::BASE`] (PM1 status, enable, control and the timer).
    pub const LEN: u64 = 12;
    /// Offset of PM1_STS; PM1_EN follows at 2.
    pub const PM1_STATUS_OFFSET: u64 = 0;
    /// Offset of PM1_EN.
    pub const PM1_ENABLE_OFFSET: u64 = 2;
    /// Offset of PM1_CNT.
    pub const PM1_CONTROL_OFFSET: u64 = 4;
    /// Offset of PM_TMR.
    pub const TIMER_OFFSET: u64 = 8;
    /// The timer's frequency in Hz.
    pub const TIMER_HZ: u128 = 3_579_545;
    /// The sleep type of S5 (soft off) on q35, as its DSDT's `_S5_` object says.
    pub const S5_SLEEP_TYPE: u16 = 0;
    const TIMER_MASK: u32 = 0x00ff_ffff;
    const SCI_EN: u16 = 1;
    const SLP_EN: u16 = 1 << 13;

    /// The block, sending power-off requests to `exit`; the timer starts at zero now.
    pub fn new(exit: Arc<GuestExitEvent>) -> Self {
        Self {
            exit,
            timer_start: Instant::now(),
            status: 0,
            enable: 0,
            control: Self::SCI_EN,
        }
    }

    /// The timer's value: ticks since the block was made, in 24 bits.
    fn timer(&self) -> u32 {
        let ticks = self.timer_start.elapsed().as_nanos() * Self::TIMER_HZ / 1_000_000_000;
        (ticks as u32) & Self::TIMER_MASK
    }

    /// The registers and the timer.
    pub fn state(&self) -> Ich9PmState {
        Ich9PmState {
            status: self.status,
            enable: self.enable,
            control: self.control,
            timer: self.timer(),
        }
    }

    /// Loads saved registers; the timer counts on from its saved value.
    pub fn restore_state(&mut self, state: &Ich9PmState) {
        self.status = state.status;
        self.enable = state.enable;
        self.control = state.control | Self::SCI_EN;
        let elapsed = u128::from(state.timer) * 1_000_000_000 / Self::TIMER_HZ;
        let now = Instant::now();
        self.timer_start = now
            .checked_sub(Duration::from_nanos(elapsed as u64))
            .unwrap_or(now);
    }

    /// The registers as one little-endian image of the block.
    fn image(&self) -> [u8; Self::LEN as usize] {
        let mut image = [0u8; Self::LEN as usize];
        image[0..2].copy_from_slice(&self.status.to_le_bytes());
        image[2..4].copy_from_slice(&self.enable.to_le_bytes());
        image[4..6].copy_from_slice(&self.control.to_le_bytes());
        image[8..12].copy_from_slice(&self.timer().to_le_bytes());
        image
    }

    fn write_control(&mut self, value: u16) {
        self.control = (value & !Self::SLP_EN) | Self::SCI_EN;
        if value & Self::SLP_EN == 0 {
            return;
        }
        let sleep_type = (value >> 10) & 0x7;
        if sleep_type == Self::S5_SLEEP_TYPE {
            self.exit.request(GuestExitRequest::PowerOff);
        } else {
            crate::guest_warn!("guest asked for unsupported sleep type {sleep_type}; ignored");
        }
    }
}

impl BusDevice for Ich9PmBlock {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let image = self.image();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = offset
                .checked_add(i as u64)
                .and_then(|at| image.get(at as usize))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // Registers are written whole (16 bits) or by byte; rebuild the 16-bit value the write
        // leaves in the register it lands in.
        let register = offset & !1;
        let merge = |old: u16| -> u16 {
            let mut bytes = old.to_le_bytes();
            for (i, &value) in data.iter().enumerate() {
                if let Some(slot) = bytes.get_mut((offset - register) as usize + i) {
                    *slot = value;
                }
            }
            u16::from_le_bytes(bytes)
        };
        match register {
            Self::PM1_STATUS_OFFSET => {
                let clear = merge(0);
                self.status &= !clear;
            }
            Self::PM1_ENABLE_OFFSET => self.enable = merge(self.enable),
            Self::PM1_CONTROL_OFFSET => {
                let value = merge(self.control);
                self.write_control(value);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block() -> (Ich9PmBlock, Arc<GuestExitEvent>) {
        let exit = Arc::new(GuestExitEvent::new().unwrap());
        (Ich9PmBlock::new(exit.clone()), exit)
    }

    fn read(block: &mut Ich9PmBlock, offset: u64, len: usize) -> u32 {
        let mut data = [0u8; 4];
        block.read(offset, &mut data[..len]);
        u32::from_le_bytes(data)
    }

    #[test]
    fn the_timer_counts_up_in_24_bits() {
        let (mut block, _) = block();
        let first = read(&mut block, Ich9PmBlock::TIMER_OFFSET, 4);
        std::thread::sleep(std::time::Duration::from_millis(2));
        let second = read(&mut block, Ich9PmBlock::TIMER_OFFSET, 4);
        assert!(second > first, "{first} then {second}");
        assert!(second <= 0x00ff_ffff);
        assert_eq!(read(&mut block, Ich9PmBlock::TIMER_OFFSET + 3, 1), 0);
    }

    #[test]
    fn slp_en_with_the_s5_type_powers_off_as_ovmf_does_it() {
        let (mut block, exit) = block();
        // OVMF: clear SLP_TYP, then set SLP_EN.
        block.write(Ich9PmBlock::PM1_CONTROL_OFFSET, &0u16.to_le_bytes());
        assert_eq!(exit.requested(), None);
        assert_eq!(
            read(&mut block, Ich9PmBlock::PM1_CONTROL_OFFSET, 2),
            1,
            "SCI_EN"
        );
        block.write(Ich9PmBlock::PM1_CONTROL_OFFSET, &(1u16 << 13).to_le_bytes());
        assert_eq!(exit.requested(), Some(GuestExitRequest::PowerOff));
    }

    #[test]
    fn other_sleep_types_and_byte_writes_without_slp_en_do_not_power_off() {
        let (mut block, exit) = block();
        block.write(
            Ich9PmBlock::PM1_CONTROL_OFFSET,
            &((1u16 << 13) | (1 << 10)).to_le_bytes(),
        );
        block.write(Ich9PmBlock::PM1_CONTROL_OFFSET + 1, &[0x00]);
        block.write(Ich9PmBlock::PM1_CONTROL_OFFSET, &[0x01]);
        assert_eq!(exit.requested(), None);
    }

    #[test]
    fn state_round_trips_and_the_timer_counts_on_from_its_saved_value() {
        let (mut block, _) = block();
        block.write(Ich9PmBlock::PM1_ENABLE_OFFSET, &0x0100u16.to_le_bytes());
        let mut state = block.state();
        state.timer = 0x00f0_0000;
        let (mut fresh, _) = self::block();
        fresh.restore_state(&state);
        let restored = fresh.state();
        assert_eq!(restored.enable, 0x0100);
        assert!(restored.timer >= 0x00f0_0000, "{:#x}", restored.timer);
    }

    #[test]
    fn status_bits_clear_on_writing_one_and_enable_is_held() {
        let (mut block, _) = block();
        block.status = 0x0100;
        block.write(Ich9PmBlock::PM1_STATUS_OFFSET, &0x0001u16.to_le_bytes());
        assert_eq!(read(&mut block, Ich9PmBlock::PM1_STATUS_OFFSET, 2), 0x0100);
        block.write(Ich9PmBlock::PM1_STATUS_OFFSET + 1, &[0x01]);
        assert_eq!(read(&mut block, Ich9PmBlock::PM1_STATUS_OFFSET, 2), 0);
        block.write(Ich9PmBlock::PM1_ENABLE_OFFSET, &0x0120u16.to_le_bytes());
        assert_eq!(read(&mut block, Ich9PmBlock::PM1_ENABLE_OFFSET, 2), 0x0120);
    }
}
