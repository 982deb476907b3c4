//! CPU templates: named sets of CPUID changes plus kernel command-line additions that keep a guest off
//! instructions a host cannot run.
//!
//! `emulated-ring0` is for hosts whose KVM emulates guest kernel mode in software (see DESIGN.md): their
//! emulator fails on `cmpxchg16b`, `xsave`/`xrstor`, `clac`/`stac`, `popcnt` and 1 GiB pages, and a
//! `vmcall` from guest ring 0 never completes (measured: a Linux AP hangs in the PV send-IPI
//! hypercall), so the KVM paravirtual features that work by hypercall are hidden too. CPUID bits
//! are masked where the host honours the mask (CX16, PDPE1GB), and where it does not (XSAVE, SMAP,
//! POPCNT are passed through from the host whatever the VMM says) the Linux command line tells the
//! kernel not to use them. The fallback in [`super::emulate`] completes what still slips through.
//! Nothing here is applied unless asked for: on native KVM no template is needed.

use super::cpuid::{CpuFeatures, CpuidError};

/// A CPU template.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuTemplate {
    pub name: &'static str,
    pub description: &'static str,
    /// `--cpu-features` syntax.
    pub features: &'static str,
    /// Appended to the kernel command line.
    pub cmdline: &'static str,
}

/// The templates ftvmm knows.
pub const TEMPLATES: &[CpuTemplate] = &[CpuTemplate {
    name: "emulated-ring0",
    description: "hosts whose KVM emulates guest ring 0 (no cmpxchg16b, xsave, clac/stac, popcnt, 1 GiB pages, \
                  some SIMD instructions, and no hypercalls: a ring-0 vmcall never completes there)",
    features: "-cx16,-pdpe1gb,-xsave,-smap,-popcnt,-ssse3,-avx,-avx2,-avx512f,\
               -kvm_pv_send_ipi,-kvm_pv_sched_yield,-kvm_pv_unhalt",
    cmdline: "noxsave clearcpuid=popcnt,smap,pdpe1gb,ssse3,avx,avx2,avx512f",
}];

/// Errors choosing a template.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TemplateError {
    #[error("unknown CPU template {0:?}; known: {known}", known = TEMPLATES.iter().map(|t| t.name).collect::<Vec<_>>().join(", "))]
    Unknown(String),
    #[error("CPU template {name}: {source}")]
    Features {
        name: &'static str,
        source: CpuidError,
    },
}

impl std::str::FromStr for CpuTemplate {
    type Err = TemplateError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TEMPLATES
            .iter()
            .find(|t| t.name == s)
            .copied()
            .ok_or_else(|| TemplateError::Unknown(s.to_string()))
    }
}

impl CpuTemplate {
    /// The template's CPUID changes.
    pub fn cpu_features(&self) -> Result<CpuFeatures, TemplateError> {
        self.features
            .parse()
            .map_err(|source| TemplateError::Features {
                name: self.name,
                source,
            })
    }

    /// `cmdline` with the template's additions: words already present are not repeated, and a
    /// `key=a,b` list parameter the user already gave (Linux keeps only the last `clearcpuid=`) gets
    /// the template's values merged into it instead of a second copy.
    pub fn extend_cmdline(&self, cmdline: &str) -> String {
        let mut words: Vec<String> = cmdline.split_whitespace().map(str::to_string).collect();
        for word in self.cmdline.split_whitespace() {
            if words.iter().any(|w| w == word) {
                continue;
            }
            let merged = word.split_once('=').and_then(|(key, values)| {
                let prefix = format!("{key}=");
                let existing = words.iter_mut().find(|w| w.starts_with(&prefix))?;
                let mut list: Vec<String> = existing[prefix.len()..]
                    .split(',')
                    .map(str::to_string)
                    .collect();
                for v in values.split(',') {
                    if !list.iter().any(|x| x == v) {
                        list.push(v.to_string());
                    }
                }
                *existing = format!("{prefix}{}", list.join(","));
                Some(())
            });
            if merged.is_none() {
                words.push(word.to_string());
            }
        }
        words.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_parse_and_their_features_are_valid() {
        for t in TEMPLATES {
            let parsed: CpuTemplate = t.name.parse().unwrap();
            assert!(!parsed.cpu_features().unwrap().0.is_empty());
        }
        assert!(matches!(
            "nope".parse::<CpuTemplate>(),
            Err(TemplateError::Unknown(_))
        ));
    }

    #[test]
    fn cmdline_additions_are_appended_once() {
        let t: CpuTemplate = "emulated-ring0".parse().unwrap();
        let all = "clearcpuid=popcnt,smap,pdpe1gb,ssse3,avx,avx2,avx512f";
        let c = t.extend_cmdline("console=ttyS0 noxsave");
        assert_eq!(c, format!("console=ttyS0 noxsave {all}"));
        assert_eq!(t.extend_cmdline(""), format!("noxsave {all}"));
    }

    #[test]
    fn list_parameters_are_merged_not_repeated() {
        let t: CpuTemplate = "emulated-ring0".parse().unwrap();
        let c = t.extend_cmdline("clearcpuid=erms,popcnt console=ttyS0");
        assert_eq!(
            c,
            "clearcpuid=erms,popcnt,smap,pdpe1gb,ssse3,avx,avx2,avx512f console=ttyS0 noxsave"
        );
    }
}
