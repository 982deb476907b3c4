//! virtio-blk and virtio-net against the test guest, whose drivers come from the independent
//! `virtio-drivers` crate and whose TCP/IP stack is smoltcp.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use integration_tests::netns::NetNs;
use integration_tests::{ftvmm_bin, run_ftvmm, testguest, RunningVm};

const DEADLINE: Duration = Duration::from_secs(180);

fn scratch(name: &str, size: u64) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ftvmm-devices-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(size).unwrap();
    p
}

fn run_blk(cmdline: &str, disk: &str) -> integration_tests::RunOutput {
    let guest = testguest();
    run_ftvmm(
        &[
            "run",
            "--kernel",
            guest.to_str().unwrap(),
            "--memory",
            "128",
            "--cmdline",
            cmdline,
            "--disk",
            disk,
        ],
        DEADLINE,
    )
}

#[test]
fn blk_pattern_is_written_verified_and_persists() {
    const SIZE: u64 = 8 << 20;
    let img = scratch("pattern.img", SIZE);
    let out = run_blk("mode=blk seed=7", &format!("path={}", img.display()));
    assert!(
        out.stdout
            .contains(&format!("testguest: blk ok bytes={SIZE}")),
        "{out:?}"
    );
    assert_eq!(out.code(), Some(0), "{out:?}");
    // The image file holds the pattern after ftvmm exits: every sector was written...
    let bytes = std::fs::read(&img).unwrap();
    let zero_sectors = bytes
        .chunks(512)
        .filter(|s| s.iter().all(|b| *b == 0))
        .count();
    assert_eq!(zero_sectors, 0, "sectors left unwritten on the host image");
    // ...and a second VM, with the disk read-only, reads back exactly that pattern.
    let out = run_blk(
        "mode=blk blk=verify seed=7",
        &format!("path={},readonly", img.display()),
    );
    assert!(
        out.stdout
            .contains(&format!("testguest: blk verify ok bytes={SIZE}")),
        "{out:?}"
    );
    // A different seed does not verify: the check can fail.
    let out = run_blk(
        "mode=blk blk=verify seed=8",
        &format!("path={},readonly", img.display()),
    );
    assert!(out.stdout.contains("testguest: blk verify FAIL"), "{out:?}");
}

#[test]
fn read_only_disk_rejects_writes() {
    let img = scratch("ro.img", 1 << 20);
    std::fs::write(&img, vec![0x5au8; 1 << 20]).unwrap();
    let out = run_blk(
        "mode=blk blk=readonly-check",
        &format!("path={},readonly", img.display()),
    );
    assert!(out.stdout.contains("testguest: blk readonly ok"), "{out:?}");
    assert!(
        std::fs::read(&img).unwrap().iter().all(|b| *b == 0x5a),
        "read-only image changed"
    );
}

fn spawn_net_guest(ns: &NetNs, disk: &Path) -> RunningVm {
    let mut cmd = ns.command(ftvmm_bin().to_str().unwrap());
    cmd.args(["run", "--kernel"])
        .arg(testguest())
        .args(["--memory", "128", "--net", "tap=tap0", "--disk"])
        .arg(format!("path={}", disk.display()))
        .args(["--cmdline", &format!("mode=net ip={}/24", ns.guest_ip())]);
    let mut vm = RunningVm::spawn(cmd);
    vm.wait_for("testguest: net up", DEADLINE);
    vm
}

/// Sends one line, returns the reply line.
fn ask(conn: &mut BufReader<TcpStream>, line: &str) -> String {
    conn.get_mut()
        .write_all(format!("{line}\n").as_bytes())
        .unwrap();
    let mut reply = String::new();
    conn.read_line(&mut reply).unwrap();
    reply.trim_end().to_string()
}

fn connect(addr: String) -> BufReader<TcpStream> {
    let s = TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(20)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    BufReader::new(s)
}

#[test]
fn net_ping_echo_and_kv_survive_a_reboot() {
    let ns = NetNs::with_tap().expect("create netns with TAP (needs root and iproute2)");
    let disk = scratch("kv.img", 4 << 20);
    let mut vm = spawn_net_guest(&ns, &disk);
    let guest = ns.guest_ip();

    let ping = ns
        .command("ping")
        .args(["-c", "3", "-W", "5", &guest])
        .output()
        .unwrap();
    assert!(
        ping.status.success(),
        "ping failed: {}",
        String::from_utf8_lossy(&ping.stdout)
    );

    let g = guest.clone();
    ns.run(move || {
        // TCP echo on port 7.
        let mut echo =
            TcpStream::connect_timeout(&format!("{g}:7").parse().unwrap(), Duration::from_secs(20))
                .unwrap();
        echo.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let msg = b"the quick brown fox\n";
        echo.write_all(msg).unwrap();
        let mut back = vec![0u8; msg.len()];
        echo.read_exact(&mut back).unwrap();
        assert_eq!(&back, msg);

        // Key-value service on port 4000, several clients at once.
        let mut clients: Vec<_> = (0..3).map(|_| connect(format!("{g}:4000"))).collect();
        assert_eq!(ask(&mut clients[0], "SET color blue"), "OK");
        assert_eq!(ask(&mut clients[1], "GET color"), "VALUE blue");
        assert_eq!(ask(&mut clients[2], "GET nothing"), "NIL");
        for i in 1..=5 {
            let c = &mut clients[i % 3];
            assert_eq!(ask(c, "INCR hits"), i.to_string());
        }
        assert_eq!(ask(&mut clients[0], "SET gone soon"), "OK");
        assert_eq!(ask(&mut clients[1], "DEL gone"), "OK");
        assert_eq!(ask(&mut clients[2], "GET gone"), "NIL");
    });

    // Shut the guest down and boot it again on the same disk: the state comes back from its log.
    vm.kill();
    let mut vm = spawn_net_guest(&ns, &disk);
    vm.wait_for("testguest: kv restored keys=2", DEADLINE);
    let g = guest.clone();
    ns.run(move || {
        let mut c = connect(format!("{g}:4000"));
        assert_eq!(ask(&mut c, "GET color"), "VALUE blue");
        assert_eq!(ask(&mut c, "GET hits"), "VALUE 5");
        assert_eq!(ask(&mut c, "GET gone"), "NIL");
        assert_eq!(ask(&mut c, "INCR hits"), "6");
    });
}
