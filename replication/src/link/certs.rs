//! Making a CA and node certificates for mutual TLS between ftvmm hosts (`ftvmm tls-certs`).
//!
//! Layout written under the output directory:
//!
//! ```text
//! ca.crt, ca.key              the CA (keep ca.key offline in production)
//! NODE/ca.crt                 the CA certificate again, so NODE/ is all a host needs
//! NODE/node.crt, NODE/node.key  the node's certificate (server and client auth) and key
//! ```
//!
//! Keys are ECDSA P-256, written 0600 in 0700 directories. A node's certificate names the addresses
//! and host names peers will dial it by; a peer checks the one it dialled.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use vmm::snapshot::{create_private_dir, write_private};

use super::security::{CA_FILE, CERT_FILE, KEY_FILE};

/// Why certificates could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("{0} already exists; choose a new directory (existing keys are never overwritten)")]
    Exists(PathBuf),
    #[error("node name {0:?}: use letters, digits, '-', '_' and '.' only")]
    BadName(String),
    #[error("node {0}: give at least one address or host name it is reached by")]
    NoNames(String),
    #[error("node {node}: {reason}")]
    BadNames { node: String, reason: String },
    #[error("making a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Writes a new CA and, for each `(name, addresses and host names)`, a node identity under `out`.
pub fn generate(out: &Path, nodes: &[(String, Vec<String>)]) -> Result<(), CertsError> {
    if out.exists() {
        return Err(CertsError::Exists(out.to_path_buf()));
    }
    for (name, sans) in nodes {
        let valid = !name.is_empty()
            && !name.starts_with('.')
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !valid {
            return Err(CertsError::BadName(name.clone()));
        }
        if sans.is_empty() {
            return Err(CertsError::NoNames(name.clone()));
        }
    }
    let mut ca_params = CertificateParams::default();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "ftvmm CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;

    let mut issued = Vec::with_capacity(nodes.len());
    for (name, sans) in nodes {
        let mut params =
            CertificateParams::new(sans.clone()).map_err(|e| CertsError::BadNames {
                node: name.clone(),
                reason: e.to_string(),
            })?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &ca_cert, &ca_key)?;
        issued.push((name, cert.pem(), key.serialize_pem()));
    }

    let write = |path: PathBuf, data: &str| {
        write_private(&path, data.as_bytes()).map_err(|source| CertsError::Write { path, source })
    };
    let mkdir = |path: &Path| {
        create_private_dir(path).map_err(|source| CertsError::Write {
            path: path.to_path_buf(),
            source,
        })
    };
    mkdir(out)?;
    write(out.join(CA_FILE), &ca_cert.pem())?;
    write(out.join("ca.key"), &ca_key.serialize_pem())?;
    for (name, cert, key) in issued {
        let dir = out.join(name);
        mkdir(&dir)?;
        write(dir.join(CA_FILE), &ca_cert.pem())?;
        write(dir.join(CERT_FILE), &cert)?;
        write(dir.join(KEY_FILE), &key)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_bad_names_and_existing_directories() {
        let dir = std::env::temp_dir().join(format!("ftvmm-certs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert!(matches!(
            generate(&dir, &[("../x".into(), vec!["127.0.0.1".into()])]),
            Err(CertsError::BadName(_))
        ));
        assert!(matches!(
            generate(&dir, &[("a".into(), vec![])]),
            Err(CertsError::NoNames(_))
        ));
        generate(
            &dir,
            &[("a".into(), vec!["127.0.0.1".into(), "localhost".into()])],
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("a").join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(generate(&dir, &[]), Err(CertsError::Exists(_))));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
