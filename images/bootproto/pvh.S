/*
 * A minimal PVH guest: ftvmm must find the Xen PHYS32_ENTRY note, enter it in 32-bit protected mode
 * with paging off and %ebx pointing at hvm_start_info. It checks the start info's magic, prints the
 * command line it names, and powers off through the ACPI sleep register.
 * Prints "pvh: ok cmdline=<...>" or "pvh: bad start_info magic".
 */
    .section .note.Xen, "a", @note
    .balign 4
    .long 4                 /* namesz */
    .long 4                 /* descsz */
    .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .long pvh_start

    .text
    .code32
    .globl pvh_start
pvh_start:
    mov $0x8000, %esp       /* PVH gives no stack; 0x8000 is free RAM in ftvmm's map */
    mov $0x3f8, %dx
    cmpl $0x336ec578, (%ebx)
    jne bad
    lea msg_ok, %esi
    call puts
    mov 24(%ebx), %esi      /* cmdline_paddr (low 32 bits) */
    call puts
    mov $'\n', %al
    out %al, %dx
    jmp off
bad:
    lea msg_bad, %esi
    call puts
off:
    mov $0x600, %dx
    mov $0x34, %al
    out %al, %dx
1:  hlt
    jmp 1b

/* Prints the NUL-terminated string at %esi on COM1 (%dx = 0x3f8). */
puts:
    lodsb
    test %al, %al
    jz 2f
    out %al, %dx
    jmp puts
2:  ret

    .section .rodata
msg_ok:  .asciz "pvh: ok cmdline="
msg_bad: .asciz "pvh: bad start_info magic\n"
