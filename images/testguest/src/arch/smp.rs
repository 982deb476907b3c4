//! AP bring-up. The trampoline template below is copied to `TRAMP_BASE` (below 1 MiB, 4 KiB
//! aligned); a STARTUP IPI with vector `TRAMP_BASE >> 12` starts an AP there in real mode. It goes
//! real -> 32-bit protected -> long mode (PAE, our PML4, EFER.LME, PG) and jumps to
//! `tg_ap_entry64` with its CPU index in edi; from there it runs the same ring-0 init as the BSP
//! (`entry.rs`) and enters ring 3 at `tg_ap_main`, which calls the function set by `start_aps`.
//! APs are started one at a time: the trampoline holds one CPU index, which an AP acknowledges
//! as soon as it has read it. The trampoline uses no stack.

use super::apic::LocalApic;
use super::gdt::MAX_CPUS;
use super::time;
use core::sync::atomic::{AtomicUsize, Ordering};

/// Where the trampoline is copied. The 0x8000 page is the VMM's initial stack, which the BSP has
/// left (boot-abi.md); boot_params (0x7000) and the VMM page tables (0x9000) are not touched.
pub const TRAMP_BASE: usize = 0x8000;
/// The trampoline must end below the VMM's initial stack pointer (0x8ff0).
const TRAMP_MAX: usize = 0xff0;
/// Wait between INIT and the first STARTUP IPI.
const INIT_DELAY_US: u64 = 100;
/// Wait between the two STARTUP IPIs (skipped if the AP has already answered).
const SIPI_DELAY_US: u64 = 200;

core::arch::global_asm!(
    r#"
    .pushsection .rodata.tg_trampoline, "a"
    .balign 16
    .global tg_tramp_start
tg_tramp_start:
    .code16
    cli
    cld
    movw %cs, %ax
    movw %ax, %ds
    lgdtl tg_tramp_gdtr - tg_tramp_start
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $0x08, ${base} + tg_tramp_pm32 - tg_tramp_start

    .code32
tg_tramp_pm32:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movl %cr4, %eax
    orl $0x620, %eax                /* PAE | OSFXSR | OSXMMEXCPT */
    movl %eax, %cr4
    movl {base} + tg_tramp_cr3 - tg_tramp_start, %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx          /* EFER */
    rdmsr
    orl $0x100, %eax                /* LME */
    wrmsr
    movl %cr0, %eax
    andl $0xfffffffb, %eax          /* clear EM */
    orl $0x80000002, %eax           /* PG | MP */
    movl %eax, %cr0
    ljmp $0x18, ${base} + tg_tramp_lm64 - tg_tramp_start

    .code64
tg_tramp_lm64:
    movl tg_tramp_cpu(%rip), %edi
    movl $1, tg_tramp_ack(%rip)
    movq tg_tramp_entry(%rip), %rax
    jmp *%rax

    .balign 8
tg_tramp_gdt:
    .quad 0
    .quad 0x00cf9b000000ffff        /* 0x08 code32 */
    .quad 0x00cf93000000ffff        /* 0x10 data32 */
    .quad 0x00af9b000000ffff        /* 0x18 code64 */
tg_tramp_gdtr:
    .word 4 * 8 - 1
    .long {base} + tg_tramp_gdt - tg_tramp_start
    .balign 4
tg_tramp_cr3:
    .long tg_pml4
    .global tg_tramp_cpu
tg_tramp_cpu:
    .long 0
    .global tg_tramp_ack
tg_tramp_ack:
    .long 0
    .balign 8
tg_tramp_entry:
    .quad tg_ap_entry64
    .global tg_tramp_end
tg_tramp_end:
    .popsection
    "#,
    base = const TRAMP_BASE,
    options(att_syntax),
);

unsafe extern "C" {
    static tg_tramp_start: u8;
    static tg_tramp_cpu: u32;
    static tg_tramp_ack: u32;
    static tg_tramp_end: u8;
}

/// What an AP runs in ring 3; set by `start_aps` before the first AP starts.
static AP_MAIN: AtomicUsize = AtomicUsize::new(0);

