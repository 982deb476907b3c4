//! Boot and pause benchmarks (run by `scripts/bench-boot`): test-guest boot-to-marker time, VMM
//! start-up cost, and the cost of pausing and resuming all vCPUs. Prints figures; asserts nothing.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::{ftvmm_bin, stats, testguest, Stats};
use vmm::{CpuFeatures, Machine, SerialOutput, VmConfig};

fn fmt(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

fn print(name: &str, s: Stats) {
    println!(
        "{name:<44} median {:>12}  p99 {:>12}  min {:>12}  max {:>12}",
        fmt(s.median),
        fmt(s.p99),
        fmt(s.min),
        fmt(s.max)
    );
}

/// Spawns `ftvmm run` on the test guest and returns (time to the marker line, time to exit).
fn boot_to_marker(cmdline: &str, vcpus: u8, marker: &str) -> (Duration, Duration) {
    let start = Instant::now();
    let mut child = Command::new(ftvmm_bin())
        .args(["run", "--kernel"])
        .arg(testguest())
        .args([
            "--cmdline",
            cmdline,
            "--vcpus",
            &vcpus.to_string(),
            "--memory",
            "128",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn ftvmm");
    let mut to_marker = None;
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line.expect("read guest output");
        if to_marker.is_none() && line.contains(marker) {
            to_marker = Some(start.elapsed());
        }
    }
    let status = child.wait().expect("wait ftvmm");
    assert!(status.success(), "ftvmm failed: {status}");
    (to_marker.expect("marker seen"), start.elapsed())
}

fn config(cmdline: &str, vcpus: u8, serial: SerialOutput) -> VmConfig {
    VmConfig {
        kernel: Some(testguest()),
        firmware: None,
        initrd: None,
        cmdline: cmdline.into(),
        vcpus,
        memory_mib: 128,
        serial,
        cpu_features: CpuFeatures::default(),
        disks: Vec::new(),
        nets: Vec::new(),
        dirty_ring: None,
        hyperv: Default::default(),
        serial_input: false,
    }
}

/// Pauses and resumes a running guest whose vCPUs all spin in ring 3, `rounds` times. Returns the
/// statistics of (pause latency, resume until every vCPU runs again, pause+resume). Each round starts
/// with every vCPU back in the guest.
fn pause_resume(vcpus: u8, rounds: usize) -> (Stats, Stats, Stats) {
    let log = std::env::temp_dir().join(format!(
        "ftvmm-bench-spin-{}-{vcpus}.log",
        std::process::id()
    ));
    let mut machine = Machine::build(&config("mode=spin", vcpus, SerialOutput::File(log.clone())))
        .expect("build VM");
    machine.start().expect("start VM");
    let deadline = Instant::now() + Duration::from_secs(120);
    let ready = format!("testguest: spinning cpus={vcpus}");
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains(&ready)
    {
        assert!(Instant::now() < deadline, "guest never reported {ready:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    let (mut pause, mut resume, mut both) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let t = Instant::now();
        machine.pause().expect("pause");
        let paused = t.elapsed();
        machine.resume();
        assert!(
            machine.wait_running(Duration::from_secs(10)),
            "vCPUs did not resume"
        );
        let total = t.elapsed();
        pause.push(paused);
        resume.push(total - paused);
        both.push(total);
        // Let the guest run between epochs, as replication would.
        std::thread::sleep(Duration::from_millis(1));
    }
    drop(machine);
    let _ = std::fs::remove_file(log);
    (stats(&pause), stats(&resume), stats(&both))
}

fn main() {
    // `cargo bench` passes --bench; nothing to parse.
    const RUNS: usize = 10;
    println!("ftvmm boot benchmarks ({RUNS} runs each; test guest, 128 MiB)");

    let mut marker = Vec::new();
    let mut exit = Vec::new();
    for _ in 0..RUNS {
        let (m, e) = boot_to_marker("mode=hello", 1, "testguest: hello");
        marker.push(m);
        exit.push(e);
    }
    print("boot to 'testguest: hello' (process start)", stats(&marker));
    print("ftvmm run, hello, start to exit", stats(&exit));

    let mut smp = Vec::new();
    for _ in 0..RUNS {
        smp.push(boot_to_marker("mode=smp", 8, "testguest: smp ok cpus=8").0);
    }
    print("boot to 'smp ok' with 8 vCPUs", stats(&smp));

    let mut build = Vec::new();
    for _ in 0..RUNS {
        let t = Instant::now();
        let m = Machine::build(&config("mode=hello", 1, SerialOutput::Null)).expect("build");
        build.push(t.elapsed());
        drop(m);
    }
    print("VMM start-up (Machine::build, 1 vCPU)", stats(&build));

    for vcpus in [1u8, 2, 8] {
        let (pause, resume, both) = pause_resume(vcpus, 500);
        print(&format!("pause all vCPUs ({vcpus} vCPUs)"), pause);
        print(&format!("resume until all run ({vcpus} vCPUs)"), resume);
        print(&format!("pause+resume all vCPUs ({vcpus} vCPUs)"), both);
    }
}
