# A protected Linux guest (25 ms epochs) with its standby in the same L1,
# their TAPs on one bridge, while a client keeps one TCP connection to the guest's echo service: the
# primary is killed mid-way, the standby takes over, every line comes back on the same connection,
# and the guest powers off on the standby (exit 0).
. /payload/lib.sh
bridge_with br0 tap0 tap1
ftvmm tls-certs --out /tmp/pki a=127.0.0.1 b=127.0.0.1 >/dev/null || fail "tls-certs"
export FTVMM_LOG=replication=info
# Where each thread of each VM waits, for a failure's log: a stalled event loop shows here.
show_threads() {
    for name in ${VMS:-}; do
        pid=$(vm_pid "$name")
        for t in /proc/"$pid"/task/*; do
            [ -e "$t" ] || continue
            echo "----- $name thread $(cat "$t/comm" 2>/dev/null): $(cat "$t/wchan" 2>/dev/null)"
            cat "$t/stack" 2>/dev/null | head -n 12
        done
    done
}
vm_start standby standby --listen 127.0.0.1:7100 --tls /tmp/pki/b --failure-timeout-ms 2000 \
    --net tap=tap1 --api-socket /tmp/standby.sock ${FIRMWARE:+--firmware "$FIRMWARE"}
wait_err standby "standing by on" 30
# CHECKPOINT_COPY (default on-write) and EPOCH_MS (default 25) may be set, e.g. to reproduce the TCG
# tier's failures of protected guests (docs/nested.md, Known limits).
checkpoint_copy=${CHECKPOINT_COPY:-on-write}
epoch_ms=${EPOCH_MS:-25}
guest_start primary "ftvmm.test=echo ftvmm.ip=$GUEST_IP/24" --net tap=tap0 \
    --api-socket /tmp/primary.sock --standby 127.0.0.1:7100 --tls /tmp/pki/a --epoch-ms "$epoch_ms" \
    --checkpoint-copy "$checkpoint_copy"
wait_for primary 'ftvmm-linux-net: up' 300
wait_err primary "guest protected by" 300
nettest echo "$GUEST_IP:7" 30 >/tmp/echo.out 2>&1 &
client=$!
sleep 15
status=$(ftvmm vm --api-socket /tmp/primary.sock protection) || { show_threads; fail "no protection status"; }
echo "primary before the kill: $status"
echo "$status" | grep -q '"state": *"protected"' || { show_threads; fail "not protected: $status"; }
vm_kill primary
if ! wait $client; then
    show_threads
    fail "the client: $(cat /tmp/echo.out)"
fi
cat /tmp/echo.out
grep -q "taking over" /tmp/standby.err || fail "the standby did not say it took over"
nc "$GUEST_IP" 9 </dev/null || true
wait_for standby 'ftvmm-linux-echo: poweroff requested' 60
vm_exit standby 60
[ "$EXIT_STATUS" = 0 ] || fail "the standby exited $EXIT_STATUS after the guest powered off"
echo "RESULT: protect ok $(sed 's/^nettest: //' /tmp/echo.out)"
