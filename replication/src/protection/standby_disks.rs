//! The standby's side of disk replication: the first copy of each image is written as it comes;
//! after that, a checkpoint's disk writes are staged and reach the standby's images only when the
//! whole checkpoint has arrived and verified (with its memory), in the order the guest made them.

use std::os::unix::fs::FileExt;

use vmm::machine::DiskAccess;

use crate::wire::DiskRun;

/// Most bytes of writes one checkpoint may stage per disk. The primary's disk waits once 32 MiB
/// are recorded within an epoch (`devices/src/virtio/block/write_journal.rs`), so a checkpoint
/// carries that plus one request (at most 16 MiB) — or, the first one, what its first copy left.
const MAX_STAGED_PER_DISK: u64 = 256 << 20;
/// What a staged run costs against that bound beyond its bytes: a guest writes whole sectors, and
/// every run holds an entry and an allocation here, so that runs of a byte or two cannot be staged
/// by the million for nothing.
const MIN_RUN_COST: u64 = 512;
const RUN_BOOKKEEPING: u64 = 64;

/// The standby's own disks (from its `--disk` options) and the writes staged for the next commit.
pub(super) struct StandbyDisks {
    disks: Vec<DiskAccess>,
    staged: Vec<(usize, DiskRun)>,
    staged_bytes: u64,
    sizes_checked: bool,
    /// Times the images were made durable.
    durable_syncs: u64,
}

impl StandbyDisks {
    pub(super) fn new(disks: Vec<DiskAccess>) -> Self {
        Self {
            disks,
            staged: Vec::new(),
            staged_bytes: 0,
            sizes_checked: false,
            durable_syncs: 0,
        }
    }

    /// The primary's disk sizes must be this standby's, disk for disk.
    pub(super) fn check_sizes(&mut self, sizes: &[u64]) -> Result<(), String> {
        let ours: Vec<u64> = self.disks.iter().map(|d| d.capacity).collect();
        if ours != sizes {
            return Err(format!(
                "the guest's disks are {sizes:?} bytes, this standby's images are {ours:?}: \
                 sizes (and count) must match"
            ));
        }
        self.sizes_checked = true;
        Ok(())
    }

    fn disk(&self, disk: u32, offset: u64, len: usize) -> Result<&DiskAccess, String> {
        if !self.sizes_checked {
            return Err("disk data before the disks' sizes".into());
        }
        let d = self
            .disks
            .get(disk as usize)
            .ok_or_else(|| format!("disk {disk} does not exist"))?;
        match offset.checked_add(len as u64) {
            Some(end) if end <= d.capacity => Ok(d),
            _ => Err(format!(
                "disk {disk}: {len} bytes at {offset} lie beyond its {} bytes",
                d.capacity
            )),
        }
    }

    /// Writes part of the first copy of an image.
    pub(super) fn sync(&self, disk: u32, offset: u64, data: &[u8]) -> Result<(), String> {
        self.disk(disk, offset, data.len())?
            .image
            .write_all_at(data, offset)
            .map_err(|e| format!("writing disk {disk} at {offset}: {e}"))
    }

    /// Stages a checkpoint's writes to `disk`.
    pub(super) fn stage(&mut self, disk: u32, writes: Vec<DiskRun>) -> Result<(), String> {
        for w in writes {
            if w.data.is_empty() {
                return Err(format!("disk {disk}: an empty write at {}", w.offset));
            }
            self.disk(disk, w.offset, w.data.len())?;
            self.staged_bytes += (w.data.len() as u64).max(MIN_RUN_COST) + RUN_BOOKKEEPING;
            if self.staged_bytes > MAX_STAGED_PER_DISK * self.disks.len().max(1) as u64 {
                return Err(format!(
                    "a checkpoint's disk writes exceed {MAX_STAGED_PER_DISK} bytes per disk"
                ));
            }
            self.staged.push((disk as usize, w));
        }
        Ok(())
    }

    /// Writes staged for the checkpoint in progress.
    pub(super) fn staged_writes(&self) -> u64 {
        self.staged.len() as u64
    }

    /// Applies the staged writes, in order (every one was checked to lie inside its image).
    pub(super) fn apply(&mut self) -> Result<(), String> {
        for (disk, w) in self.staged.drain(..) {
            self.disks[disk]
                .image
                .write_all_at(&w.data, w.offset)
                .map_err(|e| format!("writing disk {disk} at {}: {e}", w.offset))?;
        }
        self.staged_bytes = 0;
        Ok(())
    }

