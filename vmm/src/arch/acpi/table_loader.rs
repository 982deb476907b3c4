//! Handing an [`AcpiTables`] set to UEFI firmware the way QEMU does: two fw_cfg blobs and a
//! script (`etc/table-loader`, QEMU's "BIOS linker/loader") that tells the firmware to allocate
//! them, patch the pointers between tables and compute the checksums. OVMF then installs every
//! table a pointer leads to through its ACPI table protocol, which makes its own RSDP and XSDT.
//!
//! The blobs: `etc/acpi/rsdp` (the RSDP, allocated in the F-segment) and `etc/acpi/tables`
//! (every other table, one after another, allocated anywhere below 4 GiB). Before patching, a
//! pointer field holds the target's offset in its blob and a checksum field holds zero.
//!
//! Each script command is 128 bytes: a little-endian `u32` command, then its arguments (file names
//! are NUL-padded to 56 bytes):
//!
//! | command | arguments |
//! |---|---|
//! | 1 ALLOCATE | file, `u32` alignment, `u8` zone (1 high memory, 2 F-segment) |
//! | 2 ADD_POINTER | destination file, source file, `u32` offset, `u8` size: add the source blob's address to the size-byte integer at offset in the destination |
//! | 3 ADD_CHECKSUM | file, `u32` result offset, `u32` start, `u32` length: store the byte that makes the range sum to zero |

use super::{AcpiError, AcpiPlatform, AcpiTables, DsdtDevice};

/// The fw_cfg file holding the RSDP.
pub const RSDP_FILE: &str = "etc/acpi/rsdp";
/// The fw_cfg file holding every other table.
pub const TABLES_FILE: &str = "etc/acpi/tables";
/// The fw_cfg file holding the script.
pub const LOADER_FILE: &str = "etc/table-loader";

const COMMAND_LEN: usize = 128;
const FILE_NAME_LEN: usize = 56;
const ALLOCATE: u32 = 1;
const ADD_POINTER: u32 = 2;
const ADD_CHECKSUM: u32 = 3;
const ZONE_HIGH: u8 = 1;
const ZONE_FSEG: u8 = 2;
const TABLES_ALIGN: u32 = 64;
const RSDP_ALIGN: u32 = 16;

