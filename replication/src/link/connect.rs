//! The opening side of a link (a migration source, a protected primary): connect, authenticate,
//! announce the guest's hardware and wait until the peer has built it.

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::ClientConnection;
use vmm::machine::MachineDescription;

use super::security::LinkSecurity;
use super::stream::Link;
use crate::wire::{read_frame, write_frame, FrameError, Message};

/// Errors opening a link.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot resolve {0} (HOST:PORT)")]
    Resolve(String),
    #[error("cannot connect to {to}: {source}")]
    Connect { to: String, source: std::io::Error },
    #[error("TLS with {to} failed: {reason}")]
    Tls { to: String, reason: String },
    #[error(transparent)]
    Wire(#[from] FrameError),
    #[error("the peer refused: {0}")]
    Refused(String),
    #[error("unexpected message from the peer: {0}")]
    Protocol(String),
}

/// A peer's `HOST:PORT` as the operator gave it, and the address it resolved to.
///
/// Names are resolved before a replication thread sandboxes itself: resolving reads
/// `/etc/hosts` (and may ask DNS), and the replication threads' seccomp filter
/// (`vmm/src/seccomp.rs`) forbids opening files. The link dials the address; TLS checks the
/// peer's certificate against the host part of the name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerAddress {
    given: String,
    addr: SocketAddr,
}

impl PeerAddress {
    /// Resolves `to` (`HOST:PORT`, `[V6]:PORT`) to its first address.
    pub fn resolve(to: &str) -> Result<Self, OpenError> {
        let addr = to
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| OpenError::Resolve(to.to_string()))?;
        Ok(Self {
            given: to.to_string(),
            addr,
        })
    }

    /// The address the link dials.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The host part of the name given: what the peer's certificate must carry.
    pub fn host(&self) -> &str {
        host_of(&self.given)
    }
}

impl std::fmt::Display for PeerAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.given)
    }
}

/// Connects to `to`, authenticates as `security` says, announces `description` and returns the
/// link once the peer is `Ready`.
pub fn open(
    to: &PeerAddress,
    description: &MachineDescription,
    security: &LinkSecurity,
    connect_timeout: Duration,
    io_timeout: Duration,
) -> Result<Link, OpenError> {
    let mut link = connect(to, security, connect_timeout, io_timeout)?;
    write_frame(
        &mut link,
        &Message::Hello {
            description: description.clone(),
        },
    )?;
    match read_frame::<_, Message>(&mut link)? {
        Message::Ready => Ok(link),
        Message::Error { message } => Err(OpenError::Refused(message)),
        other => Err(OpenError::Protocol(format!(
            "expected Ready, got {}",
            other.name()
        ))),
    }
}

/// Connects and authenticates, with `io_timeout` on every read and write.
pub fn connect(
    to: &PeerAddress,
    security: &LinkSecurity,
    connect_timeout: Duration,
    io_timeout: Duration,
) -> Result<Link, OpenError> {
    let addr = to.addr();
    let socket = TcpStream::connect_timeout(&addr, connect_timeout).map_err(|source| {
        OpenError::Connect {
            to: to.to_string(),
            source,
        }
    })?;
    let _ = socket.set_nodelay(true);
    socket
        .set_read_timeout(Some(io_timeout))
        .map_err(FrameError::from)?;
    socket
        .set_write_timeout(Some(io_timeout))
        .map_err(FrameError::from)?;
    match security {
        LinkSecurity::PlainTcp => {
            tracing::warn!(peer = %addr, "INSECURE: link over plain TCP, neither authenticated nor encrypted");
            Ok(Link::plain(socket, addr))
        }
        LinkSecurity::Tls(identity) => {
            let tls_err = |reason: String| OpenError::Tls {
                to: to.to_string(),
                reason,
            };
            let name = ServerName::try_from(to.host().to_string()).map_err(|e| {
                tls_err(format!(
                    "{:?} is not a host name or address: {e}",
                    to.host()
                ))
            })?;
            let mut conn = ClientConnection::new(identity.client.clone(), name)
                .map_err(|e| tls_err(e.to_string()))?;
            let mut socket = socket;
            while conn.is_handshaking() {
                conn.complete_io(&mut socket)
                    .map_err(|e| tls_err(handshake_reason(&e)))?;
            }
            tracing::debug!(peer = %addr, "TLS link established");
            Ok(Link::tls_client(conn, socket, addr))
        }
    }
}

/// The host part of `HOST:PORT` (`[v6]:port` too): the name the peer's certificate must carry.
pub fn host_of(to: &str) -> &str {
    let host = to.rsplit_once(':').map_or(to, |(h, _)| h);
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

/// Makes a failed handshake's error readable: rustls puts the alert or the certificate problem in
/// the inner error.
pub fn handshake_reason(e: &std::io::Error) -> String {
    match e.get_ref() {
        Some(inner) => inner.to_string(),
        None if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            "the peer closed the connection during the handshake (does it use TLS, and trust our CA?)"
                .into()
        }
        None if matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ) =>
        {
            "the peer did not complete the handshake in time".into()
        }
        None => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_of_strips_port_and_brackets() {
        assert_eq!(host_of("127.0.0.1:7000"), "127.0.0.1");
        assert_eq!(host_of("node-b.example:7000"), "node-b.example");
        assert_eq!(host_of("[::1]:7000"), "::1");
    }
}
