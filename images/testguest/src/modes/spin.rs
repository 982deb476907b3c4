//! `mode=spin`: bring every vCPU online (as `smp`, without the per-vCPU lines), print
//! `testguest: spinning cpus=N`, then spin in ring 3 on every vCPU forever: a guest that is
//! always running and never exits, for pause/resume and checkpoint benchmarks. With `dirty=N` the
//! boot vCPU also dirties N pages per second (see `dirtier.rs`). With `seconds=S` the boot vCPU
//! stops after S seconds, prints `testguest: spun seconds=S` and the guest powers off: a guest that
//! ends on its own while something (protection, a migration) is under way. With `work=1` the boot
//! vCPU does units of work (hash a 4 KiB page of a 1 MiB buffer, write the hash back into it: CPU
//! and memory bound, dirtying at most 256 pages) instead of spinning idle, and prints
//! `testguest: work units_per_gtsc=N` about every second: units per 10^9 TSC ticks, the guest's own
//! throughput, to compare protected with unprotected (the TSC runs at the host's rate whatever this
//! guest's calibration of it against the PIT says, which varies by 15 % from boot to boot).

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
        let mut work = (cmdline.get("work") == Some("1")).then(Work::new);
        loop {
            if let Some(d) = dirtier.as_mut() {
                d.tick();
            }
            if let Some(w) = work.as_mut() {
                w.run_for_a_while();
            }
            if deadline.is_some_and(time::expired) {
                println!("testguest: spun seconds={}", seconds.unwrap_or_default());
                return;
            }
            if work.is_none() {
                cpu::pause();
            }
        }
    }
}

/// CPU- and memory-bound units of work, counted per TSC tick.
struct Work {
    buffer: alloc::vec::Vec<u8>,
    next_page: usize,
    units: u64,
    started: u64,
    second_ends: u64,
}

impl Work {
    const PAGE: usize = 4096;
    const BUFFER: usize = 1 << 20;

    fn new() -> Self {
        Self {
            buffer: alloc::vec![1u8; Self::BUFFER],
            next_page: 0,
            units: 0,
            started: cpu::rdtsc(),
            second_ends: time::deadline_ms(1000),
        }
    }

    /// A batch of units, then the report if a second is over.
    fn run_for_a_while(&mut self) {
        for _ in 0..64 {
            let start = self.next_page * Self::PAGE;
            let page = &mut self.buffer[start..start + Self::PAGE];
            let mut hash = 0xcbf2_9ce4_8422_2325u64;
            for b in page.iter() {
                hash = (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
            }
            page[..8].copy_from_slice(&hash.to_le_bytes());
            self.next_page = (self.next_page + 1) % (Self::BUFFER / Self::PAGE);
            self.units += 1;
        }
        if time::expired(self.second_ends) {
            let now = cpu::rdtsc();
            let ticks = now.wrapping_sub(self.started).max(1);
            let per_gtsc = (u128::from(self.units) * 1_000_000_000 / u128::from(ticks)) as u64;
            println!("testguest: work units_per_gtsc={}", per_gtsc);
            self.units = 0;
            self.started = now;
            self.second_ends = time::deadline_ms(1000);
        }
    }
}
