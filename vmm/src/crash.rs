//! Reports of a guest that cannot go on: triple fault, KVM internal or emulation error, failed entry.

use std::fmt;

use kvm_bindings::{kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;

use crate::arch::emulate::{decode_at_rip, format_instruction};
use crate::arch::paging::read_linear;
use crate::memory::GuestMemory;

/// What ended the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CrashKind {
    /// KVM_EXIT_SHUTDOWN: a triple fault.
    TripleFault,
    /// KVM_EXIT_INTERNAL_ERROR, with its sub-error (1 = emulation failure) and data words.
    InternalError { suberror: u32, data: Vec<u64> },
    /// KVM_EXIT_FAIL_ENTRY with its hardware reason.
    FailEntry { reason: u64 },
    /// An exit reason the VMM does not handle.
    UnexpectedExit(String),
    /// `KVM_RUN` itself failed.
    RunFailed(String),
}

impl fmt::Display for CrashKind {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Self::TripleFault => write!(f, "triple fault (KVM_EXIT_SHUTDOWN)"),
            Self::InternalError { suberror, data } => {
                let what = match suberror {
                    1 => "emulation failure",
                    2 => "simultaneous exceptions",
                    3 => "delivery event",
                    4 => "unexpected exit reason",
                    _ => "unknown",
                };
                write!(f, "KVM internal error {suberror} ({what})")?;
                if !data.is_empty() {
                    let words: Vec<String> = data.iter().map(|d| format!("{d:#x}")).collect();
                    write!(f, ", data [{}]", words.join(", "))?;
                }
                Ok(())
            }
            Self::FailEntry { reason } => write!(f, "VM entry failed, hardware reason {reason:#x}"),
            Self::UnexpectedExit(e) => write!(f, "unexpected exit {e}"),
            Self::RunFailed(e) => write!(f, "KVM_RUN failed: {e}"),
        }
    }
}

/// A guest crash with the CPU state needed to understand it.
#[derive(Clone, Debug, PartialEq)]
pub struct CrashReport {
    pub vcpu: u8,
    pub kind: CrashKind,
    pub regs: Option<kvm_regs>,
    pub sregs: Option<kvm_sregs>,
    /// Up to 15 bytes at CS:RIP (fewer if unmapped).
    pub code: Vec<u8>,
    /// The instruction at RIP, decoded (AT&T syntax), when the bytes decode.
    pub instruction: Option<String>,
}

impl CrashReport {
    /// Gathers registers and the instruction bytes at RIP from `vcpu`.
    pub fn capture(vcpu_id: u8, kind: CrashKind, fd: &VcpuFd, mem: &GuestMemory) -> Self {
        let regs = fd.get_regs().ok();
        let sregs = fd.get_sregs().ok();
        let mut code = Vec::new();
        let mut instruction = None;
        if let (Some(r), Some(s)) = (&regs, &sregs) {
            let mut buf = [0u8; 15];
            let n = read_linear(mem, s, s.cs.base.wrapping_add(r.rip), &mut buf);
            code.extend_from_slice(&buf[..n]);
            instruction = decode_at_rip(mem, r, s).map(|i| format_instruction(&i));
        }
        Self {
            vcpu: vcpu_id,
            kind,
            regs,
            sregs,
            code,
            instruction,
        }
    }
}

impl fmt::Display for CrashReport {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        writeln!(f, "guest crashed on vCPU {}: {}", self.vcpu, self.kind)?;
        if let Some(r) = &self.regs {
            writeln!(
                f,
                "  rip={:#018x} rsp={:#018x} rflags={:#x}",
                r.rip, r.rsp, r.rflags
            )?;
            writeln!(
                f,
                "  rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x}",
                r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi
            )?;
        }
        if let Some(s) = &self.sregs {
            writeln!(
                f,
                "  cs={:#x} (cpl {}, {}) cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
                s.cs.selector,
                s.cs.selector & 3,
                if s.cs.l == 1 {
                    "64-bit"
                } else if s.cs.db == 1 {
                    "32-bit"
                } else {
                    "16-bit"
                },
                s.cr0,
                s.cr3,
                s.cr4,
                s.efer
            )?;
        }
        if self.code.is_empty() {
            write!(f, "  code at rip: unavailable")
        } else {
            let hex: Vec<String> = self.code.iter().map(|b| format!("{b:02x}")).collect();
            write!(f, "  code at rip: {}", hex.join(" "))?;
            if let Some(i) = &self.instruction {
                write!(f, " ({i})")?;
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_names_reason_rip_and_bytes() {
        let report = CrashReport {
            vcpu: 1,
            kind: CrashKind::InternalError {
                suberror: 1,
                data: vec![0x10],
            },
            regs: Some(kvm_regs {
                rip: 0x10_0042,
                ..Default::default()
            }),
            sregs: None,
            code: vec![0x0f, 0x01, 0xca],
            instruction: Some("clac".into()),
        };
        let text = report.to_string();
        assert!(text.contains("vCPU 1"));
        assert!(text.contains("emulation failure"));
        assert!(text.contains("rip=0x0000000000100042"));
        assert!(text.contains("0f 01 ca (clac)"));
    }
}
