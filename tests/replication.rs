//! A protected guest survives the death of its primary: the standby on another "host" resumes it from
//! the last committed checkpoint, and a client that kept one TCP connection open and kept incrementing
//! a counter loses no acknowledged increment.

use std::time::{Duration, Instant};

use integration_tests::protected_pair::*;
use integration_tests::witness::TestEtcd;
use integration_tests::{ftvmm_bin, testguest, tls_pki, RunningVm};

#[test]
fn a_protected_guest_survives_the_loss_of_its_primary() {
    let _serial = one_at_a_time();
    let mut pair = ProtectedPair::start("kill", 1000);
    // Let some increments through the output gate, then lose the primary's host.
    pair.wait_acknowledged(10, "before the failure");
    // The primary reports its protection: committed epochs, pause and commit figures.
    let s = pair.protection();
    assert_eq!(s["state"], "protected", "{s}");
    assert!(s["committed_epoch"].as_u64().unwrap() > 0, "{s}");
    assert!(s["last_pause_ms"].as_f64().is_some(), "{s}");
    assert!(s["heartbeat_age_ms"].as_f64().is_some(), "{s}");
    assert!(
        s["held_bytes"].as_u64().is_some() && s["held_frames"].as_u64().is_some(),
        "{s}"
    );
    assert!(s["generation"].is_null(), "no witness, no generation: {s}");
    assert_standby_never_sent(&pair);
    pair.primary.kill();
    let at_failure = pair.acknowledged();

    pair.standby
        .wait_for_stderr("taking over from checkpoint", DEADLINE);
    // The client goes on against the standby, on the same connection: its frames now leave from
    // host B's TAP (which the other tests check stays silent while the primary acts).
    pair.wait_acknowledged(at_failure + 10, "after failover");
    assert!(frames_on_tap(&pair.hosts.b) > 0);
    let last = pair.finish();
    assert!(last >= at_failure + 10);
}

