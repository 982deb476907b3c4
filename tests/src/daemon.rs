//! A host daemon (`ftvmm serve`) for tests: started in its own state directory (and network
//! namespace, with a TCP API for peers), spoken to over its Unix socket, killed when dropped.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::ftvmm_bin;
use crate::netns::NetNs;

/// The TCP API of a daemon that has peers: its address, TLS identity and token file.
pub struct PeerApi<'a> {
    pub listen: &'a str,
    pub tls: &'a Path,
    pub token_file: &'a Path,
    /// Cluster mode: the etcd's URL and this host's name.
    pub cluster: Option<(&'a str, &'a str)>,
}

pub struct Daemon {
    child: Child,
    pub socket: PathBuf,
    pub state: PathBuf,
}

impl Daemon {
    /// A daemon with its state and socket in `dir`, Unix socket only.
    pub fn start(dir: &Path) -> Self {
        Self::start_in(dir, None, None)
    }

    /// A daemon with its state and socket in `dir`, inside `netns` if given, serving `peers`' TCP
    /// API if given; its log is `dir/serve.log`.
    pub fn start_in(dir: &Path, netns: Option<&NetNs>, peers: Option<PeerApi>) -> Self {
        Self::start_limited(dir, netns, peers, None)
    }

    /// [`Daemon::start_in`], with at most `max_open_files` file descriptors (`RLIMIT_NOFILE`, soft
    /// and hard) if given: 1024 is systemd's default soft limit for a service.
    pub fn start_limited(
        dir: &Path,
        netns: Option<&NetNs>,
        peers: Option<PeerApi>,
        max_open_files: Option<u64>,
    ) -> Self {
        let socket = dir.join("ftvmm.sock");
        let state = dir.join("state");
        let mut command = match netns {
            Some(ns) => ns.command(ftvmm_bin().to_str().expect("UTF-8 path")),
            None => Command::new(ftvmm_bin()),
        };
        command
            .arg("serve")
            .arg("--state-dir")
            .arg(&state)
            .arg("--socket")
            .arg(&socket);
        if let Some(p) = &peers {
            command
                .args(["--listen", p.listen])
                .arg("--tls")
                .arg(p.tls)
                .arg("--token-file")
                .arg(p.token_file);
            if let Some((url, name)) = p.cluster {
                command.args(["--cluster", url, "--host-name", name]);
            }
        }
        if let Some(limit) = max_open_files {
            use std::os::unix::process::CommandExt;
            let rlimit = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            // SAFETY: setrlimit is async-signal-safe and `rlimit` is a plain value copied into the
            // closure; nothing else runs between fork and exec.
            unsafe {
                command.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &rlimit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let log = std::fs::File::create(dir.join("serve.log")).expect("daemon log");
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("daemon log"))
            .stderr(log)
            .spawn()
            .expect("start ftvmm serve");
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "the daemon did not listen: {}",
                std::fs::read_to_string(dir.join("serve.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            child,
            socket,
            state,
        }
    }

    /// One request: status and body (JSON, or text).
    pub fn request(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        request(&self.socket, method, path, body)
    }

    pub fn json(&self, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
        let (status, text) = self.request(method, path, body);
        (
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
        )
    }

    /// `ftvmm vm --daemon SOCKET ARGS`: whether it succeeded, and its stdout and stderr.
    pub fn cli(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new(ftvmm_bin())
            .arg("vm")
            .arg("--daemon")
            .arg(&self.socket)
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    }

    /// A follower of the daemon's events (`ftvmm vm events`), its output to read once killed.
    pub fn events(&self) -> Child {
        let child = Command::new(ftvmm_bin())
            .args(["vm", "--daemon"])
            .arg(&self.socket)
            .arg("events")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        child
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One request to the daemon's socket: status and body (JSON, or text).
pub fn request(socket: &Path, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = UnixStream::connect(socket).unwrap();
    write!(
            s,
            "{method} {path} HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    status_and_body(&raw).unwrap_or_else(|| panic!("no status in {raw:?}"))
}

/// An HTTP response's status and body.
fn status_and_body(raw: &str) -> Option<(u16, String)> {
    let status = raw.split_whitespace().nth(1)?.parse().ok()?;
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b.to_string());
    Some((status, body.unwrap_or_default()))
}

/// One request to a daemon's TCP API at `addr` as the holder of the TLS identity in `identity` and
/// of `token`: status and body.
pub fn tcp_request(
    addr: &str,
    identity: &Path,
    token: &str,
    method: &str,
    path: &str,
) -> Result<(u16, String), String> {
    let identity =
        replication::link::TlsIdentity::load(identity).map_err(|e| format!("identity: {e}"))?;
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h).to_string();
    let name = rustls::pki_types::ServerName::try_from(host).map_err(|e| e.to_string())?;
    let tls = rustls::ClientConnection::new(identity.client_config(), name)
        .map_err(|e| format!("TLS: {e}"))?;
    let socket = std::net::TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .and_then(|()| socket.set_write_timeout(Some(Duration::from_secs(10))))
        .map_err(|e| e.to_string())?;
    let mut stream = rustls::StreamOwned::new(tls, socket);
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )
    .map_err(|e| format!("send: {e}"))?;
    let mut raw = Vec::new();
    if let Err(e) = stream.read_to_end(&mut raw) {
        if e.kind() != std::io::ErrorKind::UnexpectedEof || raw.is_empty() {
            return Err(format!("receive: {e}"));
        }
    }
    let raw = String::from_utf8_lossy(&raw);
    status_and_body(&raw).ok_or_else(|| format!("no status in {raw:?}"))
}

/// Ends an event follower and returns what it printed.
pub fn events_seen(mut follower: Child) -> String {
    let _ = follower.kill();
    let mut seen = String::new();
    if let Some(mut out) = follower.stdout.take() {
        let _ = out.read_to_string(&mut seen);
    }
    let _ = follower.wait();
    seen
}
