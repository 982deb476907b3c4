//! Building a machine: the virtual hardware shared by a fresh boot and a restore (`assemble`), and the
//! boot path on top of it (ACPI tables, kernel, boot vCPU state).

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use devices::legacy::{
    AcpiPmDevice, Cmos, CmosMemory, Ich9PmBlock, SerialDevice, SerialOutput, I8042,
};
use devices::virtio::block::{BlockConfig, VirtioBlock};
use devices::virtio::net::{NetConfig, VirtioNet};
use devices::{Bus, BusDevice, EventFdTrigger, GuestExitEvent};
use event_manager::{EventManager, SubscriberOps};
use kvm_bindings::CpuId;

use super::DiskAccess;
use super::{
    DiskDescription, Machine, MachineDescription, MachineError, NetDescription, StopWatcher,
    VmConfig, MAX_VCPUS,
};
use crate::arch::acpi::table_loader::firmware_acpi_files;
use crate::arch::acpi::{write_acpi_tables, Com1, DsdtDevice, Rtc};
use crate::arch::boot::{load_kernel, KernelSpec};
use crate::arch::cpuid::{apply_features, CpuFeatures};
use crate::arch::emulate::EmulationCounters;
use crate::arch::firmware::{fw_cfg_items, FirmwareKernel, FirmwarePlatform, FirmwareRom};
use crate::arch::hyperv::{self, HypervMode};
use crate::arch::layout::{PCI_MMIO_WINDOW_END, PCI_MMIO_WINDOW_START};
use crate::device_manager::{DeviceManager, Subscriber, VirtioSubscriber};
use crate::memory::{create_guest_memory_split, GuestMemory};
use crate::pci_device_manager::PciDeviceManager;
use crate::vcpu::state::saveable_msrs;
use crate::vcpu::{kick, StopSignals, Vcpu, VcpuControl, VcpuShared};
use crate::vm::{Vm, VmError};

/// The virtual hardware to assemble.
pub(super) struct Hardware<'a> {
    pub vcpus: u8,
    pub memory_mib: u64,
    pub serial: &'a SerialOutput,
    pub cpu_features: &'a CpuFeatures,
    pub disks: &'a [BlockConfig],
    pub nets: &'a [NetConfig],
    pub dirty_ring: Option<u32>,
    pub hyperv: HypervMode,
    /// UEFI firmware to map as ROM; the VM then gets the q35 chipset.
    pub firmware: Option<FirmwareBoot<'a>>,
}

/// A firmware boot: the image and what fw_cfg hands it to boot directly.
pub(super) struct FirmwareBoot<'a> {
    pub image: &'a Path,
    pub kernel: Option<FirmwareKernel<'a>>,
}

impl Machine {
    /// Builds the VM described by `config`, ready to [`Machine::start`].
    pub fn build(config: &VmConfig) -> Result<Self, MachineError> {
        let span = tracing::info_span!(
            "build",
            vcpus = config.vcpus,
            memory_mib = config.memory_mib
        );
        let _guard = span.enter();
        let started = Instant::now();
        let (mut machine, cpuid, slots) = Self::assemble(&Hardware {
            vcpus: config.vcpus,
            memory_mib: config.memory_mib,
            serial: &config.serial,
            cpu_features: &config.cpu_features,
            disks: &config.disks,
            nets: &config.nets,
            dirty_ring: config.dirty_ring,
            hyperv: config.hyperv,
            firmware: config.firmware.as_deref().map(|image| FirmwareBoot {
                image,
                kernel: config.kernel.as_deref().map(|kernel| FirmwareKernel {
                    kernel,
                    initrd: config.initrd.as_deref(),
                    cmdline: &config.cmdline,
                }),
            }),
        })?;
        if config.serial_input {
            let input = super::serial_input::SerialInput::stdin(machine.serial.clone()).map_err(
                |source| MachineError::Io {
                    what: "a handle on standard input",
                    source,
                },
            )?;
            machine
                .event_manager
                .add_subscriber(Arc::new(Mutex::new(input)));
        }
        if config.firmware.is_some() {
            // The boot vCPU starts at the reset vector in KVM's reset state; the firmware brings
            // up the others with INIT/SIPI.
            for vcpu in &machine.unstarted {
                vcpu.set_cpuid(&cpuid, config.vcpus)?;
            }
            machine.finish_vcpu_setup()?;
            tracing::info!(
                elapsed_us = started.elapsed().as_micros() as u64,
                "VM built to boot through its firmware"
            );
            return Ok(machine);
        }
        let kernel = config
            .kernel
            .as_deref()
            .ok_or(MachineError::NothingToBoot)?;
        let mut dsdt_devices: Vec<&dyn DsdtDevice> = vec![&Com1, &Rtc];
        dsdt_devices.extend(slots.slots().iter().map(|s| s as &dyn DsdtDevice));
        let rsdp = write_acpi_tables(&machine.memory, config.vcpus.into(), &dsdt_devices)?;
        let entry = load_kernel(
            &machine.memory,
            &KernelSpec {
                kernel,
                initrd: config.initrd.as_deref(),
                cmdline: &config.cmdline,
                rsdp,
            },
        )?;
        tracing::info!(?entry, "kernel loaded");
        for vcpu in &machine.unstarted {
            vcpu.configure(&cpuid, config.vcpus, (vcpu.id() == 0).then_some(entry))?;
        }
        machine.finish_vcpu_setup()?;
        tracing::info!(
            elapsed_us = started.elapsed().as_micros() as u64,
            "VM built"
        );
        Ok(machine)
    }

