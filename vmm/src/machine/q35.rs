//! The q35 chipset a firmware-booted guest gets beside the common devices: the PCI root complex
//! (host bridge, ICH9 LPC bridge, the virtio-pci functions of `pci_device_manager.rs`; config space
//! through ports `0xCF8`/`0xCFC` and the ECAM window; BARs in the 32-bit PCI memory window), and
//! fw_cfg describing the VM to the firmware. See `docs/firmware.md`.

use std::sync::{Arc, Mutex};

use devices::fw_cfg::{self, FwCfg, FwCfgItems, FwCfgState};
use devices::legacy::{Ich9PmBlock, Ich9PmState};
use devices::pci::{
    Ich9Lpc, PciAddress, PciConfigIo, PciConfigurationState, PciEcam, PciMmioWindow, PciRoot,
};
use devices::persist::VirtioState;
use devices::virtio::pci::VirtioPciState;
use devices::{Bus, GuestExitEvent};
use serde::{Deserialize, Serialize};

use super::snapshot::SnapshotError;
use super::MachineError;
use crate::arch::firmware::FirmwareRom;
use crate::arch::layout::{PCI_ECAM_START, PCI_MMIO_WINDOW_END, PCI_MMIO_WINDOW_START};
use crate::lock;
use crate::memory::GuestMemory;
use crate::pci_device_manager::PciDeviceManager;

/// The PCI root of a q35 VM: the host bridge and the LPC bridge, before the devices are added.
pub(super) fn q35_pci_root() -> Result<Arc<Mutex<PciRoot>>, MachineError> {
    let mut root = PciRoot::new();
    root.add_device(Ich9Lpc::ADDRESS, Arc::new(Mutex::new(Ich9Lpc::new())))?;
    Ok(Arc::new(Mutex::new(root)))
}

/// Places the q35 chipset on the buses: the configuration mechanisms and the memory window of
/// `pci_root`, its reset control sending to `guest_exit`, and fw_cfg serving `fw_cfg_items` to and
/// from `memory`.
pub(super) fn place_q35_chipset(
    io_bus: &mut Bus,
    mmio_bus: &mut Bus,
    memory: &GuestMemory,
    pci_root: Arc<Mutex<PciRoot>>,
    fw_cfg_items: FwCfgItems,
    guest_exit: &Arc<GuestExitEvent>,
) -> Result<Arc<Mutex<FwCfg>>, MachineError> {
    let place_err = |device| move |source| MachineError::Bus { device, source };
    io_bus
        .insert(
            Arc::new(Mutex::new(
                PciConfigIo::new(pci_root.clone()).with_reset_control(guest_exit.clone()),
            )),
            PciConfigIo::BASE,
            PciConfigIo::LEN,
        )
        .map_err(place_err("PCI configuration ports"))?;
    mmio_bus
        .insert(
            Arc::new(Mutex::new(PciEcam::new(pci_root.clone()))),
            PCI_ECAM_START,
            PciEcam::FULL_LEN,
        )
        .map_err(place_err("PCI ECAM window"))?;
    mmio_bus
        .insert(
            Arc::new(Mutex::new(PciMmioWindow::new(
                pci_root.clone(),
                PCI_MMIO_WINDOW_START,
            ))),
            PCI_MMIO_WINDOW_START,
            PCI_MMIO_WINDOW_END - PCI_MMIO_WINDOW_START,
        )
        .map_err(place_err("PCI memory window"))?;

    let fw_cfg = Arc::new(Mutex::new(FwCfg::new(&fw_cfg_items, memory.clone())));
    io_bus
        .insert(
            fw_cfg.clone(),
            fw_cfg::device::PORT_BASE,
            fw_cfg::device::PORT_LEN,
        )
        .map_err(place_err("fw_cfg"))?;
    Ok(fw_cfg)
}

