//! The per-VM control API: JSON over HTTP on a Unix socket, described by an OpenAPI document
//! (`GET /api/v1/openapi.json`). It is the seed of the host daemon's REST API: same paths, same
//! error shape (`{"error": "..."}` with a meaningful status).
//!
//! Requests are handed to the VM's event-loop thread through a [`ControlHandle`]; the server itself
//! runs on its own thread with a small tokio runtime.

pub(crate) mod routes;
mod standby_routes;

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
    #[error("API socket {path} is served by another running process; choose another path")]
    InUse { path: PathBuf },
    #[error("cannot publish the API socket at {path}: {source}")]
    Publish {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot bind the API socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the API server: {0}")]
    Runtime(std::io::Error),
    #[error("API socket group {0:?}: no such group on this host")]
    NoSuchGroup(String),
    #[error("cannot give the API socket {path} to group {gid}: {source}")]
    Group {
        path: PathBuf,
        gid: u32,
        source: std::io::Error,
    },
}

/// Where the API is served: a Unix socket only its owner may use, or also a group's members.
#[derive(Clone, Debug)]
pub struct ApiSocket {
    pub path: PathBuf,
    /// The group (id) whose members may use the socket too; the socket is then 0660.
    pub group: Option<u32>,
}

impl ApiSocket {
    /// The socket's permissions: [`SOCKET_MODE`], or 0660 with a group.
    pub fn mode(&self) -> u32 {
        match self.group {
            Some(_) => GROUP_SOCKET_MODE,
            None => SOCKET_MODE,
        }
    }
}

/// The id of group `name` (a name in the host's group database, or a number).
pub fn group_id(name: &str) -> Result<u32, ServerError> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    let missing = || ServerError::NoSuchGroup(name.to_string());
    let c_name = std::ffi::CString::new(name).map_err(|_| missing())?;
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: `group` is plain old data that getgrnam_r fills in.
    let mut group: libc::group = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call: the NUL-terminated name, the group record, the
    // buffer with its true length (the record's strings point into it; only gr_gid is read), and
    // the result pointer.
    let rc = unsafe {
        libc::getgrnam_r(
            c_name.as_ptr(),
            &mut group,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 || found.is_null() {
        return Err(missing());
    }
    Ok(group.gr_gid)
}

/// A running API server; the socket file is removed when it is dropped (if it is still ours).
pub struct ApiServer {
    path: PathBuf,
    /// Device and inode of the socket file this server created.
    identity: (u64, u64),
    outcome_reported: Arc<AtomicBool>,
    protection: Arc<std::sync::Mutex<Option<replication::protection::ProtectionHandle>>>,
    witness: Arc<std::sync::Mutex<routes::WitnessSetting>>,
    _thread: JoinHandle<()>,
}

impl ApiServer {
    /// Lets the API report on (and keeps alive) the VM's epoch loop.
    pub fn set_protection(&self, handle: replication::protection::ProtectionHandle) {
        *self.protection.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
    }

    /// The current (or last) protection of the VM, if any.
    /// The witness and the claim this process holds there when no protection is current.
    pub fn witness_setting(&self) -> routes::WitnessSetting {
        self.witness
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn protection(&self) -> Option<replication::protection::ProtectionHandle> {
        self.protection
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The witness a `vm protect` uses, and the claim this process already holds there (a standby
    /// that took over).
    pub fn set_witness(
        &self,
        witness: Option<Arc<replication::witness::Witness>>,
        claim: Option<replication::witness::HeldClaim>,
    ) {
        *self.witness.lock().unwrap_or_else(|e| e.into_inner()) =
            routes::WitnessSetting { witness, claim };
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
        // Only our own socket: never one another process published at the same path since.
        if file_identity(&self.path) == Some(self.identity) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The API socket's permissions: only the user the VM runs as may control it.
pub const SOCKET_MODE: u32 = 0o600;
/// The API socket's permissions with `--api-socket-group`: its members too.
pub const GROUP_SOCKET_MODE: u32 = 0o660;

fn file_identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// Binds the Unix socket `socket` with its mode (and group), whatever the umask, without ever
/// replacing a socket that a live process serves. The socket is bound under a temporary name in
/// the same directory, given its group and mode, then hard-linked to its path (which fails if the
/// path appeared meanwhile), so no client can reach it with other permissions and no other socket
/// is clobbered.
pub(crate) fn bind_private(
    socket: &ApiSocket,
) -> Result<(std::os::unix::net::UnixListener, (u64, u64)), ServerError> {
    use std::os::unix::fs::{DirBuilderExt, FileTypeExt};
    let path = socket.path.as_path();
    let owned = || path.to_path_buf();
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ServerError::NotASocket { path: owned() });
        }
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => return Err(ServerError::InUse { path: owned() }),
            // A socket left by a process that is gone.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                let _ = std::fs::remove_file(path);
            }
            Err(source) => {
                return Err(ServerError::Bind {
                    path: owned(),
                    source,
                })
            }
        }
    }
    // The socket is bound inside a directory only this user can enter, given its mode and group
    // there, and only then linked into place: at no moment can anyone else connect to it through
    // a mode the umask chose.
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "api.sock".into());
    let private = path.with_file_name(format!(".{name}.{}.binding", std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(|source| ServerError::Bind {
            path: owned(),
            source,
        })?;
    let tmp = private.join("api.sock");
    let bound = bind_and_publish(socket, &tmp, path);
    let _ = std::fs::remove_file(&tmp);
    let _ = std::fs::remove_dir(&private);
    let listener = bound?;
    let identity = file_identity(path).ok_or_else(|| ServerError::Publish {
        path: owned(),
        source: std::io::Error::from(std::io::ErrorKind::NotFound),
    })?;
    Ok((listener, identity))
}

/// Binds `tmp`, gives it `socket`'s group and mode, and links it to `path`.
fn bind_and_publish(
    socket: &ApiSocket,
    tmp: &Path,
    path: &Path,
) -> Result<std::os::unix::net::UnixListener, ServerError> {
    use std::os::unix::fs::PermissionsExt;
    let owned = || path.to_path_buf();
    let listener =
        std::os::unix::net::UnixListener::bind(tmp).map_err(|source| ServerError::Bind {
            path: owned(),
            source,
        })?;
    if let Some(gid) = socket.group {
        std::os::unix::fs::lchown(tmp, None, Some(gid)).map_err(|source| ServerError::Group {
            path: owned(),
            gid,
            source,
        })?;
    }
    let published = std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(socket.mode()))
        .and_then(|()| std::fs::hard_link(tmp, path));
    match published {
        Ok(()) => Ok(listener),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            Err(ServerError::InUse { path: owned() })
        }
        Err(source) => Err(ServerError::Publish {
            path: owned(),
            source,
        }),
    }
}

