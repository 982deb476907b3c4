//! UEFI firmware boot: the firmware volume mapped as ROM just below 4 GiB, and the fw_cfg items that
//! QEMU's platform contract promises the firmware (OVMF): CPU counts, RAM size, the e820 map, the
//! ACPI tables with their loader script (`acpi/table_loader.rs`) and, for direct kernel boot, the
//! kernel (split into its real-mode setup and the rest, as QEMU does), initrd and command line,
//! which OVMF starts through the kernel's EFI stub.
//!
//! The image (Debian's `/usr/share/ovmf/OVMF.fd`, a code and variable store volume in one file) is
//! copied into an anonymous mapping that KVM maps read-only at `4 GiB - size`: reads come from
//! memory, writes exit to the VMM and are dropped. OVMF probes its flash by writing to it, finds it
//! behaves as ROM and keeps its variables in memory, as under QEMU's `-bios`. The boot vCPU starts
//! at the reset vector (`F000:FFF0`, that is `0xFFFF_FFF0`) in KVM's reset state; the others wait
//! for the firmware's INIT/SIPI. `docs/firmware.md` has the whole contract.

use std::path::{Path, PathBuf};

use devices::fw_cfg::items::{key, FwCfgItems, ItemError};
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_READONLY};
use kvm_ioctls::VmFd;
use vm_memory::mmap::MmapRegion;

use super::layout::FOUR_GIB;

/// KVM memory slot of the firmware ROM (RAM takes slots from 0).
pub const FIRMWARE_SLOT: u32 = 16;
/// The smallest and largest firmware images accepted: OVMF builds are 1, 2 or 4 MiB; 16 MiB is the
/// most that fits above the LAPIC and IOAPIC with the BIOS area QEMU reserves.
pub const MIN_IMAGE_SIZE: u64 = 64 << 10;
pub const MAX_IMAGE_SIZE: u64 = 16 << 20;
/// The e820 type of usable RAM.
const E820_RAM: u32 = 1;

/// Errors loading or mapping the firmware.
#[derive(Debug, thiserror::Error)]
pub enum FirmwareError {
    #[error("cannot read the firmware image {path:?}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the firmware image {path:?} is {size} bytes; it must be a multiple of 4 KiB from \
         {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} bytes (OVMF.fd is 2 or 4 MiB)"
    )]
    Size { path: PathBuf, size: u64 },
    #[error("cannot map memory for the firmware image: {0}")]
    Map(vm_memory::mmap::MmapRegionError),
    #[error("cannot map the firmware ROM ({size:#x} bytes at {addr:#x}) into the VM: {source}")]
    Slot {
        addr: u64,
        size: u64,
        source: kvm_ioctls::Error,
    },
    #[error("this host's KVM cannot map read-only memory, which firmware ROM needs")]
    NoReadOnlyMemory,
    #[error("cannot describe the VM to the firmware: {0}")]
    FwCfg(#[from] ItemError),
    #[error(
        "{path:?} is not a bzImage: the firmware boots kernels through their EFI stub (give the \
         bzImage, e.g. /boot/vmlinuz-*, not a vmlinux)"
    )]
    NotBzImage { path: PathBuf },
}

/// Where a firmware guest's RAM below 4 GiB ends, as on QEMU's q35: all of it below the ECAM
/// window when it fits there, else the first 2 GiB, with the rest above 4 GiB.
pub fn low_ram_end(ram_bytes: u64) -> u64 {
    let ecam = devices::pci::Q35_ECAM_BASE;
    if ram_bytes <= ecam {
        ecam
    } else {
        0x8000_0000
    }
}

/// A firmware image in memory of its own, for KVM to map as ROM.
pub struct FirmwareRom {
    path: PathBuf,
    region: MmapRegion<()>,
    crc32c: u32,
}

