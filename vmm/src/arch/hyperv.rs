//! Hyper-V enlightenments (`--hyperv on|only`): the paravirtual interfaces Windows guests expect
//! from a hypervisor, which KVM implements itself (TLFS: hypercall page, VP index, partition
//! reference counter and reference TSC page, synthetic interrupt controller and timers, APIC access
//! MSRs, relaxed timing). ftvmm only decides what the guest is told: it asks KVM which Hyper-V CPUID
//! leaves it supports (`KVM_GET_SUPPORTED_HV_CPUID`), keeps the enlightenments listed below, puts
//! them at 0x40000000 and turns the synthetic interrupt controller on in each vCPU.
//!
//! `on` moves KVM's own leaves to 0x40000100, as QEMU does: Windows finds Hyper-V at 0x40000000, and
//! Linux, which prefers KVM when it finds both, keeps its KVM clock and PV features. `only` hides
//! KVM's leaves, so Linux too runs as a Hyper-V guest (its "Hyper-V: privilege flags" line shows
//! what it was given).

use kvm_bindings::{kvm_cpuid2, kvm_cpuid_entry2, kvm_enable_cap, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};
use vmm_sys_util::ioctl::ioctl_with_mut_ptr;
use vmm_sys_util::ioctl_iowr_nr;

const KVMIO: u32 = 0xAE;
ioctl_iowr_nr!(KVM_GET_SUPPORTED_HV_CPUID, KVMIO, 0xc1, kvm_cpuid2);

/// The Hyper-V leaves.
const HV_BASE: u32 = 0x4000_0000;
const HV_FEATURES: u32 = 0x4000_0003;
const HV_RECOMMENDATIONS: u32 = 0x4000_0004;
const HV_LAST: u32 = 0x4000_000a;
/// Where KVM's own leaves go when both are offered.
const KVM_MOVED_BASE: u32 = 0x4000_0100;

/// Partition privileges (0x40000003 EAX) offered.
mod privilege {
    /// HV_X64_MSR_TIME_REF_COUNT: the partition reference counter.
    pub const TIME_REF_COUNT: u32 = 1 << 1;
    /// The synthetic interrupt controller's MSRs.
    pub const SYNIC: u32 = 1 << 2;
    /// The synthetic timers' MSRs.
    pub const STIMER: u32 = 1 << 3;
    /// APIC access MSRs (EOI, ICR, TPR): "vapic".
    pub const APIC_ACCESS: u32 = 1 << 4;
    /// The hypercall MSRs (guest OS id, hypercall page).
    pub const HYPERCALL: u32 = 1 << 5;
    /// The VP index MSR.
    pub const VP_INDEX: u32 = 1 << 6;
    /// The reference TSC page.
    pub const REFERENCE_TSC: u32 = 1 << 9;
    /// The TSC and APIC timer frequency MSRs: a guest that trusts no other clock source (no PIT,
    /// HPET or PM timer to calibrate against) reads its frequencies here.
    pub const FREQUENCY: u32 = 1 << 11;
    pub const OFFERED: u32 = TIME_REF_COUNT
        | FREQUENCY
        | SYNIC
        | STIMER
        | APIC_ACCESS
        | HYPERCALL
        | VP_INDEX
        | REFERENCE_TSC;
}

/// Recommendations (0x40000004 EAX) given.
mod recommendation {
    /// Use the APIC access MSRs rather than the memory-mapped APIC.
    pub const APIC_ACCESS: u32 = 1 << 3;
    /// Relaxed timing: no watchdog timeouts for a vCPU that is descheduled.
    pub const RELAXED_TIMING: u32 = 1 << 5;
    pub const OFFERED: u32 = APIC_ACCESS | RELAXED_TIMING;
}

/// Features (0x40000003 EDX) offered: the frequency MSRs and direct-mode synthetic timers.
const FEATURES_EDX_OFFERED: u32 = 1 << 8 | 1 << 19;
/// Partition flags (0x40000003 EBX) offered with the SynIC: post messages, signal events.
const FLAGS_EBX_OFFERED: u32 = 1 << 4 | 1 << 5;

/// Whether the guest is offered Hyper-V enlightenments.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HypervMode {
    /// KVM's own leaves only.
    #[default]
    Off,
    /// Hyper-V's at 0x40000000, KVM's at 0x40000100.
    On,
    /// Hyper-V's only.
    Only,
}

impl std::str::FromStr for HypervMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "off" => Ok(Self::Off),
            "on" => Ok(Self::On),
            "only" => Ok(Self::Only),
            other => Err(format!("{other:?}: expected on, only or off")),
        }
    }
}

