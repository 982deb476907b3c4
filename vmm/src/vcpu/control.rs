//! Coordinating vCPU threads: pause, resume and stop.
//!
//! A pause is complete only when every vCPU thread has parked outside `KVM_RUN` with no port or MMIO
//! access half done, so whoever paused may then read or write any guest state. Replication pauses
//! at every epoch, so this path is kept short: one mutex, one condvar, one signal per thread.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use super::state::{VcpuState, VcpuStateError};

/// Work a parked vCPU thread does on its own vCPU (KVM wants vCPU ioctls from the vCPU's thread).
pub enum VcpuRequest {
    /// Capture the vCPU's state.
    SaveState(Sender<Result<VcpuState, VcpuStateError>>),
    /// Load a state into the vCPU.
    RestoreState(Box<VcpuState>, Sender<Result<(), VcpuStateError>>),
}

/// Errors handing a request to a vCPU.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("vCPU {0} is not paused")]
    NotPaused(u8),
    #[error("vCPU {0} already has a request pending")]
    Busy(u8),
}

#[derive(Default)]
struct State {
    pause: bool,
    stop: bool,
    /// vCPU threads currently parked.
    parked: usize,
    /// vCPU threads that have not exited yet.
    live: usize,
    /// One pending request per vCPU id, served while parked.
    mailbox: HashMap<u8, VcpuRequest>,
}

/// Shared by the VMM and all vCPU threads of one VM.
#[derive(Default)]
pub struct VcpuControl {
    state: Mutex<State>,
    changed: Condvar,
    /// Fast-path copy of `pause || stop`, read by vCPU threads on every exit.
    attention: AtomicBool,
}

/// What a vCPU thread must do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Directive {
    Run,
    Stop,
}

impl VcpuControl {
    /// A control block with no threads yet.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a vCPU thread as live.
    pub fn thread_started(&self) {
        self.lock().live += 1;
    }

    /// Unregisters a vCPU thread.
    pub fn thread_exited(&self) {
        let mut s = self.lock();
        s.live -= 1;
        self.changed.notify_all();
    }

    /// Whether the vCPU must look at [`VcpuControl::checkpoint`] before entering the guest.
    pub fn needs_attention(&self) -> bool {
        self.attention.load(Ordering::Acquire)
    }

    /// Called by vCPU thread `id` (with no guest access in flight): parks while paused, serving
    /// requests addressed to it with `serve`, and says whether to keep running.
    pub fn checkpoint(&self, id: u8, serve: &mut dyn FnMut(VcpuRequest)) -> Directive {
        let mut s = self.lock();
        if s.stop {
            return Directive::Stop;
        }
        if s.pause {
            s.parked += 1;
            self.changed.notify_all();
            while s.pause && !s.stop {
                if let Some(request) = s.mailbox.remove(&id) {
                    drop(s);
                    serve(request);
                    s = self.lock();
                    continue;
                }
                s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
            }
            s.parked -= 1;
            self.changed.notify_all();
        }
        if s.stop {
            Directive::Stop
        } else {
            Directive::Run
        }
    }

    /// Asks all vCPUs to pause; `kick` must then interrupt each thread, after which
    /// [`VcpuControl::wait_paused`] waits for them.
    pub fn request_pause(&self) {
        self.lock().pause = true;
        self.attention.store(true, Ordering::Release);
    }

    /// Waits until every live vCPU thread is parked. Returns false on timeout.
    pub fn wait_paused(&self, timeout: Duration) -> bool {
        let s = self.lock();
        let (s, res) = self
            .changed
            .wait_timeout_while(s, timeout, |s| s.pause && s.parked < s.live)
            .unwrap_or_else(|e| e.into_inner());
        drop(s);
        !res.timed_out()
    }

    /// Lets paused vCPUs run again. Does not wait for their threads to be scheduled: a pause
    /// requested before a thread wakes simply keeps it parked, which is a correct paused state.
    pub fn resume(&self) {
        let mut s = self.lock();
        s.pause = false;
        if !s.stop {
            self.attention.store(false, Ordering::Release);
        }
        self.changed.notify_all();
        drop(s);
    }

    /// Waits until no vCPU thread is parked (all are back to running the guest). Returns false on
    /// timeout.
    pub fn wait_running(&self, timeout: Duration) -> bool {
        let s = self.lock();
        let (s, res) = self
            .changed
            .wait_timeout_while(s, timeout, |s| !s.pause && s.parked > 0)
            .unwrap_or_else(|e| e.into_inner());
        drop(s);
        !res.timed_out()
    }

    /// Asks every vCPU thread to exit; `kick` must then interrupt each thread.
    pub fn request_stop(&self) {
        self.lock().stop = true;
        self.attention.store(true, Ordering::Release);
        self.changed.notify_all();
    }

    /// Hands `request` to paused vCPU `id`; its reply arrives on the request's channel.
    pub fn send(&self, id: u8, request: VcpuRequest) -> Result<(), RequestError> {
        let mut s = self.lock();
        if !s.pause || s.parked < s.live {
            return Err(RequestError::NotPaused(id));
        }
        if s.mailbox.contains_key(&id) {
            return Err(RequestError::Busy(id));
        }
        s.mailbox.insert(id, request);
        self.changed.notify_all();
        Ok(())
    }

    /// Whether a pause is in force.
    pub fn is_paused(&self) -> bool {
        self.lock().pause
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::thread;

    fn worker(
        ctl: Arc<VcpuControl>,
        spins: Arc<std::sync::atomic::AtomicU64>,
    ) -> thread::JoinHandle<()> {
        ctl.thread_started();
        thread::spawn(move || {
            loop {
                if ctl.needs_attention() && ctl.checkpoint(0, &mut |_| {}) == Directive::Stop {
                    break;
                }
                spins.fetch_add(1, Ordering::Relaxed);
                thread::yield_now();
            }
            ctl.thread_exited();
        })
    }

    #[test]
    fn pause_parks_every_thread_and_resume_releases_them() {
        let ctl = Arc::new(VcpuControl::new());
        let spins = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let handles: Vec<_> = (0..4).map(|_| worker(ctl.clone(), spins.clone())).collect();
        ctl.request_pause();
        assert!(ctl.wait_paused(Duration::from_secs(10)));
        let frozen = spins.load(Ordering::Relaxed);
        thread::sleep(Duration::from_millis(20));
        assert_eq!(spins.load(Ordering::Relaxed), frozen);
        ctl.resume();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while spins.load(Ordering::Relaxed) == frozen && std::time::Instant::now() < deadline {
            thread::yield_now();
        }
        assert!(spins.load(Ordering::Relaxed) > frozen);
        ctl.request_stop();
        for h in handles {
            h.join().unwrap();
        }
    }

    #[test]
    fn stop_releases_paused_threads() {
        let ctl = Arc::new(VcpuControl::new());
        let spins = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let h = worker(ctl.clone(), spins);
        ctl.request_pause();
        assert!(ctl.wait_paused(Duration::from_secs(10)));
        ctl.request_stop();
        h.join().unwrap();
    }
}
