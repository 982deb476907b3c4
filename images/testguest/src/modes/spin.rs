//! `mode=spin`: bring every vCPU online (as `smp`, without the per-vCPU lines), print
//! `testguest: spinning cpus=N`, then spin in ring 3 on every vCPU forever: a guest that is
//! always running and never exits, for pause/resume and checkpoint benchmarks. With `dirty=N` the
//! boot vCPU also dirties N pages per second (see `dirtier.rs`). With `seconds=S` the boot vCPU
//! stops after S seconds, prints `testguest: spun seconds=S` and the guest powers off: a guest that
//! ends on its own while something (protection, a migration) is under way.

use super::Mode;
use crate::arch::{cpu, time};
use crate::cmdline::Cmdline;
use crate::println;

pub const MODE: Mode = Mode {
    name: "spin",
    about: "start all vCPUs and spin forever",
    run,
};

fn run(cmdline: &Cmdline<'_>) {
    let mut dirtier = match super::dirtier::Dirtier::from_cmdline(cmdline, crate::arch::time::tsc_hz().0) {
        Ok(d) => d,
        Err(e) => {
            println!("testguest: FAIL {}", e);
            return;
        }
    };
    let seconds = match cmdline.get("seconds").map(str::parse::<u64>) {
        None => None,
        Some(Ok(s)) => Some(s),
        Some(Err(_)) => {
            println!("testguest: FAIL seconds= needs a whole number");
            return;
        }
    };
    if let Some(online) = super::smp::bring_up("spin", false) {
        if let Some(d) = &dirtier {
            println!("testguest: dirtying pages_per_s={} buffer_mb={}", d.rate(), d.buffer_mb());
        }
        println!("testguest: spinning cpus={}", online);
        let deadline = seconds.map(|s| time::deadline_ms(s * 1000));
        loop {
            if let Some(d) = dirtier.as_mut() {
                d.tick();
            }
            if deadline.is_some_and(time::expired) {
                println!("testguest: spun seconds={}", seconds.unwrap_or_default());
                return;
            }
            cpu::pause();
        }
    }
}
