# A real kernel boots to /init with 2 vCPUs, reports both CPUs and its devices, and powers off
# through ACPI: ftvmm exits 0.
. /payload/lib.sh
truncate -s 16M /tmp/disk.img
tap_up tap0
guest_start g "" --disk path=/tmp/disk.img --net tap=tap0
vm_exit g 300
console g | grep -q 'ftvmm-linux-init: cpus=2$' || fail "the guest did not report 2 CPUs"
devices=$(line_of g 'ftvmm-linux-init: disks=')
[ "$devices" = "ftvmm-linux-init: disks=vda nics=eth0" ] || fail "devices: '$devices'"
[ "$EXIT_STATUS" = 0 ] || fail "ftvmm exited $EXIT_STATUS after the guest's power-off"
rtc=$(rtc_check g) || fail "$rtc"
echo "RESULT: boot ok cpus=2 $devices $rtc uptime=$(console g | sed -n 's/^\[ *\([0-9.]*\)\] Run \/init.*/\1/p')"
