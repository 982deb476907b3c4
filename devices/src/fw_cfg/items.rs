//! What fw_cfg serves: numbered items (QEMU's selector keys) and named files, with the file
//! directory built from them. Keys and layouts follow QEMU's `docs/specs/fw_cfg.rst`, the contract
//! OVMF (Debian's `ovmf`) and Linux's `qemu_fw_cfg` driver read.

use std::collections::BTreeMap;
use std::sync::Arc;

/// Selector keys.
pub mod key {
    /// "QEMU" (4 bytes).
    pub const SIGNATURE: u16 = 0x00;
    /// Interface features, little-endian u32: [`super::FEATURE_TRADITIONAL`], [`super::FEATURE_DMA`].
    pub const ID: u16 = 0x01;
    /// Guest RAM below the PCI hole plus above 4 GiB, bytes, little-endian u64.
    pub const RAM_SIZE: u16 = 0x03;
    /// Present vCPUs, little-endian u16.
    pub const NB_CPUS: u16 = 0x05;
    /// The most vCPUs there can be, little-endian u16.
    pub const MAX_CPUS: u16 = 0x0f;
    /// Direct kernel boot: the kernel's protected-mode part (after its setup sectors).
    pub const KERNEL_SIZE: u16 = 0x08;
    pub const KERNEL_DATA: u16 = 0x11;
    pub const INITRD_SIZE: u16 = 0x0b;
    pub const INITRD_DATA: u16 = 0x12;
    pub const CMDLINE_SIZE: u16 = 0x14;
    pub const CMDLINE_DATA: u16 = 0x15;
    /// Direct kernel boot: the kernel's setup sectors (real-mode part, with the boot header).
    pub const SETUP_SIZE: u16 = 0x17;
    pub const SETUP_DATA: u16 = 0x18;
    /// The file directory.
    pub const FILE_DIR: u16 = 0x19;
    /// The first file's selector; files are numbered from here in directory order.
    pub const FILE_FIRST: u16 = 0x20;
}

/// Feature bit of [`key::ID`]: the traditional (port) interface.
pub const FEATURE_TRADITIONAL: u32 = 1;
/// Feature bit of [`key::ID`]: the DMA interface.
pub const FEATURE_DMA: u32 = 2;
/// Longest file name, bytes (the directory's 56-byte field keeps a terminating NUL).
pub const MAX_FILE_NAME: usize = 55;
/// Most files (selectors [`key::FILE_FIRST`] up to the write channel's bit).
pub const MAX_FILES: usize = 0x4000 - key::FILE_FIRST as usize;

/// Errors adding an item or a file.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ItemError {
    #[error("fw_cfg file name {0:?}: 1 to {MAX_FILE_NAME} bytes without NUL")]
    FileName(String),
    #[error("fw_cfg file {0:?} exists already")]
    DuplicateFile(String),
    #[error("fw_cfg item {key:#x}: {reason}")]
    Key { key: u16, reason: &'static str },
    #[error("fw_cfg: more than {MAX_FILES} files")]
    TooManyFiles,
    #[error("fw_cfg item {what} is {len} bytes; at most 4 GiB - 1")]
    TooLarge { what: String, len: usize },
}

/// The items and files a VM's fw_cfg serves; read-only once the device has them.
#[derive(Clone, Debug)]
pub struct FwCfgItems {
    items: BTreeMap<u16, Arc<[u8]>>,
    files: BTreeMap<String, Arc<[u8]>>,
}

impl Default for FwCfgItems {
    fn default() -> Self {
        Self::new()
    }
}

impl FwCfgItems {
    /// The signature and the interface's features (traditional and DMA); nothing else yet.
    pub fn new() -> Self {
        let mut items = BTreeMap::new();
        items.insert(key::SIGNATURE, Arc::from(&b"QEMU"[..]));
        items.insert(
            key::ID,
            Arc::from(&(FEATURE_TRADITIONAL | FEATURE_DMA).to_le_bytes()[..]),
        );
        Self {
            items,
            files: BTreeMap::new(),
        }
    }

    /// Serves `data` at selector `key` (one of [`key`]'s, or an architecture-local one from
    /// 0x8000); the signature, the features, the directory and the file selectors are not
    /// replaceable.
    pub fn add_item(&mut self, key: u16, data: impl Into<Arc<[u8]>>) -> Result<(), ItemError> {
        let data = data.into();
        if matches!(key, key::SIGNATURE | key::ID | key::FILE_DIR) {
            return Err(ItemError::Key {
                key,
                reason: "is the device's own",
            });
        }
        if (key::FILE_FIRST..0x4000).contains(&key) || key & 0x4000 != 0 {
            return Err(ItemError::Key {
                key,
                reason: "is a file selector or the write channel",
            });
        }
        check_len(&format!("{key:#x}"), &data)?;
        self.items.insert(key, data);
        Ok(())
    }

