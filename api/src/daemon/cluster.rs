//! Cluster mode (`ftvmm serve --cluster URL --host-name NAME`): the daemons of several hosts share
//! an etcd — the one the witness of protected guests uses — so that any of them can answer where a
//! VM runs and who its standby is, and peers can be named by host name. No consensus of our own:
//! etcd holds the facts, each daemon writes only its own.
//!
//! Keys (values are JSON):
//! - `/ftvmm/hosts/NAME`: a live host (`ClusterHost`), bound to the host's lease: it goes when the
//!   host's daemon stops renewing it (10 s).
//! - `/ftvmm/vms/ID/NAME`: host NAME's copy of VM ID (`VmCopy`: role, lifecycle, peer), bound to
//!   the same lease: a dead host's copies go with it.
//!
//! Writes go through one publisher thread, in order, so that no request waits for etcd; the local
//! store stays the source of truth and is republished whole when a lease has to be renewed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::Duration;

use replication::witness::etcd::{Etcd, EtcdError};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::store::{Lifecycle, PeerRecord, Role, VmRecord};

/// How long a host's lease lasts without renewal.
const LEASE_TTL: Duration = Duration::from_secs(10);
/// How often it is renewed.
const RENEW_EVERY: Duration = Duration::from_secs(3);
const HOSTS: &str = "/ftvmm/hosts/";
const VMS: &str = "/ftvmm/vms/";

/// A live host of the cluster.
#[derive(Clone, Debug, Deserialize, Serialize, ToSchema, PartialEq)]
pub struct ClusterHost {
    pub name: String,
    /// Its daemon's TCP API, `HOST:PORT`.
    pub api: String,
}

/// One host's copy of a VM, as the cluster knows it.
#[derive(Clone, Debug, Deserialize, Serialize, ToSchema, PartialEq)]
pub struct VmCopy {
    pub host: String,
    /// That host's daemon, `HOST:PORT`.
    pub api: String,
    pub role: Role,
    pub lifecycle: Lifecycle,
    pub name: Option<String>,
    pub peer: Option<PeerRecord>,
}

/// Where a VM is in the cluster: the host that runs it, its standby, and every copy.
#[derive(Clone, Debug, Deserialize, Serialize, ToSchema, PartialEq)]
pub struct Placement {
    pub id: String,
    /// The host whose copy runs the guest.
    pub runs_on: Option<String>,
    /// The host whose copy stands by for it.
    pub standby_on: Option<String>,
    pub copies: Vec<VmCopy>,
}

/// Errors of the cluster store.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cluster store: {0}")]
    Etcd(#[from] EtcdError),
    #[error("cluster store: {key} holds what is not ftvmm's: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("no live host {0:?} in the cluster")]
    NoSuchHost(String),
    #[error("--host-name {0:?}: 1 to 64 letters, digits, '-', '_' or '.'")]
    BadName(String),
}

enum Publish {
    Copy(String, Vec<u8>),
    Gone(String),
}

/// This daemon's membership of the cluster.
pub struct Cluster {
    etcd: Etcd,
    host: ClusterHost,
    publish: Sender<Publish>,
}

impl Cluster {
    /// Joins the cluster whose etcd is at `url` as host `name`, whose daemon serves at `api`, with
    /// `records` as its VMs.
    pub fn join(
        url: &str,
        name: &str,
        api: &str,
        records: &[VmRecord],
    ) -> Result<Self, ClusterError> {
        let ok = (1..=64).contains(&name.len())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !ok {
            return Err(ClusterError::BadName(name.to_string()));
        }
        let host = ClusterHost {
            name: name.to_string(),
            api: api.to_string(),
        };
        let publisher = Etcd::new(url)?;
        let lease = register(&publisher, &host)?;
        let (publish, queue) = mpsc::channel();
        let cluster = Self {
            etcd: Etcd::new(url)?,
            host: host.clone(),
            publish,
        };
        for record in records {
            cluster.published(record);
        }
        std::thread::Builder::new()
            .name("cluster".into())
            .spawn(move || run_publisher(publisher, host, Some(lease), queue))
            .map_err(|e| EtcdError::Request {
                url: url.to_string(),
                reason: format!("cannot start the publisher: {e}"),
            })?;
        Ok(cluster)
    }

    /// Records `record` (this host's copy of a VM) in the cluster, soon.
    pub fn published(&self, record: &VmRecord) {
        let copy = VmCopy {
            host: self.host.name.clone(),
            api: self.host.api.clone(),
            role: record.role,
            lifecycle: record.lifecycle,
            name: record.config.name.clone(),
            peer: record.peer.clone(),
        };
        let key = format!("{VMS}{}/{}", record.id, self.host.name);
        let value = serde_json::to_vec(&copy).unwrap_or_default();
        let _ = self.publish.send(Publish::Copy(key, value));
    }

    /// Removes this host's copy of VM `id` from the cluster, soon.
    pub fn removed(&self, id: &str) {
        let _ = self
            .publish
            .send(Publish::Gone(format!("{VMS}{id}/{}", self.host.name)));
    }

    /// Every live host.
    pub fn hosts(&self) -> Result<Vec<ClusterHost>, ClusterError> {
        self.read(HOSTS)
    }