    /// Creates memory, the KVM VM, devices and (unconfigured) vCPUs. Returns the machine, the
    /// CPUID to give vCPUs, and the device manager (for the DSDT).
    pub(super) fn assemble(hw: &Hardware) -> Result<(Self, CpuId, DeviceManager), MachineError> {
        if hw.vcpus == 0 || hw.vcpus > MAX_VCPUS {
            return Err(MachineError::VcpuCount(hw.vcpus));
        }
        let low_ram_end = match hw.firmware {
            Some(_) => crate::arch::firmware::low_ram_end(hw.memory_mib << 20),
            None => crate::arch::layout::MMIO_HOLE_START,
        };
        let memory = create_guest_memory_split(hw.memory_mib, low_ram_end)?;
        let vm = Arc::new(Vm::new(&memory)?);
        let mut firmware_rom = match &hw.firmware {
            Some(FirmwareBoot { image: path, .. }) => {
                let rom = FirmwareRom::load(path)?;
                rom.map(vm.kvm(), vm.fd())?;
                tracing::info!(
                    path = %path.display(),
                    base = format_args!("{:#x}", rom.base()),
                    size = rom.size(),
                    "firmware mapped"
                );
                Some(rom)
            }
            None => None,
        };
        if usize::from(hw.vcpus) > vm.max_vcpus() {
            return Err(VmError::TooManyVcpus {
                requested: hw.vcpus.into(),
                max: vm.max_vcpus(),
            }
            .into());
        }
        let mut cpuid = vm.supported_cpuid()?;
        apply_features(&mut cpuid, hw.cpu_features)?;
        let cpu_features = crate::arch::cpuid::feature_names(&cpuid);
        if let Some(entries) = hw.dirty_ring {
            let max = vm.kvm().check_extension_int(kvm_ioctls::Cap::DirtyLogRing);
            crate::dirty_ring::enable(vm.fd(), max, entries)?;
        }

        let guest_exit = Arc::new(GuestExitEvent::new().map_err(|source| MachineError::Io {
            what: "the guest exit eventfd",
            source,
        })?);
        let mut event_manager = EventManager::<Subscriber>::new()
            .map_err(|e| MachineError::EventLoop(format!("{e:?}")))?;
        let LegacyIo {
            bus: mut io_bus,
            serial,
            i8042,
            ich9_pm,
        } = build_io_bus(&vm, hw.serial, &guest_exit, hw.firmware.is_some())?;
        let ram = ram_map(hw.memory_mib, low_ram_end);
        let cmos = Arc::new(Mutex::new(Cmos::new(cmos_memory(&ram, hw.vcpus))));
        io_bus
            .insert(
                cmos.clone(),
                devices::legacy::cmos::PORT_BASE,
                devices::legacy::cmos::PORT_LEN,
            )
            .map_err(|source| MachineError::Bus {
                device: "CMOS",
                source,
            })?;
        let mut mmio_bus = Bus::new();
        let mut device_manager = DeviceManager::new();
        let mut description = MachineDescription {
            vcpus: hw.vcpus,
            memory_mib: hw.memory_mib,
            disks: Vec::new(),
            nets: Vec::new(),
            hyperv: hw.hyperv,
            firmware: hw.firmware.as_ref().map(|f| f.image.to_path_buf()),
            cpu_features,
        };
        // Firmware-booted (q35) VMs get their virtio devices on PCI, the others on virtio-mmio.
        let pci_root = match hw.firmware {
            Some(_) => Some(super::q35::q35_pci_root()?),
            None => None,
        };
        let mut pci_devices = pci_root.as_ref().map(|root| {
            PciDeviceManager::new(
                vm.clone(),
                root.clone(),
                PCI_MMIO_WINDOW_START..PCI_MMIO_WINDOW_END,
            )
        });
        let mut add = |device: Arc<Mutex<dyn VirtioSubscriber>>| -> Result<(), MachineError> {
            match &mut pci_devices {
                Some(pci) => {
                    pci.add_virtio_device(device, &vm, &memory, &mut event_manager)?;
                }
                None => {
                    device_manager.add_virtio_device(
                        device,
                        &vm,
                        &memory,
                        &mut mmio_bus,
                        &mut event_manager,
                    )?;
                }
            }
            Ok(())
        };
        let mut disk_access = Vec::with_capacity(hw.disks.len());
        for (index, disk) in hw.disks.iter().enumerate() {
            let blk = VirtioBlock::new(disk, index)?;
            disk_access.push(DiskAccess {
                journal: blk.write_journal(),
                image: blk.image().map_err(|source| MachineError::Io {
                    what: "a second handle on a disk image",
                    source,
                })?,
                capacity: blk.capacity(),
            });
            add(Arc::new(Mutex::new(blk)))?;
            description.disks.push(DiskDescription {
                path: disk.path.clone(),
                read_only: disk.read_only,
            });
        }
        let mut nics = Vec::with_capacity(hw.nets.len());
        for (index, net) in hw.nets.iter().enumerate() {
            let nic = VirtioNet::new(net, index)?;
            description.nets.push(NetDescription {
                tap: net.tap.clone(),
                mac: nic.mac().0,
            });
            let nic = Arc::new(Mutex::new(nic));
            nics.push(nic.clone());
            add(nic)?;
        }
        let mut q35 = None;
        if let Some(firmware) = &hw.firmware {
            let mut dsdt_devices: Vec<&dyn DsdtDevice> = vec![&Com1, &Rtc];
            dsdt_devices.extend(device_manager.slots().iter().map(|s| s as &dyn DsdtDevice));
            let acpi = firmware_acpi_files(hw.vcpus.into(), &dsdt_devices)?;
            let fw_cfg = fw_cfg_items(FirmwarePlatform {
                vcpus: hw.vcpus,
                ram: &ram,
                acpi_files: acpi.files,
                kernel: firmware.kernel.as_ref().map(|k| FirmwareKernel { ..*k }),
            })?;
            let root = pci_root.expect("firmware VMs have a PCI root");
            let fw_cfg = super::q35::place_q35_chipset(
                &mut io_bus,
                &mut mmio_bus,
                &memory,
                root,
                fw_cfg,
                &guest_exit,
            )?;
            q35 = Some(super::q35::Q35Chipset {
                rom: firmware_rom.take().expect("firmware VMs map a ROM"),
                pci: pci_devices.take().expect("firmware VMs have PCI devices"),
                fw_cfg,
                pm: ich9_pm
                    .clone()
                    .expect("firmware VMs have the ICH9 PM block"),
            });
        }
        let io_bus = Arc::new(io_bus);
        let mmio_bus = Arc::new(mmio_bus);

        kick::install_kick_handler().map_err(MachineError::KickHandler)?;
        let control = Arc::new(VcpuControl::new());
        let stop = Arc::new(StopSignals {
            guest_exit: guest_exit.clone(),
            crash: Mutex::new(None),
        });
        let emulation = Arc::new(EmulationCounters::default());
        let shared = VcpuShared {
            emulation: emulation.clone(),
            io_bus,
            mmio_bus,
            memory: memory.clone(),
            control: control.clone(),
            stop: stop.clone(),
        };
        let mut unstarted = Vec::with_capacity(hw.vcpus.into());
        for id in 0..hw.vcpus {
            unstarted.push(Vcpu::new(vm.fd(), id, shared.clone())?);
        }
        if hw.hyperv != HypervMode::Off {
            let leaves = hyperv::supported_leaves(vm.kvm(), unstarted[0].fd())?;
            if hyperv::install(&mut cpuid, &leaves, hw.hyperv)? {
                for vcpu in &unstarted {
                    hyperv::enable_synic(vcpu.fd(), vcpu.id())?;
                }
            }
            tracing::info!(mode = ?hw.hyperv, "Hyper-V enlightenments offered");
        }
        let dirty_rings = match hw.dirty_ring {
            Some(entries) => {
                let fds: Vec<_> = unstarted.iter().map(|v| v.fd()).collect();
                Some(Arc::new(crate::dirty_ring::DirtyRings::map(&fds, entries)?))
            }
            None => None,
        };
        let watcher = StopWatcher {
            eventfd: guest_exit
                .eventfd()
                .try_clone()
                .map_err(|source| MachineError::Io {
                    what: "a handle on the stop eventfd",
                    source,
                })?,
        };
        event_manager.add_subscriber(Arc::new(Mutex::new(watcher)));
        let machine = Self {
            description,
            serial,
            i8042,
            cmos,
            transports: device_manager.transports().to_vec(),
            nics,
            disk_access,
            vcpu_threads: Vec::new(),
            unstarted,
            control,
            stop,
            event_manager,
            vm,
            q35,
            memory,
            vcpu_count: hw.vcpus,
            emulation,
            inbox: None,
            control_handle: None,
            migrated_to: None,
            diff_base: None,
            dirty_ownership: crate::dirty::DirtyOwnership::default(),
            dirty_rings,
        };
        Ok((machine, cpuid, device_manager))
    }

