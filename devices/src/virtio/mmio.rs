//! The virtio-mmio transport (virtio 1.x, "version 2" register layout).

use std::sync::{Arc, Mutex};

use virtio_queue::QueueT;
use vmm_sys_util::eventfd::EventFd;

use super::transport::{QueueRing, TransportError, VirtioTransportCore};
use super::{GuestMemoryMmap, LineInterrupt, VirtioDevice};
use crate::bus::BusDevice;
use crate::interrupt::EventFdTrigger;
use crate::persist::VirtioState;

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
    core: VirtioTransportCore,
    /// The same interrupt as the core's, as the line it is (for the VMM's irqfd).
    line: Arc<LineInterrupt>,
}

impl MmioTransport {
    /// Wraps `device`, raising interrupts through `irq`.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        memory: GuestMemoryMmap,
        irq: EventFdTrigger,
    ) -> Result<Self, TransportError> {
        let line = Arc::new(LineInterrupt::new(irq));
        Ok(Self {
            core: VirtioTransportCore::new(device, memory, line.clone())?,
            line,
        })
    }

    /// The per-queue notification eventfds, for the VMM to register as ioeventfds on
    /// `base + NOTIFY_OFFSET` with the queue index as data match.
    pub fn queue_events(&self) -> &[EventFd] {
        self.core.queue_events()
    }

    /// The device's interrupt line.
    pub fn interrupt(&self) -> &Arc<LineInterrupt> {
        &self.line
    }

    /// The virtio device status register.
    pub fn device_status(&self) -> u32 {
        self.core.device_status()
    }

    /// The transport's and device's state (see [`VirtioTransportCore::save_state`]).
    pub fn save_state(&self) -> VirtioState {
        self.core.save_state()
    }

    /// Loads a saved state (see [`VirtioTransportCore::restore_state`]).
    pub fn restore_state(&mut self, state: &VirtioState) -> Result<(), TransportError> {
        self.core.restore_state(state)
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        let core = &self.core;
        match offset {
            0x00 => MAGIC,
            0x04 => VERSION,
            0x08 => core.device().device_type(),
            0x0c => VENDOR_ID,
            0x10 => core.device_features_word(),
            0x34 => core.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            0x44 => core.selected_queue().map_or(0, |q| u32::from(q.ready())),
            0x60 => core.interrupt().status(),
            0x70 => core.device_status(),
            0xfc => core.config_generation(),
            _ => {
                tracing::debug!("virtio-mmio read of unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        let core = &mut self.core;
        match offset {
            0x14 => core.device_features_sel = value,
            0x20 => core.set_driver_features_word(value),
            0x24 => core.driver_features_sel = value,
            0x30 => core.queue_sel = value,
            0x38 => core.set_queue_size(value as u16),
            0x44 => core.set_queue_ready(value == 1),
            // Normally caught by the ioeventfd in the kernel; handled here otherwise.
            0x50 => core.notify(value as usize),
            0x64 => core.interrupt().ack(value),
            0x70 => core.set_status(value),
            0x80 | 0x84 | 0x90 | 0x94 | 0xa0 | 0xa4 => {
                let (low, high) = if offset & 4 == 0 {
                    (Some(value), None)
                } else {
                    (None, Some(value))
                };
                let ring = match offset & !4 {
                    0x80 => QueueRing::Descriptors,
                    0x90 => QueueRing::Available,
                    _ => QueueRing::Used,
                };
                core.set_queue_address(ring, low, high);
            }
            _ => tracing::debug!("ignored virtio-mmio write of {value:#x} to register {offset:#x}"),
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            self.core.read_config(offset - CONFIG_OFFSET, data);
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
            self.core.write_config(offset - CONFIG_OFFSET, data);
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
    use crate::virtio::{status, ActivateContext, ActivateError, VIRTIO_F_VERSION_1};
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
            Err(TransportError::QueueCount { .. })
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