/// Errors offering the enlightenments.
#[derive(Debug, thiserror::Error)]
pub enum HypervError {
    #[error("this host's KVM does not offer Hyper-V enlightenments (no KVM_CAP_HYPERV_CPUID)")]
    Unsupported,
    #[error("KVM_GET_SUPPORTED_HV_CPUID failed: {0}")]
    Query(std::io::Error),
    #[error("KVM's Hyper-V leaves lack their base leaf 0x40000000")]
    NoBaseLeaf,
    #[error("cannot build the CPUID set: {0}")]
    Cpuid(String),
    #[error("vCPU {id}: cannot turn on the synthetic interrupt controller: {source}")]
    Synic { id: u8, source: kvm_ioctls::Error },
}

/// KVM's Hyper-V CPUID leaves, asked through `vcpu`.
pub fn supported_leaves(kvm: &Kvm, vcpu: &VcpuFd) -> Result<Vec<kvm_cpuid_entry2>, HypervError> {
    if kvm.check_extension_raw(u64::from(kvm_bindings::KVM_CAP_HYPERV_CPUID)) <= 0 {
        return Err(HypervError::Unsupported);
    }
    let mut cpuid =
        CpuId::new(KVM_MAX_CPUID_ENTRIES).map_err(|e| HypervError::Cpuid(format!("{e:?}")))?;
    // SAFETY: the ioctl fills at most `nent` entries of the kvm_cpuid2 the wrapper owns, whose
    // `nent` says how many it has room for; the fd is a live vCPU.
    let ret = unsafe {
        ioctl_with_mut_ptr(
            vcpu,
            KVM_GET_SUPPORTED_HV_CPUID(),
            cpuid.as_mut_fam_struct_ptr(),
        )
    };
    if ret < 0 {
        return Err(HypervError::Query(std::io::Error::last_os_error()));
    }
    Ok(cpuid.as_slice().to_vec())
}

/// Puts the offered Hyper-V leaves (from KVM's `hv`) into `cpuid` as `mode` says; whether the
/// vCPUs need the SynIC turned on.
pub fn install(
    cpuid: &mut CpuId,
    hv: &[kvm_cpuid_entry2],
    mode: HypervMode,
) -> Result<bool, HypervError> {
    if mode == HypervMode::Off {
        return Ok(false);
    }
    // KVM names itself ("Linux KVM Hv"); guests look for Microsoft's vendor id, as QEMU gives it.
    if !hv.iter().any(|e| e.function == HV_BASE) {
        return Err(HypervError::NoBaseLeaf);
    }
    let hypervisor_range = HV_BASE..=HV_BASE + 0xff;
    let mut entries: Vec<kvm_cpuid_entry2> = cpuid
        .as_slice()
        .iter()
        .filter(|e| !hypervisor_range.contains(&e.function))
        .copied()
        .collect();
    let mut synic = false;
    let mut last = HV_BASE;
    for entry in hv
        .iter()
        .filter(|e| (HV_BASE..=HV_LAST).contains(&e.function))
    {
        let mut e = *entry;
        match e.function {
            HV_FEATURES => {
                e.eax &= privilege::OFFERED;
                synic = e.eax & privilege::SYNIC != 0;
                e.ebx &= if synic { FLAGS_EBX_OFFERED } else { 0 };
                e.ecx = 0;
                e.edx &= FEATURES_EDX_OFFERED;
            }
            HV_RECOMMENDATIONS => e.eax &= recommendation::OFFERED,
            // Nested virtualisation (enlightened VMCS) and the implementation's own limits beyond
            // these are not offered.
            0x4000_0007..=HV_LAST => (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0),
            _ => {}
        }
        last = last.max(e.function);
        entries.push(e);
    }
    if let Some(base) = entries.iter_mut().find(|e| e.function == HV_BASE) {
        base.eax = last;
        [base.ebx, base.ecx, base.edx] = signature_words(b"Microsoft Hv");
    }
    if mode == HypervMode::On {
        let kvm_leaves: Vec<kvm_cpuid_entry2> = cpuid
            .as_slice()
            .iter()
            .filter(|e| hypervisor_range.contains(&e.function))
            .map(|e| kvm_cpuid_entry2 {
                function: e.function - HV_BASE + KVM_MOVED_BASE,
                ..*e
            })
            .collect();
        let kvm_last = kvm_leaves.iter().map(|e| e.function).max();
        for mut e in kvm_leaves {
            if e.function == KVM_MOVED_BASE {
                e.eax = kvm_last.unwrap_or(KVM_MOVED_BASE);
            }
            entries.push(e);
        }
    }
    *cpuid = CpuId::from_entries(&entries).map_err(|e| HypervError::Cpuid(format!("{e:?}")))?;
    Ok(synic)
}

/// Turns the synthetic interrupt controller on in vCPU `id` (before its MSRs are set, on a
/// restore too).
pub fn enable_synic(vcpu: &VcpuFd, id: u8) -> Result<(), HypervError> {
    let cap = kvm_enable_cap {
        cap: kvm_bindings::KVM_CAP_HYPERV_SYNIC2,
        ..Default::default()
    };
    vcpu.enable_cap(&cap)
        .map_err(|source| HypervError::Synic { id, source })
}

