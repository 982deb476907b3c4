//! Whole-VM snapshots: every vCPU, the VM's interrupt controllers and clock, every device, and guest
//! memory, written to a directory; and restoring a new machine from one.
//!
//! A snapshot directory holds `state` (a framed, checksummed blob, see `snapshot::format`) and
//! `memory` (guest RAM, zero pages as holes). Both are written to temporary names and renamed, so
//! a crash mid-snapshot never leaves a directory that looks complete.

use devices::legacy::CmosState;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use devices::legacy::SerialOutput;
use devices::persist::{UartState, VirtioState};
use devices::virtio::block::BlockConfig;
use devices::virtio::net::{MacAddr, NetConfig};
use serde::{Deserialize, Serialize};

use super::builder::Hardware;
use super::{Machine, MachineDescription, MachineError};
use crate::arch::cpuid::CpuFeatures;
use crate::dirty::{DirtySet, DirtyTracker, RegionDirty};
use crate::snapshot::{self, memory, FormatError};
use crate::vcpu::{VcpuRequest, VcpuState, VcpuStateError};
use crate::vm::{VmState, VmStateError};

/// File holding the encoded machine state.
pub const SNAPSHOT_STATE_FILE: &str = "state";
/// File holding guest memory.
pub const SNAPSHOT_MEMORY_FILE: &str = "memory";
/// In a diff snapshot: the pages it holds (the rest come from its base).
pub const SNAPSHOT_PAGES_FILE: &str = "pages";
/// In a diff snapshot: the path of the snapshot it builds on.
pub const SNAPSHOT_BASE_FILE: &str = "base";
/// Longest chain of diff snapshots followed on restore.
const MAX_DIFF_CHAIN: usize = 64;

/// The pages of a diff snapshot, as stored.
#[derive(Debug, Serialize, Deserialize)]
struct PageSetFile {
    /// (base, length, bitmap) per memory region.
    regions: Vec<(u64, u64, Vec<u64>)>,
}

impl From<&DirtySet> for PageSetFile {
    fn from(set: &DirtySet) -> Self {
        Self {
            regions: set
                .regions
                .iter()
                .map(|r| (r.base.0, r.len, r.bitmap.clone()))
                .collect(),
        }
    }
}

impl From<PageSetFile> for DirtySet {
    fn from(f: PageSetFile) -> Self {
        Self {
            regions: f
                .regions
                .into_iter()
                .map(|(base, len, bitmap)| RegionDirty {
                    base: vm_memory::GuestAddress(base),
                    len,
                    bitmap,
                })
                .collect(),
        }
    }
}

/// Full or diff.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotKind {
    /// All of guest memory.
    Full,
    /// Only pages written since the VM's previous snapshot, which it names as its base.
    Diff,
}

/// Dirty tracking kept since the last snapshot, for the next diff snapshot.
pub(super) struct DiffBase {
    tracker: DirtyTracker,
    last_dir: PathBuf,
}

const VCPU_REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything but guest memory.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmSnapshot {
    pub description: MachineDescription,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub serial: UartState,
    pub virtio: Vec<VirtioState>,
    /// The CMOS RAM and the guest's clock offset.
    pub cmos: CmosState,
    /// The PS/2 controller's command byte and unread replies.
    pub i8042: devices::legacy::I8042State,
    /// A firmware-booted VM's chipset.
    pub q35: Option<super::Q35State>,
}

/// Errors saving or restoring a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("snapshot {path}: {source}")]
    Format { path: PathBuf, source: FormatError },
    #[error(transparent)]
    Vcpu(#[from] VcpuStateError),
    #[error(transparent)]
    Vm(#[from] VmStateError),
    #[error("vCPU {0} did not answer a state request within {VCPU_REPLY_TIMEOUT:?}")]
    VcpuTimeout(u8),
    #[error("cannot reach vCPU {id}: {reason}")]
    VcpuRequest { id: u8, reason: String },
    #[error("virtio device {index}: {reason}")]
    Device { index: usize, reason: String },
    #[error("snapshot does not fit this machine: {0}")]
    Mismatch(String),
    #[error("no base for a diff snapshot: take a full snapshot of this VM first")]
    NoDiffBase,
    #[error("dirty tracking: {0}")]
    Dirty(String),
    #[error("diff snapshot chain from {0} is longer than {MAX_DIFF_CHAIN} or loops")]
    ChainTooLong(PathBuf),
}

/// What a snapshot took.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// How long the vCPUs were paused for it.
    pub paused_for: Duration,
    /// Bytes of non-zero guest memory written.
    pub memory_bytes: u64,
}

