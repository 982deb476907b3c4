//! The virtio-pci transport (virtio 1.x "modern" devices, virtio spec 4.1): a virtio device as a
//! PCI function, over the same [`VirtioTransportCore`] as virtio-mmio.
//!
//! The function has one 32-bit memory BAR (BAR 0, [`BAR_SIZE`] bytes) holding every structure, and
//! vendor-specific capabilities that tell the driver where they are:
//!
//! | BAR 0 offset | structure |
//! |---|---|
//! | `0x0000` | common configuration (features, status, queue selection and set-up, MSI-X vectors) |
//! | `0x1000` | ISR status (read to acknowledge) |
//! | `0x2000` | device-specific configuration |
//! | `0x3000` | queue notifications: queue `n` at `0x3000 + 4n` (the VMM puts ioeventfds there) |
//! | `0x4000` | MSI-X table ([`MSIX_VECTORS`] vectors) |
//! | `0x6000` | MSI-X pending-bit array |
//!
//! Interrupts are MSI-X: vector 0 is meant for configuration changes and vector 1 for every queue,
//! which is what Linux's driver settles on when a device has fewer vectors than queues plus one; the
//! driver may assign them as it likes. While MSI-X is off, the function raises its INTx pin (INTA,
//! level-triggered, routed by the platform's `_PRT`) instead, until the driver reads the ISR.

use std::sync::atomic::{AtomicU16, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::EventFd;

use super::transport::{lock, QueueRing, TransportError, VirtioTransportCore};
use super::{GuestMemoryMmap, VirtioDevice, VirtioInterrupt, INT_CONFIG, INT_VRING};
use crate::interrupt::LevelInterrupt;
use crate::pci::msix::{MsiRouting, MsixError, MsixState, MsixVectors, MSIX_CAPABILITY_ID};
use crate::pci::{
    PciBarKind, PciClassCode, PciConfiguration, PciConfigurationError, PciDevice, PciIdentity,
    PciInterruptPin,
};
use crate::persist::VirtioState;

/// The size of BAR 0.
pub const BAR_SIZE: u64 = 0x8000;
/// Offsets of the structures in BAR 0.
pub const COMMON_CONFIG_OFFSET: u64 = 0x0000;
pub const ISR_OFFSET: u64 = 0x1000;
pub const DEVICE_CONFIG_OFFSET: u64 = 0x2000;
pub const NOTIFY_OFFSET: u64 = 0x3000;
pub const MSIX_TABLE_OFFSET: u64 = 0x4000;
pub const MSIX_PBA_OFFSET: u64 = 0x6000;
/// Bytes between two queues' notification addresses.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
/// MSI-X vectors: one for configuration changes, one for the queues.
pub const MSIX_VECTORS: u16 = 2;
/// "No vector" in the vector registers.
pub const NO_VECTOR: u16 = 0xffff;

const COMMON_CONFIG_LEN: u32 = 0x38;
const ISR_LEN: u32 = 1;
const DEVICE_CONFIG_LEN: u32 = 0x1000;
const VIRTIO_VENDOR_ID: u16 = 0x1af4;
/// Modern virtio-pci device IDs are 0x1040 + the virtio device type.
const DEVICE_ID_BASE: u16 = 0x1040;
const VENDOR_CAPABILITY_ID: u8 = 0x09;

/// Virtio capability types (`cfg_type`).
mod cap_type {
    pub const COMMON: u8 = 1;
    pub const NOTIFY: u8 = 2;
    pub const ISR: u8 = 3;
    pub const DEVICE: u8 = 4;
}

/// Errors making a virtio-pci function.
#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Msix(#[from] MsixError),
    #[error("cannot lay out the PCI configuration space: {0}")]
    Configuration(#[from] PciConfigurationError),
    #[error("saved virtio-pci state has {got} queue vectors for a device with {expected} queues")]
    QueueVectors { expected: usize, got: usize },
}

/// The MSI-X vectors the driver chose, the INTx line and the ISR status: how a virtio-pci device
/// interrupts.
pub struct PciInterrupt {
    isr: AtomicU32,
    msix: Arc<Mutex<MsixVectors>>,
    config_vector: AtomicU16,
    queue_vectors: Vec<AtomicU16>,
    intx: Arc<dyn LevelInterrupt>,
}

impl PciInterrupt {
    /// Raises MSI-X `vector`, or the INTx line while MSI-X is off.
    fn raise(&self, vector: u16) {
        let mut msix = self.msix.lock().unwrap_or_else(|e| e.into_inner());
        if !msix.enabled() {
            drop(msix);
            self.intx.set_level(true);
        } else if vector != NO_VECTOR {
            msix.trigger(vector);
        }
    }

    fn reset_vectors(&self) {
        self.config_vector.store(NO_VECTOR, Ordering::SeqCst);
        for v in &self.queue_vectors {
            v.store(NO_VECTOR, Ordering::SeqCst);
        }
    }
}

impl VirtioInterrupt for PciInterrupt {
    fn signal_used_queue(&self, queue: usize) {
        self.isr.fetch_or(INT_VRING, Ordering::SeqCst);
        if let Some(vector) = self.queue_vectors.get(queue) {
            self.raise(vector.load(Ordering::SeqCst));
        }
    }

    fn signal_config_change(&self) {
        self.isr.fetch_or(INT_CONFIG, Ordering::SeqCst);
        self.raise(self.config_vector.load(Ordering::SeqCst));
    }

    fn status(&self) -> u32 {
        self.isr.load(Ordering::SeqCst)
    }

    fn ack(&self, bits: u32) {
        if self.isr.fetch_and(!bits, Ordering::SeqCst) & !bits == 0 {
            self.intx.set_level(false);
        }
    }
}

/// The virtio-pci function's own state beside the common transport's, for snapshots.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioPciState {
    pub config_space: Vec<u8>,
    pub msix: MsixState,
    pub config_vector: u16,
    pub queue_vectors: Vec<u16>,
}

