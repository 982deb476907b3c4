//! CPUID: KVM's supported set, normalised per vCPU (APIC IDs, topology), with user feature masks.
//!
//! A [`CpuFeatures`] list such as `-cx16,-pdpe1gb,+avx2` removes features from what the guest sees
//! (`-name`) or insists that the host offers them (`+name` / `name`, an error otherwise). This is how
//! a CPU template keeps a guest off instructions a host cannot run.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// A CPUID register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// Where a feature flag lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FeatureBit {
    pub name: &'static str,
    pub leaf: u32,
    pub subleaf: u32,
    pub reg: Reg,
    pub bit: u8,
}

const fn f(name: &'static str, leaf: u32, subleaf: u32, reg: Reg, bit: u8) -> FeatureBit {
    FeatureBit {
        name,
        leaf,
        subleaf,
        reg,
        bit,
    }
}

/// Feature flags known by name (Linux's /proc/cpuinfo names).
pub const FEATURES: &[FeatureBit] = &[
    // Leaf 1 EDX.
    f("fpu", 1, 0, Reg::Edx, 0),
    f("tsc", 1, 0, Reg::Edx, 4),
    f("msr", 1, 0, Reg::Edx, 5),
    f("pae", 1, 0, Reg::Edx, 6),
    f("cx8", 1, 0, Reg::Edx, 8),
    f("apic", 1, 0, Reg::Edx, 9),
    f("sep", 1, 0, Reg::Edx, 11),
    f("mtrr", 1, 0, Reg::Edx, 12),
    f("pge", 1, 0, Reg::Edx, 13),
    f("mca", 1, 0, Reg::Edx, 14),
    f("cmov", 1, 0, Reg::Edx, 15),
    f("pat", 1, 0, Reg::Edx, 16),
    f("pse36", 1, 0, Reg::Edx, 17),
    f("clflush", 1, 0, Reg::Edx, 19),
    f("mmx", 1, 0, Reg::Edx, 23),
    f("fxsr", 1, 0, Reg::Edx, 24),
    f("sse", 1, 0, Reg::Edx, 25),
    f("sse2", 1, 0, Reg::Edx, 26),
    f("ht", 1, 0, Reg::Edx, 28),
    // Leaf 1 ECX.
    f("pni", 1, 0, Reg::Ecx, 0),
    f("pclmulqdq", 1, 0, Reg::Ecx, 1),
    f("monitor", 1, 0, Reg::Ecx, 3),
    f("vmx", 1, 0, Reg::Ecx, 5),
    f("ssse3", 1, 0, Reg::Ecx, 9),
    f("fma", 1, 0, Reg::Ecx, 12),
    f("cx16", 1, 0, Reg::Ecx, 13),
    f("pdcm", 1, 0, Reg::Ecx, 15),
    f("pcid", 1, 0, Reg::Ecx, 17),
    f("sse4_1", 1, 0, Reg::Ecx, 19),
    f("sse4_2", 1, 0, Reg::Ecx, 20),
    f("x2apic", 1, 0, Reg::Ecx, 21),
    f("movbe", 1, 0, Reg::Ecx, 22),
    f("popcnt", 1, 0, Reg::Ecx, 23),
    f("tsc_deadline_timer", 1, 0, Reg::Ecx, 24),
    f("aes", 1, 0, Reg::Ecx, 25),
    f("xsave", 1, 0, Reg::Ecx, 26),
    f("avx", 1, 0, Reg::Ecx, 28),
    f("f16c", 1, 0, Reg::Ecx, 29),
    f("rdrand", 1, 0, Reg::Ecx, 30),
    f("hypervisor", 1, 0, Reg::Ecx, 31),
    // Leaf 7 subleaf 0 EBX.
    f("fsgsbase", 7, 0, Reg::Ebx, 0),
    f("bmi1", 7, 0, Reg::Ebx, 3),
    f("hle", 7, 0, Reg::Ebx, 4),
    f("avx2", 7, 0, Reg::Ebx, 5),
    f("smep", 7, 0, Reg::Ebx, 7),
    f("bmi2", 7, 0, Reg::Ebx, 8),
    f("erms", 7, 0, Reg::Ebx, 9),
    f("invpcid", 7, 0, Reg::Ebx, 10),
    f("rtm", 7, 0, Reg::Ebx, 11),
    f("mpx", 7, 0, Reg::Ebx, 14),
    f("avx512f", 7, 0, Reg::Ebx, 16),
    f("avx512dq", 7, 0, Reg::Ebx, 17),
    f("rdseed", 7, 0, Reg::Ebx, 18),
    f("adx", 7, 0, Reg::Ebx, 19),
    f("smap", 7, 0, Reg::Ebx, 20),
    f("clflushopt", 7, 0, Reg::Ebx, 23),
    f("clwb", 7, 0, Reg::Ebx, 24),
    f("avx512cd", 7, 0, Reg::Ebx, 28),
    f("sha_ni", 7, 0, Reg::Ebx, 29),
    f("avx512bw", 7, 0, Reg::Ebx, 30),
    f("avx512vl", 7, 0, Reg::Ebx, 31),
    // Leaf 7 subleaf 0 ECX / EDX.
    f("umip", 7, 0, Reg::Ecx, 2),
    f("pku", 7, 0, Reg::Ecx, 3),
    f("waitpkg", 7, 0, Reg::Ecx, 5),
    f("vaes", 7, 0, Reg::Ecx, 9),
    f("vpclmulqdq", 7, 0, Reg::Ecx, 10),
    f("la57", 7, 0, Reg::Ecx, 16),
    f("rdpid", 7, 0, Reg::Ecx, 22),
    f("md_clear", 7, 0, Reg::Edx, 10),
    f("serialize", 7, 0, Reg::Edx, 14),
    f("arch_capabilities", 7, 0, Reg::Edx, 29),
    // Leaf 0xd subleaf 1 EAX.
    f("xsaveopt", 0xd, 1, Reg::Eax, 0),
    f("xsavec", 0xd, 1, Reg::Eax, 1),
    f("xgetbv1", 0xd, 1, Reg::Eax, 2),
    f("xsaves", 0xd, 1, Reg::Eax, 3),
    // Leaf 0x8000_0001.
    f("lahf_lm", 0x8000_0001, 0, Reg::Ecx, 0),
    f("abm", 0x8000_0001, 0, Reg::Ecx, 5),
    f("3dnowprefetch", 0x8000_0001, 0, Reg::Ecx, 8),
    f("syscall", 0x8000_0001, 0, Reg::Edx, 11),
    f("nx", 0x8000_0001, 0, Reg::Edx, 20),
    f("pdpe1gb", 0x8000_0001, 0, Reg::Edx, 26),
    f("rdtscp", 0x8000_0001, 0, Reg::Edx, 27),
    f("lm", 0x8000_0001, 0, Reg::Edx, 29),
    // KVM paravirtual features (leaf 0x4000_0001 EAX), as Linux's kvm_para.h names them.
    f("kvm_clocksource", 0x4000_0001, 0, Reg::Eax, 0),
    f("kvm_nop_io_delay", 0x4000_0001, 0, Reg::Eax, 1),
    f("kvm_clocksource2", 0x4000_0001, 0, Reg::Eax, 3),
    f("kvm_async_pf", 0x4000_0001, 0, Reg::Eax, 4),
    f("kvm_steal_time", 0x4000_0001, 0, Reg::Eax, 5),
    f("kvm_pv_eoi", 0x4000_0001, 0, Reg::Eax, 6),
    f("kvm_pv_unhalt", 0x4000_0001, 0, Reg::Eax, 7),
    f("kvm_pv_tlb_flush", 0x4000_0001, 0, Reg::Eax, 9),
    f("kvm_async_pf_vmexit", 0x4000_0001, 0, Reg::Eax, 10),
    f("kvm_pv_send_ipi", 0x4000_0001, 0, Reg::Eax, 11),
    f("kvm_poll_control", 0x4000_0001, 0, Reg::Eax, 12),
    f("kvm_pv_sched_yield", 0x4000_0001, 0, Reg::Eax, 13),
    f("kvm_async_pf_int", 0x4000_0001, 0, Reg::Eax, 14),
    f("kvm_msi_ext_dest_id", 0x4000_0001, 0, Reg::Eax, 15),
];

