# A snapshot of a running Linux guest (a shell loop counting), restored in a new ftvmm process after
# the first is killed: the count goes on from where the snapshot was taken.
. /payload/lib.sh
guest_start a "ftvmm.test=count" --api-socket /tmp/a.sock
wait_for a 'ftvmm-linux-count: 10$' 300
ftvmm vm --api-socket /tmp/a.sock snapshot --dir /tmp/snap || fail "snapshot"
vm_kill a
last=$(line_of a 'ftvmm-linux-count: ' | cut -d' ' -f2)
vm_start b restore --dir /tmp/snap
wait_for b 'ftvmm-linux-count: ' 120
first=$(console b | grep -E 'ftvmm-linux-count: ' | head -n 1 | cut -d' ' -f2)
wait_for b "ftvmm-linux-count: $((first + 10))\$" 60
vm_kill b
[ "$first" -ge 10 ] && [ "$first" -le $((last + 1)) ] \
    || fail "the restored guest counted from $first (snapshot after 10, the first VM reached $last)"
# Consecutive from there on: the restored process is the same one, not a new one.
console b | grep -E 'ftvmm-linux-count: ' | cut -d' ' -f2 | head -n 11 | awk -v f="$first" \
    '$1 != f + NR - 1 { bad = 1 } END { exit bad }' || fail "the restored count is not consecutive"
echo "RESULT: snapshot ok first_vm_reached=$last restored_from=$first"