    /// The daemon address of live host `name`.
    pub fn host_api(&self, name: &str) -> Result<String, ClusterError> {
        self.hosts()?
            .into_iter()
            .find(|h| h.name == name)
            .map(|h| h.api)
            .ok_or_else(|| ClusterError::NoSuchHost(name.to_string()))
    }

    /// Where VM `id` is (by id, or by a name one of its copies has).
    pub fn placement(&self, id: &str) -> Result<Option<Placement>, ClusterError> {
        let by_id = self.placements(&format!("{VMS}{id}/"))?;
        if let Some(p) = by_id.into_iter().next() {
            return Ok(Some(p));
        }
        Ok(self
            .placements(VMS)?
            .into_iter()
            .find(|p| p.copies.iter().any(|c| c.name.as_deref() == Some(id))))
    }

    /// Every VM of the cluster and where it is.
    pub fn placements_all(&self) -> Result<Vec<Placement>, ClusterError> {
        self.placements(VMS)
    }

    fn placements(&self, prefix: &str) -> Result<Vec<Placement>, ClusterError> {
        let mut by_vm: BTreeMap<String, Vec<VmCopy>> = BTreeMap::new();
        for (key, value) in self.etcd.prefix(prefix)? {
            let Some((id, _host)) = key[VMS.len()..].split_once('/') else {
                continue;
            };
            let copy: VmCopy = decode(&key, &value)?;
            by_vm.entry(id.to_string()).or_default().push(copy);
        }
        Ok(by_vm
            .into_iter()
            .map(|(id, copies)| {
                let on = |role: Role| {
                    copies
                        .iter()
                        .find(|c| c.role == role && c.lifecycle == Lifecycle::Running)
                        .map(|c| c.host.clone())
                };
                Placement {
                    runs_on: on(Role::Primary),
                    standby_on: on(Role::Standby),
                    id,
                    copies,
                }
            })
            .collect())
    }

    fn read<T: for<'de> Deserialize<'de>>(&self, prefix: &str) -> Result<Vec<T>, ClusterError> {
        self.etcd
            .prefix(prefix)?
            .into_iter()
            .map(|(key, value)| decode(&key, &value))
            .collect()
    }
}

fn decode<T: for<'de> Deserialize<'de>>(key: &str, value: &[u8]) -> Result<T, ClusterError> {
    serde_json::from_slice(value).map_err(|e| ClusterError::Corrupt {
        key: key.to_string(),
        reason: e.to_string(),
    })
}

/// Takes a new lease and registers `host` under it; the lease.
fn register(etcd: &Etcd, host: &ClusterHost) -> Result<i64, EtcdError> {
    let lease = etcd.grant_lease(LEASE_TTL)?;
    let value = serde_json::to_vec(host).unwrap_or_default();
    etcd.put(&format!("{HOSTS}{}", host.name), &value, Some(lease))?;
    Ok(lease)
}

/// The publisher thread: writes copies in order, renews the lease, and when the lease was lost
/// (etcd unreachable for longer than its TTL) registers again and republishes every copy.
fn run_publisher(etcd: Etcd, host: ClusterHost, mut lease: Option<i64>, queue: Receiver<Publish>) {
    let _span = tracing::info_span!("cluster", host = %host.name).entered();
    let mut copies: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    // Keys whose latest value etcd does not have yet.
    let mut unwritten: BTreeSet<String> = BTreeSet::new();
    loop {
        match queue.recv_timeout(RENEW_EVERY) {
            Ok(item) => take(&etcd, item, &mut copies, &mut unwritten),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                if let Some(lease) = lease {
                    let _ = etcd.revoke_lease(lease);
                }
                return;
            }
        }
        while let Ok(item) = queue.try_recv() {
            take(&etcd, item, &mut copies, &mut unwritten);
        }
        let alive = lease.is_some_and(|l| etcd.keep_alive(l).unwrap_or(false));
        if !alive {
            lease = match register(&etcd, &host) {
                Ok(l) => {
                    tracing::info!("registered in the cluster (lease {l:x})");
                    unwritten = copies.keys().cloned().collect();
                    Some(l)
                }
                Err(e) => {
                    tracing::warn!("cluster store unreachable: {e}");
                    None
                }
            };
        }
        let Some(l) = lease else { continue };
        let written: Vec<String> = unwritten
            .iter()
            .filter(|key| match etcd.put(key, &copies[*key], Some(l)) {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!("cannot publish {key} to the cluster store: {e}");
                    false
                }
            })
            .cloned()
            .collect();
        for key in written {
            unwritten.remove(&key);
        }
    }
}

/// Takes one publication into the copies to write (or removes a copy at once).
fn take(
    etcd: &Etcd,
    item: Publish,
    copies: &mut BTreeMap<String, Vec<u8>>,
    unwritten: &mut BTreeSet<String>,
) {
    match item {
        Publish::Copy(key, value) => {
            copies.insert(key.clone(), value);
            unwritten.insert(key);
        }
        Publish::Gone(key) => {
            copies.remove(&key);
            unwritten.remove(&key);
            if let Err(e) = etcd.remove(&key) {
                tracing::warn!("cannot remove {key}: {e}");
            }
        }
    }
}
