//! The receiving side: build the hardware the source describes, fill its memory, apply the state,
//! and run the guest only once the source has let go.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};
use vmm::machine::VmSnapshot;
use vmm::{Machine, RestoreOptions};

use crate::wire::{read_frame, write_frame, FrameError, Message};

/// How long the destination waits for the next message before giving up.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a migration into this host failed (nothing of the guest runs here then).
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("accepting a connection: {0}")]
    Accept(std::io::Error),
    #[error("migration stream from {peer}: {source}")]
    Wire {
        peer: SocketAddr,
        source: FrameError,
    },
    #[error("migration from {peer}: protocol error: {reason}")]
    Protocol { peer: SocketAddr, reason: String },
    #[error("migration from {peer}: the source gave up: {reason}")]
    SourceFailed { peer: SocketAddr, reason: String },
    #[error("migration from {peer} was cancelled by the source")]
    Cancelled { peer: SocketAddr },
    #[error("migration from {peer}: cannot build or restore the VM: {reason}")]
    Machine { peer: SocketAddr, reason: String },
}

/// Listens on `listen`, calls `on_listening` with the bound address, receives one migration and
/// returns the machine (not started) and the source's address.
pub fn receive(
    listen: &str,
    options: &RestoreOptions,
    on_listening: impl FnOnce(SocketAddr),
) -> Result<(Machine, SocketAddr), ReceiveError> {
    let listener = TcpListener::bind(listen).map_err(|source| ReceiveError::Listen {
        addr: listen.to_string(),
        source,
    })?;
    if let Ok(addr) = listener.local_addr() {
        on_listening(addr);
    }
    let (mut stream, peer) = listener.accept().map_err(ReceiveError::Accept)?;
    let span = tracing::info_span!("incoming_migration", %peer);
    let _guard = span.enter();
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(IDLE_TIMEOUT));
    match receive_on(&mut stream, peer, options) {
        Ok(machine) => Ok((machine, peer)),
        Err(e) => {
            // Tell the source why (best effort); it keeps its guest.
            let _ = write_frame(
                &mut stream,
                &Message::Error {
                    message: e.to_string(),
                },
            );
            Err(e)
        }
    }
}

fn receive_on(
    stream: &mut TcpStream,
    peer: SocketAddr,
    options: &RestoreOptions,
) -> Result<Machine, ReceiveError> {
    let wire = |source| ReceiveError::Wire { peer, source };
    let machine_err = |reason: String| ReceiveError::Machine { peer, reason };
    let description = match read_frame::<_, Message>(stream).map_err(wire)? {
        Message::Hello { description } => description,
        other => return Err(unexpected(peer, "Hello", &other)),
    };
    tracing::info!(
        vcpus = description.vcpus,
        memory_mib = description.memory_mib,
        "building the VM"
    );
    let mut machine = Machine::assemble_for_restore(&description, options)
        .map_err(|e| machine_err(e.to_string()))?;
    write_frame(stream, &Message::Ready).map_err(wire)?;
    let mut pages = 0u64;
    loop {
        match read_frame::<_, Message>(stream).map_err(wire)? {
            Message::Pages { runs, .. } => {
                for run in runs {
                    machine
                        .memory()
                        .write_slice(&run.data, GuestAddress(run.gpa))
                        .map_err(|e| ReceiveError::Protocol {
                            peer,
                            reason: format!(
                                "pages at {:#x} (+{} bytes) outside guest memory: {e}",
                                run.gpa,
                                run.data.len()
                            ),
                        })?;
                    pages += (run.data.len() / vmm::memory::PAGE_SIZE) as u64;
                }
            }
            Message::State { snapshot } => {
                let state: VmSnapshot =
                    vmm::snapshot::decode(&snapshot).map_err(|e| machine_err(e.to_string()))?;
                machine
                    .apply_state(&state)
                    .map_err(|e| machine_err(e.to_string()))?;
                write_frame(stream, &Message::Applied).map_err(wire)?;
                break;
            }
            Message::Cancel => return Err(ReceiveError::Cancelled { peer }),
            Message::Error { message } => {
                return Err(ReceiveError::SourceFailed {
                    peer,
                    reason: message,
                })
            }
            other => return Err(unexpected(peer, "Pages or State", &other)),
        }
    }
    // Fencing: run only once the source has stopped for good.
    match read_frame::<_, Message>(stream).map_err(wire)? {
        Message::Go => {
            tracing::info!(pages, "migration received; the guest runs here now");
            Ok(machine)
        }
        Message::Cancel => Err(ReceiveError::Cancelled { peer }),
        other => Err(unexpected(peer, "Go", &other)),
    }
}

fn unexpected(peer: SocketAddr, wanted: &str, got: &Message) -> ReceiveError {
    let name = match got {
        Message::Hello { .. } => "Hello",
        Message::Ready => "Ready",
        Message::Pages { .. } => "Pages",
        Message::State { .. } => "State",
        Message::Applied => "Applied",
        Message::Go => "Go",
        Message::Cancel => "Cancel",
        Message::Error { .. } => "Error",
        Message::EpochPages { .. } => "EpochPages",
        Message::EpochEnd { .. } => "EpochEnd",
        Message::Committed { .. } => "Committed",
    };
    ReceiveError::Protocol {
        peer,
        reason: format!("expected {wanted}, got {name}"),
    }
}
