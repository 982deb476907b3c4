//! `ftvmm vm`: control a running VM through its API socket.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::json;

use super::output::{self, OutputFormat};
use crate::client;

const TIMEOUT: Duration = Duration::from_secs(600);

/// Control a running VM (started with --api-socket).
#[derive(Args, Debug)]
#[command(
    after_help = "Prints the API's JSON answer. Exit status 0 on success, 1 with the API's error otherwise.\n\n\
Examples:\n  ftvmm vm --api-socket /run/vm1.sock info\n  ftvmm vm --api-socket /run/vm1.sock snapshot --dir /var/lib/ftvmm/snap1"
)]
pub struct VmArgs {
    /// The VM's own API socket (a VM started with `ftvmm run --api-socket`).
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,

    /// The host daemon's socket (`ftvmm serve`), for the VMs it runs: create, boot, list, stop,
    /// delete, and info, pause and resume of the VM named by its id or name.
    #[arg(long, value_name = "PATH", default_value = "/run/ftvmm/ftvmm.sock")]
    daemon: PathBuf,

    /// How answers are printed: `human` (tables, `key: value` lines), `json` (the API's JSON), or
    /// `auto`: human on a terminal, JSON when piped.
    #[arg(long, value_enum, default_value_t = OutputFormat::Auto)]
    output: OutputFormat,

    /// Print the API's JSON (as `--output json`).
    #[arg(long, conflicts_with = "output")]
    json: bool,

    #[command(subcommand)]
    action: VmAction,
}

