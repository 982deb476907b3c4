//! Virtio 1.x devices and their transports.
//!
//! A device implements [`VirtioDevice`] and knows nothing of transports. A transport exposes it to
//! the guest — [`mmio::MmioTransport`] as a virtio-mmio register window, [`pci`] as a virtio-pci
//! function — over the shared [`transport::VirtioTransportCore`], which, when the driver sets
//! DRIVER_OK, activates the device with its queues, the queue-notification eventfds (which the VMM
//! wires to KVM ioeventfds) and a [`VirtioInterrupt`] (a line, or MSI-X vectors, wired to KVM
//! irqfds).

pub mod block;
pub mod device_queues;
pub mod mmio;
pub mod net;
pub mod pci;
pub mod transport;

use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::{Queue, QueueState};

use crate::persist::VirtioDeviceState;
use vm_memory::bitmap::AtomicBitmap;
use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

use crate::interrupt::EventFdTrigger;

/// Guest memory as devices see it: writes through it mark pages in the VMM-side dirty bitmap.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// Device status bits (virtio spec 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

/// `VIRTIO_F_VERSION_1`: the device is virtio 1.x (no legacy interface).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// `VIRTIO_RING_F_EVENT_IDX`: each side says up to which ring index it needs no notification
/// (`used_event`, `avail_event`), so a busy queue kicks and interrupts far less.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// Interrupt status bit: a used ring was updated.
pub const INT_VRING: u32 = 1;
/// Interrupt status bit: the configuration changed.
pub const INT_CONFIG: u32 = 2;

/// How a transport interrupts the driver, and the interrupt status (ISR) bits it keeps until the
/// driver acknowledges them.
pub trait VirtioInterrupt: Send + Sync {
    /// Tells the driver that queue `queue`'s used ring changed.
    fn signal_used_queue(&self, queue: usize);
    /// Tells the driver that the configuration space changed.
    fn signal_config_change(&self);
    /// The interrupt status bits ([`INT_VRING`], [`INT_CONFIG`]) not yet acknowledged.
    fn status(&self) -> u32;
    /// Clears acknowledged bits.
    fn ack(&self, bits: u32);
}

/// One interrupt line for everything (virtio-mmio): a KVM irqfd and the interrupt status register.
pub struct LineInterrupt {
    status: AtomicU32,
    trigger: EventFdTrigger,
}

impl LineInterrupt {
    /// An interrupt raised through `trigger`.
    pub fn new(trigger: EventFdTrigger) -> Self {
        Self {
            status: AtomicU32::new(0),
            trigger,
        }
    }

    fn signal(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.trigger.trigger() {
            crate::guest_error!("cannot raise virtio interrupt: {e}");
        }
    }

    /// The eventfd to register as the irqfd.
    pub fn eventfd(&self) -> &EventFd {
        self.trigger.eventfd()
    }
}

impl VirtioInterrupt for LineInterrupt {
    fn signal_used_queue(&self, _queue: usize) {
        self.signal(INT_VRING);
    }

    fn signal_config_change(&self) {
        self.signal(INT_CONFIG);
    }

    fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
}

/// Errors activating a device.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("queue {index} is not valid (size or ring addresses outside guest memory)")]
    InvalidQueue { index: usize },
    #[error("device expects {expected} queues, driver set up {got}")]
    QueueCount { expected: usize, got: usize },
    #[error("cannot start the device's backend: {0}")]
    Backend(String),
}

/// What a transport hands a device when the driver is ready.
pub struct ActivateContext {
    pub memory: GuestMemoryMmap,
    pub queues: Vec<Queue>,
    /// One eventfd per queue, signalled when the driver notifies that queue.
    pub queue_events: Vec<EventFd>,
    pub interrupt: std::sync::Arc<dyn VirtioInterrupt>,
}

/// A virtio device model.
pub trait VirtioDevice: Send {
    /// The virtio device ID (2 = block, 1 = net, ...).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers.
    fn avail_features(&self) -> u64;
    /// Records the features the driver accepted (a subset of `avail_features`).
    fn set_acked_features(&mut self, features: u64);
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space (most devices ignore it).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts processing queues.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// Stops processing and forgets queue state (driver reset). Returns false if the device cannot
    /// be reset, in which case the transport reports DEVICE_NEEDS_RESET.
    fn reset(&mut self) -> bool;
    /// The driver stopped queue `index` (QueueReady = 0) while the device runs: stop using it.
    fn stop_queue(&mut self, index: usize);
    /// The live queues' positions while the device is active (they move on after activation, so
    /// the transport's copies are stale).
    fn queue_states(&self) -> Option<Vec<QueueState>>;
    /// The device's own state for a snapshot.
    fn save_state(&self) -> VirtioDeviceState;
    /// Loads the device's own state (before the transport re-activates it).
    fn restore_state(&mut self, state: &VirtioDeviceState) -> Result<(), String>;
}

/// Copies `config[offset..]` into `data`, leaving out-of-range bytes as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(offset) = usize::try_from(offset) else {
        return;
    };
    if offset >= config.len() {
        return;
    }
    let n = data.len().min(config.len() - offset);
    data[..n].copy_from_slice(&config[offset..offset + n]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_are_bounded() {
        let cfg = [1u8, 2, 3, 4];
        let mut d = [9u8; 4];
        read_config_bytes(&cfg, 2, &mut d);
        assert_eq!(d, [3, 4, 0, 0]);
        read_config_bytes(&cfg, 100, &mut d);
        assert_eq!(d, [0; 4]);
        read_config_bytes(&cfg, u64::MAX, &mut d);
        assert_eq!(d, [0; 4]);
    }

    #[test]
    fn interrupt_status_is_set_and_acked() {
        let irq = LineInterrupt::new(EventFdTrigger::new().unwrap());
        irq.signal_used_queue(0);
        irq.signal_config_change();
        assert_eq!(irq.status(), INT_VRING | INT_CONFIG);
        irq.ack(INT_VRING);
        assert_eq!(irq.status(), INT_CONFIG);
        assert_eq!(irq.eventfd().read().unwrap(), 2);
    }
}
