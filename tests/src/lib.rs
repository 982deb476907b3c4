//! Helpers for the integration tests: find the `ftvmm` binary and the guest images, and run ftvmm
//! with a deadline so that no test can hang.

pub mod abuse;
pub mod clients;
pub mod daemon;
pub mod nested;
pub mod netns;
pub mod protected_pair;
pub mod scripted_standby;
pub mod witness;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives inside the workspace")
        .to_path_buf()
}

/// The `ftvmm` binary: `$FTVMM_BIN`, else the workspace's debug build, else its release build.
pub fn ftvmm_bin() -> PathBuf {
    if let Ok(p) = std::env::var("FTVMM_BIN") {
        return PathBuf::from(p);
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| workspace_root().join("target"));
    for profile in ["debug", "release"] {
        let p = target.join(profile).join("ftvmm");
        if p.exists() {
            return p;
        }
    }
    panic!(
        "no ftvmm binary under {}: run `cargo build` first (scripts/test does)",
        target.display()
    );
}

/// The test guest ELF built by `scripts/build-images`.
pub fn testguest() -> PathBuf {
    let p = workspace_root().join("images/out/testguest");
    assert!(
        p.exists(),
        "{} is missing: run scripts/build-images first (scripts/test does)",
        p.display()
    );
    p
}

/// The description of a 1-vCPU, 32 MiB guest without devices, as a peer's `Hello` carries it:
/// for tests that speak the link protocol to a receiver or standby themselves.
pub fn small_guest_description() -> vmm::machine::MachineDescription {
    vmm::machine::MachineDescription {
        vcpus: 1,
        memory_mib: 32,
        disks: vec![],
        nets: vec![],
        hyperv: Default::default(),
        firmware: None,
        cpu_features: vec![],
    }
}