#[derive(Subcommand, Debug)]
enum VmAction {
    /// Through the daemon: record a new VM (boot it with `boot`, or at once with --boot).
    Create(CreateArgs),
    /// Through the daemon: start a VM's process.
    Boot { vm: String },
    /// Through the daemon: end a VM's process (SIGTERM, then SIGKILL; the guest is not asked).
    Stop { vm: String },
    /// Through the daemon: remove a VM that does not run.
    Delete { vm: String },
    /// Through the daemon: every VM on the host.
    List,
    /// Through the daemon: follow its events (server-sent events, one JSON line each).
    Events,
    /// Show the VM's state, vCPUs, memory and devices (through the daemon: name the VM).
    Info { vm: Option<String> },
    /// Show where every vCPU is (registers, MP state, instruction at RIP).
    Vcpus,
    /// Pause every vCPU (through the daemon: name the VM).
    Pause { vm: Option<String> },
    /// Resume a paused VM (through the daemon: name the VM).
    Resume { vm: Option<String> },
    /// Write a full snapshot (vCPUs, devices, memory): with --api-socket to a directory (restore
    /// it with `ftvmm restore`), through the daemon under a name (restore it with `vm restore`).
    Snapshot {
        /// Through the daemon: the VM's id or name.
        vm: Option<String>,
        /// Directory to write to (created if missing; with --api-socket).
        #[arg(long, value_name = "DIR", conflicts_with = "name")]
        dir: Option<PathBuf>,
        /// The snapshot's name (through the daemon).
        #[arg(long)]
        name: Option<String>,
        /// Write only the pages changed since this VM's previous snapshot (full or diff), which the
        /// new one names as its base; restoring it needs the base directories too.
        #[arg(long)]
        diff: bool,
    },
    /// Live-migrate the VM: to a host where `ftvmm receive --listen HOST:PORT` waits (--to), or
    /// through the daemon to a peer daemon, which starts the destination (name the VM, --peer).
    /// Shows progress until it completes (exit 0) or fails or is cancelled (exit 1; the guest keeps
    /// running here).
    Migrate {
        /// Through the daemon: the VM's id or name.
        vm: Option<String>,
        /// The destination's HOST:PORT (with --api-socket).
        #[arg(long, value_name = "HOST:PORT", conflicts_with = "peer")]
        to: Option<String>,
        /// The peer daemon's HOST:PORT (its `ftvmm serve --listen`).
        #[arg(long, value_name = "HOST:PORT")]
        peer: Option<String>,
        /// Stop-and-copy once the estimated downtime is below this many milliseconds.
        #[arg(long, value_name = "N", default_value_t = 50)]
        downtime_ms: u64,
    },
    /// Show the current (or last) migration's progress.
    Migration { vm: Option<String> },
    /// Show protection by a hot standby (state, committed epoch, pause and commit figures); through
    /// the daemon, for a standby: its state.
    Protection { vm: Option<String> },
    /// Stop protection: the standby ends without resuming the guest, which goes on here unprotected.
    Unprotect { vm: Option<String> },
    /// On a standby (`ftvmm standby --api-socket`): its primary, the checkpoint it would resume from,
    /// and whether the primary answers heartbeats.
    Standby,
    /// On a standby (its own socket, or through the daemon naming it): take over now, from the last
    /// committed checkpoint. Only for a primary known to be dead (without a witness, a silent
    /// primary is never taken over on its own); with a witness, it must agree.
    Failover {
        vm: Option<String>,
        /// Take over although the primary's death is not certain (it answers its heartbeat, or is
        /// merely silent: it may be cut off and running on, and would then run as a second copy).
        /// Only when you know it is dead.
        #[arg(long)]
        force: bool,
    },
    /// Through the daemon, in cluster mode: remove the guest's claim at the cluster's witness, left
    /// by a copy that ended without giving it back (its process killed, its host lost); until then
    /// the guest cannot boot or be protected. Refused while any copy of it runs in the cluster.
    ReleaseClaim { vm: String },
    /// Protect the running guest with a hot standby (again): a guest never protected, one that lost
    /// its standby, or a standby that took over. With --api-socket, to an `ftvmm standby` at
    /// --standby; through the daemon, to a standby that the peer daemon at --peer starts.
    Protect {
        /// Through the daemon: the VM's id or name.
        vm: Option<String>,
        /// The standby's HOST:PORT (where `ftvmm standby` listens; with --api-socket).
        #[arg(long, value_name = "HOST:PORT", conflicts_with = "peer")]
        standby: Option<String>,
        /// The peer daemon's HOST:PORT (its `ftvmm serve --listen`).
        #[arg(long, value_name = "HOST:PORT")]
        peer: Option<String>,
        /// Time between checkpoints, in milliseconds; or `auto` or `auto:MIN-MAX`, as for
        /// `ftvmm run --epoch-ms`.
        #[arg(long, value_name = "MS|auto[:MIN-MAX]", default_value = "50")]
        epoch_ms: replication::protection::EpochLength,
    },
    /// Cancel a migration before its hand-over; the guest keeps running here.
    CancelMigration { vm: Option<String> },
    /// Through the daemon: a VM's snapshots.
    Snapshots { vm: String },
    /// Through a daemon in cluster mode: where the VM runs, where its standby is, and every
    /// host's copy of it.
    Where { vm: String },
    /// Through a daemon in cluster mode: the live hosts and their daemons' addresses.
    Hosts,
    /// Through the daemon: run a VM that does not run from one of its snapshots.
    Restore {
        vm: String,
        /// The snapshot's name.
        #[arg(long)]
        snapshot: String,
    },
}

/// A VM for the daemon to create (`POST /api/v1/vms`).
#[derive(Args, Debug)]
struct CreateArgs {
    /// A name for the VM (unique on the host).
    #[arg(long)]
    name: Option<String>,
    /// Guest kernel on the daemon's host (absolute path). Needed unless --firmware is given.
    #[arg(long, value_name = "PATH", required_unless_present = "firmware")]
    kernel: Option<PathBuf>,
    /// UEFI firmware on the daemon's host to boot through (e.g. /usr/share/ovmf/OVMF.fd).
    #[arg(long, value_name = "PATH")]
    firmware: Option<PathBuf>,
    /// Initramfs for the kernel.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long)]
    cmdline: Option<String>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MiB", default_value_t = 256)]
    memory: u64,
    /// A virtio-blk disk: path=IMG[,readonly]. Repeatable.
    #[arg(long = "disk", value_name = "path=IMG[,readonly]")]
    disks: Vec<String>,
    /// A virtio-net interface: tap=NAME[,mac=MAC]. Repeatable.
    #[arg(long = "net", value_name = "tap=NAME[,mac=MAC]")]
    nics: Vec<String>,
    /// Hyper-V enlightenments, as `ftvmm run --hyperv`.
    #[arg(long, value_name = "on|only|off", default_value = "off")]
    hyperv: vmm::arch::hyperv::HypervMode,
    /// Boot the VM once it is created.
    #[arg(long)]
    boot: bool,
}

