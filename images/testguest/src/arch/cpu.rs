//! Ring-3 CPU helpers: port I/O (allowed by IOPL=3 / the TSS I/O bitmap), CPUID, TSC, pause,
//! ring-0 service calls (see `idt.rs`) and power-off through the ACPI sleep control register.

use core::arch::asm;

/// ACPI sleep control register (hardware-reduced ACPI, docs/boot-abi.md).
const SLEEP_CONTROL_PORT: u16 = 0x600;
/// SLP_TYP=5 (S5) | SLP_EN.
const SLEEP_S5: u8 = 0x34;

#[inline]
pub fn outb(port: u16, val: u8) {
    // SAFETY: port I/O has no memory effects; IOPL=3 permits it in ring 3.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") val, options(nomem, nostack, preserves_flags))
    }
}

#[inline]
pub fn inb(port: u16) -> u8 {
    let val: u8;
    // SAFETY: as for `outb`.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") val, options(nomem, nostack, preserves_flags))
    }
    val
}

/// CPUID leaf/subleaf -> (eax, ebx, ecx, edx).
#[inline]
pub fn cpuid(leaf: u32, subleaf: u32) -> (u32, u32, u32, u32) {
    let (eax, ebx, ecx, edx): (u32, u32, u32, u32);
    // SAFETY: cpuid only writes the named registers; rbx is reserved by LLVM, so it is saved
    // and restored around the instruction by hand.
    unsafe {
        asm!(
            "mov {tmp:r}, rbx",
            "cpuid",
            "xchg {tmp:r}, rbx",
            tmp = out(reg) ebx,
            inout("eax") leaf => eax,
            inout("ecx") subleaf => ecx,
            out("edx") edx,
            options(nomem, nostack, preserves_flags),
        )
    }
    (eax, ebx, ecx, edx)
}

/// This CPU's initial APIC id, from CPUID leaf 1 EBX[31:24].
pub fn apic_id() -> u32 {
    cpuid(1, 0).1 >> 24
}

#[inline]
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: rdtsc reads the time-stamp counter (CR4.TSD is clear); no memory effects.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) }
    (u64::from(hi) << 32) | u64::from(lo)
}

#[inline]
pub fn pause() {
    core::hint::spin_loop();
}

/// Ring-0 service call `nr` through the #UD service trap (see `idt.rs`).
pub fn service_call(nr: u64) -> u64 {
    // SAFETY: an ordinary extern "C" function; the ring-0 side only reads rax and returns a
    // value in it (or never returns, for the triple-fault service).
    unsafe { super::idt::tg_svc_call(nr) }
}

/// The same service call through the DPL3 gate `int 0x80`. Works where guest ring 3 runs under
/// VMX/SVM; on the test host `int n` from ring 3 raises #UD instead.
#[allow(dead_code)]
pub fn service_call_int80(nr: u64) -> u64 {
    let ret: u64;
    // SAFETY: the gate handler only reads rax and returns a value in it (or never returns); the
    // CPU switches to the ring-0 stack, so the user stack (and its red zone) is untouched.
    unsafe { asm!("int 0x80", inout("rax") nr => ret, options(nostack)) }
    ret
}

/// Power the machine off (ACPI S5). Spins if the write has no effect.
pub fn poweroff() -> ! {
    outb(SLEEP_CONTROL_PORT, SLEEP_S5);
    loop {
        pause();
    }
}

/// Triple-fault the machine on purpose (the VMM sees a shutdown).
pub fn triple_fault() -> ! {
    service_call(super::idt::SVC_TRIPLE_FAULT);
    // Unreachable unless the service trap is broken.
    panic!("triple-fault service call returned");
}
