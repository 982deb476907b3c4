//! Bus 0 of a PCI root complex, and the two ways a guest reaches its configuration spaces.
//!
//! [`PciRoot`] holds the functions of bus 0, starting with a q35 host bridge at 00:00.0 (OVMF reads
//! its device ID to recognise the q35 platform). Guests reach them through two bus devices that
//! share the root:
//!
//! - [`PciConfigIo`], the legacy mechanism at ports `0xCF8..0xD00`: the guest writes a
//!   CONFIG_ADDRESS dword at `0xCF8` (bit 31 enable, bus 23:16, device 15:11, function 10:8,
//!   register 7:2) and then reads or writes the selected dword through `0xCFC..0xD00`. It reaches
//!   the first 256 bytes of each function.
//! - [`PciEcam`], the memory-mapped ECAM ("MMCONFIG") window: offset
//!   `bus << 20 | device << 15 | function << 12 | register` reaches all 4 KiB of each function.
//!
//! Accesses must be 1, 2 or 4 bytes; other lengths, absent functions, buses other than 0 and a
//! CONFIG_ADDRESS without its enable bit read as all-ones, and writes to them are ignored.

use std::sync::{Arc, Mutex};

use super::configuration::{
    BarReprogrammed, PciBarKind, BAR_COUNT, COMMAND_MEMORY_SPACE, CONFIG_SPACE_SIZE,
};
use super::q35::PciHostBridge;
use super::{
    is_config_access_len, lock, PciAddress, PciDevice, DEVICES_PER_BUS, FUNCTIONS_PER_DEVICE,
};
use crate::bus::BusDevice;
use crate::guest_exit::{GuestExitEvent, GuestExitRequest};

/// A PCI function shared between the root and its owner.
pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

/// Errors from placing a function on the root bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciRootError {
    /// Only bus 0 exists.
    #[error("PCI function {address} is not on bus 0, the only bus of the root complex")]
    NotOnRootBus { address: PciAddress },
    /// Another function already has this address.
    #[error("PCI address {address} is already taken")]
    AddressInUse { address: PciAddress },
}

/// Told when the guest moves a BAR (the VMM moves what it placed at the old address, such as the
/// ioeventfds of a virtio-pci function's queue notifications).
pub trait BarObserver: Send + Sync {
    /// BAR `moved.index` of the function at `address` now holds `moved.new`.
    fn bar_moved(&self, address: PciAddress, moved: BarReprogrammed);
}

/// Bus 0 of the root complex: up to 32 devices of 8 functions each.
pub struct PciRoot {
    /// The functions, indexed by `device * 8 + function`.
    functions: Vec<Option<SharedPciDevice>>,
    bar_observer: Option<Arc<dyn BarObserver>>,
}

impl Default for PciRoot {
    fn default() -> Self {
        Self::new()
    }
}

impl PciRoot {
    /// The address of the host bridge.
    pub const HOST_BRIDGE_ADDRESS: PciAddress = PciAddress {
        bus: 0,
        device: 0,
        function: 0,
    };

    /// Bus 0 holding only the q35 host bridge at 00:00.0.
    pub fn new() -> Self {
        let slots = usize::from(DEVICES_PER_BUS) * usize::from(FUNCTIONS_PER_DEVICE);
        let mut functions: Vec<Option<SharedPciDevice>> = vec![None; slots];
        functions[0] = Some(Arc::new(Mutex::new(PciHostBridge::q35())));
        Self {
            functions,
            bar_observer: None,
        }
    }

    /// Tells `observer` of every BAR the guest moves from now on.
    pub fn set_bar_observer(&mut self, observer: Arc<dyn BarObserver>) {
        self.bar_observer = Some(observer);
    }

    /// The function whose enabled memory BAR holds guest address `addr`: the function, the BAR's
    /// index and the offset into it.
    pub fn memory_bar_at(&self, addr: u64) -> Option<(SharedPciDevice, usize, u64)> {
        for function in self.functions.iter().flatten() {
            let device = lock(function);
            let config = device.configuration();
            if config.command() & COMMAND_MEMORY_SPACE == 0 {
                continue;
            }
            for index in 0..BAR_COUNT {
                let (Some(bar), Some(base)) = (config.bar(index), config.bar_address(index)) else {
                    continue;
                };
                if matches!(bar.kind, PciBarKind::Io) {
                    continue;
                }
                if (base..base.saturating_add(bar.size)).contains(&addr) {
                    drop(device);
                    return Some((function.clone(), index, addr - base));
                }
            }
        }
        None
    }

