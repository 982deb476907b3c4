//! A whole virtual machine and its lifecycle: build (memory, KVM VM, devices, ACPI, kernel, vCPUs),
//! start, pause, resume, wait for the guest to stop, tear down.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::legacy::{AcpiPmDevice, SerialDevice, SerialOutput, I8042};
use devices::virtio::block::{BlockConfig, BlockError, VirtioBlock};
use devices::virtio::net::{NetConfig, NetError, VirtioNet};
use devices::{Bus, BusError, EventFdTrigger, GuestExitEvent, GuestExitRequest};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;

use crate::arch::acpi::{write_acpi_tables, AcpiError, Com1, DsdtDevice};
use crate::arch::boot::{load_kernel, BootError, KernelSpec};
use crate::arch::cpuid::{apply_features, CpuFeatures, CpuidError};
use crate::arch::emulate::EmulationCounters;
use crate::crash::CrashReport;
use crate::device_manager::{DeviceManager, DeviceManagerError, Subscriber, VirtioSubscriber};
use crate::memory::{create_guest_memory, GuestMemory, MemoryError};
use crate::vcpu::state::saveable_msrs;
use crate::vcpu::{kick, StopSignals, Vcpu, VcpuControl, VcpuError, VcpuShared, VcpuStateError};
use crate::vm::{Vm, VmError};

/// The most vCPUs a guest may have (APIC IDs are 8-bit and 0xff is broadcast).
pub const MAX_VCPUS: u8 = 254;

/// How long a pause may take before it is reported as stuck.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything needed to build a VM.
#[derive(Clone, Debug)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub vcpus: u8,
    pub memory_mib: u64,
    pub serial: SerialOutput,
    pub cpu_features: CpuFeatures,
    /// virtio-blk disks, in guest order.
    pub disks: Vec<BlockConfig>,
    /// virtio-net interfaces, placed after the disks.
    pub nets: Vec<NetConfig>,
}

/// How a VM ended.
#[derive(Clone, Debug, PartialEq)]
pub enum VmExit {
    /// The guest powered off.
    PowerOff,
    /// The guest asked for a reset.
    Reset,
    /// The guest crashed.
    Crash(Box<CrashReport>),
}

impl VmExit {
    /// The `ftvmm run` exit status for this outcome.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::PowerOff => 0,
            Self::Reset => 3,
            Self::Crash(_) => 4,
        }
    }
}

/// Errors building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error("invalid vCPU count {0}: must be between 1 and {MAX_VCPUS}")]
    VcpuCount(u8),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Cpuid(#[from] CpuidError),
    #[error(transparent)]
    Acpi(#[from] AcpiError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    VcpuState(#[from] VcpuStateError),
    #[error(transparent)]
    Block(#[from] BlockError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Devices(#[from] DeviceManagerError),
    #[error("cannot place device {device} on the bus: {source}")]
    Bus {
        device: &'static str,
        source: BusError,
    },
    #[error("cannot create {what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("cannot install the vCPU kick signal handler: {0}")]
    KickHandler(vmm_sys_util::errno::Error),
    #[error("the event loop failed: {0}")]
    EventLoop(String),
    #[error("vCPUs did not pause within {0:?}")]
    PauseTimeout(Duration),
    #[error("the VM is not running")]
    NotRunning,
}

/// Wakes the event loop when the guest or a vCPU asks the VM to stop.
struct StopWatcher {
    eventfd: EventFd,
}

impl MutEventSubscriber for StopWatcher {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.event_set().contains(EventSet::IN) {
            // Non-blocking read; the reason itself is kept in StopSignals.
            let _ = self.eventfd.read();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.eventfd, EventSet::IN)) {
            tracing::error!("cannot watch the stop eventfd: {e}");
        }
    }
}