/// What a firmware-booted VM keeps of its chipset: the firmware it maps, its PCI devices, fw_cfg
/// and the ICH9 PM block.
pub(super) struct Q35Chipset {
    pub rom: FirmwareRom,
    pub pci: PciDeviceManager,
    pub fw_cfg: Arc<Mutex<FwCfg>>,
    pub pm: Arc<Mutex<Ich9PmBlock>>,
}

/// The chipset's state in a snapshot, beside the common devices'. The virtio-pci functions' transport
/// and device state is in the snapshot's virtio states, as virtio-mmio devices' is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Q35State {
    /// The firmware image's CRC32C: the restored VM must map the same image.
    pub firmware_crc32c: u32,
    pub host_bridge: PciConfigurationState,
    pub lpc: PciConfigurationState,
    pub fw_cfg: FwCfgState,
    pub pm: Ich9PmState,
    /// Per virtio-pci function, in address order: configuration space and MSI-X.
    pub virtio_pci: Vec<VirtioPciState>,
}

impl Q35Chipset {
    fn function_state(&self, address: PciAddress) -> PciConfigurationState {
        let root = lock(self.pci.root());
        let function = root
            .device(address)
            .expect("the chipset's functions are always there");
        let state = lock(&function).configuration().state();
        state
    }

    fn restore_function(
        &self,
        address: PciAddress,
        state: &PciConfigurationState,
    ) -> Result<(), MachineError> {
        let root = lock(self.pci.root());
        let function = root
            .device(address)
            .expect("the chipset's functions are always there");
        let result = lock(&function).configuration_mut().restore_state(state);
        result.map_err(|e| MachineError::DeviceState(format!("PCI function {address}: {e}")))
    }

    /// The chipset's state (vCPUs paused, on the event-loop thread).
    pub fn state(&self) -> Q35State {
        Q35State {
            firmware_crc32c: self.rom.crc32c(),
            host_bridge: self.function_state(PciRoot::HOST_BRIDGE_ADDRESS),
            lpc: self.function_state(Ich9Lpc::ADDRESS),
            fw_cfg: lock(&self.fw_cfg).state(),
            pm: lock(&self.pm).state(),
            virtio_pci: self
                .pci
                .functions()
                .map(|f| lock(f).save_pci_state())
                .collect(),
        }
    }

    /// The virtio states of the PCI functions, in address order.
    pub fn virtio_states(&self) -> Vec<VirtioState> {
        self.pci.functions().map(|f| lock(f).save_state()).collect()
    }

    /// Loads `state` and the functions' `virtio` states; then the queue notifications follow the
    /// restored BARs.
    pub fn restore(&self, state: &Q35State, virtio: &[VirtioState]) -> Result<(), MachineError> {
        if state.firmware_crc32c != self.rom.crc32c() {
            return Err(MachineError::FirmwareChanged {
                path: self.rom.path().to_path_buf(),
                saved: state.firmware_crc32c,
                found: self.rom.crc32c(),
            });
        }
        let functions: Vec<_> = self.pci.functions().collect();
        if state.virtio_pci.len() != functions.len() || virtio.len() != functions.len() {
            return Err(MachineError::DeviceState(format!(
                "the snapshot has {} virtio-pci functions, the VM {}",
                state.virtio_pci.len(),
                functions.len()
            )));
        }
        self.restore_function(PciRoot::HOST_BRIDGE_ADDRESS, &state.host_bridge)?;
        self.restore_function(Ich9Lpc::ADDRESS, &state.lpc)?;
        lock(&self.fw_cfg).restore_state(&state.fw_cfg);
        lock(&self.pm).restore_state(&state.pm);
        for (index, (function, (pci, virtio))) in functions
            .into_iter()
            .zip(state.virtio_pci.iter().zip(virtio))
            .enumerate()
        {
            lock(function)
                .restore_state(pci, virtio)
                .map_err(|e| SnapshotError::Device {
                    index,
                    reason: e.to_string(),
                })?;
        }
        self.pci.place_restored_bars();
        Ok(())
    }
}