impl CreateArgs {
    fn body(&self) -> Result<serde_json::Value, String> {
        let absolute = |p: &PathBuf| {
            std::path::absolute(p).map_err(|e| format!("invalid path {}: {e}", p.display()))
        };
        let mut disks = Vec::new();
        for spec in &self.disks {
            let mut path = None;
            let mut readonly = false;
            for part in spec.split(',') {
                match part.split_once('=') {
                    Some(("path", p)) => path = Some(absolute(&PathBuf::from(p))?),
                    None if part == "readonly" => readonly = true,
                    _ => return Err(format!("--disk {spec:?}: expected path=IMG[,readonly]")),
                }
            }
            let path = path.ok_or_else(|| format!("--disk {spec:?}: no path="))?;
            disks.push(json!({ "path": path, "readonly": readonly }));
        }
        let mut nics = Vec::new();
        for spec in &self.nics {
            let mut tap = None;
            let mut mac = None;
            for part in spec.split(',') {
                match part.split_once('=') {
                    Some(("tap", t)) => tap = Some(t.to_string()),
                    Some(("mac", m)) => mac = Some(m.to_string()),
                    _ => return Err(format!("--net {spec:?}: expected tap=NAME[,mac=MAC]")),
                }
            }
            let tap = tap.ok_or_else(|| format!("--net {spec:?}: no tap="))?;
            nics.push(json!({ "tap": tap, "mac": mac }));
        }
        Ok(json!({
            "name": self.name,
            "kernel": self.kernel.as_ref().map(absolute).transpose()?,
            "firmware": self.firmware.as_ref().map(absolute).transpose()?,
            "initrd": self.initrd.as_ref().map(absolute).transpose()?,
            "cmdline": self.cmdline,
            "vcpus": self.vcpus,
            "memory_mib": self.memory,
            "disks": disks,
            "nics": nics,
            "hyperv": self.hyperv,
        }))
    }
}

pub fn vm(mut args: VmArgs) -> Result<u8, Box<dyn std::error::Error>> {
    if args.json {
        args.output = OutputFormat::Json;
    }
    let Some(api_socket) = args.api_socket.clone() else {
        return through_daemon(&args.daemon, &args.action, args.output);
    };
    let api_socket = &api_socket;
    if let VmAction::Migrate {
        vm: None,
        to: Some(to),
        peer: None,
        downtime_ms,
    } = &args.action
    {
        let body = json!({ "to": to, "downtime_ms": downtime_ms });
        return migrate(
            api_socket,
            "/api/v1/vm/migrate",
            &body,
            "/api/v1/vm/migration",
            args.output,
        );
    }
    let (method, path, body) = match &args.action {
        VmAction::Info { vm: None } => ("GET", "/api/v1/vm", None),
        VmAction::Vcpus => ("GET", "/api/v1/vm/vcpus", None),
        VmAction::Pause { vm: None } => ("PUT", "/api/v1/vm/pause", None),
        VmAction::Resume { vm: None } => ("PUT", "/api/v1/vm/resume", None),
        VmAction::Snapshot {
            vm: None,
            dir: Some(dir),
            name: None,
            diff,
        } => {
            let dir = std::path::absolute(dir)
                .map_err(|e| format!("invalid --dir {}: {e}", dir.display()))?;
            (
                "PUT",
                "/api/v1/vm/snapshot",
                Some(json!({ "dir": dir, "diff": diff })),
            )
        }
        VmAction::Migration { vm: None } => ("GET", "/api/v1/vm/migration", None),
        VmAction::Protection { vm: None } => ("GET", "/api/v1/vm/protection", None),
        VmAction::Unprotect { vm: None } => ("PUT", "/api/v1/vm/unprotect", None),
        VmAction::Standby => ("GET", "/api/v1/standby", None),
        VmAction::Failover { vm: None, force } => (
            "PUT",
            if *force {
                "/api/v1/standby/failover?force=true"
            } else {
                "/api/v1/standby/failover"
            },
            None,
        ),
        VmAction::Protect {
            vm: None,
            standby: Some(standby),
            peer: None,
            epoch_ms,
        } => (
            "PUT",
            "/api/v1/vm/protect",
            Some(json!({ "standby": standby, "epoch": epoch_ms.to_string() })),
        ),
        VmAction::CancelMigration { vm: None } => ("PUT", "/api/v1/vm/migration/cancel", None),
        VmAction::Protect { .. } => {
            return Err("with --api-socket, give the standby's address: --standby HOST:PORT".into())
        }
        VmAction::Snapshot { .. } => {
            return Err("with --api-socket, give the directory to write to: --dir DIR".into())
        }
        VmAction::Migrate { .. } => {
            return Err("with --api-socket, give the destination's address: --to HOST:PORT".into())
        }
        _ => {
            return Err(
                "this action is the host daemon's: leave out --api-socket (and name the \
                        VM)"
                .into(),
            )
        }
    };
    let resp = client::request(api_socket, method, path, body.as_ref(), TIMEOUT)?;
    print_answer(&resp, args.output)
}

