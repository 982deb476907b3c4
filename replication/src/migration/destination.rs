//! The receiving side: build the hardware the source describes, fill its memory, apply the state,
//! and run the guest only once the source has let go.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};
use vmm::machine::VmSnapshot;
use vmm::{Machine, RestoreOptions};

use crate::link::{self, AcceptError, LinkSecurity};
use crate::wire::{read_frame, write_frame, FrameError, Message};

/// How long the destination waits for the next message before giving up.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a migration into this host failed (nothing of the guest runs here then).
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error(transparent)]
    Accept(#[from] AcceptError),
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

/// Listens on `listen`, calls `on_listening` with the bound address, waits for a source that
/// authenticates as `security` requires (refusing any other), receives one migration onto this
/// host's own backends (`options`) and returns the machine (not started) and the source's address.
pub fn receive(
    listen: &str,
    options: &RestoreOptions,
    security: &LinkSecurity,
    on_listening: impl FnOnce(SocketAddr),
) -> Result<(Machine, SocketAddr), ReceiveError> {
    let mut incoming = link::listen_for_peer(listen, security, on_listening)?;
    let peer = incoming.link.peer();
    let span = tracing::info_span!("incoming_migration", %peer);
    let _guard = span.enter();
    tracing::info!(
        vcpus = incoming.description.vcpus,
        memory_mib = incoming.description.memory_mib,
        security = security.name(),
        "building the VM"
    );
    let mut machine = link::assemble_incoming(&mut incoming, options)
        .map_err(|reason| ReceiveError::Machine { peer, reason })?;
    let mut link = incoming.link;
    let _ = link.set_read_timeout(Some(IDLE_TIMEOUT));
    match receive_stream(&mut link, peer, &mut machine) {
        Ok(()) => Ok((machine, peer)),
        Err(e) => {
            // Tell the source why (best effort); it keeps its guest.
            let _ = write_frame(
                &mut link,
                &Message::Error {
                    message: e.to_string(),
                },
            );
            Err(e)
        }
    }
}

/// The destination's receive loop on an established stream from `peer`: fills `machine`'s memory
/// with the source's pages, applies its state, acknowledges, and returns once the source says Go.
/// Anything out of order, outside guest memory or not matching `machine` is an error (and then
/// `machine` holds a partial guest that must not run). Public so that it can be fuzzed.
pub fn receive_stream<S: Read + Write>(
    stream: &mut S,
    peer: SocketAddr,
    machine: &mut Machine,
) -> Result<(), ReceiveError> {
    let wire = |source| ReceiveError::Wire { peer, source };
    let machine_err = |reason: String| ReceiveError::Machine { peer, reason };
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
            Message::RoundEnd { round } => {
                write_frame(stream, &Message::RoundReceived { round }).map_err(wire)?;
            }
            Message::State { snapshot } => {
                let t0 = std::time::Instant::now();
                let state: VmSnapshot =
                    vmm::snapshot::decode(&snapshot).map_err(|e| machine_err(e.to_string()))?;
                let decoded = t0.elapsed();
                machine
                    .apply_state(&state)
                    .map_err(|e| machine_err(e.to_string()))?;
                write_frame(stream, &Message::Applied).map_err(wire)?;
                let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
                tracing::info!(
                    decoded_ms = ms(decoded),
                    applied_ms = ms(t0.elapsed()),
                    "state applied"
                );
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
            Ok(())
        }
        Message::Cancel => Err(ReceiveError::Cancelled { peer }),
        other => Err(unexpected(peer, "Go", &other)),
    }
}

fn unexpected(peer: SocketAddr, wanted: &str, got: &Message) -> ReceiveError {
    ReceiveError::Protocol {
        peer,
        reason: format!("expected {wanted}, got {}", got.name()),
    }
}
