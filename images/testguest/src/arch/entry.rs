//! Ring-0 entry points, in assembly because ring-0 instructions are emulated (~3 µs each on the
//! test host): `_start` (BSP, Linux 64-bit boot protocol: long mode, paging on, rsi=boot_params),
//! `tg_ap_entry64` (APs, from the trampoline in `smp.rs`) and the common per-CPU init
//! `tg_cpu_init`: enable SSE, load our GDT, TSS (RSP0, I/O bitmap) and IDT, then `iretq` to
//! ring 3 with IOPL=3, IF=0. Ring-3 entry `tg_user_entry` zeroes .bss (BSP only) and calls Rust.
//! About 470 ring-0 instructions on the BSP (most in the IDT fill loop), 80 on an AP.
//!
//! On the test host (ring 3 on the real CPU, ring 0 emulated) the IOPL and IF set here do not
//! survive into ring 3: IOPL reads 0 there (port I/O is allowed by the TSS I/O bitmap instead,
//! see `gdt.rs`), and IF may be treated as 1 (harmless: the guest enables no interrupt source).

use super::gdt::{KERNEL_CS, KERNEL_DS, MAX_CPUS, TSS_LIMIT, TSS_SEL0, TSS_SIZE, USER_CS, USER_DS};

/// Per-CPU ring-0 stack (also used by the ring-3 exception reporter). Power of two.
pub const KSTACK_SHIFT: u32 = 14;
/// Per-CPU ring-3 stack. Power of two.
pub const USTACK_SHIFT: u32 = 16;
/// RFLAGS for ring 3: IOPL=3 (port I/O allowed), IF=0 (polling only), reserved bit 1.
pub const USER_RFLAGS: u64 = 0x3002;

core::arch::global_asm!(
    r#"
    .pushsection .text.entry, "ax"
    .global _start
_start:
    cli
    lea rsp, [rip + tg_kstacks + (1 << {kshift})]
    mov [rip + tg_boot_params], rsi
    lea rax, [rip + tg_pml4]
    mov cr3, rax
    call tg_idt_fill
    xor edi, edi
    jmp tg_cpu_init

    /* AP: 64-bit mode with our page tables (set up by the trampoline), edi = CPU index. */
    .global tg_ap_entry64
tg_ap_entry64:
    mov eax, edi
    inc eax
    shl rax, {kshift}
    lea rsp, [rip + tg_kstacks]
    add rsp, rax
    jmp tg_cpu_init

    /* edi = CPU index, rsp = top of this CPU's kernel stack. */
tg_cpu_init:
    mov rax, cr0
    and rax, -5                 /* clear EM */
    or rax, 2                   /* set MP */
    mov cr0, rax
    mov rax, cr4
    or rax, 0x600               /* OSFXSR | OSXMMEXCPT */
    mov cr4, rax

    lgdt [rip + tg_gdtr]
    push {kcs}
    lea rax, [rip + 2f]
    push rax
    .byte 0x48, 0xcb            /* retfq: reload CS */
2:
    mov eax, {kds}
    mov ss, eax
    mov ds, eax
    mov es, eax

    /* rbx = &tg_tss[cpu]; RSP0 = top of this CPU's kernel stack */
    imul ebx, edi, {tss_size}
    lea rax, [rip + tg_tss]
    add rbx, rax
    mov [rbx + 4], rsp

    /* 64-bit available TSS descriptor: limit (< 64 KiB), base[23:0], type 0x89, base[31:24] */
    mov eax, ebx
    and eax, 0xffffff
    shl rax, 16
    mov edx, ebx
    shr edx, 24
    shl rdx, 56
    or rax, rdx
    movabs rdx, 0x0000890000000000 + {tss_limit}
    or rax, rdx
    mov ecx, edi
    shl ecx, 4
    lea rdx, [rip + tg_gdt + {tss_sel0}]
    mov [rdx + rcx], rax
    mov qword ptr [rdx + rcx + 8], 0
    add ecx, {tss_sel0}
    ltr cx
    lidt [rip + tg_idtr]

    /* iretq to ring 3: rdi (CPU index) is preserved */
    push {uds}
    mov eax, edi
    inc eax
    shl rax, {ushift}
    lea rdx, [rip + tg_ustacks]
    add rax, rdx
    push rax
    push {uflags}
    push {ucs}
    lea rax, [rip + tg_user_entry]
    push rax
    iretq
    .popsection

    /* ---- ring 3 from here on ---- */
    .pushsection .text.tg_user_entry, "ax"
tg_user_entry:
    test edi, edi
    jnz 3f
    lea rdi, [rip + __bss_start]
    lea rcx, [rip + __bss_end]
    sub rcx, rdi
    xor eax, eax
    cld
    rep stosb
    call tg_bsp_main
    ud2
3:
    call tg_ap_main
    ud2
    .popsection

    .pushsection .data.tg_boot_params, "aw"
    .balign 8
    .global tg_boot_params
tg_boot_params:
    .quad 0
    .popsection

    .pushsection .stacks, "aw", @nobits
    .balign 4096
    .global tg_kstacks
tg_kstacks:
    .skip {ncpu} << {kshift}
    .global tg_ustacks
tg_ustacks:
    .skip {ncpu} << {ushift}
    .popsection
    "#,
    kshift = const KSTACK_SHIFT,
    ushift = const USTACK_SHIFT,
    kcs = const KERNEL_CS,
    kds = const KERNEL_DS,
    ucs = const USER_CS,
    uds = const USER_DS,
    uflags = const USER_RFLAGS,
    tss_size = const TSS_SIZE,
    tss_limit = const TSS_LIMIT,
    tss_sel0 = const TSS_SEL0,
    ncpu = const MAX_CPUS,
);

unsafe extern "C" {
    /// Address of boot_params, saved by `_start` from rsi.
    pub static tg_boot_params: u64;
}
