//! The complete architectural state of one vCPU, captured and restored in the order KVM needs.
//!
//! Capture order follows Firecracker's: MP state first (it can flush pending events into the other
//! state), vCPU events last. Restore sets CPUID first, then MP state, registers, segment and control
//! registers (which carry the APIC base), FPU/XSAVE, XCRs, debug registers, LAPIC, MSRs, and the
//! pending-event state last so nothing set earlier overwrites it.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

/// Errors capturing or restoring vCPU state.
#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    #[error("vCPU {id}: cannot {op} {what}: {source}")]
    Kvm {
        id: u8,
        op: &'static str,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {id}: KVM {op} only {done} of {total} MSRs")]
    PartialMsrs {
        id: u8,
        op: &'static str,
        done: usize,
        total: usize,
    },
    #[error("vCPU {id}: cannot build a list of {what}: {reason}")]
    List {
        id: u8,
        what: &'static str,
        reason: String,
    },
}

/// Everything KVM holds for one vCPU.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u8,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub vcpu_events: kvm_vcpu_events,
    /// Guest TSC frequency, when KVM reports it.
    pub tsc_khz: Option<u32>,
}

/// A KVM MSR list holding `entries`.
fn msr_list(id: u8, entries: &[kvm_msr_entry]) -> Result<Msrs, VcpuStateError> {
    Msrs::from_entries(entries).map_err(|e| VcpuStateError::List {
        id,
        what: "MSRs",
        reason: format!("{e:?}"),
    })
}

/// Entries for reading the MSRs `indices`.
fn msr_queries(indices: &[u32]) -> Vec<kvm_msr_entry> {
    indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect()
}

/// The Hyper-V SynIC and synthetic timer MSRs, in the order they must be restored (the controller,
/// its pages and interrupt sources before the timers that deliver to them; a timer's config before
/// its count). KVM's index list names only SCONTROL and STIMER0_CONFIG of them; a vCPU without
/// Hyper-V enlightenments (`arch/hyperv.rs`) does not get them: a KVM built with Hyper-V emulation
/// lets it read them but refuses to set them while its SynIC is off.
fn hyperv_synic_msrs() -> impl Iterator<Item = u32> {
    const SCONTROL: u32 = 0x4000_0080;
    const SIEFP: u32 = 0x4000_0082;
    const SIMP: u32 = 0x4000_0083;
    const SINT0: u32 = 0x4000_0090;
    const STIMER0_CONFIG: u32 = 0x4000_00b0;
    [SCONTROL, SIEFP, SIMP]
        .into_iter()
        .chain(SINT0..SINT0 + 16)
        .chain(STIMER0_CONFIG..STIMER0_CONFIG + 8)
}

/// The MSRs worth saving: every index KVM lists that this vCPU can actually read, and with
/// `hyperv` (the vCPU has Hyper-V enlightenments and its SynIC on) the SynIC and timer MSRs KVM
/// does not list.
pub fn saveable_msrs(
    kvm: &Kvm,
    fd: &VcpuFd,
    id: u8,
    hyperv: bool,
) -> Result<Vec<u32>, VcpuStateError> {
    let list = kvm
        .get_msr_index_list()
        .map_err(|source| VcpuStateError::Kvm {
            id,
            op: "list",
            what: "MSR indices",
            source,
        })?;
    let synic: Vec<u32> = hyperv_synic_msrs().collect();
    let mut candidates: Vec<u32> = list.as_slice().to_vec();
    if hyperv {
        candidates.retain(|i| !synic.contains(i));
        candidates.extend(&synic);
    }
    let mut readable = Vec::with_capacity(candidates.len());
    // KVM_GET_MSRS stops at the first MSR it cannot read: keep what was read, skip that one, go on.
    while !candidates.is_empty() {
        let mut msrs = msr_list(id, &msr_queries(&candidates))?;
        let n = fd
            .get_msrs(&mut msrs)
            .map_err(|source| VcpuStateError::Kvm {
                id,
                op: "read",
                what: "MSRs",
                source,
            })?;
        readable.extend_from_slice(&candidates[..n]);
        let skip = (n + 1).min(candidates.len());
        candidates.drain(..skip);
    }
    Ok(readable)
}