/// What may differ between the snapshotted machine and the restored one.
#[derive(Clone, Debug, Default)]
pub struct RestoreOptions {
    pub serial: Option<SerialOutput>,
    /// Features this host keeps guests off (`-name` entries; `--cpu-features` of a receiver): a
    /// guest that sees one is refused, as one that sees a feature this host's KVM lacks.
    pub withheld_cpu: CpuFeatures,
    /// Replacement disks (same count and order); `None` keeps the snapshot's paths.
    pub disks: Option<Vec<BlockConfig>>,
    /// Replacement TAPs (same count and order); `None` keeps the snapshot's names.
    pub nets: Option<Vec<NetConfig>>,
    /// This host's UEFI firmware image for a firmware-booted guest (checked against the one the
    /// guest started from by its CRC32C); `None` keeps the snapshot's path.
    pub firmware: Option<PathBuf>,
}

fn io_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

impl Machine {
    /// Writes a full snapshot of the running (or not yet started) VM to `dir`. The vCPUs are paused
    /// for the duration and resumed afterwards unless they were already paused. Must be called from
    /// the thread that runs the event loop, so devices are idle.
    pub fn snapshot(
        &mut self,
        dir: &Path,
        kind: SnapshotKind,
    ) -> Result<SnapshotInfo, MachineError> {
        let span = tracing::info_span!("snapshot", dir = %dir.display());
        let _guard = span.enter();
        // A snapshot tracks dirty pages for the next diff: never while another user does.
        if let Some(held_by) = self.dirty_ownership.holder() {
            return Err(MachineError::DirtyTrackingBusy {
                held_by,
                wanted: "a snapshot",
            });
        }
        snapshot::create_private_dir(dir).map_err(io_err("create", dir))?;
        let t0 = Instant::now();
        let result = self.while_paused(|m| m.write_snapshot(dir, kind));
        let paused_for = t0.elapsed();
        let memory_bytes = result?;
        tracing::info!(
            paused_ms = paused_for.as_secs_f64() * 1e3,
            memory_bytes,
            "snapshot written"
        );
        Ok(SnapshotInfo {
            paused_for,
            memory_bytes,
        })
    }

    /// Captures everything but guest memory. The vCPUs must be paused (or not started) and the
    /// caller on the event-loop thread, so nothing moves underneath.
    pub fn capture_state(&self) -> Result<VmSnapshot, MachineError> {
        Ok(VmSnapshot {
            description: self.description.clone(),
            vm: self.vm.save_state().map_err(SnapshotError::from)?,
            vcpus: self.save_vcpus()?,
            serial: self
                .serial
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .save_state(),
            virtio: match &self.q35 {
                Some(q35) => q35.virtio_states(),
                None => self
                    .transports
                    .iter()
                    .map(|t| t.lock().unwrap_or_else(|e| e.into_inner()).save_state())
                    .collect(),
            },
            q35: self.q35.as_ref().map(|q35| q35.state()),
            cmos: self.cmos.lock().unwrap_or_else(|e| e.into_inner()).state(),
            i8042: self.i8042.lock().unwrap_or_else(|e| e.into_inner()).state(),
        })
    }

