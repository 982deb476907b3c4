//! The host daemon (`ftvmm serve`): one per host, it creates VMs from configurations, runs each in
//! an ftvmm process of its own (a VM's crash never takes the daemon or another VM down), keeps them
//! in its store so that a restarted daemon re-adopts the ones still running, and serves a REST API
//! (`routes.rs`, OpenAPI at `/openapi.json`) with an event stream and Prometheus metrics.
//!
//! The daemon runs no guest itself and holds no guest memory; it forks VM processes, so it runs
//! without the per-thread seccomp filters of a VM process (`vmm/src/seccomp.rs`).

pub mod cluster;
pub mod events;
pub mod metrics;
pub mod migration;
mod pairing;
pub mod peer_client;
pub mod peer_hosting;
pub mod protection;
pub mod routes;
pub mod snapshots;
pub mod store;
pub mod tcp_api;
pub mod tcp_server;
pub mod vm_config;
pub mod vm_process;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use events::{DaemonEvent, Events};
use peer_client::{PeerClient, PeerError};
use store::{DirStore, Lifecycle, Relation, Role, StoreError, VmRecord};
use vm_config::{ConfigError, VmConfig};
use vm_process::{ProcessError, Readiness, VmFiles, Watched};

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
    #[error("VM {id}: {message}")]
    VmRefused {
        id: String,
        status: u16,
        message: String,
    },
    #[error("{0}")]
    NoPeering(&'static str),
    #[error(transparent)]
    Peer(#[from] PeerError),
    #[error("peer daemon {peer} refused: {message} (HTTP {status})")]
    PeerRefused {
        peer: String,
        status: u16,
        message: String,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Missing(String),
    #[error(transparent)]
    Cluster(#[from] cluster::ClusterError),
    #[error(
        "VM {id}: its guest may run on {peer} now ({how}); delete this record to run it here again"
    )]
    Elsewhere {
        id: String,
        peer: String,
        how: &'static str,
    },
    #[error("peer daemon {peer} answered what is not a peer's answer: {reason}")]
    PeerAnswer { peer: String, reason: String },
    #[error("{0}")]
    Internal(String),
}

/// The cluster to join: its etcd and this host's name there.
pub struct ClusterMembership {
    pub etcd_url: String,
    pub host_name: String,
}

/// What a daemon needs to pair VMs with peer daemons (`ftvmm serve --listen --tls --token-file`).
pub struct Peering {
    pub client: PeerClient,
    /// This daemon's `HOST:PORT`, as its peers dial it.
    pub address: String,
    /// The host part of `address`: where this host's standbys and migration destinations listen.
    pub link_host: String,
    /// The TLS identity directory, given to every VM process (`--tls`).
    pub tls_dir: PathBuf,
    /// This host's firmware image for the firmware-booted copies it hosts for peers
    /// (`ftvmm serve --peer-firmware`).
    pub firmware: Option<PathBuf>,
}

/// The daemon: its store, the VMs it knows, and its event stream.
pub struct Daemon {
    store: DirStore,
    vms: Mutex<BTreeMap<String, VmRecord>>,
    pub events: Events,
    /// The ftvmm executable that VM processes run.
    exe: PathBuf,
    host_memory_mib: u64,
    peering: Option<Peering>,
    /// The cluster this host belongs to (`--cluster`), if any.
    cluster: Option<cluster::Cluster>,
    /// The cluster's etcd, which is also the witness of the VMs protected through the daemons.
    pub(super) witness_url: Option<String>,
    /// The latest status of each VM's migration, as followed by `migration.rs`.
    migrations: Mutex<BTreeMap<String, serde_json::Value>>,
}

impl Daemon {
    /// Opens the store at `state_dir` and re-adopts the VMs whose processes still run; the others
    /// are recorded as ended.
    pub fn open(
        state_dir: &Path,
        exe: PathBuf,
        peering: Option<Peering>,
        cluster: Option<ClusterMembership>,
    ) -> Result<Arc<Self>, DaemonError> {
        let store = DirStore::open(state_dir)?;
        let mut vms = store.load()?;
        let mut adopted = Vec::new();
        let mut gone_copies = Vec::new();
        for record in vms.values_mut() {
            if record.lifecycle != Lifecycle::Running {
                continue;
            }
            match record.process {
                Some(p) if vm_process::is_running(&p) => {
                    tracing::info!(vm = %record.id, pid = p.pid, "re-adopted a running VM");
                    adopted.push((record.id.clone(), Watched::Adopted(p)));
                }
                _ if record.role != Role::Primary => gone_copies.push(record.id.clone()),
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
        let witness_url = cluster.as_ref().map(|m| m.etcd_url.clone());
        let cluster = match (cluster, &peering) {
            (Some(m), Some(p)) => {
                let records: Vec<VmRecord> = vms.values().cloned().collect();
                Some(cluster::Cluster::join(
                    &m.etcd_url,
                    &m.host_name,
                    &p.address,
                    &records,
                )?)
            }
            (Some(_), None) => {
                return Err(DaemonError::NoPeering(
                    "cluster mode needs the TCP API: give --listen, --tls and --token-file",
                ))
            }
            (None, _) => None,
        };
        let daemon = Arc::new(Self {
            store,
            vms: Mutex::new(vms),
            events: Events::new(),
            exe,
            host_memory_mib: vm_config::host_memory_mib(),
            peering,
            cluster,
            witness_url,
            migrations: Mutex::new(BTreeMap::new()),
        });
        // Copies hosted for a peer whose process ended while no daemon watched: as if watched.
        for id in gone_copies {
            daemon.ended(
                &id,
                store::ExitRecord {
                    code: None,
                    reason: "ended while the daemon was not running".into(),
                    at: vm_process::now(),
                },
            );
        }
        for (id, watched) in adopted {
            let role = daemon.get(&id).map(|r| r.role);
            daemon.watch(id.clone(), watched);
            if matches!(role, Ok(Role::Standby | Role::Incoming)) {
                daemon.watch_for_promotion(id);
            }
        }
        Ok(daemon)
    }

    fn vms(&self) -> MutexGuard<'_, BTreeMap<String, VmRecord>> {
        self.vms.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes VM `id`'s record with `change` (which may refuse) and stores it; the new record.
    fn update(
        &self,
        id: &str,
        change: impl FnOnce(&mut VmRecord) -> Result<(), DaemonError>,
    ) -> Result<VmRecord, DaemonError> {
        let mut vms = self.vms();
        let record = vms
            .get_mut(id)
            .ok_or_else(|| DaemonError::NoSuchVm(id.to_string()))?;
        let mut changed = record.clone();
        change(&mut changed)?;
        if changed.lifecycle != Lifecycle::Booting {
            self.save(&changed)?;
        }
        *record = changed.clone();
        Ok(changed)
    }

    /// Stores `record`, and publishes it to the cluster.
    fn save(&self, record: &VmRecord) -> Result<(), DaemonError> {
        self.store.save(record)?;
        if let Some(cluster) = &self.cluster {
            cluster.published(record);
        }
        Ok(())
    }

    /// Removes VM `id` from the store and the cluster.
    fn forget(&self, id: &str) -> Result<(), DaemonError> {
        self.store.remove(id)?;
        if let Some(cluster) = &self.cluster {
            cluster.removed(id);
        }
        Ok(())
    }

    /// The cluster, or why there is none.
    pub fn cluster(&self) -> Result<&cluster::Cluster, DaemonError> {
        self.cluster.as_ref().ok_or(DaemonError::NoPeering(
            "this daemon is not in a cluster: start it with --cluster URL --host-name NAME",
        ))
    }

    /// The daemon address of `peer`: `HOST:PORT` as given, or a host name the cluster knows.
    fn peer_address(&self, peer: &str) -> Result<String, DaemonError> {
        let address = if peer.contains(':') {
            peer.to_string()
        } else {
            self.cluster()
                .map_err(|_| {
                    DaemonError::Invalid(format!(
                        "\"peer\" {peer:?} is not HOST:PORT, and this daemon has no cluster to \
                         look a host name up in"
                    ))
                })?
                .host_api(peer)?
        };
        if self.peering()?.address == address {
            return Err(DaemonError::Invalid(format!(
                "\"peer\" {peer:?} is this daemon: name another host's"
            )));
        }
        Ok(address)
    }

    /// How this daemon pairs VMs with peers, or why it cannot.
    fn peering(&self) -> Result<&Peering, DaemonError> {
        self.peering.as_ref().ok_or(DaemonError::NoPeering(
            "this daemon has no peers: start it with --listen, --tls and --token-file",
        ))
    }

    /// The witness arguments of VM `id`'s primary and standby processes: in cluster mode the
    /// cluster's etcd decides which copy may act, the guest named by its id (the same on both).
    pub(super) fn witness_args(&self, id: &str) -> Vec<OsString> {
        match &self.witness_url {
            Some(url) => vec![
                "--witness".into(),
                url.into(),
                "--guest-name".into(),
                id.into(),
            ],
            None => Vec::new(),
        }
    }

    /// The arguments every VM process gets for its links (`--tls DIR` when the daemon has one).
    fn link_args(&self) -> Vec<OsString> {
        match &self.peering {
            Some(p) => vec!["--tls".into(), p.tls_dir.clone().into()],
            None => Vec::new(),
        }
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
            role: Role::Primary,
            peer: None,
            failovers: 0,
        };
        self.save(&record)?;
        vms.insert(id.clone(), record.clone());
        drop(vms);
        self.events.send(DaemonEvent::new(&id, "created", ""));
        Ok(record)
    }

    /// Starts VM `id`'s process; returns once its API answers. The VM is `booting` meanwhile, so a
    /// second boot (or a delete) of it is refused.
    pub fn boot(self: &Arc<Self>, id: &str) -> Result<VmRecord, DaemonError> {
        self.launch(id, "booted", |record, files| {
            let mut args = record.config.run_args(&files.console, &files.api_socket);
            args.extend(self.witness_args(&record.id));
            args
        })
    }

    /// Starts the process `args_for` describes for VM `id` (a primary that does not run), as
    /// [`Self::boot`] does; `kind` names the event.
    pub(super) fn launch(
        self: &Arc<Self>,
        id: &str,
        kind: &str,
        args_for: impl FnOnce(&VmRecord, &VmFiles) -> Vec<OsString>,
    ) -> Result<VmRecord, DaemonError> {
        let id = self.get(id)?.id;
        let mut before = None;
        let record = self.update(&id, |r| {
            if matches!(r.lifecycle, Lifecycle::Running | Lifecycle::Booting) {
                return Err(wrong_state(r, "it runs already"));
            }
            if r.role != Role::Primary {
                return Err(wrong_state(r, "only a primary boots"));
            }
            if let Some(peer) = &r.peer {
                let how = match peer.relation {
                    Relation::MigratedTo | Relation::MigratingTo => "it migrated there",
                    Relation::ProtectedBy => "its standby there may have taken over",
                    _ => "",
                };
                if !how.is_empty() {
                    return Err(DaemonError::Elsewhere {
                        id: r.id.clone(),
                        peer: peer.daemon.clone(),
                        how,
                    });
                }
            }
            before = Some(r.lifecycle);
            r.lifecycle = Lifecycle::Booting;
            Ok(())
        })?;
        let files = self.files(&id);
        let mut args = args_for(&record, &files);
        args.extend(self.link_args());
        let started = vm_process::start(&self.exe, &args, &files, Readiness::ApiSocket);
        let restore = |e: DaemonError| {
            let _ = self.update(&id, |r| {
                r.lifecycle = before.unwrap_or(Lifecycle::Created);
                Ok(())
            });
            e
        };
        let (child, _) = started.map_err(|source| {
            restore(DaemonError::Process {
                id: id.clone(),
                source,
            })
        })?;
        let process = vm_process::record_of(&child);
        let record = self.update(&id, |r| {
            r.lifecycle = Lifecycle::Running;
            r.process = Some(process);
            r.exit = None;
            r.peer = None;
            Ok(())
        });
        let record = match record {
            Ok(record) => record,
            Err(e) => {
                // A VM the store does not know would be lost to a restarted daemon: not started.
                let mut child = child;
                let _ = child.kill();
                let _ = child.wait();
                return Err(restore(e));
            }
        };
        self.events
            .send(DaemonEvent::new(&id, kind, &format!("pid {}", child.id())));
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

    fn ended(&self, id: &str, mut exit: store::ExitRecord) {
        let Ok(role) = self.get(id).map(|r| r.role) else {
            return; // deleted
        };
        let never_ran_the_guest = role != Role::Primary && !self.promoted_by_facts(id);
        let mut vms = self.vms();
        let Some(record) = vms.get_mut(id) else {
            return;
        };
        if never_ran_the_guest {
            // A standby or destination that never ran the guest holds nothing worth keeping.
            let log = vm_process::log_tail(&self.files(id).log);
            self.discard_copy(&mut vms, id);
            drop(vms);
            let kind = if role == Role::Standby {
                "standby_ended"
            } else {
                "incoming_ended"
            };
            tracing::info!(vm = %id, reason = %exit.reason, "{kind}");
            self.events.send(DaemonEvent::new(
                id,
                kind,
                &format!("{}: {log}", exit.reason),
            ));
            return;
        }
        if let Some(peer) = record.peer.clone() {
            match peer.relation {
                Relation::MigratedTo | Relation::MigratingTo if exit.code == Some(0) => {
                    // The process ends 0 after the hand-over (its follower may not have read the
                    // last status yet).
                    exit.reason = format!("the VM migrated to {}", peer.daemon);
                    if let Some(p) = &mut record.peer {
                        p.relation = Relation::MigratedTo;
                    }
                }
                // The guest powered off: its standby heard the goodbye and ended.
                Relation::ProtectedBy if exit.code == Some(0) => record.peer = None,
                _ => {}
            }
        }
        record.role = Role::Primary;
        record.lifecycle = Lifecycle::Exited;
        record.process = None;
        record.exit = Some(exit.clone());
        if let Err(e) = self.save(record) {
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
        let mut vms = self.vms();
        // Checked and removed under one lock: no boot or peer copy can start in between.
        let current = vms
            .get(&record.id)
            .ok_or_else(|| DaemonError::NoSuchVm(id.to_string()))?;
        if matches!(current.lifecycle, Lifecycle::Running | Lifecycle::Booting) {
            return Err(wrong_state(current, "stop it first"));
        }
        self.forget(&record.id)?;
        vms.remove(&record.id);
        drop(vms);
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
        if !socket.exists() {
            return Err(wrong_state(
                &record,
                "its API is not up (a standby's comes up once its primary connects)",
            ));
        }
        crate::client::request(&socket, method, path, body, Duration::from_secs(60))
            .map(|r| (r.status, r.body))
            .map_err(|e| DaemonError::VmApi {
                id: record.id.clone(),
                message: e.to_string(),
            })
    }
}

impl Daemon {
    /// Sends a request to running VM `id`'s own API and returns its answer if its status is
    /// `expect`; any other answer becomes [`DaemonError::VmRefused`] with the VM's message.
    pub(crate) fn vm_call(
        &self,
        id: &str,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
        expect: u16,
    ) -> Result<serde_json::Value, DaemonError> {
        let (status, answer) = self.vm_request(id, method, path, body)?;
        if status == expect {
            return Ok(answer);
        }
        Err(DaemonError::VmRefused {
            id: id.to_string(),
            status,
            message: crate::client::error_message(&answer),
        })
    }

    /// Sends a request to the peer daemon at `peer` and returns its answer if its status is
    /// `expect`; any other answer becomes [`DaemonError::PeerRefused`].
    pub(crate) fn peer_call(
        &self,
        peer: &str,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
        expect: u16,
    ) -> Result<serde_json::Value, DaemonError> {
        let answer = self
            .peering()?
            .client
            .request(peer, method, path, body, PEER_TIMEOUT)?;
        if answer.status == expect {
            return Ok(answer.body);
        }
        Err(DaemonError::PeerRefused {
            peer: peer.to_string(),
            status: answer.status,
            message: crate::client::error_message(&answer.body),
        })
    }

    /// The sizes of VM `config`'s disks, for the peer that makes or checks its own.
    fn disk_sizes(config: &VmConfig) -> Result<Vec<u64>, DaemonError> {
        config
            .disks
            .iter()
            .map(|d| {
                std::fs::metadata(&d.path)
                    .map(|m| m.len())
                    .map_err(|e| DaemonError::Internal(format!("disk {}: {e}", d.path.display())))
            })
            .collect()
    }
}

/// How long a peer daemon may take to answer (it starts a process and waits for it to listen).
const PEER_TIMEOUT: Duration = Duration::from_secs(30);

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
