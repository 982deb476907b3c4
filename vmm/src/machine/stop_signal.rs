//! Ending a VM on SIGTERM or SIGINT (an operator's `kill`, a daemon's `stop`, Ctrl-C): the signal
//! only marks the request and wakes the event loop, which then ends the VM as [`VmExit::Stopped`]
//! like any other ending — a protected guest's standby is told (it does not take over), its claim
//! at the witness is given back. Without this the process died where it stood, and its standby
//! took the closed connections for its death.
//!
//! [`VmExit::Stopped`]: super::VmExit::Stopped

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Once;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

static REQUESTED: AtomicBool = AtomicBool::new(false);
/// The eventfd the handler writes (-1 before one exists).
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);
static INSTALL: Once = Once::new();

extern "C" fn on_stop_signal(_signal: libc::c_int) {
    REQUESTED.store(true, Ordering::SeqCst);
    let fd = WAKE_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) on an eventfd is async-signal-safe; the buffer is a local u64.
        unsafe {
            libc::write(fd, (&one as *const u64).cast(), std::mem::size_of::<u64>());
        }
    }
}

/// Whether a stop signal arrived.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// Wakes the event loop when a stop signal arrives.
pub struct StopSignal {
    wake: EventFd,
}

impl StopSignal {
    /// Installs the handler of SIGTERM and SIGINT (once per process) and the eventfd it wakes.
    pub fn install() -> std::io::Result<Self> {
        let wake = EventFd::new(EFD_NONBLOCK)?;
        WAKE_FD.store(std::os::fd::AsRawFd::as_raw_fd(&wake), Ordering::SeqCst);
        INSTALL.call_once(|| {
            for signal in [libc::SIGTERM, libc::SIGINT] {
                // SAFETY: a zeroed sigaction is a valid start; the handler only makes
                // async-signal-safe calls (an atomic store, write(2)).
                unsafe {
                    let mut action: libc::sigaction = std::mem::zeroed();
                    action.sa_sigaction = on_stop_signal as *const () as usize;
                    action.sa_flags = libc::SA_RESTART;
                    libc::sigemptyset(&mut action.sa_mask);
                    libc::sigaction(signal, &action, std::ptr::null_mut());
                }
            }
        });
        Ok(Self { wake })
    }
}

impl Drop for StopSignal {
    fn drop(&mut self) {
        let _ = WAKE_FD.compare_exchange(
            std::os::fd::AsRawFd::as_raw_fd(&self.wake),
            -1,
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
    }
}

impl MutEventSubscriber for StopSignal {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // The loop looks at `requested()` after every turn.
        let _ = self.wake.read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.wake, EventSet::IN)) {
            tracing::error!("cannot watch the stop signal's eventfd: {e}");
        }
    }
}
