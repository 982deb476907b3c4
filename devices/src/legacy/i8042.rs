//! The i8042 keyboard controller, present for its reset line (command 0xFE on port 0x64), via vm-superio.

use std::sync::Arc;

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

/// The i8042 on ports 0x60 (data) and 0x64 (status/command), mapped as one 5-byte range.
pub struct I8042 {
    device: I8042Device<ResetLine>,
}

impl I8042 {
    /// The data port; the command port is `BASE + 4`.
    pub const BASE: u64 = 0x60;
    /// Covers 0x60..=0x64.
    pub const LEN: u64 = 5;

    /// An i8042 whose reset requests go to `exit`.
    pub fn new(exit: Arc<GuestExitEvent>) -> Self {
        Self {
            device: I8042Device::new(ResetLine(exit)),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(first), Ok(offset)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.device.read(offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(&value), Ok(offset)) = (data.first(), u8::try_from(offset)) {
            // The reset trigger is infallible.
            let _ = self.device.write(offset, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_requests_a_reset() {
        let exit = Arc::new(GuestExitEvent::new().unwrap());
        let mut dev = I8042::new(exit.clone());
        dev.write(4, &[0xfe]);
        assert_eq!(exit.requested(), Some(GuestExitRequest::Reset));
    }
}
