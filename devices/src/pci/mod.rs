//! PCI configuration space: the layer guests (and OVMF, which expects QEMU's q35 platform) use to
//! find PCI functions, size and place their BARs and walk their capabilities.
//!
//! The layer has three parts:
//!
//! - [`configuration::PciConfiguration`]: one function's 4 KiB PCI Express configuration space,
//!   with a per-byte mask of the bits the guest may write, so that BAR sizing, the command
//!   register and capabilities behave as they do on hardware. It records BARs the guest moves, for
//!   the owner to drain with [`PciConfiguration::take_bar_reprogrammings`].
//! - [`PciDevice`]: what a PCI function implements; usually just handing out its configuration.
//! - [`msix`]: MSI-X tables, pending bits and their delivery through eventfds.
//! - [`q35`]: the chipset functions OVMF programs (the MCH host bridge and the ICH9 LPC bridge).
//! - [`root`]: bus 0 of a root complex ([`root::PciRoot`], with a q35 host bridge at 00:00.0) and
//!   the two ways a guest reaches it, both [`BusDevice`](crate::bus::BusDevice)s sharing one root:
//!   the legacy `0xCF8`/`0xCFC` port pair ([`root::PciConfigIo`]) and the memory-mapped ECAM
//!   window ([`root::PciEcam`]).
//!
//! Like the rest of this crate, nothing here knows about KVM, nor about where BARs are mapped:
//! moving a device's MMIO or port range when its BAR changes is the VMM's business.

pub mod configuration;
pub mod msix;
pub mod q35;
pub mod root;

use std::fmt;
use std::sync::{Mutex, MutexGuard};

pub use configuration::{
    BarReprogrammed, PciBar, PciBarKind, PciConfiguration, PciConfigurationError,
    PciConfigurationState,
};
pub use q35::{Ich9Lpc, PciHostBridge, Q35_ECAM_BASE};
pub use root::{
    BarObserver, PciConfigIo, PciEcam, PciMmioWindow, PciRoot, PciRootError, SharedPciDevice,
};

/// Device numbers on a bus: `0..DEVICES_PER_BUS`.
pub const DEVICES_PER_BUS: u8 = 32;
/// Function numbers of a device: `0..FUNCTIONS_PER_DEVICE`.
pub const FUNCTIONS_PER_DEVICE: u8 = 8;

/// A PCI function, as the root complex sees it: something with a configuration space.
///
/// The root only ever passes accesses of 1 to 4 bytes that lie inside the 4 KiB space (an access
/// running past the end is cut short there); an implementation that overrides the accessors may
/// rely on that.
pub trait PciDevice: Send {
    /// The function's configuration space.
    fn configuration(&self) -> &PciConfiguration;

    /// The function's configuration space, for writes and for draining BAR reprogrammings.
    fn configuration_mut(&mut self) -> &mut PciConfiguration;

    /// Handles a guest read of `data.len()` bytes at byte offset `reg` of the configuration space.
    fn config_read(&mut self, reg: usize, data: &mut [u8]) {
        self.configuration().read(reg, data);
    }

    /// Handles a guest write of `data` at byte offset `reg` of the configuration space.
    fn config_write(&mut self, reg: usize, data: &[u8]) {
        self.configuration_mut().write(reg, data);
    }

    /// Handles a guest read of `data.len()` bytes at `offset` into memory BAR `bar`. Functions
    /// without BARs keep this default, which reads zeros.
    fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    /// Handles a guest write of `data` at `offset` into memory BAR `bar`.
    fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}

/// The class code: base class, subclass and programming interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciClassCode {
    pub class: u8,
    pub subclass: u8,
    pub prog_if: u8,
}

/// What a function says it is: the read-only identification registers of its header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciIdentity {
    pub vendor_id: u16,
    pub device_id: u16,
    pub revision: u8,
    pub class_code: PciClassCode,
    pub subsystem_vendor_id: u16,
    pub subsystem_id: u16,
}

/// The INTx pin a function uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PciInterruptPin {
    IntA = 1,
    IntB = 2,
    IntC = 3,
    IntD = 4,
}

/// Errors from naming a PCI function.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciAddressError {
    /// The device number is 32 or more.
    #[error("PCI device number {device} is out of range (a bus has 32 devices)")]
    DeviceOutOfRange { device: u8 },
    /// The function number is 8 or more.
    #[error("PCI function number {function} is out of range (a device has 8 functions)")]
    FunctionOutOfRange { function: u8 },
}

/// A function's bus/device/function address, shown as `bb:dd.f` (`00:1f.0`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddress {
    bus: u8,
    device: u8,
    function: u8,
}

impl PciAddress {
    /// The address `bus:device.function`; `device` must be below 32 and `function` below 8.
    pub fn new(bus: u8, device: u8, function: u8) -> Result<Self, PciAddressError> {
        if device >= DEVICES_PER_BUS {
            return Err(PciAddressError::DeviceOutOfRange { device });
        }
        if function >= FUNCTIONS_PER_DEVICE {
            return Err(PciAddressError::FunctionOutOfRange { function });
        }
        Ok(Self {
            bus,
            device,
            function,
        })
    }

    /// The address made of the low bits of each number, for decoders whose fields are already
    /// masked to their width.
    pub(crate) fn from_masked(bus: u8, device: u8, function: u8) -> Self {
        Self {
            bus,
            device: device % DEVICES_PER_BUS,
            function: function % FUNCTIONS_PER_DEVICE,
        }
    }

    /// The bus number.
    pub fn bus(self) -> u8 {
        self.bus
    }

    /// The device number, below 32.
    pub fn device(self) -> u8 {
        self.device
    }

    /// The function number, below 8.
    pub fn function(self) -> u8 {
        self.function
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus, self.device, self.function)
    }
}

/// Whether a configuration access of `len` bytes is one hardware can issue (1, 2 or 4 bytes).
pub(crate) fn is_config_access_len(len: usize) -> bool {
    matches!(len, 1 | 2 | 4)
}

/// Locks a PCI function or the root, recovering from a poisoned lock as [`crate::bus`] does: a
/// device whose handler panicked on another vCPU thread keeps its last state.
pub(crate) fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_displays_as_bus_device_function() {
        assert_eq!(PciAddress::new(0, 0x1f, 0).unwrap().to_string(), "00:1f.0");
        assert_eq!(PciAddress::new(0xab, 3, 7).unwrap().to_string(), "ab:03.7");
    }

    #[test]
    fn address_rejects_device_and_function_out_of_range() {
        assert_eq!(
            PciAddress::new(0, 32, 0),
            Err(PciAddressError::DeviceOutOfRange { device: 32 })
        );
        assert_eq!(
            PciAddress::new(0, 0, 8),
            Err(PciAddressError::FunctionOutOfRange { function: 8 })
        );
    }
}
