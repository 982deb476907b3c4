//! The primary's epoch loop: every epoch, pause the vCPUs, take the dirty pages and the device and vCPU
//! state, start a new output epoch, resume; send the checkpoint; when the standby commits it, release
//! the output it produced.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm::control::{ControlHandle, VmCommand, VmReply};
use vmm::dirty::{DirtySet, DirtyTracker};
use vmm::memory::{GuestMemory, PAGE_SIZE};
use vmm::Machine;

use super::{ProtectionState, ProtectionStatus};
use crate::link::{self, Link, LinkSecurity, OpenError};
use crate::wire::{read_frame, write_frame, FrameError, Message, PageRun};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const IO_TIMEOUT: Duration = Duration::from_secs(5);
const BATCH_BYTES: usize = 4 << 20;
const JOB_TIMEOUT: Duration = Duration::from_secs(60);

/// How to protect a guest.
#[derive(Clone, Debug)]
pub struct ProtectionParams {
    /// The standby's `HOST:PORT` (where `ftvmm standby` listens).
    pub standby: String,
    /// How the link to the standby is protected.
    pub security: LinkSecurity,
    /// Time between checkpoints.
    pub epoch: Duration,
}

/// The running epoch loop.
pub struct ProtectionHandle {
    status: Arc<Mutex<ProtectionStatus>>,
    stop: Arc<AtomicBool>,
    _thread: JoinHandle<()>,
}

impl ProtectionHandle {
    /// Current status.
    pub fn status(&self) -> ProtectionStatus {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Stops checkpointing (the guest goes on, unprotected).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// The flag [`ProtectionHandle::stop`] sets, for whoever must stop the loop without the handle.
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }
}

