//! Two host daemons in two network namespaces (`netns::TwoHosts`), each with its TCP API (mutual
//! TLS and the bearer token): a test guest created and booted on one is protected to the other
//! through the API; its VM process is killed and the guest goes on on the second, whose status and
//! events say so; it is protected back through the CLI. Migration through the daemons: progress
//! seen mid-way, a cancelled migration leaves the source running, a completed one moves the guest.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use integration_tests::daemon::{events_seen, Daemon, PeerApi};
use integration_tests::netns::TwoHosts;
use integration_tests::witness::TestEtcd;
use integration_tests::{testguest, tls_pki};
use serde_json::{json, Value};

const DEADLINE: Duration = Duration::from_secs(120);

/// Two daemons, one per host, and the guest's client on the LAN.
/// Starts host `host`'s daemon (state in `dir/host`, identity `dir/pki/host`) inside `ns`.
fn start_daemon(
    dir: &std::path::Path,
    host: &str,
    ns: &integration_tests::netns::NetNs,
    listen: &str,
    etcd_url: Option<&str>,
) -> Daemon {
    let home = dir.join(host);
    std::fs::create_dir_all(&home).unwrap();
    Daemon::start_in(
        &home,
        Some(ns),
        Some(PeerApi {
            listen,
            tls: &dir.join("pki").join(host),
            token_file: &dir.join("token"),
            cluster: etcd_url.map(|url| (url, host)),
        }),
    )
}

struct TwoDaemons {
    hosts: TwoHosts,
    _etcd: Option<TestEtcd>,
    dir: std::path::PathBuf,
    a: Daemon,
    b: Daemon,
    a_api: String,
    b_api: String,
    etcd_url: Option<String>,
}

