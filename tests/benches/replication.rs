//! Protection benchmarks (run by `scripts/bench-replication`): the epoch pause (vCPUs stopped for a
//! checkpoint) and the commit latency (end of pause to the standby's acknowledgement) of a 256 MiB,
//! 2-vCPU test guest protected over loopback, idle and dirtying memory; the takeover time; and the
//! reply latency gating adds for a client. Prints figures only.

use std::process::Command;
use std::time::{Duration, Instant};

use integration_tests::netns::TwoHosts;
use integration_tests::{ftvmm_bin, run_ftvmm, stats, testguest, tls_pki, RunningVm};

const DEADLINE: Duration = Duration::from_secs(120);

fn ms(v: &serde_json::Value) -> Option<Duration> {
    v.as_f64().map(|m| Duration::from_secs_f64(m / 1e3))
}

/// Protects the test guest with `cmdline` at `epoch` (with `extra` arguments to `ftvmm run`) for
/// 10 s and prints the epoch figures.
fn protect(cmdline: &str, epoch: &str, extra: &[&str]) {
    let dir = std::env::temp_dir().join(format!("ftvmm-bench-repl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("p.sock");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let pki = tls_pki(&dir, &[("a", &["127.0.0.1"]), ("b", &["127.0.0.1"])]);
    let mut standby_cmd = Command::new(ftvmm_bin());
    standby_cmd.args(["standby", "--listen", &listen, "--serial", "null"]);
    standby_cmd.arg("--tls").arg(pki.join("b"));
    let mut standby = RunningVm::spawn(standby_cmd);
    standby.wait_for_stderr("standing by", DEADLINE);
    let mut primary_cmd = Command::new(ftvmm_bin());
    primary_cmd
        .args([
            "run",
            "--kernel",
            testguest().to_str().unwrap(),
            "--memory",
            "256",
            "--vcpus",
            "2",
        ])
        .args([
            "--cmdline",
            cmdline,
            "--standby",
            &listen,
            "--epoch-ms",
            epoch,
        ])
        .args(["--api-socket", sock.to_str().unwrap()])
        .args(extra)
        .arg("--tls")
        .arg(pki.join("a"));
    let mut primary = RunningVm::spawn(primary_cmd);
    primary.wait_for("testguest: spinning", DEADLINE);
    let (mut pauses, mut commits, mut pages) = (Vec::new(), Vec::new(), Vec::new());
    let mut write_faults = Vec::new();
    let mut stopping = Vec::new();
    let mut epoch_lengths = Vec::new();
    // Page data on the link against the raw dirty bytes, summed over the epochs sampled.
    let (mut page_bytes, mut raw_bytes) = (0u64, 0u64);
    let mut last_epoch = 0;
    // (time, epoch) of the first and the last committed epoch seen: the cadence actually kept.
    let mut first_seen: Option<(Instant, u64)> = None;
    let mut last_seen: Option<(Instant, u64)> = None;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(10) {
        let out = run_ftvmm(
            &["vm", "--api-socket", sock.to_str().unwrap(), "protection"],
            DEADLINE,
        );
        if let Ok(s) = serde_json::from_str::<serde_json::Value>(&out.stdout) {
            let epoch = s["committed_epoch"].as_u64().unwrap_or(0);
            if epoch > last_epoch && epoch > 2 {
                first_seen.get_or_insert((Instant::now(), epoch));
                last_seen = Some((Instant::now(), epoch));
                pauses.extend(ms(&s["last_pause_ms"]));
                stopping.extend(ms(&s["last_pause_stopping_ms"]));
                epoch_lengths.extend(ms(&s["epoch_ms"]));
                commits.extend(ms(&s["last_commit_ms"]));
                pages.push(s["last_pages"].as_u64().unwrap_or(0));
                write_faults.push(s["last_write_faults"].as_u64().unwrap_or(0));
                page_bytes += s["last_page_bytes"].as_u64().unwrap_or(0);
                raw_bytes += s["last_pages"].as_u64().unwrap_or(0) * 4096;
            }
            last_epoch = epoch;
        }
        std::thread::sleep(Duration::from_millis(97));
    }
    primary.kill();
    standby.kill();
    let _ = std::fs::remove_dir_all(dir);
    if pauses.is_empty() {
        println!("{cmdline}: no epochs sampled");
        return;
    }
    let (p, c, st) = (stats(&pauses), stats(&commits), stats(&stopping));
    let epoch_ms = stats(&epoch_lengths).median.as_secs_f64() * 1e3;
    pages.sort_unstable();
    write_faults.sort_unstable();
    let per_second = match (first_seen, last_seen) {
        (Some((t1, e1)), Some((t2, e2))) if t2 > t1 => (e2 - e1) as f64 / (t2 - t1).as_secs_f64(),
        _ => 0.0,
    };
    println!(
        "{cmdline:<28} {} epoch {epoch} (median {epoch_ms:.1} ms) | pause median {:.2} ms p99 {:.2} ms (stopping the vCPUs median {:.2} p99 {:.2}) | commit median {:.2} ms p99 {:.2} ms | pages/epoch median {} | writes waiting for the copy/epoch median {} max {} | {:.1} epochs/s committed (ideal {:.1}) | page bytes on the link / raw {} | {} epochs sampled",
        extra.join(" "),
        p.median.as_secs_f64() * 1e3,
        p.p99.as_secs_f64() * 1e3,
        st.median.as_secs_f64() * 1e3,
        st.p99.as_secs_f64() * 1e3,
        c.median.as_secs_f64() * 1e3,
        c.p99.as_secs_f64() * 1e3,
        pages[pages.len() / 2],
        write_faults[write_faults.len() / 2],
        write_faults.last().unwrap_or(&0),
        per_second,
        1000.0 / epoch_ms,
        if raw_bytes == 0 {
            "-".to_string()
        } else {
            format!("{:.3}", page_bytes as f64 / raw_bytes as f64)
        },
        pauses.len()
    );
}

/// How long a standby (default failure timeout, 180 ms: a signed UDP probe each way every 18 ms)
/// takes to start running the guest after its primary's process is killed (`signal` -KILL: its
/// connection ends) or frozen (-STOP: silent, as a host that died without a word; needs the
/// witness). From the signal to the standby's "taking over" line.
fn takeover(signal: &str, witness: bool, runs: usize) {
    let mut times = Vec::new();
    for run in 0..runs {
        let dir =
            std::env::temp_dir().join(format!("ftvmm-bench-takeover-{}-{run}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let etcd = witness.then(integration_tests::witness::TestEtcd::start_local);
        let witness_args: Vec<String> = match &etcd {
            Some(e) => vec![
                "--witness".into(),
                e.url().into(),
                "--guest-name".into(),
                format!("bench-{run}"),
            ],
            None => vec![],
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let listen = format!("127.0.0.1:{port}");
        let pki = tls_pki(&dir, &[("a", &["127.0.0.1"]), ("b", &["127.0.0.1"])]);
        let mut standby_cmd = Command::new(ftvmm_bin());
        standby_cmd
            .args(["standby", "--listen", &listen, "--serial", "null"])
            .args(&witness_args)
            .arg("--tls")
            .arg(pki.join("b"));
        let mut standby = RunningVm::spawn(standby_cmd);
        standby.wait_for_stderr("standing by", DEADLINE);
        let mut primary_cmd = Command::new(ftvmm_bin());
        primary_cmd
            .args([
                "run",
                "--kernel",
                testguest().to_str().unwrap(),
                "--memory",
                "128",
            ])
            .args([
                "--cmdline",
                "mode=spin",
                "--standby",
                &listen,
                "--epoch-ms",
                "20",
            ])
            .args(&witness_args)
            .env("FTVMM_LOG", "replication=info")
            .arg("--tls")
            .arg(pki.join("a"));
        let mut primary = RunningVm::spawn(primary_cmd);
        primary.wait_for_stderr("guest protected by", DEADLINE);
        std::thread::sleep(Duration::from_millis(500));
        let t0 = Instant::now();
        let sent = Command::new("kill")
            .args([signal, &primary.pid().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        while !standby.stderr().contains("taking over from checkpoint") {
            assert!(t0.elapsed() < DEADLINE, "no takeover: {}", standby.stderr());
            std::thread::sleep(Duration::from_millis(1));
        }
        times.push(t0.elapsed());
        let _ = Command::new("kill")
            .args(["-KILL", &primary.pid().to_string()])
            .status();
        primary.kill();
        standby.kill();
        drop(etcd);
        let _ = std::fs::remove_dir_all(dir);
    }
    let s = stats(&times);
    println!(
        "takeover after kill {signal:<5} witness {:<3} | median {:.0} ms, min {:.0} ms, max {:.0} ms over {runs} runs",
        if witness { "yes" } else { "no" },
        s.median.as_secs_f64() * 1e3,
        s.min.as_secs_f64() * 1e3,
        s.max.as_secs_f64() * 1e3
    );
}

/// The test guest's key-value service (`mode=net`, 128 MiB) on host A of a [`TwoHosts`] topology,
/// protected (when `epoch_ms` is given) by a standby on host B, with etcd on the LAN as the witness
/// when asked; clients live on the LAN.
struct LanPair {
    hosts: TwoHosts,
    primary: RunningVm,
    standby: Option<RunningVm>,
    api: std::path::PathBuf,
    dir: std::path::PathBuf,
    _etcd: Option<integration_tests::witness::TestEtcd>,
}

impl LanPair {
    fn start(epoch_ms: Option<u64>, witness: bool) -> Self {
        let hosts = TwoHosts::new().expect("network namespaces");
        let etcd = witness
            .then(|| integration_tests::witness::TestEtcd::start(&hosts.lan, &hosts.lan_ip()));
        let witness_args: Vec<String> = match &etcd {
            Some(e) => vec![
                "--witness".into(),
                e.url().into(),
                "--guest-name".into(),
                "bench".into(),
            ],
            None => vec![],
        };
        let dir = std::env::temp_dir().join(format!(
            "ftvmm-bench-lan-{}-{}",
            std::process::id(),
            epoch_ms.unwrap_or(0)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let pki = tls_pki(&dir, &[("a", &[&hosts.a_ip()]), ("b", &[&hosts.b_ip()])]);
        let listen = format!("{}:7100", hosts.b_ip());
        let api = dir.join("primary.sock");
        let standby = epoch_ms.map(|_| {
            let mut cmd = hosts.b.command(ftvmm_bin().to_str().unwrap());
            cmd.args(["standby", "--listen", &listen, "--net", "tap=tap0"])
                .args(&witness_args)
                .args(["--serial", "null", "--tls"])
                .arg(pki.join("b"));
            let mut standby = RunningVm::spawn(cmd);
            standby.wait_for_stderr("standing by", DEADLINE);
            standby
        });
        let mut cmd = hosts.a.command(ftvmm_bin().to_str().unwrap());
        cmd.env("FTVMM_LOG", "replication=info")
            .args(["run", "--kernel", testguest().to_str().unwrap()])
            .args(["--memory", "128", "--net", "tap=tap0"])
            .args(["--cmdline", &format!("mode=net ip={}/24", hosts.guest_ip())])
            .args(&witness_args)
            .arg("--api-socket")
            .arg(&api)
            .arg("--tls")
            .arg(pki.join("a"));
        if let Some(epoch) = epoch_ms {
            cmd.args(["--standby", &listen, "--epoch-ms", &epoch.to_string()]);
        }
        let mut primary = RunningVm::spawn(cmd);
        primary.wait_for("testguest: net up", DEADLINE);
        if epoch_ms.is_some() {
            primary.wait_for_stderr("guest protected by", DEADLINE);
        }
        Self {
            hosts,
            primary,
            standby,
            api,
            dir,
            _etcd: etcd,
        }
    }

    fn kv_addr(&self) -> String {
        format!("{}:4000", self.hosts.guest_ip())
    }
}

impl Drop for LanPair {
    fn drop(&mut self) {
        self.primary.kill();
        if let Some(s) = self.standby.as_mut() {
            s.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Reply latency of the test guest's key-value service as a client on the LAN sees it (one
/// request at a time): the guest unprotected, then protected at 10, 40 and 100 epochs per second
/// with the standby on host B. Gating holds each reply until the checkpoint of its epoch commits:
/// on average half an epoch plus the commit, the floor printed.
fn reply_latency() {
    for epoch_ms in [None, Some(100u64), Some(25), Some(10)] {
        let pair = LanPair::start(epoch_ms, false);
        // Back to back, then with a random pause of up to an epoch between requests.
        let think = Duration::from_millis(epoch_ms.unwrap_or(0));
        let back_to_back = integration_tests::clients::round_trips(
            pair.hosts.lan.name(),
            pair.kv_addr(),
            Duration::from_secs(5),
            Duration::ZERO,
        )
        .join()
        .expect("client thread")
        .expect("round trips");
        let client = integration_tests::clients::round_trips(
            pair.hosts.lan.name(),
            pair.kv_addr(),
            Duration::from_secs(10),
            think,
        );
        let mut commits = Vec::new();
        while !client.is_finished() {
            if epoch_ms.is_some() {
                let out = run_ftvmm(
                    &[
                        "vm",
                        "--api-socket",
                        pair.api.to_str().unwrap(),
                        "protection",
                    ],
                    DEADLINE,
                );
                if let Ok(s) = serde_json::from_str::<serde_json::Value>(&out.stdout) {
                    commits.extend(ms(&s["last_commit_ms"]));
                }
            }
            std::thread::sleep(Duration::from_millis(97));
        }
        let replies = client.join().expect("client thread").expect("round trips");
        drop(pair);
        let r = stats(&replies);
        let (p50, p99) = (r.median.as_secs_f64() * 1e3, r.p99.as_secs_f64() * 1e3);
        let b = stats(&back_to_back);
        let (b50, b99) = (b.median.as_secs_f64() * 1e3, b.p99.as_secs_f64() * 1e3);
        match epoch_ms {
            None => println!(
                "reply latency unprotected            | p50 {p50:.2} ms p99 {p99:.2} ms | {} replies",
                replies.len() + back_to_back.len()
            ),
            Some(epoch) => {
                let commit = if commits.is_empty() {
                    0.0
                } else {
                    stats(&commits).median.as_secs_f64() * 1e3
                };
                let floor = epoch as f64 / 2.0 + commit;
                println!(
                    "reply latency at {:>3} epochs/s ({epoch:>3} ms) | requests at random times: p50 {p50:.2} ms p99 {p99:.2} ms, floor epoch/2 + commit {floor:.2} ms (commit median {commit:.2} ms), p50/floor {:.2}, {} replies | back to back: p50 {b50:.2} ms p99 {b99:.2} ms, {} replies",
                    1000 / epoch,
                    p50 / floor,
                    replies.len(),
                    back_to_back.len()
                );
            }
        }
    }
}

/// Failover as the client sees it: the longest wait for one reply (requests back to back, on one
/// connection) around the loss of the primary, killed (no witness needed) or frozen (SIGSTOP, with
/// the witness), at 40 epochs/s with the default failure timeout.
fn client_failover(signal: &str, witness: bool, runs: usize) {
    let mut gaps = Vec::new();
    for _ in 0..runs {
        let pair = LanPair::start(Some(25), witness);
        let client = integration_tests::clients::round_trips(
            pair.hosts.lan.name(),
            pair.kv_addr(),
            Duration::from_secs(6),
            Duration::ZERO,
        );
        std::thread::sleep(Duration::from_secs(2));
        let status = Command::new("kill")
            .args([signal, &pair.primary.pid().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        let replies = client.join().expect("client thread").expect("round trips");
        gaps.push(stats(&replies).max);
        drop(pair);
    }
    let g = stats(&gaps);
    println!(
        "client's longest wait for a reply across the primary's loss (kill {signal}, witness {}) | median {:.0} ms, min {:.0} ms, max {:.0} ms over {runs} runs",
        if witness { "yes" } else { "no " },
        g.median.as_secs_f64() * 1e3,
        g.min.as_secs_f64() * 1e3,
        g.max.as_secs_f64() * 1e3
    );
}

/// The guest's own throughput (`mode=spin work=1`: units of CPU and memory work per 10^9 TSC ticks,
/// 1 vCPU, so a core is left for the VMM's threads) unprotected and protected at 40 epochs/s
/// with the standby on loopback; prints both and the ratio.
fn guest_throughput() {
    let run = |protected: bool| -> f64 {
        let dir = std::env::temp_dir().join(format!(
            "ftvmm-bench-work-{}-{protected}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let pki = tls_pki(&dir, &[("a", &["127.0.0.1"]), ("b", &["127.0.0.1"])]);
        let mut standby = protected.then(|| {
            let mut cmd = Command::new(ftvmm_bin());
            cmd.args([
                "standby",
                "--listen",
                "127.0.0.1:0",
                "--serial",
                "null",
                "--tls",
            ])
            .arg(pki.join("b"));
            RunningVm::spawn(cmd)
        });
        let mut cmd = Command::new(ftvmm_bin());
        cmd.args(["run", "--kernel", testguest().to_str().unwrap()])
            .args(["--memory", "128", "--vcpus", "1"])
            .args(["--cmdline", "mode=spin work=1 seconds=12"]);
        if let Some(s) = standby.as_mut() {
            let addr = s.bound_address("standing by on ", DEADLINE);
            cmd.args(["--standby", &addr, "--epoch-ms", "25", "--tls"])
                .arg(pki.join("a"));
        }
        let mut vm = RunningVm::spawn(cmd);
        vm.wait_for("testguest: spun seconds=12", DEADLINE);
        let rates: Vec<f64> = vm
            .output()
            .lines()
            .filter_map(|l| l.strip_prefix("testguest: work units_per_gtsc="))
            .filter_map(|v| v.trim().parse().ok())
            .collect();
        vm.kill();
        if let Some(s) = standby.as_mut() {
            s.kill();
        }
        let _ = std::fs::remove_dir_all(dir);
        // The first seconds include protection's first copy of memory.
        let steady = &rates[rates.len().min(3)..];
        steady.iter().sum::<f64>() / steady.len().max(1) as f64
    };
    let unprotected = run(false);
    let protected = run(true);
    println!(
        "guest throughput (1 vCPU, units per 10^9 TSC ticks) | unprotected {unprotected:.0} | protected at 40 epochs/s {protected:.0} | ratio {:.3}",
        protected / unprotected
    );
}

fn main() {
    // FTVMM_BENCH_ONLY=epochs|copy|takeover|throughput|failover|latency runs one part alone.
    let only = std::env::var("FTVMM_BENCH_ONLY").ok();
    let run = |part: &str| only.as_deref().is_none_or(|o| o == part);
    if run("epochs") {
        println!("ftvmm protection benchmarks (test guest, 256 MiB, 2 vCPUs, standby over loopback, 10 s each)");
        protect("mode=spin", "50", &[]);
        protect("mode=spin dirty=10000 dirty_mb=64", "50", &[]);
        protect("mode=spin dirty=10000 dirty_mb=64", "20", &[]);
        protect("mode=spin", "auto", &[]);
        protect("mode=spin dirty=10000 dirty_mb=64", "auto", &[]);
        protect("mode=spin dirty=40000 dirty_mb=64", "auto", &[]);
    }
    if run("copy") {
        println!("checkpoint copy while paused against copy on write (256 MiB, 2 vCPUs, 50 ms epochs: about 1,000 and 10,000 dirty pages per epoch)");
        protect("mode=spin", "50", &[]);
        for dirty in ["dirty=20000", "dirty=200000"] {
            for copy in ["paused", "on-write"] {
                protect(
                    &format!("mode=spin {dirty} dirty_mb=64"),
                    "50",
                    &["--checkpoint-copy", copy],
                );
            }
        }
    }
    if run("takeover") {
        println!("takeover (128 MiB guest, epoch 20 ms, the default failure timeout (180 ms), standby and etcd on loopback)");
        takeover("-KILL", false, 5);
        takeover("-KILL", true, 5);
        takeover("-STOP", true, 5);
    }
    if run("throughput") {
        guest_throughput();
    }
    if run("failover") {
        println!("failover seen by a client (key-value service, 40 epochs/s, client on the LAN, standby on host B, etcd on the LAN)");
        client_failover("-KILL", false, 3);
        client_failover("-STOP", true, 3);
    }
    if run("latency") {
        println!(
            "reply latency (key-value service, 128 MiB guest, client on the LAN, standby on host B)"
        );
        reply_latency();
    }
}
