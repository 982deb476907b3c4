/*
 * A minimal bzImage: a real-mode setup area carrying the Linux boot protocol header, then a
 * protected-mode part whose 64-bit entry point (startup_64, offset 0x200) ftvmm must jump to in long
 * mode with %rsi pointing at boot_params. It checks the boot_params it got, prints the command line,
 * and powers off. Prints "bzimage: ok cmdline=<...>" or "bzimage: bad boot_params".
 * Assembled at address 0 and flattened with objcopy; all code is position-independent.
 */
    .code16
    .section .text
    .globl _start
_start:
    .org 0x1f1
setup_sects:    .byte 1                 /* setup = 1 + 1 sectors: PM part at file offset 0x400 */
root_flags:     .word 0
syssize:        .long (pm_end - pm_start) / 16
ram_size:       .word 0
vid_mode:       .word 0
root_dev:       .word 0
boot_flag:      .word 0xaa55
jump:           .byte 0xeb, 0x00
header:         .ascii "HdrS"
version:        .word 0x020f
realmode_swtch: .long 0
start_sys_seg:  .word 0
kernel_version: .word 0
type_of_loader: .byte 0
loadflags:      .byte 0x01              /* LOADED_HIGH */
setup_move_size: .word 0
code32_start:   .long 0x100000
ramdisk_image:  .long 0
ramdisk_size:   .long 0
bootsect_kludge: .long 0
heap_end_ptr:   .word 0
ext_loader_ver: .byte 0
ext_loader_type: .byte 0
cmd_line_ptr:   .long 0
initrd_addr_max: .long 0x7fffffff
kernel_alignment: .long 0x200000
relocatable_kernel: .byte 0
min_alignment:  .byte 0
xloadflags:     .word 0x1               /* XLF_KERNEL_64 */
cmdline_size:   .long 4095
hardware_subarch: .long 0
hardware_subarch_data: .quad 0
payload_offset: .long 0
payload_length: .long 0
setup_data:     .quad 0
pref_address:   .quad 0x100000
init_size:      .long 0x10000
handover_offset: .long 0
    .org 0x400
pm_start:
    .code64
    /* 32-bit entry (offset 0): not used by ftvmm. */
    hlt
    .org pm_start + 0x200
startup_64:
    mov $0x3f8, %dx
    cmpl $0x53726448, 0x202(%rsi)        /* boot_params.hdr.header == "HdrS" */
    jne bad
    cmpb $0, 0x1e8(%rsi)                 /* e820_entries > 0 */
    je bad
    lea msg_ok(%rip), %rbx
    call puts
    mov 0x228(%rsi), %ebx                /* hdr.cmd_line_ptr */
    call puts
    mov $'\n', %al
    out %al, %dx
    jmp off
bad:
    lea msg_bad(%rip), %rbx
    call puts
off:
    mov $0x600, %dx
    mov $0x34, %al
    out %al, %dx
1:  hlt
    jmp 1b

/* Prints the NUL-terminated string at %rbx on COM1 (%dx = 0x3f8). */
puts:
    mov (%rbx), %al
    test %al, %al
    jz 2f
    out %al, %dx
    inc %rbx
    jmp puts
2:  ret

msg_ok:  .asciz "bzimage: ok cmdline="
msg_bad: .asciz "bzimage: bad boot_params\n"
    .balign 16
pm_end:
