# Shell helpers for the scripts that tests/nested.rs runs inside the nested tier's L1 (busybox sh;
# see docs/nested.md). Each script sources this file first. A VM's console goes to /tmp/NAME.out,
# ftvmm's own messages to /tmp/NAME.err; both are printed, prefixed, when the script exits.
set -u

# Kernel command line shared by every Linux guest here.
GUEST_CMDLINE="console=ttyS0 panic=-1 mitigations=off nowatchdog"
# The guest's and the L1's addresses: a subnet that exists only inside this L1 (it has no NIC).
GUEST_IP=10.77.0.2
L1_IP=10.77.0.1

fail() {
    echo "FAIL: $*"
    exit 1
}

# The L1 kernel's KVM trace events (exits, injected exceptions and interrupts) are recorded for every
# case, so that a failure shows what the guest did last: on AMD a guest's triple fault resets its
# registers before ftvmm sees the exit, and this trace is then the only record of its cause.
# A script that measures sets NO_KVM_TRACE=1 before sourcing this file.
KVM_TRACE=/sys/kernel/tracing
if [ -z "${NO_KVM_TRACE:-}" ] && mount -t tracefs nodev "$KVM_TRACE" 2>/dev/null || [ -e "$KVM_TRACE/trace" ]; then
    echo 8192 >"$KVM_TRACE/buffer_size_kb" 2>/dev/null
    for event in kvm_exit kvm_inj_exception kvm_inj_virq kvm_pio kvm_msr; do
        echo 1 >"$KVM_TRACE/events/kvm/$event/enable" 2>/dev/null
    done
fi

# bench VMM FIGURE VALUE: one benchmark figure, as scripts/bench-nested* read them.
bench() { echo "BENCH vmm=$1 figure=$2 value=$3"; }

# vm_start NAME ARGS...: runs ftvmm ARGS in the background.
vm_start() {
    name=$1
    shift
    ftvmm "$@" >"/tmp/$name.out" 2>"/tmp/$name.err" &
    echo $! >"/tmp/$name.pid"
    VMS="${VMS:-} $name"
}

# vm_pid NAME
vm_pid() { cat "/tmp/$1.pid"; }

# console NAME: NAME's console so far, without the serial line's carriage returns.
console() { tr -d '\r' <"/tmp/$1.out" 2>/dev/null; }

# wait_for NAME PATTERN SECONDS: waits until NAME's console has a line matching PATTERN (grep -E).
wait_for() {
    i=0
    while ! console "$1" | grep -qE "$2"; do
        i=$((i + 1))
        [ $i -le $(($3 * 10)) ] || fail "$1: no line matching '$2' within $3 s"
        kill -0 "$(vm_pid "$1")" 2>/dev/null || {
            sleep 0.2
            console "$1" | grep -qE "$2" && return 0
            fail "$1: ftvmm exited before a line matching '$2'"
        }
        sleep 0.1
    done
}

# wait_err NAME PATTERN SECONDS: waits until NAME's ftvmm messages (stderr) have a line matching PATTERN.
wait_err() {
    i=0
    until grep -q "$2" "/tmp/$1.err"; do
        i=$((i + 1)); [ $i -le $(($3 * 10)) ] || fail "$1: no '$2' within $3 s"; sleep 0.1
    done
}

# line_of NAME PATTERN: the last line of NAME's console matching PATTERN.
line_of() { console "$1" | grep -E "$2" | tail -n 1; }

# field LINE KEY: the value of KEY=VALUE in LINE.
field() { echo "$1" | tr ' ' '\n' | sed -n "s/^$2=//p" | head -n 1; }

# vm_exit NAME SECONDS: waits for ftvmm to exit; its exit status is then in $EXIT_STATUS.
vm_exit() {
    pid=$(vm_pid "$1")
    i=0
    while kill -0 "$pid" 2>/dev/null; do
        i=$((i + 1))
        [ $i -le $(($2 * 10)) ] || fail "$1: ftvmm still running after $2 s"
        sleep 0.1
    done
    EXIT_STATUS=0
    wait "$pid" || EXIT_STATUS=$?
}

# vm_kill NAME: SIGKILLs ftvmm and reaps it.
vm_kill() {
    kill -9 "$(vm_pid "$1")" 2>/dev/null
    wait "$(vm_pid "$1")" 2>/dev/null
    return 0
}

# guest_start NAME CMDLINE ARGS...: `ftvmm run` of the Linux guest under test ($KERNEL, $INITRD)
# with 2 vCPUs and 512 MiB, CMDLINE appended to its kernel command line, ARGS (devices, options)
# added to ftvmm's. With $FIRMWARE set, the kernel boots through that UEFI firmware on the q35
# platform, its devices on virtio-pci.
guest_start() {
    name=$1
    extra=$2
    shift 2
    vm_start "$name" run --kernel "$KERNEL" --initrd "$INITRD" --vcpus 2 --memory 512 \
        ${FIRMWARE:+--firmware "$FIRMWARE"} --cmdline "$GUEST_CMDLINE $extra" "$@"
}

# tap_up NAME: the TAP device NAME, created (persistent) if missing and brought up.
tap_up() {
    [ -e "/sys/class/net/$1" ] || tunctl -t "$1" >/dev/null || fail "tunctl -t $1"
    ip link set "$1" up
}

# bridge_with NAME TAP...: a bridge NAME holding the TAPs, with the L1's address.
bridge_with() {
    br=$1
    shift
    brctl addbr "$br" || fail "brctl addbr $br"
    for t in "$@"; do
        tap_up "$t"
        brctl addif "$br" "$t" || fail "brctl addif $br $t"
    done
    ip addr add "$L1_IP/24" dev "$br"
    ip link set "$br" up
}

# on_exit: when the script fails, every VM's console and ftvmm's messages, for the test's log.
on_exit() {
    status=$?
    [ $status -eq 0 ] || show_vms
    return $status
}

show_vms() {
    for name in ${VMS:-}; do
        echo "----- $name: console"
        console "$name" | sed "s/^/[$name] /" | tail -n 200
        echo "----- $name: ftvmm"
        sed "s/^/[$name] /" "/tmp/$name.err" 2>/dev/null | tail -n 50
    done
    if [ -z "${NO_KVM_TRACE:-}" ] && [ -r "$KVM_TRACE/trace" ]; then
        echo "----- L1 KVM trace: injected exceptions and shutdowns"
        grep -E 'kvm_inj_exception|reason shutdown|reason (excp|triple)' "$KVM_TRACE/trace" | tail -n 20
        echo "----- L1 KVM trace: last events apart from serial output"
        grep -v '^#' "$KVM_TRACE/trace" | grep -v -E 'kvm_pio|info1 0x0000000003f[8d]' | tail -n 60
    fi
}
trap on_exit EXIT

# rtc_check NAME: when NAME's kernel has rtc_cmos, it must have set the system clock from ftvmm's
# CMOS clock (devices/src/legacy/cmos.rs) to within 5 minutes of the L1's; prints what it found.
rtc_check() {
    set_line=$(line_of "$1" 'rtc_cmos .*: setting system clock to')
    if [ -z "$set_line" ]; then
        console "$1" | grep -q 'rtc_cmos' && fail "$1: rtc_cmos did not set the clock"
        echo "rtc=none"
        return 0
    fi
    guest_s=$(echo "$set_line" | sed -n 's/.*(\([0-9]*\)).*/\1/p')
    skew=$(( $(date +%s) - guest_s ))
    [ "${skew#-}" -le 300 ] || fail "$1: the guest's clock is ${skew} s off the L1's"
    echo "rtc=ok skew=${skew}s"
}
