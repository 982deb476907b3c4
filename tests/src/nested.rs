//! The nested test tier from Rust: runs a shell script inside an L1 Linux VM under QEMU, whose own
//! KVM runs ftvmm (`scripts/nested`, docs/nested.md). Real kernels are tested there as ftvmm's
//! guests, on hosts without hardware virtualisation too.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use crate::workspace_root;

/// One nested run at a time in this process (each takes every core); `scripts/nested` also locks
/// across processes.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// A finished nested run.
#[derive(Debug)]
pub struct NestedRun {
    /// The script's exit status (124: the time bound ran out; 1: the harness or the L1 failed).
    pub status: Option<i32>,
    /// The L1's console (the script's output among it) and the harness's own lines.
    pub console: String,
}

impl NestedRun {
    /// The line that starts with `prefix`, if any.
    pub fn line(&self, prefix: &str) -> Option<&str> {
        self.console.lines().find(|l| l.starts_with(prefix))
    }
}

/// A script to run in the L1, with the files it needs.
pub struct Nested {
    script: PathBuf,
    args: Vec<String>,
    outer_qemu: Option<PathBuf>,
}

impl Nested {
    /// The shell script at `script` (relative paths are from the workspace root).
    pub fn script(script: impl AsRef<Path>) -> Self {
        Self {
            script: workspace_root().join(script),
            args: Vec::new(),
            outer_qemu: None,
        }
    }

    /// Runs the L1 under the QEMU at `qemu` instead of Debian's (`FTVMM_NESTED_QEMU`).
    pub fn outer_qemu(mut self, qemu: impl Into<PathBuf>) -> Self {
        self.outer_qemu = Some(qemu.into());
        self
    }

    /// Copies `src` into the L1 at `/payload/DEST`.
    pub fn file(mut self, src: impl AsRef<Path>, dest: &str) -> Self {
        self.args.push("--file".into());
        self.args
            .push(format!("{}:{dest}", workspace_root().join(src).display()));
        self
    }

    /// Copies the program `src` with its shared libraries into the L1's `/payload/bin`.
    pub fn bin(mut self, src: impl AsRef<Path>) -> Self {
        self.args.push("--bin".into());
        self.args.push(src.as_ref().display().to_string());
        self
    }

    /// Exports `name=value` to the script.
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.args.push("--env".into());
        self.args.push(format!("{name}={value}"));
        self
    }

    /// Gives the L1 `mib` MiB of RAM (scripts/nested's default is 3072).
    pub fn l1_memory_mib(mut self, mib: u32) -> Self {
        self.args.push("--memory".into());
        self.args.push(mib.to_string());
        self
    }

    /// Forwards `127.0.0.1:host_port` of this host (`proto` tcp or udp) to `l1_port` of the L1,
    /// which then has a NIC on QEMU's user network.
    pub fn forward(mut self, proto: &str, host_port: u16, l1_port: u16) -> Self {
        self.args.push("--forward".into());
        self.args.push(format!("{proto}:{host_port}:{l1_port}"));
        self
    }

    /// QEMU's QMP monitor on the Unix socket `path` ([`qmp`]).
    pub fn qmp(mut self, path: &Path) -> Self {
        self.args.push("--qmp".into());
        self.args.push(path.display().to_string());
        self
    }

    /// Bounds the whole run, the L1's boot included.
    pub fn timeout(mut self, bound: Duration) -> Self {
        self.args.push("--timeout".into());
        self.args.push(bound.as_secs().max(1).to_string());
        self
    }

    /// Runs it, streaming the console to stderr (shown by `cargo test` on failure or with
    /// `--nocapture`), and returns the script's status and the console.
    pub fn run(self) -> NestedRun {
        self.spawn().finish()
    }

    /// Starts it; the test follows its console ([`RunningNested::wait_for`]) while it runs.
    pub fn spawn(self) -> RunningNested {
        let one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let mut cmd = Command::new(workspace_root().join("scripts/nested"));
        cmd.args(&self.args)
            .arg(&self.script)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if std::env::var_os("FTVMM_BIN").is_none() {
            cmd.env("FTVMM_BIN", nested_ftvmm_bin());
        }
        if let Some(qemu) = &self.outer_qemu {
            cmd.env("FTVMM_NESTED_QEMU", qemu);
        }
        let mut child = cmd.spawn().expect("run scripts/nested");
        let stderr = child.stderr.take().expect("stderr piped");
        let harness = std::thread::spawn(move || collect(stderr, &Mutex::new(String::new())));
        let console = std::sync::Arc::new(Mutex::new(String::new()));
        let stdout = child.stdout.take().expect("stdout piped");
        let seen = console.clone();
        let reader = std::thread::spawn(move || collect(stdout, &seen));
        RunningNested {
            child,
            console,
            reader: Some(reader),
            harness: Some(harness),
            _one: one,
        }
    }
}

