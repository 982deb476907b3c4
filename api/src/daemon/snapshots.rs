//! Snapshots through the daemon: a running VM writes a snapshot (full, or of the pages changed since
//! its previous one) into its directory (`snapshots/NAME`), and a VM that does not run is restored
//! from one in a new process (`ftvmm restore`) with this host's backends.

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;

use super::events::DaemonEvent;
use super::store::{safe_dir_name, VmRecord};
use super::{wrong_state, Daemon, DaemonError};

/// Body of `PUT /api/v1/vms/{id}/snapshot`.
#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotVm {
    /// The snapshot's name (1 to 64 letters, digits, '-', '_' or '.'), unique for the VM.
    pub name: String,
    /// Only the pages written since the VM's previous snapshot, which the new one names as its base.
    #[serde(default)]
    pub diff: bool,
}

/// Body of `PUT /api/v1/vms/{id}/restore`.
#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestoreVm {
    /// The name of one of the VM's snapshots.
    pub snapshot: String,
}

/// One of a VM's snapshots.
#[derive(Clone, Debug, Deserialize, Serialize, ToSchema, PartialEq)]
pub struct SnapshotInfo {
    pub name: String,
    /// Seconds since the epoch.
    pub taken_at: u64,
    /// Bytes on disk (sparse files count what they hold).
    pub bytes: u64,
}

impl Daemon {
    fn snapshot_dir(&self, id: &str, name: &str) -> Result<PathBuf, DaemonError> {
        if !safe_dir_name(name) {
            return Err(DaemonError::Invalid(format!(
                "snapshot name {name:?}: 1 to 64 letters, digits, '-', '_' or '.'"
            )));
        }
        Ok(self.store.vm_dir(id).join("snapshots").join(name))
    }

    /// Writes a snapshot of running VM `id`.
    pub fn snapshot(&self, id: &str, request: SnapshotVm) -> Result<SnapshotInfo, DaemonError> {
        let record = self.running_primary(id)?;
        let dir = self.snapshot_dir(&record.id, &request.name)?;
        if dir.exists() {
            return Err(DaemonError::NameTaken(format!(
                "snapshot {} of {}",
                request.name, record.id
            )));
        }
        let body = json!({ "dir": dir, "diff": request.diff });
        if let Err(e) = self.vm_call(&record.id, "PUT", "/api/v1/vm/snapshot", Some(&body), 200) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        self.events
            .send(DaemonEvent::new(&record.id, "snapshotted", &request.name));
        info(&request.name, &dir)
    }

    /// VM `id`'s snapshots, oldest first.
    pub fn snapshots(&self, id: &str) -> Result<Vec<SnapshotInfo>, DaemonError> {
        let record = self.get(id)?;
        let root = self.store.vm_dir(&record.id).join("snapshots");
        let mut all = Vec::new();
        for entry in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            if !entry.path().is_dir() {
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            all.push(info(&name, &entry.path())?);
        }
        all.sort_by_key(|s| (s.taken_at, s.name.clone()));
        Ok(all)
    }

    /// Runs VM `id` (which must not run) from its snapshot `request.snapshot`.
    pub fn restore(
        self: &Arc<Self>,
        id: &str,
        request: RestoreVm,
    ) -> Result<VmRecord, DaemonError> {
        let record = self.get(id)?;
        let dir = self.snapshot_dir(&record.id, &request.snapshot)?;
        if !dir.is_dir() {
            return Err(DaemonError::Missing(format!(
                "VM {} has no snapshot {:?}",
                record.id, request.snapshot
            )));
        }
        self.launch(&record.id, "restored", |record, files| {
            let mut args = vec![
                "restore".into(),
                "--dir".into(),
                dir.clone().into_os_string(),
            ];
            args.extend(
                record
                    .config
                    .backend_args(&files.console, &files.api_socket),
            );
            // In cluster mode the restored copy claims the guest at the witness as a boot does:
            // refused while another copy holds it.
            args.extend(self.witness_args(&record.id));
            args
        })
    }

    /// Removes VM `id`'s snapshot `name` (a later diff snapshot that names it as its base can no
    /// longer be restored).
    pub fn delete_snapshot(&self, id: &str, name: &str) -> Result<(), DaemonError> {
        let record = self.get(id)?;
        let dir = self.snapshot_dir(&record.id, name)?;
        if !dir.is_dir() {
            return Err(DaemonError::Missing(format!(
                "VM {} has no snapshot {name:?}",
                record.id
            )));
        }
        if record.lifecycle == super::store::Lifecycle::Booting {
            return Err(wrong_state(
                &record,
                "it is starting, maybe from this snapshot",
            ));
        }
        std::fs::remove_dir_all(&dir)
            .map_err(|e| DaemonError::Internal(format!("cannot remove {}: {e}", dir.display())))
    }
}

/// What `dir` holds: when it was written and its size.
fn info(name: &str, dir: &std::path::Path) -> Result<SnapshotInfo, DaemonError> {
    use std::os::unix::fs::MetadataExt;
    let mut bytes = 0;
    let mut taken_at = 0;
    for entry in std::fs::read_dir(dir)
        .map_err(|e| DaemonError::Internal(format!("snapshot {}: {e}", dir.display())))?
        .flatten()
    {
        if let Ok(meta) = entry.metadata() {
            bytes += meta.blocks() * 512;
            taken_at = taken_at.max(meta.mtime().max(0) as u64);
        }
    }
    Ok(SnapshotInfo {
        name: name.to_string(),
        taken_at,
        bytes,
    })
}
