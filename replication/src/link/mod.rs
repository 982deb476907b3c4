//! The transfer layer that live migration and protection share: how two ftvmm processes find,
//! authenticate and talk to each other.
//!
//! - `security.rs`: what protects a link — mutual TLS with certificates from one CA (the default),
//!   or plain TCP only when the operator says so explicitly.
//! - `stream.rs`: [`Link`], the byte stream the wire protocol (`crate::wire`) runs on, TLS or not.
//! - `connect.rs`: the opening side (a migration source, a protected primary): connect, authenticate,
//!   announce the guest's hardware, wait until the peer has built it.
//! - `accept.rs`: the receiving side (a migration destination, a standby): wait for a peer that
//!   authenticates and says `Hello`, and build the guest's hardware from this host's own backends
//!   — a peer never names a host path.
//! - `handshakes.rs`: the receiver's connections carried through TLS to their first message side by
//!   side, each within one deadline, with limits per address and in all.
//! - `certs.rs`: making a CA and node certificates for the `ftvmm tls-certs` helper.
//!
//! docs/wire-protocol.md describes the handshake and the rules as built.

pub mod accept;
pub mod certs;
pub mod connect;
mod handshakes;
pub mod refusals;
pub mod security;
pub mod stream;

pub use accept::{
    accept_opening, accept_peer, assemble_incoming, bind, listen_for_peer, AcceptError, Incoming,
    HANDSHAKE_TIMEOUT,
};
pub use connect::{connect, handshake_reason, host_of, open, OpenError, PeerAddress};
pub use refusals::RefusalLog;
pub use security::{LinkSecurity, SecurityError, TlsIdentity};
pub use stream::{Link, LinkShutdown};