/// A nested run in progress.
pub struct RunningNested {
    child: std::process::Child,
    console: std::sync::Arc<Mutex<String>>,
    reader: Option<std::thread::JoinHandle<String>>,
    harness: Option<std::thread::JoinHandle<String>>,
    _one: std::sync::MutexGuard<'static, ()>,
}

impl RunningNested {
    /// The console so far.
    pub fn console(&self) -> String {
        self.console
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits until a console line contains `marker`; panics with the console after `timeout`.
    pub fn wait_for(&self, marker: &str, timeout: Duration) {
        let t0 = std::time::Instant::now();
        while !self.console().contains(marker) {
            if t0.elapsed() > timeout {
                panic!(
                    "no {marker:?} on the nested console within {timeout:?}\n{}",
                    self.console()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for the run to end: the script's status and the whole console.
    pub fn finish(mut self) -> NestedRun {
        let console = self.reader.take().map(|r| r.join().unwrap_or_default());
        let harness = self.harness.take().map(|h| h.join().unwrap_or_default());
        let status = self.child.wait().expect("wait for scripts/nested").code();
        NestedRun {
            status,
            console: console.unwrap_or_default() + &harness.unwrap_or_default(),
        }
    }
}

/// Sends `command` (`stop`, `cont`, ...) to the QEMU whose QMP monitor is on `socket`; returns
/// its answer line.
pub fn qmp(socket: &Path, command: &str) -> Result<String, String> {
    use std::io::Write;
    let stream =
        std::os::unix::net::UnixStream::connect(socket).map_err(|e| format!("{socket:?}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
    let mut line = String::new();
    let mut next = |line: &mut String| -> Result<(), String> {
        line.clear();
        reader.read_line(line).map_err(|e| e.to_string())?;
        Ok(())
    };
    next(&mut line)?; // the greeting
    let mut writer = stream;
    for request in [
        r#"{"execute":"qmp_capabilities"}"#.to_string(),
        format!(r#"{{"execute":"{command}"}}"#),
    ] {
        writer
            .write_all(format!("{request}\n").as_bytes())
            .map_err(|e| e.to_string())?;
        // Events may come before the answer.
        loop {
            next(&mut line)?;
            if line.contains("\"return\"") || line.contains("\"error\"") {
                break;
            }
        }
        if line.contains("\"error\"") {
            return Err(format!("QMP {command}: {line}"));
        }
    }
    Ok(line.trim().to_string())
}

fn collect(pipe: impl std::io::Read, seen: &Mutex<String>) -> String {
    let mut all = String::new();
    for line in BufReader::new(pipe).lines() {
        let Ok(line) = line else { break };
        eprintln!("[nested] {line}");
        all.push_str(&line);
        all.push('\n');
        let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.push_str(&line);
        seen.push('\n');
    }
    all
}

/// The ftvmm that runs inside the L1: the release build (the L1 is itself emulated, so a debug
/// build's device paths would dominate), else whatever `ftvmm_bin` finds.
pub fn nested_ftvmm_bin() -> PathBuf {
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| workspace_root().join("target"));
    let release = target.join("release/ftvmm");
    if release.exists() {
        release
    } else {
        crate::ftvmm_bin()
    }
}

/// A generous bound for one nested case: the L1's boot plus a real kernel's, emulated.
pub const CASE_TIMEOUT: Duration = Duration::from_secs(900);
