//! The standby: builds the protected guest's hardware, applies each checkpoint once all of it has
//! arrived and verified, acknowledges it, and when the primary is lost resumes the guest from the
//! last committed checkpoint.
//!
//! What ends the standby (docs/wire-protocol.md, rules as built):
//! - the primary is lost: its connection closed or reset (what its kernel does when its process
//!   dies) while it was known alive on the heartbeat channel (`heartbeat.rs`) → take over from the
//!   last committed checkpoint. Silence alone never makes the standby take over, and an end seen
//!   after a silence is not certain (the primary may have gone on without this standby) → end
//!   without resuming;
//! - the primary said `Goodbye` (its guest powered off, reset or crashed, or protection was stopped
//!   while the guest goes on there) → end without resuming anything;
//! - the link broke in a way a dying primary does not cause (a corrupt or forged frame, a message
//!   out of protocol) → end without resuming: the primary is alive and will see the link fail.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm::machine::DiskAccess;
use vmm::machine::VmSnapshot;
use vmm::memory::{GuestMemory, PAGE_SIZE};
use vmm::{Machine, RestoreOptions};

use super::heartbeat::{self, ControlVerdict, PrimaryWatch, WatchPlan};
use super::page_delta::decode_page;
use super::standby_disks::StandbyDisks;
use crate::link::{self, AcceptError, Link, LinkSecurity, LinkShutdown};
use crate::wire::{
    read_frame, write_frame, EncodedPage, Ending, FrameError, Message, PageRun, ProbeKey,
};
use crate::witness::{ClaimState, HeldClaim, Witness};

/// Why the standby could not take over.
#[derive(Debug, thiserror::Error)]
pub enum StandbyError {
    #[error(transparent)]
    Accept(#[from] AcceptError),
    #[error("the primary {peer} did not start protection properly: {reason}")]
    Setup { peer: SocketAddr, reason: String },
    #[error(
        "the primary {peer} was lost before its first checkpoint was committed ({reason}): \
         nothing to resume"
    )]
    NoCheckpoint { peer: SocketAddr, reason: String },
    #[error(
        "the link to the primary {peer} broke ({reason}); the primary is alive, so the guest is \
         not resumed here"
    )]
    LinkBroken { peer: SocketAddr, reason: String },
    #[error(
        "the primary {peer}'s connection ended ({reason}) {silent_ms} ms after it last answered a \
         heartbeat: it may have gone on without this standby, so the guest is not resumed here"
    )]
    Uncertain {
        peer: SocketAddr,
        reason: String,
        silent_ms: u64,
    },
    #[error(
        "the witness refused this standby the guest: the primary {peer} changed its claim first \
         ({claim}); nothing is resumed here"
    )]
    Superseded { peer: SocketAddr, claim: String },
    #[error("cannot resume the guest from checkpoint {epoch}: {reason}")]
    Resume { epoch: u64, reason: String },
}

/// Time between attempts to reach an unreachable witness.
const WITNESS_RETRY: Duration = Duration::from_millis(200);

/// What an operator sees of, and may do to, a standby while it follows its primary
/// (`GET /api/v1/standby`, `PUT /api/v1/standby/failover`). Clones share the one standby.
#[derive(Clone)]
pub struct StandbyControl {
    inner: Arc<StandbyControlInner>,
}

struct StandbyControlInner {
    primary: SocketAddr,
    /// The last committed epoch + 1 (0: none yet).
    committed: AtomicU64,
    watch: PrimaryWatch,
    forced: AtomicBool,
    checkpoints: LinkShutdown,
}

/// A standby's state, as its API reports it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StandbyStatus {
    pub primary: String,
    /// The checkpoint a takeover would resume from.
    pub committed_epoch: Option<u64>,
    /// Whether the primary answered a heartbeat probe within the failure timeout.
    pub primary_alive: bool,
    /// Time since the probe the primary's latest answer echoed.
    pub primary_silent_ms: u64,
    /// The primary's control channel: `not_opened`, `open`, `goodbye` (it ended protection while
    /// alive), `closed` (closed without a goodbye: its process or host ended) or `broken`.
    pub control_channel: String,
    /// Whether the primary may be running now: everything but a control channel that closed
    /// without a goodbye. A silent primary may be cut off from this standby and running on.
    pub primary_may_be_running: bool,
    /// What the state means for an operator thinking of a forced failover.
    pub note: String,
}