/// A virtio device as a PCI function.
pub struct VirtioPciDevice {
    core: VirtioTransportCore,
    configuration: PciConfiguration,
    interrupt: Arc<PciInterrupt>,
    msix: Arc<Mutex<MsixVectors>>,
    /// Offset of the MSI-X capability in the configuration space.
    msix_capability: usize,
}

impl VirtioPciDevice {
    /// Wraps `device`; its MSI-X vectors are routed through `routing`, its INTx pin is `intx`.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        memory: GuestMemoryMmap,
        routing: Arc<dyn MsiRouting>,
        intx: Arc<dyn LevelInterrupt>,
    ) -> Result<Self, VirtioPciError> {
        let (device_type, queues) = {
            let d = lock(&device);
            (d.device_type(), d.queue_max_sizes().len())
        };
        let msix = Arc::new(Mutex::new(MsixVectors::new(MSIX_VECTORS, routing)?));
        let interrupt = Arc::new(PciInterrupt {
            isr: AtomicU32::new(0),
            msix: msix.clone(),
            config_vector: AtomicU16::new(NO_VECTOR),
            queue_vectors: (0..queues).map(|_| AtomicU16::new(NO_VECTOR)).collect(),
            intx,
        });
        let core = VirtioTransportCore::new(device, memory, interrupt.clone())?;
        let mut configuration = PciConfiguration::new(&PciIdentity {
            vendor_id: VIRTIO_VENDOR_ID,
            device_id: DEVICE_ID_BASE + device_type as u16,
            revision: 1,
            class_code: class_code(device_type),
            subsystem_vendor_id: VIRTIO_VENDOR_ID,
            subsystem_id: 0x40,
        });
        configuration.set_interrupt_pin(PciInterruptPin::IntA);
        configuration.add_bar(
            0,
            BAR_SIZE,
            PciBarKind::Memory32 {
                prefetchable: false,
            },
        )?;
        let msix_capability = {
            let vectors = msix.lock().unwrap_or_else(|e| e.into_inner());
            let body = vectors.capability_body(0, MSIX_TABLE_OFFSET as u32, MSIX_PBA_OFFSET as u32);
            configuration.add_capability_with_writable_mask(
                MSIX_CAPABILITY_ID,
                &body,
                &MsixVectors::capability_writable_mask(),
            )?
        };
        let structures = [
            (cap_type::COMMON, COMMON_CONFIG_OFFSET, COMMON_CONFIG_LEN),
            (cap_type::ISR, ISR_OFFSET, ISR_LEN),
            (cap_type::DEVICE, DEVICE_CONFIG_OFFSET, DEVICE_CONFIG_LEN),
        ];
        for (kind, offset, length) in structures {
            configuration
                .add_capability(VENDOR_CAPABILITY_ID, &virtio_cap(kind, offset, length))?;
        }
        let mut notify = virtio_cap(
            cap_type::NOTIFY,
            NOTIFY_OFFSET,
            queues as u32 * NOTIFY_OFF_MULTIPLIER,
        )
        .to_vec();
        notify[0] += 4;
        notify.extend_from_slice(&NOTIFY_OFF_MULTIPLIER.to_le_bytes());
        configuration.add_capability(VENDOR_CAPABILITY_ID, &notify)?;
        Ok(Self {
            core,
            configuration,
            interrupt,
            msix,
            msix_capability,
        })
    }

    /// The per-queue notification eventfds: the VMM registers queue `n`'s as an ioeventfd at
    /// `BAR 0 + NOTIFY_OFFSET + n * NOTIFY_OFF_MULTIPLIER`.
    pub fn queue_events(&self) -> &[EventFd] {
        self.core.queue_events()
    }

    /// The MSI-X vectors' eventfds, for the VMM to register as irqfds.
    pub fn msix_eventfds(&self) -> Vec<EventFd> {
        let vectors = self.msix.lock().unwrap_or_else(|e| e.into_inner());
        vectors
            .eventfds()
            .iter()
            .filter_map(|e| e.try_clone().ok())
            .collect()
    }

    /// The virtio device status register.
    pub fn device_status(&self) -> u32 {
        self.core.device_status()
    }

    /// The common transport's and the device's state.
    pub fn save_state(&self) -> VirtioState {
        self.core.save_state()
    }

    /// The PCI side: configuration space, MSI-X and the vectors the driver chose.
    pub fn save_pci_state(&self) -> VirtioPciState {
        VirtioPciState {
            config_space: self.configuration.state().bytes,
            msix: self.msix.lock().unwrap_or_else(|e| e.into_inner()).state(),
            config_vector: self.interrupt.config_vector.load(Ordering::SeqCst),
            queue_vectors: self
                .interrupt
                .queue_vectors
                .iter()
                .map(|v| v.load(Ordering::SeqCst))
                .collect(),
        }
    }

    /// Loads both states: the PCI side first (so that re-raised interrupts find their vectors),
    /// then the transport, which re-activates a running device.
    pub fn restore_state(
        &mut self,
        pci: &VirtioPciState,
        virtio: &VirtioState,
    ) -> Result<(), VirtioPciError> {
        if pci.queue_vectors.len() != self.interrupt.queue_vectors.len() {
            return Err(VirtioPciError::QueueVectors {
                expected: self.interrupt.queue_vectors.len(),
                got: pci.queue_vectors.len(),
            });
        }
        self.configuration
            .restore_state(&crate::pci::PciConfigurationState {
                bytes: pci.config_space.clone(),
            })?;
        self.msix
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .restore_state(&pci.msix)?;
        self.interrupt
            .config_vector
            .store(pci.config_vector, Ordering::SeqCst);
        for (slot, value) in self.interrupt.queue_vectors.iter().zip(&pci.queue_vectors) {
            slot.store(*value, Ordering::SeqCst);
        }
        self.core.restore_state(virtio)?;
        Ok(())
    }

    /// A vector register write: the vector if the table has it, else "no vector".
    fn checked_vector(value: u16) -> u16 {
        if value < MSIX_VECTORS {
            value
        } else {
            NO_VECTOR
        }
    }

    fn selected_queue_vector(&self) -> Option<&AtomicU16> {
        self.interrupt
            .queue_vectors
            .get(self.core.queue_sel as usize)
    }

    fn read_common(&self, register: u64) -> u64 {
        let core = &self.core;
        let queue = core.selected_queue();
        match register {
            0x00 => u64::from(core.device_features_sel),
            0x04 => u64::from(core.device_features_word()),
            0x08 => u64::from(core.driver_features_sel),
            0x0c => u64::from(core.driver_features_word()),
            0x10 => u64::from(self.interrupt.config_vector.load(Ordering::SeqCst)),
            0x12 => core.queue_count() as u64,
            0x14 => u64::from(core.device_status() as u8),
            0x15 => u64::from(core.config_generation() as u8),
            0x16 => u64::from(core.queue_sel),
            0x18 => queue.map_or(0, |q| u64::from(q.size())),
            0x1a => self
                .selected_queue_vector()
                .map_or(u64::from(NO_VECTOR), |v| {
                    u64::from(v.load(Ordering::SeqCst))
                }),
            0x1c => queue.map_or(0, |q| u64::from(q.ready())),
            0x1e => u64::from(core.queue_sel),
            0x20 => queue.map_or(0, |q| q.desc_table()),
            0x28 => queue.map_or(0, |q| q.avail_ring()),
            0x30 => queue.map_or(0, |q| q.used_ring()),
            _ => 0,
        }
    }

    fn write_common(&mut self, register: u64, width: usize, value: u64) {
        let core = &mut self.core;
        match register {
            0x00 => core.device_features_sel = value as u32,
            0x08 => core.driver_features_sel = value as u32,
            0x0c => core.set_driver_features_word(value as u32),
            0x10 => self
                .interrupt
                .config_vector
                .store(Self::checked_vector(value as u16), Ordering::SeqCst),
            0x14 => {
                if value == 0 {
                    self.interrupt.reset_vectors();
                }
                self.core.set_status(value as u32);
            }
            0x16 => core.queue_sel = value as u32,
            0x18 => core.set_queue_size(value as u16),
            0x1a => {
                if let Some(v) = self.selected_queue_vector() {
                    v.store(Self::checked_vector(value as u16), Ordering::SeqCst);
                }
            }
            0x1c => core.set_queue_ready(value == 1),
            0x20 | 0x24 | 0x28 | 0x2c | 0x30 | 0x34 => {
                let ring = match register & !0x7 {
                    0x20 => QueueRing::Descriptors,
                    0x28 => QueueRing::Available,
                    _ => QueueRing::Used,
                };
                let (low, high) = match (register & 4, width) {
                    (0, 8) => (Some(value as u32), Some((value >> 32) as u32)),
                    (0, _) => (Some(value as u32), None),
                    _ => (None, Some(value as u32)),
                };
                core.set_queue_address(ring, low, high);
            }
            _ => tracing::debug!("ignored virtio-pci common config write at {register:#x}"),
        }
    }

    /// The register a common configuration access at `offset` of `len` bytes addresses, if it
    /// addresses exactly one register (or one half of a 64-bit one).
    fn common_register(offset: u64, len: usize) -> Option<u64> {
        let (register, width) = match offset {
            0x00..=0x0f => (offset & !3, 4),
            0x10..=0x13 | 0x16..=0x1f => (offset & !1, 2),
            0x14 | 0x15 => (offset, 1),
            0x20..=0x37 => (offset & !3, if len == 8 { 8 } else { 4 }),
            _ => return None,
        };
        (register == offset && len == width).then_some(register)
    }
}

