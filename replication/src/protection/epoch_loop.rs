//! The primary's epoch loop: every epoch, pause the vCPUs, take the dirty pages and the device and vCPU
//! state, start a new output epoch, resume; send the checkpoint; when the standby commits it, release
//! the output it produced. Checkpoints are pipelined: the next one is taken on time while earlier
//! ones are still being committed (`in_flight.rs`). When the guest ends, or protection is stopped,
//! the loop tells the standby why (`Goodbye`), so that it ends instead of resuming a guest that is
//! gone or goes on here.
//! Taking and sending one checkpoint is `checkpoint.rs`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm::control::{ControlHandle, VmCommand, VmReply};
use vmm::dirty::DirtyTracker;
use vmm::machine::DiskAccess;
use vmm::Machine;

use super::checkpoint::{send_checkpoint, send_memory_image, take_checkpoint, Checkpoint};
use super::copy_on_write::CopyOnWrite;
use super::disk_copy;
use super::epoch_length::{EpochClock, EpochLength};
use super::heartbeat::{self, StandbyTerms, StandbyWatch};
use super::in_flight::{InFlight, SentCheckpoint};
use super::page_delta::{SentPages, DEFAULT_CACHE_BYTES};
use super::primary_claim::PrimaryClaim;
use super::{ProtectionState, ProtectionStatus, SyncProgress};
use crate::link::{self, Link, LinkSecurity, OpenError};
use crate::wire::{read_frame, write_frame, Ending, FrameError, FrameReader, Message, ProbeKey};
use crate::witness::{HeldClaim, Witness};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on one read or write of the checkpoint link. Liveness comes from the heartbeat channel
/// (`heartbeat.rs`), which shuts this link down when the standby is lost; this only bounds a
/// standby that answers heartbeats but never takes a checkpoint.
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// Added to the standby's failure timeout before output is released without it.
const HOLD_MARGIN: Duration = Duration::from_millis(100);
const JOB_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the goodbye may take to write before the loop gives up on it.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the loop waits, once the VM stopped answering, for [`ProtectionHandle::finish`] to say
/// how the guest ended.
const ENDING_GRACE: Duration = Duration::from_secs(1);

/// How to protect a guest.
#[derive(Clone, Debug)]
pub struct ProtectionParams {
    /// The standby's `HOST:PORT` (where `ftvmm standby` listens).
    pub standby: String,
    /// How the link to the standby is protected.
    pub security: LinkSecurity,
    /// Time between checkpoints: fixed, or adaptive within bounds (`epoch_length.rs`).
    pub epoch: EpochLength,
    /// The witness that decides which copy may act (`crate::witness`); without one, the safe rule
    /// of `heartbeat.rs` applies.
    pub witness: Option<Arc<Witness>>,
    /// The claim this copy already holds at the witness (a primary that went on unprotected, a
    /// standby that took over): protection swaps it for a `protected` one instead of creating one.
    pub claim: Option<HeldClaim>,
    /// How a checkpoint's pages are copied: after the vCPUs resumed, under write protection (the
    /// default; falls back to the other where the host's userfaultfd cannot), or while they are
    /// paused.
    pub checkpoint_copy: CheckpointCopy,
}

/// When a checkpoint's dirty pages are copied (`ftvmm run --checkpoint-copy`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CheckpointCopy {
    /// After the vCPUs resumed, each page write-protected until copied (`copy_on_write.rs`): the
    /// pause does not grow with the dirty set.
    #[default]
    OnWrite,
    /// While the vCPUs are paused.
    Paused,
}

impl std::str::FromStr for CheckpointCopy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "on-write" => Ok(Self::OnWrite),
            "paused" => Ok(Self::Paused),
            other => Err(format!("`{other}`: expected on-write or paused")),
        }
    }
}

/// `ftvmm run` exits with this status when the witness says another copy took over.
pub const FENCED_EXIT: i32 = 5;

/// The running epoch loop. Clones share the one loop.
#[derive(Clone)]
pub struct ProtectionHandle {
    status: Arc<Mutex<ProtectionStatus>>,
    stop: Arc<AtomicBool>,
    ending: Shared<Option<Ending>>,
    claim: Shared<Option<HeldClaim>>,
    thread: Shared<Option<JoinHandle<()>>>,
}

