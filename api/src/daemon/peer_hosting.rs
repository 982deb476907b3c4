//! Copies of a VM that this daemon hosts for a peer daemon: the hot standby of a primary running on
//! the peer (`ftvmm standby`), or the destination of a migration from it (`ftvmm receive`). The
//! copy has the VM's id, its hardware, and this host's own backends: disk images in the VM's
//! directory for a standby (its primary sends their first copy), the same disk paths for a
//! migration (the disks must be on storage both hosts see), and TAPs of the same names.
//!
//! The copy becomes this host's primary when its process runs the guest: a standby that took over,
//! a migration that arrived. A copy whose process ends without that (the primary said goodbye, the
//! migration failed or was cancelled) is removed: it holds nothing worth keeping.

use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::events::DaemonEvent;
use super::store::{safe_dir_name, Lifecycle, PeerRecord, Relation, Role, VmRecord};
use super::vm_config::{DiskConfig, VmConfig};
use super::vm_process::{self, Readiness, Watched};
use super::{wrong_state, Daemon, DaemonError};

/// How often a hosted copy is asked whether it runs the guest yet.
const PROMOTION_POLL: Duration = Duration::from_millis(100);

/// A peer daemon's request to host a copy of one of its VMs (`POST /api/v1/peer/standbys`,
/// `POST /api/v1/peer/incoming`).
#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PeerVmRequest {
    /// The VM's id on the peer; the copy here has the same.
    pub id: String,
    /// The VM's configuration on the peer (its paths are the peer's).
    pub config: VmConfig,
    /// The size in bytes of each of the VM's disks, in order.
    #[serde(default)]
    pub disk_sizes: Vec<u64>,
    /// The asking daemon's `HOST:PORT`.
    pub from: String,
}

/// Where the hosted copy listens for the VM link.
#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
pub struct PeerVmAnswer {
    /// `HOST:PORT` for the primary's `protect` or the source's `migrate`.
    pub link: String,
}

impl Role {
    /// The ftvmm command that hosts a copy in this role.
    fn command(self) -> &'static str {
        match self {
            Role::Standby => "standby",
            _ => "receive",
        }
    }
}

impl Daemon {
    /// Hosts a copy of the peer's VM as `role` (standby or incoming): records it, starts its
    /// process and answers where it listens.
    pub fn host_for_peer(
        self: &Arc<Self>,
        role: Role,
        request: PeerVmRequest,
    ) -> Result<PeerVmAnswer, DaemonError> {
        let link_host = self.peering()?.link_host.clone();
        let PeerVmRequest {
            id,
            config,
            disk_sizes,
            from,
        } = request;
        if !safe_dir_name(&id) {
            return Err(DaemonError::Invalid(format!(
                "\"id\" {id:?}: 1 to 64 letters, digits, '-', '_' or '.'"
            )));
        }
        config.validate_hardware(self.host_memory_mib)?;
        // The peer's paths are its own: a firmware-booted copy gets this host's image.
        let mut config = config;
        if config.firmware.is_some() {
            let Some(own) = self.peering()?.firmware.clone() else {
                return Err(DaemonError::Invalid(
                    "the VM boots through UEFI firmware and this host has none for peers' copies \
                     (ftvmm serve --peer-firmware)"
                        .into(),
                ));
            };
            config.firmware = Some(own);
        }
        if disk_sizes.len() != config.disks.len() {
            return Err(DaemonError::Invalid(format!(
                "\"disk_sizes\" has {} sizes for {} disks",
                disk_sizes.len(),
                config.disks.len()
            )));
        }
        if role == Role::Incoming {
            shared_disks(&config.disks, &disk_sizes)?;
        }
        let relation = match role {
            Role::Standby => Relation::StandbyOf,
            _ => Relation::MigratingFrom,
        };
        // The id is reserved (`booting`) before anything is made in its directory: a copy that
        // runs here already is refused before its images could be touched.
        let previous = self.take_for_peer(&id, role, config.clone(), relation, &from)?;
        let dir = match self.store.make_vm_dir(&id) {
            Ok(dir) => dir,
            Err(e) => {
                self.give_back(&id, previous);
                return Err(e.into());
            }
        };
        if role == Role::Standby {
            match standby_images(&dir, &config.disks, &disk_sizes) {
                Ok(images) => {
                    if let Some(r) = self.vms().get_mut(&id) {
                        r.config.disks = images;
                    }
                }
                Err(e) => {
                    self.give_back(&id, previous);
                    return Err(e);
                }
            }
        }
        let command = role.command();
        let files = self.files(&id);
        let record = self.get(&id)?;
        let mut args = vec![
            command.into(),
            "--listen".into(),
            format!("{}:0", bracketed(&link_host)).into(),
        ];
        args.extend(self.link_args());
        if role == Role::Standby {
            args.extend(self.witness_args(&id));
        }
        args.extend(
            record
                .config
                .backend_args(&files.console, &files.api_socket),
        );
        args.extend(["--facts-file".into(), files.facts.clone().into()]);
        let started = vm_process::start(&self.exe, &args, &files, Readiness::Listening);
        let (child, link) = match started {
            Ok(started) => started,
            Err(source) => {
                self.give_back(&id, previous);
                return Err(DaemonError::Process { id, source });
            }
        };
        let process = vm_process::record_of(&child);
        let saved = self.update(&id, |r| {
            r.lifecycle = Lifecycle::Running;
            r.process = Some(process);
            if let Some(peer) = &mut r.peer {
                peer.link = link.clone();
            }
            Ok(())
        });
        if let Err(e) = saved {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
            self.give_back(&id, previous);
            return Err(e);
        }
        let kind = match role {
            Role::Standby => "standby_ready",
            _ => "incoming_ready",
        };
        self.events.send(DaemonEvent::new(
            &id,
            kind,
            &format!("for {from}, listening on {link}"),
        ));
        self.watch(id.clone(), Watched::Child(child));
        self.watch_for_promotion(id);
        Ok(PeerVmAnswer { link })
    }

