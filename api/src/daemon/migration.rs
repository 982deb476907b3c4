//! Live migration through the daemons: the peer daemon starts the destination (`ftvmm receive`,
//! `peer_hosting.rs`), this daemon tells the VM's process to migrate to it (its own
//! `PUT /api/v1/vm/migrate`) and follows the migration in the background, keeping its latest
//! status for `GET /api/v1/vms/{id}/migration` (the VM's process ends once it has handed over) and
//! sending an event at each change of state or round.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;

use super::events::DaemonEvent;
use super::pairing::Paired;
use super::store::{Lifecycle, Relation, Role};
use super::{Daemon, DaemonError};

/// How often a migration's progress is read.
const FOLLOW_EVERY: Duration = Duration::from_millis(100);

/// Body of `PUT /api/v1/vms/{id}/migrate`.
#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrateVm {
    /// The peer daemon to migrate to, `HOST:PORT` (its `ftvmm serve --listen`).
    pub peer: String,
    /// Stop and copy once the estimated downtime is below this many milliseconds (default 50).
    #[serde(default)]
    pub downtime_ms: Option<u64>,
}

impl Daemon {
    /// Starts migrating running VM `id` to `request.peer`; the migration's first status.
    pub fn migrate(
        self: &Arc<Self>,
        id: &str,
        request: MigrateVm,
    ) -> Result<serde_json::Value, DaemonError> {
        let record = self.running_primary(id)?;
        let peer = self.peer_address(&request.peer)?;
        let id = record.id.clone();
        let Paired { link, status } = self.pair_with_peer(
            &record,
            &peer,
            Role::Incoming,
            "/api/v1/vm/migrate",
            |link| json!({ "to": link, "downtime_ms": request.downtime_ms.unwrap_or(50) }),
            Relation::MigratingTo,
        )?;
        self.set_migration(&id, status.clone());
        self.events.send(DaemonEvent::new(
            &id,
            "migration_started",
            &format!("to {} ({link})", peer),
        ));
        self.follow_migration(id, peer);
        Ok(status)
    }

    /// VM `id`'s current (or last) migration status, as last read from its process.
    pub fn migration(&self, id: &str) -> Result<serde_json::Value, DaemonError> {
        let record = self.get(id)?;
        self.migrations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&record.id)
            .cloned()
            .ok_or_else(|| DaemonError::Missing(format!("VM {} has not migrated", record.id)))
    }

    /// Cancels VM `id`'s migration before its hand-over; the VM keeps running here.
    pub fn cancel_migration(&self, id: &str) -> Result<serde_json::Value, DaemonError> {
        let record = self.running_primary(id)?;
        self.vm_call(&record.id, "PUT", "/api/v1/vm/migration/cancel", None, 200)
    }

    fn set_migration(&self, id: &str, status: serde_json::Value) {
        self.migrations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_string(), status);
    }

    /// Follows VM `id`'s migration to `peer` on a thread of its own until it ends.
    fn follow_migration(self: &Arc<Self>, id: String, peer: String) {
        let daemon = self.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("migrate-{id}"))
            .spawn(move || {
                let _span = tracing::info_span!("daemon_migration", vm = %id, %peer).entered();
                daemon.follow(&id, &peer);
            });
        if let Err(e) = spawned {
            tracing::error!("cannot follow a migration: {e}");
        }
    }

    fn follow(&self, id: &str, peer: &str) {
        let mut last = (String::new(), 0u64);
        loop {
            std::thread::sleep(FOLLOW_EVERY);
            let status = match self.vm_request(id, "GET", "/api/v1/vm/migration", None) {
                Ok((200, status)) => status,
                // A busy or restarting API: the process's own end decides, not one poll.
                Ok(_) | Err(_)
                    if self
                        .get(id)
                        .is_ok_and(|r| r.lifecycle == Lifecycle::Running) =>
                {
                    continue
                }
                Ok((_, answer)) => failed(&answer.to_string()),
                Err(_) => match self.get(id).ok().and_then(|r| r.peer) {
                    // The process ended 0 after the hand-over (`Daemon::ended`).
                    Some(p) if p.relation == Relation::MigratedTo => {
                        let mut done = self.migration(id).unwrap_or_else(|_| json!({}));
                        done["state"] = "completed".into();
                        done
                    }
                    _ => failed("the VM's process ended during the migration"),
                },
            };
            self.set_migration(id, status.clone());
            let state = status["state"].as_str().unwrap_or("unknown").to_string();
            let round = status["round"].as_u64().unwrap_or(0);
            if (state.clone(), round) != last {
                let detail = format!(
                    "{state}: round {round}, {:.1} MiB sent",
                    status["bytes_sent"].as_f64().unwrap_or(0.0) / f64::from(1 << 20)
                );
                self.events
                    .send(DaemonEvent::new(id, "migration_progress", &detail));
                last = (state.clone(), round);
            }
            match state.as_str() {
                "completed" => {
                    let _ = self.update(id, |r| {
                        if let Some(p) = &mut r.peer {
                            p.relation = Relation::MigratedTo;
                        }
                        Ok(())
                    });
                    self.events
                        .send(DaemonEvent::new(id, "migrated", &format!("to {peer}")));
                    return;
                }
                "failed" | "cancelled" => {
                    let why = status["error"].as_str().unwrap_or(&state).to_string();
                    self.events
                        .send(DaemonEvent::new(id, &format!("migration_{state}"), &why));
                    let _ = self.update(id, |r| {
                        r.peer = None;
                        Ok(())
                    });
                    self.drop_peer_copy(peer, id);
                    return;
                }
                _ => {}
            }
        }
    }
}

/// A migration status that says it failed, for `why`.
fn failed(why: &str) -> serde_json::Value {
    json!({ "state": "failed", "error": why })
}