    fn write_snapshot(&mut self, dir: &Path, kind: SnapshotKind) -> Result<u64, MachineError> {
        let state = self.capture_state()?;
        if kind == SnapshotKind::Diff {
            return self.write_diff(dir, &state);
        }
        let blob = snapshot::encode(&state).map_err(|source| SnapshotError::Format {
            path: dir.join(SNAPSHOT_STATE_FILE),
            source,
        })?;
        let mem_tmp = dir.join(format!("{SNAPSHOT_MEMORY_FILE}.tmp"));
        let memory_bytes =
            memory::save_memory(&self.memory, &mem_tmp).map_err(io_err("write", &mem_tmp))?;
        let state_tmp = dir.join(format!("{SNAPSHOT_STATE_FILE}.tmp"));
        snapshot::write_private(&state_tmp, &blob).map_err(io_err("write", &state_tmp))?;
        let mem_final = dir.join(SNAPSHOT_MEMORY_FILE);
        std::fs::rename(&mem_tmp, &mem_final).map_err(io_err("rename", &mem_final))?;
        let state_final = dir.join(SNAPSHOT_STATE_FILE);
        std::fs::rename(&state_tmp, &state_final).map_err(io_err("rename", &state_final))?;
        // From this full snapshot on, track writes for the next diff (still paused: nothing is missed).
        let mut tracker = self.dirty_tracker();
        tracker
            .start(&self.vm, &self.memory)
            .map_err(|e| SnapshotError::Dirty(e.to_string()))?;
        self.diff_base = Some(DiffBase {
            tracker,
            last_dir: absolute(dir),
        });
        Ok(memory_bytes)
    }

    fn write_diff(&mut self, dir: &Path, state: &VmSnapshot) -> Result<u64, MachineError> {
        let base = self.diff_base.as_mut().ok_or(SnapshotError::NoDiffBase)?;
        base.tracker
            .collect(&self.vm, &self.memory)
            .map_err(|e| SnapshotError::Dirty(e.to_string()))?;
        let set = base.tracker.take();
        let result = (|| -> Result<u64, SnapshotError> {
            let blob = snapshot::encode(state).map_err(|source| SnapshotError::Format {
                path: dir.join(SNAPSHOT_STATE_FILE),
                source,
            })?;
            let pages = snapshot::encode(&PageSetFile::from(&set)).map_err(|source| {
                SnapshotError::Format {
                    path: dir.join(SNAPSHOT_PAGES_FILE),
                    source,
                }
            })?;
            let mem_path = dir.join(SNAPSHOT_MEMORY_FILE);
            let bytes = memory::save_pages(&self.memory, &set, &mem_path)
                .map_err(io_err("write", &mem_path))?;
            for (name, data) in [
                (SNAPSHOT_PAGES_FILE, pages),
                (
                    SNAPSHOT_BASE_FILE,
                    base.last_dir.as_os_str().as_encoded_bytes().to_vec(),
                ),
            ] {
                let p = dir.join(name);
                snapshot::write_private(&p, &data).map_err(io_err("write", &p))?;
            }
            // The state file last: a directory without it is not a snapshot.
            let state_tmp = dir.join(format!("{SNAPSHOT_STATE_FILE}.tmp"));
            snapshot::write_private(&state_tmp, &blob).map_err(io_err("write", &state_tmp))?;
            let state_final = dir.join(SNAPSHOT_STATE_FILE);
            std::fs::rename(&state_tmp, &state_final).map_err(io_err("rename", &state_final))?;
            Ok(bytes)
        })();
        match result {
            Ok(bytes) => {
                base.last_dir = absolute(dir);
                Ok(bytes)
            }
            Err(e) => {
                // Those pages must go into the next diff.
                base.tracker.fold_back(&set);
                Err(e.into())
            }
        }
    }

    /// Forgets the diff base (another user of dirty tracking, such as migration, takes over the
    /// logs); the next snapshot must be full.
    pub fn invalidate_diff_base(&mut self) {
        if let Some(mut base) = self.diff_base.take() {
            let _ = base.tracker.stop(&self.vm, &self.memory);
        }
    }

