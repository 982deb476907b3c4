//! One checkpoint of a protected guest: taken on the event-loop thread with the vCPUs paused
//! (the dirty pages, the vCPU, VM and device state, each disk's writes of the epoch), then sent to
//! the standby; and the first copy of the disk images, sent while the guest runs.

use std::os::unix::fs::FileExt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use devices::virtio::block::{DiskWrite, WriteJournal};
use vm_memory::{Bytes, GuestAddress};
use vmm::dirty::{DirtySet, DirtyTracker};
use vmm::machine::DiskAccess;
use vmm::memory::{GuestMemory, PAGE_SIZE};
use vmm::Machine;

use super::copy_on_write::{read_run, CopiedPages, CopyOnWrite, ProtectedPages};
use super::epoch_loop::LoopError;
use super::page_delta::{encoded_bytes, is_zero, SentPages};
use crate::link::Link;
use crate::wire::{write_frame, DiskRun, EncodedPage, Message, PageRun};

/// Largest batch of pages or disk writes in one message.
const BATCH_BYTES: usize = 4 << 20;
/// Bytes of a disk image per `DiskSync` message.
const DISK_SYNC_CHUNK: usize = 1 << 20;

/// Why a checkpoint could not be taken.
pub(super) struct CheckpointError(String);

impl From<vmm::MachineError> for CheckpointError {
    fn from(e: vmm::MachineError) -> Self {
        Self(e.to_string())
    }
}

impl From<String> for CheckpointError {
    fn from(e: String) -> Self {
        Self(e)
    }
}

/// A checkpoint taken with the vCPUs paused.
pub(super) struct Checkpoint {
    pub(super) contents: PageContents,
    pub(super) pages: u64,
    /// Per disk, the writes the guest completed during the epoch.
    pub(super) disk_writes: Vec<Vec<DiskWrite>>,
    pub(super) state: Vec<u8>,
    pub(super) set: DirtySet,
    pub(super) pause: Duration,
    /// Of the pause, the time it took to stop the vCPUs.
    pub(super) stopping: Duration,
}

/// The content of a checkpoint's dirty pages: copied while the vCPUs were paused, or write-protected
/// then and copied after they resumed (`copy_on_write.rs`).
pub(super) enum PageContents {
    Copied(Vec<PageRun>),
    Protected(ProtectedPages),
}

impl Checkpoint {
    /// Moves the checkpoint's pages out, copying those still protected (the guest runs meanwhile),
    /// with how many writes had to wait for their copy.
    pub(super) fn take_pages(&mut self, mem: &GuestMemory) -> Result<CopiedPages, String> {
        match std::mem::replace(&mut self.contents, PageContents::Copied(Vec::new())) {
            PageContents::Copied(runs) => Ok(CopiedPages {
                runs,
                write_faults: 0,
            }),
            PageContents::Protected(pages) => pages.copy(mem),
        }
    }
}

/// With the vCPUs paused: the pages dirtied since the last checkpoint, the state, and the start of
/// output epoch `epoch + 1`. With `copy_on_write` the pages are only write-protected here and copied
/// once the guest runs again; without, they are copied now.
pub(super) fn take_checkpoint(
    m: &mut Machine,
    tracker: &Mutex<DirtyTracker>,
    journals: &[WriteJournal],
    copy_on_write: Option<&CopyOnWrite>,
    epoch: u64,
) -> Result<Checkpoint, String> {
    let t0 = Instant::now();
    let mut tracker = tracker.lock().unwrap_or_else(|e| e.into_inner());
    // A user's pause (`vm pause`) survives the checkpoint: only what this pauses is resumed.
    let (contents, state, set, disk_writes, stopping) = m
        .while_paused(|m| {
            let stopping = t0.elapsed();
            // Memory was copied while the guest ran (`send_memory_image`), tracking since: every
            // checkpoint, the first included, carries the pages dirtied since.
            tracker
                .collect(m.vm(), m.memory())
                .map_err(|e| e.to_string())?;
            if epoch == 0 {
                m.set_output_gating(Some(1));
            } else {
                m.begin_output_epoch(epoch + 1);
            }
            let set = tracker.take();
            let state = m.capture_state().map_err(|e| e.to_string())?;
            let state = vmm::snapshot::encode(&state).map_err(|e| e.to_string())?;
            // Writes completed so far belong to this epoch: the device is idle while paused.
            let disk_writes = journals
                .iter()
                .map(WriteJournal::take)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| e.to_string())?;
            // Last: from here a write to a dirty page on this thread would wait for the copy.
            let contents = match copy_on_write {
                Some(c) => PageContents::Protected(c.protect(m.memory(), &set)?),
                None => PageContents::Copied(copy_pages(m.memory(), &set)?),
            };
            Ok::<_, CheckpointError>((contents, state, set, disk_writes, stopping))
        })
        .map_err(|e| e.0)?;
    Ok(Checkpoint {
        contents,
        pages: set.count(),
        disk_writes,
        state,
        set,
        pause: t0.elapsed(),
        stopping,
    })
}

/// Copies the pages of `set` out of guest memory: each run of dirty pages is read in one go (in
/// pieces of at most [`BATCH_BYTES`]) straight into the buffer that is sent.
fn copy_pages(mem: &GuestMemory, set: &DirtySet) -> Result<Vec<PageRun>, String> {
    let mut runs: Vec<PageRun> = Vec::new();
    for (addr, len) in set.runs() {
        let mut offset = 0;
        while offset < len {
            let n = (len - offset).min(BATCH_BYTES as u64) as usize;
            runs.push(read_run(mem, addr.0 + offset, n)?);
            offset += n as u64;
        }
    }
    Ok(runs)
}

