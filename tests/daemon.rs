//! The host daemon (`ftvmm serve`) end to end with the test guest: VMs created, booted, paused,
//! stopped and deleted through its REST API and the CLI, its events and metrics, re-adoption by a
//! restarted daemon, and a 4xx naming what was wrong for every bad request.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::abuse::Dribblers;
use integration_tests::daemon::{tcp_request, Daemon, PeerApi};
use integration_tests::{ftvmm_bin, testguest};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ftvmm-daemon-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s[s.rfind(')').unwrap() + 2..].starts_with('Z'))
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_guest_runs_through_the_daemon_and_a_restarted_daemon_re_adopts_it() {
    let dir = scratch("life");
    let mut daemon = Daemon::start(&dir);
    let guest = testguest();
    let (ok, out) = daemon.cli(&[
        "create",
        "--name",
        "g1",
        "--kernel",
        guest.to_str().unwrap(),
        "--cmdline",
        "mode=spin",
        "--memory",
        "64",
        "--boot",
    ]);
    assert!(ok, "{out}");
    let record: serde_json::Value = serde_json::from_str(&out).unwrap();
    let id = record["id"].as_str().unwrap().to_string();
    assert_eq!(record["lifecycle"], "running");
    let pid = record["process"]["pid"].as_u64().unwrap();
    let console = dir.join("state/vms").join(&id).join("console.log");
    wait_until("the guest's first line", || {
        std::fs::read_to_string(&console).is_ok_and(|c| c.contains("testguest: spinning"))
    });

    // Events: a subscriber sees the pause.
    let mut events = Command::new(ftvmm_bin())
        .args(["vm", "--daemon"])
        .arg(&daemon.socket)
        .arg("events")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let (ok, out) = daemon.cli(&["--output", "human", "list"]);
    assert!(ok, "{out}");
    let row = out.lines().find(|l| l.starts_with(&id)).unwrap_or_default();
    assert!(out.starts_with("ID "), "{out}");
    assert!(row.contains("g1") && row.contains("running"), "{out}");
    let (ok, out) = daemon.cli(&["pause", "g1"]);
    assert!(ok, "{out}");
    let (_, info) = daemon.json("GET", &format!("/api/v1/vms/{id}"), "");
    assert_eq!(info["vm"]["state"], "paused", "{info}");
    let (status, _) = daemon.json("PUT", "/api/v1/vms/g1/resume", "");
    assert_eq!(status, 200);
    let (ok, out) = daemon.cli(&["snapshot", "g1", "--name", "s1"]);
    assert!(ok, "{out}");
    let (status, err) = daemon.json("PUT", "/api/v1/vms/g1/snapshot", r#"{"name":"s1"}"#);
    assert_eq!(status, 409, "a snapshot name was taken twice: {err}");
    let (status, err) = daemon.json("PUT", "/api/v1/vms/g1/snapshot", r#"{"name":"../up"}"#);
    assert_eq!(status, 400, "{err}");
    let (_, metrics) = daemon.request("GET", "/metrics", "");
    assert!(
        metrics.contains(&format!("ftvmm_vm_running{{vm=\"{id}\",name=\"g1\"}} 1")),
        "{metrics}"
    );

    // The daemon dies; the VM does not. A new daemon finds it.
    daemon.kill();
    let _ = events.kill();
    let mut seen = String::new();
    events
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut seen)
        .unwrap();
    let _ = events.wait();
    assert!(seen.contains("\"kind\":\"paused\""), "events: {seen}");
    assert!(alive(pid), "the VM ended with its daemon");
    let daemon = Daemon::start(&dir);
    let (status, info) = daemon.json("GET", "/api/v1/vms/g1", "");
    assert_eq!(status, 200);
    assert_eq!(info["lifecycle"], "running", "{info}");
    assert_eq!(info["vm"]["state"], "running", "{info}");
    let (status, err) = daemon.json("DELETE", &format!("/api/v1/vms/{id}"), "");
    assert_eq!(status, 409, "a running VM was deleted: {err}");

    let (ok, out) = daemon.cli(&["stop", "g1"]);
    assert!(ok, "{out}");
    wait_until("the re-adopted VM's end", || {
        daemon.json("GET", "/api/v1/vms/g1", "").1["lifecycle"] == "exited"
    });
    assert!(!alive(pid));
    // Restored from its snapshot in a new process, and stopped again.
    let (status, err) = daemon.json("PUT", "/api/v1/vms/g1/restore", r#"{"snapshot":"nope"}"#);
    assert_eq!(status, 404, "{err}");
    let (ok, out) = daemon.cli(&["restore", "g1", "--snapshot", "s1"]);
    assert!(ok, "{out}");
    let (_, info) = daemon.json("GET", "/api/v1/vms/g1", "");
    assert_eq!(info["lifecycle"], "running", "{info}");
    assert_eq!(info["vm"]["state"], "running", "{info}");
    let (_, snapshots) = daemon.json("GET", "/api/v1/vms/g1/snapshots", "");
    assert_eq!(snapshots[0]["name"], "s1", "{snapshots}");
    assert!(snapshots[0]["bytes"].as_u64().unwrap() > 0, "{snapshots}");
    let (ok, out) = daemon.cli(&["stop", "g1"]);
    assert!(ok, "{out}");
    wait_until("the restored VM's end", || {
        daemon.json("GET", "/api/v1/vms/g1", "").1["lifecycle"] == "exited"
    });
    let (ok, out) = daemon.cli(&["delete", "g1"]);
    assert!(ok, "{out}");
    assert_eq!(daemon.json("GET", "/api/v1/vms/g1", "").0, 404);
    assert!(!dir.join("state/vms").join(&id).exists());
    let (_, list) = daemon.json("GET", "/api/v1/vms", "");
    assert_eq!(list, serde_json::json!([]));
    drop(daemon);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_requests_get_a_4xx_that_names_what_was_wrong_and_create_nothing() {
    let dir = scratch("bad");
    let daemon = Daemon::start(&dir);
    let guest = testguest();
    let kernel = guest.to_str().unwrap();
    let cases: Vec<(&str, String, String, u16, &str)> = vec![
        (
            "POST",
            "/api/v1/vms".into(),
            "{".into(),
            400,
            "invalid request body",
        ),
        (
            "POST",
            "/api/v1/vms".into(),
            format!(r#"{{"kernel":"{kernel}","cpus":2}}"#),
            400,
            "unknown field `cpus`",
        ),
        (
            "POST",
            "/api/v1/vms".into(),
            format!(r#"{{"kernel":"{kernel}","memory_mib":1099511627776}}"#),
            400,
            "must be 16 to",
        ),
        (
            "POST",
            "/api/v1/vms".into(),
            format!(r#"{{"kernel":"{kernel}","vcpus":0}}"#),
            400,
            "must be 1 to 254, got 0",
        ),
        (
            "POST",
            "/api/v1/vms".into(),
            format!(r#"{{"kernel":"{kernel}","vcpus":300}}"#),
            400,
            "invalid request body",
        ),
        (
            "POST",
            "/api/v1/vms".into(),
            r#"{"kernel":"/no/such/kernel"}"#.into(),
            400,
            "/no/such/kernel",
        ),
        (
            "GET",
            "/api/v1/vms/vm-nope".into(),
            String::new(),
            404,
            "vm-nope",
        ),
        (
            "PUT",
            "/api/v1/vms/vm-nope/boot".into(),
            String::new(),
            404,
            "no VM",
        ),
        (
            "PUT",
            "/api/v1/nothing".into(),
            String::new(),
            404,
            "no such endpoint",
        ),
    ];
    for (method, path, body, status, says) in &cases {
        let (got, text) = daemon.request(method, path, body);
        assert_eq!(got, *status, "{method} {path} {body}: {text}");
        assert!(text.contains(says), "{method} {path} {body}: {text}");
    }
    assert_eq!(
        daemon.json("GET", "/api/v1/vms", "").1,
        serde_json::json!([])
    );

    // Operations in the wrong state, and a name taken twice.
    let body =
        format!(r#"{{"kernel":"{kernel}","name":"x","cmdline":"mode=spin","memory_mib":64}}"#);
    let (status, _) = daemon.json("POST", "/api/v1/vms", &body);
    assert_eq!(status, 201);
    let (status, err) = daemon.json("POST", "/api/v1/vms", &body);
    assert_eq!((status, err["error"].is_string()), (409, true), "{err}");
    for (method, path, says) in [
        ("PUT", "/api/v1/vms/x/pause", "must run here"),
        ("PUT", "/api/v1/vms/x/stop", "does not run"),
    ] {
        let (status, err) = daemon.json(method, path, "");
        assert_eq!(status, 409, "{path}: {err}");
        assert!(err["error"].as_str().unwrap().contains(says), "{err}");
    }
    // Protection and migration need peers; a standby's operations need a standby.
    for (method, path, body, status, says) in [
        (
            "PUT",
            "/api/v1/vms/x/protect",
            r#"{"peer":"10.0.0.9:7200"}"#,
            409,
            "must run here",
        ),
        (
            "PUT",
            "/api/v1/vms/x/protect",
            r#"{"peer":"h:1","standby":"h:2"}"#,
            400,
            "unknown field",
        ),
        (
            "PUT",
            "/api/v1/vms/x/failover",
            "",
            409,
            "only a running standby",
        ),
        (
            "PUT",
            "/api/v1/vms/x/migrate",
            r#"{"peer":"10.0.0.9:7200"}"#,
            409,
            "must run here",
        ),
        (
            "GET",
            "/api/v1/vms/x/migration",
            "",
            404,
            "has not migrated",
        ),
        ("DELETE", "/api/v1/peer/vms/x", "", 409, "only a standby"),
    ] {
        let (got, text) = daemon.request(method, path, body);
        assert_eq!(got, status, "{method} {path} {body}: {text}");
        assert!(text.contains(says), "{method} {path} {body}: {text}");
    }
    let peer_request =
        format!(r#"{{"id":"../x","config":{{"kernel":"{kernel}"}},"from":"10.0.0.9:7200"}}"#);
    let (got, text) = daemon.request("POST", "/api/v1/peer/standbys", &peer_request);
    assert_eq!(got, 409, "{text}");
    assert!(text.contains("no peers"), "{text}");

    // Two boots at once: one starts the VM, the other is refused; one process runs.
    let socket = daemon.socket.clone();
    let boots: Vec<_> = (0..2)
        .map(|_| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                integration_tests::daemon::request(&socket, "PUT", "/api/v1/vms/x/boot", "").0
            })
        })
        .collect();
    let mut statuses: Vec<u16> = boots.into_iter().map(|b| b.join().unwrap()).collect();
    statuses.sort();
    assert_eq!(statuses, [200, 409]);
    let (_, record) = daemon.json("GET", "/api/v1/vms/x", "");
    assert_eq!(record["lifecycle"], "running", "{record}");
    let (status, _) = daemon.json("PUT", "/api/v1/vms/x/stop", "");
    assert_eq!(status, 204);
    wait_until("x's end", || {
        daemon.json("GET", "/api/v1/vms/x", "").1["lifecycle"] == "exited"
    });

    // A kernel the VM process cannot boot: the boot fails with its log, and the VM is not running.
    let bad_kernel = dir.join("not-a-kernel");
    std::fs::write(&bad_kernel, b"nothing bootable").unwrap();
    let (status, rec) = daemon.json(
        "POST",
        "/api/v1/vms",
        &format!(r#"{{"kernel":"{}","name":"y"}}"#, bad_kernel.display()),
    );
    assert_eq!(status, 201, "{rec}");
    let (status, err) = daemon.json("PUT", "/api/v1/vms/y/boot", "");
    assert_eq!(status, 422, "{err}");
    assert_eq!(
        daemon.json("GET", "/api/v1/vms/y", "").1["lifecycle"],
        "created"
    );

    let (status, doc) = daemon.json("GET", "/openapi.json", "");
    assert_eq!(status, 200);
    assert!(
        doc["paths"]["/api/v1/vms/{id}/boot"]["put"].is_object(),
        "{doc}"
    );
    drop(daemon);
    std::fs::remove_dir_all(dir).unwrap();
}

/// 1,200 connections to the daemon's TCP port that never finish their TLS handshake, 60 from each
/// of 20 addresses, each replaced as soon as it is closed, while the daemon may hold 1,024 files
/// (systemd's default for a service): a VM still starts, and an operator with a certificate of the
/// cluster's CA and the token is still answered over TCP. The daemon holds at most 16 connections
/// from one address and closes the rest at once.
#[test]
fn a_thousand_idle_connections_to_the_tcp_api_do_not_stop_vm_starts() {
    let dir = scratch("idle");
    integration_tests::tls_pki(
        &dir,
        &[("host", &["127.0.0.1"]), ("operator", &["127.0.0.1"])],
    );
    let token = "0123456789abcdef0123456789abcdef";
    std::fs::write(dir.join("token"), token).unwrap();
    std::fs::set_permissions(
        dir.join("token"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let listen = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().to_string()
    };
    let peers = PeerApi {
        listen: &listen,
        tls: &dir.join("pki/host"),
        token_file: &dir.join("token"),
        cluster: None,
    };
    let daemon = Daemon::start_limited(&dir, None, Some(peers), Some(1024));
    let log = || std::fs::read_to_string(dir.join("serve.log")).unwrap_or_default();
    wait_until("the TCP API", || {
        std::net::TcpStream::connect(&listen).is_ok()
    });

    let idle = Dribblers::replacing(&listen, 20, 60);
    let open_files = || {
        std::fs::read_dir(format!("/proc/{}/fd", daemon.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    std::thread::sleep(Duration::from_secs(2));
    let held = open_files();
    assert!(
        held < 20 * 16 + 64,
        "the daemon holds {held} files with 1,200 connections knocking"
    );
    let guest = testguest();
    let started = Instant::now();
    let create = Command::new(ftvmm_bin())
        .args(["vm", "--daemon"])
        .arg(&daemon.socket)
        .args(["create", "--name", "g1", "--kernel"])
        .arg(&guest)
        .args(["--cmdline", "mode=spin", "--memory", "64", "--boot"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_output(create, Duration::from_secs(30));
    assert!(
        out.status.success(),
        "a VM start with 1,200 idle connections, after {:?}: {}{}\n{}",
        started.elapsed(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        log()
    );
    let record: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = record["id"].as_str().unwrap().to_string();
    let console = dir.join("state/vms").join(&id).join("console.log");
    wait_until("the guest's first line", || {
        std::fs::read_to_string(&console).is_ok_and(|c| c.contains("testguest: spinning"))
    });
    let answer = tcp_request(
        &listen,
        &dir.join("pki/operator"),
        token,
        "GET",
        "/api/v1/vms",
    );
    let (status, body) = answer.unwrap_or_else(|e| panic!("the operator over TCP: {e}\n{}", log()));
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(&id), "{body}");
    assert!(idle.closed() > 0);
    drop(idle);
    let (ok, out) = daemon.cli(&["stop", &id]);
    assert!(ok, "{out}");
}

/// `child`'s output once it exits, or once `bound` ran out (it is killed then).
fn wait_output(mut child: std::process::Child, bound: Duration) -> std::process::Output {
    let deadline = Instant::now() + bound;
    while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    child.wait_with_output().unwrap()
}

/// A guest that writes an unsupported ACPI sleep type in a loop (a warning each time, once) cannot
/// fill its VM's log: guest-caused lines are rate limited, and the log is kept to a cap.
#[test]
fn a_guest_writing_acpi_registers_in_a_loop_does_not_fill_the_log() {
    let dir = scratch("pm-flood");
    let daemon = Daemon::start(&dir);
    let guest = testguest();
    let (ok, out) = daemon.cli(&[
        "create",
        "--name",
        "flood",
        "--kernel",
        guest.to_str().unwrap(),
        "--cmdline",
        "mode=pm-flood seconds=3",
        "--memory",
        "64",
        "--boot",
    ]);
    assert!(ok, "{out}");
    let record: serde_json::Value = serde_json::from_str(&out).unwrap();
    let vm_dir = dir.join("state/vms").join(record["id"].as_str().unwrap());
    let console = vm_dir.join("console.log");
    wait_until("the guest's flood to end", || {
        std::fs::read_to_string(&console).is_ok_and(|c| c.contains("pm-flood writes="))
    });
    let log = std::fs::read_to_string(vm_dir.join("ftvmm.log")).unwrap();
    let writes: u64 = std::fs::read_to_string(&console)
        .unwrap()
        .split("pm-flood writes=")
        .nth(1)
        .and_then(|w| w.trim().parse().ok())
        .unwrap();
    assert!(writes > 1000, "the guest wrote only {writes} times");
    assert!(
        log.contains("unsupported sleep type 3"),
        "the first writes are logged: {log}"
    );
    assert!(
        log.len() < 64 << 10,
        "{writes} guest writes made a log of {} bytes",
        log.len()
    );
}
