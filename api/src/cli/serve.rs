//! `ftvmm serve`: the host daemon (`daemon/`).

use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;

use crate::daemon::peer_client::PeerClient;
use crate::daemon::tcp_api::{require_token, BearerToken};
use crate::daemon::tcp_server;
use crate::daemon::{routes, ClusterMembership, Daemon, Peering};
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
    /// Also let this group's members use the socket (0660). Membership is as good as root on this
    /// host: the API starts VMs from any kernel, disk or firmware path the daemon can read.
    #[arg(long, value_name = "GROUP")]
    socket_group: Option<String>,
    /// Also serve the API on TCP at HOST:PORT, for peer daemons (protection, migration) and remote
    /// operators: mutual TLS (--tls) and the bearer token (--token-file) on every request. HOST is
    /// this host's address as peers dial it (it must be in the --tls certificate); this host's
    /// standbys and migration destinations listen there too.
    #[arg(long, value_name = "HOST:PORT", requires_all = ["tls", "token_file"])]
    listen: Option<String>,
    /// This host's TLS identity (`ftvmm tls-certs`): the TCP API's, and every VM process's links.
    #[arg(long, value_name = "DIR")]
    tls: Option<PathBuf>,
    /// A file holding the cluster's bearer token (at least 32 characters; the same on every host).
    #[arg(long, value_name = "FILE", requires = "listen")]
    token_file: Option<PathBuf>,
    /// Cluster mode: the etcd (http://HOST:PORT, several members separated by commas; e.g. the
    /// witness's) where hosts register and
    /// every VM's placement is recorded, so that any daemon can say where a VM runs and who its
    /// standby is, and peers can be named by host name. Needs --listen.
    #[arg(long, value_name = "URL", requires = "listen")]
    cluster: Option<String>,
    /// This host's UEFI firmware image (e.g. /usr/share/ovmf/OVMF.fd) for the firmware-booted
    /// copies it hosts for peers (standbys, incoming migrations): a peer never names a file of
    /// this host; without it such copies are refused.
    #[arg(long, value_name = "PATH", requires = "listen")]
    pub peer_firmware: Option<PathBuf>,
    /// This host's name in the cluster (default: the system's host name).
    #[arg(long, value_name = "NAME", requires = "cluster")]
    host_name: Option<String>,
}

/// The system's host name.
fn system_host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// What serving the API on TCP takes: the peering, the TLS server side and the token.
struct TcpApi {
    peering: Peering,
    tls: Arc<rustls::ServerConfig>,
    token: BearerToken,
}

/// The daemon's TCP API and its peering, when `--listen` is given.
fn tcp_api(args: &ServeArgs) -> Result<Option<TcpApi>, Box<dyn std::error::Error>> {
    let (Some(listen), Some(tls), Some(token_file)) = (&args.listen, &args.tls, &args.token_file)
    else {
        return Ok(None);
    };
    let identity = replication::link::TlsIdentity::load(tls)?;
    let token = BearerToken::read(token_file)?;
    let link_host = replication::link::host_of(listen).to_string();
    match link_host.parse::<std::net::IpAddr>() {
        Ok(ip) if ip.is_unspecified() => {
            return Err(format!(
                "--listen {listen}: give this host's address as peers dial it, not {ip}"
            )
            .into())
        }
        _ => {}
    }
    let peering = Peering {
        client: PeerClient::new(identity.client_config(), token.clone()),
        address: listen.clone(),
        link_host,
        tls_dir: tls.clone(),
        firmware: args.peer_firmware.clone(),
    };
    Ok(Some(TcpApi {
        peering,
        tls: identity.server_config(),
        token,
    }))
}

pub fn serve(args: ServeArgs) -> Result<u8, Box<dyn std::error::Error>> {
    let exe =
        std::env::current_exe().map_err(|e| format!("cannot find ftvmm's own executable: {e}"))?;
    let (peering, tcp) = match tcp_api(&args)? {
        Some(api) => (Some(api.peering), Some((api.tls, api.token))),
        None => (None, None),
    };
    let cluster = args.cluster.as_ref().map(|url| ClusterMembership {
        etcd_url: url.clone(),
        host_name: args.host_name.clone().unwrap_or_else(system_host_name),
    });
    let daemon = Daemon::open(&args.state_dir, exe, peering, cluster)?;
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
    let listen = args.listen.clone();
    runtime.block_on(async move {
        let listener = tokio::net::UnixListener::from_std(listener)?;
        let local = axum::serve(listener, routes::router(daemon.clone()));
        let Some((tls, token)) = tcp else {
            return local.await;
        };
        let listen = listen.unwrap_or_default();
        let tcp = tokio::net::TcpListener::bind(&listen).await.map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot listen on {listen}: {e}"))
        })?;
        eprintln!("ftvmm: host daemon serving {listen} (mutual TLS and bearer token)");
        let router = routes::router(daemon)
            .layer(axum::middleware::from_fn_with_state(token, require_token));
        let remote = tcp_server::serve(tcp, tls, router, tcp_server::Limits::default());
        tokio::select! {
            r = local => r,
            r = remote => r,
        }
    })?;
    Ok(0)
}
