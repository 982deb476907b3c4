//! Legacy PC devices: the COM1 UART, the i8042 PS/2 controller (with a keyboard without keys), the ACPI
//! hardware-reduced sleep/reset registers, the ICH9 power-management block of q35 guests and the
//! CMOS RAM with its real-time clock.

pub mod acpi_pm;
pub mod cmos;
pub mod i8042;
pub mod ich9_pm;
pub mod serial;

pub use acpi_pm::AcpiPmDevice;
pub use cmos::{Cmos, CmosMemory, CmosState};
pub use i8042::{I8042State, I8042};
pub use ich9_pm::{Ich9PmBlock, Ich9PmState};
pub use serial::{SerialDevice, SerialOutput, SerialOutputError};
