//! Running `ftvmm-impair link` as a child process inside a network namespace, for tests: start it
//! with `ip netns exec`, wait for its `ready` line (its rules are in place), stop it with SIGTERM
//! and read its counters.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{rule_tag, Counters, Error, LinkImpairment};

/// How long a child may take to install its rules.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a child may take to remove its rules and exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// The `ftvmm-impair` binary: `$FTVMM_IMPAIR_BIN`, else the workspace's debug build, else its
/// release build.
pub fn impair_bin() -> Result<PathBuf, Error> {
    if let Ok(p) = std::env::var("FTVMM_IMPAIR_BIN") {
        return Ok(PathBuf::from(p));
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("impair/ lives inside the workspace")
        .to_path_buf();
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| workspace.join("target"));
    let searched: Vec<PathBuf> = ["debug", "release"]
        .iter()
        .map(|profile| target.join(profile).join("ftvmm-impair"))
        .collect();
    searched
        .iter()
        .find(|p| p.exists())
        .cloned()
        .ok_or(Error::BinaryNotFound { searched })
}

/// A running `ftvmm-impair link` in a namespace. Dropping it stops it (SIGTERM, so that it removes
/// its rules; SIGKILL if it does not exit in time).
pub struct RunningImpairment {
    child: Option<Child>,
    netns: String,
    pid: u32,
    queues: Vec<u16>,
    stderr: Arc<Mutex<String>>,
    stdout: Option<JoinHandle<String>>,
}

/// Starts `ip netns exec NETNS ftvmm-impair link ...` with the binary [`impair_bin`] finds and
/// waits until its rules are installed.
pub fn spawn_in_netns(netns: &str, spec: &LinkImpairment) -> Result<RunningImpairment, Error> {
    spawn_in_netns_using(&impair_bin()?, netns, spec)
}

/// As [`spawn_in_netns`], with the given `ftvmm-impair` binary (an integration test passes
/// `env!("CARGO_BIN_EXE_ftvmm-impair")`).
pub fn spawn_in_netns_using(
    binary: &Path,
    netns: &str,
    spec: &LinkImpairment,
) -> Result<RunningImpairment, Error> {
    spec.validate()?;
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns])
        .arg(binary)
        .arg("link")
        .args(spec.to_args())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| Error::Spawn {
            netns: netns.to_string(),
            source,
        })?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let stdout = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = BufReader::new(stdout).read_to_string(&mut text);
        text
    });
    let stderr_text = Arc::new(Mutex::new(String::new()));
    let (ready_tx, ready_rx) = mpsc::channel();
    let stderr = child.stderr.take().expect("stderr is piped");
    let collected = Arc::clone(&stderr_text);
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if line.starts_with("ready ") {
                let _ = ready_tx.send(line);
                continue;
            }
            eprintln!("ftvmm-impair: {line}");
            let mut text = collected.lock().unwrap_or_else(|e| e.into_inner());
            text.push_str(&line);
            text.push('\n');
        }
    });
    let mut running = RunningImpairment {
        child: Some(child),
        netns: netns.to_string(),
        pid: 0,
        queues: Vec::new(),
        stderr: stderr_text,
        stdout: Some(stdout),
    };
    let not_ready = |running: &mut RunningImpairment, reason: String| {
        running.kill_now();
        Error::NotReady {
            netns: running.netns.clone(),
            reason,
            stderr: running.stderr_text(),
        }
    };
    let line = match ready_rx.recv_timeout(READY_TIMEOUT) {
        Ok(line) => line,
        Err(mpsc::RecvTimeoutError::Timeout) => {
            return Err(not_ready(
                &mut running,
                format!("no ready line in {READY_TIMEOUT:?}"),
            ));
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            // The stderr reader saw the end: the child exited; give its last words time to land.
            let status = running.child.as_mut().and_then(|c| c.wait().ok());
            return Err(not_ready(&mut running, format!("it exited ({status:?})")));
        }
    };
    let ready = parse_ready(&line);
    match ready {
        Some((pid, queues)) => {
            running.pid = pid;
            running.queues = queues;
            Ok(running)
        }
        None => Err(not_ready(
            &mut running,
            format!("unreadable ready line {line:?}"),
        )),
    }
}