/// Sends checkpoint `epoch`: its pages `runs` (each encoded against what the standby holds,
/// `page_delta.rs`), its disk writes and its state; returns the bytes of page data it took (before
/// frame compression). The page, write and state buffers move into the messages (the checkpoint
/// keeps its dirty set, its counts and its pause).
pub(super) fn send_checkpoint(
    stream: &mut Link,
    epoch: u64,
    runs: Vec<PageRun>,
    cp: &mut Checkpoint,
    sent_pages: &mut SentPages,
) -> Result<u64, LoopError> {
    let mut batch: Vec<EncodedPage> = Vec::new();
    let mut bytes = 0;
    let mut page_bytes = 0u64;
    for run in runs {
        for (i, page) in run.data.chunks_exact(PAGE_SIZE).enumerate() {
            let encoded = sent_pages.encode(run.gpa + (i * PAGE_SIZE) as u64, page);
            bytes += encoded_bytes(&encoded);
            batch.push(encoded);
            if bytes >= BATCH_BYTES {
                page_bytes += bytes as u64;
                write_frame(
                    stream,
                    &Message::EpochPages {
                        epoch,
                        pages: std::mem::take(&mut batch),
                    },
                )?;
                bytes = 0;
            }
        }
    }
    if !batch.is_empty() {
        page_bytes += bytes as u64;
        write_frame(
            stream,
            &Message::EpochPages {
                epoch,
                pages: batch,
            },
        )?;
    }
    let mut disk_writes = 0u64;
    for (disk, writes) in std::mem::take(&mut cp.disk_writes).into_iter().enumerate() {
        let mut batch: Vec<DiskRun> = Vec::new();
        let mut bytes = 0;
        let count = writes.len();
        for (i, w) in writes.into_iter().enumerate() {
            bytes += w.data.len();
            batch.push(DiskRun {
                offset: w.offset,
                data: w.data,
            });
            if bytes >= BATCH_BYTES || i + 1 == count {
                disk_writes += batch.len() as u64;
                write_frame(
                    stream,
                    &Message::EpochDiskWrites {
                        epoch,
                        disk: disk as u32,
                        writes: std::mem::take(&mut batch),
                    },
                )?;
                bytes = 0;
            }
        }
    }
    write_frame(
        stream,
        &Message::EpochEnd {
            epoch,
            pages: cp.pages,
            disk_writes,
            state: std::mem::take(&mut cp.state),
        },
    )?;
    Ok(page_bytes)
}

/// Starts dirty tracking, then sends every non-zero page of guest memory while the guest runs
/// (the standby's memory starts zeroed); the pages written meanwhile come with checkpoint 0.
pub(super) fn send_memory_image(
    stream: &mut Link,
    memory: &GuestMemory,
    vm: &vmm::vm::Vm,
    tracker: &Mutex<DirtyTracker>,
    progress: &mut dyn FnMut(u64),
) -> Result<(), LoopError> {
    tracker
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .start(vm, memory)
        .map_err(|e| LoopError::Vm(format!("dirty tracking: {e}")))?;
    let mut page = vec![0u8; PAGE_SIZE];
    let mut batch: Vec<PageRun> = Vec::new();
    let mut bytes = 0;
    // Gone through since the last progress report, zero pages (read, not sent) included.
    let mut scanned = 0u64;
    for (addr, len) in DirtySet::all(memory).runs() {
        for offset in (0..len).step_by(PAGE_SIZE) {
            let gpa = addr.0 + offset;
            memory
                .read_slice(&mut page, GuestAddress(gpa))
                .map_err(|e| LoopError::Vm(format!("reading guest page {gpa:#x}: {e}")))?;
            scanned += PAGE_SIZE as u64;
            if scanned >= BATCH_BYTES as u64 {
                progress(std::mem::take(&mut scanned));
            }
            if is_zero(&page) {
                continue;
            }
            match batch.last_mut() {
                Some(last) if last.gpa + last.data.len() as u64 == gpa => {
                    last.data.extend_from_slice(&page)
                }
                _ => batch.push(PageRun {
                    gpa,
                    data: page.clone(),
                }),
            }
            bytes += PAGE_SIZE;
            if bytes >= BATCH_BYTES {
                write_frame(
                    stream,
                    &Message::MemorySync {
                        runs: std::mem::take(&mut batch),
                    },
                )?;
                bytes = 0;
            }
        }
    }
    if !batch.is_empty() {
        write_frame(stream, &Message::MemorySync { runs: batch })?;
    }
    progress(scanned);
    Ok(())
}

/// Sends each disk's image (read while the guest runs; its writes meanwhile are journalled and
/// come with checkpoint 0), and before that the disks' sizes.
pub(super) fn send_disk_images(
    stream: &mut Link,
    disks: &[DiskAccess],
    progress: &mut dyn FnMut(u64),
) -> Result<(), LoopError> {
    write_frame(
        stream,
        &Message::ProtectDisks {
            sizes: disks.iter().map(|d| d.capacity).collect(),
        },
    )?;
    let mut chunk = vec![0u8; DISK_SYNC_CHUNK];
    for (index, disk) in disks.iter().enumerate() {
        disk.journal.start();
        let mut offset = 0u64;
        while offset < disk.capacity {
            let n = (disk.capacity - offset).min(DISK_SYNC_CHUNK as u64) as usize;
            disk.image
                .read_exact_at(&mut chunk[..n], offset)
                .map_err(|e| LoopError::Vm(format!("reading disk {index} at {offset}: {e}")))?;
            write_frame(
                stream,
                &Message::DiskSync {
                    disk: index as u32,
                    offset,
                    data: chunk[..n].to_vec(),
                },
            )?;
            offset += n as u64;
            progress(n as u64);
        }
    }
    Ok(())
}
