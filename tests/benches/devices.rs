//! Device benchmarks (run by `scripts/bench-devices`): virtio-blk sequential throughput, virtio-net
//! request/response latency and virtio-net TCP throughput, each measured in the test guest and
//! beside the same workload on the host itself. Prints figures; asserts only on correctness (the
//! data written, read and echoed is what it should be), never on timing.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use integration_tests::netns::NetNs;
use integration_tests::{ftvmm_bin, run_ftvmm, stats, testguest, RunningVm, Stats};

const DEADLINE: Duration = Duration::from_secs(300);
/// Size of the virtio-blk image and of the host file.
const BLK_BYTES: usize = 256 << 20;
/// Request size of the guest (`chunk=`) and write/read size on the host.
const BLK_CHUNK: usize = 512 << 10;
const BLK_RUNS: usize = 5;
const GUEST_MEMORY_MIB: &str = "512";
const SECTOR: usize = 512;
/// Untimed requests before each latency series (ARP, slow start, caches).
const WARMUP: usize = 50;
const GET_ROUNDS: usize = 2000;
const INCR_ROUNDS: usize = 1000;
const ECHO_BYTES: usize = 32 << 20;
const ECHO_CHUNK: usize = 64 << 10;
const HOST_ECHO_PORT: u16 = 7007;

// ---------------------------------------------------------------------------------------------
// Output

