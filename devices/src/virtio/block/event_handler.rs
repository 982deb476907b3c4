//! Running virtio-blk on the event loop: its queue plumbing (`crate::virtio::device_queues`) says
//! when to process; requests execute against the image.

use std::os::fd::AsRawFd;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueT};

use super::device::{VirtioBlock, SEG_MAX, SIZE_MAX, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX};
use super::request::{execute, Disk, SegmentLimits};
use crate::virtio::device_queues::{pop_chain, Drained, GuestErrorLog, QueueEvent, QUEUE_BUDGET};
use crate::virtio::GuestMemoryMmap;

/// The data one event-loop turn moves before it lets the other devices run: the request that
/// crosses it completes, the rest wait for the next turn.
pub const BYTES_PER_TURN: usize = 16 << 20;

/// Executes up to `budget` requests available on `queue` against `disk`, and up to
/// [`BYTES_PER_TURN`] of data. This is the whole guest-facing request path, so the fuzz target
/// drives it directly.
pub fn process_requests(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    disk: &Disk,
    errors: &mut GuestErrorLog,
    budget: usize,
) -> Drained {
    let mut drained = Drained::default();
    let mut moved = 0;
    for _ in 0..budget {
        if moved >= BYTES_PER_TURN {
            break;
        }
        // A protected disk whose standby is behind: requests wait in the queue (the guest's
        // disk slows down, nothing fails) until the journal has room and says so.
        if disk.journal.is_some_and(|j| j.is_full()) {
            return drained;
        }
        let Some(chain) = pop_chain(queue, mem, errors) else {
            return drained;
        };
        let head = chain.head_index();
        let done = execute(disk, mem, chain);
        moved += done.moved;
        if let Err(e) = queue.add_used(mem, head, done.used) {
            errors.report(format_args!("cannot return descriptor {head}: {e}"));
            return drained;
        }
        drained.used = true;
    }
    drained.budget_exhausted = true;
    drained
}

impl VirtioBlock {
    /// Processes up to a budget of available requests; signals the driver if any completed, and
    /// comes back later if requests were left.
    pub fn process_queue(&mut self) {
        let disk = Disk {
            file: &self.file,
            capacity: self.capacity,
            read_only: self.read_only,
            id: &self.id,
            journal: Some(&self.journal),
            segments: SegmentLimits {
                count: (self.acked_features & VIRTIO_BLK_F_SEG_MAX != 0).then_some(SEG_MAX),
                size: (self.acked_features & VIRTIO_BLK_F_SIZE_MAX != 0).then_some(SIZE_MAX),
            },
        };
        let Some((active, errors)) = self.queues.active_with_errors() else {
            return;
        };
        let drained = process_requests(
            &mut active.queues[0],
            &active.memory,
            &disk,
            errors,
            QUEUE_BUDGET,
        );
        if drained.used {
            active.signal_used(0);
        }
        if drained.budget_exhausted {
            self.queues.requeue(0);
        }
    }
}

impl MutEventSubscriber for VirtioBlock {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.journal.room_event().as_raw_fd() {
            // The write journal had been full and has room again.
            let _ = self.journal.room_event().read();
            self.process_queue();
            return;
        }
        match self.queues.handle(&events, ops) {
            // The driver may have queued requests before the queue was watched.
            QueueEvent::Activated | QueueEvent::Notified(_) => self.process_queue(),
            QueueEvent::Other => {
                let _ = ops.remove(events);
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.queues.init(ops);
        if let Err(e) = ops.add(Events::new(self.journal.room_event(), EventSet::IN)) {
            tracing::error!(
                "virtio-blk {}: cannot watch the write journal: {e}",
                self.path.display()
            );
        }
    }
}