fn kvm_err(
    id: u8,
    op: &'static str,
    what: &'static str,
) -> impl FnOnce(kvm_ioctls::Error) -> VcpuStateError {
    move |source| VcpuStateError::Kvm {
        id,
        op,
        what,
        source,
    }
}

impl VcpuState {
    /// Captures the state of a vCPU that is not running (its thread is parked or not started).
    pub fn capture(fd: &VcpuFd, id: u8, msr_indices: &[u32]) -> Result<Self, VcpuStateError> {
        let get = |what| kvm_err(id, "read", what);
        let mp_state = fd.get_mp_state().map_err(get("MP state"))?;
        let regs = fd.get_regs().map_err(get("registers"))?;
        let sregs = fd.get_sregs().map_err(get("segment registers"))?;
        let xsave = fd.get_xsave().map_err(get("XSAVE area"))?;
        let xcrs = fd.get_xcrs().map_err(get("XCRs"))?;
        let debug_regs = fd.get_debug_regs().map_err(get("debug registers"))?;
        let lapic = fd.get_lapic().map_err(get("LAPIC"))?;
        let entries = msr_queries(msr_indices);
        let mut msrs = msr_list(id, &entries)?;
        let n = fd.get_msrs(&mut msrs).map_err(get("MSRs"))?;
        if n != entries.len() {
            return Err(VcpuStateError::PartialMsrs {
                id,
                op: "read",
                done: n,
                total: entries.len(),
            });
        }
        let cpuid = fd
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(get("CPUID"))?
            .as_slice()
            .to_vec();
        let tsc_khz = fd.get_tsc_khz().ok();
        let vcpu_events = fd.get_vcpu_events().map_err(get("vCPU events"))?;
        Ok(Self {
            id,
            cpuid,
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debug_regs,
            lapic,
            msrs: msrs.as_slice().to_vec(),
            vcpu_events,
            tsc_khz,
        })
    }

    /// Loads this state into a vCPU that is not running.
    pub fn restore(&self, fd: &VcpuFd) -> Result<(), VcpuStateError> {
        let id = self.id;
        let set = |what| kvm_err(id, "set", what);
        let cpuid = CpuId::from_entries(&self.cpuid).map_err(|e| VcpuStateError::List {
            id,
            what: "CPUID entries",
            reason: format!("{e:?}"),
        })?;
        fd.set_cpuid2(&cpuid).map_err(set("CPUID"))?;
        if let Some(khz) = self.tsc_khz {
            if let Err(e) = fd.set_tsc_khz(khz) {
                tracing::warn!(
                    "vCPU {id}: cannot set the TSC to {khz} kHz ({e}); the guest clock may drift"
                );
            }
        }
        fd.set_mp_state(self.mp_state).map_err(set("MP state"))?;
        fd.set_regs(&self.regs).map_err(set("registers"))?;
        fd.set_sregs(&self.sregs)
            .map_err(set("segment registers"))?;
        // SAFETY: `kvm_xsave` is the legacy 4 KiB XSAVE buffer; ftvmm never enables dynamically
        // sized XSAVE features (AMX), so KVM reads no more than the struct holds.
        unsafe { fd.set_xsave(&self.xsave) }.map_err(set("XSAVE area"))?;
        fd.set_xcrs(&self.xcrs).map_err(set("XCRs"))?;
        fd.set_debug_regs(&self.debug_regs)
            .map_err(set("debug registers"))?;
        fd.set_lapic(&self.lapic).map_err(set("LAPIC"))?;
        let msrs = msr_list(id, &self.msrs)?;
        let n = fd.set_msrs(&msrs).map_err(set("MSRs"))?;
        if n != self.msrs.len() {
            return Err(VcpuStateError::PartialMsrs {
                id,
                op: "set",
                done: n,
                total: self.msrs.len(),
            });
        }
        fd.set_vcpu_events(&self.vcpu_events)
            .map_err(set("vCPU events"))?;
        Ok(())
    }
}