/// A hung primary (SIGSTOP: its sockets stay open, as with a frozen host) is never taken over on
/// silence; when it wakes it protects again, and when it then dies the standby takes over.
#[test]
fn a_hung_primary_is_not_taken_over_and_protects_again_when_it_wakes() {
    let _serial = one_at_a_time();
    let mut pair = ProtectedPair::start("hang", 500);
    pair.wait_acknowledged(10, "before the hang");
    signal(&pair.primary, "-STOP");
    std::thread::sleep(Duration::from_millis(2500));
    let err = pair.standby.stderr();
    assert!(err.contains("the primary is silent"), "{err}");
    assert!(!err.contains("taking over"), "{err}");
    signal(&pair.primary, "-CONT");
    let epoch_before = pair.protection()["committed_epoch"].as_u64().unwrap();
    let woke_at = pair.acknowledged();
    pair.wait_acknowledged(woke_at + 10, "after the primary woke");
    let t0 = Instant::now();
    loop {
        let s = pair.protection();
        if s["state"] == "protected" && s["committed_epoch"].as_u64().unwrap() > epoch_before + 5 {
            break;
        }
        assert!(t0.elapsed() < DEADLINE, "protection did not go on: {s}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!pair.standby.stderr().contains("taking over"));
    assert_standby_never_sent(&pair);
    // Now it dies for real: the standby takes over and the client loses nothing.
    pair.primary.kill();
    let at_failure = pair.acknowledged();
    pair.standby
        .wait_for_stderr("taking over from checkpoint", DEADLINE);
    pair.wait_acknowledged(at_failure + 10, "after failover");
    pair.finish();
}

/// A standby on loopback with TLS identity `b` of a fresh PKI under `dir`; returns it, its address
/// and the PKI.
fn loopback_standby(dir: &std::path::Path) -> (RunningVm, String, std::path::PathBuf) {
    loopback_standby_with(dir, &[])
}

/// Opens a link to the standby at `addr` as host `a` of `pki` (the primary's identity), announcing
/// `description`.
fn open_as_primary(
    addr: &str,
    pki: &std::path::Path,
    description: &vmm::machine::MachineDescription,
) -> replication::link::Link {
    use replication::link::{self, LinkSecurity};
    let security = LinkSecurity::tls(&pki.join("a")).unwrap();
    let to = link::PeerAddress::resolve(addr).unwrap();
    link::open(&to, description, &security, DEADLINE, DEADLINE).unwrap()
}

/// As [`loopback_standby`], with more arguments.
fn loopback_standby_with(
    dir: &std::path::Path,
    extra: &[&str],
) -> (RunningVm, String, std::path::PathBuf) {
    let pki = tls_pki(dir, &[("a", &["127.0.0.1"]), ("b", &["127.0.0.1"])]);
    let mut cmd = std::process::Command::new(ftvmm_bin());
    cmd.args(["standby", "--listen", "127.0.0.1:0"]);
    if !extra.contains(&"--serial") {
        cmd.args(["--serial", "null"]);
    }
    cmd.args(extra).arg("--tls").arg(pki.join("b"));
    let mut standby = RunningVm::spawn(cmd);
    let addr = standby.bound_address("standing by on ", DEADLINE);
    (standby, addr, pki)
}

/// A standby proves at pairing that it can run the guest: one whose host does not offer a CPU
/// feature the guest sees (kept off here with `--cpu-features`, as an operator matching a cluster's
/// hosts would) refuses the guest before anything is built, let alone claimed, and says which; the
/// primary goes on unprotected. (It used to accept, and fail only when taking over.)
#[test]
fn a_standby_whose_cpu_cannot_run_the_guest_refuses_it_at_pairing() {
    let _serial = one_at_a_time();
    let dir = std::env::temp_dir().join(format!("ftvmm-replication-cpu-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (mut standby, addr, pki) = loopback_standby_with(&dir, &["--cpu-features=-sse2"]);
    let mut primary = loopback_primary("mode=spin", &addr, &pki, &dir.join("a.sock"));
    assert_eq!(standby.wait_exit(DEADLINE), Some(1), "{}", standby.stderr());
    assert!(
        standby
            .stderr()
            .contains("this host cannot run the guest's CPU: the guest sees sse2"),
        "{}",
        standby.stderr()
    );
    primary.wait_for_stderr("protection lost", DEADLINE);
    assert!(
        primary.stderr().contains("the guest sees sse2"),
        "{}",
        primary.stderr()
    );
    let info = integration_tests::run_ftvmm(
        &[
            "vm",
            "--api-socket",
            dir.join("a.sock").to_str().unwrap(),
            "info",
        ],
        DEADLINE,
    );
    assert!(info.stdout.contains("\"running\""), "{info:?}");
    primary.kill();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_standby_refuses_checkpoints_out_of_order_or_outside_guest_memory() {
    let _serial = one_at_a_time();
    use replication::wire::{write_frame, EncodedPage, Message, PageEncoding};
    let description = integration_tests::small_guest_description();
    let page = |gpa: u64, encoding: PageEncoding| EncodedPage { gpa, encoding };
    let cases: [(&str, Message, &str); 4] = [
        (
            "out of order",
            Message::EpochPages {
                epoch: 5,
                pages: vec![],
            },
            "pages of checkpoint 5 where 0 was due",
        ),
        (
            "outside memory",
            Message::EpochPages {
                epoch: 0,
                pages: vec![page(1 << 40, PageEncoding::Whole(vec![1; 4096]))],
            },
            "not a whole page of guest memory",
        ),
        (
            "torn page",
            Message::EpochPages {
                epoch: 0,
                pages: vec![page(0x10_0000, PageEncoding::Whole(vec![1; 100]))],
            },
            "100 bytes where a whole page was due",
        ),
        (
            "a delta against another base",
            Message::EpochPages {
                epoch: 0,
                pages: vec![page(
                    0x10_0000,
                    PageEncoding::Delta {
                        base_crc: 0x1234_5678,
                        changes: vec![0, 1, 7],
                    },
                )],
            },
            "a delta made against a copy (CRC32C 0x12345678) this standby does not hold",
        ),
    ];
    for (name, message, expected) in cases {
        let dir = std::env::temp_dir().join(format!(
            "ftvmm-replication-order-{}-{}",
            std::process::id(),
            name.replace(' ', "-")
        ));
        let (mut standby, addr, pki) = loopback_standby(&dir);
        let mut link = open_as_primary(&addr, &pki, &description);
        write_frame(&mut link, &message).unwrap();
        assert_eq!(standby.wait_exit(DEADLINE), Some(1), "{name}");
        let err = standby.stderr();
        assert!(err.contains(expected), "{name}: {err}");
        assert!(err.contains("not resumed here"), "{name}: {err}");
        assert!(!err.contains("taking over"), "{name}: {err}");
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// With a witness, a standby follows only the copy whose claim the witness holds: a primary that
/// names another claim (holder or generation: a stale or second copy of the guest), or none, is
/// refused before anything is synced; and a standby without a witness refuses a primary under one.
#[test]
fn a_standby_follows_only_the_primary_whose_claim_the_witness_holds() {
    let _serial = one_at_a_time();
    use replication::wire::{read_frame, write_frame, Message};
    use replication::witness::{ClaimState, Witness};
    let etcd = TestEtcd::start_local();
    let witness = Witness::new(etcd.url(), "claim-check").unwrap();
    let held = witness.create(0x1111, ClaimState::Protected).unwrap();
    let generation = held.claim.generation;
    let description = integration_tests::small_guest_description();
    let with_witness = ["--witness", etcd.url(), "--guest-name", "claim-check"];
    let cases: [(&str, &[&str], Message, &str); 4] = [
        (
            "another holder",
            &with_witness,
            Message::ClaimHeld {
                holder: 0x2222,
                generation,
            },
            "does not hold the primary's claim (holder 0x2222",
        ),
        (
            "an older generation",
            &with_witness,
            Message::ClaimHeld {
                holder: 0x1111,
                generation: generation - 1,
            },
            "does not hold the primary's claim",
        ),
        (
            "no claim",
            &with_witness,
            Message::ProtectDisks { sizes: vec![] },
            "the primary protects without one",
        ),
        (
            "no witness here",
            &[],
            Message::ClaimHeld {
                holder: 0x1111,
                generation,
            },
            "this standby has no witness",
        ),
    ];
    for (name, args, message, expected) in cases {
        let dir = std::env::temp_dir().join(format!(
            "ftvmm-replication-claim-{}-{}",
            std::process::id(),
            name.replace(' ', "-")
        ));
        let (mut standby, addr, pki) = loopback_standby_with(&dir, args);
        let mut link = open_as_primary(&addr, &pki, &description);
        let standing: Message = read_frame(&mut link).unwrap();
        assert_eq!(standing.name(), "Standing", "{name}");
        write_frame(&mut link, &message).unwrap();
        assert_eq!(standby.wait_exit(DEADLINE), Some(1), "{name}");
        let err = standby.stderr();
        assert!(err.contains(expected), "{name}: {err}");
        assert!(!err.contains("taking over"), "{name}: {err}");
        let _ = std::fs::remove_dir_all(dir);
    }
    // The witness still holds the real primary's claim, untouched.
    assert_eq!(witness.read().unwrap().unwrap().claim, held.claim);
}

/// `--epoch-ms auto:MIN-MAX`: the epoch loop picks its epoch within the bounds (the status says
/// which) and protection holds: the standby takes over a killed primary.
#[test]
fn an_adaptive_epoch_stays_within_its_bounds_and_protects() {
    let _serial = one_at_a_time();
    let dir = std::env::temp_dir().join(format!("ftvmm-replication-auto-{}", std::process::id()));
    let (mut standby, addr, pki) = loopback_standby(&dir);
    let api = dir.join("a.sock");
    let mut cmd = std::process::Command::new(ftvmm_bin());
    cmd.env("FTVMM_LOG", "replication=info")
        .args(["run", "--kernel", testguest().to_str().unwrap()])
        .args([
            "--memory",
            "64",
            "--cmdline",
            "mode=spin dirty=2000 dirty_mb=8",
        ])
        .args(["--standby", &addr, "--epoch-ms", "auto:15-40", "--tls"])
        .arg(pki.join("a"))
        .arg("--api-socket")
        .arg(&api);
    let mut primary = RunningVm::spawn(cmd);
    primary.wait_for_stderr("guest protected by", DEADLINE);
    let t0 = Instant::now();
    let mut epochs_seen = Vec::new();
    while epochs_seen.len() < 20 {
        assert!(t0.elapsed() < DEADLINE, "no epochs committed");
        let out = integration_tests::run_ftvmm(
            &["vm", "--api-socket", api.to_str().unwrap(), "protection"],
            DEADLINE,
        );
        let s: serde_json::Value = serde_json::from_str(&out.stdout).expect("protection status");
        assert_eq!(s["state"], "protected", "{s}");
        epochs_seen.push(s["epoch_ms"].as_f64().expect("epoch_ms"));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        epochs_seen.iter().all(|e| (15.0..=40.0).contains(e)),
        "{epochs_seen:?}"
    );
    primary.kill();
    standby.wait_for_stderr("taking over from checkpoint", DEADLINE);
    standby.kill();
    let _ = std::fs::remove_dir_all(dir);
}

/// A primary on loopback protecting the test guest with `cmdline` to `standby` (TLS identity `a`).
fn loopback_primary(
    cmdline: &str,
    standby: &str,
    pki: &std::path::Path,
    api: &std::path::Path,
) -> RunningVm {
    loopback_primary_with(cmdline, standby, pki, api, &[])
}

/// As [`loopback_primary`], with more arguments.
fn loopback_primary_with(
    cmdline: &str,
    standby: &str,
    pki: &std::path::Path,
    api: &std::path::Path,
    extra: &[&str],
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
        .arg(api)
        .args(extra);
    RunningVm::spawn(cmd)
}

/// Checkpoints copy their pages after the vCPUs resumed, each chunk write-protected until copied
/// (`replication/src/protection/copy_on_write.rs`). The guest keeps rewriting the pages being
/// copied; its status counts the writes that had to wait. After a failover the standby's guest goes
/// on from one consistent image: the test guest's dirtier checks every page's write count as it
/// comes back to it, so a page copied after a later write (or missed) would print a FAIL.
#[test]
fn a_failover_resumes_one_consistent_image_with_pages_copied_on_write() {
    let _serial = one_at_a_time();
    let dir = std::env::temp_dir().join(format!("ftvmm-replication-cow-{}", std::process::id()));
    let (mut standby, addr, pki) = loopback_standby_with(&dir, &["--serial", "stdout"]);
    let api = dir.join("a.sock");
    let mut primary = loopback_primary(
        "mode=spin dirty=20000 dirty_mb=16 seconds=12",
        &addr,
        &pki,
        &api,
    );
    primary.wait_for_stderr("guest protected by", DEADLINE);
    let t0 = Instant::now();
    let mut write_faults = 0;
    let mut epochs = std::collections::BTreeSet::new();
    while write_faults == 0 || epochs.len() < 20 {
        assert!(
            t0.elapsed() < Duration::from_secs(8),
            "no guest write waited for its page's copy in {} epochs",
            epochs.len()
        );
        let out = integration_tests::run_ftvmm(
            &["vm", "--api-socket", api.to_str().unwrap(), "protection"],
            DEADLINE,
        );
        let s: serde_json::Value = serde_json::from_str(&out.stdout).expect("protection status");
        assert_eq!(s["state"], "protected", "{s}");
        if epochs.insert(s["committed_epoch"].as_u64().unwrap_or(0)) {
            write_faults += s["last_write_faults"].as_u64().expect("last_write_faults");
        }
        std::thread::sleep(Duration::from_millis(30));
    }
    primary.kill();
    standby.wait_for_stderr("taking over from checkpoint", DEADLINE);
    standby.wait_for("testguest: spun seconds=12", DEADLINE);
    let (before, after) = (primary.output(), standby.output());
    assert!(!before.contains("FAIL"), "primary:\n{before}");
    assert!(!after.contains("FAIL"), "standby:\n{after}");
    standby.kill();
    let _ = std::fs::remove_dir_all(dir);
}

/// 200 connections that never finish their handshake (20 addresses, 10 each, a byte every half
/// second) do not keep a real primary from its standby: the standby carries every handshake at once,
/// each within its own deadline, so the primary is protected while all 200 are still connected.
/// (A standby that took its connections one at a time, a read timeout each, never got past the
/// first.)
#[test]
fn dribbling_connections_do_not_hold_a_standby_from_its_primary() {
    let _serial = one_at_a_time();
    let dir =
        std::env::temp_dir().join(format!("ftvmm-replication-dribble-{}", std::process::id()));
    let (mut standby, addr, pki) = loopback_standby(&dir);
    let dribblers = integration_tests::abuse::Dribblers::start(&addr, 20, 10);
    let api = dir.join("a.sock");
    let mut primary = loopback_primary("mode=spin seconds=30", &addr, &pki, &api);
    primary.wait_for_stderr("guest protected by", DEADLINE);
    assert_eq!(
        dribblers.closed(),
        0,
        "the standby closed handshakes before the primary's got through: {}",
        standby.stderr()
    );
    drop(dribblers);
    primary.kill();
    standby.kill();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_guest_that_powers_off_while_protected_ends_its_standby_without_resuming() {
    let _serial = one_at_a_time();
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
    let _serial = one_at_a_time();
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
    let epoch_at_pause = s["committed_epoch"].as_u64().unwrap();

    // A user's pause survives the epochs (each checkpoint pauses and resumes only what it paused).
    let pause = integration_tests::run_ftvmm(&["vm", "--api-socket", api, "pause"], DEADLINE);
    assert_eq!(pause.code(), Some(0), "{pause:?}");
    let t0 = Instant::now();
    loop {
        let status =
            integration_tests::run_ftvmm(&["vm", "--api-socket", api, "protection"], DEADLINE);
        let s: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
        if s["committed_epoch"].as_u64().unwrap() > epoch_at_pause + 5 {
            break;
        }
        assert!(t0.elapsed() < DEADLINE, "no epochs while paused: {s}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let info = integration_tests::run_ftvmm(&["vm", "--api-socket", api, "info"], DEADLINE);
    assert!(info.stdout.contains("\"paused\""), "{info:?}");
    let resume = integration_tests::run_ftvmm(&["vm", "--api-socket", api, "resume"], DEADLINE);
    assert_eq!(resume.code(), Some(0), "{resume:?}");

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

/// A cut replication link (the standby's host partitioned): the primary counts its standby lost
/// after the standby's failure timeout, tells it goodbye on the control channel (queued there until
/// the link heals) and goes on unprotected (degraded), the client with it; the standby never takes
/// over on the silence, and when the link heals it reads the goodbye before the channel's close and
/// ends without resuming the guest: one active copy throughout.
#[test]
fn a_cut_replication_link_leaves_exactly_one_active_copy() {
    let _serial = one_at_a_time();
    let mut pair = ProtectedPair::start("partition", 500);
    pair.wait_acknowledged(10, "before the partition");
    set_standby_host_link(&pair, false);
    let cut_at = pair.acknowledged();
    pair.wait_acknowledged(cut_at + 10, "on the primary after the partition");
    wait_protection_state(&pair.api, "degraded", "after losing the standby");
    assert!(
        pair.primary
            .stderr()
            .contains("said goodbye on the control channel"),
        "{}",
        pair.primary.stderr()
    );
    // The standby notices the silence about when the primary counts it lost, not necessarily
    // before.
    pair.standby
        .wait_for_stderr("the primary is silent", DEADLINE);
    let err = pair.standby.stderr();
    assert!(!err.contains("taking over"), "{err}");

    set_standby_host_link(&pair, true);
    pair.assert_standby_ends_without_takeover(0, "the guest goes on at the primary, unprotected");
    assert_standby_never_sent(&pair);
    let healed_at = pair.acknowledged();
    pair.wait_acknowledged(healed_at + 10, "on the primary after the link healed");
    pair.finish();
}

/// Stops `pair`'s primary: the standby takes over with the witness's agreement, the client goes
/// on against it, and the woken old primary fences itself.
fn hang_primary_and_expect_the_witness_to_hand_over(mut pair: ProtectedPair) {
    signal(&pair.primary, "-STOP");
    let stopped_at = pair.acknowledged();
    pair.standby
        .wait_for_stderr("taking over from checkpoint", DEADLINE);
    assert!(
        pair.standby
            .stderr()
            .contains("the witness gives this standby the guest"),
        "{}",
        pair.standby.stderr()
    );
    pair.wait_acknowledged(stopped_at + 10, "on the standby");
    wake_old_primary_and_expect_it_fenced(&mut pair);
    pair.finish();
}

/// With a witness, a hung primary is taken over once it is silent, the client goes on against the
/// standby, and when the old primary wakes it finds the witness gave the guest away: it fences
/// itself (exit 5) and puts no further frame on its TAP.
#[test]
fn with_a_witness_a_hung_primary_is_taken_over_and_fenced_when_it_wakes() {
    let _serial = one_at_a_time();
    let pair = ProtectedPair::start_with("witness-hang", 500, true);
    pair.wait_acknowledged(10, "before the hang");
    hang_primary_and_expect_the_witness_to_hand_over(pair);
}

/// The witness is a three-member etcd cluster and the first member the copies are given is down:
/// they claim, protect and take over through the others as they would through one (a single
/// endpoint used to make one member down a witness outage).
#[test]
fn the_witness_works_with_one_of_three_etcd_members_down() {
    let _serial = one_at_a_time();
    let mut pair = ProtectedPair::start_opts(
        "witness-members",
        integration_tests::protected_pair::PairOptions {
            witness: true,
            witness_members: 3,
            ..integration_tests::protected_pair::PairOptions::new(500)
        },
    );
    pair.wait_acknowledged(10, "at first");
    pair._etcd.as_mut().unwrap().kill_member(0);
    let now = pair.acknowledged();
    pair.wait_acknowledged(now + 10, "with one etcd member down");
    hang_primary_and_expect_the_witness_to_hand_over(pair);
}

/// With a witness, a partitioned standby host cannot take over: the primary (which still reaches the
/// witness) swaps its claim for `unprotected` and goes on with the client; when the standby's host
/// comes back, its own swap fails and it ends without resuming.
#[test]
fn with_a_witness_a_partitioned_standby_never_takes_over() {
    let _serial = one_at_a_time();
    let mut pair = ProtectedPair::start_with("witness-partition", 500, true);
    pair.wait_acknowledged(10, "before the partition");
    set_standby_host_link(&pair, false);
    let cut_at = pair.acknowledged();
    pair.wait_acknowledged(cut_at + 10, "on the primary after the partition");
    wait_protection_state(&pair.api, "degraded", "after losing the standby");
    assert!(
        pair.primary
            .stderr()
            .contains("the witness says this copy goes on, unprotected"),
        "{}",
        pair.primary.stderr()
    );
    set_standby_host_link(&pair, true);
    assert_eq!(
        pair.standby.wait_exit(DEADLINE),
        Some(1),
        "{}",
        pair.standby.stderr()
    );
    let err = pair.standby.stderr();
    assert!(
        err.contains("the witness refused this standby the guest"),
        "{err}"
    );
    assert!(!err.contains("taking over"), "{err}");
    assert_standby_never_sent(&pair);
    let healed_at = pair.acknowledged();
    pair.wait_acknowledged(healed_at + 10, "on the primary after the link healed");
    pair.finish();
}

/// The whole life of a protected guest with a witness: its standby dies (the guest goes on,
/// degraded), a new standby re-protects it, the primary dies (the standby takes over), the survivor
/// is protected by a fresh standby on the other host, and dies in turn: the client's one
/// connection loses no acknowledged increment through all of it.
#[test]
fn a_guest_is_reprotected_after_losing_its_standby_and_after_a_failover() {
    let _serial = one_at_a_time();
    let mut pair = ProtectedPair::start_with("reprotect", 500, true);
    pair.wait_acknowledged(10, "at first");

    pair.standby.kill();
    wait_protection_state(&pair.api, "degraded", "after losing the standby");
    let now = pair.acknowledged();
    pair.wait_acknowledged(now + 10, "degraded, without a standby");

    let (standby, listen) = pair.new_standby(false);
    pair.standby = standby;
    protect(&pair.api, &listen, "re-protecting the primary");
    wait_protected(&pair.api, "re-protected primary");
    // The witness's claim went unprotected at boot (1), protected (2), unprotected (3), protected
    // again (4).
    assert_eq!(pair.protection()["generation"], 4);
    let now = pair.acknowledged();
    pair.wait_acknowledged(now + 10, "re-protected");

    pair.primary.kill();
    pair.standby
        .wait_for_stderr("taking over from checkpoint", DEADLINE);
    let now = pair.acknowledged();
    pair.wait_acknowledged(now + 10, "after the first failover");

    // The survivor (on B) is protected by a fresh standby on A, then dies too.
    let survivor_api = pair.reprotect_survivor(true, "the first survivor");
    wait_protected(&survivor_api, "re-protected survivor");
    let now = pair.acknowledged();
    pair.wait_acknowledged(now + 10, "survivor re-protected");
    pair.primary.kill();
    pair.standby
        .wait_for_stderr("taking over from checkpoint", DEADLINE);
    let now = pair.acknowledged();
    pair.wait_acknowledged(now + 10, "after the second failover");
    pair.finish();
}

/// Twenty failovers at random points (mid-epoch, mid-transfer, right after an acknowledgement), each
/// survivor re-protected by a fresh standby on the other host before it is killed in turn, with a
/// witness: the client's one connection (INCR and SET) loses no acknowledged write.
#[test]
fn twenty_random_primary_kills_lose_no_acknowledged_write() {
    let _serial = one_at_a_time();
    let mut pair = ProtectedPair::start_with("kills", 500, true);
    let mut kill_points = KillPoints::from_clock();
    let mut primary_on_a = true;
    let mut primary_api = pair.api.clone();
    for cycle in 0..20 {
        wait_protected(&primary_api, &format!("cycle {cycle}"));
        let now = pair.acknowledged();
        pair.wait_acknowledged(now + 3, &format!("cycle {cycle}: before the kill"));
        std::thread::sleep(kill_points.next_point());
        pair.primary.kill();
        pair.standby
            .wait_for_stderr("taking over from checkpoint", DEADLINE);
        let now = pair.acknowledged();
        pair.wait_acknowledged(now + 3, &format!("cycle {cycle}: after the failover"));
        // The survivor gets a fresh standby where the dead primary was, and becomes the primary.
        primary_api = pair.reprotect_survivor(primary_on_a, &format!("cycle {cycle}"));
        primary_on_a = !primary_on_a;
    }
    let last = pair.finish();
    eprintln!("20 failovers, {last} increments acknowledged, none lost");
}

/// A guest with a disk (its key-value store logged to virtio-blk) is protected: the standby's image,
/// junk at first, equals the primary's once the guest is paused and its writes committed; after a
/// failover, the survivor's image holds every acknowledged write: a fresh guest booted on it replays
/// the log and answers with the last acknowledged values.
#[test]
fn a_guest_with_a_disk_is_protected_and_its_writes_survive_failover() {
    let _serial = one_at_a_time();
    let mut pair = ProtectedPair::start_full("disk", 500, false, true);
    assert!(
        pair.primary.output().contains("kv restored keys=0"),
        "{}",
        pair.primary.output()
    );
    pair.wait_acknowledged(20, "with a disk");
    // The first copy went through the whole disk and all of the guest's 128 MiB.
    let sync = &pair.protection()["sync"];
    let total = (DISK_BYTES + (128 << 20)) as u64;
    assert_eq!(sync["total_bytes"].as_u64(), Some(total), "{sync}");
    assert_eq!(sync["done_bytes"].as_u64(), Some(total), "{sync}");

    // Paused, the guest writes nothing; two more commits carry everything it wrote.
    let api = pair.api.to_str().unwrap().to_string();
    let pause = integration_tests::run_ftvmm(&["vm", "--api-socket", &api, "pause"], DEADLINE);
    assert_eq!(pause.code(), Some(0), "{pause:?}");
    let epoch = pair.protection()["committed_epoch"].as_u64().unwrap();
    let t0 = Instant::now();
    while pair.protection()["committed_epoch"].as_u64().unwrap() < epoch + 3 {
        assert!(t0.elapsed() < DEADLINE);
        std::thread::sleep(Duration::from_millis(20));
    }
    let a = std::fs::read(pair.dir.join("disk-a.img")).unwrap();
    let b = std::fs::read(pair.dir.join("disk-b.img")).unwrap();
    assert!(a.iter().any(|&x| x != 0), "the guest wrote its log");
    assert!(a == b, "the standby's image differs from the primary's");
    let resume = integration_tests::run_ftvmm(&["vm", "--api-socket", &api, "resume"], DEADLINE);
    assert_eq!(resume.code(), Some(0), "{resume:?}");

    let now = pair.acknowledged();
    pair.wait_acknowledged(now + 10, "resumed");
    pair.primary.kill();
    pair.standby
        .wait_for_stderr("taking over from checkpoint", DEADLINE);
    let now = pair.acknowledged();
    pair.wait_acknowledged(now + 10, "after failover");
    let last = pair.stop_all();

    // The survivor's image (host B) replays to the last acknowledged values.
    let guest = pair.hosts.guest_ip();
    let mut cmd = pair.hosts.b.command(ftvmm_bin().to_str().unwrap());
    cmd.args(["run", "--kernel", testguest().to_str().unwrap()])
        .args(["--memory", "128", "--net", "tap=tap0"])
        .arg("--disk")
        .arg(format!("path={}", pair.dir.join("disk-b.img").display()))
        .args(["--cmdline", &format!("mode=net ip={guest}/24")]);
    let mut replayed = RunningVm::spawn(cmd);
    replayed.wait_for("testguest: net up", DEADLINE);
    assert!(
        replayed.output().contains("kv restored keys=2"),
        "{}",
        replayed.output()
    );
    let addr = format!("{guest}:4000");
    assert_eq!(
        kv_request(&pair.hosts.lan, addr.clone(), "GET counter"),
        format!("VALUE {last}")
    );
    assert_eq!(
        kv_request(&pair.hosts.lan, addr, "GET last"),
        format!("VALUE {last}")
    );
    replayed.kill();
    pair.finish();
}

/// Without a witness a silent primary is never taken over on its own; the standby's status says it
/// may be dead or cut off and running on, and a plain `vm failover` is refused for that reason; the
/// operator who knows it is dead forces it (`vm failover --force` on the standby's socket), and the
/// standby takes over; its socket then serves the VM's API.
#[test]
fn an_operator_fails_over_to_a_standby_whose_primary_fell_silent() {
    let _serial = one_at_a_time();
    let dir = std::env::temp_dir().join(format!("ftvmm-replication-forced-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let pki = tls_pki(&dir, &[("a", &["127.0.0.1"]), ("b", &["127.0.0.1"])]);
    let standby_api = dir.join("b.sock");
    let mut cmd = std::process::Command::new(ftvmm_bin());
    cmd.args(["standby", "--listen", "127.0.0.1:0", "--serial", "null"])
        .args(["--failure-timeout-ms", "300"])
        .arg("--api-socket")
        .arg(&standby_api)
        .arg("--tls")
        .arg(pki.join("b"));
    let mut standby = RunningVm::spawn(cmd);
    let addr = standby.bound_address("standing by on ", DEADLINE);
    let mut primary = loopback_primary("mode=spin", &addr, &pki, &dir.join("a.sock"));
    primary.wait_for_stderr("guest protected by", DEADLINE);
    let api = standby_api.to_str().unwrap();
    let status = |what: &str| -> serde_json::Value {
        let out = integration_tests::run_ftvmm(&["vm", "--api-socket", api, "standby"], DEADLINE);
        assert_eq!(out.code(), Some(0), "{what}: {out:?}");
        serde_json::from_str(&out.stdout).unwrap()
    };
    let t0 = Instant::now();
    while status("following")["committed_epoch"].is_null() {
        assert!(t0.elapsed() < DEADLINE);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(status("following")["primary_alive"], true);

    signal(&primary, "-STOP");
    let t0 = Instant::now();
    while status("silent")["primary_alive"] == true {
        assert!(t0.elapsed() < DEADLINE);
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !standby.stderr().contains("taking over"),
        "{}",
        standby.stderr()
    );

    // A silent primary may be cut off and running on: the standby says so, and refuses a failover
    // that is not forced.
    let silent = status("silent");
    assert_eq!(silent["primary_may_be_running"], true, "{silent}");
    assert_eq!(silent["control_channel"], "open", "{silent}");
    assert!(
        silent["note"]
            .as_str()
            .unwrap()
            .contains("may have died silently, or be cut off"),
        "{silent}"
    );
    let refused = integration_tests::run_ftvmm(&["vm", "--api-socket", api, "failover"], DEADLINE);
    assert_ne!(refused.code(), Some(0), "{refused:?}");
    assert!(
        refused
            .stderr
            .contains("would run a second copy of the guest"),
        "{refused:?}"
    );
    assert!(!standby.stderr().contains("taking over"));
    let failover = integration_tests::run_ftvmm(
        &["vm", "--api-socket", api, "failover", "--force"],
        DEADLINE,
    );
    assert_eq!(failover.code(), Some(0), "{failover:?}");
    standby.wait_for_stderr("taking over from checkpoint", DEADLINE);
    assert!(
        standby.stderr().contains("failover forced by the operator"),
        "{}",
        standby.stderr()
    );
    let t0 = Instant::now();
    loop {
        let info = integration_tests::run_ftvmm(&["vm", "--api-socket", api, "info"], DEADLINE);
        if info.stdout.contains("\"running\"") {
            break;
        }
        assert!(t0.elapsed() < DEADLINE, "the survivor's API: {info:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &primary.pid().to_string()])
        .status();
    primary.kill();
    standby.kill();
    let _ = std::fs::remove_dir_all(dir);
}

/// The peak resident memory of process `pid` (VmHWM), in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status")
}

/// A protected guest's hostile write request — 1 GiB in 254 segments that all name one 4 MiB
/// buffer, through a queue that negotiated no segment limits, on a 1.1 GiB disk — fails with an
/// I/O error, and the primary's peak memory does not grow by it (the request used to be copied
/// whole for the standby: 1 GiB more).
#[test]
fn a_protected_guests_huge_write_request_does_not_grow_the_vmm() {
    let _serial = one_at_a_time();
    let dir = std::env::temp_dir().join(format!("ftvmm-replication-huge-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let image = |name: &str| {
        let path = dir.join(name);
        std::fs::File::create(&path)
            .unwrap()
            .set_len(1100 << 20)
            .unwrap();
        format!("path={}", path.display())
    };
    let (a, b) = (image("a.img"), image("b.img"));
    let (mut standby, addr, pki) = loopback_standby_with(&dir, &["--disk", &b]);
    let mut primary = loopback_primary_with(
        "mode=blk blk=huge-write wait_ms=15000 every_ms=300 times=400",
        &addr,
        &pki,
        &dir.join("a.sock"),
        &["--disk", &a, "--serial", "stdout"],
    );
    primary.wait_for_stderr("guest protected by", DEADLINE);
    // Writes are recorded with their data only once protected (before, during the disk's first
    // copy, they went to the image in place): the peak from here on is what recording costs.
    let before = peak_rss_kib(primary.pid());
    let seen = primary.output().matches("blk huge-write status=").count();
    let deadline = Instant::now() + DEADLINE;
    while primary.output().matches("blk huge-write status=").count() < seen + 3 {
        assert!(Instant::now() < deadline, "{}", primary.output());
        std::thread::sleep(Duration::from_millis(20));
    }
    let after = peak_rss_kib(primary.pid());
    let out = primary.output();
    assert!(
        after < before + 16 * 1024,
        "the primary's peak memory grew from {before} KiB to {after} KiB over three 1 GiB requests \
         once protected"
    );
    assert!(
        out.contains("blk huge-write status=1 bytes=1073"),
        "the request was not refused: {out}"
    );
    primary.kill();
    standby.kill();
    let _ = std::fs::remove_dir_all(dir);
}
