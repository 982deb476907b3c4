//! What every virtio transport shares, whatever its register layout (`mmio.rs`, `pci/`): the
//! device, its queues as the driver configures them, feature negotiation, the device status state
//! machine (FEATURES_OK only for offered features, activation on DRIVER_OK, reset on 0), queue
//! notifications, and saving and restoring all of it.

use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    status, ActivateContext, GuestMemoryMmap, VirtioDevice, VirtioInterrupt, INT_CONFIG, INT_VRING,
};
use crate::persist::{TransportState, VirtioState};

/// Errors creating or restoring a transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot create an eventfd for virtio queue {index}: {source}")]
    EventFd {
        index: usize,
        source: std::io::Error,
    },
    #[error("invalid maximum size {size} for virtio queue {index}: {reason}")]
    QueueSize {
        index: usize,
        size: u16,
        reason: String,
    },
    #[error("snapshot has {got} queues for a device with {expected}")]
    QueueCount { expected: usize, got: usize },
    #[error("snapshot queue {index} is invalid: {reason}")]
    QueueState { index: usize, reason: String },
    #[error("cannot restore the virtio device: {0}")]
    Device(String),
}

pub(crate) fn lock(
    d: &Mutex<dyn VirtioDevice>,
) -> std::sync::MutexGuard<'_, dyn VirtioDevice + 'static> {
    d.lock().unwrap_or_else(|e| e.into_inner())
}

/// A device and the transport-independent state of the driver's view of it.
pub struct VirtioTransportCore {
    device: Arc<Mutex<dyn VirtioDevice>>,
    memory: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    queues: Vec<Queue>,
    queue_events: Vec<EventFd>,
    device_status: u32,
    /// Which 32 bits of the device's and driver's features the driver reads or writes.
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    driver_features: u64,
    /// The queue the queue registers address.
    pub queue_sel: u32,
    config_generation: u32,
    activated: bool,
}

