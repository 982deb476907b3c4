//! Snapshot and restore across processes, and the control API's errors.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use integration_tests::netns::NetNs;
use integration_tests::{ftvmm_bin, run_ftvmm, testguest, RunningVm};

const DEADLINE: Duration = Duration::from_secs(180);

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ftvmm-snapshot-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn kv(ns: &NetNs, commands: &'static [&'static str]) -> Vec<String> {
    let addr = format!("{}:4000", ns.guest_ip());
    ns.run(move || {
        let s =
            TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(20)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut r = BufReader::new(s);
        commands
            .iter()
            .map(|c| {
                r.get_mut().write_all(format!("{c}\n").as_bytes()).unwrap();
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                line.trim_end().to_string()
            })
            .collect()
    })
}

fn ftvmm_in(ns: &NetNs, args: &[&str]) -> RunningVm {
    let mut cmd = ns.command(ftvmm_bin().to_str().unwrap());
    cmd.args(args);
    RunningVm::spawn(cmd)
}

/// The net test guest with a disk, in `ns`, optionally serving its API on `sock`.
fn net_guest(ns: &NetNs, disk_arg: &str, cmdline: &str, sock: Option<&Path>) -> RunningVm {
    let guest = testguest();
    let mut args = vec![
        "run",
        "--kernel",
        guest.to_str().unwrap(),
        "--memory",
        "128",
        "--net",
        "tap=tap0",
    ];
    args.extend_from_slice(&["--disk", disk_arg, "--cmdline", cmdline]);
    if let Some(sock) = sock {
        args.extend_from_slice(&["--api-socket", sock.to_str().unwrap()]);
    }
    ftvmm_in(ns, &args)
}

/// `ftvmm restore` of the snapshot in `dir`, in `ns`, serving its API on `sock`.
fn restore_in(ns: &NetNs, dir: &Path, sock: &Path) -> RunningVm {
    ftvmm_in(
        ns,
        &[
            "restore",
            "--dir",
            dir.to_str().unwrap(),
            "--api-socket",
            sock.to_str().unwrap(),
        ],
    )
}

fn vm_cli(socket: &Path, args: &[&str]) -> integration_tests::RunOutput {
    let mut full = vec!["vm", "--api-socket", socket.to_str().unwrap()];
    full.extend_from_slice(args);
    run_ftvmm(&full, DEADLINE)
}

