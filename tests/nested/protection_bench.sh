# The nested tier's protection benchmark (scripts/bench-nested-protection runs it in the L1): the Linux
# guest (1 vCPU, 256 MiB, a virtio NIC on the L1's bridge) unprotected and protected at 40 checkpoints
# per second, under ftvmm (its standby in the same L1, over loopback) and under QEMU COLO (its secondary
# in the same L1; colo-compare on the NIC, periodic checkpoints every 25 ms: x-checkpoint-delay):
#   - the guest's own throughput (ftvmm.test=work: units of CPU and memory work, counted against the
#     L1's clock, since a VMM may stop the guest's clock while it pauses it), the pause of each
#     checkpoint, and where the L1's CPUs go while ftvmm protects;
#   - the round trip a TCP client sees (ftvmm.test=echo; nettest echo: a line every 20 ms).
# Each figure is a line
#   BENCH vmm=<ftvmm|qemu> figure=<name> value=<number>
# which scripts/bench-nested-protection summarises. LINK=plain: ftvmm's link without TLS; COPY=paused:
# ftvmm copies checkpoint pages while paused.
NO_KVM_TRACE=1 # tracing every exit would skew the figures
. /payload/lib.sh
WINDOW=${WINDOW:-30} # seconds each throughput is measured over
WARMUP=4             # seconds of work before the window opens
ECHO_SECONDS=10
EPOCH_MS=25
GUEST_MAC=52:54:00:12:34:56
[ -d /tmp/pki ] || ftvmm tls-certs --out /tmp/pki a=127.0.0.1 b=127.0.0.1 >/dev/null || fail "tls-certs"
case "${LINK:-tls}" in
    tls) standby_link="--tls /tmp/pki/b" primary_link="--tls /tmp/pki/a" ;;
    plain) standby_link=--insecure-plain-tcp primary_link=--insecure-plain-tcp ;;
    *) fail "LINK is tls or plain" ;;
esac
bridge_with br0 tap0 tap1
# The COLO secondary's NIC: its traffic goes through the primary's colo-compare, never out.
tap_up tap9
# The L1's CPUs are emulated: heartbeats get a failure timeout to match.
export FTVMM_LOG=replication=info

