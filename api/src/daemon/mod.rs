//! The host daemon (`ftvmm serve`): one per host, it creates VMs from configurations, runs each in
//! an ftvmm process of its own (a VM's crash never takes the daemon or another VM down), keeps them
//! in its store so that a restarted daemon re-adopts the ones still running, and serves a REST API
//! (`routes.rs`, OpenAPI at `/openapi.json`) with an event stream and Prometheus metrics.
//!
//! The daemon runs no guest itself and holds no guest memory; it forks VM processes, so it runs
//! without the per-thread seccomp filters of a VM process (`vmm/src/seccomp.rs`).

pub mod events;
pub mod metrics;
pub mod routes;
pub mod store;
pub mod vm_config;
pub mod vm_process;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use events::{DaemonEvent, Events};
use store::{DirStore, Lifecycle, StoreError, VmRecord};
use vm_config::{ConfigError, VmConfig};
use vm_process::{ProcessError, VmFiles, Watched};

/// How long a stopped VM's process has after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// What can go wrong with a request to the daemon; each maps to an HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("no VM {0:?} on this host")]
    NoSuchVm(String),
    #[error("invalid VM configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("a VM named {0:?} exists already")]
    NameTaken(String),
    #[error("VM {id} is {state}: {wanted}")]
    WrongState {
        id: String,
        state: String,
        wanted: &'static str,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("VM {id}: {source}")]
    Process { id: String, source: ProcessError },
    #[error("VM {id}'s API: {message}")]
    VmApi { id: String, message: String },
}

/// The daemon: its store, the VMs it knows, and its event stream.
pub struct Daemon {
    store: DirStore,
    vms: Mutex<BTreeMap<String, VmRecord>>,
    pub events: Events,
    /// The ftvmm executable that VM processes run.
    exe: PathBuf,
    host_memory_mib: u64,
}

impl Daemon {
    /// Opens the store at `state_dir` and re-adopts the VMs whose processes still run; the others
    /// are recorded as ended.
    pub fn open(state_dir: &Path, exe: PathBuf) -> Result<Arc<Self>, DaemonError> {
        let store = DirStore::open(state_dir)?;
        let mut vms = store.load()?;
        let mut adopted = Vec::new();
        for record in vms.values_mut() {
            if record.lifecycle != Lifecycle::Running {
                continue;
            }
            match record.process {
                Some(p) if vm_process::is_running(&p) => {
                    tracing::info!(vm = %record.id, pid = p.pid, "re-adopted a running VM");
                    adopted.push((record.id.clone(), Watched::Adopted(p)));
                }
                _ => {
                    record.lifecycle = Lifecycle::Exited;
                    record.process = None;
                    record.exit = Some(store::ExitRecord {
                        code: None,
                        reason: "ended while the daemon was not running".into(),
                        at: vm_process::now(),
                    });
                    store.save(record)?;
                }
            }
        }
        let daemon = Arc::new(Self {
            store,
            vms: Mutex::new(vms),
            events: Events::new(),
            exe,
            host_memory_mib: vm_config::host_memory_mib(),
        });
        for (id, watched) in adopted {
            daemon.watch(id, watched);
        }
        Ok(daemon)
    }

    fn vms(&self) -> MutexGuard<'_, BTreeMap<String, VmRecord>> {
        self.vms.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every VM, by id.
    pub fn list(&self) -> Vec<VmRecord> {
        self.vms().values().cloned().collect()
    }

    /// VM `id` (or the VM named `id`).
    pub fn get(&self, id: &str) -> Result<VmRecord, DaemonError> {
        let vms = self.vms();
        vms.get(id)
            .or_else(|| vms.values().find(|r| r.config.name.as_deref() == Some(id)))
            .cloned()
            .ok_or_else(|| DaemonError::NoSuchVm(id.to_string()))
    }

    /// The files of VM `id`.
    pub fn files(&self, id: &str) -> VmFiles {
        VmFiles::in_dir(&self.store.vm_dir(id))
    }

    /// Records a new VM from `config` (checked first); it is booted separately.
    pub fn create(&self, config: VmConfig) -> Result<VmRecord, DaemonError> {
        config.validate(self.host_memory_mib)?;
        let mut vms = self.vms();
        if let Some(name) = &config.name {
            if vms.values().any(|r| r.config.name.as_ref() == Some(name)) {
                return Err(DaemonError::NameTaken(name.clone()));
            }
        }
        let id = loop {
            let id = new_id();
            if !vms.contains_key(&id) {
                break id;
            }
        };
        let record = VmRecord {
            id: id.clone(),
            config,
            lifecycle: Lifecycle::Created,
            created_at: vm_process::now(),
            process: None,
            exit: None,
        };
        self.store.save(&record)?;
        vms.insert(id.clone(), record.clone());
        drop(vms);
        self.events.send(DaemonEvent::new(&id, "created", ""));
        Ok(record)
    }

