//! The receiving side of a link (a migration destination, a standby): wait for a peer that
//! authenticates and opens with `Hello`, then build the guest's hardware from this host's own
//! backends.
//!
//! Rules (docs/wire-protocol.md):
//! - A connection that fails TLS, sends anything but a well-formed `Hello`, or says nothing within the
//!   handshake timeout is refused and logged; the receiver keeps waiting for the right peer. Only an
//!   authenticated peer's `Hello` moves the receiver on.
//! - A peer never names a host path or device: the disks and TAPs come from this receiver's command
//!   line (or API call), one per disk and NIC of the guest, in order; a guest with a disk the
//!   receiver was not given is refused before anything is opened.
//! - Sizes come from the peer, so they are checked before anything is allocated: vCPUs within KVM's
//!   range, guest memory no larger than this host's.

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use vmm::machine::MachineDescription;
use vmm::{Machine, NetConfig, RestoreOptions};

use super::security::LinkSecurity;
use super::stream::Link;
use crate::wire::{write_frame, Message};

/// Most vCPUs a guest may have (as `ftvmm run --vcpus`).
const MAX_VCPUS: u8 = 254;

/// How long one connection may take from TCP accept to its `Hello`, whatever it sends meanwhile.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors on the receiving side before a guest was accepted.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("accepting a connection: {0}")]
    Accept(std::io::Error),
}

/// Binds the listening socket.
pub fn bind(listen: &str) -> Result<TcpListener, AcceptError> {
    TcpListener::bind(listen).map_err(|source| AcceptError::Listen {
        addr: listen.to_string(),
        source,
    })
}

/// Listens on `listen`, calls `on_listening` with the bound address, and waits for the one peer
/// that passes `security` and sends `Hello` (see [`accept_peer`]): how every receiver starts.
pub fn listen_for_peer(
    listen: &str,
    security: &LinkSecurity,
    on_listening: impl FnOnce(SocketAddr),
) -> Result<Incoming, AcceptError> {
    let listener = bind(listen)?;
    if let Ok(addr) = listener.local_addr() {
        on_listening(addr);
    }
    accept_peer(&listener, security, HANDSHAKE_TIMEOUT)
}

/// An authenticated peer that opened with `Hello`.
pub struct Incoming {
    pub link: Link,
    pub description: MachineDescription,
}

/// Waits for a peer that passes `security` and sends `Hello`; every other connection is refused with
/// a warning naming the peer and why, and the wait goes on. `handshake_timeout` bounds how long one
/// connection may take to get that far.
pub fn accept_peer(
    listener: &TcpListener,
    security: &LinkSecurity,
    handshake_timeout: Duration,
) -> Result<Incoming, AcceptError> {
    let (link, first) = accept_opening(listener, security, handshake_timeout, |m| match m {
        Message::Hello { .. } => Ok(()),
        other => Err(format!("it opened with {} instead of Hello", other.name())),
    })?;
    match first {
        Message::Hello { description } => Ok(Incoming { link, description }),
        _ => unreachable!("accept_opening returns only what the filter took"),
    }
}

/// Waits for a peer that passes `security` and whose first message `wanted` takes; returns the link
/// and that message. Every other connection is refused with a warning and the wait goes on. The
/// connections' handshakes run side by side (`handshakes.rs`): one that dribbles delays no other.
pub fn accept_opening(
    listener: &TcpListener,
    security: &LinkSecurity,
    handshake_timeout: Duration,
    wanted: impl Fn(&Message) -> Result<(), String>,
) -> Result<(Link, Message), AcceptError> {
    super::handshakes::first_opening(listener, security, handshake_timeout, &wanted)
        .map_err(AcceptError::Accept)
}

/// Builds the machine `incoming` describes on this host's own backends (`options`: this receiver's
/// disks and TAPs, one per device of the guest, in order; `None` is the same as none given), and
/// answers the peer `Ready`, or `Error` with the reason (which is also returned).
pub fn assemble_incoming(
    incoming: &mut Incoming,
    options: &RestoreOptions,
) -> Result<Machine, String> {
    let result = check_description(
        &incoming.description,
        options,
        vmm::memory::host_memory_mib(),
    )
    .and_then(|options| {
        Machine::assemble_for_restore(&incoming.description, &options).map_err(|e| e.to_string())
    });
    match result {
        Ok(machine) => {
            write_frame(&mut incoming.link, &Message::Ready).map_err(|e| e.to_string())?;
            Ok(machine)
        }
        Err(reason) => {
            let _ = write_frame(
                &mut incoming.link,
                &Message::Error {
                    message: reason.clone(),
                },
            );
            Err(reason)
        }
    }
}

