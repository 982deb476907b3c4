//! `mode=triple`: triple-fault on purpose through the ring-0 service call (the VMM should see a
//! shutdown, not a power-off).

use super::Mode;
use crate::arch::cpu;
use crate::cmdline::Cmdline;
use crate::println;

pub const MODE: Mode = Mode {
    name: "triple",
    about: "triple-fault the machine",
    run,
};

fn run(_cmdline: &Cmdline<'_>) {
    println!("testguest: triple-faulting");
    cpu::triple_fault();
}