    /// Once vCPUs hold their CPUID, decides which MSRs snapshots capture.
    pub(super) fn finish_vcpu_setup(&mut self) -> Result<(), MachineError> {
        let first = self.unstarted.first().ok_or(MachineError::VcpuCount(0))?;
        let hyperv = self.description.hyperv != HypervMode::Off;
        let msr_indices = saveable_msrs(self.vm.kvm(), first.fd(), 0, hyperv)?;
        self.set_msr_indices(msr_indices);
        Ok(())
    }

    /// Decides which MSRs snapshots capture from a list already known to be readable (a restored
    /// vCPU's), sparing the probe on restore and migration hand-over.
    pub(super) fn set_msr_indices(&mut self, indices: Vec<u32>) {
        let msr_indices = Arc::new(indices);
        for vcpu in &mut self.unstarted {
            vcpu.set_msr_indices(msr_indices.clone());
        }
    }

    /// Guest memory, for restore.
    pub(super) fn memory_mut(&mut self) -> &mut GuestMemory {
        &mut self.memory
    }
}

/// The guest's RAM ranges (base, size).
fn ram_map(memory_mib: u64, low_ram_end: u64) -> Vec<(u64, u64)> {
    crate::memory::ram_ranges_split(memory_mib << 20, low_ram_end)
        .into_iter()
        .map(|(base, size)| (base.0, size as u64))
        .collect()
}