/// Errors in CPU feature lists.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CpuidError {
    #[error("unknown CPU feature {0:?}; known features: {known}", known = known_feature_names())]
    UnknownFeature(String),
    #[error("empty entry in CPU feature list {0:?}")]
    EmptyEntry(String),
    #[error("CPU feature {0:?} was required (+{0}) but this host's KVM does not offer it")]
    NotOffered(&'static str),
}

/// One entry of a feature list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FeatureChange {
    pub feature: FeatureBit,
    /// `true` for `+name` (require), `false` for `-name` (remove).
    pub enable: bool,
}

/// The names [`FEATURES`] knows, comma-separated.
pub fn known_feature_names() -> String {
    FEATURES
        .iter()
        .map(|f| f.name)
        .collect::<Vec<_>>()
        .join(",")
}

/// A parsed `--cpu-features` list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuFeatures(pub Vec<FeatureChange>);

impl std::str::FromStr for CpuFeatures {
    type Err = CpuidError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut changes = Vec::new();
        if s.trim().is_empty() {
            return Ok(Self(changes));
        }
        for item in s.split(',') {
            let item = item.trim();
            let (enable, name) = match item.as_bytes().first() {
                Some(b'-') => (false, &item[1..]),
                Some(b'+') => (true, &item[1..]),
                Some(_) => (true, item),
                None => return Err(CpuidError::EmptyEntry(s.to_string())),
            };
            let name = name.to_ascii_lowercase();
            let feature = FEATURES
                .iter()
                .find(|f| f.name == name)
                .ok_or_else(|| CpuidError::UnknownFeature(name.clone()))?;
            changes.push(FeatureChange {
                feature: *feature,
                enable,
            });
        }
        Ok(Self(changes))
    }
}