impl ProtectionHandle {
    /// Current status.
    pub fn status(&self) -> ProtectionStatus {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The claim this copy holds at the witness now (after protection ended: its `unprotected`
    /// claim, which a new protection takes over).
    pub fn claim(&self) -> Option<HeldClaim> {
        self.claim.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Stops checkpointing (the guest goes on, unprotected); the standby is told and ends.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// The guest ended (`ending`): tells the standby, so that it ends instead of resuming the guest,
    /// and waits up to `within` for the loop to finish.
    pub fn finish(&self, ending: Ending, within: Duration) {
        *self.ending.lock().unwrap_or_else(|e| e.into_inner()) = Some(ending);
        self.unprotect(within);
    }

    /// Stops protection while the guest goes on: the standby is told and ends, held output is
    /// released, dirty tracking is given up. Waits up to `within` for the loop to finish; returns
    /// whether it did.
    pub fn unprotect(&self, within: Duration) -> bool {
        self.stop();
        let deadline = Instant::now() + within;
        let mut thread = self.thread.lock().unwrap_or_else(|e| e.into_inner());
        while thread.as_ref().is_some_and(|t| !t.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        match thread.take() {
            Some(t) if t.is_finished() => {
                let _ = t.join();
                true
            }
            None => true,
            Some(t) => {
                *thread = Some(t);
                tracing::warn!("the epoch loop did not finish within {within:?}");
                false
            }
        }
    }
}

/// Queues `command` on the VM's event loop and waits until it has run, however long that takes:
/// `on_wait` hears of every `every` waited. Fails only when the VM has ended.
fn until_done(
    control: &ControlHandle,
    command: VmCommand,
    every: Duration,
    mut on_wait: impl FnMut(Duration),
) -> Result<VmReply, vmm::control::ControlError> {
    let pending = control.submit(command)?;
    let mut waited = Duration::ZERO;
    loop {
        match pending.wait(every) {
            Err(vmm::control::ControlError::Timeout(_)) => {
                waited += every;
                on_wait(waited);
            }
            done => return done,
        }
    }
}

/// How a guest's end is told to the standby.
pub fn ending_of(exit: &vmm::VmExit) -> Ending {
    match exit {
        vmm::VmExit::PowerOff => Ending::PoweredOff,
        vmm::VmExit::Reset => Ending::Reset,
        vmm::VmExit::Crash(_) => Ending::Crashed,
        vmm::VmExit::Stopped => Ending::Stopped,
        vmm::VmExit::MigratedAway { to } => Ending::Unprotected {
            reason: format!("the guest migrated to {to}"),
        },
    }
}

#[derive(Debug, thiserror::Error)]
pub(super) enum LoopError {
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
    #[error("heartbeat channel: {0}")]
    Heartbeat(String),
}

type Status = Arc<Mutex<ProtectionStatus>>;
type Shared<T> = Arc<Mutex<T>>;

fn update(status: &Status, f: impl FnOnce(&mut ProtectionStatus)) {
    f(&mut status.lock().unwrap_or_else(|e| e.into_inner()));
}

/// Starts protecting `machine`. Call on the VM's event-loop thread (from a control command).
pub fn start_protection(
    machine: &mut Machine,
    params: ProtectionParams,
    control: ControlHandle,
) -> std::io::Result<ProtectionHandle> {
    let dirty_claim = machine
        .claim_dirty_tracking("protection")
        .map_err(std::io::Error::other)?;
    let status = Arc::new(Mutex::new(ProtectionStatus {
        state: ProtectionState::Connecting,
        standby: params.standby.clone(),
        committed_epoch: 0,
        epoch_ms: 0.0,
        last_pause_ms: 0.0,
        last_pause_stopping_ms: 0.0,
        last_pages: 0,
        last_write_faults: 0,
        write_faults_between_copies: 0,
        last_page_bytes: 0,
        last_commit_ms: 0.0,
        heartbeat_age_ms: None,
        generation: None,
        held_frames: 0,
        held_bytes: 0,
        sync: Default::default(),
        error: None,
    }));
    let stop = Arc::new(AtomicBool::new(false));
    let ending = Arc::new(Mutex::new(None));
    let session = heartbeat::new_session();
    let claim = Arc::new(Mutex::new(None));
    let primary_claim = match &params.witness {
        Some(witness) => Some(
            PrimaryClaim::protect(
                witness.clone(),
                params.claim.clone(),
                session,
                claim.clone(),
            )
            .map_err(std::io::Error::other)?,
        ),
        None => None,
    };
    let watch = StandbyWatch::spawn()?;
    let disks: Arc<[DiskAccess]> = machine.disk_access()?.into();
    let copy_on_write = match params.checkpoint_copy {
        CheckpointCopy::OnWrite => match CopyOnWrite::new(machine.memory()) {
            Ok(c) => Some(Arc::new(c)),
            Err(e) => {
                tracing::warn!("{e}; checkpoints copy their pages with the vCPUs paused");
                None
            }
        },
        CheckpointCopy::Paused => None,
    };
    let job = EpochLoop {
        copy_on_write,
        watch,
        disks,
        memory: machine.memory().clone(),
        vm: machine.vm().clone(),
        primary_claim,
        description: machine.description().clone(),
        tracker: Arc::new(Mutex::new(machine.dirty_tracker())),
        params,
        control,
        status: status.clone(),
        stop: stop.clone(),
        ending: ending.clone(),
    };
    let thread = std::thread::Builder::new()
        .name("epoch-loop".into())
        .spawn(move || {
            // Held for the thread's life: nobody else collects the dirty bits meanwhile.
            let _dirty_claim = dirty_claim;
            // Before the sandbox, which forbids the files name resolution reads.
            let standby = link::PeerAddress::resolve(&job.params.standby);
            vmm::seccomp::apply_or_exit(vmm::seccomp::ThreadKind::Replication);
            job.run(standby)
        })?;
    Ok(ProtectionHandle {
        status,
        stop,
        ending,
        claim,
        thread: Arc::new(Mutex::new(Some(thread))),
    })
}

struct EpochLoop {
    watch: StandbyWatch,
    /// Guest memory and the VM, for the first copy of memory while the guest runs.
    memory: vmm::memory::GuestMemory,
    vm: Arc<vmm::vm::Vm>,
    /// The guest's disks: their images are copied first, their writes journalled per epoch.
    disks: Arc<[DiskAccess]>,
    /// Guest memory registered for write protection: checkpoints copy their pages after the pause.
    copy_on_write: Option<Arc<CopyOnWrite>>,
    /// With a witness: the claim this protection holds there, and the policy around it.
    primary_claim: Option<PrimaryClaim>,
    description: vmm::machine::MachineDescription,
    tracker: Shared<DirtyTracker>,
    params: ProtectionParams,
    control: ControlHandle,
    status: Status,
    stop: Arc<AtomicBool>,
    ending: Shared<Option<Ending>>,
}

impl EpochLoop {
    fn run(mut self, standby: Result<link::PeerAddress, link::OpenError>) {
        let span = tracing::info_span!("epoch_loop", standby = %self.params.standby);
        let _guard = span.enter();
        let result = standby
            .map_err(LoopError::from)
            .and_then(|standby| self.protect(&standby));
        if let Err(e) = &result {
            tracing::warn!("protection lost: {e}; the guest runs unprotected");
        }
        // Whatever happened, the guest must not keep its output held: release it and stop tracking.
        // The status says protection ended only once that is done: a VM slow to answer is waited
        // for, never given up on (its transmit would stay stopped behind the gate).
        let tracker = self.tracker.clone();
        let status = self.status.clone();
        let released = until_done(
            &self.control,
            VmCommand::OnEventLoop(Box::new(move |m: &mut Machine| {
                m.set_output_gating(None);
                let mut t = tracker.lock().unwrap_or_else(|e| e.into_inner());
                if t.is_active() {
                    let _ = t.stop(m.vm(), m.memory());
                }
                VmReply::Done(m.info())
            })),
            JOB_TIMEOUT,
            |waited| {
                tracing::warn!(
                    waited_s = waited.as_secs(),
                    "the VM has not yet released the output held for the standby; waiting"
                );
                update(&status, |s| {
                    s.error = Some(format!(
                        "output still held: the VM has not answered its release for {} s",
                        waited.as_secs()
                    ))
                });
            },
        );
        if let Err(e) = released {
            tracing::info!("output not released: {e}");
        }
        // Write protection ends (its fault server stopped, guest memory unregistered) before the
        // status says protection ended: a re-protection may follow at once.
        drop(self.copy_on_write.take());
        update(&self.status, |s| match result {
            Ok(()) => s.state = ProtectionState::Unprotected,
            Err(e) => {
                s.state = ProtectionState::Degraded;
                s.error = Some(e.to_string());
            }
        });
    }

    fn protect(&self, standby: &link::PeerAddress) -> Result<(), LoopError> {
        let mut stream = link::open(
            standby,
            &self.description,
            &self.params.security,
            CONNECT_TIMEOUT,
            IO_TIMEOUT,
        )?;
        let total_bytes = self.disks.iter().map(|d| d.capacity).sum::<u64>()
            + (self.description.memory_mib << 20);
        update(&self.status, |s| {
            s.state = ProtectionState::Syncing;
            s.sync = SyncProgress {
                done_bytes: 0,
                total_bytes,
            };
        });
        let status = self.status.clone();
        let mut progress = move |bytes: u64| update(&status, |s| s.sync.done_bytes += bytes);
        let (result, failure_timeout) = match self.open_heartbeat(&mut stream, standby) {
            Ok(failure_timeout) => (
                self.tell_claim(&mut stream)
                    .and_then(|()| disk_copy::send_images(&mut stream, &self.disks, &mut progress))
                    .and_then(|()| {
                        send_memory_image(
                            &mut stream,
                            &self.memory,
                            &self.vm,
                            &self.tracker,
                            &mut progress,
                            &mut |stream| {
                                disk_copy::resend_written(
                                    stream,
                                    &self.disks,
                                    disk_copy::RESEND_ABOVE,
                                    disk_copy::RESEND_STEP,
                                )
                            },
                        )
                    })
                    .and_then(|()| disk_copy::converge(&mut stream, &self.disks))
                    .and_then(|()| self.checkpoint_epochs(&mut stream)),
                Some(failure_timeout),
            ),
            Err(e) => (Err(e), None),
        };
        for disk in self.disks.iter() {
            disk.journal.stop();
        }
        // From here the standby's count of this primary as alive runs out.
        self.watch.stop_answering();
        // Unless the link itself failed, the standby hears why protection ends, so that it does
        // not resume a guest that ended or goes on here.
        let ending = match &result {
            Ok(()) => Some(self.ending().unwrap_or(Ending::Unprotected {
                reason: "protection was stopped".into(),
            })),
            Err(LoopError::Vm(reason)) => {
                Some(self.wait_for_ending().unwrap_or(Ending::Unprotected {
                    reason: format!("the VM: {reason}"),
                }))
            }
            Err(LoopError::Refused(_) | LoopError::Protocol(_) | LoopError::Heartbeat(_)) => {
                Some(Ending::Unprotected {
                    reason: "the standby broke the protocol".into(),
                })
            }
            Err(LoopError::Link(_) | LoopError::Wire(_)) => None,
        };
        let told = ending.as_ref().is_some_and(|ending| {
            let _ = stream.set_write_timeout(Some(GOODBYE_TIMEOUT));
            match write_frame(
                &mut stream,
                &Message::Goodbye {
                    ending: ending.clone(),
                },
            ) {
                Ok(()) => {
                    tracing::info!(%ending, "told the standby protection ends");
                    true
                }
                Err(e) => {
                    tracing::warn!(%ending, "could not tell the standby: {e}");
                    false
                }
            }
        });
        if told {
            stream.close();
        }
        // And always on the control channel, whose goodbye the standby reads before its close
        // whatever became of the checkpoint link: a standby that hears of this primary's end only
        // later (its host was frozen, the network cut) never takes that end for a death.
        let said_goodbye = self
            .watch
            .goodbye(&ending.unwrap_or_else(|| Ending::Unprotected {
                reason: match &result {
                    Err(e) => format!("the primary goes on without this standby: {e}"),
                    Ok(()) => "protection was stopped".into(),
                },
            }));
        let told = told || said_goodbye;
        match (&self.primary_claim, failure_timeout) {
            (Some(claim), _) => {
                let guest_ended = matches!(
                    self.ending(),
                    Some(Ending::PoweredOff | Ending::Reset | Ending::Crashed | Ending::Stopped)
                );
                if result.is_err() && !told && !guest_ended {
                    tracing::warn!("going on without the standby: asking the witness first");
                }
                claim.settle(guest_ended)
            }
            (None, Some(timeout)) if !told => {
                // The standby may still count this primary alive (and take over if it saw the
                // link close) until its failure timeout after our last echo: hold the output.
                tracing::warn!(
                    hold_ms = (timeout + HOLD_MARGIN).as_millis() as u64,
                    "holding output until the standby can no longer take over"
                );
                std::thread::sleep(timeout + HOLD_MARGIN);
            }
            _ => {}
        }
        result
    }

    /// Reads the standby's terms and opens the heartbeat (probes and control channel); returns the
    /// standby's failure timeout.
    fn open_heartbeat(
        &self,
        stream: &mut Link,
        standby: &link::PeerAddress,
    ) -> Result<Duration, LoopError> {
        let terms = match read_frame::<_, Message>(stream)? {
            Message::Standing {
                session,
                failure_timeout_ms,
                heartbeat_ms,
                probe_secret,
            } => StandbyTerms {
                session,
                failure_timeout: Duration::from_millis(failure_timeout_ms),
                heartbeat: Duration::from_millis(heartbeat_ms).max(heartbeat::MIN_HEARTBEAT),
                key: ProbeKey::new(&probe_secret),
            },
            other => {
                return Err(LoopError::Protocol(format!(
                    "expected Standing, got {}",
                    other.name()
                )))
            }
        };
        let failure_timeout = terms.failure_timeout;
        let shutdown = stream
            .shutdown_handle()
            .map_err(|e| LoopError::Heartbeat(e.to_string()))?;
        self.watch
            .open(standby, &self.params.security, terms, shutdown)
            .map_err(LoopError::Heartbeat)?;
        Ok(failure_timeout)
    }

    /// With a witness, tells the standby the claim this protection holds, which is what the standby
    /// checks at the witness and what a takeover must swap.
    fn tell_claim(&self, stream: &mut Link) -> Result<(), LoopError> {
        if let Some(held) = self.primary_claim.as_ref().and_then(PrimaryClaim::current) {
            write_frame(
                stream,
                &Message::ClaimHeld {
                    holder: held.claim.holder,
                    generation: held.claim.generation,
                },
            )?;
        }
        Ok(())
    }

    fn ending(&self) -> Option<Ending> {
        self.ending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The guest's ending, once [`ProtectionHandle::finish`] gives it (the VM stops answering a
    /// moment before).
    fn wait_for_ending(&self) -> Option<Ending> {
        let deadline = Instant::now() + ENDING_GRACE;
        loop {
            if let Some(ending) = self.ending() {
                return Some(ending);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Checkpoints at a steady cadence, one every epoch, until stopped or something fails. Up to
    /// `in_flight::MAX_IN_FLIGHT` checkpoints are on their way at once, so the next one is taken on time
    /// whatever the last one's commit takes; the output of epoch N leaves only on the standby's
    /// `Committed { N }`, and commits must come in order (`in_flight.rs`). Whatever is still in
    /// flight when protection ends gives its dirty set back to the tracker.
    fn checkpoint_epochs(&self, stream: &mut Link) -> Result<(), LoopError> {
        let mut in_flight = InFlight::default();
        let result = self.pipeline(stream, &mut in_flight);
        in_flight.fold_back(&mut self.tracker.lock().unwrap_or_else(|e| e.into_inner()));
        result
    }

    fn pipeline(&self, stream: &mut Link, in_flight: &mut InFlight) -> Result<(), LoopError> {
        let mut acks = FrameReader::new();
        // What this session sent of each page: the base of the next deltas.
        let mut sent_pages = SentPages::new(DEFAULT_CACHE_BYTES);
        let mut clock = EpochClock::new(self.params.epoch);
        let mut next_epoch = 0u64;
        let mut due = Instant::now();
        loop {
            let stopping = self.stop.load(Ordering::SeqCst);
            if stopping && in_flight.is_empty() {
                return Ok(());
            }
            let now = Instant::now();
            if !stopping && now >= due && !in_flight.is_full() {
                let epoch = next_epoch;
                let span = tracing::debug_span!("epoch", epoch);
                let _guard = span.enter();
                let mut cp = self.checkpoint(epoch)?;
                let taken_at = Instant::now();
                let sent = cp
                    .take_pages(&self.memory)
                    .map_err(LoopError::Vm)
                    .and_then(|copied| {
                        send_checkpoint(stream, epoch, copied.runs, &mut cp, &mut sent_pages)
                            .map(|bytes| (bytes, copied.write_faults))
                    });
                let (page_bytes, write_faults) = *sent.as_ref().unwrap_or(&(0, 0));
                in_flight.push(SentCheckpoint {
                    epoch,
                    pages: cp.pages,
                    write_faults,
                    page_bytes,
                    pause: cp.pause,
                    stopping: cp.stopping,
                    taken_at,
                    set: cp.set,
                });
                sent?;
                next_epoch += 1;
                // The cadence holds; a checkpoint that took longer than an epoch to send is
                // followed by the next one at once (while the window has room).
                let epoch_length = clock.next();
                update(&self.status, |s| {
                    s.epoch_ms = epoch_length.as_secs_f64() * 1e3
                });
                due = (due + epoch_length).max(Instant::now());
                continue;
            }
            if in_flight.is_empty() {
                std::thread::sleep(due.saturating_duration_since(now));
                continue;
            }
            // Acknowledgements until the next checkpoint is due; with the window full, or when
            // stopping, as long as a commit may take.
            let waiting_only_for_acks = stopping || in_flight.is_full();
            let wait = if waiting_only_for_acks {
                IO_TIMEOUT
            } else {
                due.saturating_duration_since(now)
            };
            stream
                .set_read_timeout(Some(wait.max(Duration::from_millis(1))))
                .map_err(|e| LoopError::Wire(FrameError::Io(e)))?;
            match acks.poll::<_, Message>(stream)? {
                None if waiting_only_for_acks => {
                    return Err(LoopError::Protocol(format!(
                        "no commit of checkpoint {} within {IO_TIMEOUT:?}",
                        in_flight.oldest().unwrap_or_default()
                    )))
                }
                None => {}
                Some(Message::Committed { epoch }) => {
                    let committed = in_flight.commit(epoch).map_err(LoopError::Protocol)?;
                    let commit = committed.taken_at.elapsed();
                    clock.observe(commit);
                    self.committed(committed, commit)?;
                }
                Some(Message::Error { message }) => return Err(LoopError::Refused(message)),
                Some(other) => {
                    return Err(LoopError::Protocol(format!(
                        "expected Committed, got {}",
                        other.name()
                    )))
                }
            }
        }
    }

    /// Checkpoint `cp` is committed, `commit` after its pause ended: its epoch's output leaves, and
    /// the status says so.
    fn committed(&self, cp: SentCheckpoint, commit: Duration) -> Result<(), LoopError> {
        let epoch = cp.epoch;
        self.confirm_after_silence()?;
        let held = Arc::new(Mutex::new((0, 0)));
        let held_after = held.clone();
        // Asked before every frame: a primary stopped mid-release sends nothing more on waking
        // (what stays held leaves with the next commit, once confirmed).
        let permit = self.watch.release_permit();
        self.run_job(move |m| {
            let released = m.release_output(epoch, &|| permit.allows());
            tracing::debug!(epoch, released, "committed: output released");
            *held_after.lock().unwrap_or_else(|e| e.into_inner()) = m.held_output();
            VmReply::Done(m.info())
        })?;
        let (held_frames, held_bytes) = *held.lock().unwrap_or_else(|e| e.into_inner());
        let generation = self
            .primary_claim
            .as_ref()
            .and_then(PrimaryClaim::current)
            .map(|h| h.claim.generation);
        let heartbeat_age = self.watch.answer_age();
        let between_copies = self
            .copy_on_write
            .as_ref()
            .map_or(0, |c| c.faults_between_copies());
        update(&self.status, |s| {
            s.state = ProtectionState::Protected;
            s.committed_epoch = epoch;
            s.last_pause_ms = cp.pause.as_secs_f64() * 1e3;
            s.last_pause_stopping_ms = cp.stopping.as_secs_f64() * 1e3;
            s.last_pages = cp.pages;
            s.last_write_faults = cp.write_faults;
            s.write_faults_between_copies = between_copies;
            s.last_page_bytes = cp.page_bytes;
            s.last_commit_ms = commit.as_secs_f64() * 1e3;
            s.heartbeat_age_ms = heartbeat_age.map(|a| a.as_secs_f64() * 1e3);
            s.generation = generation;
            s.held_frames = held_frames as u64;
            s.held_bytes = held_bytes as u64;
        });
        if epoch == 0 {
            tracing::info!("guest protected by {}", self.params.standby);
        }
        Ok(())
    }

    /// If this primary may have been silent to its standby for the standby's failure timeout (it
    /// was stopped, or its host froze), the standby may have taken over, and commits read now may
    /// be old: with a witness, nothing is released before it confirms this copy still holds its
    /// claim (`primary_claim.rs`). Without one a standby never takes over on silence alone.
    fn confirm_after_silence(&self) -> Result<(), LoopError> {
        if !self.watch.may_have_been_silent() {
            return Ok(());
        }
        if let Some(claim) = &self.primary_claim {
            claim.confirm_still_held(|| self.watch.standby_lost())?;
        }
        self.watch.silence_confirmed();
        Ok(())
    }

    fn run_job(
        &self,
        job: impl FnOnce(&mut Machine) -> VmReply + Send + 'static,
    ) -> Result<(), LoopError> {
        match self
            .control
            .request(VmCommand::OnEventLoop(Box::new(job)), JOB_TIMEOUT)
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
        let disks = self.disks.clone();
        let copy_on_write = self.copy_on_write.clone();
        self.run_job(move |m| {
            let result = take_checkpoint(m, &tracker, &disks, copy_on_write.as_deref(), epoch);
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

#[cfg(test)]
mod tests {
    use super::*;
    use vmm::control::{control_channel, ControlError};

    /// A VM slow to carry out the release of held output is waited for, not given up on after a
    /// timeout (the gate would stay installed, transmit stopped, while the status said degraded).
    #[test]
    fn a_job_the_vm_is_slow_to_run_is_waited_for() {
        let (handle, inbox, _waker) = control_channel().unwrap();
        let vm = std::thread::spawn(move || {
            // The event loop is busy for a while before it gets to the job.
            std::thread::sleep(Duration::from_millis(250));
            let (command, reply) = inbox.next().expect("the job was queued once");
            assert!(matches!(command, VmCommand::Pause));
            assert!(inbox.next().is_none(), "queued twice");
            reply.send(VmReply::Conflict("done".into())).unwrap();
        });
        let mut waits = 0;
        let reply = until_done(&handle, VmCommand::Pause, Duration::from_millis(50), |_| {
            waits += 1
        });
        vm.join().unwrap();
        assert_eq!(reply, Ok(VmReply::Conflict("done".into())));
        assert!(waits >= 3, "{waits} waits");
        drop(handle);
    }

    #[test]
    fn a_vm_that_ended_ends_the_wait() {
        let (handle, inbox, _waker) = control_channel().unwrap();
        drop(inbox);
        assert_eq!(
            until_done(&handle, VmCommand::Pause, Duration::from_millis(10), |_| {}),
            Err(ControlError::Gone)
        );
    }
}
