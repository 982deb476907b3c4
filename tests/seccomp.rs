//! Every thread of a running VM is under its seccomp filter (`vmm/src/seccomp.rs`): a protected
//! primary (vCPUs, event loop, API, epoch loop), its standby (event loop before the primary speaks),
//! and a migration source and destination (migration thread, the destination's vCPUs). That a
//! forbidden call ends the process is tested per kind in `vmm/src/seccomp.rs`.

use std::process::Command;
use std::time::{Duration, Instant};

use integration_tests::{ftvmm_bin, run_ftvmm, testguest, tls_pki, RunningVm};

const DEADLINE: Duration = Duration::from_secs(120);

/// Waits until `vm` has threads with all of `names` (prefixes), then checks that every thread is
/// filtered.
fn assert_all_filtered(vm: &RunningVm, names: &[&str], what: &str) {
    let t0 = Instant::now();
    loop {
        let threads = vm.threads_seccomp();
        let present = names
            .iter()
            .all(|n| threads.iter().any(|(name, _)| name.starts_with(n)));
        let filtered = threads.iter().all(|(_, mode)| mode == "2");
        if present && filtered {
            return;
        }
        assert!(
            t0.elapsed() < DEADLINE,
            "{what}: want threads {names:?} all with Seccomp 2, have {threads:?}\n{}",
            vm.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn every_thread_of_a_protected_and_a_migrating_vm_is_filtered() {
    let dir = std::env::temp_dir().join(format!("ftvmm-seccomp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let pki = tls_pki(&dir, &[("a", &["127.0.0.1"]), ("b", &["127.0.0.1"])]);

    let mut standby_cmd = Command::new(ftvmm_bin());
    standby_cmd
        .args(["standby", "--listen", "127.0.0.1:0", "--serial", "null"])
        // This test is about the filters, not timing: a generous failure timeout on a busy host.
        .args(["--failure-timeout-ms", "1000"])
        .arg("--tls")
        .arg(pki.join("b"));
    let mut standby = RunningVm::spawn(standby_cmd);
    let standby_addr = standby.bound_address("standing by on ", DEADLINE);
    assert_all_filtered(&standby, &["ftvmm"], "standby");

    let sock = dir.join("primary.sock");
    let mut primary_cmd = Command::new(ftvmm_bin());
    primary_cmd
        .env("FTVMM_LOG", "replication=info")
        .args(["run", "--kernel", testguest().to_str().unwrap()])
        .args(["--memory", "64", "--vcpus", "2", "--cmdline", "mode=spin"])
        .args(["--standby", &standby_addr, "--epoch-ms", "50"])
        .args(["--api-socket", sock.to_str().unwrap()])
        .arg("--tls")
        .arg(pki.join("a"));
    let mut primary = RunningVm::spawn(primary_cmd);
    primary.wait_for("testguest: spinning", DEADLINE);
    // An API request makes the server run (and its blocking pool start).
    let info = run_ftvmm(
        &["vm", "--api-socket", sock.to_str().unwrap(), "info"],
        DEADLINE,
    );
    assert_eq!(info.code(), Some(0), "{info:?}");
    assert_all_filtered(
        &primary,
        &["ftvmm", "vcpu0", "vcpu1", "api", "epoch-loop"],
        "protected primary",
    );
    // A checkpoint must be committed before the primary dies, or there is nothing to take over.
    primary.wait_for_stderr("guest protected by", DEADLINE);
    primary.kill();
    standby.wait_for_stderr("taking over", DEADLINE);
    assert_all_filtered(
        &standby,
        &["ftvmm", "vcpu0", "vcpu1"],
        "standby after failover",
    );
    standby.kill();

    // A migration: the source's migration thread and the destination's threads.
    let sock_a = dir.join("a.sock");
    let sock_b = dir.join("b.sock");
    let mut src_cmd = Command::new(ftvmm_bin());
    src_cmd
        .args(["run", "--kernel", testguest().to_str().unwrap()])
        .args([
            "--memory",
            "64",
            "--cmdline",
            "mode=spin dirty=20000 dirty_mb=16",
        ])
        .args(["--api-socket", sock_a.to_str().unwrap()])
        .arg("--tls")
        .arg(pki.join("a"));
    let mut src = RunningVm::spawn(src_cmd);
    src.wait_for("testguest: spinning", DEADLINE);
    let mut dst_cmd = Command::new(ftvmm_bin());
    dst_cmd
        .args(["receive", "--listen", "127.0.0.1:0", "--serial", "null"])
        .args(["--api-socket", sock_b.to_str().unwrap()])
        .arg("--tls")
        .arg(pki.join("b"));
    let mut dst = RunningVm::spawn(dst_cmd);
    let to = dst.bound_address("waiting for a migration on ", DEADLINE);
    assert_all_filtered(&dst, &["ftvmm"], "destination");
    // A 1 ms target keeps the dirtying guest in pre-copy while the threads are inspected.
    let socket = sock_a.clone();
    let target = to.clone();
    let migrate = std::thread::spawn(move || {
        run_ftvmm(
            &[
                "vm",
                "--api-socket",
                socket.to_str().unwrap(),
                "migrate",
                "--to",
                &target,
                "--downtime-ms",
                "1",
            ],
            DEADLINE,
        )
    });
    assert_all_filtered(
        &src,
        &["ftvmm", "vcpu0", "api", "migration"],
        "migration source",
    );
    let cancel = run_ftvmm(
        &[
            "vm",
            "--api-socket",
            sock_a.to_str().unwrap(),
            "cancel-migration",
        ],
        DEADLINE,
    );
    assert_eq!(cancel.code(), Some(0), "{cancel:?}");
    let _ = migrate.join().unwrap();
    // The cancelled migration leaves the source running, still filtered.
    assert_all_filtered(&src, &["ftvmm", "vcpu0", "api"], "source after cancel");
    src.kill();
    dst.kill();
    let _ = std::fs::remove_dir_all(dir);
}
