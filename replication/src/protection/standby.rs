//! The standby: builds the protected guest's hardware, applies each checkpoint once all of it has
//! arrived and verified, acknowledges it, and when the primary falls silent resumes the guest from the
//! last committed checkpoint.

use std::net::SocketAddr;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm::machine::VmSnapshot;
use vmm::memory::PAGE_SIZE;
use vmm::{Machine, RestoreOptions};

use crate::link::{self, AcceptError, Link, LinkSecurity};
use crate::wire::{read_frame, write_frame, FrameError, Message, PageRun};

/// How long a connecting primary may take to authenticate and say `Hello`.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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
    #[error("cannot resume the guest from checkpoint {epoch}: {reason}")]
    Resume { epoch: u64, reason: String },
}

/// What a finished standby hands back: the machine to start and the checkpoint it holds.
pub struct Takeover {
    pub machine: Machine,
    pub epoch: u64,
    pub reason: String,
}

/// Listens on `listen`, waits for a primary that authenticates as `security` requires (refusing any
/// other), builds its guest on this host's own backends (`options`), follows its checkpoints, and
/// when it is gone returns the guest ready to run. `failure_timeout`: how long the primary may be
/// silent before it is declared dead.
pub fn run_standby(
    listen: &str,
    options: &RestoreOptions,
    security: &LinkSecurity,
    failure_timeout: Duration,
    on_listening: impl FnOnce(SocketAddr),
) -> Result<Takeover, StandbyError> {
    let listener = link::bind(listen)?;
    if let Ok(addr) = listener.local_addr() {
        on_listening(addr);
    }
    let mut incoming = link::accept_peer(&listener, security, HANDSHAKE_TIMEOUT)?;
    let peer = incoming.link.peer();
    let span = tracing::info_span!("standby", %peer);
    let _guard = span.enter();
    let mut machine = link::assemble_incoming(&mut incoming, options)
        .map_err(|reason| StandbyError::Setup { peer, reason })?;
    let mut stream = incoming.link;
    let _ = stream.set_read_timeout(Some(failure_timeout));
    tracing::info!("standing by");

    let (committed, reason) = follow(&mut stream, &machine);
    let Some((epoch, state)) = committed else {
        return Err(StandbyError::NoCheckpoint { peer, reason });
    };
    tracing::warn!(epoch, %reason, "primary lost: taking over from the last committed checkpoint");
    let snap: VmSnapshot = vmm::snapshot::decode(&state).map_err(|e| StandbyError::Resume {
        epoch,
        reason: e.to_string(),
    })?;
    machine
        .apply_state(&snap)
        .map_err(|e| StandbyError::Resume {
            epoch,
            reason: e.to_string(),
        })?;
    Ok(Takeover {
        machine,
        epoch,
        reason,
    })
}

/// Applies checkpoints until the primary goes away; returns the last committed one (epoch and
/// encoded state) and why it stopped.
///
/// Checkpoints come in order: the first is epoch 0, each next one is the last committed plus one.
/// Staged pages must lie in guest memory and never exceed its size, so a peer cannot make the standby
/// hold more than one guest's worth of pages.
fn follow(stream: &mut Link, machine: &Machine) -> (Option<(u64, Vec<u8>)>, String) {
    let mut committed: Option<(u64, Vec<u8>)> = None;
    let mut staged: Vec<PageRun> = Vec::new();
    let mut staged_pages: u64 = 0;
    let guest_pages = machine.memory().iter().map(|r| r.len()).sum::<u64>() / PAGE_SIZE as u64;
    loop {
        let message = match read_frame::<_, Message>(stream) {
            Ok(m) => m,
            Err(FrameError::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return (committed, "the primary fell silent".into());
            }
            Err(e) => return (committed, e.to_string()),
        };
        let expected = committed.as_ref().map_or(0, |(e, _)| e + 1);
        match message {
            Message::EpochPages { epoch, runs } => {
                if epoch != expected {
                    return (
                        committed,
                        format!("pages of checkpoint {epoch} where {expected} was due"),
                    );
                }
                for run in runs {
                    let pages = (run.data.len() / PAGE_SIZE) as u64;
                    let in_memory = run.data.len() % PAGE_SIZE == 0
                        && run.gpa % PAGE_SIZE as u64 == 0
                        && machine
                            .memory()
                            .check_range(GuestAddress(run.gpa), run.data.len());
                    if !in_memory {
                        return (
                            committed,
                            format!(
                                "checkpoint {epoch}: pages at {:#x} (+{} bytes) are not whole pages of guest memory",
                                run.gpa,
                                run.data.len()
                            ),
                        );
                    }
                    staged_pages += pages;
                    if staged_pages > guest_pages {
                        return (
                            committed,
                            format!(
                                "checkpoint {epoch} has more pages than the guest ({guest_pages})"
                            ),
                        );
                    }
                    staged.push(run);
                }
            }
            Message::EpochEnd {
                epoch,
                pages,
                state,
            } => {
                if epoch != expected {
                    return (
                        committed,
                        format!("end of checkpoint {epoch} where {expected} was due"),
                    );
                }
                if staged_pages != pages {
                    return (
                        committed,
                        format!(
                            "checkpoint {epoch} is incomplete ({staged_pages} of {pages} pages)"
                        ),
                    );
                }
                if vmm::snapshot::decode::<VmSnapshot>(&state).is_err() {
                    return (committed, format!("checkpoint {epoch} has a corrupt state"));
                }
                for run in staged.drain(..) {
                    if let Err(e) = machine
                        .memory()
                        .write_slice(&run.data, GuestAddress(run.gpa))
                    {
                        return (
                            committed,
                            format!("checkpoint {epoch}: page {:#x}: {e}", run.gpa),
                        );
                    }
                }
                staged_pages = 0;
                committed = Some((epoch, state));
                if let Err(e) = write_frame(stream, &Message::Committed { epoch }) {
                    return (
                        committed,
                        format!("cannot acknowledge checkpoint {epoch}: {e}"),
                    );
                }
            }
            other => return (committed, format!("unexpected message {}", other.name())),
        }
    }
}
