//! Feeding the host's standard input to the guest's COM1 (`ftvmm run --serial-input stdin`): the
//! firmware's shell and menus, a login prompt, Windows' Emergency Management Services.
//!
//! The event loop watches standard input (a terminal or a pipe) and puts what arrives into the
//! UART's 64-byte receive FIFO; bytes the FIFO has no room for are dropped and counted (a person
//! typing never fills it; a pipe should pace itself). End of input stops the watch; the guest runs
//! on. Standard input is used as it is: on a terminal in its usual line mode, a line reaches the
//! guest when Enter is pressed.

use std::io::Read;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::{Arc, Mutex};

use devices::legacy::SerialDevice;
use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

/// The event-loop subscriber moving standard input to the UART.
pub(super) struct SerialInput {
    input: std::fs::File,
    serial: Arc<Mutex<SerialDevice>>,
    dropped: u64,
}

impl SerialInput {
    /// Input from a duplicate of this process's standard input.
    pub(super) fn stdin(serial: Arc<Mutex<SerialDevice>>) -> std::io::Result<Self> {
        let input = std::fs::File::from(std::io::stdin().as_fd().try_clone_to_owned()?);
        Ok(Self {
            input,
            serial,
            dropped: 0,
        })
    }

    fn stop(&mut self, ops: &mut EventOps, why: &str) {
        tracing::info!(dropped = self.dropped, "serial input ends: {why}");
        if let Err(e) = ops.remove(Events::new(&self.input, EventSet::IN)) {
            tracing::debug!("cannot stop watching the serial input: {e}");
        }
    }
}

impl MutEventSubscriber for SerialInput {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let set = events.event_set();
        if set.contains(EventSet::IN) {
            let mut buffer = [0u8; 64];
            match self.input.read(&mut buffer) {
                Ok(0) => self.stop(ops, "end of input"),
                Ok(n) => {
                    let taken = self
                        .serial
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .receive(&buffer[..n]);
                    if taken < n {
                        self.dropped += (n - taken) as u64;
                        tracing::warn!(
                            dropped = self.dropped,
                            "the guest's UART is full: serial input dropped"
                        );
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => self.stop(ops, &e.to_string()),
            }
        } else if set.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            self.stop(ops, "the input was closed");
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.input, EventSet::IN)) {
            // epoll refuses regular files and /dev/null: there is nothing to wait for there.
            tracing::warn!(
                fd = self.input.as_raw_fd(),
                "standard input cannot be watched, so the guest gets no serial input: {e}"
            );
        }
    }
}
