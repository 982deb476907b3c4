//! Live-migration benchmarks (run by `scripts/bench-migration`): downtime and total time of migrating
//! a 512 MiB test guest between two ftvmm processes over loopback, idle and while it dirties memory
//! at a set rate; and the cost of one dirty-tracking round. Prints figures; asserts nothing on time.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use integration_tests::{ftvmm_bin, run_ftvmm, stats, testguest, tls_pki, RunningVm};
use vmm::{CpuFeatures, Machine, SerialOutput, VmConfig};

const RUNS: usize = 5;
const MEMORY_MIB: u64 = 512;
const DEADLINE: Duration = Duration::from_secs(300);

struct Outcome {
    downtime_ms: f64,
    total_ms: f64,
    rounds: u64,
    mib_sent: f64,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ftvmm-bench-mig-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn migrate_once(cmdline: &str, run: usize) -> Outcome {
    let dir = scratch(&format!("run{run}"));
    let pki = tls_pki(&dir, &[("a", &["127.0.0.1"]), ("b", &["127.0.0.1"])]);
    let sock = dir.join("src.sock");
    let mut src_cmd = Command::new(ftvmm_bin());
    src_cmd
        .args([
            "run",
            "--kernel",
            testguest().to_str().unwrap(),
            "--memory",
            &MEMORY_MIB.to_string(),
        ])
        .args([
            "--vcpus",
            "2",
            "--cmdline",
            cmdline,
            "--api-socket",
            sock.to_str().unwrap(),
        ])
        .arg("--tls")
        .arg(pki.join("a"));
    let mut src = RunningVm::spawn(src_cmd);
    src.wait_for("testguest: spinning", DEADLINE);
    let listen = format!("127.0.0.1:{}", free_port());
    let mut dst_cmd = Command::new(ftvmm_bin());
    dst_cmd.args(["receive", "--listen", &listen, "--serial", "null"]);
    dst_cmd.arg("--tls").arg(pki.join("b"));
    let mut dst = RunningVm::spawn(dst_cmd);
    dst.wait_for_stderr("waiting for a migration", DEADLINE);
    // Let the dirtying workload reach its rate.
    std::thread::sleep(Duration::from_millis(500));
    let out = run_ftvmm(
        &[
            "vm",
            "--api-socket",
            sock.to_str().unwrap(),
            "migrate",
            "--to",
            &listen,
            "--downtime-ms",
            "50",
        ],
        DEADLINE,
    );
    assert_eq!(out.code(), Some(0), "migration failed: {out:?}");
    let s: serde_json::Value = serde_json::from_str(&out.stdout).expect("migration status JSON");
    dst.kill();
    src.kill();
    let _ = std::fs::remove_dir_all(dir);
    Outcome {
        downtime_ms: s["downtime_ms"].as_f64().unwrap_or(f64::NAN),
        total_ms: s["elapsed_ms"].as_f64().unwrap_or(f64::NAN),
        rounds: s["round"].as_u64().unwrap_or(0),
        mib_sent: s["bytes_sent"].as_f64().unwrap_or(0.0) / (1 << 20) as f64,
    }
}

fn report(name: &str, outcomes: &[Outcome]) {
    let ms = |v: f64| Duration::from_secs_f64(v / 1e3);
    let down = stats(
        &outcomes
            .iter()
            .map(|o| ms(o.downtime_ms))
            .collect::<Vec<_>>(),
    );
    let total = stats(&outcomes.iter().map(|o| ms(o.total_ms)).collect::<Vec<_>>());
    let rounds: Vec<u64> = outcomes.iter().map(|o| o.rounds).collect();
    let sent: Vec<String> = outcomes
        .iter()
        .map(|o| format!("{:.0}", o.mib_sent))
        .collect();
    println!(
        "{name:<34} downtime median {:>8.2} ms max {:>8.2} ms | total median {:>8.1} ms max {:>8.1} ms | rounds {rounds:?} | MiB sent {}",
        down.median.as_secs_f64() * 1e3,
        down.max.as_secs_f64() * 1e3,
        total.median.as_secs_f64() * 1e3,
        total.max.as_secs_f64() * 1e3,
        sent.join(",")
    );
}

/// Time of one dirty-tracking round (KVM_GET_DIRTY_LOG, or a dirty-ring harvest, + the VMM bitmap)
/// on a guest dirtying memory.
fn dirty_round_cost(pages_per_s: u32, dirty_ring: Option<u32>) {
    let log = std::env::temp_dir().join(format!("ftvmm-bench-dirty-{}.log", std::process::id()));
    let config = VmConfig {
        kernel: Some(testguest()),
        firmware: None,
        initrd: None,
        cmdline: format!("mode=spin dirty={pages_per_s}"),
        vcpus: 1,
        memory_mib: MEMORY_MIB,
        serial: SerialOutput::File(log.clone()),
        cpu_features: CpuFeatures::default(),
        disks: Vec::new(),
        nets: Vec::new(),
        dirty_ring,
        hyperv: Default::default(),
        serial_input: false,
    };
    let mut machine = Machine::build(&config).expect("build");
    machine.start().expect("start");
    let t0 = Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("spinning")
    {
        assert!(t0.elapsed() < DEADLINE);
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut tracker = machine.dirty_tracker();
    tracker
        .start(machine.vm(), machine.memory())
        .expect("start dirty logging");
    let mut samples = Vec::new();
    let mut pages = Vec::new();
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(20));
        let t = Instant::now();
        tracker
            .collect(machine.vm(), machine.memory())
            .expect("collect");
        samples.push(t.elapsed());
        pages.push(tracker.take().count());
    }
    tracker.stop(machine.vm(), machine.memory()).expect("stop");
    drop(machine);
    let _ = std::fs::remove_file(log);
    let s = stats(&samples);
    pages.sort_unstable();
    let kind = match dirty_ring {
        Some(n) => format!("dirty-ring ({n} entries)"),
        None => "dirty-log".to_string(),
    };
    println!(
        "{kind} round, {MEMORY_MIB} MiB, {pages_per_s} pages/s     median {:.3} ms p99 {:.3} ms | pages per 20 ms round: median {}",
        s.median.as_secs_f64() * 1e3,
        s.p99.as_secs_f64() * 1e3,
        pages[pages.len() / 2]
    );
}

fn main() {
    println!("ftvmm migration benchmarks ({RUNS} runs each; test guest, {MEMORY_MIB} MiB, 2 vCPUs, loopback)");
    let idle: Vec<Outcome> = (0..RUNS).map(|i| migrate_once("mode=spin", i)).collect();
    report("idle", &idle);
    let rate = 10_000;
    let dirty: Vec<Outcome> = (0..RUNS)
        .map(|i| migrate_once(&format!("mode=spin dirty={rate} dirty_mb=128"), i))
        .collect();
    report(
        &format!(
            "dirtying {rate} pages/s (~{} MB/s)",
            rate * 4096 / 1_000_000
        ),
        &dirty,
    );
    for ring in [None, Some(4096)] {
        dirty_round_cost(0, ring);
        dirty_round_cost(rate, ring);
    }
}