/// A built VM. Fields drop in order: threads are stopped first (in `Drop`), then the VM, then memory.
pub struct Machine {
    vcpu_threads: Vec<JoinHandle<()>>,
    unstarted: Vec<Vcpu>,
    control: Arc<VcpuControl>,
    stop: Arc<StopSignals>,
    event_manager: EventManager<Subscriber>,
    vm: Vm,
    memory: GuestMemory,
    vcpu_count: u8,
    emulation: Arc<EmulationCounters>,
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
        if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
            return Err(MachineError::VcpuCount(config.vcpus));
        }
        let memory = create_guest_memory(config.memory_mib)?;
        let vm = Vm::new(&memory)?;
        if usize::from(config.vcpus) > vm.max_vcpus() {
            return Err(VmError::TooManyVcpus {
                requested: config.vcpus.into(),
                max: vm.max_vcpus(),
            }
            .into());
        }
        let mut cpuid = vm.supported_cpuid()?;
        apply_features(&mut cpuid, &config.cpu_features)?;

        let guest_exit = Arc::new(GuestExitEvent::new().map_err(|source| MachineError::Io {
            what: "the guest exit eventfd",
            source,
        })?);
        let mut event_manager = EventManager::<Subscriber>::new()
            .map_err(|e| MachineError::EventLoop(format!("{e:?}")))?;
        let io_bus = Arc::new(build_io_bus(&vm, &config.serial, &guest_exit)?);
        let mut mmio_bus = Bus::new();
        let mut device_manager = DeviceManager::new();
        let mut add = |device: Arc<Mutex<dyn VirtioSubscriber>>| {
            device_manager.add_virtio_device(
                device,
                &vm,
                &memory,
                &mut mmio_bus,
                &mut event_manager,
            )
        };
        for (index, disk) in config.disks.iter().enumerate() {
            add(Arc::new(Mutex::new(VirtioBlock::new(disk, index)?)))?;
        }
        for (index, net) in config.nets.iter().enumerate() {
            add(Arc::new(Mutex::new(VirtioNet::new(net, index)?)))?;
        }
        let mmio_bus = Arc::new(mmio_bus);

        let mut dsdt_devices: Vec<&dyn DsdtDevice> = vec![&Com1];
        dsdt_devices.extend(device_manager.slots().iter().map(|s| s as &dyn DsdtDevice));
        let rsdp = write_acpi_tables(&memory, config.vcpus.into(), &dsdt_devices)?;
        let entry = load_kernel(
            &memory,
            &KernelSpec {
                kernel: &config.kernel,
                initrd: config.initrd.as_deref(),
                cmdline: &config.cmdline,
                rsdp,
            },
        )?;
        tracing::info!(?entry, "kernel loaded");

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
        let mut unstarted = Vec::with_capacity(config.vcpus.into());
        for id in 0..config.vcpus {
            let vcpu = Vcpu::new(vm.fd(), id, shared.clone())?;
            vcpu.configure(&cpuid, config.vcpus, (id == 0).then_some(entry))?;
            unstarted.push(vcpu);
        }
        let msr_indices = Arc::new(saveable_msrs(vm.kvm(), unstarted[0].fd(), 0)?);
        for vcpu in &mut unstarted {
            vcpu.set_msr_indices(msr_indices.clone());
        }

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
        tracing::info!(
            elapsed_us = started.elapsed().as_micros() as u64,
            "VM built"
        );
        Ok(Self {
            vcpu_threads: Vec::new(),
            unstarted,
            control,
            stop,
            event_manager,
            vm,
            memory,
            vcpu_count: config.vcpus,
            emulation,
        })
    }

    /// Starts every vCPU thread.
    pub fn start(&mut self) -> Result<(), MachineError> {
        for vcpu in self.unstarted.drain(..) {
            self.vcpu_threads.push(vcpu.spawn()?);
        }
        Ok(())
    }

    fn kick_all(&self) {
        for t in &self.vcpu_threads {
            // A thread that already exited cannot be signalled; it needs no kick.
            let _ = t.kill(kick::kick_signal());
        }
    }

    /// Pauses every vCPU outside the guest, with no port or MMIO access half done.
    pub fn pause(&self) -> Result<(), MachineError> {
        if self.vcpu_threads.is_empty() {
            return Err(MachineError::NotRunning);
        }
        self.control.request_pause();
        self.kick_all();
        if self.control.wait_paused(PAUSE_TIMEOUT) {
            Ok(())
        } else {
            Err(MachineError::PauseTimeout(PAUSE_TIMEOUT))
        }
    }

    /// Resumes paused vCPUs (without waiting for their threads to be scheduled).
    pub fn resume(&self) {
        self.control.resume();
    }

    /// Waits until every vCPU thread has left the paused state after [`Machine::resume`].
    pub fn wait_running(&self, timeout: Duration) -> bool {
        self.control.wait_running(timeout)
    }

    /// Runs the event loop until the guest powers off, resets or crashes, then stops the vCPUs.
    pub fn wait(&mut self) -> Result<VmExit, MachineError> {
        if self.vcpu_threads.is_empty() {
            return Err(MachineError::NotRunning);
        }
        let exit = loop {
            if let Some(exit) = self.stop_reason() {
                break exit;
            }
            self.event_manager
                .run()
                .map_err(|e| MachineError::EventLoop(format!("{e:?}")))?;
        };
        self.shutdown_vcpus();
        let fired = self.emulation.snapshot();
        if !fired.is_empty() {
            tracing::info!(
                ?fired,
                "instruction emulation fallback completed instructions KVM could not"
            );
        }
        Ok(exit)
    }

    fn stop_reason(&self) -> Option<VmExit> {
        let crash = self
            .stop
            .crash
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(report) = crash {
            return Some(VmExit::Crash(Box::new(report)));
        }
        self.stop.guest_exit.requested().map(|r| match r {
            GuestExitRequest::PowerOff => VmExit::PowerOff,
            GuestExitRequest::Reset => VmExit::Reset,
        })
    }

    fn shutdown_vcpus(&mut self) {
        self.control.request_stop();
        self.kick_all();
        for t in self.vcpu_threads.drain(..) {
            if t.join().is_err() {
                tracing::error!("a vCPU thread panicked");
            }
        }
    }

    /// How often the instruction-emulation fallback fired.
    pub fn emulation_counters(&self) -> &EmulationCounters {
        &self.emulation
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> u8 {
        self.vcpu_count
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// The KVM VM.
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// Builds, starts and waits for a VM.
    pub fn run(config: &VmConfig) -> Result<VmExit, MachineError> {
        let mut machine = Self::build(config)?;
        machine.start()?;
        machine.wait()
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.shutdown_vcpus();
    }
}

fn build_io_bus(
    vm: &Vm,
    serial: &SerialOutput,
    guest_exit: &Arc<GuestExitEvent>,
) -> Result<Bus, MachineError> {
    let mut bus = Bus::new();
    let place = |bus: &mut Bus, device: Arc<Mutex<dyn devices::BusDevice>>, name, base, len| {
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
    tracing::debug!(fd = irq.eventfd().as_raw_fd(), "COM1 irqfd");
    let out = serial.open().map_err(|e| MachineError::Io {
        what: "the serial output",
        source: std::io::Error::other(e.to_string()),
    })?;
    place(
        &mut bus,
        Arc::new(Mutex::new(SerialDevice::new(irq, out))),
        "COM1",
        SerialDevice::COM1_BASE,
        SerialDevice::LEN,
    )?;
    place(
        &mut bus,
        Arc::new(Mutex::new(I8042::new(guest_exit.clone()))),
        "i8042",
        I8042::BASE,
        I8042::LEN,
    )?;
    place(
        &mut bus,
        Arc::new(Mutex::new(AcpiPmDevice::new(guest_exit.clone()))),
        "ACPI PM",
        AcpiPmDevice::BASE,
        AcpiPmDevice::LEN,
    )?;
    Ok(bus)
}