impl FirmwareRom {
    /// Reads the image at `path`.
    pub fn load(path: &Path) -> Result<Self, FirmwareError> {
        let bytes = std::fs::read(path).map_err(|source| FirmwareError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let size = bytes.len() as u64;
        if !(MIN_IMAGE_SIZE..=MAX_IMAGE_SIZE).contains(&size) || !size.is_multiple_of(4096) {
            return Err(FirmwareError::Size {
                path: path.to_path_buf(),
                size,
            });
        }
        let region = MmapRegion::<()>::new(bytes.len()).map_err(FirmwareError::Map)?;
        // SAFETY: the region is a fresh private mapping of exactly `bytes.len()` bytes that nothing
        // else refers to yet.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), region.as_ptr(), bytes.len()) };
        Ok(Self {
            path: path.to_path_buf(),
            region,
            crc32c: crc32c::crc32c(&bytes),
        })
    }

    /// The CRC32C of the image: a restored or migrated VM must map the very same firmware.
    pub fn crc32c(&self) -> u32 {
        self.crc32c
    }

    /// Where the image was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The image's size in bytes.
    pub fn size(&self) -> u64 {
        self.region.size() as u64
    }

    /// The guest address of its first byte: it ends at 4 GiB.
    pub fn base(&self) -> u64 {
        FOUR_GIB - self.size()
    }

    /// Maps the image read-only into `vm`. The VM must not outlive `self`.
    pub fn map(&self, kvm: &kvm_ioctls::Kvm, vm: &VmFd) -> Result<(), FirmwareError> {
        if !kvm.check_extension(kvm_ioctls::Cap::ReadonlyMem) {
            return Err(FirmwareError::NoReadOnlyMemory);
        }
        let region = kvm_userspace_memory_region {
            slot: FIRMWARE_SLOT,
            flags: KVM_MEM_READONLY,
            guest_phys_addr: self.base(),
            memory_size: self.size(),
            userspace_addr: self.region.as_ptr() as u64,
        };
        // SAFETY: the mapping is owned by `self`, which the machine keeps for as long as the VM
        // (it drops the VM first); KVM only reads it (KVM_MEM_READONLY).
        unsafe { vm.set_user_memory_region(region) }.map_err(|source| FirmwareError::Slot {
            addr: self.base(),
            size: self.size(),
            source,
        })
    }
}

/// A kernel for the firmware to boot directly (fw_cfg's kernel, initrd and command line items).
pub struct FirmwareKernel<'a> {
    /// A bzImage with an EFI stub (OVMF starts it as an EFI application).
    pub kernel: &'a Path,
    pub initrd: Option<&'a Path>,
    pub cmdline: &'a str,
}

/// What the firmware is told about the VM.
pub struct FirmwarePlatform<'a> {
    pub vcpus: u8,
    /// The guest's RAM ranges: (base, size).
    pub ram: &'a [(u64, u64)],
    /// The ACPI tables and their loader script: (fw_cfg file name, contents).
    pub acpi_files: Vec<(&'static str, Vec<u8>)>,
    pub kernel: Option<FirmwareKernel<'a>>,
}

/// The fw_cfg items OVMF reads on QEMU's platform: the boot CPU count (it waits for that many
/// processors to check in), RAM size, the e820 RAM map, the ACPI tables and a kernel to boot.
pub fn fw_cfg_items(platform: FirmwarePlatform) -> Result<FwCfgItems, FirmwareError> {
    let mut items = FwCfgItems::new();
    let cpus = u16::from(platform.vcpus).to_le_bytes();
    items.add_item(key::NB_CPUS, cpus.to_vec())?;
    items.add_item(key::MAX_CPUS, cpus.to_vec())?;
    let total: u64 = platform.ram.iter().map(|r| r.1).sum();
    items.add_item(key::RAM_SIZE, total.to_le_bytes().to_vec())?;
    items.add_file("etc/e820", e820_table(platform.ram))?;
    for (name, contents) in platform.acpi_files {
        items.add_file(name, contents)?;
    }
    if let Some(kernel) = &platform.kernel {
        add_kernel(&mut items, kernel)?;
    }
    Ok(items)
}

/// The kernel items: QEMU splits a bzImage into its real-mode setup (`setup_sects + 1` sectors)
/// and the protected-mode rest; OVMF joins them again.
fn add_kernel(items: &mut FwCfgItems, kernel: &FirmwareKernel) -> Result<(), FirmwareError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| FirmwareError::Read {
            path: path.to_path_buf(),
            source,
        })
    };
    let image = read(kernel.kernel)?;
    let setup_len = bzimage_setup_len(&image).ok_or_else(|| FirmwareError::NotBzImage {
        path: kernel.kernel.to_path_buf(),
    })?;
    let (setup, rest) = image.split_at(setup_len);
    let len_item = |len: usize| (len as u32).to_le_bytes().to_vec();
    items.add_item(key::SETUP_SIZE, len_item(setup.len()))?;
    items.add_item(key::SETUP_DATA, setup.to_vec())?;
    items.add_item(key::KERNEL_SIZE, len_item(rest.len()))?;
    items.add_item(key::KERNEL_DATA, rest.to_vec())?;
    if let Some(initrd) = kernel.initrd {
        let initrd = read(initrd)?;
        items.add_item(key::INITRD_SIZE, len_item(initrd.len()))?;
        items.add_item(key::INITRD_DATA, initrd)?;
    }
    let mut cmdline = kernel.cmdline.as_bytes().to_vec();
    cmdline.push(0);
    items.add_item(key::CMDLINE_SIZE, len_item(cmdline.len()))?;
    items.add_item(key::CMDLINE_DATA, cmdline)?;
    Ok(())
}

/// The length of a bzImage's real-mode setup, or `None` if `image` is not a bzImage.
fn bzimage_setup_len(image: &[u8]) -> Option<usize> {
    const SETUP_SECTS: usize = 0x1f1;
    const HEADER_MAGIC: std::ops::Range<usize> = 0x202..0x206;
    if image.get(HEADER_MAGIC)? != b"HdrS" {
        return None;
    }
    let sectors = match image[SETUP_SECTS] {
        0 => 4,
        n => usize::from(n),
    };
    let len = (sectors + 1) * 512;
    (len < image.len()).then_some(len)
}

