//! The guest asking the machine to stop: power-off and reset requests from devices.

use std::sync::Mutex;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Why the guest wants the machine stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestExitRequest {
    /// ACPI S5 (soft off).
    PowerOff,
    /// A platform reset (i8042 pulse, ACPI reset register).
    Reset,
}

/// Shared between the devices that can end the VM and the VMM's event loop, which watches
/// [`GuestExitEvent::eventfd`]. The first request wins.
pub struct GuestExitEvent {
    request: Mutex<Option<GuestExitRequest>>,
    eventfd: EventFd,
}

impl GuestExitEvent {
    /// Creates the event with a non-blocking eventfd.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            request: Mutex::new(None),
            eventfd: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Records `request` (unless one is already recorded) and wakes the event loop.
    pub fn request(&self, request: GuestExitRequest) {
        let mut slot = self.request.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            tracing::info!(?request, "guest requested exit");
            *slot = Some(request);
        }
        drop(slot);
        if let Err(e) = self.eventfd.write(1) {
            tracing::error!("cannot signal the guest exit eventfd: {e}");
        }
    }

    /// The recorded request, if any.
    pub fn requested(&self) -> Option<GuestExitRequest> {
        *self.request.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The eventfd that becomes readable on a request.
    pub fn eventfd(&self) -> &EventFd {
        &self.eventfd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_request_wins_and_wakes_the_loop() {
        let evt = GuestExitEvent::new().unwrap();
        assert_eq!(evt.requested(), None);
        evt.request(GuestExitRequest::Reset);
        evt.request(GuestExitRequest::PowerOff);
        assert_eq!(evt.requested(), Some(GuestExitRequest::Reset));
        assert_eq!(evt.eventfd().read().unwrap(), 2);
    }
}
