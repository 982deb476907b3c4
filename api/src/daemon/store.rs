//! The host daemon's store: every VM it created, its configuration and the process that runs it,
//! kept so that a restarted daemon finds its VMs again. The default store needs no setup: one
//! directory per VM under the daemon's state directory, each record a JSON file replaced atomically
//! (written aside, synced, renamed), so a crash never leaves half a record.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::vm_config::VmConfig;

/// Errors reading or writing the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state directory {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "state directory {path} is {problem}: it holds the VMs' records, disks and sockets, so \
         only the user the daemon runs as may own and write it (chown, chmod go-w)"
    )]
    Unsafe { path: PathBuf, problem: String },
    #[error("VM record {path}: {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// Where a VM is in its life, as the daemon sees it.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Lifecycle {
    /// Configured, never booted (or booted and ended: see `exit`).
    Created,
    /// Its process is being started (never stored: a boot holds it while it waits for the API).
    Booting,
    /// Its ftvmm process runs.
    Running,
    /// Its process ended: see `exit`.
    Exited,
}

/// The ftvmm process that runs a VM: its pid and its start time (`/proc/PID/stat`'s starttime, in
/// clock ticks since boot), which tells the process from a later one given the same pid.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, ToSchema, PartialEq, Eq)]
pub struct ProcessRecord {
    pub pid: u32,
    pub start_ticks: u64,
}

/// How a VM's process ended.
#[derive(Clone, Debug, Deserialize, Serialize, ToSchema, PartialEq, Eq)]
pub struct ExitRecord {
    /// The exit status, when the daemon saw it (not for a process it re-adopted).
    pub code: Option<i32>,
    /// What it means: `ftvmm run`'s statuses (0: the guest powered off), or how it was seen.
    pub reason: String,
    /// Seconds since the epoch.
    pub at: u64,
}

/// What this host's copy of a VM is.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The VM itself: booted here, or a standby that took over, or a migration that arrived.
    #[default]
    Primary,
    /// The hot standby of a VM whose primary runs on a peer host (`ftvmm standby`).
    Standby,
    /// The destination of a migration from a peer host, not yet handed over (`ftvmm receive`).
    Incoming,
}

/// How this host's copy of a VM is paired with a copy on a peer host.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Relation {
    /// This primary is protected by a standby on the peer.
    ProtectedBy,
    /// This is the standby of the primary on the peer.
    StandbyOf,
    /// This VM is migrating to the peer.
    MigratingTo,
    /// This VM migrated to the peer: it runs there now.
    MigratedTo,
    /// This is the destination of a migration from the peer.
    MigratingFrom,
}

/// The peer host a VM is paired with.
#[derive(Clone, Debug, Deserialize, Serialize, ToSchema, PartialEq, Eq)]
pub struct PeerRecord {
    pub relation: Relation,
    /// The peer daemon's `HOST:PORT`.
    pub daemon: String,
    /// Where the standby or destination process listens for the VM link, `HOST:PORT`.
    pub link: String,
}

/// One VM as the daemon keeps it.
#[derive(Clone, Debug, Deserialize, Serialize, ToSchema, PartialEq)]
pub struct VmRecord {
    pub id: String,
    pub config: VmConfig,
    pub lifecycle: Lifecycle,
    /// Seconds since the epoch.
    pub created_at: u64,
    #[serde(default)]
    pub process: Option<ProcessRecord>,
    #[serde(default)]
    pub exit: Option<ExitRecord>,
    /// What this copy is; VMs paired across hosts have the same id on both.
    #[serde(default)]
    pub role: Role,
    /// The peer host this copy is paired with, if any.
    #[serde(default)]
    pub peer: Option<PeerRecord>,
    /// Times this copy took over as the VM's standby.
    #[serde(default)]
    pub failovers: u32,
}

/// Whether `id` (a VM id from a peer, a snapshot name) is safe as a directory name: 1 to 64 letters, digits, '-', '_' or '.', not only dots.
pub fn safe_dir_name(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && id.chars().any(|c| c != '.')
}

/// The directory store: `ROOT/vms/ID/vm.json`, with the VM's console, log and API socket beside.
pub struct DirStore {
    root: PathBuf,
}

