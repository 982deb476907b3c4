# UEFI firmware (`--firmware`, vmm/src/arch/firmware.rs, docs/firmware.md): Debian's OVMF.fd on
# ftvmm's q35 platform (fw_cfg, PCI root with the MCH and the ICH9 LPC bridge, ICH9 PM block and
# timer, CMOS), with 2 vCPUs:
# - with nothing to boot, it reaches its UEFI shell, whose console is COM1; `reset -s` typed into
#   it (--serial-input stdin) powers the machine off: ftvmm exits 0;
# - given the Debian kernel, initramfs and command line through fw_cfg, it starts the kernel's EFI
#   stub; Linux runs on the firmware's memory map (3 GiB of RAM: 2 GiB below 4 GiB, 1 GiB above)
#   and ftvmm's ACPI tables (installed by OVMF from etc/table-loader), finds its disk and NIC as
#   virtio-pci functions (BARs placed by OVMF, interrupts through MSI-X), reaches /init with 2
#   CPUs, and powers off through the ICH9 PM1 control register: ftvmm exits 0;
# - given only a GPT disk whose EFI system partition has systemd-boot as EFI/BOOT/BOOTX64.EFI and
#   the same kernel (scripts/build-images linux-esp), OVMF's virtio-pci block driver reads it, the
#   boot manager starts systemd-boot from it, and that the kernel, which finds the same disk as
#   vda, reaches /init with 2 CPUs and powers off: ftvmm exits 0.
. /payload/lib.sh
# The shell's input is a FIFO this script holds open (fd 3), fed to COM1 by --serial-input stdin.
mkfifo /tmp/shell.in
exec 3<>/tmp/shell.in
start=$(date +%s)
ftvmm run --firmware "$FIRMWARE" --vcpus 2 --memory 256 --serial-input stdin \
    </tmp/shell.in >/tmp/shell.out 2>/tmp/shell.err &
echo $! >/tmp/shell.pid
VMS="${VMS:-} shell"
wait_for shell 'UEFI Interactive Shell' 300
wait_for shell 'Shell> ' 60
shell_s=$(($(date +%s) - start))
console shell | grep -q 'BdsDxe: starting Boot[0-9A-F]* "EFI Internal Shell"' ||
    fail "the boot manager did not start the shell"
# Typed at the prompt: the shell powers the machine off through the ICH9 PM block.
printf 'reset -s\r' >&3
vm_exit shell 60
exec 3>&-
# The shell echoes each key with cursor moves between them; its reset command says what it does.
console shell | grep -q 'Reset with <null string>' || fail "the shell did not run the typed command"
[ "$EXIT_STATUS" = 0 ] || fail "the shell's 'reset -s': ftvmm exited $EXIT_STATUS"

truncate -s 16M /tmp/disk.img
tap_up tap0
start=$(date +%s)
vm_start direct run --firmware "$FIRMWARE" --kernel "$KERNEL" --initrd "$INITRD" --vcpus 2 \
    --memory 3072 --cmdline "$GUEST_CMDLINE" --disk path=/tmp/disk.img --net tap=tap0
vm_exit direct 300
direct_s=$(($(date +%s) - start))
console direct | grep -q '^\[ *[0-9.]*\] efi: EFI v2\.[0-9]* by EDK II' ||
    fail "direct boot: Linux did not start as an EFI application"
console direct | grep -q 'ACPI: FACP .*FTVMM' || fail "direct boot: no FADT from ftvmm's tables"
console direct | grep -q 'BIOS-e820: \[mem 0x0000000100000000-0x000000013fffffff\] usable' ||
    fail "direct boot: the firmware's memory map lacks the RAM above 4 GiB"
console direct | grep -q 'ftvmm-linux-init: cpus=2$' || fail "direct boot: no /init with 2 CPUs"
console direct | grep -q 'pci 0000:00:02.0: \[1af4:1042\]' || fail "direct boot: no virtio-pci disk"
console direct | grep -q 'pci 0000:00:03.0: \[1af4:1041\]' || fail "direct boot: no virtio-pci NIC"
devices=$(line_of direct 'ftvmm-linux-init: disks=')
[ "$devices" = "ftvmm-linux-init: disks=vda nics=eth0" ] || fail "direct boot: devices '$devices'"
console direct | grep -q 'ACPI: PM: Preparing to enter system sleep state S5' ||
    fail "direct boot: no ACPI power-off"
[ "$EXIT_STATUS" = 0 ] || fail "direct boot: ftvmm exited $EXIT_STATUS after the guest's power-off"

vm_start intx run --firmware "$FIRMWARE" --kernel "$KERNEL" --initrd "$INITRD" --vcpus 2 \
    --memory 512 --cmdline "$GUEST_CMDLINE pci=nomsi" --disk path=/tmp/disk.img
vm_exit intx 300
# Linux without MSI says so when it declines the root bridge's _OSC.
console intx | grep -q '_OSC: not requesting OS control; OS requires \[.*MSI\]' ||
    fail "INTx: Linux still had MSI"
devices=$(line_of intx 'ftvmm-linux-init: disks=')
[ "$devices" = "ftvmm-linux-init: disks=vda nics=" ] || fail "INTx: devices '$devices'"
[ "$EXIT_STATUS" = 0 ] || fail "INTx: ftvmm exited $EXIT_STATUS after the guest's power-off"

start=$(date +%s)
vm_start esp run --firmware "$FIRMWARE" --vcpus 2 --memory 512 --disk "path=$ESP_IMAGE"
vm_exit esp 300
esp_s=$(($(date +%s) - start))
console esp | grep -q 'BdsDxe: starting Boot[0-9A-F]* .*PciRoot(0x0)/Pci(0x2,0x0)' ||
    fail "ESP boot: the boot manager did not boot from the virtio-pci disk"
console esp | grep -q 'efi: EFI v2\.[0-9]* by EDK II' || fail "ESP boot: Linux did not start under EFI"
console esp | grep -q 'ftvmm-linux-init: cpus=2$' || fail "ESP boot: no /init with 2 CPUs"
devices=$(line_of esp 'ftvmm-linux-init: disks=')
[ "$devices" = "ftvmm-linux-init: disks=vda nics=" ] || fail "ESP boot: devices '$devices'"
[ "$EXIT_STATUS" = 0 ] || fail "ESP boot: ftvmm exited $EXIT_STATUS after the guest's power-off"
echo "RESULT: firmware=$(basename "$FIRMWARE") shell_s=$shell_s direct_boot_to_poweroff_s=$direct_s esp_boot_to_poweroff_s=$esp_s"
