//! IDT: exception stubs for vectors 0..31, the ring-3 service gate `int 0x80` (DPL3) and an
//! `iretq` for the APIC spurious vector 0xff; other vectors are not present (#NP if raised).
//! The BSP fills the IDT once in ring 0 (`tg_idt_fill`, a short loop); every CPU loads it.
//! An exception does the least possible in ring 0: it `iretq`s to `tg_exception_report` in
//! ring 3 (on the same CPU's kernel stack, which is user-accessible), which prints
//! `testguest: EXCEPTION vector=N rip=0x.. err=0x..` and powers off.
//!
//! Ring-3 service calls (number in rax, argument in rdx, result in rax): 0 = no-op (returns 0),
//! 1 = triple fault (lidt a zero-limit IDT, then ud2), 2 = the emulation probe (see
//! [`SVC_EMULATE_PROBE`]); anything else returns u64::MAX. They are
//! reachable two ways: `int 0x80` (works where ring 3 runs under VMX), and a `ud2` at the fixed
//! address `tg_svc_ud2` (the #UD stub recognises it). The guest itself uses the latter
//! (`tg_svc_call`) because on the test host an `int n` from ring 3 is not emulated and raises #UD.

use super::entry::USER_RFLAGS;
use super::gdt::{KERNEL_CS, USER_CS, USER_DS};
use core::sync::atomic::{AtomicU32, Ordering};

/// Service call numbers.
pub const SVC_NOP: u64 = 0;
pub const SVC_TRIPLE_FAULT: u64 = 1;
/// Runs, in ring 0, instructions some hosts' KVM cannot emulate (`popcnt`, `int3`, `fwait`,
/// `ldmxcsr`/`stmxcsr` with [`EMULATE_MXCSR`], and `stac`/`clac` when the argument's bit 0 is set)
/// and returns the popcnt of [`EMULATE_PROBE`].
pub const SVC_EMULATE_PROBE: u64 = 2;
/// The value service 2 counts the bits of.
pub const EMULATE_PROBE: u64 = 0xF0F0_0F0F_1234_5678;
/// The MXCSR service 2 loads (the reset value with flush-to-zero set).
pub const EMULATE_MXCSR: u32 = 0x9f80;

