//! vCPUs: configuration at boot, and one thread per vCPU running `KVM_RUN` and dispatching its exits
//! to the port I/O and MMIO buses.

pub mod control;
pub mod kick;
pub mod state;

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use devices::{Bus, GuestExitEvent, GuestExitRequest};
use kvm_bindings::CpuId;
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};

use crate::arch::cpuid::normalize_for_vcpu;
use crate::arch::emulate::{self, EmulationCounters};
use crate::arch::regs::{self, EntryMode, RegsError};
use crate::crash::{CrashKind, CrashReport};
use crate::memory::GuestMemory;
pub use control::{Directive, RequestError, VcpuControl, VcpuRequest};
pub use state::{VcpuState, VcpuStateError};

const KVM_INTERNAL_ERROR_EMULATION: u32 = 1;
const KVM_EXIT_DIRTY_RING_FULL: u32 = kvm_bindings::KVM_EXIT_DIRTY_RING_FULL;

/// Errors creating or configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot create vCPU {id}: {source}")]
    Create { id: u8, source: kvm_ioctls::Error },
    #[error("cannot set CPUID of vCPU {id}: {source}")]
    Cpuid { id: u8, source: kvm_ioctls::Error },
    #[error("cannot set up boot state of vCPU {id}: {source}")]
    Regs { id: u8, source: RegsError },
    #[error("cannot start the thread of vCPU {id}: {source}")]
    Spawn { id: u8, source: std::io::Error },
}

/// Where a vCPU reports that the VM must stop: the guest's own requests and crashes share one
/// eventfd so the VMM's event loop wakes for either.
pub struct StopSignals {
    pub guest_exit: Arc<GuestExitEvent>,
    pub crash: Mutex<Option<CrashReport>>,
}

impl StopSignals {
    /// Records a crash (the first one wins) and wakes the event loop.
    pub fn crashed(&self, report: CrashReport) {
        let mut slot = self.crash.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            tracing::error!(vcpu = report.vcpu, kind = %report.kind, "guest crashed");
            *slot = Some(report);
        }
        drop(slot);
        if let Err(e) = self.guest_exit.eventfd().write(1) {
            tracing::error!("cannot wake the VMM event loop: {e}");
        }
    }
}

/// One vCPU and everything its thread needs.
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
    io_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    memory: GuestMemory,
    control: Arc<VcpuControl>,
    stop: Arc<StopSignals>,
    emulation: Arc<EmulationCounters>,
    msr_indices: Arc<Vec<u32>>,
}

/// What vCPUs share.
#[derive(Clone)]
pub struct VcpuShared {
    pub io_bus: Arc<Bus>,
    pub mmio_bus: Arc<Bus>,
    pub memory: GuestMemory,
    pub control: Arc<VcpuControl>,
    pub stop: Arc<StopSignals>,
    pub emulation: Arc<EmulationCounters>,
}

