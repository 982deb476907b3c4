//! The virtio-blk device: configuration, features, activation.

use super::request::{ID_BYTES, SECTOR_SIZE};
use crate::persist::VirtioDeviceState;
use crate::virtio::device_queues::DeviceQueues;
use crate::virtio::{
    read_config_bytes, ActivateContext, ActivateError, VirtioDevice, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

/// virtio device ID of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// `size_max` in the configuration is the largest data segment.
pub(super) const VIRTIO_BLK_F_SIZE_MAX: u64 = 1 << 1;
/// `seg_max` in the configuration is the most data segments in one request. Without it Linux puts
/// one segment in each request (a 4 MiB write became 1,025 requests, docs/benchmarks.md).
pub(super) const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
/// `blk_size` in the configuration is the logical block size.
const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
/// Maximum size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// The most data segments in one request: every descriptor of the queue but the header's and the
/// status byte's (indirect descriptors are not offered).
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// The largest data segment, held to when the driver accepted it (request.rs, `SegmentLimits`).
pub const SIZE_MAX: u32 = 1 << 20;
/// The configuration space: `struct virtio_blk_config` up to and including `blk_size`.
const CONFIG_LEN: usize = 24;

/// The device's configuration space for a disk of `capacity` bytes: capacity in sectors (offset
/// 0), size_max (8), seg_max (12), geometry left zero (16), blk_size (20).
fn config_space(capacity: u64) -> [u8; CONFIG_LEN] {
    let mut config = [0u8; CONFIG_LEN];
    config[0..8].copy_from_slice(&(capacity / SECTOR_SIZE).to_le_bytes());
    config[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
    config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
    config[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
    config
}

/// A `--disk` argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockConfig {
    pub path: PathBuf,
    pub read_only: bool,
}

/// Errors creating a block device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open disk image {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("disk image {path} is {size} bytes, not a multiple of {SECTOR_SIZE}")]
    Size { path: PathBuf, size: u64 },
    #[error("cannot create an eventfd for disk {path}: {source}")]
    EventFd {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid --disk value {0:?}: expected path=IMG[,readonly]")]
    Parse(String),
}

impl std::str::FromStr for BlockConfig {
    type Err = BlockError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut path = None;
        let mut read_only = false;
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("path", p)) if !p.is_empty() => path = Some(PathBuf::from(p)),
                None if part == "readonly" || part == "ro" => read_only = true,
                Some(("readonly", v)) => match v {
                    "on" | "true" | "1" => read_only = true,
                    "off" | "false" | "0" => read_only = false,
                    _ => return Err(BlockError::Parse(s.to_string())),
                },
                _ => return Err(BlockError::Parse(s.to_string())),
            }
        }
        Ok(Self {
            path: path.ok_or_else(|| BlockError::Parse(s.to_string()))?,
            read_only,
        })
    }
}

/// A virtio-blk device over a raw image.
pub struct VirtioBlock {
    pub(super) file: File,
    pub(super) path: PathBuf,
    pub(super) capacity: u64,
    pub(super) read_only: bool,
    pub(super) id: [u8; ID_BYTES],
    pub(super) acked_features: u64,
    config: [u8; CONFIG_LEN],
    /// Activation, the request queue and its notifications on the event loop.
    pub(super) queues: DeviceQueues,
    /// The guest's writes, tracked or recorded while the guest is protected.
    pub(super) journal: super::WriteJournal,
}

impl VirtioBlock {
    /// Opens the image named by `config`; `index` distinguishes disks in their IDs.
    pub fn new(config: &BlockConfig, index: usize) -> Result<Self, BlockError> {
        let path = config.path.clone();
        let file = OpenOptions::new()
            .read(true)
            .write(!config.read_only)
            .open(&path)
            .map_err(|source| BlockError::Open {
                path: path.clone(),
                source,
            })?;
        let size = file
            .metadata()
            .map_err(|source| BlockError::Open {
                path: path.clone(),
                source,
            })?
            .len();
        if !size.is_multiple_of(SECTOR_SIZE) {
            return Err(BlockError::Size { path, size });
        }
        let mut id = [0u8; ID_BYTES];
        let name = format!("ftvmm-disk{index}");
        id[..name.len()].copy_from_slice(name.as_bytes());
        let queues =
            DeviceQueues::new(format!("virtio-blk {}", path.display()), 1).map_err(|source| {
                BlockError::EventFd {
                    path: path.clone(),
                    source,
                }
            })?;
        let journal = super::WriteJournal::new(size).map_err(|source| BlockError::EventFd {
            path: path.clone(),
            source,
        })?;
        Ok(Self {
            file,
            path,
            capacity: size,
            read_only: config.read_only,
            id,
            acked_features: 0,
            config: config_space(size),
            queues,
            journal,
        })
    }