    /// Places `device` at `address` (on bus 0). Function 0 of a device with several functions gets
    /// the multi-function bit, so that the guest looks for the others.
    pub fn add_device(
        &mut self,
        address: PciAddress,
        device: SharedPciDevice,
    ) -> Result<(), PciRootError> {
        if address.bus() != 0 {
            return Err(PciRootError::NotOnRootBus { address });
        }
        let slot = &mut self.functions[slot_index(address)];
        if slot.is_some() {
            return Err(PciRootError::AddressInUse { address });
        }
        *slot = Some(device);
        let first = usize::from(address.device()) * usize::from(FUNCTIONS_PER_DEVICE);
        let functions = &self.functions[first..first + usize::from(FUNCTIONS_PER_DEVICE)];
        if functions.iter().flatten().count() > 1 {
            if let Some(function0) = &functions[0] {
                lock(function0).configuration_mut().set_multi_function(true);
            }
        }
        Ok(())
    }

    /// The function at `address`, if there is one.
    pub fn device(&self, address: PciAddress) -> Option<SharedPciDevice> {
        self.function(address).cloned()
    }

    /// Reads `data.len()` bytes at `reg` of `address`'s configuration space; all-ones where there
    /// is nothing to read (see the module documentation).
    pub fn config_read(&self, address: PciAddress, reg: usize, data: &mut [u8]) {
        data.fill(0xff);
        if !is_config_access_len(data.len()) {
            return;
        }
        let Some(function) = self.function(address) else {
            return;
        };
        let in_space = data.len().min(CONFIG_SPACE_SIZE.saturating_sub(reg));
        if in_space > 0 {
            lock(function).config_read(reg, &mut data[..in_space]);
        }
    }

    /// Writes `data` at `reg` of `address`'s configuration space; ignored where there is nothing
    /// to write.
    pub fn config_write(&self, address: PciAddress, reg: usize, data: &[u8]) {
        if !is_config_access_len(data.len()) {
            return;
        }
        let Some(function) = self.function(address) else {
            return;
        };
        let in_space = data.len().min(CONFIG_SPACE_SIZE.saturating_sub(reg));
        if in_space > 0 {
            let mut device = lock(function);
            device.config_write(reg, &data[..in_space]);
            if let Some(observer) = &self.bar_observer {
                for moved in device.configuration_mut().take_bar_reprogrammings() {
                    observer.bar_moved(address, moved);
                }
            }
        }
    }

    /// Drains the BAR reprogrammings of every function, in address order.
    pub fn take_bar_reprogrammings(&self) -> Vec<(PciAddress, BarReprogrammed)> {
        let mut reprogrammings = Vec::new();
        for (index, function) in self.functions.iter().enumerate() {
            let Some(function) = function else { continue };
            let address = PciAddress::from_masked(
                0,
                (index / usize::from(FUNCTIONS_PER_DEVICE)) as u8,
                (index % usize::from(FUNCTIONS_PER_DEVICE)) as u8,
            );
            let drained = lock(function).configuration_mut().take_bar_reprogrammings();
            reprogrammings.extend(drained.into_iter().map(|bar| (address, bar)));
        }
        reprogrammings
    }

    fn function(&self, address: PciAddress) -> Option<&SharedPciDevice> {
        if address.bus() != 0 {
            return None;
        }
        self.functions.get(slot_index(address))?.as_ref()
    }
}

fn slot_index(address: PciAddress) -> usize {
    usize::from(address.device()) * usize::from(FUNCTIONS_PER_DEVICE)
        + usize::from(address.function())
}

/// The legacy configuration mechanism at I/O ports [`BASE`](Self::BASE)`..+`[`LEN`](Self::LEN):
/// CONFIG_ADDRESS at offset 0 and the data window at offsets 4 to 8. On q35 the byte at `0xCF9`
/// inside CONFIG_ADDRESS is the chipset's reset control register instead (a byte write with
/// `RST_CPU`, bit 2, resets the machine), which [`PciConfigIo::with_reset_control`] adds.
pub struct PciConfigIo {
    root: Arc<Mutex<PciRoot>>,
    config_address: u32,
    reset: Option<Arc<GuestExitEvent>>,
}

