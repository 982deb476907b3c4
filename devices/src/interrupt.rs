//! Interrupt lines for devices: an eventfd that the VMM wires to a guest interrupt (KVM irqfd), and
//! level-triggered lines the device raises and lowers (a PCI function's INTx).

use std::io;

use vm_superio::Trigger;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// A [`Trigger`] that writes to an eventfd; the VMM registers the eventfd as an irqfd for a GSI.
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// Creates a trigger with a new non-blocking eventfd.
    pub fn new() -> io::Result<Self> {
        Ok(Self(EventFd::new(EFD_NONBLOCK)?))
    }

    /// Another handle on the same eventfd.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self(self.0.try_clone()?))
    }

    /// The eventfd behind the trigger.
    pub fn eventfd(&self) -> &EventFd {
        &self.0
    }
}

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// A level-triggered interrupt line (a PCI function's INTx pin, as routed by the platform): raised
/// while the device has an interrupt the driver has not acknowledged.
pub trait LevelInterrupt: Send + Sync {
    /// Raises (`true`) or lowers the line.
    fn set_level(&self, asserted: bool);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trigger_writes_the_eventfd() {
        let t = EventFdTrigger::new().unwrap();
        let clone = t.try_clone().unwrap();
        t.trigger().unwrap();
        clone.trigger().unwrap();
        assert_eq!(t.eventfd().read().unwrap(), 2);
    }
}