    /// Makes everything written to the images so far durable (what the guest flushed on the
    /// primary must survive this host too, before the checkpoint that acknowledged it commits).
    pub(super) fn make_durable(&mut self) -> Result<(), String> {
        for (index, disk) in self.disks.iter().enumerate() {
            disk.image
                .sync_data()
                .map_err(|e| format!("making disk {index} durable: {e}"))?;
        }
        self.durable_syncs += 1;
        Ok(())
    }

    /// Times the images were made durable.
    #[cfg(test)]
    pub(super) fn durable_syncs(&self) -> u64 {
        self.durable_syncs
    }
}

/// A scratch image of `bytes` (unlinked at once) as a standby's disk, for tests.
#[cfg(test)]
pub(super) fn scratch_disk(bytes: u64) -> DiskAccess {
    let path = std::env::temp_dir().join(format!(
        "ftvmm-standby-disk-{}-{bytes}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let image = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    image.set_len(bytes).unwrap();
    let _ = std::fs::remove_file(&path);
    DiskAccess {
        journal: devices::virtio::block::WriteJournal::new(bytes).unwrap(),
        image,
        capacity: bytes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(bytes: u64) -> DiskAccess {
        scratch_disk(bytes)
    }

    fn read(d: &StandbyDisks, disk: usize, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        d.disks[disk].image.read_exact_at(&mut buf, offset).unwrap();
        buf
    }

    #[test]
    fn writes_reach_the_image_only_when_applied_and_in_order() {
        let mut d = StandbyDisks::new(vec![disk(4096)]);
        assert!(d.sync(0, 0, b"x").is_err(), "nothing before the sizes");
        assert!(d.check_sizes(&[8192]).is_err());
        d.check_sizes(&[4096]).unwrap();
        d.sync(0, 0, b"first").unwrap();
        d.stage(
            0,
            vec![DiskRun {
                offset: 0,
                data: b"AAAAA".to_vec(),
            }],
        )
        .unwrap();
        d.stage(
            0,
            vec![DiskRun {
                offset: 2,
                data: b"b".to_vec(),
            }],
        )
        .unwrap();
        assert_eq!(d.staged_writes(), 2);
        assert_eq!(read(&d, 0, 0, 5), b"first", "staged, not applied");
        d.apply().unwrap();
        assert_eq!(read(&d, 0, 0, 5), b"AAbAA", "applied in the guest's order");
        assert_eq!(d.staged_writes(), 0);
    }

    #[test]
    fn writes_outside_an_image_or_to_a_missing_disk_are_refused() {
        let mut d = StandbyDisks::new(vec![disk(1024)]);
        d.check_sizes(&[1024]).unwrap();
        assert!(d
            .stage(
                0,
                vec![DiskRun {
                    offset: 1020,
                    data: vec![1; 8]
                }]
            )
            .is_err());
        assert!(d
            .stage(
                1,
                vec![DiskRun {
                    offset: 0,
                    data: vec![1]
                }]
            )
            .is_err());
        assert!(d.sync(0, u64::MAX, &[1]).is_err());
    }

    #[test]
    fn empty_and_tiny_runs_cannot_be_staged_for_nothing() {
        let mut d = StandbyDisks::new(vec![disk(1 << 20)]);
        d.check_sizes(&[1 << 20]).unwrap();
        let empty = d.stage(
            0,
            vec![DiskRun {
                offset: 0,
                data: vec![],
            }],
        );
        assert!(empty.unwrap_err().contains("empty write"));
        // One-byte runs count as whole sectors plus their entry: the bound stops them long
        // before a million.
        let mut staged = 0u64;
        let refused = loop {
            let run = DiskRun {
                offset: staged % (1 << 20),
                data: vec![1],
            };
            match d.stage(0, vec![run]) {
                Ok(()) => staged += 1,
                Err(e) => break e,
            }
            assert!(staged < 1_000_000, "a million tiny runs staged");
        };
        assert!(refused.contains("exceed"), "{refused}");
        assert!(staged < MAX_STAGED_PER_DISK / MIN_RUN_COST, "{staged}");
    }
}