/// Prints a 2xx answer (exit 0), or fails with the API's error.
fn print_answer(
    resp: &client::ApiResponse,
    format: OutputFormat,
) -> Result<u8, Box<dyn std::error::Error>> {
    if (200..300).contains(&resp.status) {
        output::print(&resp.body, format);
        Ok(0)
    } else {
        Err(api_error(resp).into())
    }
}

/// An action for the host daemon on `socket`.
fn through_daemon(
    socket: &std::path::Path,
    action: &VmAction,
    format: OutputFormat,
) -> Result<u8, Box<dyn std::error::Error>> {
    let vm_path = |vm: &str, what: &str| format!("/api/v1/vms/{vm}{what}");
    let (method, path, body) = match action {
        VmAction::Create(create) => {
            let body = create.body()?;
            let resp = client::request(socket, "POST", "/api/v1/vms", Some(&body), TIMEOUT)?;
            if resp.status != 201 || !create.boot {
                return print_answer(&resp, format);
            }
            let id = resp.body["id"].as_str().unwrap_or_default().to_string();
            ("PUT", vm_path(&id, "/boot"), None)
        }
        VmAction::Boot { vm } => ("PUT", vm_path(vm, "/boot"), None),
        VmAction::Stop { vm } => ("PUT", vm_path(vm, "/stop"), None),
        VmAction::Delete { vm } => ("DELETE", vm_path(vm, ""), None),
        VmAction::List => ("GET", "/api/v1/vms".to_string(), None),
        VmAction::Info { vm: Some(vm) } => ("GET", vm_path(vm, ""), None),
        VmAction::Pause { vm: Some(vm) } => ("PUT", vm_path(vm, "/pause"), None),
        VmAction::Resume { vm: Some(vm) } => ("PUT", vm_path(vm, "/resume"), None),
        VmAction::Events => return follow_events(socket, format),
        VmAction::Protect {
            vm: Some(vm),
            peer: Some(peer),
            standby: None,
            epoch_ms,
        } => (
            "PUT",
            vm_path(vm, "/protect"),
            Some(json!({ "peer": peer, "epoch": epoch_ms.to_string() })),
        ),
        VmAction::Unprotect { vm: Some(vm) } => ("PUT", vm_path(vm, "/unprotect"), None),
        VmAction::Snapshot {
            vm: Some(vm),
            name: Some(name),
            dir: None,
            diff,
        } => (
            "PUT",
            vm_path(vm, "/snapshot"),
            Some(json!({ "name": name, "diff": diff })),
        ),
        VmAction::Snapshots { vm } => ("GET", vm_path(vm, "/snapshots"), None),
        VmAction::Where { vm } => ("GET", format!("/api/v1/cluster/vms/{vm}"), None),
        VmAction::Hosts => ("GET", "/api/v1/cluster/hosts".to_string(), None),
        VmAction::Restore { vm, snapshot } => (
            "PUT",
            vm_path(vm, "/restore"),
            Some(json!({ "snapshot": snapshot })),
        ),
        VmAction::Protection { vm: Some(vm) } => ("GET", vm_path(vm, "/protection"), None),
        VmAction::ReleaseClaim { vm } => ("DELETE", vm_path(vm, "/claim"), None),
        VmAction::Failover {
            vm: Some(vm),
            force,
        } => (
            "PUT",
            vm_path(
                vm,
                if *force {
                    "/failover?force=true"
                } else {
                    "/failover"
                },
            ),
            None,
        ),
        VmAction::Migration { vm: Some(vm) } => ("GET", vm_path(vm, "/migration"), None),
        VmAction::CancelMigration { vm: Some(vm) } => {
            ("PUT", vm_path(vm, "/migration/cancel"), None)
        }
        VmAction::Migrate {
            vm: Some(vm),
            peer: Some(peer),
            to: None,
            downtime_ms,
        } => {
            let body = json!({ "peer": peer, "downtime_ms": downtime_ms });
            return migrate(
                socket,
                &vm_path(vm, "/migrate"),
                &body,
                &vm_path(vm, "/migration"),
                format,
            );
        }
        VmAction::Snapshot { .. } => {
            return Err("through the daemon, name the VM and the snapshot: VM --name NAME".into())
        }
        VmAction::Protect { .. } | VmAction::Migrate { .. } => {
            return Err(
                "through the daemon, name the VM and the peer daemon: VM --peer HOST:PORT".into(),
            )
        }
        _ => {
            return Err(
                "name the VM (through the daemon), or give the VM's own --api-socket".into(),
            )
        }
    };
    let resp = client::request(socket, method, &path, body.as_ref(), TIMEOUT)?;
    if resp.status == 204 {
        return Ok(0);
    }
    print_answer(&resp, format)
}

