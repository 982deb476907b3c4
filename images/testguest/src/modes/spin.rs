//! `mode=spin`: bring every vCPU online (as `smp`, without the per-vCPU lines), print
//! `testguest: spinning cpus=N`, then spin in ring 3 on every vCPU forever: a guest that is
//! always running and never exits, for pause/resume and checkpoint benchmarks.

use super::Mode;
use crate::arch::cpu;
use crate::cmdline::Cmdline;
use crate::println;

pub const MODE: Mode = Mode {
    name: "spin",
    about: "start all vCPUs and spin forever",
    run,
};

fn run(_cmdline: &Cmdline<'_>) {
    if let Some(online) = super::smp::bring_up("spin", false) {
        println!("testguest: spinning cpus={}", online);
        loop {
            cpu::pause();
        }
    }
}