/// Template symbol -> its address in the installed copy.
fn installed(sym: *const u8) -> usize {
    let start = core::ptr::addr_of!(tg_tramp_start) as usize;
    TRAMP_BASE + (sym as usize - start)
}

fn tramp_cpu_slot() -> *mut u32 {
    core::ptr::with_exposed_provenance_mut(installed(core::ptr::addr_of!(tg_tramp_cpu).cast()))
}

fn tramp_ack_slot() -> *mut u32 {
    core::ptr::with_exposed_provenance_mut(installed(core::ptr::addr_of!(tg_tramp_ack).cast()))
}

/// Copies the trampoline to `TRAMP_BASE`.
fn install_trampoline() {
    let (start, end) = (
        core::ptr::addr_of!(tg_tramp_start),
        core::ptr::addr_of!(tg_tramp_end),
    );
    let len = end as usize - start as usize;
    assert!(
        len <= TRAMP_MAX,
        "AP trampoline is {len} bytes, more than {TRAMP_MAX}"
    );
    // SAFETY: TRAMP_BASE..+len is identity-mapped guest RAM that nothing else uses once the BSP
    // has left the VMM's initial stack; the template is in our image, far from it.
    unsafe {
        core::ptr::copy_nonoverlapping(
            start,
            core::ptr::with_exposed_provenance_mut(TRAMP_BASE),
            len,
        )
    }
}

/// Why an AP did not start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartError {
    /// More CPUs than `MAX_CPUS`.
    TooManyCpus,
    /// The AP did not reach long mode in time (it never read its CPU index).
    NoAck { apic_id: u32 },
}

/// Starts the APs `apic_ids`, one at a time, as CPU indices 1, 2, ...; each one ends up calling
/// `ap_main(cpu_index)` in ring 3. Stops at the first AP that does not come up within
/// `per_ap_timeout_ms` (a late AP could otherwise take a later AP's CPU index).
/// Returns how many APs were started.
pub fn start_aps(
    apic: &LocalApic,
    apic_ids: &[u32],
    ap_main: fn(usize) -> !,
    per_ap_timeout_ms: u64,
) -> Result<usize, StartError> {
    if apic_ids.len() + 1 > MAX_CPUS {
        return Err(StartError::TooManyCpus);
    }
    AP_MAIN.store(ap_main as usize, Ordering::SeqCst);
    install_trampoline();
    for (i, &apic_id) in apic_ids.iter().enumerate() {
        let cpu = i as u32 + 1;
        // SAFETY: the slots are in the installed trampoline; no AP is running it now (the
        // previous one acknowledged).
        unsafe {
            core::ptr::write_volatile(tramp_cpu_slot(), cpu);
            core::ptr::write_volatile(tramp_ack_slot(), 0);
        }
        let acked = || {
            // SAFETY: as above; the AP writes the slot once.
            unsafe { core::ptr::read_volatile(tramp_ack_slot()) != 0 }
        };
        apic.send_init(apic_id);
        // The MP spec's 10 ms after INIT is for old hardware; modern CPUs (and Linux on them)
        // and KVM need none. A little slack costs nothing.
        time::delay_us(INIT_DELAY_US);
        let page = (TRAMP_BASE >> 12) as u8;
        apic.send_startup(apic_id, page);
        time::delay_us(SIPI_DELAY_US);
        if !acked() {
            // A second STARTUP, per the MP spec; ignored by an AP that already started.
            apic.send_startup(apic_id, page);
        }
        let deadline = time::deadline_ms(per_ap_timeout_ms);
        while !acked() {
            if time::expired(deadline) {
                return Err(StartError::NoAck { apic_id });
            }
            super::cpu::pause();
        }
    }
    Ok(apic_ids.len())
}

/// Ring 3 entry of every AP (from `tg_user_entry`).
#[unsafe(no_mangle)]
extern "C" fn tg_ap_main(cpu: usize) -> ! {
    let f = AP_MAIN.load(Ordering::SeqCst);
    if f == 0 {
        panic!("AP {cpu} started without an AP main");
    }
    // SAFETY: AP_MAIN only ever holds a `fn(usize) -> !` stored by `start_aps`.
    let f: fn(usize) -> ! = unsafe { core::mem::transmute::<usize, fn(usize) -> !>(f) };
    f(cpu)
}
