//! Loading a kernel (ELF with or without a PVH note, or bzImage), its command line and initramfs, and
//! writing the boot protocol's parameters (Linux `boot_params` or PVH `hvm_start_info`).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info, XEN_HVM_START_MAGIC_VALUE,
};
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{load_cmdline, BzImage, Elf, KernelLoader, KernelLoaderResult};
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIMEM_START, MMIO_HOLE_START, PVH_INFO_START,
    PVH_MEMMAP_START, ZERO_PAGE_START,
};
use super::regs::EntryMode;
use crate::memory::{GuestMemory, PAGE_SIZE};

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
/// Offset of the 64-bit entry point (`startup_64`) in a loaded bzImage.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;

/// Errors loading a guest kernel.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open kernel image {path}: {source}")]
    OpenKernel {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("kernel image {0} is empty")]
    EmptyKernel(PathBuf),
    #[error("kernel image {0} is neither an ELF (vmlinux, test guest) nor a bzImage")]
    UnknownFormat(PathBuf),
    #[error("cannot load kernel image {path}: {source}")]
    Load {
        path: PathBuf,
        source: linux_loader::loader::Error,
    },
    #[error("invalid kernel command line {cmdline:?}: {reason}")]
    Cmdline { cmdline: String, reason: String },
    #[error("cannot read initramfs {path}: {source}")]
    ReadInitrd {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("initramfs {path} ({size} bytes) does not fit in guest memory below {limit:#x} above the kernel")]
    InitrdTooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("cannot write initramfs to guest memory: {0}")]
    WriteInitrd(vm_memory::GuestMemoryError),
    #[error("cannot write boot parameters: {0}")]
    BootParams(linux_loader::configurator::Error),
}

/// Newtypes so PVH structures can be written with vm-memory.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct StartInfo(hvm_start_info);
// SAFETY: plain-old-data C struct with no padding-dependent invariants; any byte pattern is valid.
unsafe impl ByteValued for StartInfo {}
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct MemmapEntry(hvm_memmap_table_entry);
// SAFETY: as above.
unsafe impl ByteValued for MemmapEntry {}
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct ModlistEntry(hvm_modlist_entry);
// SAFETY: as above.
unsafe impl ByteValued for ModlistEntry {}

/// What the loader needs to know.
pub struct KernelSpec<'a> {
    pub kernel: &'a Path,
    pub initrd: Option<&'a Path>,
    pub cmdline: &'a str,
    pub rsdp: u64,
}

/// A RAM or reserved range of the guest's memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryMapEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The guest's memory map: low RAM, the BIOS hole, high RAM (and RAM above 4 GiB).
pub fn memory_map(mem: &GuestMemory) -> Vec<MemoryMapEntry> {
    let mut map = vec![
        MemoryMapEntry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        MemoryMapEntry {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            kind: E820_RESERVED,
        },
    ];
    for region in mem.iter() {
        let start = region.start_addr().raw_value().max(HIMEM_START);
        let end = region.start_addr().raw_value() + region.len();
        if end > start {
            map.push(MemoryMapEntry {
                addr: start,
                size: end - start,
                kind: E820_RAM,
            });
        }
    }
    map
}

enum Format {
    Elf,
    BzImage,
}

fn detect_format(path: &Path, file: &mut File) -> Result<Format, BootError> {
    let open_err = |source| BootError::OpenKernel {
        path: path.to_path_buf(),
        source,
    };
    let len = file.metadata().map_err(open_err)?.len();
    if len == 0 {
        return Err(BootError::EmptyKernel(path.to_path_buf()));
    }
    let mut head = [0u8; 0x206];
    let n = read_up_to(file, &mut head).map_err(open_err)?;
    file.seek(SeekFrom::Start(0)).map_err(open_err)?;
    if n >= 4 && head[..4] == *b"\x7fELF" {
        Ok(Format::Elf)
    } else if n >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        Ok(Format::BzImage)
    } else {
        Err(BootError::UnknownFormat(path.to_path_buf()))
    }
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut total = 0;
    while total < buf.len() {
        match file.read(&mut buf[total..])? {
            0 => break,
            n => total += n,
        }
    }
    Ok(total)
}