impl CpuFeatures {
    /// Appends the changes of `other`.
    pub fn extend(&mut self, other: &CpuFeatures) {
        self.0.extend_from_slice(&other.0);
    }
}

fn reg_mut(entry: &mut kvm_cpuid_entry2, reg: Reg) -> &mut u32 {
    match reg {
        Reg::Eax => &mut entry.eax,
        Reg::Ebx => &mut entry.ebx,
        Reg::Ecx => &mut entry.ecx,
        Reg::Edx => &mut entry.edx,
    }
}

fn find_entry(
    entries: &mut [kvm_cpuid_entry2],
    leaf: u32,
    subleaf: u32,
) -> Option<&mut kvm_cpuid_entry2> {
    entries.iter_mut().find(|e| {
        e.function == leaf
            && (e.index == subleaf || e.flags & kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0)
    })
}

/// Applies a feature list to a CPUID set (the same for every vCPU).
pub fn apply_features(cpuid: &mut CpuId, features: &CpuFeatures) -> Result<(), CpuidError> {
    let entries = cpuid.as_mut_slice();
    for change in &features.0 {
        let fb = change.feature;
        let entry = find_entry(entries, fb.leaf, fb.subleaf);
        match (entry, change.enable) {
            (Some(e), true) => {
                if *reg_mut(e, fb.reg) & (1 << fb.bit) == 0 {
                    return Err(CpuidError::NotOffered(fb.name));
                }
            }
            (None, true) => return Err(CpuidError::NotOffered(fb.name)),
            (Some(e), false) => *reg_mut(e, fb.reg) &= !(1u32 << fb.bit),
            (None, false) => {}
        }
    }
    Ok(())
}

/// The names of the known features ([`FEATURES`]) that `cpuid` offers: a CPU model as both ends of a
/// migration or a protection compare it.
pub fn feature_names(cpuid: &CpuId) -> Vec<String> {
    let entries = cpuid.as_slice();
    FEATURES
        .iter()
        .filter(|fb| {
            entries
                .iter()
                .find(|e| {
                    e.function == fb.leaf
                        && (e.index == fb.subleaf
                            || e.flags & kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0)
                })
                .is_some_and(|e| {
                    let value = match fb.reg {
                        Reg::Eax => e.eax,
                        Reg::Ebx => e.ebx,
                        Reg::Ecx => e.ecx,
                        Reg::Edx => e.edx,
                    };
                    value & (1 << fb.bit) != 0
                })
        })
        .map(|fb| fb.name.to_string())
        .collect()
}

/// The features a guest sees (`guest`) that a host does not offer (`host`), in the guest's order.
pub fn missing_features(guest: &[String], host: &[String]) -> Vec<String> {
    guest
        .iter()
        .filter(|g| !host.contains(g))
        .cloned()
        .collect()
}

