//! The i8042 PS/2 controller at ports 0x60 (data) and 0x64 (status/command), with a keyboard that
//! has no keys.
//!
//! Its reset line (command 0xFE) is vm-superio's [`I8042Device`]. Around it, the controller answers
//! what firmware asks of a PS/2 controller and keyboard before giving up on them: its self-test
//! (0xAA → 0x55), interface tests, the command byte (0x20/0x60), the output port, enabling and
//! disabling either port, and the keyboard's reset (0xFF → ACK, 0xAA), identify (0xF2), LEDs, scan
//! code set, typematic rate, scanning on and off and echo. Without answers, OVMF's keyboard driver
//! waits out a timeout per question. Nothing ever types, so it raises no interrupt; the ACPI tables
//! announce no 8042, so Linux does not probe it.

use std::collections::VecDeque;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_superio::{I8042Device, Trigger};

use crate::bus::BusDevice;
use crate::guest_exit::{GuestExitEvent, GuestExitRequest};

/// Turns the i8042's CPU reset pulse into a guest reset request.
pub struct ResetLine(Arc<GuestExitEvent>);

impl Trigger for ResetLine {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request(GuestExitRequest::Reset);
        Ok(())
    }
}

/// Status register bits.
mod status {
    /// Output buffer full: the data port has a byte.
    pub const OUTPUT_FULL: u8 = 1 << 0;
    /// System flag: the self-test passed.
    pub const SYSTEM: u8 = 1 << 2;
    /// The last write went to the command port.
    pub const COMMAND: u8 = 1 << 3;
    /// Keyboard not inhibited.
    pub const UNLOCKED: u8 = 1 << 4;
}

/// Controller commands (port 0x64).
mod command {
    pub const READ_COMMAND_BYTE: u8 = 0x20;
    pub const WRITE_COMMAND_BYTE: u8 = 0x60;
    pub const DISABLE_AUX: u8 = 0xa7;
    pub const ENABLE_AUX: u8 = 0xa8;
    pub const TEST_AUX: u8 = 0xa9;
    pub const SELF_TEST: u8 = 0xaa;
    pub const TEST_KEYBOARD: u8 = 0xab;
    pub const DISABLE_KEYBOARD: u8 = 0xad;
    pub const ENABLE_KEYBOARD: u8 = 0xae;
    pub const READ_INPUT_PORT: u8 = 0xc0;
    pub const READ_OUTPUT_PORT: u8 = 0xd0;
    pub const WRITE_OUTPUT_PORT: u8 = 0xd1;
    pub const WRITE_AUX: u8 = 0xd4;
}

/// Keyboard commands (port 0x60) and replies.
mod keyboard {
    pub const SET_LEDS: u8 = 0xed;
    pub const ECHO: u8 = 0xee;
    pub const SCAN_CODE_SET: u8 = 0xf0;
    pub const IDENTIFY: u8 = 0xf2;
    pub const TYPEMATIC: u8 = 0xf3;
    pub const ENABLE: u8 = 0xf4;
    pub const DISABLE: u8 = 0xf5;
    pub const DEFAULTS: u8 = 0xf6;
    pub const RESEND: u8 = 0xfe;
    pub const RESET: u8 = 0xff;
    pub const ACK: u8 = 0xfa;
    pub const SELF_TEST_PASSED: u8 = 0xaa;
    /// A standard MF2 keyboard, translated.
    pub const ID: [u8; 2] = [0xab, 0x83];
}

const SELF_TEST_OK: u8 = 0x55;
const INTERFACE_OK: u8 = 0x00;
/// Command byte after power-on: keyboard interrupt on, system flag, translation.
const DEFAULT_COMMAND_BYTE: u8 = 0x45;
/// The output port: A20 on, CPU not held in reset.
const OUTPUT_PORT: u8 = 0x03;
/// Longest reply queue kept (a guest cannot grow it without bound).
const MAX_OUTPUT: usize = 16;

/// What the next data-port write means.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum PendingWrite {
    /// A command for the keyboard.
    #[default]
    Keyboard,
    /// The controller's command byte (after 0x60).
    CommandByte,
    /// The output port (after 0xD1).
    OutputPort,
    /// A byte for the (absent) mouse (after 0xD4): dropped.
    Aux,
    /// The argument of a keyboard command (after 0xED, 0xF0 or 0xF3).
    KeyboardArgument(u8),
}

/// The controller's state, for snapshots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    pub output: Vec<u8>,
    pub command_byte: u8,
    pub status: u8,
    pub pending: PendingWrite,
    pub scan_code_set: u8,
}

