//! The ftvmm process that runs one of the daemon's VMs: started in a process group of its own (so
//! the daemon's end, or a signal to it, never takes a VM with it), recognised again by a restarted
//! daemon (pid and start time), and watched until it ends.

use std::ffi::OsString;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::store::{ExitRecord, ProcessRecord};

/// How long a booting VM has to serve its API before the boot counts as failed.
const API_READY_TIMEOUT: Duration = Duration::from_secs(15);

/// Errors starting a VM's process.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot open the VM's log {path}: {source}")]
    Log {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start {exe}: {source}")]
    Spawn {
        exe: PathBuf,
        source: std::io::Error,
    },
    #[error("the VM's process ended while starting ({status}): {log}")]
    EndedAtStart { status: String, log: String },
    #[error("the VM's process was not ready within {0:?}")]
    NotReady(Duration),
}

/// The files of a VM's directory.
pub struct VmFiles {
    pub console: PathBuf,
    pub log: PathBuf,
    pub api_socket: PathBuf,
    /// What a hosted copy's process says of itself (`crate::vm_facts`).
    pub facts: PathBuf,
}

impl VmFiles {
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            console: dir.join("console.log"),
            log: dir.join("ftvmm.log"),
            api_socket: dir.join("api.sock"),
            facts: dir.join("facts.json"),
        }
    }
}

/// When a started process counts as ready.
#[derive(Clone, Copy, Debug)]
pub enum Readiness {
    /// Its API socket answers (`ftvmm run`).
    ApiSocket,
    /// Its facts file says where it listens (`ftvmm standby` and `receive`, given
    /// `--facts-file`); that address is returned.
    Listening,
}

/// Starts `exe ARGS` for a VM whose files are `files` and waits until it is `ready`; returns the
/// child and, for [`Readiness::Listening`], where it listens.
pub fn start(
    exe: &Path,
    args: &[OsString],
    files: &VmFiles,
    ready: Readiness,
) -> Result<(Child, String), ProcessError> {
    let log_error = |source| ProcessError::Log {
        path: files.log.clone(),
        source,
    };
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&files.log)
        .map_err(log_error)?;
    let log_err = log.try_clone().map_err(log_error)?;
    let _ = std::fs::remove_file(&files.api_socket);
    let _ = std::fs::remove_file(&files.facts);
    // The process keeps its own log to a cap (and points its stderr there); until it has opened
    // it, what it prints goes to the same file.
    let mut child = Command::new(exe)
        .arg("--log-file")
        .arg(&files.log)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .process_group(0)
        .spawn()
        .map_err(|source| ProcessError::Spawn {
            exe: exe.to_path_buf(),
            source,
        })?;
    let deadline = Instant::now() + API_READY_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(ProcessError::EndedAtStart {
                status: status.to_string(),
                log: log_tail(&files.log),
            });
        }
        let detail = match ready {
            Readiness::ApiSocket => std::os::unix::net::UnixStream::connect(&files.api_socket)
                .ok()
                .map(|_| String::new()),
            Readiness::Listening => crate::vm_facts::read(&files.facts)
                .and_then(|facts| facts.listening().map(str::to_string)),
        };
        if let Some(detail) = detail {
            return Ok((child, detail));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(ProcessError::NotReady(API_READY_TIMEOUT));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The last lines of a VM's log, for an error message.
pub fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

/// `pid`'s start time in clock ticks since boot (`/proc/PID/stat`, field 22), if it runs (a
/// zombie has ended).
pub fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name's closing parenthesis start at field 3, the state.
    let mut fields = stat[stat.rfind(')')? + 2..].split_whitespace();
    if fields.next()? == "Z" {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

/// The record of a process just started.
pub fn record_of(child: &Child) -> ProcessRecord {
    ProcessRecord {
        pid: child.id(),
        start_ticks: start_ticks(child.id()).unwrap_or(0),
    }
}

/// Whether the process `record` names still runs (and is not a later one with its pid).
pub fn is_running(record: &ProcessRecord) -> bool {
    start_ticks(record.pid) == Some(record.start_ticks)
}

/// A process whose end is awaited: a child of this daemon, or one it re-adopted.
pub enum Watched {
    Child(Child),
    Adopted(ProcessRecord),
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Watched {
    /// Blocks until the process ends; how it ended.
    pub fn wait(self) -> ExitRecord {
        match self {
            Watched::Child(mut child) => match child.wait() {
                Ok(status) => {
                    use std::os::unix::process::ExitStatusExt;
                    let reason = match (status.code(), status.signal()) {
                        (Some(0), _) => "the guest powered off".to_string(),
                        (Some(c), _) => format!("ftvmm exited with status {c}"),
                        (None, Some(s)) => format!("ftvmm was killed by signal {s}"),
                        (None, None) => status.to_string(),
                    };
                    ExitRecord {
                        code: status.code(),
                        reason,
                        at: now(),
                    }
                }
                Err(e) => ExitRecord {
                    code: None,
                    reason: format!("waiting for the process failed: {e}"),
                    at: now(),
                },
            },
            Watched::Adopted(record) => {
                wait_adopted(&record);
                ExitRecord {
                    code: None,
                    reason: "ended (re-adopted process: its status is its parent's)".into(),
                    at: now(),
                }
            }
        }
    }
}

/// Waits for a process that is not this daemon's child: through a pidfd where the kernel has them
/// (Linux 5.3), else by looking every 200 ms.
fn wait_adopted(record: &ProcessRecord) {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, record.pid as libc::pid_t, 0) };
    if fd >= 0 && is_running(record) {
        // SAFETY: the descriptor was just returned to us and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        use std::os::fd::AsRawFd;
        loop {
            let mut poll = libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: polls our own descriptor through a pollfd we own.
            let n = unsafe { libc::poll(&mut poll, 1, 1000) };
            if n > 0
                || (n < 0
                    && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted)
            {
                return;
            }
        }
    }
    while is_running(record) {
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Ends a VM's process: SIGTERM, then SIGKILL after `grace`.
pub fn terminate(record: &ProcessRecord, grace: Duration) {
    if !is_running(record) {
        return;
    }
    // SAFETY: sends a signal to a process we checked is the one recorded.
    unsafe { libc::kill(record.pid as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    while is_running(record) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if is_running(record) {
        // SAFETY: as above.
        unsafe { libc::kill(record.pid as libc::pid_t, libc::SIGKILL) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_is_told_from_a_later_one_with_its_pid() {
        let me = std::process::id();
        let ticks = start_ticks(me).unwrap();
        assert!(is_running(&ProcessRecord {
            pid: me,
            start_ticks: ticks
        }));
        assert!(!is_running(&ProcessRecord {
            pid: me,
            start_ticks: ticks + 1
        }));
    }

    #[test]
    fn an_adopted_process_is_seen_to_end() {
        let mut child = Command::new("sleep").arg("0.2").spawn().unwrap();
        let record = record_of(&child);
        let waiter = std::thread::spawn(move || Watched::Adopted(record).wait());
        child.wait().unwrap();
        let exit = waiter.join().unwrap();
        assert_eq!(exit.code, None);
    }
}