impl DirStore {
    /// Opens (creating if needed, owner-only) the store at `root`.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        use std::os::unix::fs::DirBuilderExt;
        for dir in [root.to_path_buf(), root.join("vms")] {
            check_owned(&dir)?;
        }
        let vms = root.join("vms");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&vms)
            .map_err(|source| StoreError::Io { path: vms, source })?;
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    /// The directory of VM `id` (its record, console, log and API socket).
    pub fn vm_dir(&self, id: &str) -> PathBuf {
        self.root.join("vms").join(id)
    }

    /// Every VM recorded, by id.
    pub fn load(&self) -> Result<BTreeMap<String, VmRecord>, StoreError> {
        let vms = self.root.join("vms");
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { path, source }
        };
        let mut records = BTreeMap::new();
        for entry in std::fs::read_dir(&vms).map_err(io(&vms))? {
            let entry = entry.map_err(io(&vms))?;
            let path = entry.path().join("vm.json");
            let text = match std::fs::read(&path) {
                Ok(t) => t,
                // A directory whose record was never written: a create that did not finish.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => return Err(StoreError::Io { path, source }),
            };
            let record: VmRecord = serde_json::from_slice(&text)
                .map_err(|source| StoreError::Corrupt { path, source })?;
            records.insert(record.id.clone(), record);
        }
        Ok(records)
    }

    /// Creates VM `id`'s directory (owner-only) if it does not exist; its path.
    pub fn make_vm_dir(&self, id: &str) -> Result<PathBuf, StoreError> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = self.vm_dir(id);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|source| StoreError::Io {
                path: dir.clone(),
                source,
            })?;
        Ok(dir)
    }

    /// Writes `record`, replacing the previous one whole.
    pub fn save(&self, record: &VmRecord) -> Result<(), StoreError> {
        let dir = self.make_vm_dir(&record.id)?;
        let path = dir.join("vm.json");
        let tmp = dir.join(".vm.json.new");
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&tmp)?;
            file.write_all(&serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?)?;
            file.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        write().map_err(|source| StoreError::Io { path, source })
    }

    /// Keeps `record` aside while a copy hosted for a peer takes its place (`previous.json`).
    pub fn save_previous(&self, record: &VmRecord) -> Result<(), StoreError> {
        let dir = self.make_vm_dir(&record.id)?;
        let path = dir.join("previous.json");
        let text = serde_json::to_vec_pretty(record).map_err(|source| StoreError::Corrupt {
            path: path.clone(),
            source,
        })?;
        std::fs::write(&path, text).map_err(|source| StoreError::Io { path, source })
    }

    /// The record kept aside for VM `id`, removed from the store, if there is one.
    pub fn take_previous(&self, id: &str) -> Option<VmRecord> {
        let path = self.vm_dir(id).join("previous.json");
        let record = std::fs::read(&path)
            .ok()
            .and_then(|t| serde_json::from_slice(&t).ok());
        let _ = std::fs::remove_file(&path);
        record
    }

    /// Removes VM `id` and everything in its directory.
    pub fn remove(&self, id: &str) -> Result<(), StoreError> {
        let dir = self.vm_dir(id);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StoreError::Io { path: dir, source }),
        }
    }
}

/// Refuses an existing `dir` (not a symbolic link) that another user owns or that others may write.
fn check_owned(dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::MetadataExt;
    let meta = match std::fs::symlink_metadata(dir) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(StoreError::Io {
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let problem = if !meta.is_dir() {
        Some("not a directory (a symbolic link?)".to_string())
    } else if meta.uid() != me {
        Some(format!(
            "owned by uid {} (the daemon runs as {me})",
            meta.uid()
        ))
    } else if meta.mode() & 0o022 != 0 {
        Some(format!(
            "writable by others (mode {:o})",
            meta.mode() & 0o777
        ))
    } else {
        None
    };
    match problem {
        Some(problem) => Err(StoreError::Unsafe {
            path: dir.to_path_buf(),
            problem,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> VmRecord {
        VmRecord {
            id: id.into(),
            config: serde_json::from_str(r#"{"kernel": "/k"}"#).unwrap(),
            lifecycle: Lifecycle::Created,
            created_at: 1,
            process: None,
            exit: None,
            role: Role::Primary,
            peer: None,
            failovers: 0,
        }
    }

    #[test]
    fn a_state_directory_others_own_or_may_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let base = std::env::temp_dir().join(format!("ftvmm-store-owner-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        let mode = |p: &Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
        };

        let fresh = base.join("fresh");
        DirStore::open(&fresh).unwrap();
        let open = std::fs::metadata(fresh.join("vms"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(open, 0o700);

        let loose = base.join("loose");
        std::fs::create_dir(&loose).unwrap();
        mode(&loose, 0o777);
        let refused = DirStore::open(&loose).err().map(|e| e.to_string());
        assert!(
            refused
                .as_deref()
                .is_some_and(|e| e.contains("writable by others (mode 777)")),
            "{refused:?}"
        );

        let linked = base.join("linked");
        std::os::unix::fs::symlink(&fresh, &linked).unwrap();
        let refused = DirStore::open(&linked).err().map(|e| e.to_string());
        assert!(
            refused
                .as_deref()
                .is_some_and(|e| e.contains("not a directory")),
            "{refused:?}"
        );

        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            let theirs = base.join("theirs");
            std::fs::create_dir(&theirs).unwrap();
            std::os::unix::fs::chown(&theirs, Some(65534), None).unwrap();
            let refused = DirStore::open(&theirs).err().map(|e| e.to_string());
            assert!(
                refused
                    .as_deref()
                    .is_some_and(|e| e.contains("owned by uid 65534")),
                "{refused:?}"
            );
        }
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn ids_from_peers_are_safe_directory_names() {
        assert!(safe_dir_name("vm-0a1b2c3d"));
        assert!(safe_dir_name("web.1"));
        for bad in ["", ".", "..", "../x", "a/b", "a b", &"x".repeat(65)] {
            assert!(!safe_dir_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn records_survive_a_reopen_and_removal_is_whole() {
        let root = std::env::temp_dir().join(format!("ftvmm-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let store = DirStore::open(&root).unwrap();
        let mut a = record("vm-a");
        store.save(&a).unwrap();
        store.save(&record("vm-b")).unwrap();
        a.lifecycle = Lifecycle::Running;
        a.process = Some(ProcessRecord {
            pid: 42,
            start_ticks: 7,
        });
        store.save(&a).unwrap();
        // A create interrupted before its record: ignored.
        std::fs::create_dir_all(root.join("vms/vm-c")).unwrap();
        let loaded = DirStore::open(&root).unwrap().load().unwrap();
        assert_eq!(loaded.len(), 2);
        assert_eq!(loaded["vm-a"], a);
        store.remove("vm-b").unwrap();
        assert!(!root.join("vms/vm-b").exists());
        store.remove("vm-b").unwrap();
        std::fs::write(root.join("vms/vm-a/vm.json"), b"{").unwrap();
        let err = store.load().unwrap_err().to_string();
        assert!(err.contains("vm-a/vm.json"), "{err}");
        std::fs::remove_dir_all(root).unwrap();
    }
}
