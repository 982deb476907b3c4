//! The queue plumbing every virtio device shares on the event loop (virtio-blk and virtio-net use it
//! alike): activation and reset, the queues' notification eventfds, a budget per event-loop turn, and
//! rate-limited reports of what the guest got wrong.
//!
//! Rules (docs/security.md, issue 10's device faults):
//! - The notification eventfds are taken at the first activation and watched for the device's whole
//!   life; a notification is always read, whether or not the device is active, so a reset can never
//!   leave a readable eventfd behind that nobody reads (which made the loop spin).
//! - A driver that stops a queue (QueueReady = 0) stops the device's own copy: nothing more is taken
//!   from it or written through it.
//! - Each queue gets at most [`QUEUE_BUDGET`] descriptor chains per event-loop turn; if more are
//!   waiting, the queue's eventfd is signalled again so the loop comes back after serving everything
//!   else (other devices, control commands, checkpoints). No guest can starve the loop.
//! - Errors the guest causes (bad rings, bad indexes, bad descriptors) are logged at most once per
//!   [`GuestErrorLog::INTERVAL`], with a count of those left out.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_manager::{EventOps, Events};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{ActivateContext, ActivateError, GuestMemoryMmap, VirtioInterrupt};

/// Most descriptor chains a queue gets per event-loop turn.
pub const QUEUE_BUDGET: usize = 256;

/// A running device's queues, between activation and reset.
pub struct ActiveQueues {
    pub memory: GuestMemoryMmap,
    pub queues: Vec<Queue>,
    pub interrupt: Arc<dyn VirtioInterrupt>,
}

impl ActiveQueues {
    /// Interrupts the driver for the buffers just used on queue `index`, unless it said it needs
    /// no interrupt yet (`used_event` with EVENT_IDX, `VRING_AVAIL_F_NO_INTERRUPT` without).
    pub fn signal_used(&mut self, index: usize) {
        if self.queues[index]
            .needs_notification(&self.memory)
            .unwrap_or(true)
        {
            self.interrupt.signal_used_queue(index);
        }
    }
}

/// What one pass over a queue did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Drained {
    /// Descriptors went back to the driver (it must be interrupted).
    pub used: bool,
    /// The budget ran out with chains possibly left: come back later ([`DeviceQueues::requeue`]).
    pub budget_exhausted: bool,
}

/// What an event on the event loop meant for a device's queues.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueEvent {
    /// The device was activated (or re-activated): process every queue.
    Activated,
    /// The driver notified queue `n` (its eventfd was read).
    Notified(usize),
    /// Not one of the queues' events (the device's own, e.g. its TAP).
    Other,
}

/// Rate-limited reports of guest mistakes, so a guest cannot flood the host's logs.
#[derive(Debug)]
pub struct GuestErrorLog {
    device: String,
    last: Option<Instant>,
    suppressed: u64,
}

impl GuestErrorLog {
    /// At most one report per this interval.
    pub const INTERVAL: Duration = Duration::from_secs(5);

    /// Reports for `device` (a name for the logs).
    pub fn new(device: impl Into<String>) -> Self {
        Self {
            device: device.into(),
            last: None,
            suppressed: 0,
        }
    }

    /// Reports `what` unless a report was made within [`Self::INTERVAL`]; returns whether it did.
    pub fn report(&mut self, what: impl std::fmt::Display) -> bool {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < Self::INTERVAL)
        {
            self.suppressed += 1;
            return false;
        }
        if self.suppressed > 0 {
            tracing::warn!(
                "{}: guest error: {what} ({} more since the last report)",
                self.device,
                self.suppressed
            );
        } else {
            tracing::warn!("{}: guest error: {what}", self.device);
        }
        self.last = Some(now);
        self.suppressed = 0;
        true
    }

    /// Reports left out since the last one.
    pub fn suppressed(&self) -> u64 {
        self.suppressed
    }
}

/// Takes the next descriptor chain the driver made available on `queue`, or `None` if there is none,
/// the queue is stopped, or its rings are broken (reported through `errors`). Finding the queue
/// empty re-arms the driver's notification (with EVENT_IDX: publishes the index of the next buffer
/// as `avail_event`) and looks once more, for a buffer added meanwhile.
pub fn pop_chain<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemoryMmap,
    errors: &mut GuestErrorLog,
) -> Option<DescriptorChain<&'m GuestMemoryMmap>> {
    if !queue.ready() {
        return None;
    }
    for _ in 0..2 {
        match queue.iter(mem) {
            Ok(mut chains) => {
                if let Some(chain) = chains.next() {
                    return Some(chain);
                }
            }
            Err(e) => {
                errors.report(format_args!("queue unusable: {e}"));
                return None;
            }
        }
        match queue.enable_notification(mem) {
            Ok(true) => continue,
            Ok(false) => return None,
            Err(e) => {
                errors.report(format_args!("cannot re-arm queue notifications: {e}"));
                return None;
            }
        }
    }
    None
}

