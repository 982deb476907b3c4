# UEFI firmware (`--firmware`, vmm/src/arch/firmware.rs, docs/firmware.md): Debian's OVMF.fd boots on
# ftvmm's q35 platform (fw_cfg, PCI root with the MCH and the ICH9 LPC bridge, ICH9 PM timer, CMOS)
# with 2 vCPUs to its UEFI shell, whose console is COM1; the time to the shell prompt is measured.
. /payload/lib.sh
start=$(date +%s)
vm_start shell run --firmware "$FIRMWARE" --vcpus 2 --memory 256
wait_for shell 'UEFI Interactive Shell' 300
wait_for shell 'Shell> ' 60
shell_s=$(($(date +%s) - start))
console shell | grep -q 'BdsDxe: starting Boot[0-9A-F]* "EFI Internal Shell"' ||
    fail "the boot manager did not start the shell"
vm_kill shell
echo "RESULT: firmware=$(basename "$FIRMWARE") shell_s=$shell_s"