fn mb_per_s(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn row(name: &str, unit: &str, guest: f64, host: Option<f64>) {
    match host {
        Some(h) => println!(
            "{name:<52} guest {guest:>10.1} {unit:<5} host {h:>10.1} {unit:<5} guest/host {:>7.2}",
            guest / h
        ),
        None => println!("{name:<52} guest {guest:>10.1} {unit:<5} (guest only)"),
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// A directory for the bench's images and files, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("ftvmm-bench-devices-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        Self(dir)
    }

    /// A sparse file of `size` bytes (a fresh raw disk image).
    fn image(&self, name: &str, size: usize) -> PathBuf {
        let p = self.0.join(name);
        let f = File::create(&p).expect("create image");
        f.set_len(size as u64).expect("size image");
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------------
// virtio-blk

/// The test guest's disk pattern (images/testguest/src/pattern.rs), so that the host does the
/// same per-byte work as the guest: sector `s` holds the u64 words `v, v+1, ..., v+63` with
/// `v = splitmix64(s ^ seed.rotate_left(32))`.
fn sector_value(seed: u64, sector: u64) -> u64 {
    let mut z = (sector ^ seed.rotate_left(32)).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn fill(seed: u64, first_sector: u64, buf: &mut [u8]) {
    for (i, sector) in buf.chunks_exact_mut(SECTOR).enumerate() {
        let v = sector_value(seed, first_sector + i as u64);
        for (j, word) in sector.chunks_exact_mut(8).enumerate() {
            word.copy_from_slice(&v.wrapping_add(j as u64).to_le_bytes());
        }
    }
}

fn matches(seed: u64, first_sector: u64, buf: &[u8]) -> bool {
    buf.chunks_exact(SECTOR).enumerate().all(|(i, sector)| {
        let v = sector_value(seed, first_sector + i as u64);
        sector
            .chunks_exact(8)
            .enumerate()
            .all(|(j, w)| u64::from_le_bytes(w.try_into().unwrap()) == v.wrapping_add(j as u64))
    })
}

/// One guest run: `mode=blk` over a fresh image; (write incl. flush, read incl. verify).
fn guest_blk(scratch: &Scratch, seed: u64) -> (Duration, Duration) {
    let img = scratch.image("guest.img", BLK_BYTES);
    let guest = testguest();
    let out = run_ftvmm(
        &[
            "run",
            "--kernel",
            guest.to_str().expect("utf-8 path"),
            "--memory",
            GUEST_MEMORY_MIB,
            "--cmdline",
            &format!("mode=blk seed={seed} chunk={BLK_CHUNK}"),
            "--disk",
            &format!("path={}", img.display()),
        ],
        DEADLINE,
    );
    assert!(
        out.stdout
            .contains(&format!("testguest: blk ok bytes={BLK_BYTES}")),
        "guest blk run failed: {out:?}"
    );
    let stats_line = out
        .stdout
        .lines()
        .find(|l| l.contains("testguest: blk stats"))
        .expect("blk stats line");
    let field = |key: &str| -> Duration {
        let ms = stats_line
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key}= in {stats_line:?}"));
        Duration::from_millis(ms)
    };
    let r = (field("write_ms"), field("read_ms"));
    std::fs::remove_file(img).expect("remove image");
    r
}

/// Drops `f`'s clean pages from the page cache.
fn drop_page_cache(f: &File) {
    // SAFETY: posix_fadvise only reads its integer arguments; the fd is valid for `f`'s lifetime.
    let err = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(err, 0, "posix_fadvise(DONTNEED): errno {err}");
}

fn read_verify(path: &Path, seed: u64, buf: &mut [u8]) -> Duration {
    let t = Instant::now();
    let mut f = File::open(path).expect("open host file");
    for i in 0..BLK_BYTES / BLK_CHUNK {
        f.read_exact(buf).expect("read host file");
        assert!(
            matches(seed, (i * BLK_CHUNK / SECTOR) as u64, buf),
            "host read back wrong data in chunk {i}"
        );
    }
    t.elapsed()
}

/// One host run: the same pattern written in the same chunks to a new file, one fsync at the
/// end; then read back after dropping its page cache (cold), and once more (page cache warm).
fn host_blk(scratch: &Scratch, seed: u64) -> (Duration, Duration, Duration) {
    let path = scratch.0.join("host.dat");
    let mut buf = vec![0u8; BLK_CHUNK];
    let t = Instant::now();
    let mut f = File::create(&path).expect("create host file");
    for i in 0..BLK_BYTES / BLK_CHUNK {
        fill(seed, (i * BLK_CHUNK / SECTOR) as u64, &mut buf);
        f.write_all(&buf).expect("write host file");
    }
    f.sync_all().expect("fsync host file");
    let write = t.elapsed();
    drop_page_cache(&f);
    drop(f);
    let cold = read_verify(&path, seed, &mut buf);
    let warm = read_verify(&path, seed, &mut buf);
    std::fs::remove_file(path).expect("remove host file");
    (write, cold, warm)
}

fn bench_blk(scratch: &Scratch) {
    println!(
        "\nvirtio-blk: {} MiB raw image, {} KiB requests, guest {GUEST_MEMORY_MIB} MiB; median of {BLK_RUNS} runs; files in {}",
        BLK_BYTES >> 20,
        BLK_CHUNK >> 10,
        scratch.0.display()
    );
    let (mut gw, mut gr, mut hw, mut hr, mut hc) = (vec![], vec![], vec![], vec![], vec![]);
    for run in 0..BLK_RUNS {
        let seed = 100 + run as u64;
        let (w, r) = guest_blk(scratch, seed);
        gw.push(w);
        gr.push(r);
        let (w, cold, warm) = host_blk(scratch, seed);
        hw.push(w);
        hr.push(cold);
        hc.push(warm);
    }
    for (name, runs) in [
        ("guest write", &gw),
        ("guest read", &gr),
        ("host write", &hw),
        ("host read, cold", &hr),
        ("host read, warm", &hc),
    ] {
        let each: Vec<String> = runs
            .iter()
            .map(|d| format!("{:.0}", mb_per_s(BLK_BYTES, *d)))
            .collect();
        println!("  runs, {name} (MB/s): {}", each.join(" "));
    }
    let mbs = |v: Vec<Duration>| mb_per_s(BLK_BYTES, median(v));
    let (gw, gr) = (mbs(gw), mbs(gr));
    row(
        "blk sequential write + flush (host: fsync)",
        "MB/s",
        gw,
        Some(mbs(hw)),
    );
    row(
        "blk sequential read (host: page cache dropped)",
        "MB/s",
        gr,
        Some(mbs(hr)),
    );
    row(
        "blk sequential read (host: page cache warm)",
        "MB/s",
        gr,
        Some(mbs(hc)),
    );
    println!(
        "  note: ftvmm opens images with buffered I/O, so the guest's reads (just after its own\n  \
         writes) can be served from the host page cache; compare them with the warm host read.\n  \
         Guest and host times both include generating/checking the test pattern."
    );
}

// ---------------------------------------------------------------------------------------------
// virtio-net

fn spawn_net_guest(ns: &NetNs, disk: Option<&Path>) -> RunningVm {
    let mut cmd = ns.command(ftvmm_bin().to_str().expect("utf-8 path"));
    cmd.args(["run", "--kernel"])
        .arg(testguest())
        .args(["--memory", "128", "--net", "tap=tap0"])
        .args(["--cmdline", &format!("mode=net ip={}/24", ns.guest_ip())]);
    if let Some(disk) = disk {
        cmd.arg("--disk").arg(format!("path={}", disk.display()));
    }
    let mut vm = RunningVm::spawn(cmd);
    vm.wait_for("testguest: net up", DEADLINE);
    vm
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    format!("{ip}:{port}").parse().expect("socket address")
}

/// A TCP connection opened inside the namespace (a socket keeps its namespace once made).
fn connect(ns: &NetNs, to: SocketAddr) -> TcpStream {
    let s = ns.run(move || TcpStream::connect_timeout(&to, Duration::from_secs(20)));
    let s = s.unwrap_or_else(|e| panic!("connect {to}: {e}"));
    s.set_nodelay(true).expect("TCP_NODELAY");
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("read timeout");
    s.set_write_timeout(Some(Duration::from_secs(60)))
        .expect("write timeout");
    s
}

/// A host echo server inside the namespace on the TAP's host address: serves one connection,
/// sending back every byte (so it is also a line echo) until the client closes.
fn host_echo_server(ns: &NetNs) -> (SocketAddr, JoinHandle<()>) {
    let at = addr(&ns.host_ip(), HOST_ECHO_PORT);
    let listener = ns
        .run(move || TcpListener::bind(at))
        .unwrap_or_else(|e| panic!("bind {at}: {e}"));
    let handle = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().expect("accept");
        conn.set_nodelay(true).expect("TCP_NODELAY");
        let mut buf = vec![0u8; ECHO_CHUNK];
        loop {
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => conn.write_all(&buf[..n]).expect("echo write"),
            }
        }
    });
    (at, handle)
}