impl StandbyControl {
    /// The standby's state now.
    pub fn status(&self) -> StandbyStatus {
        let committed = self.inner.committed.load(Ordering::SeqCst);
        let liveness = self.inner.watch.liveness();
        let verdict = self.inner.watch.verdict();
        let (alive, silent) = (liveness.alive(), liveness.silent_for());
        let control_channel = match verdict {
            ControlVerdict::NotOpened => "not_opened",
            ControlVerdict::Open => "open",
            ControlVerdict::Goodbye(_) => "goodbye",
            ControlVerdict::Closed { .. } => "closed",
            ControlVerdict::Broken(_) => "broken",
        };
        StandbyStatus {
            primary: self.inner.primary.to_string(),
            committed_epoch: committed.checked_sub(1),
            primary_alive: alive,
            primary_silent_ms: silent.as_millis() as u64,
            control_channel: control_channel.into(),
            primary_may_be_running: !matches!(verdict, ControlVerdict::Closed { .. }),
            note: describe(&verdict, alive, silent),
        }
    }

    /// The operator says the primary is dead: take over from the last committed checkpoint (with
    /// a witness, only if it agrees). Refused before the first checkpoint is committed, and after
    /// the primary said goodbye. Unless the primary's death is certain (its control channel closed
    /// without a goodbye), refused without `force`: a primary that answers, or one merely silent
    /// — it may be cut off from this standby and running on, unprotected — would then run as a
    /// second copy of the guest.
    pub fn force_failover(&self, force: bool) -> Result<(), String> {
        if self.inner.committed.load(Ordering::SeqCst) == 0 {
            return Err("no checkpoint is committed yet: there is nothing to take over".into());
        }
        let liveness = self.inner.watch.liveness();
        match self.inner.watch.verdict() {
            ControlVerdict::Goodbye(ending) => {
                return Err(format!(
                    "the primary ended protection ({ending}): there is nothing to take over"
                ))
            }
            ControlVerdict::Closed { .. } => {}
            verdict if !force => {
                return Err(format!(
                    "{}; a forced failover would run a second copy of the guest unless the \
                     primary is dead: force it only if you know it is",
                    describe(&verdict, liveness.alive(), liveness.silent_for())
                ))
            }
            _ => {}
        }
        tracing::warn!("failover forced by the operator");
        self.inner.forced.store(true, Ordering::SeqCst);
        self.inner.checkpoints.shutdown();
        Ok(())
    }

    fn forced(&self) -> bool {
        self.inner.forced.load(Ordering::SeqCst)
    }

    fn committed(&self, epoch: u64) {
        self.inner.committed.store(epoch + 1, Ordering::SeqCst);
    }
}

/// How standing by ended.
pub enum StandbyEnd {
    /// The primary was lost: run this guest.
    Takeover(Box<Takeover>),
    /// The primary said goodbye: nothing to run here.
    Ended(Ending),
}

/// What a finished standby hands back: the machine to start and the checkpoint it holds.
pub struct Takeover {
    pub machine: Machine,
    pub epoch: u64,
    pub reason: String,
    /// This copy's `active` claim at the witness, if there is one (re-protection starts from it).
    pub claim: Option<HeldClaim>,
}

