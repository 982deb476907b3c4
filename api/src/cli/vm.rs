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
    /// Show where every vCPU is (registers, MP state, instruction at RIP).
    Vcpus,
    /// Pause every vCPU.
    Pause,
    /// Resume a paused VM.
    Resume,
    /// Write a full snapshot (vCPUs, devices, memory) to a directory; restore it with `ftvmm restore`.
    Snapshot {
        /// Directory to write to (created if missing).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Write only the pages changed since this VM's previous snapshot (full or diff), which the
        /// new one names as its base; restoring it needs the base directories too.
        #[arg(long)]
        diff: bool,
    },
    /// Live-migrate the VM to a host where `ftvmm receive --listen HOST:PORT` waits; prints progress
    /// until it completes (exit 0) or fails or is cancelled (exit 1; the guest keeps running here).
    Migrate {
        /// The destination's HOST:PORT.
        #[arg(long, value_name = "HOST:PORT")]
        to: String,
        /// Stop-and-copy once the estimated downtime is below this many milliseconds.
        #[arg(long, value_name = "N", default_value_t = 50)]
        downtime_ms: u64,
    },
    /// Show the current (or last) migration's progress.
    Migration,
    /// Show protection by a hot standby (state, committed epoch, pause and commit figures).
    Protection,
    /// Stop protection: the standby ends without resuming the guest, which goes on here unprotected.
    Unprotect,
    /// On a standby (`ftvmm standby --api-socket`): its primary, the checkpoint it would resume from,
    /// and whether the primary answers heartbeats.
    Standby,
    /// On a standby: take over now, from the last committed checkpoint. Only for a primary known to
    /// be dead (without a witness, a silent primary is never taken over on its own); with a witness,
    /// it must agree.
    Failover,
    /// Protect the running guest with a hot standby (again): a guest never protected, one that lost
    /// its standby, or a standby that took over. Uses this VM's --tls and --witness.
    Protect {
        /// The standby's HOST:PORT (where `ftvmm standby` listens).
        #[arg(long, value_name = "HOST:PORT")]
        standby: String,
        /// Time between checkpoints, in milliseconds; or `auto` or `auto:MIN-MAX`, as for
        /// `ftvmm run --epoch-ms`.
        #[arg(long, value_name = "MS|auto[:MIN-MAX]", default_value = "50")]
        epoch_ms: replication::protection::EpochLength,
    },
    /// Cancel a migration before its hand-over; the guest keeps running here.
    CancelMigration,
}

pub fn vm(args: VmArgs) -> Result<u8, Box<dyn std::error::Error>> {
    if let VmAction::Migrate { to, downtime_ms } = &args.action {
        return migrate(&args.api_socket, to, *downtime_ms);
    }
    let (method, path, body) = match &args.action {
        VmAction::Info => ("GET", "/api/v1/vm", None),
        VmAction::Vcpus => ("GET", "/api/v1/vm/vcpus", None),
        VmAction::Pause => ("PUT", "/api/v1/vm/pause", None),
        VmAction::Resume => ("PUT", "/api/v1/vm/resume", None),
        VmAction::Snapshot { dir, diff } => {
            let dir = std::path::absolute(dir)
                .map_err(|e| format!("invalid --dir {}: {e}", dir.display()))?;
            (
                "PUT",
                "/api/v1/vm/snapshot",
                Some(json!({ "dir": dir, "diff": diff })),
            )
        }
        VmAction::Migration => ("GET", "/api/v1/vm/migration", None),
        VmAction::Protection => ("GET", "/api/v1/vm/protection", None),
        VmAction::Unprotect => ("PUT", "/api/v1/vm/unprotect", None),
        VmAction::Standby => ("GET", "/api/v1/standby", None),
        VmAction::Failover => ("PUT", "/api/v1/standby/failover", None),
        VmAction::Protect { standby, epoch_ms } => (
            "PUT",
            "/api/v1/vm/protect",
            Some(json!({ "standby": standby, "epoch": epoch_ms.to_string() })),
        ),
        VmAction::CancelMigration => ("PUT", "/api/v1/vm/migration/cancel", None),
        VmAction::Migrate { .. } => unreachable!("handled above"),
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

fn api_error(resp: &client::ApiResponse) -> String {
    let msg = resp.body["error"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| resp.body.to_string());
    format!("{msg} (HTTP {})", resp.status)
}

/// Starts a migration and follows it to the end, printing a progress line per change.
fn migrate(
    socket: &std::path::Path,
    to: &str,
    downtime_ms: u64,
) -> Result<u8, Box<dyn std::error::Error>> {
    use std::io::Write;
    let body = json!({ "to": to, "downtime_ms": downtime_ms });
    let resp = client::request(socket, "PUT", "/api/v1/vm/migrate", Some(&body), TIMEOUT)?;
    if resp.status != 202 {
        return Err(api_error(&resp).into());
    }
    let mut last = String::new();
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let resp = client::request(socket, "GET", "/api/v1/vm/migration", None, TIMEOUT)?;
        if resp.status != 200 {
            return Err(api_error(&resp).into());
        }
        let s = &resp.body;
        let state = s["state"].as_str().unwrap_or("unknown").to_string();
        let line = format!(
            "migration: {state} round={} sent={:.1} MiB dirty={} pages rate={:.0} pages/s est_downtime={:.1} ms",
            s["round"],
            s["bytes_sent"].as_f64().unwrap_or(0.0) / (1 << 20) as f64,
            s["dirty_pages"],
            s["dirty_rate_pages_per_s"].as_f64().unwrap_or(0.0),
            s["estimated_downtime_ms"].as_f64().unwrap_or(0.0),
        );
        if line != last {
            let _ = writeln!(std::io::stderr(), "{line}");
            last = line;
        }
        match state.as_str() {
            "completed" => {
                let _ = writeln!(
                    std::io::stdout().lock(),
                    "{}",
                    serde_json::to_string_pretty(s)?
                );
                return Ok(0);
            }
            "failed" | "cancelled" => {
                let why = s["error"].as_str().unwrap_or(&state).to_string();
                return Err(
                    format!("migration {state}: {why}; the guest keeps running here").into(),
                );
            }
            _ => {}
        }
    }
}