    /// Serves `data` as the file `name` (e.g. `etc/e820`).
    pub fn add_file(&mut self, name: &str, data: impl Into<Arc<[u8]>>) -> Result<(), ItemError> {
        let data = data.into();
        if name.is_empty() || name.len() > MAX_FILE_NAME || name.contains('\0') {
            return Err(ItemError::FileName(name.to_string()));
        }
        if self.files.contains_key(name) {
            return Err(ItemError::DuplicateFile(name.to_string()));
        }
        if self.files.len() == MAX_FILES {
            return Err(ItemError::TooManyFiles);
        }
        check_len(name, &data)?;
        self.files.insert(name.to_string(), data);
        Ok(())
    }

    /// Every selector and what it serves: the items, the files numbered from [`key::FILE_FIRST`]
    /// in name order, and the directory describing them.
    pub fn selectors(&self) -> BTreeMap<u16, Arc<[u8]>> {
        let mut all = self.items.clone();
        let mut directory = Vec::with_capacity(4 + 64 * self.files.len());
        directory.extend_from_slice(&(self.files.len() as u32).to_be_bytes());
        for (i, (name, data)) in self.files.iter().enumerate() {
            let selector = key::FILE_FIRST + i as u16;
            directory.extend_from_slice(&(data.len() as u32).to_be_bytes());
            directory.extend_from_slice(&selector.to_be_bytes());
            directory.extend_from_slice(&[0, 0]);
            let mut field = [0u8; MAX_FILE_NAME + 1];
            field[..name.len()].copy_from_slice(name.as_bytes());
            directory.extend_from_slice(&field);
            all.insert(selector, data.clone());
        }
        all.insert(key::FILE_DIR, directory.into());
        all
    }
}

fn check_len(what: &str, data: &[u8]) -> Result<(), ItemError> {
    if u32::try_from(data.len()).is_err() {
        return Err(ItemError::TooLarge {
            what: what.to_string(),
            len: data.len(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_directory_lists_files_in_name_order_with_their_selectors() {
        let mut items = FwCfgItems::new();
        items.add_file("etc/e820", vec![1u8; 40]).unwrap();
        items.add_file("bootorder", &b"/pci@i0cf8/x\0"[..]).unwrap();
        let all = items.selectors();
        let dir = &all[&key::FILE_DIR];
        assert_eq!(u32::from_be_bytes(dir[..4].try_into().unwrap()), 2);
        let entry = |i: usize| &dir[4 + 64 * i..4 + 64 * (i + 1)];
        assert_eq!(u32::from_be_bytes(entry(0)[..4].try_into().unwrap()), 13);
        assert_eq!(u16::from_be_bytes(entry(0)[4..6].try_into().unwrap()), 0x20);
        assert!(entry(0)[8..].starts_with(b"bootorder\0"));
        assert_eq!(u16::from_be_bytes(entry(1)[4..6].try_into().unwrap()), 0x21);
        assert!(entry(1)[8..].starts_with(b"etc/e820\0"));
        assert_eq!(all[&0x21].len(), 40);
        assert_eq!(&all[&key::SIGNATURE][..], b"QEMU");
    }

    #[test]
    fn bad_names_keys_and_duplicates_are_refused() {
        let mut items = FwCfgItems::new();
        assert!(matches!(
            items.add_file("", vec![]),
            Err(ItemError::FileName(_))
        ));
        assert!(matches!(
            items.add_file(&"x".repeat(56), vec![]),
            Err(ItemError::FileName(_))
        ));
        items.add_file("a", vec![]).unwrap();
        assert_eq!(
            items.add_file("a", vec![]),
            Err(ItemError::DuplicateFile("a".into()))
        );
        for key in [key::SIGNATURE, key::FILE_DIR, 0x20, 0x4005] {
            assert!(matches!(
                items.add_item(key, vec![1]),
                Err(ItemError::Key { .. })
            ));
        }
        items
            .add_item(key::NB_CPUS, 2u16.to_le_bytes().to_vec())
            .unwrap();
        items.add_item(0x8003, vec![0; 20]).unwrap();
    }
}