    /// Records VM `id` as a copy hosted for `from`, `booting` while its process starts; a record
    /// of the same id that does not run is taken over. Returns that previous record.
    fn take_for_peer(
        &self,
        id: &str,
        role: Role,
        config: VmConfig,
        relation: Relation,
        from: &str,
    ) -> Result<Option<VmRecord>, DaemonError> {
        let mut vms = self.vms();
        let previous = vms.get(id).cloned();
        if let Some(p) = &previous {
            if matches!(p.lifecycle, Lifecycle::Running | Lifecycle::Booting) {
                return Err(wrong_state(p, "this host runs a copy of it already"));
            }
            // Kept, so that a copy that never runs the guest gives the record back.
            self.store.save_previous(p)?;
        }
        if let Some(name) = &config.name {
            if vms
                .values()
                .any(|r| r.id != id && r.config.name.as_ref() == Some(name))
            {
                return Err(DaemonError::NameTaken(name.clone()));
            }
        }
        let record = VmRecord {
            id: id.to_string(),
            config,
            lifecycle: Lifecycle::Booting,
            created_at: previous
                .as_ref()
                .map_or_else(vm_process::now, |p| p.created_at),
            process: None,
            exit: None,
            failovers: previous.as_ref().map_or(0, |p| p.failovers),
            role,
            peer: Some(PeerRecord {
                relation,
                daemon: from.to_string(),
                link: String::new(),
            }),
        };
        vms.insert(id.to_string(), record);
        Ok(previous)
    }

    /// Undoes [`Self::take_for_peer`] after the process did not start.
    fn give_back(&self, id: &str, previous: Option<VmRecord>) {
        let mut vms = self.vms();
        let _ = self.store.take_previous(id);
        match previous {
            Some(p) => {
                vms.insert(id.to_string(), p);
            }
            None => {
                vms.remove(id);
                if let Err(e) = self.forget(id) {
                    tracing::error!(vm = %id, "{e}");
                }
            }
        }
    }