/// Prints the daemon's events, one JSON object per line, until the daemon ends the stream.
fn follow_events(
    socket: &std::path::Path,
    format: OutputFormat,
) -> Result<u8, Box<dyn std::error::Error>> {
    use std::io::{BufRead, Write};
    let stream = client::stream(socket, "/api/v1/events")?;
    for line in stream.lines() {
        let line = line?;
        if let Some(data) = line.strip_prefix("data: ") {
            let text = match serde_json::from_str::<serde_json::Value>(data) {
                Ok(event) if format.is_human() => output::event_line(&event),
                _ => data.to_string(),
            };
            let mut out = std::io::stdout().lock();
            if writeln!(out, "{text}").and_then(|()| out.flush()).is_err() {
                break;
            }
        }
    }
    Ok(0)
}

/// An API's error answer for people: its message and status.
fn api_error(resp: &client::ApiResponse) -> String {
    format!(
        "{} (HTTP {})",
        client::error_message(&resp.body),
        resp.status
    )
}

/// Starts a migration (`PUT start` with `body`) and follows it (`GET status`) to the end: a
/// progress bar on a terminal, else a line per change on stderr.
fn migrate(
    socket: &std::path::Path,
    start: &str,
    body: &serde_json::Value,
    status: &str,
    format: OutputFormat,
) -> Result<u8, Box<dyn std::error::Error>> {
    use std::io::{IsTerminal, Write};
    let resp = client::request(socket, "PUT", start, Some(body), TIMEOUT)?;
    if resp.status != 202 {
        return Err(api_error(&resp).into());
    }
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {elapsed} migration {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        bar.enable_steady_tick(Duration::from_millis(100));
        bar
    });
    let mut last = String::new();
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let resp = client::request(socket, "GET", status, None, TIMEOUT)?;
        if resp.status != 200 {
            return Err(api_error(&resp).into());
        }
        let s = &resp.body;
        let state = s["state"].as_str().unwrap_or("unknown").to_string();
        let line = format!(
            "{state} round={} sent={:.1} MiB dirty={} pages rate={:.0} pages/s est_downtime={:.1} ms",
            s["round"],
            s["bytes_sent"].as_f64().unwrap_or(0.0) / (1 << 20) as f64,
            s["dirty_pages"],
            s["dirty_rate_pages_per_s"].as_f64().unwrap_or(0.0),
            s["estimated_downtime_ms"].as_f64().unwrap_or(0.0),
        );
        if line != last {
            match &bar {
                Some(bar) => bar.set_message(line.clone()),
                None => {
                    let _ = writeln!(std::io::stderr(), "migration: {line}");
                }
            }
            last = line;
        }
        let finished = matches!(state.as_str(), "completed" | "failed" | "cancelled");
        if finished {
            if let Some(bar) = &bar {
                bar.finish();
            }
        }
        match state.as_str() {
            "completed" => {
                output::print(s, format);
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
