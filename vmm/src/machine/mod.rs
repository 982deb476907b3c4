//! A whole virtual machine and its lifecycle: build (`builder.rs`: memory, KVM VM, devices, ACPI,
//! kernel, vCPUs), start, pause, resume, wait for the guest to stop, snapshot and restore
//! (`snapshot.rs`), tear down.

mod builder;
mod q35;
mod serial_input;
pub use q35::Q35State;
mod snapshot;
mod stop_signal;

pub use snapshot::{
    RestoreOptions, SnapshotError, SnapshotInfo, SnapshotKind, VmSnapshot, SNAPSHOT_MEMORY_FILE,
    SNAPSHOT_STATE_FILE,
};

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use devices::legacy::{Cmos, SerialDevice, SerialOutput};
use devices::virtio::block::{BlockConfig, BlockError};
use devices::virtio::mmio::MmioTransport;
use devices::virtio::net::{NetConfig, NetError, VirtioNet};
use devices::{BusError, GuestExitRequest};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;

use crate::arch::acpi::AcpiError;
use crate::arch::boot::BootError;
use crate::arch::cpuid::{CpuFeatures, CpuidError};
use crate::arch::emulate::EmulationCounters;
use crate::arch::hyperv::HypervMode;
use crate::control::{
    control_channel, ControlHandle, ControlInbox, RunState, SnapshotReport, VcpuSummary, VmCommand,
    VmInfo, VmReply,
};
use crate::crash::CrashReport;
use crate::device_manager::{DeviceManagerError, Subscriber};
use crate::memory::{GuestMemory, MemoryError};
use crate::vcpu::{kick, StopSignals, Vcpu, VcpuControl, VcpuError, VcpuStateError};
use crate::vm::{Vm, VmError};

/// The most vCPUs a guest may have (APIC IDs are 8-bit and 0xff is broadcast).
pub const MAX_VCPUS: u8 = 254;

/// How long a pause may take before it is reported as stuck.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything needed to build a VM.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// The kernel to load directly; a firmware-booted VM may have none (it boots from its disks).
    pub kernel: Option<PathBuf>,
    /// UEFI firmware (OVMF.fd) to boot through, on the q35 platform (`arch/firmware.rs`).
    pub firmware: Option<PathBuf>,
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
    /// Track dirty pages with KVM's dirty ring of this many entries per vCPU instead of its dirty
    /// log.
    pub dirty_ring: Option<u32>,
    /// Hyper-V enlightenments offered to the guest (`arch/hyperv.rs`).
    pub hyperv: HypervMode,
    /// Feed this process's standard input to the guest's COM1 (`machine/serial_input.rs`).
    pub serial_input: bool,
}

/// The virtual hardware of a VM: what a restore must recreate (backends may be renamed).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MachineDescription {
    pub vcpus: u8,
    pub memory_mib: u64,
    pub disks: Vec<DiskDescription>,
    pub nets: Vec<NetDescription>,
    /// Hyper-V enlightenments: a restored vCPU's CPUID carries the leaves, but its SynIC must be
    /// turned on again before its MSRs are set.
    #[serde(default)]
    pub hyperv: HypervMode,
    /// The firmware image a firmware-booted VM started from.
    #[serde(default)]
    pub firmware: Option<PathBuf>,
    /// The CPU features the guest sees (names of `arch::cpuid::FEATURES`): a host that does not
    /// offer one of them cannot run it, and refuses it before anything is built.
    #[serde(default)]
    pub cpu_features: Vec<String>,
}

/// A virtio-blk disk of a [`MachineDescription`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskDescription {
    pub path: PathBuf,
    pub read_only: bool,
}

/// A virtio-net NIC of a [`MachineDescription`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetDescription {
    pub tap: String,
    pub mac: [u8; 6],
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
    /// The guest now runs elsewhere (live migration completed).
    MigratedAway { to: String },
    /// The VMM was told to stop (SIGTERM or SIGINT): the guest ends here, as at a power-off.
    Stopped,
}

impl VmExit {
    /// The `ftvmm run` exit status for this outcome.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::PowerOff => 0,
            Self::Reset => 3,
            Self::Crash(_) => 4,
            Self::MigratedAway { .. } => 0,
            Self::Stopped => 0,
        }
    }
}