/// The features this host's KVM offers guests, less those `restrictions` removes (`-name`: the
/// host's operator keeps guests off them, e.g. to match the other hosts of a cluster).
///
/// Two features are the VMM's and KVM's to give whatever `KVM_GET_SUPPORTED_CPUID` lists: the
/// `hypervisor` bit, which `normalize_for_vcpu` sets for every guest, and the TSC-deadline timer,
/// which an in-kernel local APIC emulates wherever `KVM_CAP_TSC_DEADLINE_TIMER` is offered (older
/// kernels, such as a nested host's, leave both out of the list).
pub fn host_offers(restrictions: &CpuFeatures) -> Result<Vec<String>, String> {
    let kvm = kvm_ioctls::Kvm::new().map_err(|e| format!("/dev/kvm: {e}"))?;
    let mut cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| format!("KVM_GET_SUPPORTED_CPUID: {e}"))?;
    let tsc_deadline = kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer);
    add_vmm_provided(&mut cpuid, tsc_deadline);
    let removals = CpuFeatures(
        restrictions
            .0
            .iter()
            .filter(|c| !c.enable)
            .copied()
            .collect(),
    );
    apply_features(&mut cpuid, &removals).map_err(|e| e.to_string())?;
    Ok(feature_names(&cpuid))
}

/// CPUID leaf 1 ECX: running under a hypervisor (set for every guest by `normalize_for_vcpu`).
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID leaf 1 ECX: the local APIC timer's TSC-deadline mode.
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;

/// Marks in leaf 1 what this VMM gives every guest beyond KVM's list (see `host_offers`).
fn add_vmm_provided(cpuid: &mut CpuId, tsc_deadline: bool) {
    for entry in cpuid.as_mut_slice() {
        if entry.function == 1 {
            entry.ecx |= LEAF1_ECX_HYPERVISOR;
            if tsc_deadline {
                entry.ecx |= LEAF1_ECX_TSC_DEADLINE;
            }
        }
    }
}

/// Number of bits needed to hold `count` distinct IDs.
fn id_bits(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        32 - (count - 1).leading_zeros()
    }
}

/// The extended topology leaves (0xB, and 0x1F when offered) must describe the SMT level, the core
/// level and a terminating invalid level; KVM may offer only some subleaves, and a guest reading a
/// missing one would see a topology without a core level (every vCPU its own package).
fn ensure_topology_subleaves(cpuid: &mut CpuId) {
    for leaf in [0xb, 0x1f] {
        let present: Vec<u32> = cpuid
            .as_slice()
            .iter()
            .filter(|e| e.function == leaf)
            .map(|e| e.index)
            .collect();
        if present.is_empty() {
            continue;
        }
        for index in 0..3 {
            if !present.contains(&index) {
                let entry = kvm_cpuid_entry2 {
                    function: leaf,
                    index,
                    flags: kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                    ..Default::default()
                };
                if let Err(e) = cpuid.push(entry) {
                    tracing::warn!("cannot add CPUID leaf {leaf:#x} subleaf {index}: {e:?}");
                }
            }
        }
    }
}