impl Default for I8042State {
    fn default() -> Self {
        Self {
            output: Vec::new(),
            command_byte: DEFAULT_COMMAND_BYTE,
            status: status::UNLOCKED,
            pending: PendingWrite::Keyboard,
            scan_code_set: 2,
        }
    }
}

/// The i8042 on ports 0x60 (data) and 0x64 (status/command), mapped as one 5-byte range.
pub struct I8042 {
    device: I8042Device<ResetLine>,
    output: VecDeque<u8>,
    command_byte: u8,
    status: u8,
    pending: PendingWrite,
    scan_code_set: u8,
}

impl I8042 {
    /// The data port; the command port is `BASE + 4`.
    pub const BASE: u64 = 0x60;
    /// Covers 0x60..=0x64.
    pub const LEN: u64 = 5;
    const DATA: u64 = 0;
    const COMMAND: u64 = 4;

    /// An i8042 whose reset requests go to `exit`.
    pub fn new(exit: Arc<GuestExitEvent>) -> Self {
        let mut i8042 = Self {
            device: I8042Device::new(ResetLine(exit)),
            output: VecDeque::new(),
            command_byte: 0,
            status: 0,
            pending: PendingWrite::Keyboard,
            scan_code_set: 0,
        };
        i8042.restore_state(&I8042State::default());
        i8042
    }

    /// The controller's state.
    pub fn state(&self) -> I8042State {
        I8042State {
            output: self.output.iter().copied().collect(),
            command_byte: self.command_byte,
            status: self.status,
            pending: self.pending,
            scan_code_set: self.scan_code_set,
        }
    }

    /// Loads a saved state.
    pub fn restore_state(&mut self, state: &I8042State) {
        self.output = state.output.iter().copied().take(MAX_OUTPUT).collect();
        self.command_byte = state.command_byte;
        self.status = state.status;
        self.pending = state.pending;
        self.scan_code_set = state.scan_code_set;
    }

