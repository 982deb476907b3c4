//! TSC timing: the TSC frequency (calibrated against PIT channel 2, else CPUID 0x15/0x16, else a
//! guess), busy-wait delays and deadlines. Calibration runs once, lazily, on the BSP.

use super::cpu::{cpuid, inb, outb, pause, rdtsc};
use core::sync::atomic::{AtomicU64, Ordering};

const PIT_HZ: u64 = 1_193_182;
const PIT_CH2_DATA: u16 = 0x42;
const PIT_COMMAND: u16 = 0x43;
const PORT_61: u16 = 0x61;
/// Calibration window.
const CALIBRATE_MS: u64 = 50;
/// Used when nothing better is known.
const FALLBACK_HZ: u64 = 3_000_000_000;

static TSC_HZ: AtomicU64 = AtomicU64::new(0);
static TSC_SOURCE: AtomicU64 = AtomicU64::new(0);

/// Where the TSC frequency came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Pit,
    Cpuid15,
    Cpuid16,
    Fallback,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::Pit => "pit",
            Source::Cpuid15 => "cpuid15",
            Source::Cpuid16 => "cpuid16",
            Source::Fallback => "fallback",
        }
    }
}

/// Measures the TSC over `CALIBRATE_MS` of PIT channel 2 (mode 0, gate on, speaker off).
fn calibrate_pit() -> Option<u64> {
    let latch = PIT_HZ * CALIBRATE_MS / 1000;
    outb(PORT_61, (inb(PORT_61) & !0x02) | 0x01);
    outb(PIT_COMMAND, 0xb0); // channel 2, lobyte/hibyte, mode 0, binary
    outb(PIT_CH2_DATA, (latch & 0xff) as u8);
    outb(PIT_CH2_DATA, (latch >> 8) as u8);
    let start = rdtsc();
    // Each port read is a VM exit; bound the loop by count, not by the TSC being sane.
    for _ in 0..1_000_000u32 {
        if inb(PORT_61) & 0x20 != 0 {
            let cycles = rdtsc().wrapping_sub(start);
            let hz = cycles * 1000 / CALIBRATE_MS;
            // Reject nonsense (a PIT that fired at once, or a stuck TSC).
            return (hz > 10_000_000).then_some(hz);
        }
    }
    None
}

fn from_cpuid() -> Option<(u64, Source)> {
    let max = cpuid(0, 0).0;
    if max >= 0x15 {
        let (den, num, crystal, _) = cpuid(0x15, 0);
        if den != 0 && num != 0 && crystal != 0 {
            return Some((
                u64::from(crystal) * u64::from(num) / u64::from(den),
                Source::Cpuid15,
            ));
        }
    }
    if max >= 0x16 {
        let mhz = cpuid(0x16, 0).0 & 0xffff;
        if mhz != 0 {
            return Some((u64::from(mhz) * 1_000_000, Source::Cpuid16));
        }
    }
    None
}

/// TSC ticks per second (calibrated on first use).
pub fn tsc_hz() -> (u64, Source) {
    let hz = TSC_HZ.load(Ordering::Acquire);
    if hz != 0 {
        let src = match TSC_SOURCE.load(Ordering::Relaxed) {
            0 => Source::Pit,
            1 => Source::Cpuid15,
            2 => Source::Cpuid16,
            _ => Source::Fallback,
        };
        return (hz, src);
    }
    let (hz, src) = match calibrate_pit() {
        Some(hz) => (hz, Source::Pit),
        None => from_cpuid().unwrap_or((FALLBACK_HZ, Source::Fallback)),
    };
    TSC_SOURCE.store(src as u64, Ordering::Relaxed);
    TSC_HZ.store(hz, Ordering::Release);
    (hz, src)
}

/// A point in TSC time `ms` milliseconds from now.
pub fn deadline_ms(ms: u64) -> u64 {
    let hz = tsc_hz().0;
    rdtsc().saturating_add(hz / 1000 * ms)
}

/// Whether `deadline` (from `deadline_ms`) has passed.
pub fn expired(deadline: u64) -> bool {
    rdtsc() >= deadline
}

/// Busy-waits `us` microseconds.
pub fn delay_us(us: u64) {
    let hz = tsc_hz().0;
    let end = rdtsc().saturating_add(hz / 1_000_000 * us);
    while rdtsc() < end {
        pause();
    }
}
