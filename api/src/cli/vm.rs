//! `ftvmm vm`: control a running VM through its API socket.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::json;

use crate::client;

const TIMEOUT: Duration = Duration::from_secs(600);

/// Control a running VM (started with --api-socket).
#[derive(Args, Debug)]
#[command(
    after_help = "Prints the API's JSON answer. Exit status 0 on success, 1 with the API's error otherwise.\n\n\
Examples:\n  ftvmm vm --api-socket /run/vm1.sock info\n  ftvmm vm --api-socket /run/vm1.sock snapshot --dir /var/lib/ftvmm/snap1"
)]
pub struct VmArgs {
    /// The VM's API socket.
    #[arg(long, value_name = "PATH")]
    api_socket: PathBuf,

    #[command(subcommand)]
    action: VmAction,
}

#[derive(Subcommand, Debug)]
enum VmAction {
    /// Show the VM's state, vCPUs, memory and devices.
    Info,
    /// Pause every vCPU.
    Pause,
    /// Resume a paused VM.
    Resume,
    /// Write a full snapshot (vCPUs, devices, memory) to a directory; restore it with `ftvmm restore`.
    Snapshot {
        /// Directory to write to (created if missing).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
    },
}

pub fn vm(args: VmArgs) -> Result<u8, Box<dyn std::error::Error>> {
    let (method, path, body) = match &args.action {
        VmAction::Info => ("GET", "/api/v1/vm", None),
        VmAction::Pause => ("PUT", "/api/v1/vm/pause", None),
        VmAction::Resume => ("PUT", "/api/v1/vm/resume", None),
        VmAction::Snapshot { dir } => {
            let dir = std::path::absolute(dir)
                .map_err(|e| format!("invalid --dir {}: {e}", dir.display()))?;
            ("PUT", "/api/v1/vm/snapshot", Some(json!({ "dir": dir })))
        }
    };
    let resp = client::request(&args.api_socket, method, path, body.as_ref(), TIMEOUT)?;
    if (200..300).contains(&resp.status) {
        use std::io::Write;
        // A closed stdout (e.g. piped into `head`) is not an error of the command.
        let _ = writeln!(
            std::io::stdout().lock(),
            "{}",
            serde_json::to_string_pretty(&resp.body)?
        );
        Ok(0)
    } else {
        let msg = resp.body["error"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| resp.body.to_string());
        Err(format!("{msg} (HTTP {})", resp.status).into())
    }
}
