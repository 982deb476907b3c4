//! The asking side of a pair across hosts, which protection and migration share: the peer daemon
//! is asked to host a copy of a running VM (`peer_hosting.rs` is the other end), the VM's own
//! process is told to use it, and the record notes the relation. Whatever fails after the peer
//! may have made its copy drops that copy again.

use serde_json::json;

use super::peer_hosting::{PeerVmAnswer, PeerVmRequest};
use super::store::{PeerRecord, Relation, Role, VmRecord};
use super::{Daemon, DaemonError};

/// A VM paired with a copy on a peer: the link the copy listens on, and the VM's answer.
pub(super) struct Paired {
    pub link: String,
    pub status: serde_json::Value,
}

impl Daemon {
    /// Asks `peer` to host a `role` copy of running VM `record`, then tells the VM's process
    /// `PUT vm_path` with `body_for(link)` (answered 202), and records `relation` to the peer.
    pub(super) fn pair_with_peer(
        &self,
        record: &VmRecord,
        peer: &str,
        role: Role,
        vm_path: &str,
        body_for: impl FnOnce(&str) -> serde_json::Value,
        relation: Relation,
    ) -> Result<Paired, DaemonError> {
        let id = &record.id;
        let ask = PeerVmRequest {
            id: id.clone(),
            config: record.config.clone(),
            disk_sizes: Self::disk_sizes(&record.config)?,
            from: self.peering()?.address.clone(),
        };
        let peer_path = match role {
            Role::Standby => "/api/v1/peer/standbys",
            _ => "/api/v1/peer/incoming",
        };
        let answer = self
            .peer_call(peer, "POST", peer_path, Some(&json!(ask)), 201)
            .inspect_err(|e| {
                // A peer that refused made nothing; one whose answer was lost may have.
                if !matches!(e, DaemonError::PeerRefused { .. }) {
                    self.drop_peer_copy(peer, id);
                }
            })?;
        let PeerVmAnswer { link } = serde_json::from_value(answer).map_err(|e| {
            self.drop_peer_copy(peer, id);
            DaemonError::PeerAnswer {
                peer: peer.to_string(),
                reason: e.to_string(),
            }
        })?;
        let status = self
            .vm_call(id, "PUT", vm_path, Some(&body_for(&link)), 202)
            .inspect_err(|_| self.drop_peer_copy(peer, id))?;
        self.update(id, |r| {
            r.peer = Some(PeerRecord {
                relation,
                daemon: peer.to_string(),
                link: link.clone(),
            });
            Ok(())
        })?;
        Ok(Paired { link, status })
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
