//! Running virtio-blk on the event loop: watch the activation and queue eventfds, process requests.

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::EventSet;

use super::device::VirtioBlock;
use super::request::{execute, Disk};
use crate::virtio::GuestMemoryMmap;

/// Executes every request available on `queue` against `disk`. Returns whether any completed (the
/// driver must then be interrupted). This is the whole guest-facing request path, so the fuzz target
/// drives it directly.
pub fn process_requests(queue: &mut Queue, mem: &GuestMemoryMmap, disk: &Disk) -> bool {
    let mut completed = false;
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let used = match (chain.clone().reader(mem), chain.writer(mem)) {
            (Ok(reader), Ok(writer)) => execute(disk, reader, writer),
            (r, w) => {
                // Descriptors outside guest memory or overflowing: nothing can be written.
                tracing::debug!(
                    "virtio-blk: unusable descriptor chain {head}: {:?} / {:?}",
                    r.err(),
                    w.err()
                );
                0
            }
        };
        if let Err(e) = queue.add_used(mem, head, used) {
            tracing::warn!("virtio-blk: cannot return descriptor {head}: {e}");
            break;
        }
        completed = true;
    }
    completed
}

impl VirtioBlock {
    /// Processes every available request; signals the driver if any completed.
    pub fn process_queue(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let disk = Disk {
            file: &self.file,
            capacity: self.capacity,
            read_only: self.read_only,
            id: &self.id,
        };
        if process_requests(&mut active.queue, &active.memory, &disk) {
            active.interrupt.signal_used_queue();
        }
    }
}

impl MutEventSubscriber for VirtioBlock {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == std::os::fd::AsRawFd::as_raw_fd(&self.activate_event) {
            let _ = self.activate_event.read();
            if let Some(active) = &self.active {
                if let Err(e) = ops.add(Events::new(&active.queue_event, EventSet::IN)) {
                    tracing::error!(
                        "virtio-blk {}: cannot watch the queue: {e}",
                        self.path.display()
                    );
                }
            }
            // The driver may have queued requests before the queue was watched.
            self.process_queue();
            return;
        }
        match &self.active {
            Some(active) if fd == std::os::fd::AsRawFd::as_raw_fd(&active.queue_event) => {
                let _ = active.queue_event.read();
                self.process_queue();
            }
            _ => {
                // A queue eventfd left over from before a reset.
                let _ = ops.remove(events);
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.activate_event, EventSet::IN)) {
            tracing::error!(
                "virtio-blk {}: cannot watch activation: {e}",
                self.path.display()
            );
        }
    }
}
