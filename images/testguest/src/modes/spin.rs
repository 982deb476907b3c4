//! `mode=spin`: bring every vCPU online (as `smp`, without the per-vCPU lines), print
//! `testguest: spinning cpus=N`, then spin in ring 3 on every vCPU forever: a guest that is
//! always running and never exits, for pause/resume and checkpoint benchmarks. With `dirty=N` the
//! boot vCPU also dirties N pages per second (see `dirtier.rs`).

use super::Mode;
use crate::arch::cpu;
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
    if let Some(online) = super::smp::bring_up("spin", false) {
        if let Some(d) = &dirtier {
            println!("testguest: dirtying pages_per_s={} buffer_mb={}", d.rate(), d.buffer_mb());
        }
        println!("testguest: spinning cpus={}", online);
        loop {
            if let Some(d) = dirtier.as_mut() {
                d.tick();
            }
            cpu::pause();
        }
    }
}
