//! One checkpoint of a protected guest: taken on the event-loop thread with the vCPUs paused
//! (the dirty pages, the vCPU, VM and device state, each disk's writes of the epoch), then sent to
//! the standby; and the first copy of guest memory, sent while the guest runs (the disks' first
//! copy is `disk_copy.rs`).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use devices::virtio::block::{DiskWrite, EpochWrites};
use vm_memory::{Bytes, GuestAddress};
use vmm::dirty::{DirtySet, DirtyTracker};
use vmm::machine::DiskAccess;
use vmm::memory::{GuestMemory, PAGE_SIZE};
use vmm::Machine;

use super::copy_on_write::{read_run, CopiedPages, CopyOnWrite, ProtectedPages};
use super::disk_copy;
use super::epoch_loop::LoopError;
use super::page_delta::{encoded_bytes, is_zero, SentPages};
use crate::link::Link;
use crate::wire::{write_frame, DiskRun, EncodedPage, Message, PageRun};

/// Largest batch of pages or disk writes in one message (a guest's single write can be larger:
/// it is cut into pieces of this size).
const BATCH_BYTES: usize = 4 << 20;

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
    /// Per disk, the writes the guest completed during the epoch, and whether it flushed.
    pub(super) disk_writes: Vec<EpochWrites>,
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
    disks: &[DiskAccess],
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
            // Writes completed so far belong to this epoch: the devices are idle while paused.
            // The first checkpoint carries what the disks' first copy left (the image now).
            let disk_writes = if epoch == 0 {
                disk_copy::finish(disks)?
            } else {
                disks.iter().map(|d| d.journal.take()).collect()
            };
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
    let mut flushed = false;
    for (disk, epoch_writes) in std::mem::take(&mut cp.disk_writes).into_iter().enumerate() {
        flushed |= epoch_writes.flushed;
        disk_writes += batch_disk_writes(epoch_writes.writes, |writes| {
            write_frame(
                stream,
                &Message::EpochDiskWrites {
                    epoch,
                    disk: disk as u32,
                    writes,
                },
            )
        })?;
    }
    write_frame(
        stream,
        &Message::EpochEnd {
            epoch,
            pages: cp.pages,
            disk_writes,
            flushed,
            state: std::mem::take(&mut cp.state),
        },
    )?;
    Ok(page_bytes)
}

/// Cuts a disk's writes into batches of at most [`BATCH_BYTES`] for `send`, in order; a write
/// larger than a batch goes in pieces (applied in order, they write what it wrote). Returns the
/// runs sent.
fn batch_disk_writes<E>(
    writes: Vec<DiskWrite>,
    mut send: impl FnMut(Vec<DiskRun>) -> Result<(), E>,
) -> Result<u64, E> {
    let mut runs = 0u64;
    let mut batch: Vec<DiskRun> = Vec::new();
    let mut bytes = 0;
    for w in writes {
        for (i, piece) in w.data.chunks(BATCH_BYTES).enumerate() {
            if bytes + piece.len() > BATCH_BYTES && !batch.is_empty() {
                runs += batch.len() as u64;
                send(std::mem::take(&mut batch))?;
                bytes = 0;
            }
            bytes += piece.len();
            batch.push(DiskRun {
                offset: w.offset + (i * BATCH_BYTES) as u64,
                data: piece.to_vec(),
            });
        }
    }
    if !batch.is_empty() {
        runs += batch.len() as u64;
        send(batch)?;
    }
    Ok(runs)
}

/// Starts dirty tracking, then sends every non-zero page of guest memory while the guest runs
/// (the standby's memory starts zeroed); the pages written meanwhile come with checkpoint 0.
/// `between_batches` runs after each batch sent (the disks' written blocks go meanwhile).
pub(super) fn send_memory_image(
    stream: &mut Link,
    memory: &GuestMemory,
    vm: &vmm::vm::Vm,
    tracker: &Mutex<DirtyTracker>,
    progress: &mut dyn FnMut(u64),
    between_batches: &mut dyn FnMut(&mut Link) -> Result<(), LoopError>,
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
                between_batches(stream)?;
            }
        }
    }
    if !batch.is_empty() {
        write_frame(stream, &Message::MemorySync { runs: batch })?;
    }
    progress(scanned);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A guest write larger than a frame (up to 16 MiB in one request) travels in pieces no larger
    /// than a batch, which, applied in order, write exactly what it wrote.
    #[test]
    fn large_writes_are_cut_into_batches_that_rebuild_them() {
        let big: Vec<u8> = (0..(13 << 20) + 77).map(|i| (i * 31 % 251) as u8).collect();
        let writes = vec![
            DiskWrite {
                offset: 4096,
                data: vec![1; 512],
            },
            DiskWrite {
                offset: 1 << 20,
                data: big.clone(),
            },
            DiskWrite {
                offset: 0,
                data: vec![2; 3 << 20],
            },
        ];
        let mut image = vec![0u8; 16 << 20];
        let mut expected = image.clone();
        for w in &writes {
            expected[w.offset as usize..w.offset as usize + w.data.len()].copy_from_slice(&w.data);
        }
        let mut batches = Vec::new();
        let runs = batch_disk_writes(writes, |b| {
            batches.push(b);
            Ok::<_, ()>(())
        })
        .unwrap();
        assert_eq!(runs, batches.iter().map(|b| b.len() as u64).sum::<u64>());
        for batch in &batches {
            let bytes: usize = batch.iter().map(|r| r.data.len()).sum();
            assert!(bytes <= BATCH_BYTES, "a batch of {bytes} bytes");
            for r in batch {
                image[r.offset as usize..r.offset as usize + r.data.len()].copy_from_slice(&r.data);
            }
        }
        assert!(image == expected);
    }
}