/// Reads `ready pid=P queues=Q1[,Q2] rules=N` into (P, [Q1, Q2]).
fn parse_ready(line: &str) -> Option<(u32, Vec<u16>)> {
    let mut pid = None;
    let mut queues = None;
    for word in line.split_whitespace().skip(1) {
        if let Some(v) = word.strip_prefix("pid=") {
            pid = v.parse().ok();
        } else if let Some(v) = word.strip_prefix("queues=") {
            queues = v.split(',').map(|q| q.parse().ok()).collect();
        }
    }
    Some((pid?, queues?))
}

impl RunningImpairment {
    /// The impairing process's pid (its rules carry it).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The comment on its iptables rules.
    pub fn rule_tag(&self) -> String {
        rule_tag(self.pid)
    }

    /// The NFQUEUE numbers it serves (sent packets' first).
    pub fn queues(&self) -> &[u16] {
        &self.queues
    }

    /// What it printed on stderr so far (the `ready` line aside).
    pub fn stderr_text(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Stops it with SIGTERM (it removes its rules and releases every held packet) and returns
    /// its counters.
    pub fn stop(mut self) -> Result<Counters, Error> {
        let mut child = self
            .child
            .take()
            .expect("a running impairment has its child");
        signal(&child, libc::SIGTERM);
        let status = wait_until(&mut child, Instant::now() + STOP_TIMEOUT).map_err(Error::Wait)?;
        let Some(status) = status else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::Hung {
                netns: self.netns.clone(),
                waited: STOP_TIMEOUT,
                stderr: self.stderr_text(),
            });
        };
        let stdout = self
            .stdout
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        if !status.success() {
            return Err(Error::Failed {
                status,
                stderr: self.stderr_text(),
            });
        }
        stdout
            .lines()
            .rev()
            .find_map(|line| serde_json::from_str::<Counters>(line).ok())
            .ok_or(Error::NoCounters { stdout })
    }

    fn kill_now(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RunningImpairment {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(&child, libc::SIGTERM);
            if !matches!(
                wait_until(&mut child, Instant::now() + STOP_TIMEOUT),
                Ok(Some(_))
            ) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// Sends `sig` to the child (`ip netns exec` execs the program, so the child is ftvmm-impair).
fn signal(child: &Child, sig: libc::c_int) {
    // SAFETY: kill only sends a signal to our own child's pid; a child that already exited (and
    // is not yet reaped) keeps its pid, so no other process can be hit.
    unsafe { libc::kill(child.id() as libc::pid_t, sig) };
}

/// Waits for the child to exit until `deadline`; `None` if it is still running then.
fn wait_until(
    child: &mut Child,
    deadline: Instant,
) -> std::io::Result<Option<std::process::ExitStatus>> {
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_line_is_parsed() {
        assert_eq!(
            parse_ready("ready pid=77 queues=4100,4101 rules=4"),
            Some((77, vec![4100, 4101]))
        );
        assert_eq!(
            parse_ready("ready pid=77 queues=4100 rules=2"),
            Some((77, vec![4100]))
        );
        assert_eq!(parse_ready("ready queues=4100"), None);
        assert_eq!(parse_ready("ready pid=1 queues=x"), None);
    }

    #[test]
    fn binary_from_the_environment_wins() {
        // Only this test touches the variable in this process.
        std::env::set_var("FTVMM_IMPAIR_BIN", "/nonexistent/ftvmm-impair");
        let found = impair_bin();
        std::env::remove_var("FTVMM_IMPAIR_BIN");
        assert_eq!(found.unwrap(), PathBuf::from("/nonexistent/ftvmm-impair"));
    }
}
