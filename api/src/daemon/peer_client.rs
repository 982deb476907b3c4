//! The client one daemon uses to ask another (its peer, on another host) to host a standby or
//! receive a migration: HTTPS to the peer's `--listen` address with this host's TLS identity and
//! the cluster's bearer token (`tcp_api.rs` is the other end).

use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;

use super::tcp_api::BearerToken;
use crate::client::{exchange, ApiResponse, ExchangeError};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors talking to a peer daemon.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("peer daemon {peer}: cannot resolve it (HOST:PORT)")]
    Resolve { peer: String },
    #[error("peer daemon {peer}: cannot connect: {source}")]
    Connect {
        peer: String,
        source: std::io::Error,
    },
    #[error("peer daemon {peer}: TLS: {reason}")]
    Tls { peer: String, reason: String },
    #[error("peer daemon {peer}: {reason}")]
    Exchange { peer: String, reason: String },
}

/// A client for peer daemons.
#[derive(Clone)]
pub struct PeerClient {
    tls: Arc<rustls::ClientConfig>,
    token: BearerToken,
}

impl PeerClient {
    pub fn new(tls: Arc<rustls::ClientConfig>, token: BearerToken) -> Self {
        Self { tls, token }
    }

    /// Sends one request to the daemon at `peer` (`HOST:PORT`, a name or address its certificate
    /// carries) and reads its answer.
    pub fn request(
        &self,
        peer: &str,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
        timeout: Duration,
    ) -> Result<ApiResponse, PeerError> {
        let addr = peer
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| PeerError::Resolve {
                peer: peer.to_string(),
            })?;
        let connect_err = |source| PeerError::Connect {
            peer: peer.to_string(),
            source,
        };
        let socket = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).map_err(connect_err)?;
        socket
            .set_read_timeout(Some(timeout))
            .and_then(|()| socket.set_write_timeout(Some(timeout)))
            .map_err(connect_err)?;
        let tls_err = |reason: String| PeerError::Tls {
            peer: peer.to_string(),
            reason,
        };
        let host = replication::link::host_of(peer).to_string();
        let name = ServerName::try_from(host.clone())
            .map_err(|e| tls_err(format!("{host:?} is not a host name or address: {e}")))?;
        let conn = rustls::ClientConnection::new(self.tls.clone(), name)
            .map_err(|e| tls_err(e.to_string()))?;
        let mut stream = rustls::StreamOwned::new(conn, socket);
        let auth = format!("Bearer {}", self.token.as_str());
        let deadline = std::time::Instant::now() + timeout;
        let headers = [("Authorization", auth.as_str())];
        exchange(&mut stream, method, path, body, &headers, deadline).map_err(|e| {
            PeerError::Exchange {
                peer: peer.to_string(),
                reason: match e {
                    ExchangeError::Io(e) => replication::link::handshake_reason(&e),
                    ExchangeError::Response(r) => format!("malformed response: {r}"),
                },
            }
        })
    }
}
