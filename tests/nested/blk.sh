# virtio-blk with Linux's own driver: a 4 MiB pattern written with O_DIRECT and fsync reads back
# the same in the guest and is in the host's image; a read-only disk refuses writes.
. /payload/lib.sh
truncate -s 64M /tmp/disk.img
truncate -s 16M /tmp/ro.img
guest_start g "ftvmm.test=blk" --disk path=/tmp/disk.img --disk path=/tmp/ro.img,readonly
vm_exit g 300
ok=$(line_of g 'ftvmm-linux-blk: ok ')
[ -n "$ok" ] || fail "the guest's blk check did not pass"
want=$(field "$ok" sha256)
have=$(head -c 4194304 /tmp/disk.img | sha256sum | cut -d' ' -f1)
[ "$want" = "$have" ] || fail "the image holds $have, the guest wrote $want"
console g | grep -q 'ftvmm-linux-blk: readonly refused ro=1' || fail "the read-only disk: $(line_of g 'readonly')"
[ -z "$(head -c 4096 /tmp/ro.img | tr -d '\0')" ] || fail "the read-only image was written"
[ "$EXIT_STATUS" = 0 ] || fail "ftvmm exited $EXIT_STATUS"
echo "RESULT: blk ok sha256=$have readonly=refused"
