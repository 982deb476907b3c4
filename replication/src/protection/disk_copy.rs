//! The first copy of a protected guest's disks, sent while the guest runs and writes.
//!
//! Each disk's journal tracks which blocks the guest writes (`devices/src/virtio/block/
//! write_journal.rs`), one bit per block and no data, so a long copy over a slow link holds no
//! more than a bitmap however much the guest writes. The copy is a pass over every image; a block
//! written after the pass read it is read and sent again. Back-pressure keeps that work bounded:
//! when more than the journal's limit of written blocks waits, the guest's disk waits too, and the
//! copier sends written blocks before it goes on with its pass. Before the first checkpoint the
//! copier sends written blocks until few are left ([`converge`]); the first checkpoint, with the
//! vCPUs paused and the devices idle, reads what is left ([`finish`]): the image as of that
//! checkpoint, which goes with it. From then on the journal records every write with its data.

use std::os::unix::fs::FileExt;

use devices::virtio::block::write_journal::DEFAULT_DIRTY_LIMIT;
use devices::virtio::block::{DiskWrite, EpochWrites};
use vmm::machine::DiskAccess;

use super::epoch_loop::LoopError;
use crate::link::Link;
use crate::wire::{write_frame, Message};

/// Bytes of a disk image per `DiskSync` message.
pub(super) const DISK_SYNC_CHUNK: usize = 1 << 20;

/// Above this many bytes of written blocks, the copier sends them before going on.
pub(super) const RESEND_ABOVE: u64 = DEFAULT_DIRTY_LIMIT / 2;

/// Most bytes of written blocks sent between two steps of a pass (of the disks or of memory), so
/// that the pass goes on even while the guest writes as fast as the link takes.
pub(super) const RESEND_STEP: u64 = 4 * DISK_SYNC_CHUNK as u64;

/// Written blocks the copier brings each disk down to before it holds the guest's disk for the
/// first checkpoint.
const LEFT_FOR_CHECKPOINT: u64 = 8 << 20;

/// Announces the disks' sizes, starts tracking their writes, and sends every image once (with the
/// blocks written meanwhile, when they pile up).
pub(super) fn send_images(
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
    for disk in disks {
        disk.journal.set_dirty_limit(DEFAULT_DIRTY_LIMIT);
        disk.journal.start_tracking();
    }
    let started = std::time::Instant::now();
    let mut chunk = vec![0u8; DISK_SYNC_CHUNK];
    for (index, disk) in disks.iter().enumerate() {
        let mut offset = 0u64;
        while offset < disk.capacity {
            resend_written(stream, disks, RESEND_ABOVE, RESEND_STEP)?;
            let n = (disk.capacity - offset).min(DISK_SYNC_CHUNK as u64) as usize;
            // Cleared before it is read: a write from now on marks it again.
            disk.journal.clear(offset, n as u64);
            send_range(stream, index, disk, offset, &mut chunk[..n])?;
            offset += n as u64;
            progress(n as u64);
        }
    }
    if !disks.is_empty() {
        tracing::info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            written_waiting = disks.iter().map(|d| d.journal.dirty_bytes()).sum::<u64>(),
            "disks: first pass sent"
        );
    }
    Ok(())
}

/// Sends written blocks of every disk until at most `down_to` bytes of them wait on each, or
/// `budget` bytes were sent.
pub(super) fn resend_written(
    stream: &mut Link,
    disks: &[DiskAccess],
    down_to: u64,
    budget: u64,
) -> Result<(), LoopError> {
    let mut chunk = vec![0u8; DISK_SYNC_CHUNK];
    let mut sent = 0u64;
    for (index, disk) in disks.iter().enumerate() {
        while disk.journal.dirty_bytes() > down_to && sent < budget {
            for (offset, len) in disk.journal.take_dirty(DISK_SYNC_CHUNK as u64) {
                sent += len;
                let mut at = offset;
                while at < offset + len {
                    let n = (offset + len - at).min(DISK_SYNC_CHUNK as u64) as usize;
                    send_range(stream, index, disk, at, &mut chunk[..n])?;
                    at += n as u64;
                }
            }
        }
    }
    Ok(())
}

/// Before the first checkpoint: brings the written blocks waiting on each disk down to a few, so
/// that the checkpoint's pause reads little. First with a lowered limit and a bounded effort (the
/// guest writes on meanwhile, as fast as the link takes), then with the guest's disk held: what
/// waits then is sent once, and whatever the guest writes from there (one request, held behind
/// it) is read by the checkpoint, right after, which lets the disk go on.
pub(super) fn converge(stream: &mut Link, disks: &[DiskAccess]) -> Result<(), LoopError> {
    if disks.is_empty() {
        return Ok(());
    }
    let started = std::time::Instant::now();
    for disk in disks {
        disk.journal.set_dirty_limit(LEFT_FOR_CHECKPOINT);
    }
    resend_written(stream, disks, LEFT_FOR_CHECKPOINT, 2 * DEFAULT_DIRTY_LIMIT)?;
    for disk in disks {
        disk.journal.set_dirty_limit(0);
    }
    let waiting = disks.iter().map(|d| d.journal.dirty_bytes()).sum::<u64>();
    resend_written(stream, disks, 0, waiting)?;
    tracing::info!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        left = disks.iter().map(|d| d.journal.dirty_bytes()).sum::<u64>(),
        "disks: written blocks sent; the rest goes with the first checkpoint"
    );
    Ok(())
}

/// At the first checkpoint, with the vCPUs paused: each disk's blocks still waiting for their
/// copy, read now, as that checkpoint's writes; every write from here on is recorded.
pub(super) fn finish(disks: &[DiskAccess]) -> Result<Vec<EpochWrites>, String> {
    disks
        .iter()
        .enumerate()
        .map(|(index, disk)| {
            let mut writes = Vec::new();
            for (offset, len) in disk.journal.finish_tracking() {
                let mut data = vec![0u8; len as usize];
                disk.image
                    .read_exact_at(&mut data, offset)
                    .map_err(|e| format!("reading disk {index} at {offset}: {e}"))?;
                writes.push(DiskWrite { offset, data });
            }
            // The first checkpoint's image is made durable by the standby.
            Ok(EpochWrites {
                writes,
                flushed: true,
            })
        })
        .collect()
}

fn send_range(
    stream: &mut Link,
    index: usize,
    disk: &DiskAccess,
    offset: u64,
    buf: &mut [u8],
) -> Result<(), LoopError> {
    disk.image
        .read_exact_at(buf, offset)
        .map_err(|e| LoopError::Vm(format!("reading disk {index} at {offset}: {e}")))?;
    write_frame(
        stream,
        &Message::DiskSync {
            disk: index as u32,
            offset,
            data: buf.to_vec(),
        },
    )?;
    Ok(())
}