/// Errors building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error("invalid vCPU count {0}: must be between 1 and {MAX_VCPUS}")]
    VcpuCount(u8),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    #[error("{wanted} cannot start while {held_by} tracks the guest's dirty pages")]
    DirtyTrackingBusy {
        held_by: &'static str,
        wanted: &'static str,
    },
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Cpuid(#[from] CpuidError),
    #[error(transparent)]
    Hyperv(#[from] crate::arch::hyperv::HypervError),
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
    #[error(transparent)]
    DirtyRing(#[from] crate::dirty_ring::DirtyRingError),
    #[error("the VM is not running")]
    NotRunning,
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("cannot restore device state: {0}")]
    DeviceState(String),
    #[error(transparent)]
    Firmware(#[from] crate::arch::firmware::FirmwareError),
    #[error(
        "the firmware image {path:?} is not the one the VM was saved with (CRC32C {found:#010x}, \
         saved {saved:#010x}): a running guest must keep its firmware"
    )]
    FirmwareChanged {
        path: PathBuf,
        saved: u32,
        found: u32,
    },
    #[error("nothing to boot: give a kernel or firmware")]
    NothingToBoot,
    #[error(transparent)]
    Pci(#[from] devices::pci::PciRootError),
    #[error(transparent)]
    PciDevice(#[from] crate::pci_device_manager::PciDeviceError),
}

/// Wakes the event loop when the guest or a vCPU asks the VM to stop.
pub(super) struct StopWatcher {
    pub(super) eventfd: EventFd,
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

/// What protection reaches of one disk beside its device (replication/src/protection).
pub struct DiskAccess {
    /// The guest's completed writes, recorded while protection runs.
    pub journal: devices::virtio::block::WriteJournal,
    /// A handle on the image (reading it for a first sync; a standby writes committed writes).
    pub image: std::fs::File,
    pub capacity: u64,
}

impl DiskAccess {
    /// Another handle on the same disk.
    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(Self {
            journal: self.journal.clone(),
            image: self.image.try_clone()?,
            capacity: self.capacity,
        })
    }
}

/// A built VM. Fields drop in order: threads are stopped first (in `Drop`), then the VM, then memory.
pub struct Machine {
    description: MachineDescription,
    serial: Arc<Mutex<SerialDevice>>,
    i8042: Arc<Mutex<devices::legacy::I8042>>,
    cmos: Arc<Mutex<Cmos>>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    nics: Vec<Arc<Mutex<VirtioNet>>>,
    /// Per disk, what protection needs beside the device: its write journal and image.
    disk_access: Vec<DiskAccess>,
    vcpu_threads: Vec<JoinHandle<()>>,
    unstarted: Vec<Vcpu>,
    control: Arc<VcpuControl>,
    stop: Arc<StopSignals>,
    event_manager: EventManager<Subscriber>,
    vm: Arc<Vm>,
    /// A firmware-booted VM's chipset, with the firmware ROM KVM maps: dropped after the VM.
    q35: Option<q35::Q35Chipset>,
    memory: GuestMemory,
    vcpu_count: u8,
    emulation: Arc<EmulationCounters>,
    inbox: Option<ControlInbox>,
    control_handle: Option<ControlHandle>,
    /// Set when the guest was handed to another host; the event loop then ends.
    migrated_to: Option<String>,
    /// Tracking since the last snapshot, for diff snapshots.
    diff_base: Option<snapshot::DiffBase>,
    /// Who tracks dirty pages (protection, a migration); snapshots are refused meanwhile.
    dirty_ownership: crate::dirty::DirtyOwnership,
    /// The vCPUs' dirty rings, when the VM tracks with them.
    dirty_rings: Option<Arc<crate::dirty_ring::DirtyRings>>,
}

impl Machine {
    /// Starts every vCPU thread.
    pub fn start(&mut self) -> Result<(), MachineError> {
        // From now on SIGTERM and SIGINT end the VM through the event loop, like any ending.
        let stop = stop_signal::StopSignal::install().map_err(|source| MachineError::Io {
            what: "the stop signal's eventfd",
            source,
        })?;
        self.event_manager
            .add_subscriber(Arc::new(Mutex::new(stop)));
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

    /// Runs `f` with the vCPUs paused. It pauses them only if they run, and resumes only what it
    /// paused: a user's pause (or a VM not started yet) survives checkpoints, snapshots and looks.
    pub fn while_paused<T, E: From<MachineError>>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, E>,
    ) -> Result<T, E> {
        let pause = !self.vcpu_threads.is_empty() && !self.control.is_paused();
        if pause {
            self.pause()?;
        }
        let result = f(self);
        if pause {
            self.resume();
        }
        result
    }

    /// Whether the vCPUs are paused (by a user or for a checkpoint).
    pub fn is_paused(&self) -> bool {
        self.control.is_paused()
    }

    /// Waits until every vCPU thread has left the paused state after [`Machine::resume`].
    pub fn wait_running(&self, timeout: Duration) -> bool {
        self.control.wait_running(timeout)
    }

    /// Runs the event loop until the guest powers off, resets or crashes, then stops the vCPUs.
    /// The calling thread becomes the event loop and takes its seccomp filter (`seccomp.rs`).
    pub fn wait(&mut self) -> Result<VmExit, MachineError> {
        if self.vcpu_threads.is_empty() {
            return Err(MachineError::NotRunning);
        }
        crate::seccomp::apply(crate::seccomp::ThreadKind::EventLoop)?;
        let exit = loop {
            if let Some(exit) = self.stop_reason() {
                break exit;
            }
            self.event_manager
                .run()
                .map_err(|e| MachineError::EventLoop(format!("{e:?}")))?;
            self.serve_commands();
        };
        self.shutdown_vcpus();
        // Nobody serves commands any more: requests fail at once ("the VM has stopped") instead of
        // waiting out their timeouts.
        self.inbox = None;
        let fired = self.emulation.snapshot();
        if !fired.is_empty() {
            tracing::info!(
                ?fired,
                "instruction emulation fallback completed instructions KVM could not"
            );
        }
        Ok(exit)
    }

    /// A handle through which other threads (the API server) control this VM while
    /// [`Machine::wait`] runs its event loop.
    pub fn control_handle(&mut self) -> Result<ControlHandle, MachineError> {
        if let Some(handle) = &self.control_handle {
            return Ok(handle.clone());
        }
        let (handle, inbox, waker) = control_channel().map_err(|source| MachineError::Io {
            what: "the control channel",
            source,
        })?;
        self.event_manager
            .add_subscriber(Arc::new(Mutex::new(waker)));
        self.inbox = Some(inbox);
        self.control_handle = Some(handle.clone());
        Ok(handle)
    }

    fn serve_commands(&mut self) {
        while let Some((command, reply)) = self.inbox.as_ref().and_then(ControlInbox::next) {
            let span = tracing::info_span!("command", ?command);
            let _guard = span.enter();
            let answer = self.execute(command);
            // The requester may have given up waiting; that is not the VM's problem.
            let _ = reply.send(answer);
        }
    }

    /// Carries out one control command.
    pub fn execute(&mut self, command: VmCommand) -> VmReply {
        match command {
            VmCommand::Info => VmReply::Info(self.info()),
            VmCommand::Pause if self.control.is_paused() => {
                VmReply::Conflict("the VM is already paused".into())
            }
            VmCommand::Pause => match self.pause() {
                Ok(()) => VmReply::Done(self.info()),
                Err(e) => VmReply::Error(e.to_string()),
            },
            VmCommand::Resume if !self.control.is_paused() => {
                VmReply::Conflict("the VM is not paused".into())
            }
            VmCommand::Resume => {
                self.resume();
                VmReply::Done(self.info())
            }
            VmCommand::OnEventLoop(job) => job(self),
            VmCommand::Vcpus => match self.vcpu_summaries() {
                Ok(v) => VmReply::Vcpus(v),
                Err(e) => VmReply::Error(e.to_string()),
            },
            VmCommand::Snapshot { dir, diff } => match self.snapshot(
                &dir,
                if diff {
                    SnapshotKind::Diff
                } else {
                    SnapshotKind::Full
                },
            ) {
                Ok(info) => VmReply::Snapshot(SnapshotReport {
                    dir,
                    paused_ms: info.paused_for.as_secs_f64() * 1e3,
                    memory_bytes: info.memory_bytes,
                }),
                Err(e @ MachineError::DirtyTrackingBusy { .. }) => VmReply::Conflict(e.to_string()),
                Err(e) => VmReply::Error(e.to_string()),
            },
        }
    }

    /// Where every vCPU is; a running VM is paused for the look and resumed.
    pub fn vcpu_summaries(&mut self) -> Result<Vec<VcpuSummary>, MachineError> {
        let states = self.while_paused(|m| m.save_vcpus())?;
        Ok(states
            .iter()
            .map(|s| VcpuSummary {
                id: s.id,
                mp_state: s.mp_state.mp_state,
                rip: s.regs.rip,
                rsp: s.regs.rsp,
                rflags: s.regs.rflags,
                cr0: s.sregs.cr0,
                cr3: s.sregs.cr3,
                cr4: s.sregs.cr4,
                cpl: (s.sregs.cs.selector & 3) as u8,
                instruction: crate::arch::emulate::decode_at_rip(&self.memory, &s.regs, &s.sregs)
                    .map(|i| crate::arch::emulate::format_instruction(&i)),
            })
            .collect())
    }

    /// What the VM is and whether it runs.
    pub fn info(&self) -> VmInfo {
        VmInfo {
            state: if self.control.is_paused() {
                RunState::Paused
            } else {
                RunState::Running
            },
            vcpus: self.vcpu_count,
            memory_mib: self.description.memory_mib,
            disks: self
                .description
                .disks
                .iter()
                .map(|d| d.path.display().to_string())
                .collect(),
            nets: self
                .description
                .nets
                .iter()
                .map(|n| n.tap.clone())
                .collect(),
            emulated_instructions: self.emulation.total(),
        }
    }

    /// Makes `user` the one user of dirty tracking until the claim is dropped (`dirty.rs`); the
    /// snapshot diff base, which tracks too, is dropped. Fails naming the current holder.
    pub fn claim_dirty_tracking(
        &mut self,
        user: &'static str,
    ) -> Result<crate::dirty::DirtyClaim, MachineError> {
        let claim = self.dirty_ownership.claim(user).map_err(|held_by| {
            MachineError::DirtyTrackingBusy {
                held_by,
                wanted: user,
            }
        })?;
        self.invalidate_diff_base();
        Ok(claim)
    }

    /// Who holds dirty tracking now, if anyone.
    pub fn dirty_tracking_holder(&self) -> Option<&'static str> {
        self.dirty_ownership.holder()
    }

    /// A dirty-page tracker of the kind this VM uses (dirty ring or dirty log).
    pub fn dirty_tracker(&self) -> crate::dirty::DirtyTracker {
        match &self.dirty_rings {
            Some(rings) => crate::dirty::DirtyTracker::with_ring(rings.clone()),
            None => crate::dirty::DirtyTracker::new(),
        }
    }

    /// Puts every NIC's transmit path behind an epoch gate starting at `epoch` (replication), or
    /// back to pass-through (`None`: unprotected; anything held is released).
    pub fn set_output_gating(&self, epoch: Option<u64>) {
        for nic in &self.nics {
            let gate: Box<dyn devices::output_gate::OutputGate> = match epoch {
                Some(e) => Box::new(devices::output_gate::EpochGate::new(e)),
                None => Box::new(devices::output_gate::PassThroughGate::new()),
            };
            nic.lock()
                .unwrap_or_else(|e| e.into_inner())
                .set_output_gate(gate);
        }
    }

    /// Output produced from now on belongs to `epoch`.
    pub fn begin_output_epoch(&self, epoch: u64) {
        for nic in &self.nics {
            nic.lock()
                .unwrap_or_else(|e| e.into_inner())
                .begin_output_epoch(epoch);
        }
    }

    /// Every disk's journal and image, in guest order.
    pub fn disk_access(&self) -> std::io::Result<Vec<DiskAccess>> {
        self.disk_access.iter().map(DiskAccess::try_clone).collect()
    }

    /// Frames and bytes the NICs' output gates hold now.
    pub fn held_output(&self) -> (usize, usize) {
        self.nics.iter().fold((0, 0), |(frames, bytes), nic| {
            let (f, b) = nic.lock().unwrap_or_else(|e| e.into_inner()).held_output();
            (frames + f, bytes + b)
        })
    }

    /// Releases output held for epochs up to `epoch` while `permitted` says so, asked before every
    /// frame; returns the frames released.
    pub fn release_output(&self, epoch: u64, permitted: &dyn Fn() -> bool) -> usize {
        self.nics
            .iter()
            .map(|nic| {
                nic.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .release_output(epoch, permitted)
            })
            .sum()
    }

    /// Announces every NIC's MAC on its TAP (after the guest arrived from another host).
    pub fn announce_network(&self) {
        for nic in &self.nics {
            nic.lock().unwrap_or_else(|e| e.into_inner()).announce();
        }
    }

    /// Records that the guest now runs on `to`: this machine must never run it again.
    pub fn mark_migrated(&mut self, to: String) {
        self.migrated_to = Some(to);
    }

    fn stop_reason(&self) -> Option<VmExit> {
        if let Some(to) = &self.migrated_to {
            return Some(VmExit::MigratedAway { to: to.clone() });
        }
        let crash = self
            .stop
            .crash
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(report) = crash {
            return Some(VmExit::Crash(Box::new(report)));
        }
        if stop_signal::requested() {
            return Some(VmExit::Stopped);
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

    /// The VM's virtual hardware.
    pub fn description(&self) -> &MachineDescription {
        &self.description
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> u8 {
        self.vcpu_count
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// The KVM VM (shared with threads that read its dirty log during migration).
    pub fn vm(&self) -> &Arc<Vm> {
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
