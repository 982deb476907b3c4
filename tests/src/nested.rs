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

    /// Bounds the whole run, the L1's boot included.
    pub fn timeout(mut self, bound: Duration) -> Self {
        self.args.push("--timeout".into());
        self.args.push(bound.as_secs().max(1).to_string());
        self
    }

    /// Runs it, streaming the console to stderr (shown by `cargo test` on failure or with
    /// `--nocapture`), and returns the script's status and the console.
    pub fn run(self) -> NestedRun {
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
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
        let harness = std::thread::spawn(move || collect(stderr));
        let console = collect(child.stdout.take().expect("stdout piped"));
        let harness = harness.join().unwrap_or_default();
        let status = child.wait().expect("wait for scripts/nested").code();
        NestedRun {
            status,
            console: console + &harness,
        }
    }
}

fn collect(pipe: impl std::io::Read) -> String {
    let mut all = String::new();
    for line in BufReader::new(pipe).lines() {
        let Ok(line) = line else { break };
        eprintln!("[nested] {line}");
        all.push_str(&line);
        all.push('\n');
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
