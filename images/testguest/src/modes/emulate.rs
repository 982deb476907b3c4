//! `mode=emulate`: runs, in ring 0, the instructions a stock kernel executes that some hosts' KVM
//! cannot emulate (`popcnt`, `int3` with a handler that returns, `fwait`, `ldmxcsr`/`stmxcsr`, and
//! `stac`/`clac` when the CPU has SMAP), then checks the results in ring 3. On native KVM they simply run; on a host whose
//! KVM emulates ring 0, ftvmm's emulation fallback completes them. Prints
//! `testguest: emulate ok popcnt=N smap=yes|no` or `testguest: emulate FAIL ...`, then powers off.

use super::Mode;
use crate::arch::cpu;
use crate::arch::idt::{tg_svc_call_arg, EMULATE_MXCSR, EMULATE_PROBE, SVC_EMULATE_PROBE};
use crate::cmdline::Cmdline;
use crate::println;

pub const MODE: Mode = Mode {
    name: "emulate",
    about: "run popcnt, int3, fwait, stac/clac in ring 0 and check them",
    run,
};

fn run(_cmdline: &Cmdline<'_>) {
    let smap = cpu::cpuid(7, 0).1 & (1 << 20) != 0;
    // SAFETY: service 2 only runs the probe instructions in ring 0 and returns; stac/clac are
    // requested only when CPUID says the CPU has them.
    let got = unsafe { tg_svc_call_arg(SVC_EMULATE_PROBE, u64::from(smap)) };
    let want = u64::from(EMULATE_PROBE.count_ones());
    // The ring-0 ldmxcsr must be visible here (MXCSR is per CPU, not per privilege level).
    let mxcsr = read_mxcsr();
    // SAFETY: restores the reset MXCSR value (all exceptions masked, round to nearest).
    unsafe { core::arch::asm!("ldmxcsr [{}]", in(reg) &0x1f80u32, options(nostack)) };
    if got != want {
        println!("testguest: emulate FAIL popcnt returned {} instead of {}", got, want);
    } else if mxcsr != EMULATE_MXCSR {
        println!("testguest: emulate FAIL mxcsr={:#x} after ldmxcsr {:#x}", mxcsr, EMULATE_MXCSR);
    } else {
        println!(
            "testguest: emulate ok popcnt={} mxcsr={:#x} smap={}",
            got,
            mxcsr,
            if smap { "yes" } else { "no" }
        );
    }
}

fn read_mxcsr() -> u32 {
    let mut v = 0u32;
    // SAFETY: stmxcsr writes 4 bytes to a local.
    unsafe { core::arch::asm!("stmxcsr [{}]", in(reg) &mut v, options(nostack)) };
    v
}