impl VirtioTransportCore {
    /// Wraps `device`, interrupting the driver through `interrupt`.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        memory: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<Self, TransportError> {
        let sizes = lock(&device).queue_max_sizes().to_vec();
        let mut queues = Vec::with_capacity(sizes.len());
        let mut queue_events = Vec::with_capacity(sizes.len());
        for (index, size) in sizes.into_iter().enumerate() {
            queues.push(Queue::new(size).map_err(|e| TransportError::QueueSize {
                index,
                size,
                reason: e.to_string(),
            })?);
            queue_events.push(
                EventFd::new(EFD_NONBLOCK)
                    .map_err(|source| TransportError::EventFd { index, source })?,
            );
        }
        Ok(Self {
            device,
            memory,
            interrupt,
            queues,
            queue_events,
            device_status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            config_generation: 0,
            activated: false,
        })
    }

    /// The per-queue notification eventfds, for the VMM to register as KVM ioeventfds.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    /// The device's interrupt.
    pub fn interrupt(&self) -> &Arc<dyn VirtioInterrupt> {
        &self.interrupt
    }

    /// The device.
    pub fn device(&self) -> std::sync::MutexGuard<'_, dyn VirtioDevice + 'static> {
        lock(&self.device)
    }

    /// The number of queues.
    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    /// The virtio device status register.
    pub fn device_status(&self) -> u32 {
        self.device_status
    }

    /// The configuration generation: it changes whenever the configuration space does.
    pub fn config_generation(&self) -> u32 {
        self.config_generation
    }

    /// Whether the device runs (the driver set DRIVER_OK and activation succeeded).
    pub fn activated(&self) -> bool {
        self.activated
    }

    /// The 32 bits of the device's features [`Self::device_features_sel`] selects.
    pub fn device_features_word(&self) -> u32 {
        let features = lock(&self.device).avail_features();
        match self.device_features_sel {
            0 => features as u32,
            1 => (features >> 32) as u32,
            _ => 0,
        }
    }

    /// The 32 bits of the driver's features [`Self::driver_features_sel`] selects.
    pub fn driver_features_word(&self) -> u32 {
        match self.driver_features_sel {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        }
    }

    /// The driver writes 32 bits of the features it accepts (ignored once FEATURES_OK is set).
    pub fn set_driver_features_word(&mut self, value: u32) {
        if self.features_ok() {
            return;
        }
        let value = u64::from(value);
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | value,
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (value << 32),
            _ => {}
        }
    }

    /// The selected queue, if [`Self::queue_sel`] names one.
    pub fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(self.queue_sel as usize)
    }

    /// Queue configuration (size, ring addresses) is allowed only before the device runs.
    fn configurable(&self) -> bool {
        !self.activated && self.device_status & status::DRIVER_OK == 0
    }

    /// Sets the selected queue's size; 0 (how drivers unset a queue) is not a size.
    pub fn set_queue_size(&mut self, size: u16) {
        if self.configurable() && size != 0 {
            if let Some(q) = self.queues.get_mut(self.queue_sel as usize) {
                q.set_size(size);
            }
        }
    }

    /// QueueReady reads back what was last written (virtio 1.x 4.2.2.2): a driver stops a queue by
    /// writing 0 and waiting to read 0, also after DRIVER_OK; the running device stops its own copy
    /// of the queue before the write completes.
    pub fn set_queue_ready(&mut self, ready: bool) {
        if !self.configurable() && ready {
            return;
        }
        let index = self.queue_sel as usize;
        let activated = self.activated;
        if let Some(q) = self.queues.get_mut(index) {
            q.set_ready(ready);
            if !ready && activated {
                lock(&self.device).stop_queue(index);
            }
        }
    }

    /// Sets part of the selected queue's ring addresses: which ring, and its low or high 32 bits.
    pub fn set_queue_address(&mut self, ring: QueueRing, low: Option<u32>, high: Option<u32>) {
        if !self.configurable() {
            return;
        }
        if let Some(q) = self.queues.get_mut(self.queue_sel as usize) {
            match ring {
                QueueRing::Descriptors => q.set_desc_table_address(low, high),
                QueueRing::Available => q.set_avail_ring_address(low, high),
                QueueRing::Used => q.set_used_ring_address(low, high),
            }
        }
    }

    /// The driver notified queue `index` without going through its ioeventfd.
    pub fn notify(&self, index: usize) {
        if let Some(evt) = self.queue_events.get(index) {
            if let Err(e) = evt.write(1) {
                crate::guest_error!("cannot signal virtio queue {index}: {e}");
            }
        }
    }

    /// Reads the device-specific configuration space.
    pub fn read_config(&self, offset: u64, data: &mut [u8]) {
        lock(&self.device).read_config(offset, data);
    }

    /// Writes the device-specific configuration space; the generation moves on.
    pub fn write_config(&mut self, offset: u64, data: &[u8]) {
        lock(&self.device).write_config(offset, data);
        self.config_generation = self.config_generation.wrapping_add(1);
    }

    fn features_ok(&self) -> bool {
        self.device_status & status::FEATURES_OK != 0
    }

    fn reset(&mut self) {
        if self.activated && !lock(&self.device).reset() {
            crate::guest_warn!("virtio device cannot be reset; marking DEVICE_NEEDS_RESET");
            self.device_status |= status::DEVICE_NEEDS_RESET;
            self.interrupt.signal_config_change();
            return;
        }
        self.activated = false;
        self.device_status = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.interrupt.ack(u32::MAX);
        for q in &mut self.queues {
            q.reset();
        }
    }

    /// The driver writes the device status: 0 resets, FEATURES_OK is kept only for offered
    /// features, DRIVER_OK activates.
    pub fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let mut value = value;
        if value & status::FEATURES_OK != 0 && !self.features_ok() {
            let offered = lock(&self.device).avail_features();
            if self.driver_features & !offered != 0 {
                crate::guest_warn!(
                    "driver accepted features {:#x} the device does not offer ({offered:#x})",
                    self.driver_features
                );
                value &= !status::FEATURES_OK;
            } else {
                lock(&self.device).set_acked_features(self.driver_features);
            }
        }
        self.device_status = value;
        if value & status::DRIVER_OK != 0 && self.features_ok() && !self.activated {
            self.activate();
        }
    }

    fn fail_activation(&mut self, why: &str) {
        crate::guest_warn!("{why}; virtio device not activated");
        self.device_status |= status::DEVICE_NEEDS_RESET;
        self.interrupt.signal_config_change();
    }

    fn activate(&mut self) {
        if let Some(index) = (0..self.queues.len())
            .find(|&i| self.queues[i].ready() && !self.queues[i].is_valid(&self.memory))
        {
            return self.fail_activation(&format!("virtio queue {index} is invalid"));
        }
        let events: Result<Vec<EventFd>, _> =
            self.queue_events.iter().map(EventFd::try_clone).collect();
        let queue_events = match events {
            Ok(e) => e,
            Err(e) => return self.fail_activation(&format!("cannot clone queue eventfds: {e}")),
        };
        let event_idx = self.driver_features & super::VIRTIO_RING_F_EVENT_IDX != 0;
        let queues: Result<Vec<Queue>, _> = self
            .queues
            .iter()
            .map(|q| {
                Queue::try_from(q.state()).map(|mut q| {
                    q.set_event_idx(event_idx);
                    q
                })
            })
            .collect();
        let queues = match queues {
            Ok(q) => q,
            Err(e) => return self.fail_activation(&format!("invalid virtio queue state: {e}")),
        };
        let ctx = ActivateContext {
            memory: self.memory.clone(),
            queues,
            queue_events,
            interrupt: self.interrupt.clone(),
        };
        let result = lock(&self.device).activate(ctx);
        match result {
            Ok(()) => self.activated = true,
            Err(e) => self.fail_activation(&format!("cannot activate virtio device: {e}")),
        }
    }

    /// The transport's and device's state. Call with the vCPUs paused and the device idle (from the
    /// event loop thread), so nothing moves underneath.
    pub fn save_state(&self) -> VirtioState {
        let device = lock(&self.device);
        let live = if self.activated {
            device.queue_states()
        } else {
            None
        };
        let queues = live
            .unwrap_or_else(|| self.queues.iter().map(|q| q.state()).collect())
            .into_iter()
            .map(Into::into)
            .collect();
        VirtioState {
            transport: TransportState {
                device_status: self.device_status,
                device_features_sel: self.device_features_sel,
                driver_features_sel: self.driver_features_sel,
                driver_features: self.driver_features,
                queue_sel: self.queue_sel,
                config_generation: self.config_generation,
                interrupt_status: self.interrupt.status(),
                activated: self.activated,
                queues,
            },
            device: device.save_state(),
        }
    }

    /// Loads a saved state (guest memory must already hold the snapshot's contents) and, if the
    /// device was running, re-activates it with its queues where they were. Interrupts the driver
    /// had not acknowledged are raised again.
    pub fn restore_state(&mut self, state: &VirtioState) -> Result<(), TransportError> {
        let t = &state.transport;
        if t.queues.len() != self.queues.len() {
            return Err(TransportError::QueueCount {
                expected: self.queues.len(),
                got: t.queues.len(),
            });
        }
        let mut queues = Vec::with_capacity(t.queues.len());
        for (index, (saved, current)) in t.queues.iter().zip(&self.queues).enumerate() {
            let mut qs: virtio_queue::QueueState = (*saved).into();
            // The maximum size is the device's, not the snapshot's.
            qs.max_size = current.max_size();
            let q = Queue::try_from(qs).map_err(|e| TransportError::QueueState {
                index,
                reason: e.to_string(),
            })?;
            if q.ready() && !q.is_valid(&self.memory) {
                return Err(TransportError::QueueState {
                    index,
                    reason: "rings outside guest memory".into(),
                });
            }
            queues.push(q);
        }
        lock(&self.device)
            .restore_state(&state.device)
            .map_err(TransportError::Device)?;
        self.queues = queues;
        self.device_status = t.device_status;
        self.device_features_sel = t.device_features_sel;
        self.driver_features_sel = t.driver_features_sel;
        self.driver_features = t.driver_features;
        self.queue_sel = t.queue_sel;
        self.config_generation = t.config_generation;
        self.activated = false;
        if t.activated {
            self.activate();
            if !self.activated {
                return Err(TransportError::Device("re-activation failed".into()));
            }
        }
        if t.interrupt_status & INT_VRING != 0 {
            for queue in 0..self.queues.len() {
                self.interrupt.signal_used_queue(queue);
            }
        }
        if t.interrupt_status & INT_CONFIG != 0 {
            self.interrupt.signal_config_change();
        }
        Ok(())
    }
}

/// The three parts of a virtqueue whose guest addresses the driver sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueRing {
    Descriptors,
    Available,
    Used,
}