/// Adapts the common CPUID set to vCPU `vcpu_id` of `vcpu_count`: one socket, one thread per core,
/// `vcpu_count` cores, APIC ID = vCPU index.
pub fn normalize_for_vcpu(cpuid: &mut CpuId, vcpu_id: u8, vcpu_count: u8) {
    ensure_topology_subleaves(cpuid);
    let count = u32::from(vcpu_count);
    let apic_id = u32::from(vcpu_id);
    let core_bits = id_bits(count);
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                entry.ebx = (entry.ebx & 0x0000_ffff) | (apic_id << 24) | ((count & 0xff) << 16);
                // One logical processor per core is reported through the topology leaves; HTT
                // only says that EBX[23:16] is valid.
                if count > 1 {
                    entry.edx |= 1 << 28;
                } else {
                    entry.edx &= !(1 << 28);
                }
                entry.ecx |= LEAF1_ECX_HYPERVISOR;
            }
            4 => {
                // EAX[31:26]: cores per package - 1; EAX[25:14]: threads sharing this cache - 1.
                let cache_level = (entry.eax >> 5) & 0x7;
                let sharing = if cache_level >= 3 {
                    count.saturating_sub(1)
                } else {
                    0
                };
                entry.eax = (entry.eax & 0x3fff)
                    | ((count.saturating_sub(1).min(63)) << 26)
                    | ((sharing & 0xfff) << 14);
            }
            0xb | 0x1f => {
                entry.edx = apic_id;
                match entry.index {
                    0 => {
                        entry.eax = 0;
                        entry.ebx = 1;
                        entry.ecx = 1 << 8; // SMT level
                    }
                    1 => {
                        entry.eax = core_bits;
                        entry.ebx = count;
                        entry.ecx = 1 | (2 << 8); // core level
                    }
                    i => {
                        entry.eax = 0;
                        entry.ebx = 0;
                        entry.ecx = i & 0xff;
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpuid(entries: &[kvm_cpuid_entry2]) -> CpuId {
        CpuId::from_entries(entries).unwrap()
    }

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    #[test]
    fn parses_feature_lists() {
        let f: CpuFeatures = "-cx16, +avx2,popcnt".parse().unwrap();
        assert_eq!(f.0.len(), 3);
        assert_eq!(f.0[0].feature.name, "cx16");
        assert!(!f.0[0].enable);
        assert!(f.0[1].enable && f.0[2].enable);
        assert_eq!("".parse::<CpuFeatures>().unwrap(), CpuFeatures::default());
        assert_eq!(
            "-nosuch".parse::<CpuFeatures>(),
            Err(CpuidError::UnknownFeature("nosuch".into()))
        );
        assert!(matches!(
            "-cx16,,".parse::<CpuFeatures>(),
            Err(CpuidError::EmptyEntry(_))
        ));
    }

    #[test]
    fn removes_and_requires_features() {
        let mut e1 = entry(1, 0);
        e1.ecx = (1 << 13) | (1 << 23);
        let mut c = cpuid(&[e1]);
        apply_features(&mut c, &"-cx16,+popcnt".parse().unwrap()).unwrap();
        assert_eq!(c.as_slice()[0].ecx, 1 << 23);
        assert_eq!(
            apply_features(&mut c, &"+cx16".parse().unwrap()),
            Err(CpuidError::NotOffered("cx16"))
        );
        assert_eq!(
            apply_features(&mut c, &"+avx2".parse().unwrap()),
            Err(CpuidError::NotOffered("avx2"))
        );
    }

    #[test]
    fn topology_names_each_vcpu() {
        let mut b0 = entry(0xb, 0);
        b0.flags = kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
        let mut b1 = entry(0xb, 1);
        b1.flags = kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
        let mut c = cpuid(&[entry(1, 0), b0, b1]);
        normalize_for_vcpu(&mut c, 5, 8);
        let s = c.as_slice();
        assert_eq!(s[0].ebx >> 24, 5);
        assert_eq!((s[0].ebx >> 16) & 0xff, 8);
        assert_ne!(s[0].ecx & (1 << 31), 0);
        assert_eq!(s[1].edx, 5);
        assert_eq!(s[2].eax, 3);
        assert_eq!(s[2].ebx, 8);
    }

    #[test]
    fn missing_topology_subleaves_are_added() {
        let mut b0 = entry(0xb, 0);
        b0.flags = kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
        let mut c = cpuid(&[entry(1, 0), b0]);
        normalize_for_vcpu(&mut c, 1, 2);
        let leaf_b: Vec<_> = c.as_slice().iter().filter(|e| e.function == 0xb).collect();
        assert_eq!(leaf_b.len(), 3);
        let core = leaf_b.iter().find(|e| e.index == 1).unwrap();
        assert_eq!((core.eax, core.ebx, (core.ecx >> 8) & 0xff), (1, 2, 2));
        let end = leaf_b.iter().find(|e| e.index == 2).unwrap();
        assert_eq!((end.ecx >> 8) & 0xff, 0);
        assert!(leaf_b.iter().all(|e| e.edx == 1));
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(3), 2);
        assert_eq!(id_bits(8), 3);
        assert_eq!(id_bits(9), 4);
    }

    #[test]
    fn a_host_offers_what_the_vmm_gives_every_guest() {
        let names = |c: &CpuId| feature_names(c);
        let mut kvm_list = cpuid(&[entry(1, 0)]);
        add_vmm_provided(&mut kvm_list, false);
        assert!(names(&kvm_list).contains(&"hypervisor".to_string()));
        assert!(!names(&kvm_list).contains(&"tsc_deadline_timer".to_string()));
        add_vmm_provided(&mut kvm_list, true);
        assert!(names(&kvm_list).contains(&"tsc_deadline_timer".to_string()));
    }
}