impl Vcpu {
    /// Creates vCPU `id` in `vm`.
    pub fn new(vm: &VmFd, id: u8, shared: VcpuShared) -> Result<Self, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(|source| VcpuError::Create { id, source })?;
        Ok(Self {
            id,
            fd,
            io_bus: shared.io_bus,
            mmio_bus: shared.mmio_bus,
            memory: shared.memory,
            control: shared.control,
            stop: shared.stop,
            emulation: shared.emulation,
            msr_indices: Arc::default(),
        })
    }

    /// The vCPU's index (and APIC ID).
    pub fn id(&self) -> u8 {
        self.id
    }

    /// Sets CPUID, MSRs, FPU and LAPIC pins; for the boot vCPU (`entry` given) also its registers.
    pub fn configure(
        &self,
        base_cpuid: &CpuId,
        vcpu_count: u8,
        entry: Option<EntryMode>,
    ) -> Result<(), VcpuError> {
        let id = self.id;
        self.set_cpuid(base_cpuid, vcpu_count)?;
        let regs_err = |source| VcpuError::Regs { id, source };
        regs::setup_msrs(&self.fd).map_err(regs_err)?;
        regs::setup_fpu(&self.fd).map_err(regs_err)?;
        regs::setup_lint(&self.fd).map_err(regs_err)?;
        if let Some(mode) = entry {
            regs::setup_sregs(&self.memory, &self.fd, mode).map_err(regs_err)?;
            regs::setup_regs(&self.fd, mode).map_err(regs_err)?;
        }
        Ok(())
    }

    /// Gives the vCPU `base_cpuid`, made its own (APIC ID, topology for `vcpu_count` vCPUs). All a
    /// vCPU that starts in its reset state, as under firmware, needs.
    pub fn set_cpuid(&self, base_cpuid: &CpuId, vcpu_count: u8) -> Result<(), VcpuError> {
        let id = self.id;
        let mut cpuid = base_cpuid.clone();
        normalize_for_vcpu(&mut cpuid, id, vcpu_count);
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(|source| VcpuError::Cpuid { id, source })
    }

    /// The vCPU file descriptor.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Sets which MSRs snapshots capture (see [`state::saveable_msrs`]).
    pub fn set_msr_indices(&mut self, indices: Arc<Vec<u32>>) {
        self.msr_indices = indices;
    }

    /// Captures the state of this (not yet started) vCPU.
    pub fn save_state(&self) -> Result<VcpuState, VcpuStateError> {
        VcpuState::capture(&self.fd, self.id, &self.msr_indices)
    }

    /// Loads `state` into this (not yet started) vCPU.
    pub fn restore_state(&self, state: &VcpuState) -> Result<(), VcpuStateError> {
        state.restore(&self.fd)
    }

    /// Starts the vCPU's thread.
    pub fn spawn(self) -> Result<JoinHandle<()>, VcpuError> {
        let id = self.id;
        self.control.thread_started();
        let control = self.control.clone();
        std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::Vcpu);
                let mut vcpu = self;
                vcpu.run_loop();
            })
            .map_err(|source| {
                control.thread_exited();
                VcpuError::Spawn { id, source }
            })
    }

    fn run_loop(&mut self) {
        let span = tracing::info_span!("vcpu", id = self.id);
        let _guard = span.enter();
        kick::set_thread_kvm_run(self.fd.get_kvm_run());
        loop {
            if self.control.needs_attention() {
                self.complete_pending_access();
                let (fd, id, msrs) = (&self.fd, self.id, self.msr_indices.clone());
                let mut serve = |request: VcpuRequest| serve_request(fd, id, &msrs, request);
                if self.control.checkpoint(id, &mut serve) == Directive::Stop {
                    break;
                }
            }
            if let Err(kind) = self.run_once() {
                let report = CrashReport::capture(self.id, kind, &self.fd, &self.memory);
                self.stop.crashed(report);
                break;
            }
        }
        kick::set_thread_kvm_run(std::ptr::null_mut());
        self.control.thread_exited();
    }

    /// Enters the guest once and handles the exit. `Err` means the guest cannot continue.
    fn run_once(&mut self) -> Result<(), CrashKind> {
        let exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                return Ok(());
            }
            Err(e) => return Err(CrashKind::RunFailed(e.to_string())),
        };
        match exit {
            VcpuExit::IoIn(port, data) => {
                if !self.io_bus.read(u64::from(port), data) {
                    data.fill(0xff);
                }
            }
            VcpuExit::IoOut(port, data) => {
                self.io_bus.write(u64::from(port), data);
            }
            VcpuExit::MmioRead(addr, data) => {
                if !self.mmio_bus.read(addr, data) {
                    tracing::debug!("unclaimed MMIO read at {addr:#x}");
                    data.fill(0xff);
                }
            }
            VcpuExit::MmioWrite(addr, data) => {
                if !self.mmio_bus.write(addr, data) {
                    tracing::debug!("unclaimed MMIO write at {addr:#x}");
                }
            }
            VcpuExit::Hlt | VcpuExit::Intr | VcpuExit::IrqWindowOpen => {}
            VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL) => {
                // The dirty tracker harvests and resets the ring; wait for it rather than spin.
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
            VcpuExit::Shutdown => return Err(CrashKind::TripleFault),
            VcpuExit::InternalError => return self.handle_internal_error(),
            VcpuExit::FailEntry(reason, _cpu) => return Err(CrashKind::FailEntry { reason }),
            VcpuExit::SystemEvent(kind, _) => match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => {
                    self.stop.guest_exit.request(GuestExitRequest::PowerOff)
                }
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => {
                    self.stop.guest_exit.request(GuestExitRequest::Reset)
                }
                other => {
                    return Err(CrashKind::UnexpectedExit(format!("system event {other}")));
                }
            },
            other => return Err(CrashKind::UnexpectedExit(format!("{other:?}"))),
        }
        Ok(())
    }

    /// An emulation failure may be an instruction ftvmm can complete itself; anything else is fatal.
    fn handle_internal_error(&mut self) -> Result<(), CrashKind> {
        let kind = self.internal_error();
        if let CrashKind::InternalError {
            suberror: KVM_INTERNAL_ERROR_EMULATION,
            ..
        } = kind
        {
            match emulate::try_complete(&self.fd, &self.memory, &self.emulation) {
                Ok(Some(done)) => {
                    tracing::trace!(?done, "completed an instruction KVM could not emulate");
                    return Ok(());
                }
                Ok(None) => {}
                Err(e) => tracing::error!("emulation fallback failed: {e}"),
            }
        }
        Err(kind)
    }

    fn internal_error(&mut self) -> CrashKind {
        let run = self.fd.get_kvm_run();
        // SAFETY: KVM filled the `internal` member of the exit union for KVM_EXIT_INTERNAL_ERROR,
        // which is the exit being handled.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let n = (internal.ndata as usize).min(internal.data.len());
        CrashKind::InternalError {
            suberror: internal.suberror,
            data: internal.data[..n].to_vec(),
        }
    }

    /// Lets KVM finish a port or MMIO read whose data the VMM supplied, without entering the guest,
    /// so that a paused vCPU has no access half done.
    fn complete_pending_access(&mut self) {
        self.fd.set_kvm_immediate_exit(1);
        match self.fd.run() {
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => tracing::warn!("completing pending access: KVM_RUN failed: {e}"),
            Ok(exit) => tracing::warn!("completing pending access: unexpected exit {exit:?}"),
        }
        self.fd.set_kvm_immediate_exit(0);
    }
}

/// Serves a request on a parked vCPU's own thread.
fn serve_request(fd: &VcpuFd, id: u8, msr_indices: &[u32], request: VcpuRequest) {
    // A dropped receiver means the requester gave up; nothing to do.
    match request {
        VcpuRequest::SaveState(reply) => {
            let _ = reply.send(VcpuState::capture(fd, id, msr_indices));
        }
        VcpuRequest::RestoreState(state, reply) => {
            let _ = reply.send(state.restore(fd));
        }
    }
}