    /// Captures every vCPU's state: through the parked vCPU threads when running, directly otherwise.
    pub fn save_vcpus(&self) -> Result<Vec<VcpuState>, MachineError> {
        if self.vcpu_threads.is_empty() {
            return Ok(self
                .unstarted
                .iter()
                .map(|v| v.save_state())
                .collect::<Result<_, _>>()
                .map_err(SnapshotError::from)?);
        }
        // Every parked vCPU thread is asked at once and saves its own state in parallel; the
        // replies are then taken in vCPU order.
        let mut replies = Vec::with_capacity(self.vcpu_count.into());
        for id in 0..self.vcpu_count {
            let (tx, rx) = mpsc::channel();
            self.control
                .send(id, VcpuRequest::SaveState(tx))
                .map_err(|e| SnapshotError::VcpuRequest {
                    id,
                    reason: e.to_string(),
                })?;
            replies.push(rx);
        }
        let mut states = Vec::with_capacity(self.vcpu_count.into());
        for (id, rx) in (0..self.vcpu_count).zip(replies) {
            let state = rx
                .recv_timeout(VCPU_REPLY_TIMEOUT)
                .map_err(|_| SnapshotError::VcpuTimeout(id))?
                .map_err(SnapshotError::from)?;
            states.push(state);
        }
        Ok(states)
    }

    /// Builds a machine from the snapshot in `dir`, ready to [`Machine::start`].
    pub fn restore(dir: &Path, options: &RestoreOptions) -> Result<Self, MachineError> {
        let span = tracing::info_span!("restore", dir = %dir.display());
        let _guard = span.enter();
        let state_path = dir.join(SNAPSHOT_STATE_FILE);
        let blob = std::fs::read(&state_path).map_err(io_err("read", &state_path))?;
        let snap: VmSnapshot = snapshot::decode(&blob).map_err(|source| SnapshotError::Format {
            path: state_path.clone(),
            source,
        })?;
        let mut machine = Self::assemble_for_restore(&snap.description, options)?;
        load_memory_chain(machine.memory_mut(), dir, 0)?;
        machine.apply_state(&snap)?;
        tracing::info!("machine restored");
        Ok(machine)
    }

    /// Creates the virtual hardware `description` names (with `options`' backends), with zeroed
    /// memory and nothing restored yet: fill memory, then call [`Machine::apply_state`].
    pub fn assemble_for_restore(
        description: &MachineDescription,
        options: &RestoreOptions,
    ) -> Result<Self, MachineError> {
        let d = description;
        // The guest must be able to run here: every CPU feature it sees offered by this host.
        if !d.cpu_features.is_empty() {
            let host = crate::arch::cpuid::host_offers(&options.withheld_cpu)
                .map_err(SnapshotError::Mismatch)?;
            let missing = crate::arch::cpuid::missing_features(&d.cpu_features, &host);
            if !missing.is_empty() {
                return Err(SnapshotError::Mismatch(format!(
                    "this host cannot run the guest's CPU: the guest sees {}, which this host does \
                     not offer (give the guest a CPU model both hosts offer: --cpu-features or \
                     --cpu-template on its first host)",
                    missing.join(",")
                ))
                .into());
            }
        }
        let disks = match &options.disks {
            Some(disks) if disks.len() != d.disks.len() => {
                return Err(SnapshotError::Mismatch(format!(
                    "the snapshot has {} disks, {} given",
                    d.disks.len(),
                    disks.len()
                ))
                .into())
            }
            Some(disks) => disks.clone(),
            None => d
                .disks
                .iter()
                .map(|x| BlockConfig {
                    path: x.path.clone(),
                    read_only: x.read_only,
                })
                .collect(),
        };
        let nets = match &options.nets {
            Some(nets) if nets.len() != d.nets.len() => {
                return Err(SnapshotError::Mismatch(format!(
                    "the snapshot has {} network interfaces, {} given",
                    d.nets.len(),
                    nets.len()
                ))
                .into())
            }
            Some(nets) => nets.clone(),
            None => d
                .nets
                .iter()
                .map(|x| NetConfig {
                    tap: x.tap.clone(),
                    mac: Some(MacAddr(x.mac)),
                })
                .collect(),
        };
        let serial = options.serial.clone().unwrap_or(SerialOutput::Stdout);
        let (machine, _cpuid, _devices) = Machine::assemble(&Hardware {
            vcpus: d.vcpus,
            memory_mib: d.memory_mib,
            serial: &serial,
            // The restored vCPUs carry their own CPUID.
            cpu_features: &CpuFeatures::default(),
            disks: &disks,
            nets: &nets,
            dirty_ring: None,
            hyperv: d.hyperv,
            firmware: d
                .firmware
                .as_deref()
                .map(|saved| super::builder::FirmwareBoot {
                    image: options.firmware.as_deref().unwrap_or(saved),
                    kernel: None,
                }),
        })?;
        let mut machine = machine;
        // The restored vCPUs see the CPU model they saw before, not this host's.
        machine.description.cpu_features = d.cpu_features.clone();
        Ok(machine)
    }