core::arch::global_asm!(
    r#"
    .macro TG_ISR n, has_err
    .balign 16
tg_isr_\n:
    .if \has_err == 0
    push 0
    .endif
    push \n
    jmp tg_exc_common
    .endm

    .pushsection .text.tg_idt, "ax"
    TG_ISR 0, 0
    TG_ISR 1, 0
    TG_ISR 2, 0
    TG_ISR 3, 0
    TG_ISR 4, 0
    TG_ISR 5, 0
    TG_ISR 6, 0
    TG_ISR 7, 0
    TG_ISR 8, 1
    TG_ISR 9, 0
    TG_ISR 10, 1
    TG_ISR 11, 1
    TG_ISR 12, 1
    TG_ISR 13, 1
    TG_ISR 14, 1
    TG_ISR 15, 0
    TG_ISR 16, 0
    TG_ISR 17, 1
    TG_ISR 18, 0
    TG_ISR 19, 0
    TG_ISR 20, 0
    TG_ISR 21, 1
    TG_ISR 22, 0
    TG_ISR 23, 0
    TG_ISR 24, 0
    TG_ISR 25, 0
    TG_ISR 26, 0
    TG_ISR 27, 0
    TG_ISR 28, 0
    TG_ISR 29, 1
    TG_ISR 30, 1
    TG_ISR 31, 0

    /* Stack: vector, error code, rip, cs, rflags, rsp, ss. A #UD at tg_svc_ud2 is a service
       call; anything else is handed over to the ring-3 reporter. */
tg_exc_common:
    pop rdi
    pop rsi
    cmp edi, 3
    je 8f
    cmp edi, 6
    jne 7f
    lea rcx, [rip + tg_svc_ud2]
    cmp [rsp], rcx
    jne 7f
    add qword ptr [rsp], 2      /* return after the ud2 */
    jmp tg_int80
8:
    /* The #BP of service 2's int3 returns to the next instruction. */
    lea rcx, [rip + tg_emul_int3_ret]
    cmp [rsp], rcx
    jne 7f
    iretq
7:
    mov rdx, [rsp]
    mov rcx, [rsp + 8]
    mov r8, cr2
    mov rax, rsp
    sub rax, 256
    and rax, -16
    push {uds}
    push rax
    push {uflags}
    push {ucs}
    lea rax, [rip + tg_exc_user]
    push rax
    iretq

    /* Service dispatch (from int 0x80 or the ud2 service trap), number in rax. */
tg_int80:
    cmp rax, {svc_triple}
    je 4f
    cmp rax, {svc_emulate}
    je 3f
    test rax, rax
    jz 5f
    mov rax, -1
5:
    iretq
4:
    lidt [rip + tg_null_idtr]
    ud2
3:
    movabs rcx, {probe}
    popcnt rax, rcx
    int3
    .global tg_emul_int3_ret
tg_emul_int3_ret:
    fwait
    /* MXCSR round trip through memory: load the probe value, store it back. */
    sub rsp, 8
    mov dword ptr [rsp], {mxcsr}
    ldmxcsr [rsp]
    stmxcsr [rsp + 4]
    add rsp, 8
    test rdx, 1
    jz 2f
    stac
    clac
2:
    iretq

    /* Vector 0xff, the APIC's spurious vector (SVR): nothing to acknowledge. */
tg_spurious:
    iretq

    /* Ring 0, BSP only, once: fill gates 0..31, 0x80 and 0xff. Offsets are below 4 GiB. */
    .global tg_idt_fill
tg_idt_fill:
    lea rsi, [rip + tg_isr_table]
    lea rdi, [rip + tg_idt]
    movabs r9, 0x00008e0000000000 + ({kcs} << 16)
    xor ecx, ecx
6:
    mov rax, [rsi + rcx * 8]
    mov edx, eax
    and edx, 0xffff0000
    shl rdx, 32
    movzx eax, ax
    or rax, rdx
    or rax, r9
    mov rdx, rcx
    shl rdx, 4
    mov [rdi + rdx], rax
    inc ecx
    cmp ecx, 32
    jb 6b
    lea rax, [rip + tg_int80]
    mov edx, eax
    and edx, 0xffff0000
    shl rdx, 32
    movzx eax, ax
    or rax, rdx
    movabs rdx, 0x0000ee0000000000 + ({kcs} << 16)
    or rax, rdx
    mov [rdi + 0x80 * 16], rax
    lea rax, [rip + tg_spurious]
    mov edx, eax
    and edx, 0xffff0000
    shl rdx, 32
    movzx eax, ax
    or rax, rdx
    or rax, r9
    mov [rdi + 0xff * 16], rax
    ret
    .popsection

    /* Ring 3: the exception reporter, on the faulting CPU's kernel stack. */
    .pushsection .text.tg_exc_user, "ax"
tg_exc_user:
    call tg_exception_report
    ud2

    /* Ring 3: u64 tg_svc_call(u64 nr), the service call through the #UD trap. */
    .global tg_svc_call
tg_svc_call:
    mov rax, rdi
    jmp tg_svc_ud2
    /* u64 tg_svc_call_arg(u64 nr, u64 arg): arg in rdx. */
    .global tg_svc_call_arg
tg_svc_call_arg:
    mov rax, rdi
    mov rdx, rsi
    .global tg_svc_ud2
tg_svc_ud2:
    ud2
    ret
    .popsection

    .pushsection .rodata.tg_idt, "a"
    .balign 8
tg_isr_table:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad tg_isr_\n
    .endr
    .balign 16
    .word 0, 0, 0
tg_null_idtr:
    .word 0
    .quad 0
    .popsection

    /* In .data, not .bss: filled in ring 0 before ring 3 zeroes .bss. */
    .pushsection .data.tg_idt, "aw"
    .balign 16
    .word 0, 0, 0
    .global tg_idtr
tg_idtr:
    .word 256 * 16 - 1
    .quad tg_idt
    .balign 4096
tg_idt:
    .fill 512, 8, 0
    .popsection
    "#,
    kcs = const KERNEL_CS,
    ucs = const USER_CS,
    uds = const USER_DS,
    uflags = const USER_RFLAGS,
    svc_triple = const SVC_TRIPLE_FAULT,
    svc_emulate = const SVC_EMULATE_PROBE,
    probe = const EMULATE_PROBE,
    mxcsr = const EMULATE_MXCSR,
);

unsafe extern "C" {
    /// Service call `nr` (see the module doc); returns the service's result.
    pub fn tg_svc_call(nr: u64) -> u64;
    /// Service call `nr` with an argument.
    pub fn tg_svc_call_arg(nr: u64, arg: u64) -> u64;
}

/// How many exception reports are under way (guards against faulting while reporting).
static REPORTING: AtomicU32 = AtomicU32::new(0);

/// Ring 3, entered from `tg_exc_common` with interrupts off. Prints the fault and powers off.
#[unsafe(no_mangle)]
extern "C" fn tg_exception_report(vector: u64, err: u64, rip: u64, cs: u64, cr2: u64) -> ! {
    if REPORTING.fetch_add(1, Ordering::SeqCst) > 2 {
        // Faulting while reporting, repeatedly: stop without formatting anything.
        super::cpu::poweroff();
    }
    let mut w = crate::serial::RawWriter;
    let _ = core::fmt::Write::write_fmt(
        &mut w,
        format_args!(
            "testguest: EXCEPTION vector={} rip={:#x} err={:#x} cr2={:#x} cpl={}\n",
            vector,
            rip,
            err,
            cr2,
            cs & 3
        ),
    );
    super::cpu::poweroff()
}
