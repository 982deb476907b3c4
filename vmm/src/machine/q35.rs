//! The q35 chipset a firmware-booted guest gets beside the common devices: the PCI root complex
//! (host bridge, ICH9 LPC bridge; config space through ports `0xCF8`/`0xCFC` and the ECAM window),
//! and fw_cfg describing the VM to the firmware. See `docs/firmware.md`.

use std::sync::{Arc, Mutex};

use devices::fw_cfg::{self, FwCfg, FwCfgItems};
use devices::pci::{Ich9Lpc, PciConfigIo, PciEcam, PciRoot};
use devices::{Bus, GuestExitEvent};

use super::MachineError;
use crate::arch::layout::PCI_ECAM_START;
use crate::memory::GuestMemory;

/// Places the q35 chipset on the buses: its reset control sends to `guest_exit`, its fw_cfg serves
/// `fw_cfg_items` and transfers to and from `memory`.
pub(super) fn place_q35_chipset(
    io_bus: &mut Bus,
    mmio_bus: &mut Bus,
    memory: &GuestMemory,
    fw_cfg_items: FwCfgItems,
    guest_exit: &Arc<GuestExitEvent>,
) -> Result<(), MachineError> {
    let place_err = |device| move |source| MachineError::Bus { device, source };
    let mut root = PciRoot::new();
    root.add_device(Ich9Lpc::ADDRESS, Arc::new(Mutex::new(Ich9Lpc::new())))?;
    let pci_root = Arc::new(Mutex::new(root));
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
