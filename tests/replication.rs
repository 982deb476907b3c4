//! A protected guest survives the death of its primary: the standby on another "host" resumes it from
//! the last committed checkpoint, and a client that kept one TCP connection open and kept incrementing
//! a counter loses no acknowledged increment.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use integration_tests::netns::TwoHosts;
use integration_tests::{ftvmm_bin, testguest, tls_pki, RunningVm};

const DEADLINE: Duration = Duration::from_secs(180);

#[test]
fn a_protected_guest_survives_the_loss_of_its_primary() {
    let hosts = TwoHosts::new().expect("two-host topology");
    let dir = std::env::temp_dir().join(format!("ftvmm-replication-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("primary.sock");
    let listen = format!("{}:7100", hosts.b_ip());
    let b_ip = hosts.b_ip();
    let pki = tls_pki(&dir, &[("a", &["127.0.0.1"]), ("b", &[b_ip.as_str()])]);
    let mut standby_cmd = hosts.b.command(ftvmm_bin().to_str().unwrap());
    standby_cmd.args([
        "standby",
        "--listen",
        &listen,
        "--failure-timeout-ms",
        "1000",
        "--net",
        "tap=tap0",
    ]);
    standby_cmd.arg("--tls").arg(pki.join("b"));
    let mut standby = RunningVm::spawn(standby_cmd);
    standby.wait_for_stderr("standing by on", DEADLINE);

    let mut primary_cmd = hosts.a.command(ftvmm_bin().to_str().unwrap());
    primary_cmd
        .env("FTVMM_LOG", "replication=info")
        .args([
            "run",
            "--kernel",
            testguest().to_str().unwrap(),
            "--memory",
            "128",
            "--net",
            "tap=tap0",
        ])
        .args([
            "--cmdline",
            &format!("mode=net ip={}/24 dirty=500 dirty_mb=8", hosts.guest_ip()),
        ])
        .args(["--standby", &listen, "--epoch-ms", "50"])
        .arg("--tls")
        .arg(pki.join("a"))
        .args(["--api-socket", sock.to_str().unwrap()]);
    let mut primary = RunningVm::spawn(primary_cmd);
    primary.wait_for("testguest: net up", DEADLINE);
    primary.wait_for_stderr("guest protected by", DEADLINE);

    // One connection, incrementing without pause; every reply must be exactly one more.
    let stop = Arc::new(AtomicBool::new(false));
    let acknowledged = Arc::new(AtomicU64::new(0));
    let client = integration_tests::clients::incrementer(
        hosts.lan.name(),
        format!("{}:4000", hosts.guest_ip()),
        stop.clone(),
        acknowledged.clone(),
        Duration::from_secs(60),
    );

    // Let some increments through the output gate, then lose the primary's host.
    let t0 = Instant::now();
    while acknowledged.load(Ordering::SeqCst) < 10 {
        assert!(
            t0.elapsed() < DEADLINE,
            "no increments acknowledged\nprimary:\n{}",
            primary.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The primary reports its protection: committed epochs, pause and commit figures.
    let status = integration_tests::run_ftvmm(
        &["vm", "--api-socket", sock.to_str().unwrap(), "protection"],
        DEADLINE,
    );
    assert_eq!(status.code(), Some(0), "{status:?}");
    let s: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(s["state"], "protected", "{s}");
    assert!(s["committed_epoch"].as_u64().unwrap() > 0, "{s}");
    assert!(s["last_pause_ms"].as_f64().is_some(), "{s}");
    primary.kill();
    let at_failure = acknowledged.load(Ordering::SeqCst);

    standby.wait_for_stderr("taking over from checkpoint", DEADLINE);
    // The client goes on against the standby, on the same connection.
    let t1 = Instant::now();
    while acknowledged.load(Ordering::SeqCst) < at_failure + 10 {
        assert!(
            t1.elapsed() < Duration::from_secs(60),
            "no progress after failover (at {at_failure})\nstandby:\n{}",
            standby.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::SeqCst);
    let last = client
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("client: {e}\nstandby:\n{}", standby.stderr()));
    assert!(last >= at_failure + 10);
    let _ = std::fs::remove_dir_all(dir);
}

/// A standby on loopback with TLS identity `b` of a fresh PKI under `dir`; returns it, its address
/// and the PKI.
fn loopback_standby(dir: &std::path::Path) -> (RunningVm, String, std::path::PathBuf) {
    let pki = tls_pki(dir, &[("a", &["127.0.0.1"]), ("b", &["127.0.0.1"])]);
    let mut cmd = std::process::Command::new(ftvmm_bin());
    cmd.args(["standby", "--listen", "127.0.0.1:0", "--serial", "null"])
        .arg("--tls")
        .arg(pki.join("b"));
    let mut standby = RunningVm::spawn(cmd);
    let addr = standby.bound_address("standing by on ", DEADLINE);
    (standby, addr, pki)
}

#[test]
fn a_standby_refuses_checkpoints_out_of_order_or_outside_guest_memory() {
    use replication::link::{self, LinkSecurity};
    use replication::wire::{write_frame, Message, PageRun};
    let description = vmm::machine::MachineDescription {
        vcpus: 1,
        memory_mib: 32,
        disks: vec![],
        nets: vec![],
    };
    let cases: [(&str, Message, &str); 3] = [
        (
            "out of order",
            Message::EpochPages {
                epoch: 5,
                runs: vec![],
            },
            "pages of checkpoint 5 where 0 was due",
        ),
        (
            "outside memory",
            Message::EpochPages {
                epoch: 0,
                runs: vec![PageRun {
                    gpa: 1 << 40,
                    data: vec![1; 4096],
                }],
            },
            "not whole pages of guest memory",
        ),
        (
            "torn page",
            Message::EpochPages {
                epoch: 0,
                runs: vec![PageRun {
                    gpa: 0x10_0000,
                    data: vec![1; 100],
                }],
            },
            "not whole pages of guest memory",
        ),
    ];
    for (name, message, expected) in cases {
        let dir = std::env::temp_dir().join(format!(
            "ftvmm-replication-order-{}-{}",
            std::process::id(),
            name.replace(' ', "-")
        ));
        let (mut standby, addr, pki) = loopback_standby(&dir);
        let security = LinkSecurity::tls(&pki.join("a")).unwrap();
        let mut link = link::open(&addr, &description, &security, DEADLINE, DEADLINE).unwrap();
        write_frame(&mut link, &message).unwrap();
        assert_eq!(standby.wait_exit(DEADLINE), Some(1), "{name}");
        let err = standby.stderr();
        assert!(err.contains(expected), "{name}: {err}");
        assert!(err.contains("not resumed here"), "{name}: {err}");
        assert!(!err.contains("taking over"), "{name}: {err}");
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// A primary on loopback protecting the test guest with `cmdline` to `standby` (TLS identity `a`).
fn loopback_primary(
    cmdline: &str,
    standby: &str,
    pki: &std::path::Path,
    api: &std::path::Path,
) -> RunningVm {
    let mut cmd = std::process::Command::new(ftvmm_bin());
    cmd.env("FTVMM_LOG", "replication=info")
        .args([
            "run",
            "--kernel",
            testguest().to_str().unwrap(),
            "--memory",
            "64",
        ])
        .args(["--cmdline", cmdline])
        .args(["--standby", standby, "--epoch-ms", "50"])
        .arg("--tls")
        .arg(pki.join("a"))
        .arg("--api-socket")
        .arg(api);
    RunningVm::spawn(cmd)
}

#[test]
fn a_guest_that_powers_off_while_protected_ends_its_standby_without_resuming() {
    let dir =
        std::env::temp_dir().join(format!("ftvmm-replication-poweroff-{}", std::process::id()));
    let (mut standby, addr, pki) = loopback_standby(&dir);
    let mut primary = loopback_primary("mode=spin seconds=3", &addr, &pki, &dir.join("a.sock"));
    primary.wait_for_stderr("guest protected by", DEADLINE);
    assert_eq!(primary.wait_exit(DEADLINE), Some(0), "{}", primary.stderr());
    assert_eq!(standby.wait_exit(DEADLINE), Some(0), "{}", standby.stderr());
    let err = standby.stderr();
    assert!(
        err.contains("the primary ended protection (the guest powered off)"),
        "{err}"
    );
    assert!(!err.contains("taking over"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

/// While protected, snapshots and migrations are refused (409); `vm unprotect` ends the standby
/// without a takeover, the guest goes on, and snapshots work again.
#[test]
fn a_protected_guest_refuses_snapshots_and_migration_until_unprotected() {
    let dir = std::env::temp_dir().join(format!("ftvmm-replication-409-{}", std::process::id()));
    let (mut standby, addr, pki) = loopback_standby(&dir);
    let api = dir.join("a.sock");
    let mut primary = loopback_primary("mode=spin", &addr, &pki, &api);
    primary.wait_for_stderr("guest protected by", DEADLINE);
    let api = api.to_str().unwrap();
    let snap = dir.join("snap");
    let snapshot = integration_tests::run_ftvmm(
        &[
            "vm",
            "--api-socket",
            api,
            "snapshot",
            "--dir",
            snap.to_str().unwrap(),
        ],
        DEADLINE,
    );
    assert_ne!(snapshot.code(), Some(0), "{snapshot:?}");
    assert!(
        snapshot.stderr.contains(
            "a snapshot cannot start while protection tracks the guest's dirty pages (HTTP 409)"
        ),
        "{snapshot:?}"
    );
    assert!(!snap.join(vmm::machine::SNAPSHOT_STATE_FILE).exists());
    let migrate = integration_tests::run_ftvmm(
        &["vm", "--api-socket", api, "migrate", "--to", "127.0.0.1:9"],
        DEADLINE,
    );
    assert_ne!(migrate.code(), Some(0), "{migrate:?}");
    assert!(
        migrate.stderr.contains("unprotect the guest first") && migrate.stderr.contains("HTTP 409"),
        "{migrate:?}"
    );
    // Protection went on through both refusals.
    let status = integration_tests::run_ftvmm(&["vm", "--api-socket", api, "protection"], DEADLINE);
    let s: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(s["state"], "protected", "{s}");

    let unprotect =
        integration_tests::run_ftvmm(&["vm", "--api-socket", api, "unprotect"], DEADLINE);
    assert_eq!(unprotect.code(), Some(0), "{unprotect:?}");
    let s: serde_json::Value = serde_json::from_str(&unprotect.stdout).unwrap();
    assert_eq!(s["state"], "unprotected", "{s}");
    assert_eq!(standby.wait_exit(DEADLINE), Some(0), "{}", standby.stderr());
    let err = standby.stderr();
    assert!(err.contains("protection was stopped"), "{err}");
    assert!(!err.contains("taking over"), "{err}");
    let again = integration_tests::run_ftvmm(&["vm", "--api-socket", api, "unprotect"], DEADLINE);
    assert!(again.stderr.contains("HTTP 409"), "{again:?}");
    // Dirty tracking is free again: a snapshot of the still-running guest works.
    let snapshot = integration_tests::run_ftvmm(
        &[
            "vm",
            "--api-socket",
            api,
            "snapshot",
            "--dir",
            snap.to_str().unwrap(),
        ],
        DEADLINE,
    );
    assert_eq!(snapshot.code(), Some(0), "{snapshot:?}");
    let info = integration_tests::run_ftvmm(&["vm", "--api-socket", api, "info"], DEADLINE);
    assert!(info.stdout.contains("\"running\""), "{info:?}");
    primary.kill();
    let _ = std::fs::remove_dir_all(dir);
}
