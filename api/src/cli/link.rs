//! Options for the links this process opens or accepts (live migration, protection): mutual TLS
//! from a directory made by `ftvmm tls-certs`, or plain TCP when explicitly asked for.

use std::path::PathBuf;

use clap::Args;
use replication::link::{LinkSecurity, SecurityError};

/// How this process's migration and replication links are protected.
#[derive(Args, Debug, Default)]
pub struct LinkArgs {
    /// Mutual TLS for migration and replication links: a directory holding this host's ca.crt,
    /// node.crt and node.key (see `ftvmm tls-certs`). Peers must hold a certificate from the same CA;
    /// a peer dialled by address must have that address in its certificate.
    #[arg(
        long = "tls",
        value_name = "DIR",
        conflicts_with = "insecure_plain_tcp"
    )]
    tls: Option<PathBuf>,

    /// Use plain TCP for migration and replication links: no authentication, no encryption. Anyone
    /// who reaches the port can send or take a guest. For debugging on a trusted network only.
    #[arg(long)]
    insecure_plain_tcp: bool,
}

/// Why the link options cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LinkArgsError {
    #[error(transparent)]
    Security(#[from] SecurityError),
    #[error(
        "{0} needs a protected link: give --tls DIR (make one with `ftvmm tls-certs`), or \
         --insecure-plain-tcp to send guests unauthenticated and in the clear"
    )]
    Unprotected(&'static str),
}

impl LinkArgs {
    /// The link security chosen, if any (`None`: neither option given).
    pub fn security(&self) -> Result<Option<LinkSecurity>, LinkArgsError> {
        if self.insecure_plain_tcp {
            tracing::warn!(
                "INSECURE: --insecure-plain-tcp: migration and replication links are neither \
                 authenticated nor encrypted"
            );
            return Ok(Some(LinkSecurity::PlainTcp));
        }
        Ok(match &self.tls {
            Some(dir) => Some(LinkSecurity::tls(dir)?),
            None => None,
        })
    }

    /// The link security, which `what` cannot do without.
    pub fn required(&self, what: &'static str) -> Result<LinkSecurity, LinkArgsError> {
        self.security()?.ok_or(LinkArgsError::Unprotected(what))
    }
}
