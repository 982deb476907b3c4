//! Whole-VM snapshots: every vCPU, the VM's interrupt controllers and clock, every device, and guest
//! memory, written to a directory; and restoring a new machine from one.
//!
//! A snapshot directory holds `state` (a framed, checksummed blob, see `snapshot::format`) and
//! `memory` (guest RAM, zero pages as holes). Both are written to temporary names and renamed, so
//! a crash mid-snapshot never leaves a directory that looks complete.

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
use crate::snapshot::{self, memory, FormatError};
use crate::vcpu::{VcpuRequest, VcpuState, VcpuStateError};
use crate::vm::{VmState, VmStateError};

/// File holding the encoded machine state.
pub const SNAPSHOT_STATE_FILE: &str = "state";
/// File holding guest memory.
pub const SNAPSHOT_MEMORY_FILE: &str = "memory";

const VCPU_REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything but guest memory.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmSnapshot {
    pub description: MachineDescription,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub serial: UartState,
    pub virtio: Vec<VirtioState>,
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
    /// Replacement disks (same count and order); `None` keeps the snapshot's paths.
    pub disks: Option<Vec<BlockConfig>>,
    /// Replacement TAPs (same count and order); `None` keeps the snapshot's names.
    pub nets: Option<Vec<NetConfig>>,
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
    pub fn snapshot(&mut self, dir: &Path) -> Result<SnapshotInfo, MachineError> {
        let span = tracing::info_span!("snapshot", dir = %dir.display());
        let _guard = span.enter();
        std::fs::create_dir_all(dir).map_err(io_err("create", dir))?;
        let started = !self.vcpu_threads.is_empty();
        let was_paused = self.control.is_paused();
        let t0 = Instant::now();
        if started && !was_paused {
            self.pause()?;
        }
        let result = self.write_snapshot(dir);
        let paused_for = t0.elapsed();
        if started && !was_paused {
            self.resume();
        }
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
            virtio: self
                .transports
                .iter()
                .map(|t| t.lock().unwrap_or_else(|e| e.into_inner()).save_state())
                .collect(),
        })
    }

    fn write_snapshot(&self, dir: &Path) -> Result<u64, MachineError> {
        let state = self.capture_state()?;
        let blob = snapshot::encode(&state).map_err(|source| SnapshotError::Format {
            path: dir.join(SNAPSHOT_STATE_FILE),
            source,
        })?;
        let mem_tmp = dir.join(format!("{SNAPSHOT_MEMORY_FILE}.tmp"));
        let memory_bytes =
            memory::save_memory(&self.memory, &mem_tmp).map_err(io_err("write", &mem_tmp))?;
        let state_tmp = dir.join(format!("{SNAPSHOT_STATE_FILE}.tmp"));
        std::fs::write(&state_tmp, &blob).map_err(io_err("write", &state_tmp))?;
        let mem_final = dir.join(SNAPSHOT_MEMORY_FILE);
        std::fs::rename(&mem_tmp, &mem_final).map_err(io_err("rename", &mem_final))?;
        let state_final = dir.join(SNAPSHOT_STATE_FILE);
        std::fs::rename(&state_tmp, &state_final).map_err(io_err("rename", &state_final))?;
        Ok(memory_bytes)
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
        let mut states = Vec::with_capacity(self.vcpu_count.into());
        for id in 0..self.vcpu_count {
            let (tx, rx) = mpsc::channel();
            self.control
                .send(id, VcpuRequest::SaveState(tx))
                .map_err(|e| SnapshotError::VcpuRequest {
                    id,
                    reason: e.to_string(),
                })?;
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
        let mem_path = dir.join(SNAPSHOT_MEMORY_FILE);
        memory::load_memory(machine.memory_mut(), &mem_path).map_err(io_err("load", &mem_path))?;
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
        })?;
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
        self.finish_vcpu_setup()?;
        self.serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .restore_state(&snap.serial)
            .map_err(MachineError::DeviceState)?;
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