impl TwoDaemons {
    /// With `cluster`, an etcd on the LAN and the daemons in cluster mode as hosts `a` and `b`.
    fn start(name: &str, cluster: bool) -> Self {
        let hosts = TwoHosts::new().expect("two-host topology");
        let etcd = cluster.then(|| TestEtcd::start(&hosts.lan, &hosts.lan_ip()));
        let etcd_url = etcd.as_ref().map(|e| e.url().to_string());
        let dir = std::env::temp_dir().join(format!("ftvmm-peers-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (a_ip, b_ip) = (hosts.a_ip(), hosts.b_ip());
        // `start_daemon` finds the identities in dir/pki and the token in dir/token.
        tls_pki(&dir, &[("a", &[a_ip.as_str()]), ("b", &[b_ip.as_str()])]);
        std::fs::write(dir.join("token"), "0123456789abcdef0123456789abcdef\n").unwrap();
        std::fs::set_permissions(
            dir.join("token"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        let (a_api, b_api) = (format!("{a_ip}:7200"), format!("{b_ip}:7200"));
        let a = start_daemon(&dir, "a", &hosts.a, &a_api, etcd_url.as_deref());
        let b = start_daemon(&dir, "b", &hosts.b, &b_api, etcd_url.as_deref());
        Self {
            hosts,
            _etcd: etcd,
            dir,
            a,
            b,
            a_api,
            b_api,
            etcd_url,
        }
    }

    /// Kills host B's daemon (its VM processes run on) and starts a new one on the same store.
    fn restart_b(&mut self) {
        self.b.kill();
        self.b = start_daemon(
            &self.dir,
            "b",
            &self.hosts.b,
            &self.b_api,
            self.etcd_url.as_deref(),
        );
    }

    /// Creates and boots on host A the test guest's key-value service on the LAN, `dirty` pages
    /// written per millisecond; returns its id once its network is up.
    fn boot_guest(&self, name: &str, cmdline_extra: &str) -> String {
        let config = json!({
            "name": name,
            "kernel": testguest(),
            "cmdline": format!("mode=net ip={}/24 {cmdline_extra}", self.hosts.guest_ip()),
            "memory_mib": 128,
            "nics": [{ "tap": "tap0" }],
        });
        let (status, record) = self.a.json("POST", "/api/v1/vms", &config.to_string());
        assert_eq!(status, 201, "{record}");
        let id = record["id"].as_str().unwrap().to_string();
        let (status, record) = self.a.json("PUT", &format!("/api/v1/vms/{id}/boot"), "");
        assert_eq!(status, 200, "{record}");
        let console = self.a.state.join("vms").join(&id).join("console.log");
        wait_until("the guest's network", || {
            std::fs::read_to_string(&console).is_ok_and(|c| c.contains("testguest: net up"))
        });
        id
    }

    /// A client on the LAN incrementing the guest's counter without pause; every reply must be
    /// exactly one more than the last acknowledged.
    fn client(&self) -> Client {
        let stop = Arc::new(AtomicBool::new(false));
        let acknowledged = Arc::new(AtomicU64::new(0));
        let thread = integration_tests::clients::incrementer(
            self.hosts.lan.name(),
            format!("{}:4000", self.hosts.guest_ip()),
            stop.clone(),
            acknowledged.clone(),
            Duration::from_secs(60),
        );
        Client {
            stop,
            acknowledged,
            thread: Some(thread),
        }
    }

    fn logs(&self) -> String {
        let mut text = String::new();
        for host in ["a", "b"] {
            text += &format!(
                "\n--- daemon {host}: {}",
                std::fs::read_to_string(self.dir.join(host).join("serve.log")).unwrap_or_default()
            );
            for entry in std::fs::read_dir(self.dir.join(host).join("state/vms"))
                .into_iter()
                .flatten()
                .flatten()
            {
                text += &format!(
                    "\n--- {host} {}: {}",
                    entry.file_name().to_string_lossy(),
                    std::fs::read_to_string(entry.path().join("ftvmm.log")).unwrap_or_default()
                );
            }
        }
        text
    }
}

impl Drop for TwoDaemons {
    fn drop(&mut self) {
        // VM processes run in groups of their own: stop every one the daemons still run.
        for daemon in [&self.a, &self.b] {
            let (_, list) = daemon.json("GET", "/api/v1/vms", "");
            for vm in list.as_array().into_iter().flatten() {
                if vm["lifecycle"] == "running" {
                    let id = vm["id"].as_str().unwrap_or_default();
                    daemon.request("PUT", &format!("/api/v1/vms/{id}/stop"), "");
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Client {
    stop: Arc<AtomicBool>,
    acknowledged: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<Result<u64, String>>>,
}

impl Client {
    fn acknowledged(&self) -> u64 {
        self.acknowledged.load(Ordering::SeqCst)
    }

    /// Waits for `more` increments beyond the current count.
    fn wait_more(&mut self, more: u64, what: &str) {
        let target = self.acknowledged() + more;
        let t0 = Instant::now();
        while self.acknowledged() < target {
            if self.thread.as_ref().is_some_and(|t| t.is_finished()) {
                let result = self.thread.take().map(|t| t.join());
                panic!("{what}: the client stopped: {result:?}");
            }
            assert!(
                t0.elapsed() < DEADLINE,
                "{what}: the client is stuck at {}",
                self.acknowledged()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the client; its last value (every reply checked).
    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .take()
            .unwrap()
            .join()
            .unwrap()
            .expect("every acknowledged increment survived")
    }
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn record(daemon: &Daemon, id: &str) -> Value {
    daemon.json("GET", &format!("/api/v1/vms/{id}"), "").1
}

#[test]
fn a_guest_protected_through_two_daemons_survives_its_host_and_is_protected_back() {
    let mut pair = TwoDaemons::start("protect", true);
    let id = pair.boot_guest("web", "dirty=200 dirty_mb=8");
    let first_events_b = pair.b.events();

    // Protect through A's API, naming host B as the cluster knows it: B's daemon starts the standby.
    let (status, hosts) = pair.a.json("GET", "/api/v1/cluster/hosts", "");
    assert_eq!(status, 200, "{hosts}");
    assert_eq!(hosts.as_array().map(Vec::len), Some(2), "{hosts}");
    let body = json!({ "peer": "b", "epoch_ms": 50 }).to_string();
    let (status, answer) = pair
        .a
        .json("PUT", &format!("/api/v1/vms/{id}/protect"), &body);
    assert_eq!(status, 202, "{answer}{}", pair.logs());
    wait_until("protection", || {
        pair.a.json("GET", "/api/v1/vms/web/protection", "").1["state"] == "protected"
    });
    let standby = record(&pair.b, &id);
    assert_eq!(standby["role"], "standby", "{standby}");
    assert_eq!(standby["peer"]["relation"], "standby_of", "{standby}");
    assert_eq!(standby["peer"]["daemon"], pair.a_api.as_str(), "{standby}");
    let (status, state) = pair
        .b
        .json("GET", &format!("/api/v1/vms/{id}/protection"), "");
    assert_eq!(status, 200, "{state}");
    assert_eq!(record(&pair.a, &id)["peer"]["relation"], "protected_by");
    // Either daemon says where the VM runs and where its standby is.
    wait_until("the cluster to know the pair", || {
        let p = pair.b.json("GET", "/api/v1/cluster/vms/web", "").1;
        p["runs_on"] == "a" && p["standby_on"] == "b"
    });

    // A second protection of a protected VM is refused, and B keeps one standby.
    let (status, err) = pair
        .a
        .json("PUT", &format!("/api/v1/vms/{id}/protect"), &body);
    assert_eq!(status, 409, "{err}");

    let mut client = pair.client();
    client.wait_more(20, "before the primary's end");

    // B's daemon restarts while its standby follows: the new one re-adopts the standby and still
    // sees it take over.
    let seen = events_seen(first_events_b);
    assert!(
        seen.contains("\"kind\":\"standby_ready\""),
        "events: {seen}"
    );
    pair.restart_b();
    let standby = record(&pair.b, &id);
    assert_eq!(
        (standby["role"].as_str(), standby["lifecycle"].as_str()),
        (Some("standby"), Some("running")),
        "{standby}"
    );
    let events_b = pair.b.events();

    // Host A loses the VM's process.
    let pid = record(&pair.a, &id)["process"]["pid"].as_u64().unwrap();
    // SAFETY: kill sends a signal to the primary's process, whose pid the daemon reported.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    wait_until("B's standby to take over", || {
        let r = record(&pair.b, &id);
        r["role"] == "primary" && r["vm"]["state"] == "running"
    });
    client.wait_more(20, "after the failover");
    wait_until("A to record its VM's end", || {
        record(&pair.a, &id)["lifecycle"] == "exited"
    });
    wait_until("the cluster to know the failover", || {
        let p = pair
            .a
            .json("GET", &format!("/api/v1/cluster/vms/{id}"), "")
            .1;
        p["runs_on"] == "b" && p["standby_on"].is_null()
    });
    let (_, metrics) = pair.b.request("GET", "/metrics", "");
    for line in [
        format!("ftvmm_vm_failovers_total{{vm=\"{id}\",name=\"web\"}} 1"),
        format!(
            "ftvmm_vm_info{{vm=\"{id}\",name=\"web\",role=\"primary\",lifecycle=\"running\"}} 1"
        ),
    ] {
        assert!(metrics.contains(&line), "{line} not in {metrics}");
    }
    let (ok, out) = pair.a.cli(&["--output", "human", "where", "web"]);
    assert!(ok && out.contains("runs_on: b"), "{out}");
    let (ok, out) = pair.b.cli(&["--output", "json", "hosts"]);
    assert!(ok && out.contains(&pair.a_api), "{out}");
    let seen = events_seen(events_b);
    assert!(seen.contains("\"kind\":\"failed_over\""), "events: {seen}");

    // Protected back through the CLI: A's daemon hosts the standby now, in A's old record.
    let (ok, out) = pair.b.cli(&["protect", "web", "--peer", &pair.a_api]);
    assert!(ok, "{out}{}", pair.logs());
    wait_until("protection back to A", || {
        pair.b.json("GET", "/api/v1/vms/web/protection", "").1["state"] == "protected"
    });
    let standby = record(&pair.a, &id);
    assert_eq!(standby["role"], "standby", "{standby}");
    assert_eq!(standby["lifecycle"], "running", "{standby}");
    let (ok, out) = pair.b.cli(&["protection", "web"]);
    assert!(ok && out.contains("\"protected\""), "{out}");
    client.wait_more(20, "protected back");

    // Unprotected through the CLI: A's standby ends, and the record it took the place of (the
    // killed primary's) comes back, which will not boot while the guest may run on B.
    let (ok, out) = pair.b.cli(&["unprotect", "web"]);
    assert!(ok, "{out}");
    wait_until("A's standby to end", || {
        let r = record(&pair.a, &id);
        r["role"] == "primary" && r["lifecycle"] == "exited"
    });
    let (status, err) = pair.a.json("PUT", &format!("/api/v1/vms/{id}/boot"), "");
    assert_eq!(status, 409, "{err}");
    assert!(
        err["error"].as_str().unwrap().contains("may run on"),
        "{err}"
    );
    client.wait_more(20, "unprotected");
    let last = client.finish();
    assert!(last > 80, "{last} increments");
}

#[test]
fn a_migration_through_two_daemons_reports_progress_and_can_be_cancelled() {
    let pair = TwoDaemons::start("migrate", false);

    // A standby that no primary has joined yet: its operations are refused, and a drop removes it.
    let ask = json!({ "id": "lonely", "config": { "kernel": testguest() }, "from": pair.a_api });
    let (status, answer) = pair
        .b
        .json("POST", "/api/v1/peer/standbys", &ask.to_string());
    assert_eq!(status, 201, "{answer}");
    assert!(
        answer["link"]
            .as_str()
            .unwrap()
            .starts_with(&pair.hosts.b_ip()),
        "{answer}"
    );
    for (method, path) in [
        ("PUT", "/api/v1/vms/lonely/pause"),
        ("PUT", "/api/v1/vms/lonely/failover"),
        ("GET", "/api/v1/vms/lonely/protection"),
        ("PUT", "/api/v1/vms/lonely/protect"),
    ] {
        let (status, err) = pair.b.json(method, path, r#"{"peer":"x:1"}"#);
        assert_eq!(status, 409, "{method} {path}: {err}");
    }
    let (status, err) = pair
        .b
        .json("POST", "/api/v1/peer/standbys", &ask.to_string());
    assert_eq!(status, 409, "a second copy of one VM: {err}");
    let (status, err) = pair.b.json("DELETE", "/api/v1/peer/vms/lonely", "");
    assert_eq!(status, 204, "{err}");
    wait_until("the dropped standby's removal", || {
        pair.b.json("GET", "/api/v1/vms/lonely", "").0 == 404
    });

    // A fast-dirtying guest stays in pre-copy with a 1 ms downtime target.
    let id = pair.boot_guest("mover", "dirty=20000 dirty_mb=64");
    let events_a = pair.a.events();
    let body = json!({ "peer": pair.b_api, "downtime_ms": 1 }).to_string();
    let (status, answer) = pair
        .a
        .json("PUT", &format!("/api/v1/vms/{id}/migrate"), &body);
    assert_eq!(status, 202, "{answer}{}", pair.logs());
    let incoming = record(&pair.b, &id);
    assert_eq!(incoming["role"], "incoming", "{incoming}");
    wait_until("a pre-copy round with bytes sent", || {
        let s = pair.a.json("GET", "/api/v1/vms/mover/migration", "").1;
        s["state"] == "pre_copy" && s["bytes_sent"].as_u64().unwrap_or(0) > 0
    });
    let (ok, out) = pair.a.cli(&["cancel-migration", "mover"]);
    assert!(ok, "{out}");
    wait_until("the cancellation", || {
        pair.a.json("GET", "/api/v1/vms/mover/migration", "").1["state"] == "cancelled"
    });
    wait_until("B to drop the destination", || {
        pair.b.json("GET", &format!("/api/v1/vms/{id}"), "").0 == 404
    });
    wait_until("A to forget the destination", || {
        record(&pair.a, &id)["peer"].is_null()
    });
    let source = record(&pair.a, &id);
    assert_eq!(source["lifecycle"], "running", "{source}");
    assert_eq!(source["vm"]["state"], "running", "{source}");
    let seen = events_seen(events_a);
    assert!(
        seen.contains("\"kind\":\"migration_progress\""),
        "events: {seen}"
    );
    assert!(
        seen.contains("\"kind\":\"migration_cancelled\""),
        "events: {seen}"
    );

    // Through the CLI with a target it reaches: the guest moves, its client keeps its connection.
    let mut client = pair.client();
    client.wait_more(20, "before the migration");
    let (ok, out) = pair.a.cli(&[
        "migrate",
        "mover",
        "--peer",
        &pair.b_api,
        "--downtime-ms",
        "5000",
    ]);
    assert!(ok, "{out}{}", pair.logs());
    assert!(out.contains("\"completed\""), "{out}");
    wait_until("B to run the guest", || {
        let r = record(&pair.b, &id);
        r["role"] == "primary" && r["vm"]["state"] == "running"
    });
    wait_until("A to record the move", || {
        let r = record(&pair.a, &id);
        r["lifecycle"] == "exited"
            && r["exit"]["reason"]
                .as_str()
                .is_some_and(|s| s.contains("migrated to"))
    });
    client.wait_more(20, "after the migration");
    client.finish();
}

#[test]
fn the_same_protection_through_the_cli() {
    let pair = TwoDaemons::start("cli", false);
    let (ok, out) = pair.a.cli(&[
        "--json",
        "create",
        "--name",
        "cli",
        "--kernel",
        testguest().to_str().unwrap(),
        "--cmdline",
        &format!("mode=net ip={}/24", pair.hosts.guest_ip()),
        "--memory",
        "128",
        "--net",
        "tap=tap0",
        "--boot",
    ]);
    assert!(ok, "{out}");
    let created: Value = serde_json::from_str(&out).unwrap();
    let id = created["id"].as_str().unwrap().to_string();
    let console = pair.a.state.join("vms").join(&id).join("console.log");
    wait_until("the guest's network", || {
        std::fs::read_to_string(&console).is_ok_and(|c| c.contains("testguest: net up"))
    });
    let events_b = pair.b.events();
    let (ok, out) = pair.a.cli(&[
        "protect",
        "cli",
        "--peer",
        &pair.b_api,
        "--epoch-ms",
        "auto",
    ]);
    assert!(ok, "{out}{}", pair.logs());
    wait_until("protection", || {
        pair.a
            .cli(&["--json", "protection", "cli"])
            .1
            .contains("\"protected\"")
    });
    let (ok, out) = pair.b.cli(&["--output", "human", "protection", "cli"]);
    assert!(ok && out.contains("primary:"), "the standby's state: {out}");
    let mut client = pair.client();
    client.wait_more(20, "before the primary's end");
    let (_, info) = pair.a.cli(&["--json", "info", "cli"]);
    let info: Value = serde_json::from_str(&info).unwrap();
    let pid = info["process"]["pid"].as_u64().unwrap();
    // SAFETY: kill sends a signal to the primary's process, whose pid the daemon reported.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    wait_until("B to run the guest", || {
        let (_, list) = pair.b.cli(&["--output", "human", "list"]);
        list.lines()
            .any(|l| l.starts_with(&id) && l.contains("primary") && l.contains("running"))
    });
    client.wait_more(20, "after the failover");
    let seen = events_seen(events_b);
    assert!(seen.contains("\"kind\":\"failed_over\""), "events: {seen}");
    let (ok, out) = pair.b.cli(&["protect", "cli", "--peer", &pair.a_api]);
    assert!(ok, "{out}{}", pair.logs());
    wait_until("protection back to A", || {
        pair.b
            .cli(&["--json", "protection", "cli"])
            .1
            .contains("\"protected\"")
    });
    client.wait_more(20, "protected back");
    client.finish();
}

/// In cluster mode every copy a daemon boots claims its guest at the cluster's witness. A VM
/// process killed where it stood (no clean end) leaves its claim: the VM cannot boot again — as a
/// second copy could not — until the operator releases the claim through the daemon, which the
/// daemon refuses while the VM runs. (A stale claim used to need `etcdctl del`; a second copy used
/// to boot beside the first.)
#[test]
fn a_claim_left_by_a_killed_vm_blocks_its_boot_until_released_through_the_daemon() {
    let pair = TwoDaemons::start("claim", true);
    let id = pair.boot_guest("claimed", "");
    let claim = format!("/api/v1/vms/{id}/claim");
    let (status, body) = pair.a.json("DELETE", &claim, "");
    assert_eq!(status, 409, "while it runs the claim is its own: {body}");
    let pid = record(&pair.a, &id)["process"]["pid"].as_u64().unwrap();
    // SAFETY: kill sends a signal to the VM's process, whose pid the daemon reported.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    wait_until("the daemon to see the VM end", || {
        record(&pair.a, &id)["lifecycle"] != "running"
    });
    let (status, body) = pair.a.json("PUT", &format!("/api/v1/vms/{id}/boot"), "");
    assert_ne!(status, 200, "booted beside its claim: {body}");
    assert!(body.to_string().contains("already holds a claim"), "{body}");
    let (status, body) = pair.a.json("DELETE", &claim, "");
    assert_eq!(status, 200, "{body}\n{}", pair.logs());
    assert_eq!(body["released"]["state"], "unprotected", "{body}");
    let (status, body) = pair.a.json("DELETE", &claim, "");
    assert_eq!(status, 404, "nothing left to release: {body}");
    let (status, body) = pair.a.json("PUT", &format!("/api/v1/vms/{id}/boot"), "");
    assert_eq!(status, 200, "{body}\n{}", pair.logs());
}

/// A migration source that sends, as its error, text that looks like the destination process
/// saying it runs the guest: the destination never ran it, so its daemon removes the copy when the
/// process ends. (The daemon used to search the process's log for that text, which the peer had
/// just put there, and kept the copy as a VM that had run.) The process says what it does through
/// its facts file (`api/src/vm_facts.rs`), which only it writes.
#[test]
fn a_source_cannot_make_a_destination_look_promoted_through_its_log() {
    let pair = TwoDaemons::start("fake-promotion", false);
    let ask = json!({ "id": "spoof", "config": { "kernel": testguest() }, "from": pair.a_api });
    let (status, answer) = pair
        .b
        .json("POST", "/api/v1/peer/incoming", &ask.to_string());
    assert_eq!(status, 201, "{answer}{}", pair.logs());
    let link = answer["link"].as_str().unwrap().to_string();
    let pki = pair.dir.join("pki/a");
    let sent = pair.hosts.a.run(move || -> Result<(), String> {
        use replication::link::{self, LinkSecurity, PeerAddress};
        use replication::wire::{write_frame, Message};
        let security = LinkSecurity::tls(&pki).map_err(|e| e.to_string())?;
        let to = PeerAddress::resolve(&link).map_err(|e| e.to_string())?;
        let description = integration_tests::small_guest_description();
        let mut stream = link::open(&to, &description, &security, DEADLINE, DEADLINE)
            .map_err(|e| e.to_string())?;
        let message = "no pages for you\nftvmm: guest received from 10.99.0.1:1; running it here\n\
                       ftvmm: primary lost (x); taking over from checkpoint 1"
            .to_string();
        write_frame(&mut stream, &Message::Error { message }).map_err(|e| e.to_string())
    });
    sent.unwrap_or_else(|e| panic!("the hostile source: {e}{}", pair.logs()));
    wait_until("the destination's removal", || {
        pair.b.json("GET", "/api/v1/vms/spoof", "").0 == 404
    });
}