/// Listens on `listen`, waits for a primary that authenticates as `security` requires (refusing any
/// other), builds its guest on this host's own backends (`options`), follows its checkpoints, and
/// when it is lost returns the guest ready to run (or how the primary ended protection).
/// `failure_timeout`: how long after its last heartbeat answer the primary counts as alive.
pub fn run_standby(
    listen: &str,
    options: &RestoreOptions,
    security: &LinkSecurity,
    failure_timeout: Duration,
    witness: Option<&Witness>,
    on_listening: impl FnOnce(SocketAddr),
    on_following: impl FnOnce(StandbyControl),
) -> Result<StandbyEnd, StandbyError> {
    let listener = link::bind(listen)?;
    let local = listener.local_addr().map_err(AcceptError::Accept)?;
    // The primary's heartbeat probes come to the same address and port, over UDP.
    let probes = std::net::UdpSocket::bind(local).map_err(|source| AcceptError::Listen {
        addr: format!("{local} (UDP, heartbeat probes)"),
        source,
    })?;
    on_listening(local);
    let mut incoming = link::accept_peer(&listener, security, link::HANDSHAKE_TIMEOUT)?;
    let peer = incoming.link.peer();
    let span = tracing::info_span!("standby", %peer);
    let _guard = span.enter();
    let setup = |reason: String| StandbyError::Setup { peer, reason };
    let mut machine = link::assemble_incoming(&mut incoming, options).map_err(setup)?;
    let mut stream = incoming.link;
    let session = heartbeat::new_session();
    let heartbeat_every = heartbeat::heartbeat_for(failure_timeout);
    let probe_secret = ProbeKey::random_secret().map_err(|e| setup(e.to_string()))?;
    let terms = Message::Standing {
        session,
        failure_timeout_ms: failure_timeout.as_millis() as u64,
        heartbeat_ms: heartbeat_every.as_millis() as u64,
        probe_secret,
    };
    let checkpoints = stream.shutdown_handle().map_err(|e| setup(e.to_string()))?;
    let watch = write_frame(&mut stream, &terms)
        .map_err(|e| e.to_string())
        .and_then(|()| {
            heartbeat::watch_primary(WatchPlan {
                listener,
                probes,
                security: security.clone(),
                session,
                key: ProbeKey::new(&probe_secret),
                heartbeat: heartbeat_every,
                failure_timeout,
                checkpoints,
                // With a witness, silence is a reason to ask it for the guest.
                shut_on_silence: witness.is_some(),
            })
            .map_err(|e| e.to_string())
        })
        .map_err(setup)?;
    // Whatever ends this standby ends its probes: a primary that lives counts it lost.
    let _stop_probes = StopOnDrop(&watch);
    // With a witness, the primary's claim is what a takeover must swap; without one, silence never
    // ends following.
    let primary_claim = match witness {
        Some(w) => Some(check_primary_claim(&mut stream, w).map_err(setup)?),
        None => None,
    };
    // Checkpoints may take as long as they take: liveness comes from the heartbeat.
    let _ = stream.set_read_timeout(None);
    let control = StandbyControl {
        inner: Arc::new(StandbyControlInner {
            primary: peer,
            committed: AtomicU64::new(0),
            watch: watch.clone(),
            forced: AtomicBool::new(false),
            checkpoints: stream.shutdown_handle().map_err(|e| setup(e.to_string()))?,
        }),
    };
    on_following(control.clone());
    tracing::info!("standing by");

    let (committed, lost) = match follow(&mut stream, &machine, &control) {
        (_, FollowEnd::Goodbye(ending)) => {
            tracing::info!(%ending, "the primary ended protection; nothing is resumed here");
            return Ok(StandbyEnd::Ended(ending));
        }
        (_, FollowEnd::LinkBroken(reason)) => {
            tracing::error!(%reason, "the link broke while the primary lives; nothing is resumed here");
            return Err(StandbyError::LinkBroken { peer, reason });
        }
        (committed, FollowEnd::PrimaryLost(reason)) => (committed, reason),
    };
    // The checkpoint stream ended. How the primary ended is the control channel's to say: a
    // goodbye written there is read before its close, however late the network delivers it.
    let verdict = watch.await_end(witness.is_some(), || control.forced());
    let reason = match verdict {
        ControlVerdict::Goodbye(ending) => {
            tracing::info!(%ending, "the primary ended protection; nothing is resumed here");
            return Ok(StandbyEnd::Ended(ending));
        }
        ControlVerdict::Broken(reason) => {
            tracing::error!(%reason, "the control channel broke while the primary lives; nothing is resumed here");
            return Err(StandbyError::LinkBroken { peer, reason });
        }
        _ if control.forced() => "failover forced by the operator".to_string(),
        ControlVerdict::Closed {
            while_alive: true,
            reason,
        } => reason,
        // Only a close seen while the primary was known alive is its death; after it went
        // silent, it may have chosen to go on without this standby (heartbeat/mod.rs). With a
        // witness, the witness decides.
        _ if witness.is_some() => lost,
        other => {
            let silent_ms = watch.liveness().silent_for().as_millis() as u64;
            let reason = match other {
                ControlVerdict::Closed { reason, .. } => reason,
                _ => lost,
            };
            tracing::error!(%reason, silent_ms, "the primary's end is not certain; nothing is resumed here");
            return Err(StandbyError::Uncertain {
                peer,
                reason,
                silent_ms,
            });
        }
    };
    watch.stop();
    let Some((epoch, state)) = committed else {
        return Err(StandbyError::NoCheckpoint { peer, reason });
    };
    // The guest must be able to run here before this copy claims it: a standby that fails to
    // apply the state after taking the claim would leave the guest claimed with nobody running.
    let resume = |reason: String| StandbyError::Resume { epoch, reason };
    let snap: VmSnapshot = vmm::snapshot::decode(&state).map_err(|e| resume(e.to_string()))?;
    machine
        .apply_state(&snap)
        .map_err(|e| resume(e.to_string()))?;
    // Everything committed to the images is durable before this copy runs the guest.
    for (index, disk) in machine
        .disk_access()
        .map_err(|e| resume(e.to_string()))?
        .iter()
        .enumerate()
    {
        disk.image
            .sync_data()
            .map_err(|e| resume(format!("making disk {index} durable: {e}")))?;
    }
    // With a witness, the takeover is the swap of the primary's claim for ours.
    let our_claim = match (witness, primary_claim.as_ref()) {
        (Some(w), Some(claim)) => Some(take_claim(w, claim, session, peer)?),
        _ => None,
    };
    tracing::warn!(epoch, %reason, "primary lost: taking over from the last committed checkpoint");
    Ok(StandbyEnd::Takeover(Box::new(Takeover {
        machine,
        epoch,
        reason,
        claim: our_claim,
    })))
}

