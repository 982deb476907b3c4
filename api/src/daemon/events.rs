//! The daemon's events — VMs created, booted, paused, resumed, ended, deleted; protected, failed
//! over, migrated — sent to every subscriber of `GET /api/v1/events` as server-sent events.

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use utoipa::ToSchema;

/// Events a slow subscriber may fall behind by before it misses some (it is told how many).
const BACKLOG: usize = 256;

/// One event.
#[derive(Clone, Debug, Deserialize, Serialize, ToSchema, PartialEq)]
pub struct DaemonEvent {
    /// The VM's id.
    pub vm: String,
    /// `created`, `booted`, `paused`, `resumed`, `exited`, `deleted`; `protected`, `unprotected`,
    /// `failover_requested`, `failed_over` (a standby here took over), `standby_ready`,
    /// `standby_ended`; `migration_started`, `migration_progress`, `migrated`,
    /// `migration_failed`, `migration_cancelled`, `incoming_ready`, `migrated_in`, `incoming_ended`.
    pub kind: String,
    /// What happened, for people (the exit reason, a pid).
    pub detail: String,
    /// Seconds since the epoch.
    pub at: u64,
}

impl DaemonEvent {
    pub fn new(vm: &str, kind: &str, detail: &str) -> Self {
        Self {
            vm: vm.into(),
            kind: kind.into(),
            detail: detail.into(),
            at: super::vm_process::now(),
        }
    }
}

/// The sending side; each subscriber gets every event sent after it subscribed.
pub struct Events {
    sender: broadcast::Sender<DaemonEvent>,
}

impl Default for Events {
    fn default() -> Self {
        Self::new()
    }
}

impl Events {
    pub fn new() -> Self {
        Self {
            sender: broadcast::channel(BACKLOG).0,
        }
    }

    pub fn send(&self, event: DaemonEvent) {
        // No subscriber is not an error.
        let _ = self.sender.send(event);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<DaemonEvent> {
        self.sender.subscribe()
    }
}