/// The RAM layout the CMOS memory-size bytes describe.
fn cmos_memory(ram: &[(u64, u64)], vcpus: u8) -> CmosMemory {
    let four_gib = crate::arch::layout::FOUR_GIB;
    CmosMemory {
        below_4g: ram.iter().filter(|r| r.0 < four_gib).map(|r| r.1).sum(),
        above_4g: ram.iter().filter(|r| r.0 >= four_gib).map(|r| r.1).sum(),
        vcpus,
    }
}

/// The port I/O bus: COM1 (fresh or restored), the i8042 and the ACPI PM registers (ICH9's block on
/// the q35 platform of firmware-booted VMs).
/// The port I/O bus and the devices on it the machine keeps.
struct LegacyIo {
    bus: Bus,
    serial: Arc<Mutex<SerialDevice>>,
    i8042: Arc<Mutex<I8042>>,
    /// The ICH9 PM block of a q35 VM.
    ich9_pm: Option<Arc<Mutex<Ich9PmBlock>>>,
}

fn build_io_bus(
    vm: &Vm,
    serial: &SerialOutput,
    guest_exit: &Arc<GuestExitEvent>,
    q35: bool,
) -> Result<LegacyIo, MachineError> {
    let mut bus = Bus::new();
    let place = |bus: &mut Bus, device: Arc<Mutex<dyn BusDevice>>, name, base, len| {
        bus.insert(device, base, len)
            .map_err(|source| MachineError::Bus {
                device: name,
                source,
            })
    };
    let irq = EventFdTrigger::new().map_err(|source| MachineError::Io {
        what: "the serial interrupt eventfd",
        source,
    })?;
    vm.register_irqfd(irq.eventfd(), SerialDevice::COM1_IRQ)?;
    let out = serial.open().map_err(|e| MachineError::Io {
        what: "the serial output",
        source: std::io::Error::other(e.to_string()),
    })?;
    let uart = Arc::new(Mutex::new(SerialDevice::new(irq, out)));
    place(
        &mut bus,
        uart.clone(),
        "COM1",
        SerialDevice::COM1_BASE,
        SerialDevice::LEN,
    )?;
    let i8042 = Arc::new(Mutex::new(I8042::new(guest_exit.clone())));
    place(&mut bus, i8042.clone(), "i8042", I8042::BASE, I8042::LEN)?;
    let mut ich9_pm = None;
    if q35 {
        let pm = Arc::new(Mutex::new(Ich9PmBlock::new(guest_exit.clone())));
        place(
            &mut bus,
            pm.clone(),
            "ICH9 PM",
            Ich9PmBlock::BASE,
            Ich9PmBlock::LEN,
        )?;
        ich9_pm = Some(pm);
    } else {
        place(
            &mut bus,
            Arc::new(Mutex::new(AcpiPmDevice::new(guest_exit.clone()))),
            "ACPI PM",
            AcpiPmDevice::BASE,
            AcpiPmDevice::LEN,
        )?;
    }
    Ok(LegacyIo {
        bus,
        serial: uart,
        i8042,
        ich9_pm,
    })
}