    fn reply(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            if self.output.len() < MAX_OUTPUT {
                self.output.push_back(byte);
            }
        }
    }

    fn status(&self) -> u8 {
        let full = if self.output.is_empty() {
            0
        } else {
            status::OUTPUT_FULL
        };
        self.status | full
    }

    fn command(&mut self, value: u8) {
        self.status |= status::COMMAND;
        match value {
            command::READ_COMMAND_BYTE => self.reply(&[self.command_byte]),
            command::WRITE_COMMAND_BYTE => self.pending = PendingWrite::CommandByte,
            command::SELF_TEST => {
                self.status |= status::SYSTEM;
                self.reply(&[SELF_TEST_OK]);
            }
            command::TEST_KEYBOARD => self.reply(&[INTERFACE_OK]),
            // No mouse: its interface test reports a stuck clock line.
            command::TEST_AUX => self.reply(&[0x01]),
            command::READ_INPUT_PORT => self.reply(&[0x00]),
            command::READ_OUTPUT_PORT => self.reply(&[OUTPUT_PORT]),
            command::WRITE_OUTPUT_PORT => self.pending = PendingWrite::OutputPort,
            command::WRITE_AUX => self.pending = PendingWrite::Aux,
            command::DISABLE_KEYBOARD => self.command_byte |= 0x10,
            command::ENABLE_KEYBOARD => self.command_byte &= !0x10,
            command::DISABLE_AUX => self.command_byte |= 0x20,
            command::ENABLE_AUX => self.command_byte &= !0x20,
            // The reset pulse (0xFE) and anything else: vm-superio's device (it ignores the rest).
            _ => {
                // The reset trigger is infallible.
                let _ = self.device.write(Self::COMMAND as u8, value);
            }
        }
    }

    fn data(&mut self, value: u8) {
        self.status &= !status::COMMAND;
        match std::mem::take(&mut self.pending) {
            PendingWrite::CommandByte => {
                self.command_byte = value;
                if value & status::SYSTEM != 0 {
                    self.status |= status::SYSTEM;
                }
            }
            // Only A20 and the reset line live there; A20 is always on and a reset goes through 0xFE.
            PendingWrite::OutputPort | PendingWrite::Aux => {}
            PendingWrite::KeyboardArgument(command) => {
                if command == keyboard::SCAN_CODE_SET {
                    if value == 0 {
                        self.reply(&[keyboard::ACK, self.scan_code_set]);
                        return;
                    }
                    self.scan_code_set = value;
                }
                self.reply(&[keyboard::ACK]);
            }
            PendingWrite::Keyboard => self.keyboard_command(value),
        }
    }

    fn keyboard_command(&mut self, value: u8) {
        match value {
            keyboard::RESET => {
                self.scan_code_set = 2;
                self.reply(&[keyboard::ACK, keyboard::SELF_TEST_PASSED]);
            }
            keyboard::IDENTIFY => {
                self.reply(&[keyboard::ACK]);
                self.reply(&keyboard::ID);
            }
            keyboard::SET_LEDS | keyboard::SCAN_CODE_SET | keyboard::TYPEMATIC => {
                self.pending = PendingWrite::KeyboardArgument(value);
                self.reply(&[keyboard::ACK]);
            }
            keyboard::ENABLE | keyboard::DISABLE | keyboard::DEFAULTS => {
                self.reply(&[keyboard::ACK])
            }
            keyboard::ECHO => self.reply(&[keyboard::ECHO]),
            _ => self.reply(&[keyboard::RESEND]),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some(first) = data.first_mut() else {
            return;
        };
        *first = match offset {
            Self::DATA => self.output.pop_front().unwrap_or(0),
            Self::COMMAND => self.status(),
            _ => 0,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            Self::DATA => self.data(value),
            Self::COMMAND => self.command(value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn i8042() -> (I8042, Arc<GuestExitEvent>) {
        let exit = Arc::new(GuestExitEvent::new().unwrap());
        (I8042::new(exit.clone()), exit)
    }

    fn read(dev: &mut I8042, port: u64) -> u8 {
        let mut data = [0u8; 1];
        dev.read(port, &mut data);
        data[0]
    }

    /// Every byte waiting on the data port.
    fn drain(dev: &mut I8042) -> Vec<u8> {
        let mut bytes = Vec::new();
        while read(dev, 4) & status::OUTPUT_FULL != 0 {
            bytes.push(read(dev, 0));
        }
        bytes
    }

    #[test]
    fn reset_command_requests_a_reset() {
        let (mut dev, exit) = i8042();
        dev.write(4, &[0xfe]);
        assert_eq!(exit.requested(), Some(GuestExitRequest::Reset));
    }

    #[test]
    fn the_controller_answers_its_self_test_and_command_byte() {
        let (mut dev, exit) = i8042();
        assert_eq!(read(&mut dev, 4) & status::OUTPUT_FULL, 0);
        dev.write(4, &[command::SELF_TEST]);
        assert_eq!(drain(&mut dev), [SELF_TEST_OK]);
        assert_ne!(read(&mut dev, 4) & status::SYSTEM, 0);
        dev.write(4, &[command::WRITE_COMMAND_BYTE]);
        dev.write(0, &[0x65]);
        dev.write(4, &[command::READ_COMMAND_BYTE]);
        assert_eq!(drain(&mut dev), [0x65]);
        dev.write(4, &[command::TEST_KEYBOARD]);
        assert_eq!(drain(&mut dev), [INTERFACE_OK]);
        dev.write(4, &[command::WRITE_OUTPUT_PORT]);
        dev.write(0, &[0x01]);
        assert_eq!(
            exit.requested(),
            None,
            "the output port write is not a reset"
        );
    }

    #[test]
    fn the_keyboard_acks_resets_identifies_and_takes_arguments() {
        let (mut dev, _) = i8042();
        dev.write(0, &[keyboard::RESET]);
        assert_eq!(drain(&mut dev), [keyboard::ACK, keyboard::SELF_TEST_PASSED]);
        dev.write(0, &[keyboard::IDENTIFY]);
        assert_eq!(drain(&mut dev), [keyboard::ACK, 0xab, 0x83]);
        dev.write(0, &[keyboard::SET_LEDS]);
        dev.write(0, &[0x07]);
        assert_eq!(drain(&mut dev), [keyboard::ACK, keyboard::ACK]);
        dev.write(0, &[keyboard::SCAN_CODE_SET]);
        dev.write(0, &[0x00]);
        assert_eq!(drain(&mut dev), [keyboard::ACK, keyboard::ACK, 2]);
        dev.write(0, &[0x42]);
        assert_eq!(drain(&mut dev), [keyboard::RESEND]);
        assert_eq!(read(&mut dev, 0), 0, "an empty buffer reads zero");
    }

    #[test]
    fn replies_are_bounded_and_state_round_trips() {
        let (mut dev, _) = i8042();
        for _ in 0..100 {
            dev.write(0, &[keyboard::ECHO]);
        }
        assert_eq!(dev.state().output.len(), MAX_OUTPUT);
        dev.write(0, &[keyboard::SET_LEDS]);
        let state = dev.state();
        let (mut fresh, _) = i8042();
        fresh.restore_state(&state);
        assert_eq!(fresh.state(), state);
        fresh.write(0, &[0x01]);
        assert_eq!(fresh.state().pending, PendingWrite::Keyboard);
    }
}
