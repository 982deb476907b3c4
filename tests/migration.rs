//! Live migration between two ftvmm processes on two "hosts" (network namespaces), with a client
//! that keeps one TCP connection open and keeps incrementing a counter; and the failure cases: a
//! destination that dies mid-migration, and a corrupted stream.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use integration_tests::netns::TwoHosts;
use integration_tests::{
    ftvmm_bin, run_ftvmm, small_guest_description, testguest, tls_pki, RunningVm,
};
use replication::link::{self, LinkSecurity};
use replication::wire::{read_frame, write_frame, Message};

const DEADLINE: Duration = Duration::from_secs(180);

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ftvmm-migration-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// TLS identities for the tests' two hosts: `a` (the source) and `b` (the destination, reachable on
/// loopback and, with `hosts`, at host B's address).
fn pki(dir: &Path, hosts: Option<&TwoHosts>) -> PathBuf {
    let b_ip = hosts.map(|h| h.b_ip());
    let mut b: Vec<&str> = vec!["127.0.0.1", "localhost"];
    if let Some(ip) = &b_ip {
        b.push(ip);
    }
    tls_pki(dir, &[("a", &["127.0.0.1"]), ("b", &b)])
}

/// `--tls` for host `name` of `pki`.
fn tls(pki: &Path, name: &str) -> [String; 2] {
    ["--tls".into(), pki.join(name).display().to_string()]
}

fn vm_cli(socket: &Path, args: &[&str]) -> integration_tests::RunOutput {
    let mut full = vec!["vm", "--api-socket", socket.to_str().unwrap()];
    full.extend_from_slice(args);
    run_ftvmm(&full, DEADLINE)
}

