//! Protection through the daemons: a VM running here is protected by a hot standby that a peer
//! daemon hosts (`peer_hosting.rs`): the peer starts the standby, this daemon tells the VM's process
//! to protect itself to it (its own `PUT /api/v1/vm/protect`, `server/routes.rs`). When the primary
//! dies, the standby takes over and the peer records it as its primary; protecting it back is the
//! same request made to that peer.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;

use super::events::DaemonEvent;
use super::peer_hosting::{PeerVmAnswer, PeerVmRequest};
use super::store::{Lifecycle, PeerRecord, Relation, Role};
use super::{wrong_state, Daemon, DaemonError};

/// Body of `PUT /api/v1/vms/{id}/protect`.
#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProtectVm {
    /// The peer daemon that hosts the standby, `HOST:PORT` (its `ftvmm serve --listen`).
    pub peer: String,
    /// Time between checkpoints in milliseconds (default 50).
    #[serde(default)]
    #[schema(minimum = 5, maximum = 10000)]
    pub epoch_ms: Option<u64>,
    /// Time between checkpoints as `ftvmm run --epoch-ms` takes it (`auto`, `auto:MIN-MAX`),
    /// instead of `epoch_ms`.
    #[serde(default)]
    pub epoch: Option<String>,
}

impl Daemon {
    /// Protects running VM `id` with a standby on `request.peer`; the VM's protection status.
    pub fn protect(
        self: &Arc<Self>,
        id: &str,
        request: ProtectVm,
    ) -> Result<serde_json::Value, DaemonError> {
        let record = self.running_primary(id)?;
        let peer = self.peer_address(&request.peer)?;
        let id = record.id.clone();
        if let Ok((200, status)) = self.vm_request(&id, "GET", "/api/v1/vm/protection", None) {
            let state = status["state"].as_str().unwrap_or_default();
            if !matches!(state, "degraded" | "unprotected") {
                return Err(wrong_state(&record, "it is protected already"));
            }
        }
        let ask = PeerVmRequest {
            id: id.clone(),
            config: record.config.clone(),
            disk_sizes: Self::disk_sizes(&record.config)?,
            from: self.peering()?.address.clone(),
        };
        let answer = self
            .peer_call(
                &peer,
                "POST",
                "/api/v1/peer/standbys",
                Some(&json!(ask)),
                201,
            )
            .inspect_err(|e| {
                // A peer that refused made nothing; one whose answer was lost may have.
                if !matches!(e, DaemonError::PeerRefused { .. }) {
                    self.drop_peer_copy(&peer, &id);
                }
            })?;
        let PeerVmAnswer { link } = serde_json::from_value(answer).map_err(|e| {
            self.drop_peer_copy(&peer, &id);
            DaemonError::PeerAnswer {
                peer: peer.clone(),
                reason: e.to_string(),
            }
        })?;
        let body = json!({ "standby": link, "epoch_ms": request.epoch_ms, "epoch": request.epoch });
        let status = match self.vm_call(&id, "PUT", "/api/v1/vm/protect", Some(&body), 202) {
            Ok(status) => status,
            Err(e) => {
                self.drop_peer_copy(&peer, &id);
                return Err(e);
            }
        };
        self.update(&id, |r| {
            r.peer = Some(PeerRecord {
                relation: Relation::ProtectedBy,
                daemon: peer.clone(),
                link: link.clone(),
            });
            Ok(())
        })?;
        self.events.send(DaemonEvent::new(
            &id,
            "protected",
            &format!("standby on {} ({link})", peer),
        ));
        Ok(status)
    }

    /// Ends VM `id`'s protection: its standby ends without resuming it, and the peer removes it.
    pub fn unprotect(&self, id: &str) -> Result<serde_json::Value, DaemonError> {
        let record = self.running_primary(id)?;
        let status = self.vm_call(&record.id, "PUT", "/api/v1/vm/unprotect", None, 200)?;
        self.update(&record.id, |r| {
            r.peer = None;
            Ok(())
        })?;
        self.events
            .send(DaemonEvent::new(&record.id, "unprotected", ""));
        Ok(status)
    }

    /// Protection as VM `id`'s copy here sees it: a primary's protection status, or a standby's
    /// (its primary, the checkpoint it would resume from, whether the primary answers).
    pub fn protection(&self, id: &str) -> Result<(u16, serde_json::Value), DaemonError> {
        let record = self.get(id)?;
        let path = match record.role {
            Role::Standby => "/api/v1/standby",
            _ => "/api/v1/vm/protection",
        };
        self.vm_request(&record.id, "GET", path, None)
    }

    /// Makes standby `id` take over now, from its last committed checkpoint: for a primary known
    /// to be dead that died silently (a standby never takes over from silence alone).
    pub fn failover(&self, id: &str) -> Result<serde_json::Value, DaemonError> {
        let record = self.get(id)?;
        if record.role != Role::Standby || record.lifecycle != Lifecycle::Running {
            return Err(wrong_state(&record, "only a running standby fails over"));
        }
        let status = self.vm_call(&record.id, "PUT", "/api/v1/standby/failover", None, 202)?;
        self.events
            .send(DaemonEvent::new(&record.id, "failover_requested", ""));
        Ok(status)
    }

    /// VM `id`'s record, if it runs here as the primary.
    pub(crate) fn running_primary(&self, id: &str) -> Result<super::store::VmRecord, DaemonError> {
        let record = self.get(id)?;
        if record.lifecycle != Lifecycle::Running || record.role != Role::Primary {
            return Err(wrong_state(&record, "it must run here as the primary"));
        }
        Ok(record)
    }

    /// Asks `peer` to drop the copy of VM `id` it started for a protection or migration that did
    /// not start after all.
    pub(super) fn drop_peer_copy(&self, peer: &str, id: &str) {
        let path = format!("/api/v1/peer/vms/{id}");
        match self.peer_call(peer, "DELETE", &path, None, 204) {
            // Its process ended on its own (a cancelled migration's destination does).
            Ok(_) | Err(DaemonError::PeerRefused { status: 404, .. }) => {}
            Err(e) => tracing::warn!(vm = %id, "the peer keeps an unused copy of the VM: {e}"),
        }
    }
}