    /// A hosted copy of VM `id` ended without running the guest (the primary said goodbye, a
    /// migration failed or was cancelled, the peer dropped it): the record it took the place of
    /// comes back, or the VM is removed from this host. Called with the VM table locked.
    pub(super) fn discard_copy(
        &self,
        vms: &mut std::collections::BTreeMap<String, VmRecord>,
        id: &str,
    ) {
        let dir = self.store.vm_dir(id);
        match self.store.take_previous(id) {
            Some(previous) => {
                // Only the copy's own images go; the record's snapshots and console stay.
                for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if name.starts_with("disk") && name.ends_with(".img") {
                        let _ = std::fs::remove_file(entry.path());
                    }
                }
                if let Err(e) = self.save(&previous) {
                    tracing::error!(vm = %id, "{e}");
                }
                vms.insert(id.to_string(), previous);
            }
            None => {
                vms.remove(id);
                if let Err(e) = self.forget(id) {
                    tracing::error!(vm = %id, "{e}");
                }
            }
        }
    }

    /// The peer no longer needs the copy of VM `id` it asked for (its protection or migration did
    /// not start): its process is ended, and its end removes it.
    pub fn drop_for_peer(&self, id: &str) -> Result<(), DaemonError> {
        let record = self.get(id)?;
        // The promotion watcher may be a poll behind: the process's own word counts too.
        if record.role == Role::Primary || self.promoted_by_facts(&record.id) {
            return Err(wrong_state(
                &record,
                "it runs the guest here: only a standby or a migration's destination is dropped",
            ));
        }
        self.stop(id)
    }

    /// Watches hosted copy `id` until its process runs the guest (its API answers as a VM's), and
    /// then records it as this host's primary.
    pub(super) fn watch_for_promotion(self: &Arc<Self>, id: String) {
        let daemon = self.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("promote-{id}"))
            .spawn(move || {
                let process = daemon.get(&id).ok().and_then(|r| r.process);
                loop {
                    std::thread::sleep(PROMOTION_POLL);
                    let Ok(record) = daemon.get(&id) else { return };
                    // Only the copy this watcher was started for (not a later one of the same id).
                    if record.lifecycle != Lifecycle::Running
                        || record.role == Role::Primary
                        || record.process != process
                    {
                        return;
                    }
                    let socket = daemon.files(&id).api_socket;
                    let answer = crate::client::request(
                        &socket,
                        "GET",
                        "/api/v1/vm",
                        None,
                        Duration::from_secs(2),
                    );
                    if answer.is_ok_and(|a| a.status == 200) {
                        daemon.promote(&id, record.role, process);
                        return;
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!("cannot watch a hosted VM copy: {e}");
        }
    }

    fn promote(&self, id: &str, role: Role, process: Option<super::store::ProcessRecord>) {
        let mut from = String::new();
        let promoted = self.update(id, |r| {
            if r.role == Role::Primary || r.process != process {
                return Err(wrong_state(r, "it was promoted already"));
            }
            from = r.peer.take().map(|p| p.daemon).unwrap_or_default();
            if r.role == Role::Standby {
                r.failovers += 1;
            }
            r.role = Role::Primary;
            Ok(())
        });
        if let Err(e) = promoted {
            tracing::error!(vm = %id, "cannot record the VM's promotion: {e}");
            return;
        }
        let (kind, detail) = match role {
            Role::Standby => (
                "failed_over",
                format!("the standby took over from its primary on {from}"),
            ),
            _ => ("migrated_in", format!("the VM arrived from {from}")),
        };
        tracing::info!(vm = %id, "{detail}");
        self.events.send(DaemonEvent::new(id, kind, &detail));
    }

    /// Whether hosted copy `id`'s process said it runs the guest (a copy that ends before the
    /// promotion watcher saw it answer as a VM: a guest that powered off at once). Its facts file
    /// is removed before each start, so this is the word of the current process.
    pub(super) fn promoted_by_facts(&self, id: &str) -> bool {
        crate::vm_facts::read(&self.files(id).facts) == Some(crate::vm_facts::VmFacts::Running)
    }
}

/// `host` as the host part of `HOST:PORT` (IPv6 addresses in brackets).
fn bracketed(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

/// A standby's own disk images, in its directory, of the primary's sizes (sparse: the primary
/// sends their first copy).
fn standby_images(
    dir: &std::path::Path,
    disks: &[DiskConfig],
    sizes: &[u64],
) -> Result<Vec<DiskConfig>, DaemonError> {
    disks
        .iter()
        .zip(sizes)
        .enumerate()
        .map(|(i, (disk, &size))| {
            let path: PathBuf = dir.join(format!("disk{i}.img"));
            // A new file, never one found there (a symbolic link planted in its place included).
            let _ = std::fs::remove_file(&path);
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&path)
                .and_then(|f| f.set_len(size).map(|()| f));
            file.map_err(|e| {
                DaemonError::Internal(format!(
                    "cannot make a {size}-byte standby image {}: {e}",
                    path.display()
                ))
            })?;
            Ok(DiskConfig {
                path,
                readonly: disk.readonly,
            })
        })
        .collect()
}

/// A migration's destination uses the source's disk paths: they must exist here with the sizes
/// the source has (shared storage).
fn shared_disks(disks: &[DiskConfig], sizes: &[u64]) -> Result<(), DaemonError> {
    for (disk, &size) in disks.iter().zip(sizes) {
        let here = std::fs::metadata(&disk.path).map(|m| m.len());
        if here.as_ref().ok() != Some(&size) {
            return Err(DaemonError::Invalid(format!(
                "disk {} is {} here and {size} bytes on the source: a migration through the \
                 daemons needs the disks on storage both hosts see (or protect the VM to this \
                 host and fail over, which copies them)",
                disk.path.display(),
                match here {
                    Ok(n) => format!("{n} bytes"),
                    Err(e) => format!("not readable ({e})"),
                }
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_standby_image_is_a_new_file_whatever_was_planted_there() {
        let dir = std::env::temp_dir().join(format!("ftvmm-standby-images-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let target = dir.join("precious");
        std::fs::write(&target, b"keep").unwrap();
        std::os::unix::fs::symlink(&target, dir.join("disk0.img")).unwrap();
        let disks = [DiskConfig {
            path: "/the/peer's/path".into(),
            readonly: false,
        }];
        let images = standby_images(&dir, &disks, &[1 << 20]).unwrap();
        assert_eq!(images[0].path, dir.join("disk0.img"));
        let made = std::fs::symlink_metadata(&images[0].path).unwrap();
        assert!(made.is_file() && made.len() == 1 << 20);
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn hosts_are_bracketed_when_they_are_v6() {
        assert_eq!(bracketed("10.0.0.1"), "10.0.0.1");
        assert_eq!(bracketed("fd00::1"), "[fd00::1]");
    }
}
