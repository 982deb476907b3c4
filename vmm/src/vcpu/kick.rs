//! Kicking a vCPU thread out of `KVM_RUN` with a signal.
//!
//! The signal handler sets `immediate_exit` in the thread's `kvm_run` page, so a kick that lands just
//! before the thread enters `KVM_RUN` still makes that `KVM_RUN` return `EINTR` at once: no window in
//! which a pause request can be missed.

use std::cell::Cell;
use std::ptr::null_mut;

use kvm_bindings::kvm_run;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

thread_local! {
    /// The `kvm_run` page of the vCPU running on this thread (null on other threads).
    static KVM_RUN_PAGE: Cell<*mut kvm_run> = const { Cell::new(null_mut()) };
}

/// The real-time signal used to kick vCPU threads.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // A const-initialised thread-local Cell has no lazy initialisation or destructor, so reading it
    // from a signal handler is async-signal-safe.
    let page = KVM_RUN_PAGE.with(Cell::get);
    if !page.is_null() {
        // SAFETY: the pointer was set by this thread to its vCPU's mmap'ed kvm_run page, which stays
        // mapped for as long as the vCPU (owned by this thread) lives; it is cleared before the vCPU
        // is dropped. A volatile byte store cannot tear.
        unsafe { std::ptr::write_volatile(&mut (*page).immediate_exit, 1) };
    }
}

/// Installs the kick handler (idempotent).
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    register_signal_handler(kick_signal(), handle_kick)
}

/// Publishes this thread's `kvm_run` page to the kick handler.
pub fn set_thread_kvm_run(page: *mut kvm_run) {
    KVM_RUN_PAGE.with(|p| p.set(page));
}
