//! The daemon's API over TCP, for peer daemons and remote operators: mutual TLS with the host's
//! identity (`--tls DIR`, the same one its VM links use: the client must hold a certificate from the
//! same CA) and, on every request, the cluster's bearer token (`--token-file`). The Unix socket
//! needs neither: its file permissions are its access control.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::Response;

use crate::server::routes::error;

/// Shortest token accepted: 128 bits as hex.
const MIN_TOKEN_LEN: usize = 32;

/// Errors reading the bearer token.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read the token file {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error(
        "the token in {path} is {len} characters; at least {MIN_TOKEN_LEN} are needed (e.g. \
         `head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n' > FILE; chmod 600 FILE`)"
    )]
    TooShort { path: PathBuf, len: usize },
    #[error("the token in {path} must be printable ASCII without spaces")]
    NotPrintable { path: PathBuf },
    #[error(
        "the token file {path} is {problem}: whoever reads it can act on this daemon (chmod 600, \
         owned by the user the daemon runs as)"
    )]
    Exposed { path: PathBuf, problem: String },
}

/// The shared secret every request over TCP must carry as `Authorization: Bearer TOKEN`.
#[derive(Clone)]
pub struct BearerToken(Arc<str>);

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(..)")
    }
}

impl BearerToken {
    /// Reads the token from `path` (surrounding whitespace is dropped), which only this user may
    /// own and read.
    pub fn read(path: &Path) -> Result<Self, TokenError> {
        use std::os::unix::fs::MetadataExt;
        let read_error = |source| TokenError::Read {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(read_error)?;
        let meta = file.metadata().map_err(read_error)?;
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        let problem = if meta.uid() != me {
            Some(format!(
                "owned by uid {} (the daemon runs as {me})",
                meta.uid()
            ))
        } else if meta.mode() & 0o077 != 0 {
            Some(format!("open to others (mode {:o})", meta.mode() & 0o777))
        } else {
            None
        };
        if let Some(problem) = problem {
            return Err(TokenError::Exposed {
                path: path.to_path_buf(),
                problem,
            });
        }
        let text = std::io::read_to_string(file).map_err(read_error)?;
        Self::parse(text.trim()).map_err(|e| match e {
            TokenParse::TooShort(len) => TokenError::TooShort {
                path: path.to_path_buf(),
                len,
            },
            TokenParse::NotPrintable => TokenError::NotPrintable {
                path: path.to_path_buf(),
            },
        })
    }

    fn parse(token: &str) -> Result<Self, TokenParse> {
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(TokenParse::NotPrintable);
        }
        if token.len() < MIN_TOKEN_LEN {
            return Err(TokenParse::TooShort(token.len()));
        }
        Ok(Self(token.into()))
    }

    /// The token itself, to send.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `header` (an `Authorization` value) carries this token; compared in constant time.
    fn admits(&self, header: &[u8]) -> bool {
        let Some(given) = header.strip_prefix(b"Bearer ") else {
            return false;
        };
        let want = self.0.as_bytes();
        given.len() == want.len()
            && given
                .iter()
                .zip(want)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }
}

#[derive(Debug)]
enum TokenParse {
    TooShort(usize),
    NotPrintable,
}

/// Middleware: a request without the token is refused with 401 before any handler sees it.
pub async fn require_token(
    State(token): State<BearerToken>,
    request: Request,
    next: Next,
) -> Response {
    let admitted = request
        .headers()
        .get(header::AUTHORIZATION)
        .is_some_and(|v| token.admits(v.as_bytes()));
    if !admitted {
        let mut response = error(
            StatusCode::UNAUTHORIZED,
            "this API needs the cluster's bearer token: Authorization: Bearer TOKEN",
        );
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            "Bearer".parse().expect("valid header"),
        );
        return response;
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::peer_client::{PeerClient, PeerError};
    use crate::daemon::tcp_server::{self, Limits};
    use replication::link::TlsIdentity;
    use std::net::SocketAddr;
    use std::time::Duration;

    /// Serves a router answering `GET /ok` behind TLS and `token` on loopback; its address.
    fn serve(identity: &TlsIdentity, token: BearerToken) -> SocketAddr {
        let router = axum::Router::new()
            .route("/ok", axum::routing::get(|| async { "{\"ok\":true}" }))
            .layer(axum::middleware::from_fn_with_state(token, require_token));
        tcp_server::serve_on_loopback(identity.server_config(), router, Limits::default())
    }

    #[test]
    fn the_tcp_api_needs_a_certificate_from_the_ca_and_the_token() {
        let dir = std::env::temp_dir().join(format!("ftvmm-tcp-api-{}", std::process::id()));
        let other = dir.join("other");
        let _ = std::fs::remove_dir_all(&dir);
        let nodes = [
            ("server".to_string(), vec!["127.0.0.1".to_string()]),
            ("client".to_string(), vec!["127.0.0.1".to_string()]),
        ];
        replication::link::certs::generate(&dir.join("pki"), &nodes).unwrap();
        replication::link::certs::generate(&other, &nodes[1..]).unwrap();
        let load = |p: std::path::PathBuf| TlsIdentity::load(&p).unwrap();
        let token = BearerToken::parse(&"t".repeat(32)).unwrap();
        let addr = serve(&load(dir.join("pki/server")), token.clone()).to_string();
        let client = load(dir.join("pki/client")).client_config();
        let timeout = Duration::from_secs(10);

        let good = PeerClient::new(client.clone(), token);
        let answer = good.request(&addr, "GET", "/ok", None, timeout).unwrap();
        assert_eq!(
            (answer.status, answer.body["ok"].clone()),
            (200, true.into())
        );

        let wrong = PeerClient::new(client, BearerToken::parse(&"u".repeat(32)).unwrap());
        let answer = wrong.request(&addr, "GET", "/ok", None, timeout).unwrap();
        assert_eq!(answer.status, 401, "{}", answer.body);

        // A client of another CA gets no answer: the handshake fails.
        let stranger = PeerClient::new(
            load(other.join("client")).client_config(),
            BearerToken::parse(&"t".repeat(32)).unwrap(),
        );
        let refused = stranger.request(&addr, "GET", "/ok", None, timeout);
        assert!(
            matches!(refused, Err(PeerError::Exchange { .. })),
            "{:?}",
            refused.map(|a| a.status)
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_token_file_others_may_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("ftvmm-token-mode-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        std::fs::write(&path, "a".repeat(40)).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let refused = BearerToken::read(&path)
            .map(|_| ())
            .map_err(|e| e.to_string());
        assert!(
            refused
                .as_ref()
                .is_err_and(|e| e.contains("open to others (mode 644)")),
            "{refused:?}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(BearerToken::read(&path).unwrap().as_str(), "a".repeat(40));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn tokens_are_checked_whole_and_short_ones_refused() {
        let token = BearerToken::parse(&"a".repeat(40)).unwrap();
        assert!(token.admits(format!("Bearer {}", "a".repeat(40)).as_bytes()));
        assert!(!token.admits(format!("Bearer {}", "a".repeat(39)).as_bytes()));
        assert!(!token.admits(format!("Bearer {}b", "a".repeat(39)).as_bytes()));
        assert!(!token.admits(format!("Basic {}", "a".repeat(40)).as_bytes()));
        assert!(!token.admits(b""));
        assert!(matches!(
            BearerToken::parse("short"),
            Err(TokenParse::TooShort(5))
        ));
        assert!(matches!(
            BearerToken::parse(&format!("{} x", "a".repeat(40))),
            Err(TokenParse::NotPrintable)
        ));
    }
}
