//! False takeovers under ordinary network trouble (run by `scripts/bench-faults`): a protected
//! guest with a disk and a witness, the default failure timeout (180 ms), its client counting, and
//! the replication link impaired by `ftvmm-impair` (loss at several rates, then jitter) for a
//! while each. A false takeover is anything that gives up on a healthy copy: the standby asking
//! the witness for the guest, taking it over, or the primary going on without its standby. Prints
//! one line per run and a table; the client checks every acknowledged write as it goes.
//!
//! Also what the standby's durability costs (`durability`): the same guest, its key-value store
//! flushed to its disk before every reply, with a client as fast as the replies come, unimpaired —
//! run it against a build without standby syncs (`FTVMM_BIN`) for the difference.
//!
//! FTVMM_BENCH_SECONDS (default 60): how long each loss rate runs; FTVMM_BENCH_LONG_SECONDS
//! (default 600): the 1 % loss and the 60 ms jitter runs; FTVMM_BENCH_ONLY=loss|long|durability
//! runs one part.

use std::time::{Duration, Instant};

use impair::link::LinkImpairment;
use integration_tests::protected_pair::{PairOptions, ProtectedPair};

/// The outcome of one impaired run.
struct Outcome {
    seconds: f64,
    false_takeovers: u32,
    what: String,
    acknowledged: u64,
    packets_dropped: u64,
    packets_delayed: u64,
}

/// Runs a protected pair with `impairment` on its replication link for `seconds`; stops at the
/// first false takeover.
fn impaired_run(name: &str, impairment: LinkImpairment, seconds: u64) -> Outcome {
    let pair = ProtectedPair::start_opts(
        name,
        PairOptions {
            witness: true,
            disk: true,
            ..PairOptions::new(180)
        },
    );
    pair.wait_acknowledged(10, "before the impairment");
    let running = impair::link::spawn_in_netns(
        pair.hosts.a.name(),
        &LinkImpairment {
            ports: vec![7100],
            ..impairment
        },
    )
    .expect("ftvmm-impair");
    let start_acks = pair.acknowledged();
    let t0 = Instant::now();
    let mut what = String::new();
    while t0.elapsed() < Duration::from_secs(seconds) {
        let standby = pair.standby.stderr();
        let state = pair.protection()["state"]
            .as_str()
            .unwrap_or("")
            .to_string();
        if standby.contains("asking the witness") {
            what = "the standby asked the witness".into();
        } else if standby.contains("taking over") {
            what = "the standby took over".into();
        } else if state != "protected" {
            what = format!("the primary is {state}");
        }
        if !what.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let seconds = t0.elapsed().as_secs_f64();
    let counters = running.stop().expect("stop ftvmm-impair");
    let acknowledged = pair.acknowledged() - start_acks;
    pair.finish();
    Outcome {
        seconds,
        false_takeovers: u32::from(!what.is_empty()),
        what,
        acknowledged,
        packets_dropped: counters.dropped,
        packets_delayed: counters.delayed,
    }
}

fn report(label: &str, o: &Outcome) {
    println!(
        "{label:<26} | {:>5.0} s | false takeovers {} {}| {} increments acknowledged, none lost | \
         {} packets dropped, {} delayed",
        o.seconds,
        o.false_takeovers,
        if o.what.is_empty() {
            String::new()
        } else {
            format!("({}) ", o.what)
        },
        o.acknowledged,
        o.packets_dropped,
        o.packets_delayed
    );
}

/// A protected guest with a disk whose every reply waits for a flushed log write, a client as fast
/// as the replies come, for `seconds`: increments per second and the commit latency.
fn durability(seconds: u64) {
    let pair = ProtectedPair::start_opts(
        "bench-durability",
        PairOptions {
            witness: true,
            disk: true,
            ..PairOptions::new(180)
        },
    );
    pair.wait_acknowledged(10, "before measuring");
    let (start, t0) = (pair.acknowledged(), Instant::now());
    let mut commits = Vec::new();
    while t0.elapsed() < Duration::from_secs(seconds) {
        if let Some(ms) = pair.protection()["last_commit_ms"].as_f64() {
            commits.push(Duration::from_secs_f64(ms / 1e3));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let rate = (pair.acknowledged() - start) as f64 / t0.elapsed().as_secs_f64();
    let s = integration_tests::stats(&commits);
    println!(
        "durability: {rate:.1} increments/s (each flushed to the disk before its reply); commit \
         median {:.1} ms, p99 {:.1} ms over {} samples",
        s.median.as_secs_f64() * 1e3,
        s.p99.as_secs_f64() * 1e3,
        commits.len()
    );
    pair.finish();
}

fn env_seconds(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let only = std::env::var("FTVMM_BENCH_ONLY").ok();
    let run = |part: &str| only.as_deref().is_none_or(|o| o == part);
    println!(
        "false takeovers: protected test guest (128 MiB, a 16 MiB disk, etcd witness, 50 ms \
         epochs, failure timeout 180 ms), the replication link impaired both ways"
    );
    if run("loss") {
        let seconds = env_seconds("FTVMM_BENCH_SECONDS", 60);
        for loss in [0.1, 0.5, 1.0, 2.0, 5.0] {
            let o = impaired_run(
                "bench-loss",
                LinkImpairment {
                    loss,
                    ..Default::default()
                },
                seconds,
            );
            report(&format!("loss {loss} %"), &o);
        }
    }
    if run("durability") {
        durability(env_seconds("FTVMM_BENCH_SECONDS", 60));
    }
    if run("long") {
        let seconds = env_seconds("FTVMM_BENCH_LONG_SECONDS", 600);
        let o = impaired_run(
            "bench-loss-long",
            LinkImpairment {
                loss: 1.0,
                ..Default::default()
            },
            seconds,
        );
        report("loss 1 % (long)", &o);
        let o = impaired_run(
            "bench-jitter-long",
            LinkImpairment {
                delay_ms: 30,
                jitter_ms: 30,
                ..Default::default()
            },
            seconds,
        );
        report("jitter 0-60 ms (long)", &o);
    }
}