/// Makes a fresh CA and a TLS identity for each `(name, addresses)` under `dir/pki` with
/// `ftvmm tls-certs` (replacing an earlier one); a host then runs with `--tls dir/pki/<name>`.
pub fn tls_pki(dir: &Path, nodes: &[(&str, &[&str])]) -> PathBuf {
    let pki = dir.join("pki");
    let _ = std::fs::remove_dir_all(&pki);
    let mut args = vec![
        "tls-certs".to_string(),
        "--out".into(),
        pki.display().to_string(),
    ];
    for (name, addrs) in nodes {
        args.push(format!("{name}={}", addrs.join(",")));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_ftvmm(&args, Duration::from_secs(60));
    assert_eq!(out.code(), Some(0), "ftvmm tls-certs: {out:?}");
    pki
}

/// A finished ftvmm run.
#[derive(Debug)]
pub struct RunOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl RunOutput {
    /// The exit code (`None` if killed by a signal).
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

/// Runs `ftvmm` with `args`, killing it after `deadline`. Panics on a timeout, with its output.
pub fn run_ftvmm(args: &[&str], deadline: Duration) -> RunOutput {
    let start = Instant::now();
    let mut child = Command::new(ftvmm_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ftvmm");
    let mut stdout_pipe = child.stdout.take().expect("stdout piped");
    let mut stderr_pipe = child.stderr.take().expect("stderr piped");
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout_pipe.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr_pipe.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for ftvmm") {
            break status;
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stdout = out_reader.join().unwrap_or_default();
            let stderr = err_reader.join().unwrap_or_default();
            panic!("ftvmm {args:?} did not finish within {deadline:?}\nstdout:\n{stdout}\nstderr:\n{stderr}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    RunOutput {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
        elapsed: start.elapsed(),
    }
}

/// Runs the test guest with `cmdline` and `vcpus`, serial on stdout.
pub fn run_testguest(cmdline: &str, vcpus: u8, deadline: Duration) -> RunOutput {
    let guest = testguest();
    let vcpus = vcpus.to_string();
    run_ftvmm(
        &[
            "run",
            "--kernel",
            guest.to_str().expect("utf-8 path"),
            "--cmdline",
            cmdline,
            "--vcpus",
            &vcpus,
            "--memory",
            "128",
        ],
        deadline,
    )
}

/// Order statistics of a set of timings.
#[derive(Clone, Copy, Debug)]
pub struct Stats {
    pub median: Duration,
    pub p99: Duration,
    pub min: Duration,
    pub max: Duration,
}

/// Computes [`Stats`] of a non-empty sample.
pub fn stats(samples: &[Duration]) -> Stats {
    assert!(!samples.is_empty(), "no samples");
    let mut s = samples.to_vec();
    s.sort();
    let pick = |q: f64| s[((s.len() - 1) as f64 * q).round() as usize];
    Stats {
        median: pick(0.5),
        p99: pick(0.99),
        min: s[0],
        max: s[s.len() - 1],
    }
}

/// A running ftvmm process whose serial output (stdout) is collected in the background; killed
/// when dropped.
pub struct RunningVm {
    child: std::process::Child,
    output: std::sync::Arc<std::sync::Mutex<String>>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
    /// The threads copying stdout and stderr; joined once the process has exited, so that
    /// everything it printed is collected.
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl RunningVm {
    /// Starts `cmd` (an ftvmm invocation) with piped output.
    pub fn spawn(mut cmd: Command) -> Self {
        use std::io::BufRead;
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ftvmm");
        let output = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (o, e) = (output.clone(), stderr.clone());
        let out_pipe = child.stdout.take().expect("piped");
        let err_pipe = child.stderr.take().expect("piped");
        let copy = |pipe: Box<dyn std::io::Read + Send>,
                    into: std::sync::Arc<std::sync::Mutex<String>>| {
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
                    let mut s = into.lock().unwrap();
                    s.push_str(&line);
                    s.push('\n');
                }
            })
        };
        let readers = vec![copy(Box::new(out_pipe), o), copy(Box::new(err_pipe), e)];
        Self {
            child,
            output,
            stderr,
            readers,
        }
    }

    /// Everything the guest printed so far.
    pub fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// Waits until the output contains `marker`; panics (with the output) after `timeout` or if
    /// ftvmm exits first.
    pub fn wait_for(&mut self, marker: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.output().contains(marker) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(100));
                panic!(
                    "ftvmm exited ({status}) before printing {marker:?}\nstdout:\n{}\nstderr:\n{}",
                    self.output(),
                    self.stderr.lock().unwrap()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "no {marker:?} within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                    self.output(),
                    self.stderr.lock().unwrap()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Each thread of the process: its name and the `Seccomp:` mode from its status (0 none, 2
    /// filtered).
    pub fn threads_seccomp(&self) -> Vec<(String, String)> {
        let mut threads = Vec::new();
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", self.pid())) else {
            return threads;
        };
        for task in tasks.flatten() {
            let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
                continue;
            };
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(|v| v.trim().to_string())
                    .unwrap_or_default()
            };
            threads.push((field("Name:"), field("Seccomp:")));
        }
        threads
    }

    /// Everything ftvmm printed on stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits until stderr contains `marker`; panics after `timeout`, or as soon as ftvmm exited
    /// without printing it.
    pub fn wait_for_stderr(&mut self, marker: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.stderr().contains(marker) {
            if let Ok(Some(status)) = self.child.try_wait() {
                // The reader thread may still hold the last lines.
                std::thread::sleep(Duration::from_millis(200));
                if self.stderr().contains(marker) {
                    return;
                }
                panic!(
                    "ftvmm exited ({status}) before printing {marker:?} on stderr\nstderr:\n{}",
                    self.stderr()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "no {marker:?} on stderr within {timeout:?}\nstderr:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The address ftvmm prints after `marker` once it listens ("standing by on ADDR", "waiting for
    /// a migration on ADDR"): waits for the line, then returns the word that follows the marker.
    pub fn bound_address(&mut self, marker: &str, timeout: Duration) -> String {
        self.wait_for_stderr(marker, timeout);
        self.stderr()
            .lines()
            .find_map(|l| l.split(marker).nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("no address after {marker:?} on stderr"))
            .to_string()
    }

    /// Waits for ftvmm to exit on its own within `timeout`; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait ftvmm") {
                // The pipes are closed (unless a child of ftvmm still holds them): collect the rest.
                for reader in self.readers.drain(..) {
                    let _ = reader.join();
                }
                return status.code();
            }
            if Instant::now() > deadline {
                panic!(
                    "ftvmm still running after {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                    self.output(),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills ftvmm (as a host failure would) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_pick_order_statistics() {
        let ms: Vec<Duration> = (1..=100).rev().map(Duration::from_millis).collect();
        let s = stats(&ms);
        assert_eq!(s.min, Duration::from_millis(1));
        assert_eq!(s.max, Duration::from_millis(100));
        assert_eq!(s.median, Duration::from_millis(51));
        assert_eq!(s.p99, Duration::from_millis(99));
    }
}
