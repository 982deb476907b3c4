# virtio-net with Linux's own driver on a TAP in the L1: ping, then 8 MiB each way over TCP with
# both ends' SHA-256 compared.
. /payload/lib.sh
BYTES=8388608
tap_up tap0
ip addr add "$L1_IP/24" dev tap0
guest_start g "ftvmm.test=net ftvmm.ip=$GUEST_IP/24" --net tap=tap0
wait_for g 'ftvmm-linux-net: up' 300
ping -c 3 -W 10 "$GUEST_IP" || fail "ping $GUEST_IP"
sent=$(nettest send "$GUEST_IP:5001" $BYTES) || fail "nettest send: $sent"
wait_for g 'ftvmm-linux-net: received' 120
[ "$(field "$(line_of g 'ftvmm-linux-net: received')" sha256)" = "$(field "$sent" sha256)" ] \
    || fail "the guest received something else: $(line_of g 'received') vs $sent"
wait_for g 'ftvmm-linux-net: sending' 120
got=$(nettest recv "$GUEST_IP:5002" $BYTES) || fail "nettest recv: $got"
[ "$(field "$(line_of g 'ftvmm-linux-net: sending')" sha256)" = "$(field "$got" sha256)" ] \
    || fail "the L1 received something else: $got vs $(line_of g 'sending')"
vm_exit g 120
[ "$EXIT_STATUS" = 0 ] || fail "ftvmm exited $EXIT_STATUS"
echo "RESULT: net ok to_guest_mbit_s=$(field "$sent" mbit_s) from_guest_mbit_s=$(field "$got" mbit_s)"