/// Loads the kernel, command line and initramfs and writes the boot parameters. Returns how the
/// boot vCPU must enter the guest.
pub fn load_kernel(mem: &GuestMemory, spec: &KernelSpec) -> Result<EntryMode, BootError> {
    let path = spec.kernel;
    let mut file = File::open(path).map_err(|source| BootError::OpenKernel {
        path: path.to_path_buf(),
        source,
    })?;
    let format = detect_format(path, &mut file)?;
    let load_err = |source| BootError::Load {
        path: path.to_path_buf(),
        source,
    };
    let result = match format {
        Format::Elf => Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))),
        Format::BzImage => BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))),
    }
    .map_err(load_err)?;

    let cmdline =
        Cmdline::try_from(spec.cmdline, CMDLINE_MAX_SIZE).map_err(|e| BootError::Cmdline {
            cmdline: spec.cmdline.to_string(),
            reason: e.to_string(),
        })?;
    load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline).map_err(|e| BootError::Cmdline {
        cmdline: spec.cmdline.to_string(),
        reason: e.to_string(),
    })?;
    let cmdline_size = spec.cmdline.len() as u32 + 1;

    let initrd_limit = result
        .setup_header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|m| *m != 0)
        .unwrap_or(u64::MAX);
    let initrd = match spec.initrd {
        Some(p) => Some(load_initrd(mem, p, kernel_end(&result), initrd_limit)?),
        None => None,
    };

    match (format, result.pvh_boot_cap) {
        (Format::Elf, PvhBootCapability::PvhEntryPresent(entry)) => {
            write_pvh_start_info(mem, spec.rsdp, initrd)?;
            Ok(EntryMode::Pvh32 {
                entry: entry.raw_value(),
                start_info: PVH_INFO_START,
            })
        }
        (format, _) => {
            write_boot_params(mem, &result, spec.rsdp, cmdline_size, initrd)?;
            let entry = match format {
                Format::Elf => result.kernel_load.raw_value(),
                Format::BzImage => result.kernel_load.raw_value() + BZIMAGE_64BIT_ENTRY_OFFSET,
            };
            Ok(EntryMode::Long64 {
                entry,
                boot_params: ZERO_PAGE_START,
            })
        }
    }
}

fn kernel_end(result: &KernelLoaderResult) -> u64 {
    result.kernel_load.raw_value().max(HIMEM_START) + result.kernel_end
}