/// Starts the net guest (dirtying memory) on host A, with its disk `dir/kv.img` and the TLS identity
/// `a` of `dir/pki`.
fn source_vm(hosts: &TwoHosts, dir: &Path, dirty: u32) -> (RunningVm, PathBuf) {
    let disk = dir.join("kv.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let sock = dir.join("a.sock");
    let mut cmd = hosts.a.command(ftvmm_bin().to_str().unwrap());
    cmd.args([
        "run",
        "--kernel",
        testguest().to_str().unwrap(),
        "--memory",
        "256",
        "--net",
        "tap=tap0",
    ])
    .arg("--disk")
    .arg(format!("path={}", disk.display()))
    .args([
        "--cmdline",
        &format!(
            "mode=net ip={}/24 dirty={dirty} dirty_mb=32",
            hosts.guest_ip()
        ),
    ])
    .args(["--api-socket", sock.to_str().unwrap()])
    .args(tls(&dir.join("pki"), "a"));
    let mut vm = RunningVm::spawn(cmd);
    vm.wait_for("testguest: net up", DEADLINE);
    (vm, sock)
}

/// `ftvmm receive` on host B, listening on `listen`, ready: the source's disk (shared storage here)
/// and host B's TAP, with TLS identity `b` of `dir/pki`.
fn receiver(hosts: &TwoHosts, dir: &Path, listen: &str, sock: &Path) -> RunningVm {
    let mut cmd = hosts.b.command(ftvmm_bin().to_str().unwrap());
    cmd.args([
        "receive",
        "--listen",
        listen,
        "--api-socket",
        sock.to_str().unwrap(),
        "--net",
        "tap=tap0",
    ])
    .arg("--disk")
    .arg(format!("path={}", dir.join("kv.img").display()))
    .args(tls(&dir.join("pki"), "b"));
    let mut dst = RunningVm::spawn(cmd);
    dst.wait_for_stderr("waiting for a migration", DEADLINE);
    dst
}

/// A 256 MiB test guest in `mode=spin` (with `cmdline`'s workload) serving its API on `sock`, ready.
fn spinning_source(cmdline: &str, sock: &Path, extra: &[&str]) -> RunningVm {
    let mut cmd = std::process::Command::new(ftvmm_bin());
    cmd.args([
        "run",
        "--kernel",
        testguest().to_str().unwrap(),
        "--memory",
        "256",
    ])
    .args(["--cmdline", cmdline, "--api-socket", sock.to_str().unwrap()])
    .args(extra);
    let mut src = RunningVm::spawn(cmd);
    src.wait_for("testguest: spinning", DEADLINE);
    src
}

/// `ftvmm receive` on an ephemeral loopback port of this namespace; returns it and its address.
/// `extra` includes its link security (`--tls` or `--insecure-plain-tcp`).
fn loopback_receiver(extra: &[&str]) -> (RunningVm, String) {
    let mut cmd = std::process::Command::new(ftvmm_bin());
    cmd.args(["receive", "--listen", "127.0.0.1:0"]).args(extra);
    let mut dst = RunningVm::spawn(cmd);
    let addr = dst.bound_address("waiting for a migration on ", DEADLINE);
    (dst, addr)
}

/// A client in the LAN namespace incrementing the counter on one connection until `stop`.
fn incrementer(
    hosts: &TwoHosts,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Result<u64, String>> {
    integration_tests::clients::incrementer(
        hosts.lan.name(),
        format!("{}:4000", hosts.guest_ip()),
        stop,
        Arc::new(std::sync::atomic::AtomicU64::new(0)),
        Duration::from_secs(30),
    )
}

#[test]
fn net_guest_live_migrates_while_a_client_keeps_incrementing() {
    let hosts = TwoHosts::new().expect("two-host topology");
    let dir = scratch_dir("live");
    pki(&dir, Some(&hosts));
    let (mut src, sock_a) = source_vm(&hosts, &dir, 2000);
    let sock_b = dir.join("b.sock");
    let listen = format!("{}:7000", hosts.b_ip());
    let dst = receiver(&hosts, &dir, &listen, &sock_b);

    let stop = Arc::new(AtomicBool::new(false));
    let client = incrementer(&hosts, stop.clone());
    std::thread::sleep(Duration::from_secs(1));
    let out = vm_cli(
        &sock_a,
        &["migrate", "--to", &listen, "--downtime-ms", "50"],
    );
    assert_eq!(
        out.code(),
        Some(0),
        "{out:?}\nsource stderr:\n{}\ndestination stderr:\n{}",
        src.stderr(),
        dst.stderr()
    );
    assert!(out.stdout.contains("\"completed\""), "{out:?}");
    assert_eq!(
        src.wait_exit(DEADLINE),
        Some(0),
        "the source must stop after the hand-over"
    );
    assert!(src.stderr().contains("migrated to"), "{}", src.stderr());

    // The client keeps going against the guest on host B.
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::SeqCst);
    let last = client
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("client: {e}\ndestination:\n{}", dst.stderr()));
    assert!(last > 0);
    let info = vm_cli(&sock_b, &["info"]);
    assert!(info.stdout.contains("\"running\""), "{info:?}");
    assert!(
        dst.stderr().contains("guest received from"),
        "{}",
        dst.stderr()
    );
}