#[test]
fn net_guest_snapshot_restores_in_a_new_process_with_kv_state_and_disk_log() {
    let ns = NetNs::with_tap().expect("netns");
    let dir = scratch_dir("kv");
    let disk = dir.join("kv.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let sock = dir.join("vm.sock");
    let snap = dir.join("snap");
    let cmdline = format!("mode=net ip={}/24", ns.guest_ip());
    let disk_arg = format!("path={}", disk.display());
    let mut vm = net_guest(&ns, &disk_arg, &cmdline, Some(&sock));
    vm.wait_for("testguest: net up", DEADLINE);
    assert_eq!(
        kv(&ns, &["SET color green", "INCR n", "INCR n"]),
        ["OK", "1", "2"]
    );

    let out = vm_cli(&sock, &["snapshot", "--dir", snap.to_str().unwrap()]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(out.stdout.contains("\"memory_bytes\""), "{out:?}");
    // The VM keeps running after the snapshot...
    assert_eq!(kv(&ns, &["GET n"]), ["VALUE 2"]);
    // ...and a diff snapshot on top holds only what changed since.
    assert_eq!(kv(&ns, &["SET later yes"]), ["OK"]);
    let diff = dir.join("diff");
    let out = vm_cli(
        &sock,
        &["snapshot", "--dir", diff.to_str().unwrap(), "--diff"],
    );
    assert_eq!(out.code(), Some(0), "{out:?}");
    let full_bytes = std::fs::metadata(snap.join("memory")).unwrap().len();
    let diff_on_disk = std::process::Command::new("du")
        .args(["-k"])
        .arg(diff.join("memory"))
        .output()
        .unwrap();
    let diff_kib: u64 = String::from_utf8_lossy(&diff_on_disk.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        diff_kib * 1024 < full_bytes / 8,
        "diff snapshot holds {diff_kib} KiB of a {full_bytes}-byte guest"
    );
    assert_eq!(kv(&ns, &["INCR n"]), ["3"]);
    vm.kill();

    // The diff snapshot restores to the state at its time (base memory + its pages).
    let sock_d = dir.join("vmd.sock");
    let mut from_diff = restore_in(&ns, &diff, &sock_d);
    assert_eq!(kv(&ns, &["GET later", "GET n"]), ["VALUE yes", "VALUE 2"]);
    from_diff.kill();

    // ...and a new process continues from the snapshot, with the guest's memory state intact.
    let sock2 = dir.join("vm2.sock");
    let mut restored = restore_in(&ns, &snap, &sock2);
    assert_eq!(
        kv(&ns, &["GET color", "INCR n", "GET n"]),
        ["VALUE green", "3", "VALUE 3"]
    );
    let info = vm_cli(&sock2, &["info"]);
    assert!(info.stdout.contains("\"running\""), "{info:?}");
    restored.kill();

    // The disk log is intact too: a fresh boot on the same disk replays it.
    let mut fresh = net_guest(&ns, &disk_arg, &cmdline, None);
    fresh.wait_for("testguest: kv restored keys=2", DEADLINE);
    assert_eq!(kv(&ns, &["GET n"]), ["VALUE 3"]);
}

/// `ftvmm restore` of `snap`, which must refuse it (exit status 1); returns its output.
fn restore_refused(snap: &Path) -> integration_tests::RunOutput {
    let out = run_ftvmm(
        &[
            "restore",
            "--dir",
            snap.to_str().unwrap(),
            "--serial",
            "null",
        ],
        DEADLINE,
    );
    assert_eq!(out.code(), Some(1), "{out:?}");
    out
}

fn snapshot_of_spinning_guest(dir: &Path) -> PathBuf {
    let sock = dir.join("spin.sock");
    let mut cmd = std::process::Command::new(ftvmm_bin());
    cmd.args([
        "run",
        "--kernel",
        testguest().to_str().unwrap(),
        "--memory",
        "64",
        "--vcpus",
        "2",
        "--cmdline",
        "mode=spin",
        "--api-socket",
        sock.to_str().unwrap(),
    ]);
    let mut vm = RunningVm::spawn(cmd);
    vm.wait_for("testguest: spinning cpus=2", DEADLINE);
    let snap = dir.join("snap");
    let out = vm_cli(&sock, &["snapshot", "--dir", snap.to_str().unwrap()]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    snap
}

#[test]
fn corrupted_or_truncated_snapshots_are_refused() {
    let dir = scratch_dir("corrupt");
    let snap = snapshot_of_spinning_guest(&dir);
    let state = snap.join("state");
    let good = std::fs::read(&state).unwrap();

    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x55;
    std::fs::write(&state, &bad).unwrap();
    let out = restore_refused(&snap);
    assert!(out.stderr.contains("checksum mismatch"), "{out:?}");

    std::fs::write(&state, &good[..good.len() - 100]).unwrap();
    let out = restore_refused(&snap);
    assert!(out.stderr.contains("truncated"), "{out:?}");

    std::fs::write(&state, &good).unwrap();
    let mem = snap.join("memory");
    let f = std::fs::OpenOptions::new().write(true).open(&mem).unwrap();
    f.set_len(4096).unwrap();
    let out = restore_refused(&snap);
    assert!(out.stderr.contains("memory file"), "{out:?}");
    assert!(!out.stderr.contains("panicked"), "{out:?}");
}

/// Raw HTTP to the API socket: (status, body).
fn http(sock: &Path, request: &str) -> (u16, String) {
    let mut s = UnixStream::connect(sock).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

/// `ftvmm run` of a 64 MiB spinning test guest serving its API on `sock`, with `extra` arguments.
fn spinning_guest_with_api(sock: &Path, extra: &[&str]) -> std::process::Command {
    let mut cmd = std::process::Command::new(ftvmm_bin());
    cmd.args(["run", "--kernel", testguest().to_str().unwrap()])
        .args(["--memory", "64", "--cmdline", "mode=spin", "--api-socket"])
        .arg(sock)
        .args(extra);
    cmd
}

#[test]
fn api_reports_errors_as_json_with_meaningful_status() {
    let dir = scratch_dir("api");
    let sock = dir.join("api.sock");
    let mut vm = RunningVm::spawn(spinning_guest_with_api(&sock, &[]));
    vm.wait_for("testguest: spinning cpus=1", DEADLINE);

    let vcpus = vm_cli(&sock, &["vcpus"]);
    assert_eq!(vcpus.code(), Some(0), "{vcpus:?}");
    assert!(
        vcpus.stdout.contains("\"rip\"") && vcpus.stdout.contains("\"cpl\": 3"),
        "{vcpus:?}"
    );
    assert_eq!(vm_cli(&sock, &["pause"]).code(), Some(0));
    let again = vm_cli(&sock, &["pause"]);
    assert_eq!(again.code(), Some(1));
    assert!(
        again.stderr.contains("already paused (HTTP 409)"),
        "{again:?}"
    );
    assert_eq!(vm_cli(&sock, &["resume"]).code(), Some(0));

    let close = "Connection: close\r\nHost: x\r\n";
    let (status, body) = http(&sock, &format!("GET /api/v1/nope HTTP/1.1\r\n{close}\r\n"));
    assert_eq!(status, 404);
    assert!(body.contains("\"error\""), "{body}");
    let bad = "{\"dir\": 5}";
    let (status, body) = http(
        &sock,
        &format!("PUT /api/v1/vm/snapshot HTTP/1.1\r\n{close}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{bad}", bad.len()),
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("invalid request body"), "{body}");
    // A misspelt field is refused by name, not ignored (it would have taken a full snapshot).
    let typo = format!(
        "{{\"dir\": \"{}\", \"dif\": true}}",
        dir.join("typo").display()
    );
    let (status, body) = http(
        &sock,
        &format!("PUT /api/v1/vm/snapshot HTTP/1.1\r\n{close}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{typo}", typo.len()),
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("unknown field `dif`"), "{body}");
    assert!(!dir.join("typo").exists(), "a snapshot was taken anyway");

    // The socket is the owner's alone, and a second VM cannot take its path over.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let second = run_ftvmm(
        &[
            "run",
            "--kernel",
            testguest().to_str().unwrap(),
            "--memory",
            "64",
            "--cmdline",
            "mode=hello",
            "--api-socket",
            sock.to_str().unwrap(),
        ],
        DEADLINE,
    );
    assert_eq!(second.code(), Some(1), "{second:?}");
    assert!(
        second.stderr.contains("served by another running process"),
        "{second:?}"
    );
    assert_eq!(
        vm_cli(&sock, &["info"]).code(),
        Some(0),
        "the first VM lost its socket"
    );
    let (status, body) = http(
        &sock,
        &format!("GET /api/v1/openapi.json HTTP/1.1\r\n{close}\r\n"),
    );
    assert_eq!(status, 200);
    assert!(body.contains("/api/v1/vm/snapshot"), "{body}");

    // A snapshot into a path that cannot be a directory fails cleanly and the VM keeps running.
    let file = dir.join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let out = vm_cli(
        &sock,
        &["snapshot", "--dir", file.join("sub").to_str().unwrap()],
    );
    assert_eq!(out.code(), Some(1), "{out:?}");

    // Snapshot files hold guest RAM: owner-only, in an owner-only directory.
    let snap = dir.join("private");
    assert_eq!(
        vm_cli(&sock, &["snapshot", "--dir", snap.to_str().unwrap()]).code(),
        Some(0)
    );
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&snap), 0o700);
    for entry in std::fs::read_dir(&snap).unwrap() {
        let p = entry.unwrap().path();
        assert_eq!(mode(&p), 0o600, "{}", p.display());
    }
    let info = vm_cli(&sock, &["info"]);
    assert!(info.stdout.contains("\"running\""), "{info:?}");

    // No socket: a clear error.
    let out = vm_cli(&dir.join("missing.sock"), &["info"]);
    assert_eq!(out.code(), Some(1));
    assert!(
        out.stderr.contains("cannot connect to the API socket"),
        "{out:?}"
    );
}

#[test]
fn api_socket_for_a_group_is_0660_and_that_groups() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = scratch_dir("api-group");
    let sock = dir.join("api.sock");
    let guest =
        |group: &str, sock: &Path| spinning_guest_with_api(sock, &["--api-socket-group", group]);
    // Debian's nogroup (65534), given by number so the test does not depend on its name.
    let mut vm = RunningVm::spawn(guest("65534", &sock));
    vm.wait_for("testguest: spinning cpus=1", DEADLINE);
    let meta = std::fs::metadata(&sock).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), 65534);
    assert_eq!(vm_cli(&sock, &["info"]).code(), Some(0));
    vm.kill();

    let out = run_ftvmm(
        &guest("no-such-group-ftvmm", &dir.join("other.sock"))
            .get_args()
            .map(|a| a.to_str().unwrap())
            .collect::<Vec<_>>(),
        DEADLINE,
    );
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(
        out.stderr
            .contains("API socket group \"no-such-group-ftvmm\": no such group"),
        "{out:?}"
    );
    assert!(!dir.join("other.sock").exists());
    let _ = std::fs::remove_dir_all(dir);
}