#[derive(Debug, thiserror::Error)]
enum LoopError {
    #[error("{0}")]
    Link(#[from] OpenError),
    #[error("standby link: {0}")]
    Wire(#[from] FrameError),
    #[error("the standby refused: {0}")]
    Refused(String),
    #[error("unexpected message from the standby: {0}")]
    Protocol(String),
    #[error("the VM: {0}")]
    Vm(String),
}

type Status = Arc<Mutex<ProtectionStatus>>;
type Shared<T> = Arc<Mutex<T>>;

fn update(status: &Status, f: impl FnOnce(&mut ProtectionStatus)) {
    f(&mut status.lock().unwrap_or_else(|e| e.into_inner()));
}

/// A checkpoint taken with the vCPUs paused.
struct Checkpoint {
    runs: Vec<PageRun>,
    pages: u64,
    state: Vec<u8>,
    set: DirtySet,
    pause: Duration,
}

/// Starts protecting `machine`. Call on the VM's event-loop thread (from a control command).
pub fn start_protection(
    machine: &mut Machine,
    params: ProtectionParams,
    control: ControlHandle,
) -> std::io::Result<ProtectionHandle> {
    if !machine.description().disks.is_empty() {
        return Err(std::io::Error::other(
            "replicating disk writes is not implemented yet: a protected guest cannot have disks",
        ));
    }
    machine.invalidate_diff_base();
    let status = Arc::new(Mutex::new(ProtectionStatus {
        state: ProtectionState::Connecting,
        standby: params.standby.clone(),
        committed_epoch: 0,
        last_pause_ms: 0.0,
        last_pages: 0,
        last_commit_ms: 0.0,
        error: None,
    }));
    let stop = Arc::new(AtomicBool::new(false));
    let job = EpochLoop {
        description: machine.description().clone(),
        tracker: Arc::new(Mutex::new(machine.dirty_tracker())),
        params,
        control,
        status: status.clone(),
        stop: stop.clone(),
    };
    let thread = std::thread::Builder::new()
        .name("epoch-loop".into())
        .spawn(move || {
            vmm::seccomp::apply_or_exit(vmm::seccomp::ThreadKind::Replication);
            job.run()
        })?;
    Ok(ProtectionHandle {
        status,
        stop,
        _thread: thread,
    })
}

struct EpochLoop {
    description: vmm::machine::MachineDescription,
    tracker: Shared<DirtyTracker>,
    params: ProtectionParams,
    control: ControlHandle,
    status: Status,
    stop: Arc<AtomicBool>,
}

impl EpochLoop {
    fn run(self) {
        let span = tracing::info_span!("epoch_loop", standby = %self.params.standby);
        let _guard = span.enter();
        let result = self.protect();
        if let Err(e) = &result {
            tracing::warn!("protection lost: {e}; the guest runs unprotected");
        }
        // Whatever happened, the guest must not keep its output held: release it and stop tracking.
        let tracker = self.tracker.clone();
        let _ = self.control.request(
            VmCommand::Run(Box::new(move |m: &mut Machine| {
                m.set_output_gating(None);
                let mut t = tracker.lock().unwrap_or_else(|e| e.into_inner());
                if t.is_active() {
                    let _ = t.stop(m.vm(), m.memory());
                }
                VmReply::Done(m.info())
            })),
            JOB_TIMEOUT,
        );
        update(&self.status, |s| {
            s.state = ProtectionState::Degraded;
            if let Err(e) = result {
                s.error = Some(e.to_string());
            }
        });
    }

    fn protect(&self) -> Result<(), LoopError> {
        let mut stream = link::open(
            &self.params.standby,
            &self.description,
            &self.params.security,
            CONNECT_TIMEOUT,
            IO_TIMEOUT,
        )?;
        update(&self.status, |s| s.state = ProtectionState::Syncing);
        for epoch in 0u64.. {
            if self.stop.load(Ordering::SeqCst) {
                return Ok(());
            }
            if epoch > 0 {
                std::thread::sleep(self.params.epoch);
            }
            let span = tracing::debug_span!("epoch", epoch);
            let _guard = span.enter();
            let cp = self.checkpoint(epoch)?;
            let t0 = Instant::now();
            if let Err(e) = send_checkpoint(&mut stream, epoch, &cp) {
                // Never lose a dirty set: whoever tracks next must see these pages again.
                self.tracker
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .fold_back(&cp.set);
                return Err(e);
            }
            match read_frame::<_, Message>(&mut stream)? {
                Message::Committed { epoch: e } if e == epoch => {}
                Message::Error { message } => return Err(LoopError::Refused(message)),
                other => {
                    return Err(LoopError::Protocol(format!(
                        "expected Committed {epoch}, got {other:?}"
                    )))
                }
            }
            let commit = t0.elapsed();
            self.run_job(move |m| {
                m.release_output(epoch);
                VmReply::Done(m.info())
            })?;
            update(&self.status, |s| {
                s.state = ProtectionState::Protected;
                s.committed_epoch = epoch;
                s.last_pause_ms = cp.pause.as_secs_f64() * 1e3;
                s.last_pages = cp.pages;
                s.last_commit_ms = commit.as_secs_f64() * 1e3;
            });
            if epoch == 0 {
                tracing::info!("guest protected by {}", self.params.standby);
            }
        }
        Ok(())
    }

    fn run_job(
        &self,
        job: impl FnOnce(&mut Machine) -> VmReply + Send + 'static,
    ) -> Result<(), LoopError> {
        match self
            .control
            .request(VmCommand::Run(Box::new(job)), JOB_TIMEOUT)
        {
            Ok(VmReply::Done(_)) => Ok(()),
            Ok(VmReply::Error(e)) => Err(LoopError::Vm(e)),
            Ok(other) => Err(LoopError::Vm(format!("unexpected reply {other:?}"))),
            Err(e) => Err(LoopError::Vm(e.to_string())),
        }
    }

    /// Takes checkpoint `epoch` on the event-loop thread: the first one is all of memory.
    fn checkpoint(&self, epoch: u64) -> Result<Checkpoint, LoopError> {
        let slot: Shared<Option<Result<Checkpoint, String>>> = Arc::new(Mutex::new(None));
        let out = slot.clone();
        let tracker = self.tracker.clone();
        self.run_job(move |m| {
            let result = take_checkpoint(m, &tracker, epoch);
            let reply = match &result {
                Ok(_) => VmReply::Done(m.info()),
                Err(e) => VmReply::Error(e.clone()),
            };
            *out.lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
            reply
        })?;
        let taken = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
        match taken {
            Some(Ok(cp)) => Ok(cp),
            Some(Err(e)) => Err(LoopError::Vm(e)),
            None => Err(LoopError::Vm("checkpoint job did not run".into())),
        }
    }
}

/// With the vCPUs paused: the pages dirtied since the last checkpoint (all of them for epoch 0), the
/// state, and the start of output epoch `epoch + 1`.
fn take_checkpoint(
    m: &mut Machine,
    tracker: &Mutex<DirtyTracker>,
    epoch: u64,
) -> Result<Checkpoint, String> {
    let t0 = Instant::now();
    m.pause().map_err(|e| e.to_string())?;
    let mut tracker = tracker.lock().unwrap_or_else(|e| e.into_inner());
    let result = (|| {
        let set = if epoch == 0 {
            tracker
                .start(m.vm(), m.memory())
                .map_err(|e| e.to_string())?;
            m.set_output_gating(Some(1));
            DirtySet::all(m.memory())
        } else {
            tracker
                .collect(m.vm(), m.memory())
                .map_err(|e| e.to_string())?;
            m.begin_output_epoch(epoch + 1);
            tracker.take()
        };
        let (runs, pages) = copy_pages(m.memory(), &set, epoch == 0)?;
        let state = m.capture_state().map_err(|e| e.to_string())?;
        let state = vmm::snapshot::encode(&state).map_err(|e| e.to_string())?;
        Ok::<_, String>((runs, pages, state, set))
    })();
    m.resume();
    let (runs, pages, state, set) = result?;
    Ok(Checkpoint {
        runs,
        pages,
        state,
        set,
        pause: t0.elapsed(),
    })
}

/// Copies the pages of `set` out of guest memory (skipping all-zero pages when `skip_zero`).
fn copy_pages(
    mem: &GuestMemory,
    set: &DirtySet,
    skip_zero: bool,
) -> Result<(Vec<PageRun>, u64), String> {
    let mut runs: Vec<PageRun> = Vec::new();
    let mut pages = 0;
    let mut page = vec![0u8; PAGE_SIZE];
    for (addr, len) in set.runs() {
        for offset in (0..len).step_by(PAGE_SIZE) {
            let gpa = addr.0 + offset;
            mem.read_slice(&mut page, GuestAddress(gpa))
                .map_err(|e| format!("reading guest page {gpa:#x}: {e}"))?;
            if skip_zero && page.iter().all(|b| *b == 0) {
                continue;
            }
            match runs.last_mut() {
                Some(last)
                    if last.gpa + last.data.len() as u64 == gpa
                        && last.data.len() < BATCH_BYTES =>
                {
                    last.data.extend_from_slice(&page)
                }
                _ => runs.push(PageRun {
                    gpa,
                    data: page.clone(),
                }),
            }
            pages += 1;
        }
    }
    Ok((runs, pages))
}

fn send_checkpoint(stream: &mut Link, epoch: u64, cp: &Checkpoint) -> Result<(), LoopError> {
    let mut batch: Vec<PageRun> = Vec::new();
    let mut bytes = 0;
    for run in &cp.runs {
        bytes += run.data.len();
        batch.push(run.clone());
        if bytes >= BATCH_BYTES {
            write_frame(
                stream,
                &Message::EpochPages {
                    epoch,
                    runs: std::mem::take(&mut batch),
                },
            )?;
            bytes = 0;
        }
    }
    if !batch.is_empty() {
        write_frame(stream, &Message::EpochPages { epoch, runs: batch })?;
    }
    write_frame(
        stream,
        &Message::EpochEnd {
            epoch,
            pages: cp.pages,
            state: cp.state.clone(),
        },
    )?;
    Ok(())
}