/// Checks what a peer asks for against this host and returns the restore options to build it
/// with: this receiver's own disks, TAPs and firmware only, the guest keeping its MACs. Nothing the
/// peer names is opened, and no refusal repeats a path the peer sent.
fn check_description(
    d: &MachineDescription,
    options: &RestoreOptions,
    host_memory_mib: Option<u64>,
) -> Result<RestoreOptions, String> {
    if d.vcpus == 0 || d.vcpus > MAX_VCPUS {
        return Err(format!(
            "the guest has {} vCPUs; 1 to {MAX_VCPUS} are supported",
            d.vcpus
        ));
    }
    if let Some(host) = host_memory_mib {
        if d.memory_mib == 0 || d.memory_mib > host {
            return Err(format!(
                "the guest has {} MiB of memory; this host has {host} MiB",
                d.memory_mib
            ));
        }
    }
    let disks = options.disks.clone().unwrap_or_default();
    if disks.len() != d.disks.len() {
        return Err(format!(
            "the guest has {} disk(s) and this receiver was given {} (--disk): the receiver names \
             this host's image for each disk, in order; a peer never chooses host paths",
            d.disks.len(),
            disks.len()
        ));
    }
    let nets: Vec<NetConfig> = options.nets.clone().unwrap_or_default();
    if nets.len() != d.nets.len() {
        return Err(format!(
            "the guest has {} network interface(s) and this receiver was given {} (--net): the \
             receiver names this host's TAP for each, in order; a peer never chooses host devices",
            d.nets.len(),
            nets.len()
        ));
    }
    // A firmware-booted guest gets this host's image, whose CRC32C must then match the one the
    // guest started from; the path in the description is the peer's and is never opened.
    let firmware = match (&d.firmware, &options.firmware) {
        (None, _) => None,
        (Some(_), Some(mine)) => Some(mine.clone()),
        (Some(_), None) => {
            return Err(
                "the guest boots through UEFI firmware and this receiver was given none \
                        (--firmware): the receiver names this host's image; a peer never chooses \
                        host paths"
                    .into(),
            )
        }
    };
    let nets = nets
        .into_iter()
        .zip(&d.nets)
        .map(|(mine, theirs)| NetConfig {
            tap: mine.tap,
            mac: Some(
                mine.mac
                    .unwrap_or(devices::virtio::net::MacAddr(theirs.mac)),
            ),
        })
        .collect();
    Ok(RestoreOptions {
        serial: options.serial.clone(),
        disks: Some(disks),
        nets: Some(nets),
        withheld_cpu: options.withheld_cpu.clone(),
        firmware,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm::machine::{DiskDescription, NetDescription};
    use vmm::BlockConfig;

    fn description() -> MachineDescription {
        MachineDescription {
            vcpus: 2,
            memory_mib: 256,
            disks: vec![DiskDescription {
                path: "/etc/shadow".into(),
                read_only: false,
            }],
            nets: vec![NetDescription {
                tap: "peer-tap".into(),
                mac: [2, 0, 0, 0, 0, 7],
            }],
            hyperv: Default::default(),
            firmware: None,
            cpu_features: vec![],
        }
    }

    #[test]
    fn a_peer_never_names_host_paths() {
        let err =
            check_description(&description(), &RestoreOptions::default(), Some(1024)).unwrap_err();
        assert!(
            err.contains("1 disk(s)") && err.contains("given 0"),
            "{err}"
        );

        let mine = RestoreOptions {
            serial: None,
            withheld_cpu: Default::default(),
            firmware: None,
            disks: Some(vec![BlockConfig {
                path: "/srv/mine.img".into(),
                read_only: true,
            }]),
            nets: Some(vec![NetConfig {
                tap: "my-tap".into(),
                mac: None,
            }]),
        };
        let got = check_description(&description(), &mine, Some(1024)).unwrap();
        let disks = got.disks.unwrap();
        assert_eq!(disks[0].path, std::path::PathBuf::from("/srv/mine.img"));
        let nets = got.nets.unwrap();
        assert_eq!(nets[0].tap, "my-tap");
        assert_eq!(
            nets[0].mac,
            Some(devices::virtio::net::MacAddr([2, 0, 0, 0, 0, 7]))
        );
    }

    #[test]
    fn a_peer_never_names_the_firmware() {
        let mut d = description();
        d.disks.clear();
        d.nets.clear();
        d.firmware = Some("/dev/zero".into());
        let err = check_description(&d, &RestoreOptions::default(), Some(1024)).unwrap_err();
        assert!(err.contains("--firmware"), "{err}");
        assert!(
            !err.contains("/dev/zero"),
            "the refusal repeats the peer's path: {err}"
        );

        let mine = RestoreOptions {
            firmware: Some("/usr/share/ovmf/OVMF.fd".into()),
            ..Default::default()
        };
        let got = check_description(&d, &mine, Some(1024)).unwrap();
        assert_eq!(
            got.firmware,
            Some(std::path::PathBuf::from("/usr/share/ovmf/OVMF.fd"))
        );
        // A guest without firmware gets none, whatever this receiver was given.
        d.firmware = None;
        assert_eq!(
            check_description(&d, &mine, Some(1024)).unwrap().firmware,
            None
        );
    }

    #[test]
    fn impossible_sizes_are_refused_before_allocating() {
        let mut d = description();
        d.disks.clear();
        d.nets.clear();
        d.memory_mib = 1 << 40;
        let err = check_description(&d, &RestoreOptions::default(), Some(4096)).unwrap_err();
        assert!(err.contains("this host has 4096 MiB"), "{err}");
        d.memory_mib = 64;
        d.vcpus = 0;
        assert!(check_description(&d, &RestoreOptions::default(), Some(4096)).is_err());
        d.vcpus = 1;
        assert!(check_description(&d, &RestoreOptions::default(), Some(4096)).is_ok());
    }
}