/// Serves the control API for the VM behind `handle` on `socket`.
pub fn spawn(
    socket: &ApiSocket,
    handle: ControlHandle,
    link: Option<replication::link::LinkSecurity>,
) -> Result<ApiServer, ServerError> {
    let state = routes::ApiState::new(handle, link);
    let outcome_reported = state.outcome_reported.clone();
    let protection = state.protection.clone();
    let witness = state.witness.clone();
    let (identity, thread) = serve(socket, routes::router(state))?;
    Ok(ApiServer {
        path: socket.path.clone(),
        identity,
        outcome_reported,
        protection,
        witness,
        _thread: thread,
    })
}

/// Serves a standby's API (its state, failover) on `socket` while it follows its primary; drop it
/// before the VM's own API takes the path over.
pub fn spawn_standby(
    socket: &ApiSocket,
    control: replication::protection::StandbyControl,
) -> Result<ApiServer, ServerError> {
    let (identity, thread) = serve(socket, standby_routes::router(control))?;
    Ok(ApiServer {
        path: socket.path.clone(),
        identity,
        outcome_reported: Arc::default(),
        protection: Arc::default(),
        witness: Arc::default(),
        _thread: thread,
    })
}

/// Binds `socket` (0600 or 0660, never over a live socket) and serves `app` there on a thread of
/// its own.
fn serve(
    socket: &ApiSocket,
    app: axum::Router,
) -> Result<((u64, u64), JoinHandle<()>), ServerError> {
    let (std_listener, identity) = bind_private(socket)?;
    std_listener
        .set_nonblocking(true)
        .map_err(ServerError::Runtime)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(ServerError::Runtime)?;
    let thread = std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            vmm::seccomp::apply_or_exit(vmm::seccomp::ThreadKind::Api);
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
    tracing::info!(socket = %socket.path.display(), mode = format!("{:o}", socket.mode()), "API server listening");
    Ok((identity, thread))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn owner_only(path: &Path) -> ApiSocket {
        ApiSocket {
            path: path.to_path_buf(),
            group: None,
        }
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ftvmm-api-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Under a permissive umask, nothing but a private directory and the finished socket ever
    /// appears in the socket's directory: no socket anyone could connect to before its mode was
    /// set (the binding used to happen beside the final path, with the umask's mode).
    #[test]
    fn the_socket_is_never_reachable_before_its_mode_is_set() {
        let dir = scratch("bind-race");
        let path = dir.join("api.sock");
        // SAFETY: inotify_init1 and inotify_add_watch take flags and a NUL-terminated path; the
        // descriptor is owned below.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: `fd` was just returned by inotify_init1 and is owned by nothing else.
        let inotify = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let cdir = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: as above.
        let watch = unsafe { libc::inotify_add_watch(fd, cdir.as_ptr(), libc::IN_CREATE) };
        assert!(watch >= 0);
        // SAFETY: umask only sets this process's file-creation mask; restored below.
        let old = unsafe { libc::umask(0) };
        let bound = bind_private(&owner_only(&path));
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        let (_listener, _) = bound.unwrap();

        let mut events = vec![0u8; 64 << 10];
        let n = std::io::Read::read(&mut &inotify, &mut events).unwrap();
        let mut created = Vec::new();
        let mut at = 0;
        let header = std::mem::size_of::<libc::inotify_event>();
        while at + header <= n {
            // SAFETY: the kernel wrote whole inotify_event records into `events[..n]`; the header
            // is read unaligned.
            let event: libc::inotify_event =
                unsafe { std::ptr::read_unaligned(events[at..].as_ptr().cast()) };
            let name = &events[at + header..at + header + event.len as usize];
            let name = String::from_utf8_lossy(name)
                .trim_end_matches('\0')
                .to_string();
            created.push((name, event.mask & libc::IN_ISDIR != 0));
            at += header + event.len as usize;
        }
        for (name, is_dir) in &created {
            assert!(
                *is_dir || name == "api.sock",
                "{name} appeared beside the socket before it was ready: {created:?}"
            );
        }
        assert!(created.iter().any(|(n, _)| n == "api.sock"), "{created:?}");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, SOCKET_MODE);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn the_socket_is_owner_only_whatever_the_umask() {
        let dir = scratch("mode");
        let path = dir.join("vm.sock");
        // SAFETY: umask only changes this process's file creation mask; restored below.
        let old = unsafe { libc::umask(0) };
        let bound = bind_private(&owner_only(&path));
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        let (_listener, identity) = bound.unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, SOCKET_MODE);
        assert_eq!(file_identity(&path), Some(identity));
        // No temporary name is left behind.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_live_socket_is_never_replaced_and_a_stale_one_is() {
        let dir = scratch("live");
        let path = dir.join("vm.sock");
        let (live, _) = bind_private(&owner_only(&path)).unwrap();
        assert!(matches!(
            bind_private(&owner_only(&path)),
            Err(ServerError::InUse { .. })
        ));
        // The first server's socket still answers.
        assert!(std::os::unix::net::UnixStream::connect(&path).is_ok());
        drop(live);
        // Its process is gone (the listener closed): the path is stale and is taken over.
        let (_again, _) = bind_private(&owner_only(&path)).unwrap();
        assert!(std::os::unix::net::UnixStream::connect(&path).is_ok());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_file_that_is_not_a_socket_is_refused() {
        let dir = scratch("file");
        let path = dir.join("vm.sock");
        std::fs::write(&path, b"data").unwrap();
        assert!(matches!(
            bind_private(&owner_only(&path)),
            Err(ServerError::NotASocket { .. })
        ));
        assert_eq!(std::fs::read(&path).unwrap(), b"data");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_group_socket_belongs_to_that_group_and_is_0660() {
        use std::os::unix::fs::MetadataExt;
        let dir = scratch("group");
        let path = dir.join("vm.sock");
        // A group other than its own where the test may give files to any group (as root: nogroup);
        // its own group otherwise.
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        // SAFETY: getegid has no preconditions.
        let own = unsafe { libc::getegid() };
        let gid = if root { 65534 } else { own };
        let socket = ApiSocket {
            path: path.clone(),
            group: Some(gid),
        };
        let (_listener, _) = bind_private(&socket).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, GROUP_SOCKET_MODE);
        assert_eq!(meta.gid(), gid);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn groups_are_found_by_name_or_number_and_unknown_ones_named() {
        assert_eq!(group_id("root").unwrap(), 0);
        assert_eq!(group_id("1234").unwrap(), 1234);
        let err = group_id("no-such-group-ftvmm").unwrap_err().to_string();
        assert!(err.contains("\"no-such-group-ftvmm\""), "{err}");
        assert!(group_id("bad\0name").is_err());
    }
}