    /// Loads vCPU, VM and device state into a machine from [`Machine::assemble_for_restore`] whose
    /// memory already holds the guest's.
    pub fn apply_state(&mut self, snap: &VmSnapshot) -> Result<(), MachineError> {
        let d = &self.description;
        if snap.vcpus.len() != usize::from(d.vcpus)
            || snap.virtio.len() != d.disks.len() + d.nets.len()
        {
            return Err(SnapshotError::Mismatch(format!(
                "{} vCPU states for {} vCPUs, {} virtio states for {} devices",
                snap.vcpus.len(),
                d.vcpus,
                snap.virtio.len(),
                d.disks.len() + d.nets.len()
            ))
            .into());
        }
        self.vm
            .restore_state(&snap.vm)
            .map_err(SnapshotError::from)?;
        for (vcpu, state) in self.unstarted.iter().zip(&snap.vcpus) {
            vcpu.restore_state(state).map_err(SnapshotError::from)?;
        }
        // The snapshot's vCPUs list exactly the MSRs that were readable; no need to probe again.
        self.set_msr_indices(snap.vcpus[0].msrs.iter().map(|m| m.index).collect());
        self.serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .restore_state(&snap.serial)
            .map_err(MachineError::DeviceState)?;
        self.cmos
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .restore_state(&snap.cmos)
            .map_err(MachineError::DeviceState)?;
        self.i8042
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .restore_state(&snap.i8042);
        match (&self.q35, &snap.q35) {
            (Some(q35), Some(state)) => q35.restore(state, &snap.virtio)?,
            (None, None) => {}
            _ => {
                return Err(SnapshotError::Mismatch(
                    "the snapshot and the VM differ in booting through firmware".into(),
                )
                .into())
            }
        }
        for (index, (transport, state)) in self.transports.iter().zip(&snap.virtio).enumerate() {
            transport
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .restore_state(state)
                .map_err(|e| SnapshotError::Device {
                    index,
                    reason: e.to_string(),
                })?;
        }
        Ok(())
    }
}

fn absolute(dir: &Path) -> PathBuf {
    std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf())
}

/// Loads the memory of the snapshot in `dir`: its full memory file, or its base's memory and then
/// its own pages.
fn load_memory_chain(
    mem: &crate::memory::GuestMemory,
    dir: &Path,
    depth: usize,
) -> Result<(), SnapshotError> {
    if depth > MAX_DIFF_CHAIN {
        return Err(SnapshotError::ChainTooLong(dir.to_path_buf()));
    }
    let mem_path = dir.join(SNAPSHOT_MEMORY_FILE);
    let base_path = dir.join(SNAPSHOT_BASE_FILE);
    if !base_path.exists() {
        return memory::load_memory(mem, &mem_path).map_err(io_err("load", &mem_path));
    }
    let base = std::fs::read(&base_path).map_err(io_err("read", &base_path))?;
    // SAFETY-free: the base file holds a path this process wrote; invalid UTF-8 is kept as bytes.
    let base_dir = PathBuf::from(std::ffi::OsString::from(
        String::from_utf8_lossy(&base).into_owned(),
    ));
    load_memory_chain(mem, &base_dir, depth + 1)?;
    let pages_path = dir.join(SNAPSHOT_PAGES_FILE);
    let blob = std::fs::read(&pages_path).map_err(io_err("read", &pages_path))?;
    let pages: PageSetFile = snapshot::decode(&blob).map_err(|source| SnapshotError::Format {
        path: pages_path.clone(),
        source,
    })?;
    memory::load_pages(mem, &DirtySet::from(pages), &mem_path).map_err(io_err("load", &mem_path))
}