/// What the standby knows of its primary, in words.
fn describe(verdict: &ControlVerdict, alive: bool, silent: Duration) -> String {
    let silent_s = silent.as_secs_f64();
    match verdict {
        ControlVerdict::Goodbye(ending) => format!("the primary ended protection: {ending}"),
        ControlVerdict::Closed { reason, .. } => {
            format!("the primary's process or host ended ({reason})")
        }
        _ if alive => "the primary answers its heartbeat: it is running".into(),
        ControlVerdict::NotOpened => format!(
            "the primary never opened its control channel and has been silent for {silent_s:.1} s: \
             it may be dead, or running cut off from this standby"
        ),
        _ => format!(
            "the primary has been silent for {silent_s:.1} s: it may have died silently, or be cut \
             off from this standby and running on, unprotected"
        ),
    }
}

/// Stops the watch's probes when dropped.
struct StopOnDrop<'a>(&'a PrimaryWatch);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// Reads the claim the primary says it protects under and checks that the witness holds exactly
/// it (same holder and generation), `protected`: the standby follows no other copy of the guest.
fn check_primary_claim(stream: &mut Link, witness: &Witness) -> Result<HeldClaim, String> {
    let (holder, generation) = match read_frame::<_, Message>(stream).map_err(|e| e.to_string())? {
        Message::ClaimHeld { holder, generation } => (holder, generation),
        other => {
            return Err(format!(
                "this standby has a witness but the primary protects without one (it sent {} \
                 where ClaimHeld was due); give both ends the same --witness and --guest-name",
                other.name()
            ))
        }
    };
    match witness.read().map_err(|e| e.to_string())? {
        Some(held)
            if held.claim.state == ClaimState::Protected
                && held.claim.holder == holder
                && held.claim.generation == generation =>
        {
            Ok(held)
        }
        now => Err(format!(
            "the witness's key {} does not hold the primary's claim (holder {holder:#x}, \
             generation {generation}, protected): it holds {}",
            witness.key(),
            now.map_or("nothing".into(), |h| format!(
                "holder {:#x}, generation {}, {:?}",
                h.claim.holder, h.claim.generation, h.claim.state
            ))
        )),
    }
}

/// Swaps the primary's `protected` claim for this standby's `active` one; fails if the primary
/// changed it first (it went on without this standby, or its guest ended). An unreachable witness is
/// retried: nothing runs here until it answers.
fn take_claim(
    witness: &Witness,
    primary: &HeldClaim,
    session: u64,
    peer: SocketAddr,
) -> Result<HeldClaim, StandbyError> {
    loop {
        match witness.swap(primary, session, ClaimState::Active) {
            Ok(Some(ours)) => {
                tracing::warn!(
                    generation = ours.claim.generation,
                    "the witness gives this standby the guest"
                );
                return Ok(ours);
            }
            Ok(None) => {
                let now = witness
                    .read()
                    .ok()
                    .flatten()
                    .map_or("no claim: the guest ended".into(), |h| {
                        format!("{:?}, generation {}", h.claim.state, h.claim.generation)
                    });
                return Err(StandbyError::Superseded { peer, claim: now });
            }
            Err(e) => {
                tracing::warn!("{e}; retrying before any takeover");
                std::thread::sleep(WITNESS_RETRY);
            }
        }
    }
}

