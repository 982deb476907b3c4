//! Placing virtio devices: an MMIO window and an interrupt line each, KVM ioeventfds for their queue
//! notifications and an irqfd for their interrupt, a DSDT entry, and a place on the event loop.

use std::sync::{Arc, Mutex};

use acpi_tables::{aml, Aml, AmlSink};
use devices::virtio::mmio::{MmioTransport, MMIO_WINDOW_SIZE, NOTIFY_OFFSET};
use devices::virtio::transport::TransportError;
use devices::virtio::VirtioDevice;
use devices::{Bus, BusError, EventFdTrigger};
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::IoEventAddress;

use crate::arch::acpi::DsdtDevice;
use crate::arch::layout::{IOAPIC_START, VIRTIO_MMIO_START};
use crate::memory::GuestMemory;
use crate::vm::{Vm, VmError};

/// First interrupt line for virtio devices (0-4 are the PIT, keyboard, cascade, COM2, COM1).
pub const VIRTIO_FIRST_IRQ: u32 = 5;
/// Interrupt lines available on the IOAPIC (pins 5..23).
pub const VIRTIO_MAX_DEVICES: usize = 19;

/// Event-loop subscriber type used by the VMM.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// A virtio device that also runs on the event loop.
pub trait VirtioSubscriber: VirtioDevice + MutEventSubscriber + Send {}
impl<T: VirtioDevice + MutEventSubscriber + Send> VirtioSubscriber for T {}

/// Errors placing a device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceManagerError {
    #[error("too many virtio devices: at most {VIRTIO_MAX_DEVICES}")]
    TooManyDevices,
    #[error("cannot create the interrupt eventfd of virtio device {index}: {source}")]
    EventFd {
        index: usize,
        source: std::io::Error,
    },
    #[error("cannot create the transport of virtio device {index}: {source}")]
    Transport {
        index: usize,
        source: TransportError,
    },
    #[error("cannot register queue {queue} notification of virtio device {index}: {source}")]
    IoEvent {
        index: usize,
        queue: usize,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Irq(#[from] VmError),
    #[error("cannot place virtio device {index} on the MMIO bus: {source}")]
    Bus { index: usize, source: BusError },
}

/// Where a virtio device sits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioSlot {
    pub index: usize,
    pub base: u64,
    pub irq: u32,
}

impl VirtioSlot {
    /// The slot of the `index`th virtio device.
    pub fn new(index: usize) -> Self {
        Self {
            index,
            base: VIRTIO_MMIO_START + index as u64 * MMIO_WINDOW_SIZE,
            irq: VIRTIO_FIRST_IRQ + index as u32,
        }
    }
}

impl DsdtDevice for VirtioSlot {
    fn append_aml(&self, sink: &mut dyn AmlSink) {
        debug_assert!(self.base + MMIO_WINDOW_SIZE <= IOAPIC_START);
        let name = format!("VR{:02X}", self.index);
        aml::Device::new(
            name.as_str().into(),
            vec![
                &aml::Name::new("_HID".into(), &"LNRO0005"),
                &aml::Name::new("_UID".into(), &(self.index as u32)),
                &aml::Name::new(
                    "_CRS".into(),
                    &aml::ResourceTemplate::new(vec![
                        &aml::Memory32Fixed::new(true, self.base as u32, MMIO_WINDOW_SIZE as u32),
                        &aml::Interrupt::new(true, true, false, false, self.irq),
                    ]),
                ),
            ],
        )
        .to_aml_bytes(sink);
    }
}

/// Collects virtio devices while the VM is built.
#[derive(Default)]
pub struct DeviceManager {
    slots: Vec<VirtioSlot>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
}

impl DeviceManager {
    /// An empty device manager.
    pub fn new() -> Self {
        Self::default()
    }

    /// Wires `device` into the VM: transport on the MMIO bus, ioeventfds, irqfd, event loop.
    pub fn add_virtio_device(
        &mut self,
        device: Arc<Mutex<dyn VirtioSubscriber>>,
        vm: &Vm,
        memory: &GuestMemory,
        mmio_bus: &mut Bus,
        event_manager: &mut EventManager<Subscriber>,
    ) -> Result<VirtioSlot, DeviceManagerError> {
        let index = self.slots.len();
        if index >= VIRTIO_MAX_DEVICES {
            return Err(DeviceManagerError::TooManyDevices);
        }
        let slot = VirtioSlot::new(index);
        let irq = EventFdTrigger::new()
            .map_err(|source| DeviceManagerError::EventFd { index, source })?;
        let dyn_device: Arc<Mutex<dyn VirtioDevice>> = device.clone();
        let transport = MmioTransport::new(dyn_device, memory.clone(), irq)
            .map_err(|source| DeviceManagerError::Transport { index, source })?;
        for (queue, evt) in transport.queue_events().iter().enumerate() {
            vm.fd()
                .register_ioevent(
                    evt,
                    &IoEventAddress::Mmio(slot.base + NOTIFY_OFFSET),
                    queue as u32,
                )
                .map_err(|source| DeviceManagerError::IoEvent {
                    index,
                    queue,
                    source,
                })?;
        }
        vm.register_irqfd(transport.interrupt().eventfd(), slot.irq)?;
        let transport = Arc::new(Mutex::new(transport));
        mmio_bus
            .insert(transport.clone(), slot.base, MMIO_WINDOW_SIZE)
            .map_err(|source| DeviceManagerError::Bus { index, source })?;
        self.transports.push(transport);
        event_manager.add_subscriber(device);
        tracing::info!(
            index,
            base = format_args!("{:#x}", slot.base),
            irq = slot.irq,
            "virtio device added"
        );
        self.slots.push(slot);
        Ok(slot)
    }

    /// The transports of the devices placed so far, in slot order.
    pub fn transports(&self) -> &[Arc<Mutex<MmioTransport>>] {
        &self.transports
    }

    /// The devices placed so far, for the DSDT.
    pub fn slots(&self) -> &[VirtioSlot] {
        &self.slots
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_consecutive_windows_and_irqs() {
        let s = VirtioSlot::new(2);
        assert_eq!(s.base, VIRTIO_MMIO_START + 0x2000);
        assert_eq!(s.irq, 7);
        let last = VirtioSlot::new(VIRTIO_MAX_DEVICES - 1);
        assert!(last.irq <= 23);
    }

    #[test]
    fn dsdt_entry_names_the_virtio_mmio_hid() {
        let mut aml = Vec::new();
        VirtioSlot::new(0).append_aml(&mut aml);
        assert!(aml.windows(8).any(|w| w == b"LNRO0005"));
        assert!(aml.windows(4).any(|w| w == b"VR00"));
    }
}