/// Sends `request` `WARMUP + n` times, one at a time, checking reply `i` (0-based, warm-up
/// included) against `expect(i)`; returns the last `n` round-trip times.
fn round_trips(
    conn: &TcpStream,
    request: &str,
    n: usize,
    expect: impl Fn(usize) -> String,
) -> Vec<Duration> {
    let mut writer = conn.try_clone().expect("clone stream");
    let mut reader = BufReader::new(conn.try_clone().expect("clone stream"));
    let line = format!("{request}\n");
    let mut reply = String::new();
    let mut times = Vec::with_capacity(n);
    for i in 0..WARMUP + n {
        reply.clear();
        let t = Instant::now();
        writer.write_all(line.as_bytes()).expect("send request");
        reader.read_line(&mut reply).expect("read reply");
        let rtt = t.elapsed();
        assert_eq!(reply.trim_end(), expect(i), "reply {i} to {request:?}");
        if i >= WARMUP {
            times.push(rtt);
        }
    }
    times
}

/// Sends one line, returns the reply line.
fn ask(conn: &TcpStream, request: &str) -> String {
    let mut writer = conn;
    writer
        .write_all(format!("{request}\n").as_bytes())
        .expect("send request");
    let mut reply = String::new();
    BufReader::new(conn)
        .read_line(&mut reply)
        .expect("read reply");
    reply.trim_end().to_string()
}

/// Byte `offset` of each echo chunk.
fn echo_byte(offset: usize) -> u8 {
    (offset % 251) as u8
}

