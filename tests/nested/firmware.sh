# UEFI firmware (`--firmware`, vmm/src/arch/firmware.rs, docs/firmware.md): Debian's OVMF.fd on
# ftvmm's q35 platform (fw_cfg, PCI root with the MCH and the ICH9 LPC bridge, ICH9 PM block and
# timer, CMOS), with 2 vCPUs:
# - with nothing to boot, it reaches its UEFI shell, whose console is COM1;
# - given the Debian kernel, initramfs and command line through fw_cfg, it starts the kernel's EFI
#   stub; Linux runs on the firmware's memory map and ftvmm's ACPI tables (installed by OVMF from
#   etc/table-loader), finds its disk and NIC as virtio-pci functions (BARs placed by OVMF,
#   interrupts through MSI-X), reaches /init with 2 CPUs, and powers off through the ICH9 PM1
#   control register: ftvmm exits 0.
. /payload/lib.sh
start=$(date +%s)
vm_start shell run --firmware "$FIRMWARE" --vcpus 2 --memory 256
wait_for shell 'UEFI Interactive Shell' 300
wait_for shell 'Shell> ' 60
shell_s=$(($(date +%s) - start))
console shell | grep -q 'BdsDxe: starting Boot[0-9A-F]* "EFI Internal Shell"' ||
    fail "the boot manager did not start the shell"
vm_kill shell

truncate -s 16M /tmp/disk.img
tap_up tap0
start=$(date +%s)
vm_start direct run --firmware "$FIRMWARE" --kernel "$KERNEL" --initrd "$INITRD" --vcpus 2 \
    --memory 512 --cmdline "$GUEST_CMDLINE" --disk path=/tmp/disk.img --net tap=tap0
vm_exit direct 300
direct_s=$(($(date +%s) - start))
console direct | grep -q '^\[ *[0-9.]*\] efi: EFI v2\.[0-9]* by EDK II' ||
    fail "direct boot: Linux did not start as an EFI application"
console direct | grep -q 'ACPI: FACP .*FTVMM' || fail "direct boot: no FADT from ftvmm's tables"
console direct | grep -q 'ftvmm-linux-init: cpus=2$' || fail "direct boot: no /init with 2 CPUs"
console direct | grep -q 'pci 0000:00:02.0: \[1af4:1042\]' || fail "direct boot: no virtio-pci disk"
console direct | grep -q 'pci 0000:00:03.0: \[1af4:1041\]' || fail "direct boot: no virtio-pci NIC"
devices=$(line_of direct 'ftvmm-linux-init: disks=')
[ "$devices" = "ftvmm-linux-init: disks=vda nics=eth0" ] || fail "direct boot: devices '$devices'"
console direct | grep -q 'ACPI: PM: Preparing to enter system sleep state S5' ||
    fail "direct boot: no ACPI power-off"
[ "$EXIT_STATUS" = 0 ] || fail "direct boot: ftvmm exited $EXIT_STATUS after the guest's power-off"
echo "RESULT: firmware=$(basename "$FIRMWARE") shell_s=$shell_s direct_boot_to_poweroff_s=$direct_s"