/// A virtio capability's body after the ID and next pointer: length, type, BAR, ID, padding,
/// offset and length in the BAR.
fn virtio_cap(kind: u8, offset: u64, length: u32) -> [u8; 14] {
    let mut body = [0u8; 14];
    body[0] = 16; // cap_len, counting the ID and next pointer
    body[1] = kind;
    body[2] = 0; // BAR 0
    body[6..10].copy_from_slice(&(offset as u32).to_le_bytes());
    body[10..14].copy_from_slice(&length.to_le_bytes());
    body
}

fn class_code(device_type: u32) -> PciClassCode {
    let (class, subclass) = match device_type {
        1 => (0x02, 0x00), // network controller
        2 => (0x01, 0x00), // mass storage (SCSI), as QEMU's virtio-blk
        _ => (0xff, 0x00),
    };
    PciClassCode {
        class,
        subclass,
        prog_if: 0,
    }
}

impl PciDevice for VirtioPciDevice {
    fn configuration(&self) -> &PciConfiguration {
        &self.configuration
    }

    fn configuration_mut(&mut self) -> &mut PciConfiguration {
        &mut self.configuration
    }

    fn config_write(&mut self, reg: usize, data: &[u8]) {
        self.configuration.write(reg, data);
        let control = self.msix_capability + 2;
        if reg < control + 2 && reg + data.len() > control {
            let mut word = [0u8; 2];
            self.configuration.read(control, &mut word);
            let mut msix = self.msix.lock().unwrap_or_else(|e| e.into_inner());
            msix.set_control(u16::from_le_bytes(word));
            if msix.enabled() {
                // Interrupts now go through MSI-X only.
                self.interrupt.intx.set_level(false);
            }
        }
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if bar != 0 {
            return;
        }
        match offset {
            COMMON_CONFIG_OFFSET..ISR_OFFSET => {
                if let Some(register) = Self::common_register(offset, data.len()) {
                    let value = self.read_common(register).to_le_bytes();
                    data.copy_from_slice(&value[..data.len()]);
                }
            }
            ISR_OFFSET => {
                // Reading the ISR acknowledges it.
                let isr = self.interrupt.status();
                self.interrupt.ack(isr);
                data[0] = isr as u8;
            }
            DEVICE_CONFIG_OFFSET..NOTIFY_OFFSET => {
                self.core.read_config(offset - DEVICE_CONFIG_OFFSET, data)
            }
            MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET => self
                .msix
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .read_table(offset - MSIX_TABLE_OFFSET, data),
            MSIX_PBA_OFFSET..BAR_SIZE => self
                .msix
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .read_pba(offset - MSIX_PBA_OFFSET, data),
            _ => {}
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar != 0 {
            return;
        }
        match offset {
            COMMON_CONFIG_OFFSET..ISR_OFFSET => {
                if let Some(register) = Self::common_register(offset, data.len()) {
                    let mut value = [0u8; 8];
                    value[..data.len()].copy_from_slice(data);
                    self.write_common(register, data.len(), u64::from_le_bytes(value));
                }
            }
            DEVICE_CONFIG_OFFSET..NOTIFY_OFFSET => {
                self.core.write_config(offset - DEVICE_CONFIG_OFFSET, data)
            }
            // Normally caught by the ioeventfds in the kernel; handled here otherwise.
            NOTIFY_OFFSET..MSIX_TABLE_OFFSET => {
                let queue = (offset - NOTIFY_OFFSET) / u64::from(NOTIFY_OFF_MULTIPLIER);
                self.core.notify(queue as usize);
            }
            MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET => self
                .msix
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .write_table(offset - MSIX_TABLE_OFFSET, data),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::pci::msix::tests::Routes;
    use crate::virtio::mmio::tests::DummyDevice;
    use crate::virtio::status;

    /// An INTx line that remembers its level.
    #[derive(Default)]
    struct Line(std::sync::atomic::AtomicBool);

    impl LevelInterrupt for Line {
        fn set_level(&self, asserted: bool) {
            self.0.store(asserted, Ordering::SeqCst);
        }
    }

    fn device() -> (VirtioPciDevice, Arc<Mutex<DummyDevice>>, GuestMemoryMmap) {
        let (pci, dummy, memory, _) = device_with_line();
        (pci, dummy, memory)
    }

    fn device_with_line() -> (
        VirtioPciDevice,
        Arc<Mutex<DummyDevice>>,
        GuestMemoryMmap,
        Arc<Line>,
    ) {
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let dummy = Arc::new(Mutex::new(DummyDevice {
            config: vec![1, 2, 3, 4],
            ..Default::default()
        }));
        let line = Arc::new(Line::default());
        let pci = VirtioPciDevice::new(
            dummy.clone(),
            memory.clone(),
            Arc::new(Routes::default()),
            line.clone(),
        )
        .unwrap();
        (pci, dummy, memory, line)
    }

    fn read(d: &mut VirtioPciDevice, offset: u64, len: usize) -> u64 {
        let mut data = [0u8; 8];
        d.bar_read(0, offset, &mut data[..len]);
        u64::from_le_bytes(data)
    }

    fn write(d: &mut VirtioPciDevice, offset: u64, len: usize, value: u64) {
        d.bar_write(0, offset, &value.to_le_bytes()[..len]);
    }

    /// The virtio capabilities: (cfg_type, offset, length), following the capability list.
    fn virtio_caps(d: &VirtioPciDevice) -> Vec<(u8, u32, u32)> {
        let config = d.configuration();
        let mut byte = [0u8; 1];
        config.read(0x34, &mut byte);
        let mut at = byte[0] as usize;
        let mut caps = Vec::new();
        while at != 0 {
            let mut cap = [0u8; 16];
            config.read(at, &mut cap);
            if cap[0] == VENDOR_CAPABILITY_ID {
                let offset = u32::from_le_bytes(cap[8..12].try_into().unwrap());
                let length = u32::from_le_bytes(cap[12..16].try_into().unwrap());
                caps.push((cap[3], offset, length));
            }
            at = cap[1] as usize;
        }
        caps
    }

    #[test]
    fn the_capabilities_point_at_every_structure_in_bar_0() {
        let (d, _, _) = device();
        let mut ids = [0u8; 4];
        d.configuration().read(0, &mut ids);
        assert_eq!(u16::from_le_bytes([ids[0], ids[1]]), 0x1af4);
        assert_eq!(u16::from_le_bytes([ids[2], ids[3]]), 0x1040 + 42);
        let caps = virtio_caps(&d);
        assert!(caps.contains(&(cap_type::COMMON, 0, COMMON_CONFIG_LEN)));
        assert!(caps.contains(&(cap_type::ISR, 0x1000, 1)));
        assert!(caps.contains(&(cap_type::DEVICE, 0x2000, DEVICE_CONFIG_LEN)));
        assert!(caps.contains(&(cap_type::NOTIFY, 0x3000, 8)));
        assert_eq!(d.configuration().bar(0).unwrap().size, BAR_SIZE);
    }

    #[test]
    fn a_driver_sets_up_a_queue_and_activates_the_device() {
        let (mut d, dummy, _) = device();
        write(
            &mut d,
            0x14,
            1,
            u64::from(status::ACKNOWLEDGE | status::DRIVER),
        );
        write(&mut d, 0x00, 4, 1);
        assert_eq!(read(&mut d, 0x04, 4), 1, "VERSION_1 in the upper word");
        write(&mut d, 0x08, 4, 1);
        write(&mut d, 0x0c, 4, 1);
        write(
            &mut d,
            0x14,
            1,
            u64::from(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK),
        );
        assert_ne!(read(&mut d, 0x14, 1) & u64::from(status::FEATURES_OK), 0);
        assert_eq!(read(&mut d, 0x12, 2), 2, "two queues");
        for queue in 0..2u64 {
            write(&mut d, 0x16, 2, queue);
            assert_eq!(read(&mut d, 0x18, 2), 16);
            write(&mut d, 0x18, 2, 8);
            write(&mut d, 0x1a, 2, 1);
            assert_eq!(read(&mut d, 0x1a, 2), 1);
            write(&mut d, 0x20, 8, 0x1000 * (queue + 1));
            write(&mut d, 0x28, 4, 0x8000 + 0x1000 * queue);
            write(&mut d, 0x2c, 4, 0);
            write(&mut d, 0x30, 8, 0x20000 + 0x1000 * queue);
            write(&mut d, 0x1c, 2, 1);
            assert_eq!(read(&mut d, 0x1e, 2), queue, "notify offset");
        }
        write(&mut d, 0x16, 2, 1);
        assert_eq!(read(&mut d, 0x20, 8), 0x2000);
        assert_eq!(read(&mut d, 0x28, 4), 0x9000);
        // A vector the table does not have reads back as "no vector".
        write(&mut d, 0x10, 2, 9);
        assert_eq!(read(&mut d, 0x10, 2), u64::from(NO_VECTOR));
        write(&mut d, 0x14, 1, 0xf);
        assert_eq!(dummy.lock().unwrap().activations, 1);
        assert_eq!(dummy.lock().unwrap().acked, 1 << 32);
        // Reset: status 0, vectors forgotten.
        write(&mut d, 0x14, 1, 0);
        assert_eq!(dummy.lock().unwrap().resets, 1);
        write(&mut d, 0x16, 2, 0);
        assert_eq!(read(&mut d, 0x1a, 2), u64::from(NO_VECTOR));
    }

    #[test]
    fn queue_interrupts_go_to_the_queue_vector_and_the_isr_clears_on_read() {
        let (mut d, _, _) = device();
        // Program MSI-X vector 1 and enable MSI-X through the capability.
        write(&mut d, MSIX_TABLE_OFFSET + 16, 8, 0xfee0_0000);
        write(&mut d, MSIX_TABLE_OFFSET + 24, 4, 0x31);
        write(&mut d, MSIX_TABLE_OFFSET + 28, 4, 0);
        let control = d.msix_capability + 2;
        d.config_write(control, &(1u16 << 15).to_le_bytes());
        write(&mut d, 0x16, 2, 1);
        write(&mut d, 0x1a, 2, 1);
        let fds = d.msix_eventfds();
        d.interrupt.signal_used_queue(1);
        assert_eq!(fds[1].read().unwrap(), 1);
        assert!(fds[0].read().is_err(), "vector 0 is not the queue's");
        assert_eq!(read(&mut d, ISR_OFFSET, 1), u64::from(INT_VRING));
        assert_eq!(read(&mut d, ISR_OFFSET, 1), 0);
    }

    #[test]
    fn without_msix_the_intx_line_is_up_until_the_isr_is_read() {
        let (mut d, _, _, line) = device_with_line();
        let mut pin = [0u8; 1];
        d.configuration().read(0x3d, &mut pin);
        assert_eq!(pin[0], 1, "INTA");
        d.interrupt.signal_used_queue(0);
        assert!(line.0.load(Ordering::SeqCst));
        assert_eq!(read(&mut d, ISR_OFFSET, 1), u64::from(INT_VRING));
        assert!(
            !line.0.load(Ordering::SeqCst),
            "reading the ISR lowers the line"
        );
        // Enabling MSI-X lowers a raised line and takes over.
        d.interrupt.signal_config_change();
        assert!(line.0.load(Ordering::SeqCst));
        let control = d.msix_capability + 2;
        d.config_write(control, &(1u16 << 15).to_le_bytes());
        assert!(!line.0.load(Ordering::SeqCst));
        d.interrupt.signal_used_queue(0);
        assert!(!line.0.load(Ordering::SeqCst));
    }

    #[test]
    fn notify_writes_signal_the_queue_and_config_space_is_the_devices() {
        let (mut d, _, _) = device();
        write(&mut d, NOTIFY_OFFSET + 4, 2, 1);
        assert_eq!(d.queue_events()[1].read().unwrap(), 1);
        assert_eq!(read(&mut d, DEVICE_CONFIG_OFFSET + 1, 2), 0x0302);
    }

    #[test]
    fn odd_accesses_are_ignored_and_read_zero() {
        let (mut d, _, _) = device();
        assert_eq!(read(&mut d, 0x01, 2), 0);
        assert_eq!(read(&mut d, 0x14, 2), 0);
        write(&mut d, 0x16, 4, 1);
        assert_eq!(read(&mut d, 0x16, 2), 0);
        d.bar_write(1, 0, &[1]);
        assert_eq!(read(&mut d, BAR_SIZE + 8, 4), 0);
    }

    #[test]
    fn pci_state_round_trips_into_a_new_function() {
        let (mut d, _, memory) = device();
        write(&mut d, MSIX_TABLE_OFFSET, 8, 0xfee0_1000);
        write(&mut d, 0x10, 2, 0);
        write(&mut d, 0x16, 2, 1);
        write(&mut d, 0x1a, 2, 1);
        d.configuration_mut()
            .write(0x10, &0xc000_0000u32.to_le_bytes());
        let (pci, virtio) = (d.save_pci_state(), d.save_state());
        memory.write_obj(0u8, GuestAddress(0)).unwrap();
        let (mut fresh, _, _) = device();
        fresh.restore_state(&pci, &virtio).unwrap();
        assert_eq!(fresh.save_pci_state(), pci);
        assert_eq!(fresh.configuration().bar_address(0), Some(0xc000_0000));
        let mut bad = pci.clone();
        bad.queue_vectors.pop();
        assert!(matches!(
            fresh.restore_state(&bad, &virtio),
            Err(VirtioPciError::QueueVectors { .. })
        ));
    }
}