    /// Starts VM `id`'s process; returns once its API answers.
    pub fn boot(self: &Arc<Self>, id: &str) -> Result<VmRecord, DaemonError> {
        let mut record = self.get(id)?;
        if record.lifecycle == Lifecycle::Running {
            return Err(wrong_state(&record, "it runs already"));
        }
        let id = record.id.clone();
        let files = self.files(&id);
        let child = vm_process::start(&self.exe, &record.config, &files).map_err(|source| {
            DaemonError::Process {
                id: id.clone(),
                source,
            }
        })?;
        record.lifecycle = Lifecycle::Running;
        record.process = Some(vm_process::record_of(&child));
        record.exit = None;
        if let Err(e) = self.store.save(&record) {
            // A VM the store does not know would be lost to a restarted daemon: not started.
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
            return Err(e.into());
        }
        self.vms().insert(id.clone(), record.clone());
        self.events.send(DaemonEvent::new(
            &id,
            "booted",
            &format!("pid {}", child.id()),
        ));
        self.watch(id, Watched::Child(child));
        Ok(record)
    }

    /// Watches VM `id`'s process on a thread of its own and records its end.
    fn watch(self: &Arc<Self>, id: String, watched: Watched) {
        let daemon = self.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("watch-{id}"))
            .spawn(move || {
                let exit = watched.wait();
                daemon.ended(&id, exit);
            });
        if let Err(e) = spawned {
            tracing::error!("cannot watch a VM's process: {e}");
        }
    }

    fn ended(&self, id: &str, exit: store::ExitRecord) {
        let mut vms = self.vms();
        let Some(record) = vms.get_mut(id) else {
            return; // deleted
        };
        record.lifecycle = Lifecycle::Exited;
        record.process = None;
        record.exit = Some(exit.clone());
        if let Err(e) = self.store.save(record) {
            tracing::error!(vm = %id, "{e}");
        }
        drop(vms);
        tracing::info!(vm = %id, reason = %exit.reason, "VM process ended");
        self.events
            .send(DaemonEvent::new(id, "exited", &exit.reason));
    }

    /// Ends VM `id`'s process (SIGTERM, then SIGKILL): the guest is not asked to power off.
    pub fn stop(&self, id: &str) -> Result<(), DaemonError> {
        let record = self.get(id)?;
        match record.process {
            Some(p) if record.lifecycle == Lifecycle::Running => {
                vm_process::terminate(&p, STOP_GRACE);
                Ok(())
            }
            _ => Err(wrong_state(&record, "it does not run")),
        }
    }

    /// Removes VM `id`, which must not run.
    pub fn delete(&self, id: &str) -> Result<(), DaemonError> {
        let record = self.get(id)?;
        if record.lifecycle == Lifecycle::Running {
            return Err(wrong_state(&record, "stop it first"));
        }
        self.store.remove(&record.id)?;
        self.vms().remove(&record.id);
        self.events
            .send(DaemonEvent::new(&record.id, "deleted", ""));
        Ok(())
    }

    /// Sends a request to running VM `id`'s own API; its status and JSON answer.
    pub fn vm_request(
        &self,
        id: &str,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<(u16, serde_json::Value), DaemonError> {
        let record = self.get(id)?;
        if record.lifecycle != Lifecycle::Running {
            return Err(wrong_state(&record, "it does not run"));
        }
        let socket = self.files(&record.id).api_socket;
        crate::client::request(&socket, method, path, body, Duration::from_secs(60))
            .map(|r| (r.status, r.body))
            .map_err(|e| DaemonError::VmApi {
                id: record.id.clone(),
                message: e.to_string(),
            })
    }
}

fn wrong_state(record: &VmRecord, wanted: &'static str) -> DaemonError {
    DaemonError::WrongState {
        id: record.id.clone(),
        state: format!("{:?}", record.lifecycle).to_lowercase(),
        wanted,
    }
}

/// A new VM id: `vm-` and 8 random hex digits.
fn new_id() -> String {
    let mut bytes = [0u8; 4];
    // SAFETY: getrandom fills the buffer we own, of the length given.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        // No entropy to be had: the clock is unique enough for ids checked against the store.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        bytes = t.to_le_bytes();
    }
    format!(
        "vm-{}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}