/// The three fw_cfg files: (name, contents).
pub struct FirmwareAcpiFiles {
    pub files: Vec<(&'static str, Vec<u8>)>,
}

/// Builds the q35 tables for a guest with `vcpus` vCPUs and `devices` in the DSDT, as fw_cfg files.
pub fn firmware_acpi_files(
    vcpus: usize,
    devices: &[&dyn DsdtDevice],
) -> Result<FirmwareAcpiFiles, AcpiError> {
    let set = AcpiTables::build(AcpiPlatform::Q35, vcpus, devices)?;
    Ok(loader_files(&set))
}

/// The two blobs, by index.
const BLOB_NAMES: [&str; 2] = [RSDP_FILE, TABLES_FILE];
const RSDP_BLOB: usize = 0;
const TABLES_BLOB: usize = 1;

/// Lays `set` out in the two blobs and writes the script that links them.
fn loader_files(set: &AcpiTables) -> FirmwareAcpiFiles {
    let rsdp = set.rsdp();
    let mut blobs: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
    // Where each table goes: (blob, offset in it).
    let mut places = Vec::with_capacity(set.tables.len());
    for (index, table) in set.tables.iter().enumerate() {
        let blob = if index == rsdp {
            RSDP_BLOB
        } else {
            TABLES_BLOB
        };
        places.push((blob, blobs[blob].len()));
        blobs[blob].extend_from_slice(&table.bytes);
    }
    let mut script = Vec::new();
    command_allocate(&mut script, RSDP_FILE, RSDP_ALIGN, ZONE_FSEG);
    command_allocate(&mut script, TABLES_FILE, TABLES_ALIGN, ZONE_HIGH);
    for link in &set.links {
        let (blob, base) = places[link.table];
        let (target_blob, target_offset) = places[link.target];
        let at = base + link.offset;
        let size = usize::from(link.size);
        let value = (target_offset as u64).to_le_bytes();
        blobs[blob][at..at + size].copy_from_slice(&value[..size]);
        let (dest, src) = (BLOB_NAMES[blob], BLOB_NAMES[target_blob]);
        command_add_pointer(&mut script, dest, src, at as u32, link.size);
    }
    for (table, &(blob, base)) in set.tables.iter().zip(&places) {
        for (at, start, len) in table.checksums() {
            blobs[blob][base + at] = 0;
            let (result, start) = ((base + at) as u32, (base + start) as u32);
            command_add_checksum(&mut script, BLOB_NAMES[blob], result, start, len as u32);
        }
    }
    let [rsdp_blob, tables_blob] = blobs;
    FirmwareAcpiFiles {
        files: vec![
            (RSDP_FILE, rsdp_blob),
            (TABLES_FILE, tables_blob),
            (LOADER_FILE, script),
        ],
    }
}

fn file_name(name: &str) -> [u8; FILE_NAME_LEN] {
    let mut field = [0u8; FILE_NAME_LEN];
    field[..name.len()].copy_from_slice(name.as_bytes());
    field
}

fn push_command(script: &mut Vec<u8>, command: u32, arguments: &[&[u8]]) {
    let start = script.len();
    script.extend_from_slice(&command.to_le_bytes());
    for argument in arguments {
        script.extend_from_slice(argument);
    }
    script.resize(start + COMMAND_LEN, 0);
}

fn command_allocate(script: &mut Vec<u8>, file: &str, align: u32, zone: u8) {
    let args: [&[u8]; 3] = [&file_name(file), &align.to_le_bytes(), &[zone]];
    push_command(script, ALLOCATE, &args);
}

fn command_add_pointer(script: &mut Vec<u8>, dest: &str, src: &str, offset: u32, size: u8) {
    let args: [&[u8]; 4] = [
        &file_name(dest),
        &file_name(src),
        &offset.to_le_bytes(),
        &[size],
    ];
    push_command(script, ADD_POINTER, &args);
}

fn command_add_checksum(script: &mut Vec<u8>, file: &str, result: u32, start: u32, len: u32) {
    let args: [&[u8]; 4] = [
        &file_name(file),
        &result.to_le_bytes(),
        &start.to_le_bytes(),
        &len.to_le_bytes(),
    ];
    push_command(script, ADD_CHECKSUM, &args);
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::arch::acpi::Com1;

    /// Runs a script as OVMF does, with the blobs "allocated" at the given addresses in one flat
    /// memory; returns that memory.
    fn run_script(files: &FirmwareAcpiFiles, addresses: &HashMap<&str, usize>) -> Vec<u8> {
        let contents: HashMap<&str, &Vec<u8>> = files.files.iter().map(|(n, b)| (*n, b)).collect();
        let mut memory = vec![0u8; 1 << 20];
        let name = |field: &[u8]| {
            let end = field.iter().position(|b| *b == 0).unwrap();
            std::str::from_utf8(&field[..end]).unwrap().to_string()
        };
        let u32_at = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
        for command in contents[LOADER_FILE].chunks(COMMAND_LEN) {
            let args = &command[4..];
            match u32_at(command, 0) {
                ALLOCATE => {
                    let file = name(&args[..56]);
                    let at = addresses[file.as_str()];
                    let align = u32_at(args, 56) as usize;
                    assert_eq!(at % align, 0);
                    let data = contents[file.as_str()];
                    memory[at..at + data.len()].copy_from_slice(data);
                }
                ADD_POINTER => {
                    let dest = addresses[name(&args[..56]).as_str()];
                    let src = addresses[name(&args[56..112]).as_str()];
                    let at = dest + u32_at(args, 112) as usize;
                    let size = args[116] as usize;
                    let mut value = [0u8; 8];
                    value[..size].copy_from_slice(&memory[at..at + size]);
                    let patched = (u64::from_le_bytes(value) + src as u64).to_le_bytes();
                    memory[at..at + size].copy_from_slice(&patched[..size]);
                }
                ADD_CHECKSUM => {
                    let base = addresses[name(&args[..56]).as_str()];
                    let result = base + u32_at(args, 56) as usize;
                    let start = base + u32_at(args, 60) as usize;
                    let len = u32_at(args, 64) as usize;
                    let sum = memory[start..start + len]
                        .iter()
                        .fold(0u8, |a, b| a.wrapping_add(*b));
                    memory[result] = sum.wrapping_neg();
                }
                other => panic!("unknown command {other}"),
            }
        }
        memory
    }

    fn checksum_ok(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    fn table(memory: &[u8], at: usize) -> &[u8] {
        let len = u32::from_le_bytes(memory[at + 4..at + 8].try_into().unwrap()) as usize;
        &memory[at..at + len]
    }

    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    #[test]
    fn the_script_links_and_checksums_every_table_wherever_the_firmware_puts_them() {
        let files = firmware_acpi_files(2, &[&Com1]).unwrap();
        let names: Vec<&str> = files.files.iter().map(|f| f.0).collect();
        assert_eq!(names, [RSDP_FILE, TABLES_FILE, LOADER_FILE]);
        let addresses = HashMap::from([(RSDP_FILE, 0xf_0000), (TABLES_FILE, 0x4_0040)]);
        let memory = run_script(&files, &addresses);
        let rsdp = &memory[0xf_0000..0xf_0000 + 36];
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert!(checksum_ok(&rsdp[..20]) && checksum_ok(rsdp));
        let xsdt = table(&memory, u64_at(rsdp, 24) as usize);
        assert_eq!(&xsdt[..4], b"XSDT");
        assert!(checksum_ok(xsdt));
        let entries: Vec<&[u8]> = xsdt[36..]
            .chunks(8)
            .map(|c| table(&memory, u64::from_le_bytes(c.try_into().unwrap()) as usize))
            .collect();
        let signatures: Vec<&[u8]> = entries.iter().map(|t| &t[..4]).collect();
        assert_eq!(signatures, [&b"FACP"[..], b"APIC", b"MCFG"]);
        assert!(entries.iter().all(|t| checksum_ok(t)));
        let fadt = entries[0];
        let dsdt = table(&memory, u64_at(fadt, 140) as usize);
        assert_eq!(&dsdt[..4], b"DSDT");
        assert!(checksum_ok(dsdt));
        assert!(
            dsdt.windows(4).any(|w| w == b"PCI0"),
            "the q35 DSDT has the PCI root bridge"
        );
        let facs_at = u64_at(fadt, 132) as usize;
        assert_eq!(&memory[facs_at..facs_at + 4], b"FACS");
        // q35's fixed hardware: PM1a control at 0x604, the timer at 0x608, SCI on IRQ 9, reset
        // through 0xCF9; not hardware-reduced.
        assert_eq!(u32::from_le_bytes(fadt[64..68].try_into().unwrap()), 0x604);
        assert_eq!(u32::from_le_bytes(fadt[76..80].try_into().unwrap()), 0x608);
        assert_eq!(u16::from_le_bytes(fadt[46..48].try_into().unwrap()), 9);
        assert_eq!(
            u32::from_le_bytes(fadt[112..116].try_into().unwrap()) & (1 << 20),
            0
        );
        assert_eq!(u64_at(fadt, 120), 0xcf9);
        let mcfg = entries[2];
        assert_eq!(u64_at(mcfg, 44), crate::arch::layout::PCI_ECAM_START);
    }

    #[test]
    fn every_command_is_128_bytes_and_checksums_follow_pointers() {
        let files = firmware_acpi_files(1, &[]).unwrap();
        let script = &files.files[2].1;
        assert_eq!(script.len() % COMMAND_LEN, 0);
        let kinds: Vec<u32> = script
            .chunks(COMMAND_LEN)
            .map(|c| u32::from_le_bytes(c[..4].try_into().unwrap()))
            .collect();
        let last_pointer = kinds.iter().rposition(|k| *k == ADD_POINTER).unwrap();
        let first_checksum = kinds.iter().position(|k| *k == ADD_CHECKSUM).unwrap();
        assert!(kinds[..2].iter().all(|k| *k == ALLOCATE));
        assert!(last_pointer < first_checksum);
    }
}
