//! Commands to a running VM from other threads (the API server): they are queued here and carried
//! out by the thread that runs the VM's event loop, so they never race device processing.

use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::Duration;

use event_manager::{EventOps, Events, MutEventSubscriber};
use serde::{Deserialize, Serialize};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// A job run on the VM's event-loop thread with the machine in hand (migration hand-over).
pub type MachineJob = Box<dyn FnOnce(&mut crate::Machine) -> VmReply + Send>;

/// What can be asked of a running VM.
pub enum VmCommand {
    Info,
    Pause,
    Resume,
    /// A snapshot into `dir`; `diff` for only the pages written since the previous one.
    Snapshot {
        dir: PathBuf,
        diff: bool,
    },
    /// Where every vCPU is (a running VM is paused for a moment to look).
    Vcpus,
    /// A job run on the event-loop thread with the machine in hand (checkpoints, migration
    /// steps): it may pause and resume the vCPUs as it needs.
    OnEventLoop(MachineJob),
}

impl std::fmt::Debug for VmCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            Self::Info => write!(f, "Info"),
            Self::Pause => write!(f, "Pause"),
            Self::Resume => write!(f, "Resume"),
            Self::Snapshot { dir, diff } => {
                write!(f, "Snapshot {{ dir: {}, diff: {diff} }}", dir.display())
            }
            Self::Vcpus => write!(f, "Vcpus"),
            Self::OnEventLoop(_) => write!(f, "OnEventLoop(job)"),
        }
    }
}

/// The run state of a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Running,
    Paused,
}

/// Information about a VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    pub state: RunState,
    pub vcpus: u8,
    pub memory_mib: u64,
    pub disks: Vec<String>,
    pub nets: Vec<String>,
    /// Instructions completed by the emulation fallback.
    pub emulated_instructions: u64,
}

/// Result of a snapshot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SnapshotReport {
    pub dir: PathBuf,
    pub paused_ms: f64,
    pub memory_bytes: u64,
}

/// Where one vCPU is, for diagnosis.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuSummary {
    pub id: u8,
    /// KVM MP state (0 runnable, 1 uninitialized, 2 init received, 3 halted, 4 SIPI received).
    pub mp_state: u32,
    pub rip: u64,
    pub rsp: u64,
    pub rflags: u64,
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cpl: u8,
    /// The instruction at RIP, decoded, when readable.
    pub instruction: Option<String>,
}

/// A command's answer.
#[derive(Clone, Debug, PartialEq)]
pub enum VmReply {
    Info(VmInfo),
    Done(VmInfo),
    Snapshot(SnapshotReport),
    Vcpus(Vec<VcpuSummary>),
    /// The command failed; the VM is unaffected.
    Error(String),
    /// The command does not make sense in the VM's current state.
    Conflict(String),
}

/// Errors reaching the VM.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ControlError {
    #[error("the VM has stopped")]
    Gone,
    #[error("the VM did not answer within {0:?}")]
    Timeout(Duration),
}

/// Handle for sending commands; cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct ControlHandle {
    tx: Sender<(VmCommand, Sender<VmReply>)>,
    wake: std::sync::Arc<EventFd>,
}

impl ControlHandle {
    /// Sends `command` and waits up to `timeout` for the reply.
    pub fn request(&self, command: VmCommand, timeout: Duration) -> Result<VmReply, ControlError> {
        self.submit(command)?.wait(timeout)
    }

    /// Queues `command` without waiting: its reply comes through the returned [`PendingReply`],
    /// which may be waited on again after a timeout (the command stays queued and runs once).
    pub fn submit(&self, command: VmCommand) -> Result<PendingReply, ControlError> {
        let (reply_tx, reply_rx) = mpsc::channel();
        self.tx
            .send((command, reply_tx))
            .map_err(|_| ControlError::Gone)?;
        self.wake.write(1).map_err(|_| ControlError::Gone)?;
        Ok(PendingReply(reply_rx))
    }
}

/// The reply to a command [`ControlHandle::submit`] queued.
pub struct PendingReply(Receiver<VmReply>);

impl PendingReply {
    /// Waits up to `timeout` for the reply; after a timeout the command is still queued.
    pub fn wait(&self, timeout: Duration) -> Result<VmReply, ControlError> {
        self.0.recv_timeout(timeout).map_err(|e| match e {
            mpsc::RecvTimeoutError::Timeout => ControlError::Timeout(timeout),
            mpsc::RecvTimeoutError::Disconnected => ControlError::Gone,
        })
    }
}

/// The VM side: commands waiting to be carried out.
pub struct ControlInbox {
    rx: Receiver<(VmCommand, Sender<VmReply>)>,
}

impl ControlInbox {
    /// The next queued command, if any.
    pub fn next(&self) -> Option<(VmCommand, Sender<VmReply>)> {
        self.rx.try_recv().ok()
    }
}

/// Wakes the event loop when a command arrives.
pub struct ControlWaker {
    wake: std::sync::Arc<EventFd>,
}

impl MutEventSubscriber for ControlWaker {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.wake.read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.wake.as_ref(), EventSet::IN)) {
            tracing::error!("cannot watch the control eventfd: {e}");
        }
    }
}

/// Creates a connected handle, inbox and event-loop waker.
pub fn control_channel() -> std::io::Result<(ControlHandle, ControlInbox, ControlWaker)> {
    let (tx, rx) = mpsc::channel();
    let wake = std::sync::Arc::new(EventFd::new(EFD_NONBLOCK)?);
    Ok((
        ControlHandle {
            tx,
            wake: wake.clone(),
        },
        ControlInbox { rx },
        ControlWaker { wake },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_reach_the_inbox_and_replies_come_back() {
        let (handle, inbox, _waker) = control_channel().unwrap();
        let t =
            std::thread::spawn(move || handle.request(VmCommand::Pause, Duration::from_secs(5)));
        let (cmd, reply) = loop {
            if let Some(x) = inbox.next() {
                break x;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        assert!(matches!(cmd, VmCommand::Pause));
        reply
            .send(VmReply::Conflict("already paused".into()))
            .unwrap();
        assert_eq!(
            t.join().unwrap(),
            Ok(VmReply::Conflict("already paused".into()))
        );
    }

    #[test]
    fn a_dropped_vm_is_reported_gone() {
        let (handle, inbox, _waker) = control_channel().unwrap();
        drop(inbox);
        assert_eq!(
            handle.request(VmCommand::Info, Duration::from_secs(1)),
            Err(ControlError::Gone)
        );
    }
}
