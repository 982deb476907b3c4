# Hyper-V enlightenments (`--hyperv`, vmm/src/arch/hyperv.rs). With `only`, the guest's hypervisor
# leaves are Hyper-V's alone: Linux detects Microsoft Hyper-V and prints the privileges, hints and
# features it was given, and runs on them (hypercall page, VP index, reference TSC page, SynIC
# timers, APIC access MSRs) to /init with 2 vCPUs. With `on`, KVM's leaves are at 0x40000100 too and
# Linux prefers KVM, as on QEMU. Both power off through ACPI: ftvmm exits 0.
. /payload/lib.sh
guest_start hvonly "" --hyperv only
vm_exit hvonly 300
[ "$EXIT_STATUS" = 0 ] || fail "--hyperv only: ftvmm exited $EXIT_STATUS"
console hvonly | grep -q 'Hypervisor detected: Microsoft Hyper-V' ||
    fail "--hyperv only: Linux did not detect Hyper-V"
console hvonly | grep -q 'ftvmm-linux-init: cpus=2$' || fail "--hyperv only: no /init with 2 CPUs"
privileges=$(line_of hvonly 'Hyper-V: privilege flags' | sed 's/.*Hyper-V: //')
[ -n "$privileges" ] || fail "--hyperv only: no privilege flags line"
# The stock kernel has rtc_cmos: the wall clock comes from ftvmm's CMOS (no kvmclock here).
console hvonly | grep -q 'rtc_cmos' || fail "--hyperv only: no rtc_cmos"
rtc=$(rtc_check hvonly) || fail "$rtc"
clocksource=$(console hvonly | sed -n 's/.*clocksource: Switched to clocksource \([a-z_0-9]*\).*/\1/p' | tail -n 1)

# A Hyper-V guest (SynIC timers, reference TSC page, hypercall page in use) snapshotted while it
# counts and restored in a new process: its SynIC is on again before its MSRs are set, and it
# counts on.
guest_start hvsnap "ftvmm.test=count" --hyperv only --api-socket /tmp/hv.sock
wait_for hvsnap 'ftvmm-linux-count: 5$' 300
ftvmm vm --api-socket /tmp/hv.sock snapshot --dir /tmp/hvsnap || fail "snapshot of a Hyper-V guest"
vm_kill hvsnap
vm_start hvrestored restore --dir /tmp/hvsnap
wait_for hvrestored 'ftvmm-linux-count: ' 120
first=$(console hvrestored | grep -E 'ftvmm-linux-count: ' | head -n 1 | cut -d' ' -f2)
wait_for hvrestored "ftvmm-linux-count: $((first + 5))\$" 60
vm_kill hvrestored

guest_start hvon "" --hyperv on
vm_exit hvon 300
[ "$EXIT_STATUS" = 0 ] || fail "--hyperv on: ftvmm exited $EXIT_STATUS"
console hvon | grep -q 'Hypervisor detected: KVM' || fail "--hyperv on: Linux did not keep KVM"
console hvon | grep -q 'ftvmm-linux-init: cpus=2$' || fail "--hyperv on: no /init with 2 CPUs"
echo "RESULT: hyperv ok only: [$privileges] clocksource=$clocksource $rtc; restored from a snapshot at count $first and counted on; on: KVM preferred"
