//! An etcd of the test's own, as the witness of protected guests (replication/src/witness): started
//! in a network namespace on an address there, stopped and its data removed when dropped.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::netns::NetNs;

/// Waits up to 30 s for the etcd at `addr` to say it is healthy.
fn wait_healthy(addr: &str) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(30) {
        if healthy(addr) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Whether the etcd at `addr` says it is healthy (it has a leader and serves).
fn healthy(addr: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(addr) = addr.parse() else { return false };
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    if s.write_all(b"GET /health HTTP/1.0\r\n\r\n").is_err() {
        return false;
    }
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    reply.contains("\"health\":\"true\"")
}

/// A running etcd (Debian's `etcd-server`, installed by scripts/setup).
pub struct TestEtcd {
    child: Child,
    dir: std::path::PathBuf,
    url: String,
}

impl TestEtcd {
    /// Starts etcd in `ns`, serving clients on `ip`:2379; waits until it answers.
    pub fn start(ns: &NetNs, ip: &str) -> Self {
        let addr = format!("{ip}:2379");
        let etcd = Self::spawn(ns.command("etcd"), ns.name(), &addr, 2380);
        let ready = ns.run(move || wait_healthy(&addr));
        assert!(ready, "etcd did not start on {}", etcd.url);
        etcd
    }

    /// Starts etcd on free loopback ports of this namespace (benchmarks).
    pub fn start_local() -> Self {
        let free = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port()
        };
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let tag = format!(
            "local{}",
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let addr = format!("127.0.0.1:{}", free());
        let etcd = Self::spawn(Command::new("etcd"), &tag, &addr, free());
        assert!(wait_healthy(&addr), "etcd did not start on {}", etcd.url);
        etcd
    }

    fn spawn(mut cmd: Command, tag: &str, client_addr: &str, peer_port: u16) -> Self {
        let dir = std::env::temp_dir().join(format!("ftvmm-etcd-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let url = format!("http://{client_addr}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        cmd.arg("--data-dir")
            .arg(dir.join("data"))
            .args(["--name", "witness"])
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("witness={peer}")])
            // A one-member cluster on one machine: short raft timings.
            .args(["--heartbeat-interval", "20", "--election-timeout", "200"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd
            .spawn()
            .expect("start etcd (scripts/setup installs etcd-server)");
        Self { child, dir, url }
    }

    /// The client URL (`--witness`).
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for TestEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