#[test]
fn a_destination_dying_mid_migration_leaves_the_source_running() {
    let hosts = TwoHosts::new().expect("two-host topology");
    let dir = scratch_dir("dies");
    let pki = pki(&dir, Some(&hosts));
    let (src, sock_a) = source_vm(&hosts, &dir, 5000);
    let stop = Arc::new(AtomicBool::new(false));
    let client = incrementer(&hosts, stop.clone());

    // A destination that takes the hello and some memory, then disappears.
    let listen = format!("{}:7001", hosts.b_ip());
    let l2 = listen.clone();
    let fake = hosts.b.run(move || link::bind(&l2).unwrap());
    let security = LinkSecurity::tls(&pki.join("b")).unwrap();
    let fake_dst = std::thread::spawn(move || {
        let mut s = link::accept_peer(&fake, &security, DEADLINE).unwrap().link;
        write_frame(&mut s, &Message::Ready).unwrap();
        for _ in 0..2 {
            let _ = read_frame::<_, Message>(&mut s);
        }
        // Dropped here: the connection breaks mid-migration.
    });
    let out = vm_cli(&sock_a, &["migrate", "--to", &listen]);
    fake_dst.join().unwrap();
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(
        out.stderr.contains("the guest keeps running here"),
        "{out:?}"
    );

    // A real destination killed while receiving.
    let sock_b = dir.join("b.sock");
    let listen = format!("{}:7002", hosts.b_ip());
    let mut dst = receiver(&hosts, &dir, &listen, &sock_b);
    let socket = sock_a.clone();
    let target = listen.clone();
    // A 1 ms downtime target keeps a dirtying guest in pre-copy long enough to kill the destination.
    let migrate = std::thread::spawn(move || {
        vm_cli(&socket, &["migrate", "--to", &target, "--downtime-ms", "1"])
    });
    let t0 = Instant::now();
    loop {
        let st = vm_cli(&sock_a, &["migration"]);
        if st.stdout.contains("\"pre_copy\"") && !st.stdout.contains("\"round\": 0") {
            break;
        }
        assert!(
            t0.elapsed() < DEADLINE,
            "migration never reached pre-copy: {st:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    dst.kill();
    let out = migrate.join().unwrap();
    assert_eq!(out.code(), Some(1), "{out:?}");

    // The source never stopped serving: the client saw every increment, and it still runs.
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    let last = client.join().unwrap().expect("client unaffected");
    assert!(last > 0);
    let info = vm_cli(&sock_a, &["info"]);
    assert!(info.stdout.contains("\"running\""), "{info:?}");
    let status = vm_cli(&sock_a, &["migration"]);
    assert!(status.stdout.contains("\"failed\""), "{status:?}");
    assert!(src.output().contains("net up"));
}

#[test]
fn a_destination_refuses_corrupted_or_truncated_streams() {
    let dir = scratch_dir("corrupt");
    let pki = pki(&dir, None);
    let b = tls(&pki, "b");
    let security = LinkSecurity::tls(&pki.join("a")).unwrap();
    for (name, corrupt) in [("bitflip", true), ("truncated", false)] {
        let (mut dst, listen) = loopback_receiver(&["--serial", "null", &b[0], &b[1]]);
        // An authenticated peer sending a damaged stream inside TLS.
        let mut s = link::connect(
            &link::PeerAddress::resolve(&listen).unwrap(),
            &security,
            DEADLINE,
            DEADLINE,
        )
        .unwrap();
        let description = small_guest_description();
        write_frame(&mut s, &Message::Hello { description }).unwrap();
        assert_eq!(
            read_frame::<_, Message>(&mut s).unwrap(),
            Message::Ready,
            "{name}"
        );
        let mut frame = Vec::new();
        write_frame(
            &mut frame,
            &Message::Pages {
                round: 0,
                runs: vec![replication::wire::PageRun {
                    gpa: 0x10_0000,
                    data: vec![0x5a; 4096],
                }],
            },
        )
        .unwrap();
        if corrupt {
            let mid = frame.len() / 2;
            frame[mid] ^= 0x01;
            s.write_all(&frame).unwrap();
            s.flush().unwrap();
        } else {
            s.write_all(&frame[..frame.len() / 2]).unwrap();
            s.close();
        }
        assert_eq!(dst.wait_exit(DEADLINE), Some(1), "{name}: {}", dst.stderr());
        let err = dst.stderr();
        let expected = if corrupt {
            "checksum mismatch"
        } else {
            "peer closed the connection"
        };
        assert!(err.contains(expected), "{name}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(!err.contains("guest received"), "{err}");
    }
}

#[test]
fn migration_with_the_dirty_ring_completes() {
    let dir = scratch_dir("ring");
    let pki = pki(&dir, None);
    let (a, b) = (tls(&pki, "a"), tls(&pki, "b"));
    let sock_a = dir.join("a.sock");
    let sock_b = dir.join("b.sock");
    let mut src = spinning_source(
        "mode=spin dirty=5000 dirty_mb=32",
        &sock_a,
        &["--vcpus", "2", "--dirty-ring", "4096", &a[0], &a[1]],
    );
    let (mut dst, listen) =
        loopback_receiver(&["--api-socket", sock_b.to_str().unwrap(), &b[0], &b[1]]);
    let out = vm_cli(&sock_a, &["migrate", "--to", &listen]);
    assert_eq!(out.code(), Some(0), "{out:?}\n{}", src.stderr());
    assert_eq!(src.wait_exit(DEADLINE), Some(0));
    // The guest carries on spinning in ring 3 on both vCPUs at the destination.
    let vcpus = vm_cli(&sock_b, &["vcpus"]);
    assert_eq!(vcpus.stdout.matches("\"cpl\": 3").count(), 2, "{vcpus:?}");
    dst.kill();
}

/// A peer named by host name (`localhost:PORT`), from a running guest's API: the name is resolved
/// before the replication thread sandboxes itself (resolving reads /etc/hosts, which the thread's
/// seccomp filter forbids: the guest used to be killed, "forbidden system call 257"). Protection
/// reaches `protected`, and a migration completes.
#[test]
fn a_running_guest_is_protected_and_migrated_to_peers_named_by_host_name() {
    let dir = scratch_dir("by-name");
    let pki = pki(&dir, None);
    let (a, b) = (tls(&pki, "a"), tls(&pki, "b"));
    let sock_a = dir.join("a.sock");
    let mut src = spinning_source("mode=spin dirty=2000", &sock_a, &[&a[0], &a[1]]);

    let mut standby_cmd = std::process::Command::new(ftvmm_bin());
    standby_cmd
        .args(["standby", "--listen", "127.0.0.1:0", "--serial", "null"])
        .args([&b[0], &b[1]]);
    let mut standby = RunningVm::spawn(standby_cmd);
    let listen = standby.bound_address("standing by on ", DEADLINE);
    let port = listen.rsplit_once(':').unwrap().1;
    let out = vm_cli(
        &sock_a,
        &["protect", "--standby", &format!("localhost:{port}")],
    );
    assert_eq!(out.code(), Some(0), "{out:?}\n{}", src.stderr());
    let t0 = Instant::now();
    loop {
        let status = vm_cli(&sock_a, &["protection"]);
        if status.stdout.contains("\"protected\"") {
            break;
        }
        assert!(
            t0.elapsed() < DEADLINE,
            "never protected: {status:?}\nprimary:\n{}\nstandby:\n{}",
            src.stderr(),
            standby.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = vm_cli(&sock_a, &["unprotect"]);
    assert_eq!(out.code(), Some(0), "{out:?}\n{}", src.stderr());
    assert_eq!(standby.wait_exit(DEADLINE), Some(0), "{}", standby.stderr());

    let sock_b = dir.join("b.sock");
    let (mut dst, listen) =
        loopback_receiver(&["--api-socket", sock_b.to_str().unwrap(), &b[0], &b[1]]);
    let port = listen.rsplit_once(':').unwrap().1;
    let out = vm_cli(&sock_a, &["migrate", "--to", &format!("localhost:{port}")]);
    assert_eq!(out.code(), Some(0), "{out:?}\n{}", src.stderr());
    assert_eq!(src.wait_exit(DEADLINE), Some(0), "{}", src.stderr());
    let info = vm_cli(&sock_b, &["info"]);
    assert!(info.stdout.contains("\"running\""), "{info:?}");
    dst.kill();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_migration_can_be_cancelled_and_the_guest_stays() {
    let dir = scratch_dir("cancel");
    let pki = pki(&dir, None);
    let (a, b) = (tls(&pki, "a"), tls(&pki, "b"));
    let sock_a = dir.join("a.sock");
    let _src = spinning_source(
        "mode=spin dirty=20000 dirty_mb=64",
        &sock_a,
        &[&a[0], &a[1]],
    );
    let (mut dst, listen) = loopback_receiver(&["--serial", "null", &b[0], &b[1]]);

    // A 1 ms target keeps a fast-dirtying guest in pre-copy.
    let socket = sock_a.clone();
    let target = listen.clone();
    let migrate = std::thread::spawn(move || {
        vm_cli(&socket, &["migrate", "--to", &target, "--downtime-ms", "1"])
    });
    let t0 = Instant::now();
    while !vm_cli(&sock_a, &["migration"])
        .stdout
        .contains("\"pre_copy\"")
    {
        assert!(t0.elapsed() < DEADLINE, "migration never reached pre-copy");
        std::thread::sleep(Duration::from_millis(20));
    }
    let cancel = vm_cli(&sock_a, &["cancel-migration"]);
    assert_eq!(cancel.code(), Some(0), "{cancel:?}");
    let out = migrate.join().unwrap();
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains("migration cancelled"), "{out:?}");
    // The destination discards everything; the source keeps running its guest.
    assert_eq!(dst.wait_exit(DEADLINE), Some(1), "{}", dst.stderr());
    assert!(
        dst.stderr().contains("cancelled by the source"),
        "{}",
        dst.stderr()
    );
    let info = vm_cli(&sock_a, &["info"]);
    assert!(info.stdout.contains("\"running\""), "{info:?}");
}

/// Forwards one connection from `listener` to `target` (both made inside host B's namespace), flipping
/// one bit of the source's stream once `corrupt_after` bytes have passed.
fn corrupting_proxy(
    hosts: &TwoHosts,
    listen: String,
    target: String,
    corrupt_after: usize,
) -> std::thread::JoinHandle<()> {
    let listener = hosts.b.run(move || TcpListener::bind(&listen).unwrap());
    let path = format!("/var/run/netns/{}", hosts.b.name());
    std::thread::spawn(move || {
        let (mut from_src, _) = listener.accept().unwrap();
        let ns = std::fs::File::open(&path).unwrap();
        // SAFETY: joins this new thread (only) to host B's namespace to reach the destination.
        assert_eq!(
            unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) },
            0
        );
        let mut to_dst = TcpStream::connect(&target).unwrap();
        let (mut back_src, mut back_dst) =
            (from_src.try_clone().unwrap(), to_dst.try_clone().unwrap());
        let back = std::thread::spawn(move || {
            let _ = std::io::copy(&mut back_dst, &mut back_src);
        });
        let mut passed = 0usize;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match std::io::Read::read(&mut from_src, &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if passed <= corrupt_after && passed + n > corrupt_after {
                buf[corrupt_after - passed] ^= 0x10;
            }
            passed += n;
            if to_dst.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to_dst.shutdown(std::net::Shutdown::Both);
        let _ = back.join();
    })
}

#[test]
fn a_corrupted_stream_is_refused_and_the_source_keeps_serving() {
    let hosts = TwoHosts::new().expect("two-host topology");
    let dir = scratch_dir("corrupt-live");
    pki(&dir, Some(&hosts));
    let (src, sock_a) = source_vm(&hosts, &dir, 2000);
    let stop = Arc::new(AtomicBool::new(false));
    let client = incrementer(&hosts, stop.clone());

    let dst_listen = "127.0.0.1:7004".to_string();
    let mut dst = receiver(&hosts, &dir, &dst_listen, &dir.join("b.sock"));
    let proxy_listen = format!("{}:7003", hosts.b_ip());
    let proxy = corrupting_proxy(&hosts, proxy_listen.clone(), dst_listen, 200_000);

    let out = vm_cli(&sock_a, &["migrate", "--to", &proxy_listen]);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert_eq!(dst.wait_exit(DEADLINE), Some(1), "{}", dst.stderr());
    // TLS authenticates every record: the flipped bit fails decryption before the frame checksum.
    assert!(dst.stderr().contains("decrypt"), "{}", dst.stderr());
    proxy.join().unwrap();

    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    let last = client.join().unwrap().expect("client unaffected");
    assert!(last > 0);
    let info = vm_cli(&sock_a, &["info"]);
    assert!(info.stdout.contains("\"running\""), "{info:?}");
    assert!(src.output().contains("net up"));
}

#[test]
fn a_receiver_refuses_unauthenticated_peers_and_waits_for_the_right_one() {
    let dir = scratch_dir("auth");
    let pki = pki(&dir, None);
    let b = tls(&pki, "b");
    let sock_b = dir.join("b.sock");
    let (mut dst, listen) =
        loopback_receiver(&["--api-socket", sock_b.to_str().unwrap(), &b[0], &b[1]]);
    let refusals = |dst: &RunningVm| dst.stderr().matches("refused a connection").count();

    // A peer speaking plain TCP gets no answer but a closed connection.
    let mut plain = TcpStream::connect(&listen).unwrap();
    plain.set_read_timeout(Some(DEADLINE)).unwrap();
    let description = small_guest_description();
    let _ = write_frame(&mut plain, &Message::Hello { description });
    assert!(read_frame::<_, Message>(&mut plain).is_err());
    dst.wait_for_stderr("refused a connection", DEADLINE);

    // A source whose certificate (and CA) the receiver does not know: it cannot even trust the
    // receiver, and gives up with a TLS error.
    let other = tls_pki(&dir.join("other"), &[("a", &["127.0.0.1"])]);
    let sock_a = dir.join("a.sock");
    let stranger = ["--tls".to_string(), other.join("a").display().to_string()];
    let mut src = spinning_source("mode=spin", &sock_a, &[&stranger[0], &stranger[1]]);
    let out = vm_cli(&sock_a, &["migrate", "--to", &listen]);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains("TLS"), "{out:?}");
    src.kill();

    // A source that trusts the receiver's CA but holds a certificate from another: the receiver
    // refuses it.
    let impostor = dir.join("impostor");
    std::fs::create_dir_all(&impostor).unwrap();
    std::fs::copy(pki.join("a/ca.crt"), impostor.join("ca.crt")).unwrap();
    std::fs::copy(other.join("a/node.crt"), impostor.join("node.crt")).unwrap();
    std::fs::copy(other.join("a/node.key"), impostor.join("node.key")).unwrap();
    let impostor_tls = ["--tls".to_string(), impostor.display().to_string()];
    let mut src = spinning_source("mode=spin", &sock_a, &[&impostor_tls[0], &impostor_tls[1]]);
    let out = vm_cli(&sock_a, &["migrate", "--to", &listen]);
    assert_eq!(out.code(), Some(1), "{out:?}");
    src.kill();
    let t0 = Instant::now();
    while refusals(&dst) < 3 {
        assert!(t0.elapsed() < DEADLINE, "{}", dst.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !dst.stderr().contains("building the VM"),
        "{}",
        dst.stderr()
    );

    // The receiver kept waiting: the right source migrates.
    let a = tls(&pki, "a");
    let mut src = spinning_source("mode=spin", &sock_a, &[&a[0], &a[1]]);
    let out = vm_cli(&sock_a, &["migrate", "--to", &listen]);
    assert_eq!(out.code(), Some(0), "{out:?}\n{}", dst.stderr());
    assert_eq!(src.wait_exit(DEADLINE), Some(0));
    let vcpus = vm_cli(&sock_b, &["vcpus"]);
    assert!(vcpus.stdout.contains("\"cpl\": 3"), "{vcpus:?}");
    dst.kill();
}

#[test]
fn a_peer_naming_a_disk_path_gets_nothing_opened() {
    let dir = scratch_dir("paths");
    let pki = pki(&dir, None);
    let b = tls(&pki, "b");
    // The receiver was given no disk; the peer names a file of this host.
    let victim = dir.join("victim.img");
    std::fs::write(&victim, b"precious").unwrap();
    let (mut dst, listen) = loopback_receiver(&["--serial", "null", &b[0], &b[1]]);
    let security = LinkSecurity::tls(&pki.join("a")).unwrap();
    let description = vmm::machine::MachineDescription {
        disks: vec![vmm::machine::DiskDescription {
            path: victim.clone(),
            read_only: false,
        }],
        ..small_guest_description()
    };
    let err = link::open(
        &link::PeerAddress::resolve(&listen).unwrap(),
        &description,
        &security,
        DEADLINE,
        DEADLINE,
    )
    .unwrap_err();
    let err = err.to_string();
    assert!(err.contains("a peer never chooses host paths"), "{err}");
    assert_eq!(dst.wait_exit(DEADLINE), Some(1), "{}", dst.stderr());
    assert!(!dst.stderr().contains("victim.img"), "{}", dst.stderr());
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
}

/// A peer's description names a firmware image (a FIFO here, or /dev/zero): a receiver opens
/// only its own (`--firmware`), and one given none refuses the guest without opening anything
/// or repeating the path. (It used to open and read the peer's path: a FIFO hung it, /dev/zero
/// ate its memory, and the errors told the peer what exists on this host.)
#[test]
fn a_peer_naming_a_firmware_path_gets_nothing_opened() {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = scratch_dir("firmware-paths");
    let pki = pki(&dir, None);
    let b = tls(&pki, "b");
    let fifo = dir.join("peer-named.fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let security = LinkSecurity::tls(&pki.join("a")).unwrap();
    for named in [fifo.clone(), PathBuf::from("/dev/zero")] {
        let (mut dst, listen) = loopback_receiver(&["--serial", "null", &b[0], &b[1]]);
        let description = vmm::machine::MachineDescription {
            firmware: Some(named.clone()),
            ..small_guest_description()
        };
        // Short: a receiver stuck opening the FIFO never answers.
        let wait = Duration::from_secs(10);
        let to = link::PeerAddress::resolve(&listen).unwrap();
        let err = link::open(&to, &description, &security, wait, wait)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--firmware"), "{named:?}: {err}");
        assert!(!err.contains(named.to_str().unwrap()), "{err}");
        assert_eq!(dst.wait_exit(DEADLINE), Some(1), "{}", dst.stderr());
        assert!(
            !dst.stderr().contains(named.to_str().unwrap()),
            "{}",
            dst.stderr()
        );
    }
    // Nobody holds the FIFO open for reading: opening it to write finds no reader.
    let writer = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo);
    assert_eq!(
        writer.map(|_| ()).unwrap_err().raw_os_error(),
        Some(libc::ENXIO)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn links_need_tls_or_an_explicit_plain_tcp_flag() {
    let out = run_ftvmm(&["receive", "--listen", "127.0.0.1:0"], DEADLINE);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains("--tls DIR"), "{out:?}");
    let out = run_ftvmm(
        &[
            "standby",
            "--listen",
            "127.0.0.1:0",
            "--tls",
            "/nonexistent/pki",
        ],
        DEADLINE,
    );
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains("/nonexistent/pki/ca.crt"), "{out:?}");
    // Without either, a VM runs but cannot migrate.
    let dir = scratch_dir("nolink");
    let sock = dir.join("a.sock");
    let _src = spinning_source("mode=spin", &sock, &[]);
    let out = vm_cli(&sock, &["migrate", "--to", "127.0.0.1:9"]);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains("--insecure-plain-tcp"), "{out:?}");
}
