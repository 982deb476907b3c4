# A standby on a host that freezes whole (tests/nested.rs stops and continues this L1 through QMP)
# while its primary, on the host outside, goes on without it. The standby follows a primary that
# reaches it through QEMU's user network (ports forwarded from the host, TCP and UDP); it has no
# witness. It must never take over: when the L1 is continued its clock has not moved, the primary's
# connections may end at any moment, and only the primary's goodbye, read before they end, may end
# it. Prints the standby's log and `RESULT: frozen-standby exit=N took_over=0|1`.
. /payload/lib.sh
export FTVMM_LOG=replication=info
vm_start standby standby --listen 0.0.0.0:7100 --tls /payload/pki-b --failure-timeout-ms 500 \
    --serial null
wait_err standby "standing by on" 60
echo "FROZEN-STANDBY: standing by"
vm_exit standby 600
echo "----- the standby's log"
cat /tmp/standby.err
took_over=0
grep -q "taking over" /tmp/standby.err && took_over=1
echo "RESULT: frozen-standby exit=$EXIT_STATUS took_over=$took_over"
