//! What protects a link between two ftvmm processes.
//!
//! The default and the recommended mode is mutual TLS 1.3: each host holds a node certificate and its
//! key, both signed by one CA that defines who may migrate or replicate to whom (`ftvmm tls-certs`
//! makes such a set). The opening side checks that the peer's certificate chains to the CA and names
//! the address it dialled; the accepting side checks that the opener's certificate chains to the same
//! CA. A guest's memory and state never cross the network in the clear, and a peer without a
//! certificate from the CA can neither send a guest nor receive one.
//!
//! Plain TCP exists for debugging on a trusted loopback only; it is chosen explicitly
//! (`--insecure-plain-tcp`) and logged loudly each time a link is made.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// The CA certificate in a TLS directory.
pub const CA_FILE: &str = "ca.crt";
/// This node's certificate in a TLS directory.
pub const CERT_FILE: &str = "node.crt";
/// This node's private key in a TLS directory.
pub const KEY_FILE: &str = "node.key";

/// Why a TLS identity cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error("TLS: cannot read {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("TLS: {path} holds no certificate")]
    NoCertificate { path: PathBuf },
    #[error("TLS: the CA certificate in {path} is not usable: {reason}")]
    BadCa { path: PathBuf, reason: String },
    #[error("TLS: the certificate and key in {dir} do not make a usable identity: {reason}")]
    BadIdentity { dir: PathBuf, reason: String },
}

/// How links of this process are protected.
#[derive(Clone, Debug)]
pub enum LinkSecurity {
    /// Mutual TLS with this node's identity.
    Tls(Arc<TlsIdentity>),
    /// No authentication, no encryption: only where the operator asked for it.
    PlainTcp,
}

impl LinkSecurity {
    /// Loads the identity in `dir` (`ca.crt`, `node.crt`, `node.key`).
    pub fn tls(dir: &Path) -> Result<Self, SecurityError> {
        Ok(Self::Tls(Arc::new(TlsIdentity::load(dir)?)))
    }

    /// A short name for logs and status: `tls` or `plain-tcp`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Tls(_) => "tls",
            Self::PlainTcp => "plain-tcp",
        }
    }
}

/// This node's TLS identity: the client and server configurations built from one directory.
pub struct TlsIdentity {
    dir: PathBuf,
    pub(super) client: Arc<ClientConfig>,
    pub(super) server: Arc<ServerConfig>,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("dir", &self.dir)
            .finish()
    }
}

impl TlsIdentity {
    /// Loads `ca.crt`, `node.crt` and `node.key` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, SecurityError> {
        let ca_path = dir.join(CA_FILE);
        let cert_path = dir.join(CERT_FILE);
        let key_path = dir.join(KEY_FILE);
        let read = |path: &Path| {
            let path = path.to_path_buf();
            move |e: rustls::pki_types::pem::Error| SecurityError::Read {
                path,
                reason: e.to_string(),
            }
        };
        let ca_certs = load_certs(&ca_path)?;
        let certs = load_certs(&cert_path)?;
        let key = PrivateKeyDer::from_pem_file(&key_path).map_err(read(&key_path))?;
        warn_if_key_readable_by_others(&key_path);

        let mut roots = RootCertStore::empty();
        for cert in ca_certs {
            roots.add(cert).map_err(|e| SecurityError::BadCa {
                path: ca_path.clone(),
                reason: e.to_string(),
            })?;
        }
        let roots = Arc::new(roots);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let identity_err = |reason: String| SecurityError::BadIdentity {
            dir: dir.to_path_buf(),
            reason,
        };
        let client = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| identity_err(e.to_string()))?
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(certs.clone(), key.clone_key())
            .map_err(|e| identity_err(e.to_string()))?;
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| SecurityError::BadCa {
                    path: ca_path.clone(),
                    reason: e.to_string(),
                })?;
        let mut server = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| identity_err(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)
            .map_err(|e| identity_err(e.to_string()))?;
        // No session tickets: links are never resumed, and a receiver then sends nothing its peer
        // has not asked for. A peer that closes a connection with unread data resets it, which
        // throws away what it had queued: the goodbye on the heartbeat's control channel must reach
        // the standby before the channel's close (protection/heartbeat/control_channel.rs).
        server.send_tls13_tickets = 0;
        Ok(Self {
            dir: dir.to_path_buf(),
            client: Arc::new(client),
            server: Arc::new(server),
        })
    }

    /// The directory the identity was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The client side (this node's certificate, the CA's roots), for other TLS services between
    /// ftvmm hosts (the host daemons' API).
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.client.clone()
    }

    /// The server side: peers must present a certificate from the same CA.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server.clone()
    }
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, SecurityError> {
    let read = |e: rustls::pki_types::pem::Error| SecurityError::Read {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(read)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(read)?;
    if certs.is_empty() {
        return Err(SecurityError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

fn warn_if_key_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                "TLS: the private key {} is readable by other users (mode {:o}); chmod 600 it",
                path.display(),
                meta.permissions().mode() & 0o777
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_files_are_named() {
        let dir = std::env::temp_dir().join(format!("ftvmm-tls-missing-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let err = TlsIdentity::load(&dir).unwrap_err().to_string();
        assert!(err.contains("ca.crt"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_generated_identity_loads() {
        let dir = std::env::temp_dir().join(format!("ftvmm-tls-load-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        crate::link::certs::generate(&dir, &[("a".into(), vec!["127.0.0.1".into()])]).unwrap();
        let id = TlsIdentity::load(&dir.join("a")).unwrap();
        assert_eq!(id.dir(), dir.join("a"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