/// The contents an encoded page of a checkpoint stands for, to be written at its commit; the page
/// must be a whole page of guest memory, and a delta must have been made against what memory holds.
fn stage_page(memory: &GuestMemory, page: EncodedPage) -> Result<PageRun, String> {
    let gpa = page.gpa;
    if !whole_pages_in(memory, gpa, PAGE_SIZE) {
        return Err(format!("page {gpa:#x} is not a whole page of guest memory"));
    }
    let current = || {
        let mut base = vec![0u8; PAGE_SIZE];
        // In range (checked above); a failed read leaves zeros, which no delta's CRC matches.
        let _ = memory.read_slice(&mut base, GuestAddress(gpa));
        base
    };
    let data = decode_page(page, current).map_err(|e| e.to_string())?;
    Ok(PageRun { gpa, data })
}

/// Whether `len` bytes at `gpa` are whole pages inside guest memory.
fn whole_pages_in(memory: &GuestMemory, gpa: u64, len: usize) -> bool {
    len.is_multiple_of(PAGE_SIZE)
        && gpa.is_multiple_of(PAGE_SIZE as u64)
        && memory.check_range(GuestAddress(gpa), len)
}

/// `run` must be whole pages inside guest memory.
fn whole_pages_of(memory: &GuestMemory, run: &PageRun) -> Result<(), String> {
    if whole_pages_in(memory, run.gpa, run.data.len()) {
        Ok(())
    } else {
        Err(format!(
            "pages at {:#x} (+{} bytes) are not whole pages of guest memory",
            run.gpa,
            run.data.len()
        ))
    }
}

/// Applies a whole, verified checkpoint: its pages to guest memory, its disk writes to the images,
/// in order; when the guest flushed during its epoch (or this is the first copy), the images are
/// made durable before the checkpoint may be acknowledged — a write the guest flushed, whose
/// acknowledgement leaves the primary at this commit, must survive this host too.
fn apply_checkpoint(
    memory: &GuestMemory,
    staged: &mut Vec<PageRun>,
    disks: &mut StandbyDisks,
    flushed: bool,
) -> Result<(), String> {
    // Every run was checked to lie in guest memory, so applying cannot stop half-way.
    for run in staged.drain(..) {
        memory
            .write_slice(&run.data, GuestAddress(run.gpa))
            .map_err(|e| format!("page {:#x}: {e}", run.gpa))?;
    }
    disks.apply()?;
    if flushed {
        disks.make_durable()?;
    }
    Ok(())
}

/// Why [`follow`] stopped.
#[derive(Debug, PartialEq)]
enum FollowEnd {
    /// The primary's connection closed or reset, or it fell silent: take over.
    PrimaryLost(String),
    /// The primary ended protection while alive.
    Goodbye(Ending),
    /// A corrupt frame or a protocol violation: the primary is not known to be gone.
    LinkBroken(String),
}

impl FollowEnd {
    /// Classifies a failed read or write: only what a dead primary (or its dead host) causes counts as lost.
    fn from_link_error(e: FrameError) -> Self {
        match e {
            FrameError::Closed => FollowEnd::PrimaryLost("the primary's connection closed".into()),
            FrameError::Io(e) => match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                    FollowEnd::PrimaryLost("the primary fell silent".into())
                }
                std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::ConnectionAborted
                | std::io::ErrorKind::BrokenPipe
                | std::io::ErrorKind::UnexpectedEof => {
                    FollowEnd::PrimaryLost(format!("the primary's connection ended: {e}"))
                }
                _ => FollowEnd::LinkBroken(e.to_string()),
            },
            other => FollowEnd::LinkBroken(other.to_string()),
        }
    }
}

