//! `mode=pm-flood`: a guest that writes the ACPI sleep control register (port 0x600) with a sleep
//! type the VMM does not support, as fast as it can for `seconds=` (default 5) seconds, so that
//! each write would log a warning: the VMM's log must stay small. Prints
//! `testguest: pm-flood writes=N`.

use super::Mode;
use crate::arch::{cpu, time};
use crate::cmdline::Cmdline;
use crate::println;

pub const MODE: Mode = Mode {
    name: "pm-flood",
    about: "write an unsupported ACPI sleep type in a loop for seconds=S (default 5)",
    run,
};

/// The hardware-reduced sleep control register (the FADT's SLEEP_CONTROL_REG).
const SLEEP_CONTROL: u16 = 0x600;
/// SLP_EN with sleep type 3 (S3, which the VMM does not offer).
const SLEEP_S3: u8 = (1 << 5) | (3 << 2);

fn run(cmdline: &Cmdline<'_>) {
    let seconds = match cmdline.get_u64("seconds") {
        None => 5,
        Some(Ok(s)) => s,
        Some(Err(_)) => {
            println!("testguest: pm-flood FAIL seconds= needs a whole number");
            return;
        }
    };
    let deadline = time::deadline_ms(seconds * 1000);
    let mut writes: u64 = 0;
    while !time::expired(deadline) {
        for _ in 0..1000 {
            cpu::outb(SLEEP_CONTROL, SLEEP_S3);
        }
        writes += 1000;
    }
    println!("testguest: pm-flood writes={}", writes);
}