/// Places the initramfs as high as possible in low memory, above the kernel. Returns (addr, size).
fn load_initrd(
    mem: &GuestMemory,
    path: &Path,
    kernel_end: u64,
    addr_limit: u64,
) -> Result<(u64, u64), BootError> {
    let read_err = |source| BootError::ReadInitrd {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    let low_end = mem
        .iter()
        .map(|r| r.start_addr().raw_value() + r.len())
        .filter(|e| *e <= MMIO_HOLE_START)
        .max()
        .unwrap_or(0);
    let top = low_end.min(addr_limit.saturating_add(1));
    let too_large = || BootError::InitrdTooLarge {
        path: path.to_path_buf(),
        size,
        limit: top,
    };
    let addr = top.checked_sub(size).ok_or_else(too_large)? & !(PAGE_SIZE as u64 - 1);
    if addr < kernel_end {
        return Err(too_large());
    }
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(BootError::WriteInitrd)?;
    Ok((addr, size))
}

fn write_boot_params(
    mem: &GuestMemory,
    result: &KernelLoaderResult,
    rsdp: u64,
    cmdline_size: u32,
    initrd: Option<(u64, u64)>,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(hdr) = result.setup_header {
        params.hdr = hdr;
    }
    let hdr: &mut setup_header = &mut params.hdr;
    hdr.type_of_loader = KERNEL_LOADER_OTHER;
    hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    hdr.header = KERNEL_HDR_MAGIC;
    hdr.cmd_line_ptr = CMDLINE_START as u32;
    hdr.cmdline_size = cmdline_size;
    if hdr.kernel_alignment == 0 {
        hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    if let Some((addr, size)) = initrd {
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = size as u32;
    }
    params.acpi_rsdp_addr = rsdp;
    let map = memory_map(mem);
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        slot.addr = e.addr;
        slot.size = e.size;
        slot.r#type = e.kind;
    }
    params.e820_entries = map.len().min(params.e820_table.len()) as u8;
    LinuxBootConfigurator::write_bootparams::<GuestMemory>(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(BootError::BootParams)
}

fn write_pvh_start_info(
    mem: &GuestMemory,
    rsdp: u64,
    initrd: Option<(u64, u64)>,
) -> Result<(), BootError> {
    let memmap: Vec<MemmapEntry> = memory_map(mem)
        .iter()
        .map(|e| {
            MemmapEntry(hvm_memmap_table_entry {
                addr: e.addr,
                size: e.size,
                type_: e.kind,
                reserved: 0,
            })
        })
        .collect();
    let modlist_addr =
        PVH_MEMMAP_START + (memmap.len() * std::mem::size_of::<MemmapEntry>()) as u64;
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: rsdp,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut params = BootParams::new(&StartInfo(info), GuestAddress(PVH_INFO_START));
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
    if let Some((paddr, size)) = initrd {
        info.nr_modules = 1;
        info.modlist_paddr = modlist_addr;
        params = BootParams::new(&StartInfo(info), GuestAddress(PVH_INFO_START));
        params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
        params.set_modules(
            &[ModlistEntry(hvm_modlist_entry {
                paddr,
                size,
                ..Default::default()
            })],
            GuestAddress(modlist_addr),
        );
    }
    PvhBootConfigurator::write_bootparams::<GuestMemory>(&params, mem)
        .map_err(BootError::BootParams)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ftvmm-boot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::File::create(&p).unwrap().write_all(bytes).unwrap();
        p
    }

    fn spec(kernel: &Path) -> KernelSpec<'_> {
        KernelSpec {
            kernel,
            initrd: None,
            cmdline: "console=ttyS0",
            rsdp: 0xe0000,
        }
    }

    #[test]
    fn rejects_missing_empty_and_garbage_images() {
        let mem = crate::memory::create_guest_memory(16).unwrap();
        let missing = Path::new("/nonexistent/ftvmm/kernel");
        assert!(matches!(
            load_kernel(&mem, &spec(missing)),
            Err(BootError::OpenKernel { .. })
        ));
        let empty = temp_file("empty", b"");
        assert!(matches!(
            load_kernel(&mem, &spec(&empty)),
            Err(BootError::EmptyKernel(_))
        ));
        let garbage = temp_file("garbage", &[0x5a; 4096]);
        assert!(matches!(
            load_kernel(&mem, &spec(&garbage)),
            Err(BootError::UnknownFormat(_))
        ));
        let mut bad_elf = b"\x7fELF".to_vec();
        bad_elf.resize(200, 0xee);
        let bad_elf = temp_file("bad-elf", &bad_elf);
        assert!(matches!(
            load_kernel(&mem, &spec(&bad_elf)),
            Err(BootError::Load { .. })
        ));
    }

    #[test]
    fn memory_map_has_low_ram_hole_and_high_ram() {
        let mem = crate::memory::create_guest_memory(64).unwrap();
        let map = memory_map(&mem);
        assert_eq!(
            map[0],
            MemoryMapEntry {
                addr: 0,
                size: EBDA_START,
                kind: E820_RAM
            }
        );
        assert_eq!(map[1].kind, E820_RESERVED);
        assert_eq!(
            map[2],
            MemoryMapEntry {
                addr: HIMEM_START,
                size: (64 << 20) - HIMEM_START,
                kind: E820_RAM
            }
        );
    }
}