    /// The journal of this disk's writes (shared: protection starts, takes and stops it).
    pub fn write_journal(&self) -> super::WriteJournal {
        self.journal.clone()
    }

    /// A second handle on the image, for reading it while the guest runs (a standby's first sync)
    /// or writing a standby's committed writes.
    pub fn image(&self) -> std::io::Result<File> {
        self.file.try_clone()
    }

    /// The image path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Disk size in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }
}

impl VirtioDevice for VirtioBlock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        let ro = if self.read_only { VIRTIO_BLK_F_RO } else { 0 };
        VIRTIO_F_VERSION_1
            | VIRTIO_BLK_F_FLUSH
            | VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_SIZE_MAX
            | VIRTIO_BLK_F_BLK_SIZE
            | VIRTIO_RING_F_EVENT_IDX
            | ro
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!("virtio-blk: ignored config write at {offset:#x}");
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.queues.activate(ctx)
    }

    fn reset(&mut self) -> bool {
        self.queues.reset();
        true
    }

    fn stop_queue(&mut self, index: usize) {
        self.queues.stop_queue(index);
    }

    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        self.queues.queue_states()
    }

    fn save_state(&self) -> VirtioDeviceState {
        VirtioDeviceState::Block {
            acked_features: self.acked_features,
        }
    }

    fn restore_state(&mut self, state: &VirtioDeviceState) -> Result<(), String> {
        match state {
            VirtioDeviceState::Block { acked_features } => {
                if acked_features & !self.avail_features() != 0 {
                    return Err(format!(
                        "disk {}: snapshot features {acked_features:#x} exceed what it offers ({:#x}; read-only differs?)",
                        self.path.display(),
                        self.avail_features()
                    ));
                }
                self.acked_features = *acked_features;
                Ok(())
            }
            other => Err(format!(
                "disk {}: snapshot holds a {other:?}, not a block device",
                self.path.display()
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_disk_arguments() {
        let c: BlockConfig = "path=/d.img,readonly".parse().unwrap();
        assert_eq!(
            c,
            BlockConfig {
                path: "/d.img".into(),
                read_only: true
            }
        );
        let c: BlockConfig = "path=/d.img".parse().unwrap();
        assert!(!c.read_only);
        assert!("readonly".parse::<BlockConfig>().is_err());
        assert!("path=".parse::<BlockConfig>().is_err());
        assert!("path=/x,bogus=1".parse::<BlockConfig>().is_err());
    }

    #[test]
    fn rejects_missing_and_unaligned_images() {
        let missing = BlockConfig {
            path: "/nonexistent/disk.img".into(),
            read_only: false,
        };
        assert!(matches!(
            VirtioBlock::new(&missing, 0),
            Err(BlockError::Open { .. })
        ));
        let p = std::env::temp_dir().join(format!("ftvmm-blk-odd-{}", std::process::id()));
        std::fs::write(&p, [0u8; 100]).unwrap();
        let odd = BlockConfig {
            path: p.clone(),
            read_only: true,
        };
        assert!(matches!(
            VirtioBlock::new(&odd, 0),
            Err(BlockError::Size { size: 100, .. })
        ));
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn config_space_holds_capacity_in_sectors() {
        let p = std::env::temp_dir().join(format!("ftvmm-blk-cap-{}", std::process::id()));
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        let dev = VirtioBlock::new(
            &BlockConfig {
                path: p.clone(),
                read_only: true,
            },
            3,
        )
        .unwrap();
        let mut cap = [0u8; 8];
        dev.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 8);
        let mut word = [0u8; 4];
        dev.read_config(8, &mut word);
        assert_eq!(u32::from_le_bytes(word), SIZE_MAX);
        dev.read_config(12, &mut word);
        assert_eq!(u32::from_le_bytes(word), 254);
        dev.read_config(20, &mut word);
        assert_eq!(u32::from_le_bytes(word), 512);
        let features = dev.avail_features();
        for bit in [
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_SIZE_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
        ] {
            assert_ne!(features & bit, 0);
        }
        assert_ne!(dev.avail_features() & VIRTIO_BLK_F_RO, 0);
        assert_eq!(&dev.id[..11], b"ftvmm-disk3");
        std::fs::remove_file(p).unwrap();
    }
}
