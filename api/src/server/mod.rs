//! The per-VM control API: JSON over HTTP on a Unix socket, described by an OpenAPI document
//! (`GET /api/v1/openapi.json`). It is the seed of the host daemon's REST API: same paths, same
//! error shape (`{"error": "..."}` with a meaningful status).
//!
//! Requests are handed to the VM's event-loop thread through a [`ControlHandle`]; the server itself
//! runs on its own thread with a small tokio runtime.

mod routes;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm::ControlHandle;

/// Errors starting the API server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("API socket {path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("cannot bind the API socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the API server: {0}")]
    Runtime(std::io::Error),
}

/// A running API server; the socket file is removed when it is dropped.
pub struct ApiServer {
    path: PathBuf,
    outcome_reported: Arc<AtomicBool>,
    protection: Arc<std::sync::Mutex<Option<replication::protection::ProtectionHandle>>>,
    _thread: JoinHandle<()>,
}

impl ApiServer {
    /// Lets the API report on (and keeps alive) the VM's epoch loop.
    pub fn set_protection(&self, handle: replication::protection::ProtectionHandle) {
        *self.protection.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
    }

    /// After the VM migrated away: keeps serving for up to `grace` so that whoever started the
    /// migration can read its outcome before this process exits.
    pub fn linger_until_migration_reported(&self, grace: Duration) {
        let deadline = Instant::now() + grace;
        while !self.outcome_reported.load(Ordering::SeqCst) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Serves the control API for the VM behind `handle` on the Unix socket `path`.
pub fn spawn(path: &Path, handle: ControlHandle) -> Result<ApiServer, ServerError> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ServerError::NotASocket {
                path: path.to_path_buf(),
            });
        }
        // A socket left by a process that is gone.
        let _ = std::fs::remove_file(path);
    }
    let std_listener =
        std::os::unix::net::UnixListener::bind(path).map_err(|source| ServerError::Bind {
            path: path.to_path_buf(),
            source,
        })?;
    std_listener
        .set_nonblocking(true)
        .map_err(ServerError::Runtime)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(ServerError::Runtime)?;
    let state = routes::ApiState::new(handle);
    let outcome_reported = state.outcome_reported.clone();
    let protection = state.protection.clone();
    let app = routes::router(state);
    let thread = std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            runtime.block_on(async move {
                let listener = match tokio::net::UnixListener::from_std(std_listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!("API socket: {e}");
                        return;
                    }
                };
                if let Err(e) = axum::serve(listener, app).await {
                    tracing::error!("API server stopped: {e}");
                }
            })
        })
        .map_err(ServerError::Runtime)?;
    tracing::info!(socket = %path.display(), "API server listening");
    Ok(ApiServer {
        path: path.to_path_buf(),
        outcome_reported,
        protection,
        _thread: thread,
    })
}
