//! `mode=crash what=<panic|ud|pf|gp>`: fail on purpose in ring 3, to test the guest's own failure
//! reports: `testguest: PANIC ...` (panic, the default) or `testguest: EXCEPTION vector=N ...`
//! (#UD from ud2, #PF from reading unmapped 4 GiB, #GP from a non-canonical address).

use super::Mode;
use crate::cmdline::Cmdline;
use crate::println;

pub const MODE: Mode = Mode {
    name: "crash",
    about: "fail on purpose: what=panic|ud|pf|gp",
    run,
};

fn run(cmdline: &Cmdline<'_>) {
    let what = cmdline.get("what").unwrap_or("panic");
    println!("testguest: crashing what={}", what);
    match what {
        "panic" => panic!("deliberate panic (mode=crash)"),
        // SAFETY (all three): deliberately faulting; the exception handler powers off.
        "ud" => unsafe { core::arch::asm!("ud2", options(nomem, nostack)) },
        "pf" => unsafe {
            core::ptr::read_volatile(core::ptr::with_exposed_provenance::<u64>(0x1_0000_0000));
        },
        "gp" => unsafe {
            core::ptr::read_volatile(core::ptr::with_exposed_provenance::<u64>(
                0x8000_0000_0000_0000,
            ));
        },
        other => println!("testguest: FAIL unknown what={}", other),
    }
}
