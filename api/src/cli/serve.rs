//! `ftvmm serve`: the host daemon (`daemon/`).

use std::path::PathBuf;

use clap::Args;

use crate::daemon::{routes, Daemon};
use crate::server::{self, ApiSocket};

/// Run the host daemon: a REST API (OpenAPI at /openapi.json) that creates, boots, stops and
/// watches VMs, each in an ftvmm process of its own; VMs keep running if the daemon ends, and a
/// restarted daemon re-adopts them.
#[derive(Args, Debug)]
#[command(
    after_help = "Examples:\n  ftvmm serve\n  ftvmm serve --state-dir /tmp/ftvmm --socket /tmp/ftvmm.sock\n  \
ftvmm vm --daemon /tmp/ftvmm.sock create --kernel /boot/vmlinuz --memory 512 --boot"
)]
pub struct ServeArgs {
    /// Where the daemon keeps its VMs: their records, consoles, logs and API sockets.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/ftvmm")]
    state_dir: PathBuf,
    /// The API's Unix socket (owner-only, 0600).
    #[arg(long, value_name = "PATH", default_value = "/run/ftvmm/ftvmm.sock")]
    socket: PathBuf,
    /// Also let this group's members use the socket (0660).
    #[arg(long, value_name = "GROUP")]
    socket_group: Option<String>,
}

pub fn serve(args: ServeArgs) -> Result<u8, Box<dyn std::error::Error>> {
    let exe =
        std::env::current_exe().map_err(|e| format!("cannot find ftvmm's own executable: {e}"))?;
    let daemon = Daemon::open(&args.state_dir, exe)?;
    if let Some(parent) = args.socket.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    }
    let socket = ApiSocket {
        path: args.socket.clone(),
        group: args
            .socket_group
            .as_deref()
            .map(server::group_id)
            .transpose()?,
    };
    let (listener, _identity) = server::bind_private(&socket)?;
    listener.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()?;
    eprintln!(
        "ftvmm: host daemon serving {} (state in {})",
        args.socket.display(),
        args.state_dir.display()
    );
    runtime.block_on(async move {
        let listener = tokio::net::UnixListener::from_std(listener)?;
        axum::serve(listener, routes::router(daemon)).await
    })?;
    Ok(0)
}
