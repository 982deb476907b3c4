# Live migration of a Linux guest between two ftvmm processes in the L1, their TAPs on one bridge,
# while a client keeps one TCP connection to the guest's echo service: every line comes back, the
# connection survives, and the guest powers off on the destination (exit 0).
. /payload/lib.sh
bridge_with br0 tap0 tap1
ftvmm tls-certs --out /tmp/pki src=127.0.0.1 dst=127.0.0.1 >/dev/null || fail "tls-certs"
guest_start src "ftvmm.test=echo ftvmm.ip=$GUEST_IP/24" --net tap=tap0 --api-socket /tmp/src.sock \
    --tls /tmp/pki/src
wait_for src 'ftvmm-linux-net: up' 300
vm_start dst receive --listen 127.0.0.1:7000 --net tap=tap1 --api-socket /tmp/dst.sock \
    --tls /tmp/pki/dst ${FIRMWARE:+--firmware "$FIRMWARE"}
nettest echo "$GUEST_IP:7" 25 >/tmp/echo.out 2>&1 &
client=$!
sleep 5
ftvmm vm --api-socket /tmp/src.sock migrate --to 127.0.0.1:7000 --downtime-ms 50 || fail "migrate"
vm_exit src 60
[ "$EXIT_STATUS" = 0 ] || fail "the source exited $EXIT_STATUS after the hand-over"
if ! wait $client; then
    echo "the destination's vCPUs:"
    ftvmm vm --api-socket /tmp/dst.sock vcpus
    fail "the client: $(cat /tmp/echo.out)"
fi
cat /tmp/echo.out
nc "$GUEST_IP" 9 </dev/null || true
wait_for dst 'ftvmm-linux-echo: poweroff requested' 60
vm_exit dst 60
[ "$EXIT_STATUS" = 0 ] || fail "the destination exited $EXIT_STATUS"
echo "RESULT: migrate ok $(cat /tmp/echo.out | sed 's/^nettest: //')"