now_ms() { read -r up _ </proc/uptime; echo $((${up%.*}${up#*.} * 10)); }
units() { line_of "$1" '^ftvmm-linux-work: units=' | sed 's/.*units=//'; }
ratio_per_s() { awk -v n="$1" -v ms="$2" 'BEGIN { printf "%.3f", n * 1000 / ms }'; }

# ---- starting the guest: NAME WORKLOAD (the kernel command line's ftvmm.test=... part)
ftvmm_plain() {
    vm_start "$1" run --kernel "$KERNEL" --initrd "$INITRD" --vcpus 1 --memory 256 \
        --cmdline "$GUEST_CMDLINE $2" --net "tap=tap0,mac=$GUEST_MAC"
}
ftvmm_protected() {
    vm_start standby standby --listen 127.0.0.1:7100 $standby_link --serial null \
        --failure-timeout-ms 2000 --net "tap=tap1,mac=$GUEST_MAC"
    wait_err standby "standing by on" 30
    vm_start "$1" run --kernel "$KERNEL" --initrd "$INITRD" --vcpus 1 --memory 256 \
        --cmdline "$GUEST_CMDLINE $2" --net "tap=tap0,mac=$GUEST_MAC" \
        --standby 127.0.0.1:7100 --epoch-ms "$EPOCH_MS" $primary_link \
        --api-socket "/tmp/$1.sock" --checkpoint-copy "${COPY:-on-write}"
    wait_err "$1" "guest protected by" 300
}
qemu_start() { # NAME MONITOR_PORT TAP WORKLOAD EXTRA...
    name=$1 port=$2 tap=$3 workload=$4
    shift 4
    qemu-system-x86_64 -M microvm,acpi=on,rtc=on -enable-kvm -cpu host -smp 1 -m 256 \
        -nodefaults -no-user-config -display none -serial "file:/tmp/$name.out" \
        -monitor "tcp:127.0.0.1:$port,server,nowait" -msg timestamp=on \
        -kernel "$KERNEL" -initrd "$INITRD" -append "$GUEST_CMDLINE $workload" \
        -netdev "tap,id=hn0,ifname=$tap,script=no,downscript=no" \
        -device "virtio-net-device,netdev=hn0,mac=$GUEST_MAC" "$@" 2>"/tmp/$name.err" &
    echo $! >"/tmp/$name.pid"
    VMS="${VMS:-} $name"
}
hmp() { printf '%s\n' "$2" | nc 127.0.0.1 "$1" 2>/dev/null | tr -d '\r'; }
qemu_plain() { qemu_start "$1" 4400 tap0 "$2"; }
# COLO as QEMU's docs/COLO-FT.txt sets it up: the primary mirrors what its NIC receives to the
# secondary and sends out what its guest sends only when colo-compare finds the secondary's guest sent
# the same (a difference starts a checkpoint; so does x-checkpoint-delay); the secondary (whose
# filter-rewriter aligns TCP sequence numbers) receives the stream with x-colo on. Its checkpoints
# stop the primary: trace event colo_vm_state_change, timestamped.
qemu_colo() {
    qemu_start "$1" 4401 tap0 "$2" -trace enable=colo_vm_state_change \
        -chardev socket,id=mirror0,host=127.0.0.1,port=9003,server=on,wait=off \
        -chardev socket,id=compare1,host=127.0.0.1,port=9004,server=on,wait=off \
        -chardev socket,id=compare0,host=127.0.0.1,port=9001,server=on,wait=off \
        -chardev socket,id=compare0-0,host=127.0.0.1,port=9001 \
        -chardev socket,id=compare_out,host=127.0.0.1,port=9005,server=on,wait=off \
        -chardev socket,id=compare_out0,host=127.0.0.1,port=9005 \
        -object filter-mirror,id=m0,netdev=hn0,queue=tx,outdev=mirror0 \
        -object filter-redirector,netdev=hn0,id=redire0,queue=rx,indev=compare_out \
        -object filter-redirector,netdev=hn0,id=redire1,queue=rx,outdev=compare0 \
        -object iothread,id=iothread1 \
        -object colo-compare,id=comp0,primary_in=compare0-0,secondary_in=compare1,outdev=compare_out0,iothread=iothread1
    qemu_start secondary 4402 tap9 "$2" -incoming tcp:127.0.0.1:9998 \
        -chardev socket,id=red0,host=127.0.0.1,port=9003,reconnect=1 \
        -chardev socket,id=red1,host=127.0.0.1,port=9004,reconnect=1 \
        -object filter-redirector,id=f1,netdev=hn0,queue=tx,indev=red0 \
        -object filter-redirector,id=f2,netdev=hn0,queue=rx,outdev=red1 \
        -object filter-rewriter,id=rew0,netdev=hn0,queue=all
    sleep 1
    hmp 4402 "migrate_set_capability x-colo on" >/dev/null
}
# Once the primary's guest runs: the first copy to the secondary, then COLO.
colo_begin() {
    hmp 4401 "migrate_set_capability x-colo on" >/dev/null
    hmp 4401 "migrate_set_parameter x-checkpoint-delay $EPOCH_MS" >/dev/null
    hmp 4401 "migrate -d tcp:127.0.0.1:9998" >/dev/null
    i=0
    until hmp 4401 "info migrate" | grep -q "Migration status: colo"; do
        i=$((i + 1)); [ $i -le 3000 ] || { hmp 4401 "info migrate"; fail "COLO did not start within 300 s"; }
        sleep 0.1
    done
}
stop_all() {
    for name in ${VMS:-}; do vm_kill "$name"; done
    VMS=
    sleep 1
}

# ---- measuring
# KVM's counters in the L1 (debugfs: sums over the VMs alive), read as the window opens and closes.
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
kvm_counters() { cat /sys/kernel/debug/kvm/exits /sys/kernel/debug/kvm/pf_fixed 2>/dev/null | tr '\n' ' '; }
# throughput VMM FIGURE NAME: units per second of the L1's clock over the window, once NAME has
# worked for WARMUP seconds; runs SAMPLE (if set) every half second meanwhile, and ON_OPEN /
# ON_CLOSE (if set) as the window opens and closes.
throughput() {
    wait_for "$3" '^ftvmm-linux-work: units=' 120
    sleep "$WARMUP"
    [ -n "${ON_OPEN:-}" ] && $ON_OPEN
    set -- "$@" $(kvm_counters)
    u0=$(units "$3") t0=$(now_ms)
    end=$((t0 + WINDOW * 1000))
    while [ "$(now_ms)" -lt "$end" ]; do
        [ -n "${SAMPLE:-}" ] && $SAMPLE
        sleep 0.5
    done
    u1=$(units "$3") t1=$(now_ms)
    set -- "$@" $(kvm_counters)
    [ -n "${ON_CLOSE:-}" ] && $ON_CLOSE
    bench "$1" "$2" "$(ratio_per_s $((u1 - u0)) $((t1 - t0)))"
    # $4 $5: exits and pf_fixed at the opening, $6 $7 at the closing.
    if [ $# -ge 7 ]; then
        bench "$1" "kvm_exits_per_s_${2#units_per_s_}" "$(ratio_per_s $(($6 - $4)) $((t1 - t0)))"
        bench "$1" "kvm_pf_fixed_per_s_${2#units_per_s_}" "$(ratio_per_s $(($7 - $5)) $((t1 - t0)))"
    fi
    WINDOW_MS=$((t1 - t0))
}
# round_trips VMM SUFFIX: nettest's echo round trips to the guest, p50 and p99.
round_trips() {
    line=$(nettest echo "$GUEST_IP:7" "$ECHO_SECONDS") || fail "$1: echo: $line"
    bench "$1" "rtt_p50_us_$2" "$(field "$line" rtt_us_p50)"
    bench "$1" "rtt_p99_us_$2" "$(field "$line" rtt_us_p99)"
}
net_up() { wait_for "$1" 'ftvmm-linux-net: up' 300; }

status() { ftvmm vm --api-socket /tmp/primary.sock protection 2>/dev/null; }
json() { echo "$1" | tr ',{}' '\n\n\n' | sed -n "s/^ *\"$2\": *//p" | head -n 1; }
sample_ftvmm() {
    s=$(status)
    bench ftvmm pause_ms "$(json "$s" last_pause_ms)"
    bench ftvmm commit_ms "$(json "$s" last_commit_ms)"
    bench ftvmm pages "$(json "$s" last_pages)"
    bench ftvmm write_faults_between_copies "$(json "$s" write_faults_between_copies)"
}
# Where the L1's CPUs go while protected: CPU seconds of each thread of the primary and the standby
# over the window (utime + stime from /proc, in ticks of 1/100 s), as
#   BENCH vmm=ftvmm figure=cpu_s:PROCESS:THREAD value=SECONDS
thread_ticks() { # NAME: "NAME:thread ticks" per thread
    process=$1 pid=$(vm_pid "$1")
    for t in /proc/"$pid"/task/*; do
        name=$(tr ' ' _ <"$t/comm")
        # Fields after the ")" of comm: utime and stime are the 12th and 13th.
        set -- $(sed 's/.*) //' "$t/stat")
        echo "$process:$name $((${12} + ${13}))"
    done 2>/dev/null
}
ftvmm_open() {
    { thread_ticks primary; thread_ticks standby; } >/tmp/cpu.0
    e0=$(json "$(status)" committed_epoch)
}
ftvmm_close() {
    e1=$(json "$(status)" committed_epoch)
    { thread_ticks primary; thread_ticks standby; } >/tmp/cpu.1
    awk 'NR == FNR { t0[$1] += $2; next } { t1[$1] += $2 }
        END { for (k in t1) if (t1[k] - t0[k] > 0) printf "BENCH vmm=ftvmm figure=cpu_s:%s value=%.2f\n", k, (t1[k] - t0[k]) / 100 }' \
        /tmp/cpu.0 /tmp/cpu.1
}
colo_open() { first=$(wc -l </tmp/primary.err); }
colo_close() { last=$(wc -l </tmp/primary.err); }
# COLO's pauses over the window: from each 'run' => 'stop' to the next 'stop' => 'run'.
colo_pauses() {
    sed -n "$((first + 1)),${last}p" /tmp/primary.err | awk -F'[@:]' -v ms="$WINDOW_MS" '/colo_vm_state_change/ {
        split($2, t, " "); ts = t[1]
        if ($0 ~ /=> .stop/) { stopped = ts; stops++ }
        else if (stopped) { printf "BENCH vmm=qemu figure=pause_ms value=%.3f\n", (ts - stopped) * 1000; stopped = 0 }
    } END { printf "BENCH vmm=qemu figure=checkpoints_per_s value=%.2f\n", stops * 1000 / ms }'
}

echo "bench: ftvmm, the guest's throughput"
ftvmm_plain primary ftvmm.test=work
throughput ftvmm units_per_s_unprotected primary
stop_all
ftvmm_protected primary ftvmm.test=work
SAMPLE=sample_ftvmm ON_OPEN=ftvmm_open ON_CLOSE=ftvmm_close throughput ftvmm units_per_s_protected primary
bench ftvmm checkpoints_per_s "$(ratio_per_s $((e1 - e0)) "$WINDOW_MS")"
stop_all

echo "bench: ftvmm, round trips"
ftvmm_plain primary "ftvmm.test=echo ftvmm.ip=$GUEST_IP/24"
net_up primary
round_trips ftvmm unprotected
stop_all
ftvmm_protected primary "ftvmm.test=echo ftvmm.ip=$GUEST_IP/24"
net_up primary
round_trips ftvmm protected
stop_all

echo "bench: QEMU COLO, the guest's throughput"
qemu_plain primary ftvmm.test=work
throughput qemu units_per_s_unprotected primary
stop_all
qemu_colo primary ftvmm.test=work
wait_for primary '^ftvmm-linux-work: units=' 120
colo_begin
ON_OPEN=colo_open ON_CLOSE=colo_close throughput qemu units_per_s_protected primary
colo_pauses
stop_all

echo "bench: QEMU COLO, round trips"
qemu_plain primary "ftvmm.test=echo ftvmm.ip=$GUEST_IP/24"
net_up primary
round_trips qemu unprotected
stop_all
qemu_colo primary "ftvmm.test=echo ftvmm.ip=$GUEST_IP/24"
net_up primary
colo_begin
round_trips qemu protected
stop_all
echo "RESULT: protection bench done"