/// Whether `cpuid` offers the SynIC (a restored vCPU's own CPUID says so).
pub fn offers_synic(cpuid: &CpuId) -> bool {
    cpuid
        .as_slice()
        .iter()
        .any(|e| e.function == HV_FEATURES && e.eax & privilege::SYNIC != 0)
        && cpuid.as_slice().iter().any(|e| {
            e.function == HV_BASE && [e.ebx, e.ecx, e.edx] == signature_words(b"Microsoft Hv")
        })
}

fn signature_words(s: &[u8; 12]) -> [u32; 3] {
    let w = |i: usize| u32::from_le_bytes([s[i], s[i + 1], s[i + 2], s[i + 3]]);
    [w(0), w(4), w(8)]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    fn base_cpuid() -> CpuId {
        let [b, c, d] = signature_words(b"KVMKVMKVM\0\0\0");
        CpuId::from_entries(&[
            leaf(0, 0xd, 0, 0, 0),
            leaf(HV_BASE, 0x4000_0001, b, c, d),
            leaf(0x4000_0001, 0x1234, 0, 0, 0),
        ])
        .unwrap()
    }

    fn kvm_hv_leaves() -> Vec<kvm_cpuid_entry2> {
        let [b, c, d] = signature_words(b"Linux KVM Hv");
        vec![
            leaf(HV_BASE, 0x4000_000a, b, c, d),
            leaf(0x4000_0001, 0x3123_7648, 0, 0, 0),
            leaf(
                HV_FEATURES,
                0xffff_ffff,
                0xffff_ffff,
                0xffff_ffff,
                0xffff_ffff,
            ),
            leaf(HV_RECOMMENDATIONS, 0xffff_ffff, 0xffff_ffff, 0, 0),
            leaf(0x4000_000a, 0xff, 0xff, 0xff, 0xff),
        ]
    }

    fn find(cpuid: &CpuId, function: u32) -> Option<kvm_cpuid_entry2> {
        cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == function)
            .copied()
    }

    #[test]
    fn on_puts_hyper_v_first_and_moves_kvms_leaves() {
        let mut cpuid = base_cpuid();
        assert!(install(&mut cpuid, &kvm_hv_leaves(), HypervMode::On).unwrap());
        let base = find(&cpuid, HV_BASE).unwrap();
        assert_eq!(
            [base.ebx, base.ecx, base.edx],
            signature_words(b"Microsoft Hv")
        );
        assert_eq!(base.eax, 0x4000_000a);
        let features = find(&cpuid, HV_FEATURES).unwrap();
        assert_eq!(features.eax, privilege::OFFERED);
        assert_eq!(features.ebx, FLAGS_EBX_OFFERED);
        assert_eq!((features.ecx, features.edx), (0, FEATURES_EDX_OFFERED));
        assert_eq!(
            find(&cpuid, HV_RECOMMENDATIONS).unwrap().eax,
            recommendation::OFFERED
        );
        assert_eq!(
            find(&cpuid, 0x4000_000a).unwrap().eax,
            0,
            "no nested features"
        );
        let moved = find(&cpuid, KVM_MOVED_BASE).unwrap();
        assert_eq!(moved.eax, 0x4000_0101);
        assert_eq!(find(&cpuid, 0x4000_0101).unwrap().eax, 0x1234);
        assert!(find(&cpuid, 0).is_some());
        assert!(offers_synic(&cpuid));
    }

    #[test]
    fn only_hides_kvm_and_off_changes_nothing() {
        let mut cpuid = base_cpuid();
        install(&mut cpuid, &kvm_hv_leaves(), HypervMode::Only).unwrap();
        assert!(find(&cpuid, KVM_MOVED_BASE).is_none());
        assert_eq!(find(&cpuid, 0x4000_0001).unwrap().eax, 0x3123_7648, "Hv#1");
        let mut cpuid = base_cpuid();
        assert!(!install(&mut cpuid, &kvm_hv_leaves(), HypervMode::Off).unwrap());
        assert_eq!(cpuid.as_slice(), base_cpuid().as_slice());
        assert!(!offers_synic(&cpuid));
    }

    #[test]
    fn leaves_without_their_base_are_refused() {
        let mut cpuid = base_cpuid();
        let mut hv = kvm_hv_leaves();
        hv.remove(0);
        assert!(matches!(
            install(&mut cpuid, &hv, HypervMode::On),
            Err(HypervError::NoBaseLeaf)
        ));
        assert_eq!("only".parse::<HypervMode>(), Ok(HypervMode::Only));
        assert!("yes".parse::<HypervMode>().is_err());
    }
}