impl PciConfigIo {
    /// I/O port of CONFIG_ADDRESS.
    pub const BASE: u64 = 0xcf8;
    /// Length of the port range (CONFIG_ADDRESS and CONFIG_DATA).
    pub const LEN: u64 = 8;
    /// Offset of the data window (port `0xCFC`).
    const DATA_WINDOW: u64 = 4;
    const ENABLE: u32 = 1 << 31;

    /// Offset of q35's reset control register (port `0xCF9`).
    const RESET_CONTROL: u64 = 1;
    /// RST_CPU in the reset control register.
    const RST_CPU: u8 = 1 << 2;

    /// The mechanism over `root`, with CONFIG_ADDRESS clear.
    pub fn new(root: Arc<Mutex<PciRoot>>) -> Self {
        Self {
            root,
            config_address: 0,
            reset: None,
        }
    }

    /// Adds q35's reset control register at `0xCF9`, sending resets to `exit`.
    pub fn with_reset_control(mut self, exit: Arc<GuestExitEvent>) -> Self {
        self.reset = Some(exit);
        self
    }

    /// The function and register that data window offset `window_offset` (0..4) reaches, if
    /// CONFIG_ADDRESS is enabled.
    fn selected(&self, window_offset: u64) -> Option<(PciAddress, usize)> {
        let address = self.config_address;
        if address & Self::ENABLE == 0 {
            return None;
        }
        let function = PciAddress::from_masked(
            (address >> 16) as u8,
            (address >> 11) as u8,
            (address >> 8) as u8,
        );
        let reg = (address & 0xfc) as usize + window_offset as usize;
        Some((function, reg))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        let len = data.len() as u64;
        if !is_config_access_len(data.len()) {
            return;
        }
        if offset.saturating_add(len) <= Self::DATA_WINDOW {
            let bytes = self.config_address.to_le_bytes();
            data.copy_from_slice(&bytes[offset as usize..(offset + len) as usize]);
        } else if offset >= Self::DATA_WINDOW && offset.saturating_add(len) <= Self::LEN {
            if let Some((address, reg)) = self.selected(offset - Self::DATA_WINDOW) {
                lock(&self.root).config_read(address, reg, data);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let len = data.len() as u64;
        if offset == 0 && data.len() == 4 {
            self.config_address = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        } else if offset >= Self::DATA_WINDOW && offset.saturating_add(len) <= Self::LEN {
            if let Some((address, reg)) = self.selected(offset - Self::DATA_WINDOW) {
                lock(&self.root).config_write(address, reg, data);
            }
        }
        if let (Self::RESET_CONTROL, [value], Some(exit)) = (offset, data, &self.reset) {
            if value & Self::RST_CPU != 0 {
                exit.request(GuestExitRequest::Reset);
            }
        }
        // Other narrower writes to CONFIG_ADDRESS are ignored.
    }
}

/// The ECAM window, mapped by the VMM at the base its ACPI MCFG table gives (OVMF on q35 expects
/// `0xB000_0000`).
pub struct PciEcam {
    root: Arc<Mutex<PciRoot>>,
}

impl PciEcam {
    /// Bytes of the window per bus: 32 devices of 8 functions of 4 KiB.
    pub const BYTES_PER_BUS: u64 = 1 << 20;
    /// Length of a window covering all 256 buses (only bus 0 is populated).
    pub const FULL_LEN: u64 = 256 * Self::BYTES_PER_BUS;

    /// The window over `root`.
    pub fn new(root: Arc<Mutex<PciRoot>>) -> Self {
        Self { root }
    }

    /// The function and register at `offset` into the window.
    fn decode(offset: u64) -> Option<(PciAddress, usize)> {
        if offset >= Self::FULL_LEN {
            return None;
        }
        let function = PciAddress::from_masked(
            (offset >> 20) as u8,
            (offset >> 15) as u8,
            (offset >> 12) as u8,
        );
        Some((function, (offset & 0xfff) as usize))
    }
}

impl BusDevice for PciEcam {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match Self::decode(offset) {
            Some((address, reg)) => lock(&self.root).config_read(address, reg, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some((address, reg)) = Self::decode(offset) {
            lock(&self.root).config_write(address, reg, data);
        }
    }
}

/// The window of guest addresses where the firmware places PCI memory BARs: an access lands in the
/// BAR that holds it (of a function with memory decoding on), or reads all-ones.
pub struct PciMmioWindow {
    root: Arc<Mutex<PciRoot>>,
    base: u64,
}

impl PciMmioWindow {
    /// The window from guest address `base` over `root`'s functions.
    pub fn new(root: Arc<Mutex<PciRoot>>, base: u64) -> Self {
        Self { root, base }
    }

    fn target(&self, offset: u64) -> Option<(SharedPciDevice, usize, u64)> {
        lock(&self.root).memory_bar_at(self.base.checked_add(offset)?)
    }
}

impl BusDevice for PciMmioWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match self.target(offset) {
            Some((device, bar, at)) => lock(&device).bar_read(bar, at, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some((device, bar, at)) = self.target(offset) {
            lock(&device).bar_write(bar, at, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::configuration::{PciBarKind, PciConfiguration, PciConfigurationState};
    use crate::pci::{PciClassCode, PciIdentity};

    /// An endpoint with nothing but its configuration space.
    struct Endpoint(PciConfiguration);

    impl PciDevice for Endpoint {
        fn configuration(&self) -> &PciConfiguration {
            &self.0
        }
        fn configuration_mut(&mut self) -> &mut PciConfiguration {
            &mut self.0
        }
    }

    fn endpoint() -> Arc<Mutex<Endpoint>> {
        let mut config = PciConfiguration::new(&PciIdentity {
            vendor_id: 0x1af4,
            device_id: 0x1042,
            revision: 1,
            class_code: PciClassCode {
                class: 0x01,
                subclass: 0x00,
                prog_if: 0x00,
            },
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x1100,
        });
        let kind = PciBarKind::Memory64 { prefetchable: true };
        config.add_bar(0, 0x4000, kind).unwrap();
        Arc::new(Mutex::new(Endpoint(config)))
    }

    fn address(device: u8, function: u8) -> PciAddress {
        PciAddress::new(0, device, function).unwrap()
    }

    /// A root with the host bridge and [`endpoint`] at 00:03.0, and both access mechanisms.
    fn machine() -> (Arc<Mutex<PciRoot>>, PciConfigIo, PciEcam) {
        let mut root = PciRoot::new();
        root.add_device(address(3, 0), endpoint()).unwrap();
        let root = Arc::new(Mutex::new(root));
        (
            root.clone(),
            PciConfigIo::new(root.clone()),
            PciEcam::new(root),
        )
    }

    fn config_address(device: u8, function: u8, reg: u8) -> u32 {
        1 << 31 | u32::from(device) << 11 | u32::from(function) << 8 | u32::from(reg)
    }

    fn cf8_read_u32(io: &mut PciConfigIo, config_address: u32) -> u32 {
        io.write(0, &config_address.to_le_bytes());
        let mut data = [0; 4];
        io.read(4, &mut data);
        u32::from_le_bytes(data)
    }

    fn ecam_offset(bus: u64, device: u64, function: u64, reg: u64) -> u64 {
        bus << 20 | device << 15 | function << 12 | reg
    }

    fn ecam_read_u32(ecam: &mut PciEcam, offset: u64) -> u32 {
        let mut data = [0; 4];
        ecam.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    #[test]
    fn cf8_reads_the_host_bridge_ids_and_class() {
        let (_, mut io, _) = machine();
        assert_eq!(cf8_read_u32(&mut io, config_address(0, 0, 0)), 0x29c0_8086);
        assert_eq!(
            cf8_read_u32(&mut io, config_address(0, 0, 8)) >> 8,
            0x06_0000
        );
        let mut address = [0; 4];
        io.read(0, &mut address);
        assert_eq!(u32::from_le_bytes(address), config_address(0, 0, 8));
        // Byte and word reads through the data window add their offset to the register.
        io.write(0, &config_address(0, 0, 0).to_le_bytes());
        let mut device_id = [0; 2];
        io.read(6, &mut device_id);
        assert_eq!(u16::from_le_bytes(device_id), 0x29c0);
        let mut byte = [0];
        io.read(5, &mut byte);
        assert_eq!(byte, [0x80]);
    }

    #[test]
    fn cf8_absent_device_and_disabled_address_read_all_ones() {
        let (root, mut io, _) = machine();
        assert_eq!(cf8_read_u32(&mut io, config_address(4, 0, 0)), 0xffff_ffff);
        assert_eq!(cf8_read_u32(&mut io, config_address(3, 1, 0)), 0xffff_ffff);
        let other_bus = config_address(0, 0, 0) | 1 << 16;
        assert_eq!(cf8_read_u32(&mut io, other_bus), 0xffff_ffff);
        let disabled = config_address(3, 0, 0x10) & !(1 << 31);
        assert_eq!(cf8_read_u32(&mut io, disabled), 0xffff_ffff);
        io.write(4, &0xfe00_0000u32.to_le_bytes());
        let endpoint = root.lock().unwrap().device(address(3, 0)).unwrap();
        assert_eq!(lock(&endpoint).configuration().bar_address(0), Some(0));
    }

    #[test]
    fn cf8_bar_write_reaches_the_endpoint_and_is_reported() {
        let (root, mut io, _) = machine();
        io.write(0, &config_address(3, 0, 0x10).to_le_bytes());
        io.write(4, &0xffff_ffffu32.to_le_bytes());
        let mut sized = [0; 4];
        io.read(4, &mut sized);
        assert_eq!(u32::from_le_bytes(sized), 0xffff_c00c);
        io.write(4, &0xfe00_0000u32.to_le_bytes());
        io.write(0, &config_address(3, 0, 0x14).to_le_bytes());
        io.write(4, &1u32.to_le_bytes());
        let reprogrammed = root.lock().unwrap().take_bar_reprogrammings();
        assert_eq!(
            reprogrammed,
            vec![(
                address(3, 0),
                BarReprogrammed {
                    index: 0,
                    old: 0,
                    new: 0x1_fe00_0000
                }
            )]
        );
    }

    #[test]
    fn odd_and_straddling_port_accesses_are_all_ones_and_ignored() {
        let (_, mut io, _) = machine();
        io.write(0, &config_address(0, 0, 0x3c).to_le_bytes());
        let mut three = [0; 3];
        io.read(4, &mut three);
        assert_eq!(three, [0xff; 3]);
        io.write(4, &[0x0b, 0x0b, 0x0b]);
        let mut eight = [0; 8];
        io.read(0, &mut eight);
        assert_eq!(eight, [0xff; 8]);
        let mut word = [0; 2];
        io.read(3, &mut word);
        assert_eq!(word, [0xff; 2]);
        io.read(7, &mut word);
        assert_eq!(word, [0xff; 2]);
        io.read(u64::MAX, &mut word);
        io.write(u64::MAX, &word);
        // A byte write to 0xCF9 leaves CONFIG_ADDRESS alone.
        io.write(1, &[0x06]);
        assert_eq!(cf8_read_u32(&mut io, config_address(0, 0, 0x3c)), 0);
    }

    #[test]
    fn a_byte_write_to_0xcf9_with_rst_cpu_resets_only_with_reset_control() {
        let root = Arc::new(Mutex::new(PciRoot::new()));
        let exit = Arc::new(GuestExitEvent::new().unwrap());
        let mut plain = PciConfigIo::new(root.clone());
        plain.write(1, &[0x06]);
        let mut q35 = PciConfigIo::new(root).with_reset_control(exit.clone());
        q35.write(1, &[0x02]);
        assert_eq!(exit.requested(), None);
        q35.write(1, &[0x06]);
        assert_eq!(exit.requested(), Some(GuestExitRequest::Reset));
    }

    #[test]
    fn ecam_reaches_the_same_functions_and_nothing_else() {
        let (_, _, mut ecam) = machine();
        assert_eq!(ecam_read_u32(&mut ecam, 0), 0x29c0_8086);
        assert_eq!(
            ecam_read_u32(&mut ecam, ecam_offset(0, 3, 0, 0)),
            0x1042_1af4
        );
        assert_eq!(
            ecam_read_u32(&mut ecam, ecam_offset(0, 3, 0, 0x10)),
            0x0000_000c
        );
        assert_eq!(
            ecam_read_u32(&mut ecam, ecam_offset(0, 31, 7, 0)),
            0xffff_ffff
        );
        assert_eq!(
            ecam_read_u32(&mut ecam, ecam_offset(1, 0, 0, 0)),
            0xffff_ffff
        );
        assert_eq!(ecam_read_u32(&mut ecam, PciEcam::FULL_LEN), 0xffff_ffff);
        assert_eq!(ecam_read_u32(&mut ecam, u64::MAX), 0xffff_ffff);
        // Extended space exists (zero) and an access running past it reads all-ones beyond.
        assert_eq!(ecam_read_u32(&mut ecam, ecam_offset(0, 3, 0, 0x100)), 0);
        assert_eq!(
            ecam_read_u32(&mut ecam, ecam_offset(0, 3, 0, 0xffe)),
            0xffff_0000
        );
        let mut eight = [0; 8];
        ecam.read(0, &mut eight);
        assert_eq!(eight, [0xff; 8]);
        ecam.write(ecam_offset(0, 3, 0, 0x10), &[0xff; 8]);
        ecam.write(ecam_offset(0, 3, 0, 0x10), &[0xff; 3]);
        ecam.write(ecam_offset(0, 3, 0, 0xfff), &[0xff; 4]);
        assert_eq!(
            ecam_read_u32(&mut ecam, ecam_offset(0, 3, 0, 0x10)),
            0x0000_000c
        );
        ecam.write(ecam_offset(0, 3, 0, 0x10), &0xfeb0_0000u32.to_le_bytes());
        assert_eq!(
            ecam_read_u32(&mut ecam, ecam_offset(0, 3, 0, 0x10)),
            0xfeb0_000c
        );
    }

    #[test]
    fn add_device_refuses_taken_addresses_and_other_buses_and_marks_multi_function() {
        let mut root = PciRoot::new();
        assert_eq!(
            root.add_device(PciRoot::HOST_BRIDGE_ADDRESS, endpoint()),
            Err(PciRootError::AddressInUse {
                address: PciRoot::HOST_BRIDGE_ADDRESS
            })
        );
        let elsewhere = PciAddress::new(1, 0, 0).unwrap();
        assert_eq!(
            root.add_device(elsewhere, endpoint()),
            Err(PciRootError::NotOnRootBus { address: elsewhere })
        );
        let function0 = endpoint();
        root.add_device(address(2, 0), function0.clone()).unwrap();
        let mut header_type = [0];
        root.config_read(address(2, 0), 0x0e, &mut header_type);
        assert_eq!(header_type, [0x00]);
        root.add_device(address(2, 1), endpoint()).unwrap();
        root.config_read(address(2, 0), 0x0e, &mut header_type);
        assert_eq!(header_type, [0x80]);
    }

    #[test]
    fn endpoint_state_round_trips_through_the_root() {
        let (root, _, mut ecam) = machine();
        ecam.write(ecam_offset(0, 3, 0, 0x04), &[0x06, 0x00]);
        ecam.write(ecam_offset(0, 3, 0, 0x3c), &[0x0b]);
        let device = root.lock().unwrap().device(address(3, 0)).unwrap();
        let state: PciConfigurationState = lock(&device).configuration().state();
        let fresh = endpoint();
        lock(&fresh).0.restore_state(&state).unwrap();
        assert_eq!(lock(&fresh).0.command(), 0x0006);
        assert_eq!(lock(&fresh).0.state(), state);
    }
    /// Records the BARs the root reports moved.
    #[derive(Default)]
    struct Moves(Mutex<Vec<(PciAddress, BarReprogrammed)>>);

    impl BarObserver for Moves {
        fn bar_moved(&self, address: PciAddress, moved: BarReprogrammed) {
            self.0.lock().unwrap().push((address, moved));
        }
    }

    #[test]
    fn the_mmio_window_reaches_an_enabled_bar_and_the_observer_hears_it_move() {
        let (root, _, mut ecam) = machine();
        let moves = Arc::new(Moves::default());
        root.lock().unwrap().set_bar_observer(moves.clone());
        let mut window = PciMmioWindow::new(root.clone(), 0xc000_0000);
        ecam.write(ecam_offset(0, 3, 0, 0x10), &0xc000_4000u32.to_le_bytes());
        ecam.write(ecam_offset(0, 3, 0, 0x14), &0u32.to_le_bytes());
        let moved = moves.0.lock().unwrap().clone();
        assert_eq!(moved.len(), 1);
        assert_eq!(moved[0].0, address(3, 0));
        assert_eq!((moved[0].1.index, moved[0].1.new), (0, 0xc000_4000));
        let mut data = [0u8; 4];
        window.read(0x4000, &mut data);
        assert_eq!(data, [0xff; 4], "memory decoding is off");
        ecam.write(ecam_offset(0, 3, 0, 0x04), &[0x02, 0x00]);
        window.read(0x4000, &mut data);
        assert_eq!(
            data, [0; 4],
            "the endpoint's BAR answers (with the default zeros)"
        );
        window.read(0x8000, &mut data);
        assert_eq!(data, [0xff; 4], "past the BAR");
        let found = root
            .lock()
            .unwrap()
            .memory_bar_at(0xc000_7ffc)
            .map(|(_, b, o)| (b, o));
        assert_eq!(found, Some((0, 0x3ffc)));
    }
}
