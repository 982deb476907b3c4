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
use super::pairing::Paired;
use super::store::{Lifecycle, Relation, Role};
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
        let Paired { link, status } = self.pair_with_peer(
            &record,
            &peer,
            Role::Standby,
            "/api/v1/vm/protect",
            |link| json!({ "standby": link, "epoch_ms": request.epoch_ms, "epoch": request.epoch }),
            Relation::ProtectedBy,
        )?;
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
    /// Unless the primary's death is certain, only with `force` (the standby says why).
    pub fn failover(&self, id: &str, force: bool) -> Result<serde_json::Value, DaemonError> {
        let record = self.get(id)?;
        if record.role != Role::Standby || record.lifecycle != Lifecycle::Running {
            return Err(wrong_state(&record, "only a running standby fails over"));
        }
        let path = if force {
            "/api/v1/standby/failover?force=true"
        } else {
            "/api/v1/standby/failover"
        };
        let status = self.vm_call(&record.id, "PUT", path, None, 202)?;
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

    /// Removes the claim of VM `id` at the cluster's witness, left behind by a copy that ended
    /// without giving it back (its process was killed, its host lost): until then no copy of the
    /// guest may boot or be protected. Refused while any copy of the VM runs, here or on a host the
    /// cluster knows — the claim may be that copy's. (A host cut off from the cluster for longer
    /// than its lease is not seen; a copy running there finds its claim gone the next time it asks
    /// the witness, and fences itself if another copy claimed the guest meanwhile.)
    pub fn release_claim(&self, id: &str) -> Result<serde_json::Value, DaemonError> {
        let Some(url) = &self.witness_url else {
            return Err(DaemonError::NoPeering(
                "claims live at the cluster's witness: this daemon is not in cluster mode",
            ));
        };
        let record = self.get(id)?;
        if matches!(record.lifecycle, Lifecycle::Running | Lifecycle::Booting) {
            return Err(wrong_state(
                &record,
                "its claim is held by the copy that runs here",
            ));
        }
        if let Some(placement) = self.cluster()?.placement(&record.id)? {
            if let Some(copy) = placement
                .copies
                .iter()
                .find(|c| matches!(c.lifecycle, Lifecycle::Running | Lifecycle::Booting))
            {
                return Err(DaemonError::Elsewhere {
                    id: record.id.clone(),
                    peer: copy.host.clone(),
                    how: "a copy runs there and may hold the claim",
                });
            }
        }
        let witness = replication::witness::Witness::new(url, &record.id)
            .map_err(|e| DaemonError::Internal(e.to_string()))?;
        let claim = witness
            .read()
            .map_err(|e| DaemonError::Internal(e.to_string()))?
            .ok_or_else(|| {
                DaemonError::Missing(format!("VM {} has no claim at the witness", record.id))
            })?;
        let removed = witness
            .remove(&claim)
            .map_err(|e| DaemonError::Internal(e.to_string()))?;
        if !removed {
            return Err(DaemonError::Invalid(format!(
                "VM {}'s claim changed while it was being removed: a copy is acting on it",
                record.id
            )));
        }
        self.events.send(DaemonEvent::new(
            &record.id,
            "claim_released",
            &format!(
                "{:?}, generation {}",
                claim.claim.state, claim.claim.generation
            ),
        ));
        Ok(serde_json::json!({
            "released": {
                "holder": claim.claim.holder,
                "generation": claim.claim.generation,
                "state": claim.claim.state,
            }
        }))
    }
}
