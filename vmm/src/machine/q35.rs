//! The q35 chipset a firmware-booted guest gets beside the common devices: the PCI root complex
//! (host bridge, ICH9 LPC bridge, the virtio-pci functions of `pci_device_manager.rs`; config space
//! through ports `0xCF8`/`0xCFC` and the ECAM window; BARs in the 32-bit PCI memory window), and
//! fw_cfg describing the VM to the firmware. See `docs/firmware.md`.

use std::sync::{Arc, Mutex};

use devices::fw_cfg::{self, FwCfg, FwCfgItems};
use devices::pci::{Ich9Lpc, PciConfigIo, PciEcam, PciMmioWindow, PciRoot};
use devices::{Bus, GuestExitEvent};

use super::MachineError;
use crate::arch::layout::{PCI_ECAM_START, PCI_MMIO_WINDOW_END, PCI_MMIO_WINDOW_START};
use crate::memory::GuestMemory;

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
) -> Result<(), MachineError> {
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
    Ok(())
}
