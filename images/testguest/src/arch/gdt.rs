//! GDT and per-CPU TSSs, as static data. Layout: null, kernel code64 (0x08), kernel data (0x10),
//! user data DPL3 (0x18), user code64 DPL3 (0x20) — SYSRET-compatible order — then one 16-byte
//! TSS descriptor per CPU from 0x28. The TSS descriptors (base address split across fields) are
//! written by each CPU's ring-0 init in `entry.rs`, which also sets its TSS.RSP0.
//! Accessed bits are preset so the CPU never writes the GDT when loading segments.
//!
//! Port I/O from ring 3 is allowed twice over: by RFLAGS.IOPL=3 (set by the `iretq` to ring 3),
//! and by an all-zero I/O permission bitmap shared by every TSS. The bitmap is what counts on the
//! test host: there ring 3 runs on the real CPU with IOPL forced to 0, an `in`/`out` traps, and
//! KVM's emulator allows it only if the guest TSS's bitmap does (`emulator_io_port_access_allowed`).

/// Maximum number of CPUs the guest supports (TSSs, stacks).
pub const MAX_CPUS: usize = 64;

pub const KERNEL_CS: u16 = 0x08;
pub const KERNEL_DS: u16 = 0x10;
pub const USER_DS: u16 = 0x18 | 3;
pub const USER_CS: u16 = 0x20 | 3;
/// Selector of CPU 0's TSS; CPU n's is `TSS_SEL0 + 16 * n`.
pub const TSS_SEL0: u16 = 0x28;
/// Size of one 64-bit TSS (without the I/O bitmap).
pub const TSS_SIZE: usize = 104;
/// Limit of every TSS descriptor: covers the shared I/O bitmap (8 KiB + terminator) from every
/// TSS, the farthest being CPU 0's (MAX_CPUS * TSS_SIZE bytes before the bitmap).
pub const TSS_LIMIT: usize = 0x3fff;
/// Bitmap (8 KiB) plus its terminating byte must lie within the limit of every TSS.
const _: () = assert!(MAX_CPUS * TSS_SIZE + 8192 <= TSS_LIMIT);

core::arch::global_asm!(
    r#"
    .pushsection .data.gdt, "aw"
    .balign 16
    .global tg_gdt
tg_gdt:
    .quad 0                     /* null */
    .quad 0x00af9b000000ffff    /* 0x08 kernel code64, DPL0 */
    .quad 0x00cf93000000ffff    /* 0x10 kernel data, DPL0 */
    .quad 0x00cff3000000ffff    /* 0x18 user data, DPL3 */
    .quad 0x00affb000000ffff    /* 0x20 user code64, DPL3 */
    .fill {ncpu} * 2, 8, 0      /* 0x28.. TSS descriptors, filled by tg_cpu_init */
tg_gdt_end:

    .balign 16
    .word 0, 0, 0
    .global tg_gdtr
tg_gdtr:
    .word tg_gdt_end - tg_gdt - 1
    .quad tg_gdt

    /* Per-CPU TSS: only RSP0 (set by tg_cpu_init) and the I/O map base are used. Every TSS's
       I/O map base points at the shared bitmap after the array. */
    .balign 16
    .global tg_tss
tg_tss:
    .set tg_tss_i, 0
    .rept {ncpu}
    .long 0                     /* reserved */
    .quad 0                     /* rsp0 */
    .quad 0, 0                  /* rsp1, rsp2 */
    .quad 0                     /* reserved */
    .quad 0, 0, 0, 0, 0, 0, 0   /* ist1..ist7 */
    .quad 0                     /* reserved */
    .word 0                     /* reserved */
    .word (tg_iobitmap - tg_tss) - tg_tss_i * {tss_size}   /* I/O map base */
    .set tg_tss_i, tg_tss_i + 1
    .endr
    /* All ports allowed; the extra 0xff byte ends the bitmap, as the architecture requires. */
tg_iobitmap:
    .fill 8192, 1, 0
    .byte 0xff
    .popsection
    "#,
    ncpu = const MAX_CPUS,
    tss_size = const TSS_SIZE,
);