/// The event-loop side of a device's queues.
pub struct DeviceQueues {
    expected: usize,
    /// Signalled by activate and reset (on a vCPU thread) so the event loop catches up.
    activate_event: EventFd,
    /// The notification eventfds, from the first activation on.
    queue_events: Vec<EventFd>,
    watched: bool,
    active: Option<ActiveQueues>,
    pub errors: GuestErrorLog,
}

impl DeviceQueues {
    /// Plumbing for a device with `expected` queues, named `device` in logs.
    pub fn new(device: impl Into<String>, expected: usize) -> std::io::Result<Self> {
        Ok(Self {
            expected,
            activate_event: EventFd::new(EFD_NONBLOCK)?,
            queue_events: Vec::new(),
            watched: false,
            active: None,
            errors: GuestErrorLog::new(device),
        })
    }

    /// Takes the queues the transport hands over and tells the event loop.
    pub fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if ctx.queues.len() != self.expected || ctx.queue_events.len() != self.expected {
            return Err(ActivateError::QueueCount {
                expected: self.expected,
                got: ctx.queues.len(),
            });
        }
        // Later activations bring duplicates of the same eventfds: the first ones stay watched.
        if self.queue_events.is_empty() {
            self.queue_events = ctx.queue_events;
        }
        self.active = Some(ActiveQueues {
            memory: ctx.memory,
            queues: ctx.queues,
            interrupt: ctx.interrupt,
        });
        self.activate_event
            .write(1)
            .map_err(|e| ActivateError::Backend(format!("cannot signal activation: {e}")))
    }

    /// Forgets the queues (driver reset). Notifications keep being read and ignored.
    pub fn reset(&mut self) {
        self.active = None;
    }

    /// The driver stopped queue `index` (QueueReady = 0): the device stops using it.
    pub fn stop_queue(&mut self, index: usize) {
        if let Some(q) = self.active.as_mut().and_then(|a| a.queues.get_mut(index)) {
            q.set_ready(false);
        }
    }

    /// The running queues, if the device is active.
    pub fn active(&mut self) -> Option<&mut ActiveQueues> {
        self.active.as_mut()
    }

    /// The running queues and the guest-error log together, if the device is active.
    pub fn active_with_errors(&mut self) -> Option<(&mut ActiveQueues, &mut GuestErrorLog)> {
        self.active.as_mut().map(|a| (a, &mut self.errors))
    }

    /// Whether the device is active.
    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// The live queues' positions (for snapshots).
    pub fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        self.active
            .as_ref()
            .map(|a| a.queues.iter().map(|q| q.state()).collect())
    }

    /// Asks the event loop to come back to queue `index` (its budget ran out with work left).
    pub fn requeue(&self, index: usize) {
        if let Some(evt) = self.queue_events.get(index) {
            if let Err(e) = evt.write(1) {
                tracing::warn!("{}: cannot requeue queue {index}: {e}", self.errors.device);
            }
        }
    }

    /// Starts watching activation (from the subscriber's `init`).
    pub fn init(&self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.activate_event, EventSet::IN)) {
            tracing::error!("{}: cannot watch activation: {e}", self.errors.device);
        }
    }

    /// Sorts out an event: reads whichever of the plumbing's eventfds fired and says what it meant.
    pub fn handle(&mut self, events: &Events, ops: &mut EventOps) -> QueueEvent {
        let fd = events.fd();
        if fd == self.activate_event.as_raw_fd() {
            let _ = self.activate_event.read();
            if !self.watched && !self.queue_events.is_empty() {
                for (index, evt) in self.queue_events.iter().enumerate() {
                    if let Err(e) = ops.add(Events::new(evt, EventSet::IN)) {
                        tracing::error!("{}: cannot watch queue {index}: {e}", self.errors.device);
                    }
                }
                self.watched = true;
            }
            return QueueEvent::Activated;
        }
        match self.queue_events.iter().position(|e| e.as_raw_fd() == fd) {
            Some(index) => {
                let _ = self.queue_events[index].read();
                QueueEvent::Notified(index)
            }
            None => QueueEvent::Other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn guest_errors_are_rate_limited() {
        let mut log = GuestErrorLog::new("test");
        assert!(log.report("first"));
        for _ in 0..1000 {
            assert!(!log.report("again"));
        }
        assert_eq!(log.suppressed(), 1000);
    }

    #[test]
    fn a_stopped_or_broken_queue_yields_nothing_and_logs_once() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let mock = MockSplitQueue::new(&mem, 16);
        let mut queue = mock.create_queue::<Queue>().unwrap();
        let mut log = GuestErrorLog::new("test");
        // avail.idx far ahead of what the ring can hold: the iterator refuses it.
        let avail_idx = GuestAddress(mock.avail_addr().0 + 2);
        mem.write_obj(1000u16, avail_idx).unwrap();
        for _ in 0..100 {
            assert!(pop_chain(&mut queue, &mem, &mut log).is_none());
        }
        assert_eq!(log.suppressed(), 99);
        queue.set_ready(false);
        assert!(pop_chain(&mut queue, &mem, &mut log).is_none());
        assert_eq!(log.suppressed(), 99, "a stopped queue is not an error");
    }
}