/// Applies checkpoints until the primary goes away or says goodbye; returns the last committed one
/// (epoch and encoded state) and why it stopped.
///
/// Checkpoints come in order: the first is epoch 0, each next one is the last committed plus one.
/// Staged pages must lie in guest memory and never exceed its size, so a peer cannot make the standby
/// hold more than one guest's worth of pages.
fn follow(
    stream: &mut Link,
    machine: &Machine,
    control: &StandbyControl,
) -> (Option<(u64, Vec<u8>)>, FollowEnd) {
    let mut committed = None;
    let end = match machine.disk_access() {
        Ok(disks) => follow_into(
            stream,
            machine.memory(),
            StandbyDisks::new(disks),
            &mut committed,
            &mut |epoch| control.committed(epoch),
        ),
        Err(e) => FollowEnd::LinkBroken(format!("this standby's disk images: {e}")),
    };
    (committed, end)
}

/// The standby's handling of a checkpoint stream without the rest of a machine: applies
/// checkpoints to `memory` and `disks` until the stream ends or breaks the rules; returns the last
/// committed epoch and why it stopped. Public for the fuzz target (fuzz/fuzz_targets/standby_follow.rs).
pub fn follow_stream<S: Read + Write>(
    stream: &mut S,
    memory: &GuestMemory,
    disks: Vec<DiskAccess>,
) -> (Option<u64>, String) {
    let mut committed = None;
    let end = follow_into(
        stream,
        memory,
        StandbyDisks::new(disks),
        &mut committed,
        &mut |_| {},
    );
    (committed.map(|(epoch, _)| epoch), format!("{end:?}"))
}

