//! An etcd of the test's own, as the witness of protected guests (replication/src/witness): started
//! in a network namespace on an address there, stopped and its data removed when dropped.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::netns::NetNs;

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
        let dir =
            std::env::temp_dir().join(format!("ftvmm-etcd-{}-{}", std::process::id(), ns.name()));
        let _ = std::fs::remove_dir_all(&dir);
        let url = format!("http://{ip}:2379");
        let mut cmd: Command = ns.command("etcd");
        cmd.arg("--data-dir")
            .arg(dir.join("data"))
            .args(["--name", "witness"])
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args(["--listen-peer-urls", "http://127.0.0.1:2380"])
            .args(["--initial-advertise-peer-urls", "http://127.0.0.1:2380"])
            .args(["--initial-cluster", "witness=http://127.0.0.1:2380"])
            // A one-member cluster on one machine: short raft timings, no disk syncs to wait on.
            .args(["--heartbeat-interval", "20", "--election-timeout", "200"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd
            .spawn()
            .expect("start etcd (scripts/setup installs etcd-server)");
        let etcd = Self { child, dir, url };
        let addr = format!("{ip}:2379");
        let ready = ns.run(move || {
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(30) {
                if healthy(&addr) {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            false
        });
        assert!(ready, "etcd did not start on {}", etcd.url);
        etcd
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
