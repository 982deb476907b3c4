//! The standby: builds the protected guest's hardware, applies each checkpoint once all of it has
//! arrived and verified, acknowledges it, and when the primary falls silent resumes the guest from the
//! last committed checkpoint.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};
use vmm::machine::VmSnapshot;
use vmm::{Machine, RestoreOptions};

use crate::wire::{read_frame, write_frame, FrameError, Message, PageRun};

/// Why the standby could not take over.
#[derive(Debug, thiserror::Error)]
pub enum StandbyError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("accepting the primary: {0}")]
    Accept(std::io::Error),
    #[error("the primary {peer} did not start protection properly: {reason}")]
    Setup { peer: SocketAddr, reason: String },
    #[error(
        "the primary {peer} failed before its first checkpoint was committed: nothing to resume"
    )]
    NoCheckpoint { peer: SocketAddr },
    #[error("cannot resume the guest from checkpoint {epoch}: {reason}")]
    Resume { epoch: u64, reason: String },
}

/// What a finished standby hands back: the machine to start and the checkpoint it holds.
pub struct Takeover {
    pub machine: Machine,
    pub epoch: u64,
    pub reason: String,
}

/// Listens on `listen`, serves one primary, and when it is gone returns the guest ready to run.
/// `failure_timeout`: how long the primary may be silent before it is declared dead.
pub fn run_standby(
    listen: &str,
    options: &RestoreOptions,
    failure_timeout: Duration,
    on_listening: impl FnOnce(SocketAddr),
) -> Result<Takeover, StandbyError> {
    let listener = TcpListener::bind(listen).map_err(|source| StandbyError::Listen {
        addr: listen.to_string(),
        source,
    })?;
    if let Ok(addr) = listener.local_addr() {
        on_listening(addr);
    }
    let (mut stream, peer) = listener.accept().map_err(StandbyError::Accept)?;
    let span = tracing::info_span!("standby", %peer);
    let _guard = span.enter();
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(failure_timeout));
    let setup = |reason: String| StandbyError::Setup { peer, reason };
    let description = match read_frame::<_, Message>(&mut stream) {
        Ok(Message::Hello { description }) => description,
        Ok(other) => return Err(setup(format!("expected Hello, got {other:?}"))),
        Err(e) => return Err(setup(e.to_string())),
    };
    let mut machine = match Machine::assemble_for_restore(&description, options) {
        Ok(m) => m,
        Err(e) => {
            let _ = write_frame(
                &mut stream,
                &Message::Error {
                    message: e.to_string(),
                },
            );
            return Err(setup(e.to_string()));
        }
    };
    write_frame(&mut stream, &Message::Ready).map_err(|e| setup(e.to_string()))?;
    tracing::info!("standing by");

    let (committed, reason) = follow(&mut stream, &machine);
    let Some((epoch, state)) = committed else {
        return Err(StandbyError::NoCheckpoint { peer });
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
fn follow(stream: &mut TcpStream, machine: &Machine) -> (Option<(u64, Vec<u8>)>, String) {
    let mut committed: Option<(u64, Vec<u8>)> = None;
    let mut staged: Vec<PageRun> = Vec::new();
    let mut staged_epoch: Option<u64> = None;
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
        match message {
            Message::EpochPages { epoch, runs } => {
                if staged_epoch != Some(epoch) {
                    // A new epoch: whatever was staged for an unfinished one is discarded whole.
                    staged.clear();
                    staged_epoch = Some(epoch);
                }
                staged.extend(runs);
            }
            Message::EpochEnd {
                epoch,
                pages,
                state,
            } => {
                let staged_pages: u64 = staged
                    .iter()
                    .map(|r| (r.data.len() / vmm::memory::PAGE_SIZE) as u64)
                    .sum();
                let complete = staged_epoch.is_none_or(|e| e == epoch) && staged_pages == pages;
                if !complete {
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
                staged_epoch = None;
                committed = Some((epoch, state));
                if let Err(e) = write_frame(stream, &Message::Committed { epoch }) {
                    return (
                        committed,
                        format!("cannot acknowledge checkpoint {epoch}: {e}"),
                    );
                }
            }
            other => return (committed, format!("unexpected message {other:?}")),
        }
    }
}