/// Sends `ECHO_BYTES` in `ECHO_CHUNK` writes from one thread while reading the echo on this one;
/// checks every byte; returns the time from the first write to the last byte read.
fn echo_throughput(conn: TcpStream) -> Duration {
    let mut writer = conn.try_clone().expect("clone stream");
    let mut reader = conn;
    let t = Instant::now();
    let sender = std::thread::spawn(move || {
        let chunk: Vec<u8> = (0..ECHO_CHUNK).map(echo_byte).collect();
        for _ in 0..ECHO_BYTES / ECHO_CHUNK {
            writer.write_all(&chunk).expect("send echo data");
        }
        writer
    });
    let mut buf = vec![0u8; ECHO_CHUNK];
    let mut got = 0;
    while got < ECHO_BYTES {
        let n = reader.read(&mut buf).expect("read echo");
        assert!(n > 0, "echo closed after {got} bytes");
        for (i, b) in buf[..n].iter().enumerate() {
            assert_eq!(
                *b,
                echo_byte((got + i) % ECHO_CHUNK),
                "echo byte {}",
                got + i
            );
        }
        got += n;
    }
    let elapsed = t.elapsed();
    sender.join().expect("sender thread");
    elapsed
}

fn latency_row(name: &str, guest: Stats, host: Option<Stats>) {
    row(
        &format!("{name}, median"),
        "µs",
        us(guest.median),
        host.map(|h| us(h.median)),
    );
    row(
        &format!("{name}, p99"),
        "µs",
        us(guest.p99),
        host.map(|h| us(h.p99)),
    );
}

fn bench_net(scratch: &Scratch) {
    let ns = NetNs::with_tap().expect("create netns with TAP (needs root and iproute2)");
    println!(
        "\nvirtio-net: namespace {}, guest {} on tap0, host side {}; {GET_ROUNDS} requests on one \
         connection (after {WARMUP} untimed), echo {} MiB in {} KiB writes",
        ns.name(),
        ns.guest_ip(),
        ns.host_ip(),
        ECHO_BYTES >> 20,
        ECHO_CHUNK >> 10
    );

    // Host figures first, with no VM running: the same clients against an echo server bound to
    // the TAP's host address inside the namespace (a local address, so the kernel loops the
    // traffic back without it crossing the TAP).
    let (at, server) = host_echo_server(&ns);
    let conn = connect(&ns, at);
    let host_rtt = stats(&round_trips(&conn, "GET k", GET_ROUNDS, |_| "GET k".into()));
    drop(conn);
    server.join().expect("host echo server");
    let (at, server) = host_echo_server(&ns);
    let host_echo = echo_throughput(connect(&ns, at));
    server.join().expect("host echo server");

    // The guest without a disk: the key-value service answers from memory.
    let vm = spawn_net_guest(&ns, None);
    let kv = connect(&ns, addr(&ns.guest_ip(), 4000));
    assert_eq!(ask(&kv, "SET k v"), "OK");
    let guest_rtt = stats(&round_trips(&kv, "GET k", GET_ROUNDS, |_| "VALUE v".into()));
    drop(kv);
    let guest_echo = echo_throughput(connect(&ns, addr(&ns.guest_ip(), 7)));
    drop(vm);

    // The guest with a disk: each INCR reply waits for a log append and flush.
    let disk = scratch.image("kv.img", 16 << 20);
    let vm = spawn_net_guest(&ns, Some(&disk));
    let kv = connect(&ns, addr(&ns.guest_ip(), 4000));
    let incr = stats(&round_trips(&kv, "INCR n", INCR_ROUNDS, |i| {
        (i + 1).to_string()
    }));
    drop(kv);
    drop(vm);

    latency_row(
        "net GET round trip (no disk; host: line echo)",
        guest_rtt,
        Some(host_rtt),
    );
    latency_row(
        &format!("net INCR round trip, disk log flush ({INCR_ROUNDS} reqs)"),
        incr,
        None,
    );
    row(
        "net TCP echo throughput (port 7; host: echo server)",
        "MB/s",
        mb_per_s(ECHO_BYTES, guest_echo),
        Some(mb_per_s(ECHO_BYTES, host_echo)),
    );
}

fn main() {
    // `cargo bench` passes --bench; nothing to parse.
    println!("ftvmm device benchmarks (test guest in ring 3; MB = 10^6 bytes)");
    let scratch = Scratch::new();
    bench_blk(&scratch);
    bench_net(&scratch);
}
