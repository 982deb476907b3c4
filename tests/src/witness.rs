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
    members: Vec<Member>,
    url: String,
}

/// One etcd process.
struct Member {
    child: Child,
    dir: std::path::PathBuf,
}

impl TestEtcd {
    /// Starts etcd in `ns`, serving clients on `ip`:2379; waits until it answers.
    pub fn start(ns: &NetNs, ip: &str) -> Self {
        Self::start_members(ns, ip, 1)
    }

    /// Starts an etcd cluster of `count` members in `ns`, serving clients on `ip`:2379, :2389, ...
    /// (peers on loopback :2380, :2390, ...); waits until every member answers. Its URL lists them
    /// all, comma-separated, as `--witness` takes them.
    pub fn start_members(ns: &NetNs, ip: &str, count: u16) -> Self {
        let port = |i: u16, base: u16| base + 10 * i;
        let cluster = (0..count)
            .map(|i| format!("witness{i}=http://127.0.0.1:{}", port(i, 2380)))
            .collect::<Vec<_>>()
            .join(",");
        let members = (0..count)
            .map(|i| {
                let addr = format!("{ip}:{}", port(i, 2379));
                Member::spawn(
                    ns.command("etcd"),
                    &format!("{}-{i}", ns.name()),
                    &format!("witness{i}"),
                    &addr,
                    port(i, 2380),
                    &cluster,
                )
            })
            .collect();
        let urls: Vec<String> = (0..count)
            .map(|i| format!("http://{ip}:{}", port(i, 2379)))
            .collect();
        let etcd = Self {
            members,
            url: urls.join(","),
        };
        for url in urls {
            let addr = url.trim_start_matches("http://").to_string();
            let ready = ns.run(move || wait_healthy(&addr));
            assert!(ready, "etcd did not start on {url}");
        }
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
        let peer_port = free();
        let cluster = format!("witness=http://127.0.0.1:{peer_port}");
        let member = Member::spawn(
            Command::new("etcd"),
            &tag,
            "witness",
            &addr,
            peer_port,
            &cluster,
        );
        let etcd = Self {
            members: vec![member],
            url: format!("http://{addr}"),
        };
        assert!(wait_healthy(&addr), "etcd did not start on {}", etcd.url);
        etcd
    }

    /// The client URL(s) (`--witness`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Kills member `index` for good (the others go on as a cluster with a majority).
    pub fn kill_member(&mut self, index: usize) {
        let member = &mut self.members[index];
        let _ = member.child.kill();
        let _ = member.child.wait();
    }
}

impl Member {
    fn spawn(
        mut cmd: Command,
        tag: &str,
        name: &str,
        client_addr: &str,
        peer_port: u16,
        cluster: &str,
    ) -> Self {
        let dir = std::env::temp_dir().join(format!("ftvmm-etcd-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let url = format!("http://{client_addr}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        cmd.arg("--data-dir")
            .arg(dir.join("data"))
            .args(["--name", name])
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", cluster])
            // On one machine: short raft timings.
            .args(["--heartbeat-interval", "20", "--election-timeout", "200"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd
            .spawn()
            .expect("start etcd (scripts/setup installs etcd-server)");
        Self { child, dir }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
