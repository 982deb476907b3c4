//! `ftvmm-impair link` against real traffic: two network namespaces joined by a veth pair, the
//! impairment running in namespace A, UDP (and TCP) between A and B. Needs root (namespaces,
//! iptables, NFQUEUE); skipped with a note otherwise. Bounds are generous: these check that each
//! impairment does what it says, not how precisely.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use impair::link::{spawn_in_netns_using, Direction, LinkImpairment, RunningImpairment};

const PORT: u16 = 7100;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// True (after saying why) when the test cannot run here.
fn skip() -> bool {
    // SAFETY: geteuid has no preconditions and only reads the process's credentials.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root (network namespaces, iptables, NFQUEUE)");
        return true;
    }
    false
}

fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Two namespaces, `a` (10.99.N.1 on `va`) and `b` (10.99.N.2 on `vb`), joined by a veth pair;
/// both removed when dropped.
struct Pair {
    a: String,
    b: String,
    subnet: u8,
}

impl Pair {
    fn new() -> Self {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let base = format!("ftvmm-imp{pid}-{n}");
        let subnet = ((pid + n * 7) % 200 + 20) as u8;
        let pair = Self {
            a: format!("{base}a"),
            b: format!("{base}b"),
            subnet,
        };
        let ip = |args: &[&str]| run("ip", args).unwrap_or_else(|e| panic!("{e}"));
        ip(&["netns", "add", &pair.a]);
        ip(&["netns", "add", &pair.b]);
        ip(&[
            "link", "add", "va", "netns", &pair.a, "type", "veth", "peer", "name", "vb", "netns",
            &pair.b,
        ]);
        for (ns, dev, addr) in [(&pair.a, "va", pair.a_ip()), (&pair.b, "vb", pair.b_ip())] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        pair
    }

    fn a_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 99, self.subnet, 1)
    }

    fn b_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 99, self.subnet, 2)
    }

    /// Runs `ftvmm-impair link` with `spec` in namespace A.
    fn impair_a(&self, spec: &LinkImpairment) -> RunningImpairment {
        spawn_in_netns_using(Path::new(env!("CARGO_BIN_EXE_ftvmm-impair")), &self.a, spec)
            .unwrap_or_else(|e| panic!("starting the impairment: {e}"))
    }

    /// Namespace A's filter rules.
    fn rules_a(&self) -> String {
        run("ip", &["netns", "exec", &self.a, "iptables", "-S"]).unwrap_or_else(|e| panic!("{e}"))
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        // Deleting a namespace removes its end of the veth, and with it the other end.
        for ns in [&self.a, &self.b] {
            if let Err(e) = run("ip", &["netns", "del", ns]) {
                eprintln!("cleanup: {e}");
            }
        }
    }
}

/// Runs `f` on a new thread inside namespace `ns` (sockets it opens live there).
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: setns on a valid namespace fd changes only this new thread's network namespace.
        let ret = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(ret, 0, "setns({path}): {}", std::io::Error::last_os_error());
        f()
    })
}

