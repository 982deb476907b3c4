//! The host daemon's REST API as a peer daemon reaches it (past TLS and the token, which a peer
//! holds): any method on any route, ids and names of the fuzzer's choosing, any body. Each input gets
//! a fresh daemon in a fresh state directory (its VM processes are `/bin/false`, so starts fail at
//! once; its peers are unreachable). Nothing may panic, and nothing may appear outside the state
//! directory: a sentinel directory beside it must stay empty.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use axum::body::Body;
use axum::http::Request;
use ftvmm_api::daemon::peer_client::PeerClient;
use ftvmm_api::daemon::tcp_api::BearerToken;
use ftvmm_api::daemon::{routes, Daemon, Peering};
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;

/// The routes, with `{}` where the fuzzer's id or name goes (the event stream, which never ends,
/// is left out).
const ROUTES: &[&str] = &[
    "/api/v1/vms",
    "/api/v1/vms/{}",
    "/api/v1/vms/{}/boot",
    "/api/v1/vms/{}/stop",
    "/api/v1/vms/{}/pause",
    "/api/v1/vms/{}/resume",
    "/api/v1/vms/{}/protect",
    "/api/v1/vms/{}/unprotect",
    "/api/v1/vms/{}/protection",
    "/api/v1/vms/{}/failover",
    "/api/v1/vms/{}/claim",
    "/api/v1/vms/{}/migrate",
    "/api/v1/vms/{}/migration",
    "/api/v1/vms/{}/migration/cancel",
    "/api/v1/peer/standbys",
    "/api/v1/peer/incoming",
    "/api/v1/peer/vms/{}",
    "/api/v1/vms/{}/snapshot",
    "/api/v1/vms/{}/snapshots",
    "/api/v1/vms/{}/snapshots/{}",
    "/api/v1/vms/{}/restore",
    "/api/v1/cluster/hosts",
    "/api/v1/cluster/vms",
    "/api/v1/cluster/vms/{}",
    "/metrics",
    "/openapi.json",
    "/{}",
];
const METHODS: &[&str] = &["GET", "POST", "PUT", "DELETE", "PATCH"];

/// What every input shares: a scratch root, a TLS identity and a token for the peer client.
struct Setup {
    root: PathBuf,
    pki: PathBuf,
    token: BearerToken,
    runtime: tokio::runtime::Runtime,
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let root = std::env::temp_dir().join(format!("ftvmm-fuzz-peer-api-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).expect("scratch root");
        let pki = root.join("pki");
        replication::link::certs::generate(&pki, &[("host".into(), vec!["127.0.0.1".into()])])
            .expect("TLS identity");
        let token_file = root.join("token");
        std::fs::write(&token_file, "f".repeat(32)).expect("token");
        std::fs::set_permissions(
            &token_file,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .expect("token mode");
        let token = BearerToken::read(&token_file).expect("token");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        Setup {
            root,
            pki,
            token,
            runtime,
        }
    })
}

fn daemon(setup: &Setup, state: &Path) -> std::sync::Arc<Daemon> {
    let identity = replication::link::TlsIdentity::load(&setup.pki.join("host")).expect("identity");
    let peering = Peering {
        client: PeerClient::new(identity.client_config(), setup.token.clone()),
        address: "127.0.0.1:1".into(),
        link_host: "127.0.0.1".into(),
        tls_dir: setup.pki.join("host"),
        firmware: None,
    };
    Daemon::open(state, PathBuf::from("/bin/false"), Some(peering), None).expect("daemon")
}

/// Splits `data` at the first 0 byte (or its end): one request's text, and the rest.
fn field(data: &[u8]) -> (&[u8], &[u8]) {
    match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[]),
    }
}

fuzz_target!(|data: &[u8]| {
    let setup = setup();
    let case = setup.root.join("case");
    let _ = std::fs::remove_dir_all(&case);
    let state = case.join("state");
    let sentinel = case.join("sentinel");
    std::fs::create_dir_all(&sentinel).expect("sentinel");
    let daemon = daemon(setup, &state);
    let mut rest = data;
    // Up to four requests against the same daemon: a create and then what follows it.
    for _ in 0..4 {
        let Some((&select, after)) = rest.split_first() else {
            break;
        };
        let (id, after) = field(after);
        let (body, after) = field(after);
        rest = after;
        let method = METHODS[usize::from(select) % METHODS.len()];
        let route = ROUTES[usize::from(select / 8) % ROUTES.len()];
        let id: String = String::from_utf8_lossy(id)
            .chars()
            .map(|c| {
                if c.is_ascii_graphic() && c != '?' && c != '#' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let uri = route.replace("{}", &id);
        let Ok(request) = Request::builder()
            .method(method)
            .uri(&uri)
            .header("content-type", "application/json")
            .body(Body::from(body.to_vec()))
        else {
            continue;
        };
        let router = routes::router(daemon.clone());
        let _ = setup.runtime.block_on(router.oneshot(request));
    }
    let planted: Vec<_> = std::fs::read_dir(&sentinel).expect("sentinel").collect();
    assert!(
        planted.is_empty(),
        "a request wrote beside the state directory: {planted:?}"
    );
    drop(daemon);
    let _ = std::fs::remove_dir_all(&case);
});
