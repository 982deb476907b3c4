//! `mode=smp`: find the CPUs in the MADT (parsed by the `acpi` crate), start every AP with
//! INIT/STARTUP IPIs, and have every vCPU (BSP included) print exactly one line
//! `vcpu apic_id=N online` (no prefix: tests match the whole line). The BSP then prints
//! `testguest: smp ok cpus=N`, or `testguest: smp FAIL ...` on a timeout (`expected=N online=M`)
//! or an inconsistency (an APIC id reported twice or not enabled in the MADT). APs spin with
//! `pause` after reporting.
//!
//! A CPU's APIC id is read from its LAPIC ID register, which KVM derives from the vCPU id the VMM
//! gave it. CPUID's initial APIC id (leaf 1 EBX[31:24], which the VMM also sets) is compared and a
//! difference printed as a `note`, not a failure: this code runs in ring 3, where a PVM host lets
//! `cpuid` execute natively and report the host CPU's own id (docs/boot-abi.md, notes for guest authors). The
//! VMM's CPUID topology is unit-tested in vmm/src/arch/cpuid.rs.
//! `bring_up` is shared with other modes that need every vCPU running (e.g. `spin`).

use super::Mode;
use crate::acpi_tables;
use crate::arch::apic::LocalApic;
use crate::arch::gdt::MAX_CPUS;
use crate::arch::smp::{self, StartError};
use crate::arch::{cpu, time};
use crate::cmdline::Cmdline;
use crate::println;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};

pub const MODE: Mode = Mode {
    name: "smp",
    about: "start all APs, each reports its APIC id",
    run,
};

/// How long one AP may take to reach long mode (its ring 0 is emulated: milliseconds here).
const PER_AP_START_MS: u64 = 5_000;
/// How long the BSP waits for the reports, per expected CPU.
const PER_CPU_REPORT_MS: u64 = 5_000;

/// CPUs that have reported.
static ONLINE: AtomicUsize = AtomicUsize::new(0);
/// Whether each CPU prints its `vcpu apic_id=N online` line.
static PRINT_LINES: AtomicBool = AtomicBool::new(true);
/// Per CPU index: APIC id from the LAPIC ID register + 1 (0 = not reported).
static LAPIC_IDS: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(0) }; MAX_CPUS];
static LAPIC_BASE: AtomicU64 = AtomicU64::new(crate::arch::apic::DEFAULT_BASE);

/// Records (and prints, unless quiet) this CPU's APIC id. Once per CPU.
fn report(cpu_index: usize) {
    let id = LocalApic::new(LAPIC_BASE.load(Ordering::SeqCst)).id();
    LAPIC_IDS[cpu_index].store(id + 1, Ordering::SeqCst);
    if PRINT_LINES.load(Ordering::SeqCst) {
        println!("vcpu apic_id={} online", id);
        let cpuid_id = cpu::apic_id();
        if cpuid_id != id {
            println!(
                "testguest: note: vcpu apic_id={} reads cpuid apic_id={} (cpuid not intercepted)",
                id, cpuid_id
            );
        }
    }
    ONLINE.fetch_add(1, Ordering::SeqCst);
}

fn ap_main(cpu_index: usize) -> ! {
    report(cpu_index);
    loop {
        cpu::pause();
    }
}

/// Brings every enabled CPU of the MADT online (each one runs `report`; APs then spin).
/// `tag` names the mode in progress and failure lines (`testguest: <tag> FAIL ...`).
/// Returns the number of CPUs online, or `None` after printing a FAIL line.
pub fn bring_up(tag: &str, print_lines: bool) -> Option<usize> {
    PRINT_LINES.store(print_lines, Ordering::SeqCst);
    let fail = |why: String| {
        println!("testguest: {} FAIL {}", tag, why);
        None
    };
    let (tables, _) = match acpi_tables::load() {
        Ok(t) => t,
        Err(e) => return fail(format!("acpi {:?}", e)),
    };
    let madt = match acpi_tables::read_madt(&tables) {
        Ok(m) => m,
        Err(e) => return fail(format!("madt {:?}", e)),
    };
    for l in &madt.lapics {
        println!(
            "testguest: madt lapic acpi_id={} apic_id={} {}{}",
            l.acpi_id,
            l.apic_id,
            if l.enabled { "enabled" } else { "disabled" },
            if l.x2apic { " x2apic" } else { "" }
        );
    }
    let expected = madt.enabled().count();
    if madt.lapic_addr >= 1 << 32 {
        return fail(format!("lapic_addr={:#x} above 4 GiB", madt.lapic_addr));
    }
    LAPIC_BASE.store(madt.lapic_addr, Ordering::SeqCst);
    let apic = LocalApic::new(madt.lapic_addr);
    let bsp_id = apic.id();
    if !madt.enabled().any(|l| l.apic_id == bsp_id) {
        return fail(format!("bsp apic_id={} not enabled in MADT", bsp_id));
    }
    if expected > MAX_CPUS {
        return fail(format!("expected={} more than {} cpus", expected, MAX_CPUS));
    }
    let targets: Vec<u32> = madt
        .enabled()
        .map(|l| l.apic_id)
        .filter(|&id| id != bsp_id)
        .collect();
    if let Some(id) = targets.iter().find(|&&id| id >= 0xff) {
        return fail(format!("apic_id={} needs x2APIC", id));
    }
    let was_enabled = apic.enable();
    // Calibrate before any AP runs.
    let (hz, src) = time::tsc_hz();
    println!(
        "testguest: {} expected={} bsp_apic_id={} apic_was_enabled={} tsc_hz={} ({})",
        tag,
        expected,
        bsp_id,
        was_enabled,
        hz,
        src.name()
    );

    report(0);
    let mut wait_ms = PER_CPU_REPORT_MS * expected as u64;
    match smp::start_aps(&apic, &targets, ap_main, PER_AP_START_MS) {
        Ok(_) => {}
        Err(StartError::TooManyCpus) => {
            return fail(format!("expected={} more than {} cpus", expected, MAX_CPUS));
        }
        Err(StartError::NoAck { apic_id }) => {
            println!("testguest: {} AP apic_id={} did not start", tag, apic_id);
            wait_ms = 1_000;
        }
    }

    let deadline = time::deadline_ms(wait_ms);
    while ONLINE.load(Ordering::SeqCst) < expected && !time::expired(deadline) {
        cpu::pause();
    }
    let online = ONLINE.load(Ordering::SeqCst);
    if online != expected {
        return fail(format!("expected={} online={}", expected, online));
    }
    if let Err(why) = check_ids(&madt, online) {
        return fail(why);
    }
    Some(online)
}

fn run(_cmdline: &Cmdline<'_>) {
    if let Some(online) = bring_up("smp", true) {
        println!("testguest: smp ok cpus={}", online);
    }
}

/// Every reported APIC id is distinct and enabled in the MADT.
fn check_ids(madt: &acpi_tables::MadtInfo, online: usize) -> Result<(), String> {
    let mut seen = Vec::new();
    for i in 0..online {
        let id = LAPIC_IDS[i].load(Ordering::SeqCst);
        if id == 0 {
            return Err(format!("cpu index {} did not record its apic id", i));
        }
        let id = id - 1;
        if seen.contains(&id) {
            return Err(format!("apic_id={} reported twice", id));
        }
        if !madt.enabled().any(|l| l.apic_id == id) {
            return Err(format!("apic_id={} not enabled in MADT", id));
        }
        seen.push(id);
    }
    Ok(())
}