fn follow_into<S: Read + Write>(
    stream: &mut S,
    memory: &GuestMemory,
    mut disks: StandbyDisks,
    committed: &mut Option<(u64, Vec<u8>)>,
    on_commit: &mut dyn FnMut(u64),
) -> FollowEnd {
    let mut staged: Vec<PageRun> = Vec::new();
    let mut staged_pages: u64 = 0;
    let guest_pages = memory.iter().map(|r| r.len()).sum::<u64>() / PAGE_SIZE as u64;
    loop {
        let message = match read_frame::<_, Message>(stream) {
            Ok(m) => m,
            Err(e) => return FollowEnd::from_link_error(e),
        };
        let expected = committed.as_ref().map_or(0, |(e, _)| e + 1);
        match message {
            Message::EpochPages { epoch, pages } => {
                if epoch != expected {
                    return FollowEnd::LinkBroken(format!(
                        "pages of checkpoint {epoch} where {expected} was due"
                    ));
                }
                for page in pages {
                    staged_pages += 1;
                    if staged_pages > guest_pages {
                        return FollowEnd::LinkBroken(format!(
                            "checkpoint {epoch} has more pages than the guest ({guest_pages})"
                        ));
                    }
                    // The previous checkpoint is applied: memory holds each delta's base.
                    match stage_page(memory, page) {
                        Ok(run) => staged.push(run),
                        Err(reason) => {
                            return FollowEnd::LinkBroken(format!("checkpoint {epoch}: {reason}"))
                        }
                    }
                }
            }
            Message::ProtectDisks { sizes } => {
                if committed.is_some() {
                    return FollowEnd::LinkBroken("disk sizes after a checkpoint".into());
                }
                if let Err(reason) = disks.check_sizes(&sizes) {
                    // The primary hears why before the link closes.
                    let _ = write_frame(
                        stream,
                        &Message::Error {
                            message: reason.clone(),
                        },
                    );
                    return FollowEnd::LinkBroken(reason);
                }
            }
            Message::MemorySync { runs } => {
                if committed.is_some() {
                    return FollowEnd::LinkBroken("memory's first copy after a checkpoint".into());
                }
                for run in runs {
                    if let Err(reason) = whole_pages_of(memory, &run) {
                        return FollowEnd::LinkBroken(format!("memory's first copy: {reason}"));
                    }
                    if let Err(e) = memory.write_slice(&run.data, GuestAddress(run.gpa)) {
                        return FollowEnd::LinkBroken(format!("memory's first copy: {e}"));
                    }
                }
            }
            Message::DiskSync { disk, offset, data } => {
                if committed.is_some() {
                    return FollowEnd::LinkBroken("a disk's first copy after a checkpoint".into());
                }
                if let Err(reason) = disks.sync(disk, offset, &data) {
                    return FollowEnd::LinkBroken(reason);
                }
            }
            Message::EpochDiskWrites {
                epoch,
                disk,
                writes,
            } => {
                if epoch != expected {
                    return FollowEnd::LinkBroken(format!(
                        "disk writes of checkpoint {epoch} where {expected} was due"
                    ));
                }
                if let Err(reason) = disks.stage(disk, writes) {
                    return FollowEnd::LinkBroken(format!("checkpoint {epoch}: {reason}"));
                }
            }
            Message::EpochEnd {
                epoch,
                pages,
                disk_writes,
                flushed,
                state,
            } => {
                if epoch != expected {
                    return FollowEnd::LinkBroken(format!(
                        "end of checkpoint {epoch} where {expected} was due"
                    ));
                }
                if staged_pages != pages {
                    return FollowEnd::LinkBroken(format!(
                        "checkpoint {epoch} is incomplete ({staged_pages} of {pages} pages)"
                    ));
                }
                if disks.staged_writes() != disk_writes {
                    return FollowEnd::LinkBroken(format!(
                        "checkpoint {epoch} is incomplete ({} of {disk_writes} disk writes)",
                        disks.staged_writes()
                    ));
                }
                if vmm::snapshot::decode::<VmSnapshot>(&state).is_err() {
                    return FollowEnd::LinkBroken(format!(
                        "checkpoint {epoch} has a corrupt state"
                    ));
                }
                if let Err(reason) = apply_checkpoint(memory, &mut staged, &mut disks, flushed) {
                    return FollowEnd::LinkBroken(format!("checkpoint {epoch}: {reason}"));
                }
                staged_pages = 0;
                *committed = Some((epoch, state));
                on_commit(epoch);
                if let Err(e) = write_frame(stream, &Message::Committed { epoch }) {
                    return FollowEnd::from_link_error(e);
                }
            }
            Message::Goodbye { ending } => return FollowEnd::Goodbye(ending),
            Message::ClaimHeld { .. } => {
                return FollowEnd::LinkBroken(
                    "the primary protects under a witness claim but this standby has no witness; \
                     give both ends the same --witness and --guest-name"
                        .into(),
                )
            }
            other => return FollowEnd::LinkBroken(format!("unexpected message {}", other.name())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A checkpoint whose epoch saw a guest flush is made durable on this host before it may be
    /// acknowledged; others are not synced (what that costs: docs/benchmarks.md).
    #[test]
    fn a_checkpoint_whose_epoch_flushed_is_durable_before_it_is_acknowledged() {
        let memory = vmm::memory::create_guest_memory(16).unwrap();
        let mut disks = StandbyDisks::new(vec![super::super::standby_disks::scratch_disk(4096)]);
        disks.check_sizes(&[4096]).unwrap();
        let write = |data: &[u8]| {
            vec![crate::wire::DiskRun {
                offset: 0,
                data: data.to_vec(),
            }]
        };
        disks.stage(0, write(b"unflushed")).unwrap();
        apply_checkpoint(&memory, &mut Vec::new(), &mut disks, false).unwrap();
        assert_eq!(disks.durable_syncs(), 0);
        disks.stage(0, write(b"flushed")).unwrap();
        apply_checkpoint(&memory, &mut Vec::new(), &mut disks, true).unwrap();
        assert_eq!(disks.durable_syncs(), 1);
    }

    fn io(kind: std::io::ErrorKind) -> FrameError {
        FrameError::Io(std::io::Error::new(kind, "test"))
    }

    #[test]
    fn only_what_a_dead_primary_causes_counts_as_lost() {
        for lost in [
            FrameError::Closed,
            io(std::io::ErrorKind::TimedOut),
            io(std::io::ErrorKind::WouldBlock),
            io(std::io::ErrorKind::ConnectionReset),
            io(std::io::ErrorKind::ConnectionAborted),
            io(std::io::ErrorKind::BrokenPipe),
            io(std::io::ErrorKind::UnexpectedEof),
        ] {
            let what = lost.to_string();
            assert!(
                matches!(FollowEnd::from_link_error(lost), FollowEnd::PrimaryLost(_)),
                "{what}"
            );
        }
        for broken in [
            FrameError::Magic(*b"XXXX"),
            FrameError::Version(99),
            FrameError::TooLarge(u32::MAX),
            io(std::io::ErrorKind::InvalidData),
        ] {
            let what = broken.to_string();
            assert!(
                matches!(FollowEnd::from_link_error(broken), FollowEnd::LinkBroken(_)),
                "{what}"
            );
        }
    }
}