/// QEMU's `etc/e820` format: packed little-endian `{u64 address, u64 length, u32 type}` entries.
fn e820_table(ram: &[(u64, u64)]) -> Vec<u8> {
    let mut table = Vec::with_capacity(20 * ram.len());
    for &(base, size) in ram {
        table.extend_from_slice(&base.to_le_bytes());
        table.extend_from_slice(&size.to_le_bytes());
        table.extend_from_slice(&E820_RAM.to_le_bytes());
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_ends_below_the_ecam_window_or_at_2_gib_when_it_does_not_fit() {
        assert_eq!(low_ram_end(512 << 20), 0xb000_0000);
        assert_eq!(low_ram_end(0xb000_0000), 0xb000_0000);
        assert_eq!(low_ram_end(4 << 30), 0x8000_0000);
    }

    #[test]
    fn images_of_odd_sizes_are_refused_naming_the_file() {
        let dir = std::env::temp_dir().join(format!("ftvmm-fw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let odd = dir.join("odd.fd");
        std::fs::write(&odd, vec![0u8; (2 << 20) + 1]).unwrap();
        let err = FirmwareRom::load(&odd).err().unwrap().to_string();
        assert!(
            err.contains("odd.fd") && err.contains("multiple of 4 KiB"),
            "{err}"
        );
        let tiny = dir.join("tiny.fd");
        std::fs::write(&tiny, vec![0u8; 4096]).unwrap();
        assert!(matches!(
            FirmwareRom::load(&tiny),
            Err(FirmwareError::Size { .. })
        ));
        assert!(matches!(
            FirmwareRom::load(&dir.join("missing.fd")),
            Err(FirmwareError::Read { .. })
        ));
        let good = dir.join("good.fd");
        let mut image = vec![0u8; 2 << 20];
        image[(2 << 20) - 16] = 0xe9; // a jump at the reset vector
        std::fs::write(&good, &image).unwrap();
        let rom = FirmwareRom::load(&good).unwrap();
        assert_eq!(rom.base(), 0xffe0_0000);
        assert_eq!(rom.size(), 2 << 20);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn fw_cfg_describes_cpus_and_the_e820_ram_map() {
        let ram = [(0, 0x8000_0000), (FOUR_GIB, 0x4000_0000)];
        let items = fw_cfg_items(FirmwarePlatform {
            vcpus: 2,
            ram: &ram,
            acpi_files: vec![],
            kernel: None,
        })
        .unwrap();
        let all = items.selectors();
        assert_eq!(&all[&key::NB_CPUS][..], &[2, 0]);
        assert_eq!(
            u64::from_le_bytes(all[&key::RAM_SIZE][..].try_into().unwrap()),
            0xc000_0000
        );
        let e820 = &all[&key::FILE_FIRST][..];
        assert_eq!(e820.len(), 40);
        assert_eq!(
            u64::from_le_bytes(e820[20..28].try_into().unwrap()),
            FOUR_GIB
        );
        assert_eq!(u32::from_le_bytes(e820[36..40].try_into().unwrap()), 1);
    }

    #[test]
    fn a_bzimage_is_split_into_setup_and_kernel_and_anything_else_refused() {
        let dir = std::env::temp_dir().join(format!("ftvmm-fwk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut image = vec![0u8; 64 << 10];
        image[0x1f1] = 27;
        image[0x202..0x206].copy_from_slice(b"HdrS");
        let kernel = dir.join("bzImage");
        std::fs::write(&kernel, &image).unwrap();
        let initrd = dir.join("initrd");
        std::fs::write(&initrd, b"cpio").unwrap();
        let items = fw_cfg_items(FirmwarePlatform {
            vcpus: 1,
            ram: &[(0, 1 << 30)],
            acpi_files: vec![("etc/acpi/rsdp", vec![0; 36])],
            kernel: Some(FirmwareKernel {
                kernel: &kernel,
                initrd: Some(&initrd),
                cmdline: "console=ttyS0",
            }),
        })
        .unwrap()
        .selectors();
        let u32_item = |k| u32::from_le_bytes(items[&k][..].try_into().unwrap());
        assert_eq!(u32_item(key::SETUP_SIZE), 28 * 512);
        assert_eq!(u32_item(key::KERNEL_SIZE), (64 << 10) - 28 * 512);
        assert_eq!(items[&key::SETUP_DATA].len(), 28 * 512);
        assert_eq!(&items[&key::INITRD_DATA][..], b"cpio");
        assert_eq!(&items[&key::CMDLINE_DATA][..], b"console=ttyS0\0");
        assert_eq!(u32_item(key::CMDLINE_SIZE), 14);

        let elf = dir.join("vmlinux");
        std::fs::write(&elf, b"\x7fELF and the rest").unwrap();
        let err = fw_cfg_items(FirmwarePlatform {
            vcpus: 1,
            ram: &[(0, 1 << 30)],
            acpi_files: vec![],
            kernel: Some(FirmwareKernel {
                kernel: &elf,
                initrd: None,
                cmdline: "",
            }),
        })
        .err()
        .unwrap()
        .to_string();
        assert!(
            err.contains("vmlinux") && err.contains("not a bzImage"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
