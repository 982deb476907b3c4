//! The virtio-mmio transport (virtio 1.x, "version 2" register layout).

use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};

use crate::persist::{MmioTransportState, VirtioState};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{status, ActivateContext, GuestMemoryMmap, VirtioDevice, VirtioInterrupt};
use crate::bus::BusDevice;
use crate::interrupt::EventFdTrigger;

/// Size of one device's register window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Offset of the QueueNotify register (where the VMM places ioeventfds).
pub const NOTIFY_OFFSET: u64 = 0x50;
/// Offset of the device configuration space.
pub const CONFIG_OFFSET: u64 = 0x100;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4d56_5446; // "FTVM"

/// A virtio device as seen through its MMIO register window.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    memory: GuestMemoryMmap,
    interrupt: Arc<VirtioInterrupt>,
    queues: Vec<Queue>,
    queue_events: Vec<EventFd>,
    device_status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    config_generation: u32,
    activated: bool,
}

/// Errors creating or restoring a transport.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
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

fn lock(d: &Mutex<dyn VirtioDevice>) -> std::sync::MutexGuard<'_, dyn VirtioDevice + 'static> {
    d.lock().unwrap_or_else(|e| e.into_inner())
}

impl MmioTransport {
    /// Wraps `device`, raising interrupts through `irq`.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        memory: GuestMemoryMmap,
        irq: EventFdTrigger,
    ) -> Result<Self, MmioError> {
        let sizes = lock(&device).queue_max_sizes().to_vec();
        let mut queues = Vec::with_capacity(sizes.len());
        let mut queue_events = Vec::with_capacity(sizes.len());
        for (index, size) in sizes.into_iter().enumerate() {
            queues.push(Queue::new(size).map_err(|e| MmioError::QueueSize {
                index,
                size,
                reason: e.to_string(),
            })?);
            queue_events.push(
                EventFd::new(EFD_NONBLOCK)
                    .map_err(|source| MmioError::EventFd { index, source })?,
            );
        }
        Ok(Self {
            device,
            memory,
            interrupt: Arc::new(VirtioInterrupt::new(irq)),
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

    /// The per-queue notification eventfds, for the VMM to register as ioeventfds on
    /// `base + NOTIFY_OFFSET` with the queue index as data match.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    /// The device's interrupt.
    pub fn interrupt(&self) -> &Arc<VirtioInterrupt> {
        &self.interrupt
    }

    /// The virtio device status register.
    pub fn device_status(&self) -> u32 {
        self.device_status
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
            transport: MmioTransportState {
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
    /// device was running, re-activates it with its queues where they were.
    pub fn restore_state(&mut self, state: &VirtioState) -> Result<(), MmioError> {
        let t = &state.transport;
        if t.queues.len() != self.queues.len() {
            return Err(MmioError::QueueCount {
                expected: self.queues.len(),
                got: t.queues.len(),
            });
        }
        let mut queues = Vec::with_capacity(t.queues.len());
        for (index, (saved, current)) in t.queues.iter().zip(&self.queues).enumerate() {
            let mut qs: virtio_queue::QueueState = (*saved).into();
            // The maximum size is the device's, not the snapshot's.
            qs.max_size = current.max_size();
            let q = Queue::try_from(qs).map_err(|e| MmioError::QueueState {
                index,
                reason: e.to_string(),
            })?;
            if q.ready() && !q.is_valid(&self.memory) {
                return Err(MmioError::QueueState {
                    index,
                    reason: "rings outside guest memory".into(),
                });
            }
            queues.push(q);
        }
        lock(&self.device)
            .restore_state(&state.device)
            .map_err(MmioError::Device)?;
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
                return Err(MmioError::Device("re-activation failed".into()));
            }
        }
        if t.interrupt_status != 0 {
            // Whatever the driver had not acknowledged is raised again.
            for bit in [super::INT_VRING, super::INT_CONFIG] {
                if t.interrupt_status & bit != 0 {
                    if bit == super::INT_VRING {
                        self.interrupt.signal_used_queue();
                    } else {
                        self.interrupt.signal_config_change();
                    }
                }
            }
        }
        Ok(())
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn features_ok(&self) -> bool {
        self.device_status & status::FEATURES_OK != 0
    }

    fn reset(&mut self) {
        if self.activated && !lock(&self.device).reset() {
            tracing::warn!("virtio device cannot be reset; marking DEVICE_NEEDS_RESET");
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

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let mut value = value;
        // FEATURES_OK is only accepted for a subset of what the device offers.
        if value & status::FEATURES_OK != 0 && !self.features_ok() {
            let offered = lock(&self.device).avail_features();
            if self.driver_features & !offered != 0 {
                tracing::warn!(
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

    fn activate(&mut self) {
        for (index, q) in self.queues.iter().enumerate() {
            if q.ready() && !q.is_valid(&self.memory) {
                tracing::warn!("virtio queue {index} is invalid; device not activated");
                self.device_status |= status::DEVICE_NEEDS_RESET;
                self.interrupt.signal_config_change();
                return;
            }
        }
        let events: Result<Vec<EventFd>, _> =
            self.queue_events.iter().map(EventFd::try_clone).collect();
        let queue_events = match events {
            Ok(e) => e,
            Err(e) => {
                tracing::error!("cannot clone queue eventfds: {e}");
                self.device_status |= status::DEVICE_NEEDS_RESET;
                return;
            }
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
            Err(e) => {
                tracing::warn!("invalid virtio queue state: {e}; device not activated");
                self.device_status |= status::DEVICE_NEEDS_RESET;
                return;
            }
        };
        let ctx = ActivateContext {
            memory: self.memory.clone(),
            queues,
            queue_events,
            interrupt: self.interrupt.clone(),
        };
        match lock(&self.device).activate(ctx) {
            Ok(()) => self.activated = true,
            Err(e) => {
                tracing::error!("cannot activate virtio device: {e}");
                self.device_status |= status::DEVICE_NEEDS_RESET;
                self.interrupt.signal_config_change();
            }
        }
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            0x00 => MAGIC,
            0x04 => VERSION,
            0x08 => lock(&self.device).device_type(),
            0x0c => VENDOR_ID,
            0x10 => {
                let f = lock(&self.device).avail_features();
                match self.device_features_sel {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            0x34 => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            0x44 => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            0x60 => self.interrupt.status(),
            0x70 => self.device_status,
            0xfc => self.config_generation,
            _ => {
                tracing::debug!("virtio-mmio read of unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        // Queue configuration is only allowed before the device runs.
        let configurable = !self.activated && self.device_status & status::DRIVER_OK == 0;
        match offset {
            0x14 => self.device_features_sel = value,
            0x20 if !self.features_ok() => match self.driver_features_sel {
                0 => {
                    self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value)
                }
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                }
                _ => {}
            },
            0x24 => self.driver_features_sel = value,
            0x30 => self.queue_sel = value,
            // A size of 0 is how drivers unset a queue; it is not a size to validate.
            0x38 if configurable && value != 0 => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(value as u16)
                }
            }
            // QueueReady reads back what was last written (virtio 1.x 4.2.2.2): a driver stops a
            // queue by writing 0 and waiting to read 0, also after DRIVER_OK; the running device
            // stops its own copy of the queue before the write completes.
            0x44 if configurable || value == 0 => {
                let index = self.queue_sel as usize;
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                    if value == 0 && self.activated {
                        lock(&self.device).stop_queue(index);
                    }
                }
            }
            0x50 => {
                // Normally caught by the ioeventfd in the kernel; handle it here otherwise.
                if let Some(evt) = self.queue_events.get(value as usize) {
                    if let Err(e) = evt.write(1) {
                        tracing::error!("cannot signal virtio queue {value}: {e}");
                    }
                }
            }
            0x64 => self.interrupt.ack(value),
            0x70 => self.set_status(value),
            0x80 | 0x84 | 0x90 | 0x94 | 0xa0 | 0xa4 if configurable => {
                if let Some(q) = self.selected_queue() {
                    let (lo, hi) = if offset & 4 == 0 {
                        (Some(value), None)
                    } else {
                        (None, Some(value))
                    };
                    match offset & !4 {
                        0x80 => q.set_desc_table_address(lo, hi),
                        0x90 => q.set_avail_ring_address(lo, hi),
                        _ => q.set_used_ring_address(lo, hi),
                    }
                }
            }
            _ => tracing::debug!("ignored virtio-mmio write of {value:#x} to register {offset:#x}"),
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            lock(&self.device).read_config(offset - CONFIG_OFFSET, data);
            return;
        }
        data.fill(0);
        if data.len() != 4 || !offset.is_multiple_of(4) {
            tracing::debug!(
                "virtio-mmio read of {} bytes at {offset:#x} ignored",
                data.len()
            );
            return;
        }
        let v = self.read_register(offset);
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_OFFSET {
            lock(&self.device).write_config(offset - CONFIG_OFFSET, data);
            self.config_generation = self.config_generation.wrapping_add(1);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            tracing::debug!(
                "virtio-mmio write of {} bytes at {offset:#x} ignored",
                data.len()
            );
            return;
        };
        if offset.is_multiple_of(4) {
            self.write_register(offset, u32::from_le_bytes(bytes));
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::virtio::{ActivateError, VIRTIO_F_VERSION_1};
    use vm_memory::GuestAddress;

    /// A device that records what the transport tells it.
    #[derive(Default)]
    pub struct DummyDevice {
        pub acked: u64,
        pub activations: usize,
        pub resets: usize,
        pub stopped: Vec<usize>,
        pub config: Vec<u8>,
    }

    impl VirtioDevice for DummyDevice {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn avail_features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | 1
        }
        fn set_acked_features(&mut self, f: u64) {
            self.acked = f;
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            crate::virtio::read_config_bytes(&self.config, offset, data)
        }
        fn write_config(&mut self, _: u64, _: &[u8]) {}
        fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
            assert_eq!(ctx.queues.len(), 2);
            self.activations += 1;
            Ok(())
        }
        fn reset(&mut self) -> bool {
            self.resets += 1;
            true
        }
        fn stop_queue(&mut self, index: usize) {
            self.stopped.push(index);
        }
        fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
            None
        }
        fn save_state(&self) -> crate::persist::VirtioDeviceState {
            crate::persist::VirtioDeviceState::Block {
                acked_features: self.acked,
            }
        }
        fn restore_state(&mut self, s: &crate::persist::VirtioDeviceState) -> Result<(), String> {
            match s {
                crate::persist::VirtioDeviceState::Block { acked_features } => {
                    self.acked = *acked_features;
                    Ok(())
                }
                _ => Err("wrong device".into()),
            }
        }
    }

    fn rd(t: &mut MmioTransport, off: u64) -> u32 {
        let mut d = [0u8; 4];
        t.read(off, &mut d);
        u32::from_le_bytes(d)
    }

    fn wr(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn transport() -> (MmioTransport, Arc<Mutex<DummyDevice>>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let dev = Arc::new(Mutex::new(DummyDevice {
            config: vec![1, 2, 3, 4],
            ..Default::default()
        }));
        let t = MmioTransport::new(dev.clone(), mem, EventFdTrigger::new().unwrap()).unwrap();
        (t, dev)
    }

    /// Drives the transport through the driver initialisation sequence.
    pub(crate) fn init_driver(t: &mut MmioTransport, features: u64) {
        wr(t, 0x70, status::ACKNOWLEDGE);
        wr(t, 0x70, status::ACKNOWLEDGE | status::DRIVER);
        wr(t, 0x24, 0);
        wr(t, 0x20, features as u32);
        wr(t, 0x24, 1);
        wr(t, 0x20, (features >> 32) as u32);
        wr(
            t,
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        for (q, base) in [(0u32, 0x1000u32), (1, 0x4000)] {
            wr(t, 0x30, q);
            wr(t, 0x38, 16);
            wr(t, 0x80, base);
            wr(t, 0x90, base + 0x100);
            wr(t, 0xa0, base + 0x200);
            wr(t, 0x44, 1);
        }
        wr(
            t,
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
    }

    #[test]
    fn identifies_itself() {
        let (mut t, _) = transport();
        assert_eq!(rd(&mut t, 0), MAGIC);
        assert_eq!(rd(&mut t, 4), 2);
        assert_eq!(rd(&mut t, 8), 42);
        wr(&mut t, 0x14, 1);
        assert_eq!(rd(&mut t, 0x10), 1); // VERSION_1 is bit 32
        wr(&mut t, 0x30, 1);
        assert_eq!(rd(&mut t, 0x34), 16);
        wr(&mut t, 0x30, 7);
        assert_eq!(rd(&mut t, 0x34), 0);
        let mut cfg = [0u8; 2];
        t.read(CONFIG_OFFSET + 2, &mut cfg);
        assert_eq!(cfg, [3, 4]);
    }

    #[test]
    fn activates_on_driver_ok_and_resets_on_zero_status() {
        let (mut t, dev) = transport();
        init_driver(&mut t, VIRTIO_F_VERSION_1 | 1);
        assert_eq!(dev.lock().unwrap().activations, 1);
        assert_eq!(dev.lock().unwrap().acked, VIRTIO_F_VERSION_1 | 1);
        wr(&mut t, 0x70, 0);
        assert_eq!(rd(&mut t, 0x70), 0);
        assert_eq!(dev.lock().unwrap().resets, 1);
    }

    #[test]
    fn refuses_features_it_does_not_offer() {
        let (mut t, dev) = transport();
        init_driver(&mut t, VIRTIO_F_VERSION_1 | 2);
        assert_eq!(rd(&mut t, 0x70) & status::FEATURES_OK, 0);
        assert_eq!(dev.lock().unwrap().activations, 0);
    }

    #[test]
    fn queue_outside_memory_is_not_activated() {
        let (mut t, dev) = transport();
        wr(&mut t, 0x70, status::ACKNOWLEDGE | status::DRIVER);
        wr(&mut t, 0x20, 1);
        wr(&mut t, 0x24, 1);
        wr(&mut t, 0x20, 1);
        wr(
            &mut t,
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        wr(&mut t, 0x30, 0);
        wr(&mut t, 0x38, 16);
        wr(&mut t, 0x80, 0xffff_f000);
        wr(&mut t, 0x84, 0x7);
        wr(&mut t, 0x44, 1);
        wr(
            &mut t,
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        assert_eq!(dev.lock().unwrap().activations, 0);
        assert_ne!(rd(&mut t, 0x70) & status::DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn odd_sized_and_unaligned_accesses_are_harmless() {
        let (mut t, _) = transport();
        let mut b = [0xffu8; 2];
        t.read(0x02, &mut b);
        assert_eq!(b, [0, 0]);
        t.write(0x70, &[1]);
        t.write(0x71, &[1, 2, 3, 4]);
        assert_eq!(rd(&mut t, 0x70), 0);
    }

    #[test]
    fn state_round_trips_into_a_new_transport_and_reactivates() {
        let (mut t, _) = transport();
        init_driver(&mut t, VIRTIO_F_VERSION_1 | 1);
        let saved = t.save_state();
        assert!(saved.transport.activated);
        assert_eq!(saved.transport.queues[1].desc_table, 0x4000);
        let (mut t2, dev2) = transport();
        t2.restore_state(&saved).unwrap();
        assert_eq!(dev2.lock().unwrap().activations, 1);
        assert_eq!(dev2.lock().unwrap().acked, VIRTIO_F_VERSION_1 | 1);
        assert_eq!(t2.save_state(), saved);
    }

    #[test]
    fn corrupt_queue_state_is_refused() {
        let (mut t, _) = transport();
        init_driver(&mut t, VIRTIO_F_VERSION_1 | 1);
        let mut saved = t.save_state();
        saved.transport.queues[0].size = 3; // not a power of two
        let (mut t2, dev2) = transport();
        assert!(t2.restore_state(&saved).is_err());
        assert_eq!(dev2.lock().unwrap().activations, 0);
        saved.transport.queues.pop();
        assert!(matches!(
            t2.restore_state(&saved),
            Err(MmioError::QueueCount { .. })
        ));
    }

    #[test]
    fn a_running_queue_can_be_stopped_and_reads_back_zero() {
        let (mut t, dev) = transport();
        init_driver(&mut t, VIRTIO_F_VERSION_1 | 1);
        wr(&mut t, 0x30, 1);
        assert_eq!(rd(&mut t, 0x44), 1);
        wr(&mut t, 0x44, 0);
        assert_eq!(rd(&mut t, 0x44), 0);
        // The running device stopped its own copy of the queue, not just the transport.
        assert_eq!(dev.lock().unwrap().stopped, vec![1]);
        // Re-enabling is still refused while the device runs.
        wr(&mut t, 0x44, 1);
        assert_eq!(rd(&mut t, 0x44), 0);
    }

    #[test]
    fn notify_register_signals_the_queue_event() {
        let (mut t, _) = transport();
        wr(&mut t, NOTIFY_OFFSET, 1);
        wr(&mut t, NOTIFY_OFFSET, 9);
        assert_eq!(t.queue_events()[1].read().unwrap(), 1);
    }
}