/// Starts a UDP receiver in `ns` on `addr`: it returns how often each id arrived, once nothing
/// has come for a second. Returns when it is listening.
fn udp_receiver(ns: &str, addr: Ipv4Addr) -> JoinHandle<HashMap<u32, u32>> {
    let (ready_tx, ready_rx) = mpsc::channel();
    let handle = in_netns(ns, move || {
        let socket = UdpSocket::bind((addr, PORT)).expect("bind receiver");
        socket
            .set_read_timeout(Some(Duration::from_secs(1)))
            .unwrap();
        ready_tx.send(()).unwrap();
        let mut seen = HashMap::new();
        let mut buf = [0u8; 64];
        while let Ok(n) = socket.recv(&mut buf) {
            if n == 4 {
                *seen
                    .entry(u32::from_be_bytes(buf[..4].try_into().unwrap()))
                    .or_insert(0) += 1;
            }
        }
        seen
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("receiver did not start");
    handle
}

/// Sends datagrams with ids `0..count` from `ns` to `to`, paced so that no socket buffer
/// overflows.
fn udp_send(ns: &str, to: Ipv4Addr, count: u32) {
    in_netns(ns, move || {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        for id in 0..count {
            socket.send_to(&id.to_be_bytes(), (to, PORT)).unwrap();
            if id % 50 == 49 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    })
    .join()
    .unwrap();
}

/// Sends `count` datagrams from `from_ns` to `to` and returns how often each id arrived.
fn udp_transfer(from_ns: &str, to_ns: &str, to: Ipv4Addr, count: u32) -> HashMap<u32, u32> {
    let receiver = udp_receiver(to_ns, to);
    udp_send(from_ns, to, count);
    receiver.join().unwrap()
}

/// Round trips of a UDP echo between A (client) and B (server).
fn udp_echo_round_trips(pair: &Pair, count: usize) -> Vec<Duration> {
    let (ready_tx, ready_rx) = mpsc::channel();
    let b_ip = pair.b_ip();
    let server = in_netns(&pair.b, move || {
        let socket = UdpSocket::bind((b_ip, PORT)).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        ready_tx.send(()).unwrap();
        let mut buf = [0u8; 64];
        for _ in 0..count {
            let Ok((n, from)) = socket.recv_from(&mut buf) else {
                return;
            };
            socket.send_to(&buf[..n], from).unwrap();
        }
    });
    ready_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let times = in_netns(&pair.a, move || {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        let mut times = Vec::new();
        let mut buf = [0u8; 64];
        for i in 0..count as u32 {
            let sent = Instant::now();
            socket.send_to(&i.to_be_bytes(), (b_ip, PORT)).unwrap();
            let n = socket.recv(&mut buf).expect("no echo within 3 s");
            assert_eq!(&buf[..n], &i.to_be_bytes());
            times.push(sent.elapsed());
        }
        times
    })
    .join()
    .unwrap();
    server.join().unwrap();
    times
}

fn udp_port_spec() -> LinkImpairment {
    LinkImpairment {
        ports: vec![PORT],
        seed: Some(1),
        ..LinkImpairment::default()
    }
}

#[test]
fn loss_drops_about_the_asked_share() {
    if skip() {
        return;
    }
    let pair = Pair::new();
    let running = pair.impair_a(&LinkImpairment {
        loss: 20.0,
        ..udp_port_spec()
    });
    let arrived = udp_transfer(&pair.a, &pair.b, pair.b_ip(), 2000);
    let counters = running.stop().unwrap();
    let missing = 2000 - arrived.len();
    assert!(
        (200..=600).contains(&missing),
        "{missing} of 2000 datagrams missing at 20% loss (counters {counters:?})"
    );
    assert!(counters.seen >= 2000, "{counters:?}");
    // Every missing datagram was dropped by the impairment (allowing for a rare overflow).
    let dropped = counters.dropped as usize;
    assert!(
        dropped <= missing && missing - dropped <= 10,
        "{counters:?}"
    );
}

#[test]
fn delay_holds_one_direction() {
    if skip() {
        return;
    }
    let pair = Pair::new();
    let before = udp_echo_round_trips(&pair, 5);
    assert!(
        before.iter().all(|t| *t < Duration::from_millis(30)),
        "round trips {before:?} before any impairment"
    );
    let running = pair.impair_a(&LinkImpairment {
        delay_ms: 40,
        direction: Direction::Out,
        ..udp_port_spec()
    });
    let times = udp_echo_round_trips(&pair, 10);
    let counters = running.stop().unwrap();
    for t in &times {
        assert!(
            *t >= Duration::from_millis(40) && *t < Duration::from_secs(1),
            "round trip {t:?} with 40 ms delay one way: {times:?}"
        );
    }
    assert_eq!(counters.delayed, 10, "{counters:?}");
}

#[test]
fn one_way_cut_drops_one_way_only() {
    if skip() {
        return;
    }
    let pair = Pair::new();
    let running = pair.impair_a(&LinkImpairment {
        cut: true,
        direction: Direction::Out,
        ..udp_port_spec()
    });
    let a_to_b = udp_transfer(&pair.a, &pair.b, pair.b_ip(), 100);
    let b_to_a = udp_transfer(&pair.b, &pair.a, pair.a_ip(), 100);
    let counters = running.stop().unwrap();
    assert!(
        a_to_b.is_empty(),
        "{} datagrams crossed the cut",
        a_to_b.len()
    );
    assert!(b_to_a.len() >= 95, "only {} of 100 came back", b_to_a.len());
    assert_eq!(counters.dropped, 100, "{counters:?}");
}

#[test]
fn duplicates_arrive() {
    if skip() {
        return;
    }
    let pair = Pair::new();
    let running = pair.impair_a(&LinkImpairment {
        duplicate: 50.0,
        ..udp_port_spec()
    });
    let arrived = udp_transfer(&pair.a, &pair.b, pair.b_ip(), 400);
    let counters = running.stop().unwrap();
    let doubled = arrived.values().filter(|&&n| n == 2).count();
    assert!(
        arrived.len() >= 390,
        "only {} of 400 arrived",
        arrived.len()
    );
    assert!(
        arrived.values().all(|&n| n <= 2),
        "a datagram came more than twice"
    );
    assert!(
        (100..=300).contains(&doubled),
        "{doubled} of 400 arrived twice at 50% duplication ({counters:?})"
    );
    let duplicated = counters.duplicated as usize;
    assert!(
        duplicated >= doubled && duplicated - doubled <= 10,
        "{counters:?}"
    );
}

#[test]
fn sigterm_removes_the_rules_and_traffic_flows_again() {
    if skip() {
        return;
    }
    let pair = Pair::new();
    let running = pair.impair_a(&LinkImpairment {
        cut: true,
        ..udp_port_spec()
    });
    let tag = running.rule_tag();
    let installed = pair.rules_a().lines().filter(|l| l.contains(&tag)).count();
    assert_eq!(
        installed,
        4,
        "tcp and udp in OUTPUT and INPUT:\n{}",
        pair.rules_a()
    );
    assert!(udp_transfer(&pair.a, &pair.b, pair.b_ip(), 50).is_empty());
    let counters = running.stop().unwrap();
    assert_eq!(counters.dropped, 50, "{counters:?}");
    let rules = pair.rules_a();
    assert!(!rules.contains(&tag), "rules left behind:\n{rules}");
    let arrived = udp_transfer(&pair.a, &pair.b, pair.b_ip(), 50);
    assert!(
        arrived.len() >= 48,
        "only {} of 50 after the stop",
        arrived.len()
    );
}

#[test]
fn delayed_tcp_stream_keeps_its_throughput() {
    if skip() {
        return;
    }
    // Sent packets are stolen and re-sent rather than held, or TCP Small Queues would throttle
    // the sender to about a megabyte per second at this delay.
    let pair = Pair::new();
    let running = pair.impair_a(&LinkImpairment {
        delay_ms: 10,
        jitter_ms: 2,
        keep_order: true,
        ..udp_port_spec()
    });
    const MEGABYTES: usize = 64;
    let (ready_tx, ready_rx) = mpsc::channel();
    let b_ip = pair.b_ip();
    let server = in_netns(&pair.b, move || {
        let listener = TcpListener::bind((b_ip, PORT)).unwrap();
        ready_tx.send(()).unwrap();
        let (mut conn, _) = listener.accept().unwrap();
        let mut total = 0;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => return total,
                Ok(n) => total += n,
            }
        }
    });
    ready_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let started = Instant::now();
    in_netns(&pair.a, move || {
        let mut conn = TcpStream::connect(SocketAddr::from((b_ip, PORT))).unwrap();
        let chunk = vec![0x5au8; 1 << 20];
        for _ in 0..MEGABYTES {
            conn.write_all(&chunk).unwrap();
        }
    })
    .join()
    .unwrap();
    let received = server.join().unwrap();
    let took = started.elapsed();
    let counters = running.stop().unwrap();
    assert_eq!(received, MEGABYTES << 20);
    assert!(
        took < Duration::from_secs(20),
        "{MEGABYTES} MB took {took:?} through a 10 ms delay ({counters:?})"
    );
    assert!(counters.delayed > 1000, "{counters:?}");
}
