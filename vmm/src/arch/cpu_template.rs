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
                  and no hypercalls: a ring-0 vmcall never completes there)",
    features: "-cx16,-pdpe1gb,-xsave,-smap,-popcnt,-kvm_pv_send_ipi,-kvm_pv_sched_yield,-kvm_pv_unhalt",
    cmdline: "noxsave clearcpuid=popcnt,smap,pdpe1gb",
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

    /// `cmdline` with the template's additions (those already present are not repeated).
    pub fn extend_cmdline(&self, cmdline: &str) -> String {
        let mut out = cmdline.trim().to_string();
        for word in self.cmdline.split_whitespace() {
            if !cmdline.split_whitespace().any(|w| w == word) {
                if !out.is_empty() {
                    out.push(' ');
                }
                out.push_str(word);
            }
        }
        out
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
        let c = t.extend_cmdline("console=ttyS0 noxsave");
        assert_eq!(c, "console=ttyS0 noxsave clearcpuid=popcnt,smap,pdpe1gb");
        assert_eq!(
            t.extend_cmdline(""),
            "noxsave clearcpuid=popcnt,smap,pdpe1gb"
        );
    }
}
