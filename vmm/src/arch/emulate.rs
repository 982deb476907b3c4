//! Completing, in userspace, the few instructions some hosts' KVM cannot emulate.
//!
//! On native KVM these exits never happen and this code never runs. On hosts whose KVM emulates guest
//! kernel mode (see DESIGN.md), `KVM_EXIT_INTERNAL_ERROR` / emulation failure is reported for a handful
//! of instructions that a stock Linux kernel executes; ftvmm decodes the instruction (iced-x86) and
//! completes it when it knows how: `int3` (advance RIP, inject #BP), `clac`/`stac`, `popcnt`, `fwait`,
//! `ldmxcsr`/`stmxcsr`.
//! Anything else ends the VM with the crash report. A counter per instruction says how often this fired.

use std::sync::atomic::{AtomicU64, Ordering};

use iced_x86::{
    Decoder, DecoderOptions, Formatter, GasFormatter, Instruction, Mnemonic, OpKind, Register,
};
use kvm_bindings::{kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;

use crate::arch::paging::{read_linear, write_linear};
use crate::memory::GuestMemory;

const RFLAGS_CF: u64 = 1 << 0;
const RFLAGS_PF: u64 = 1 << 2;
const RFLAGS_AF: u64 = 1 << 4;
const RFLAGS_ZF: u64 = 1 << 6;
const RFLAGS_SF: u64 = 1 << 7;
const RFLAGS_OF: u64 = 1 << 11;
const RFLAGS_AC: u64 = 1 << 18;
const BP_VECTOR: u8 = 3;

/// The instructions the fallback completes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Completed {
    Int3,
    Clac,
    Stac,
    Popcnt,
    Fwait,
    Ldmxcsr,
    Stmxcsr,
}

const KINDS: [Completed; 7] = [
    Completed::Int3,
    Completed::Clac,
    Completed::Stac,
    Completed::Popcnt,
    Completed::Fwait,
    Completed::Ldmxcsr,
    Completed::Stmxcsr,
];

/// Index of MXCSR in the XSAVE area's 32-bit words (byte offset 24 of the legacy region).
const XSAVE_MXCSR_WORD: usize = 6;
/// MXCSR bits that may be set (the rest are reserved; setting them raises #GP on hardware).
const MXCSR_MASK: u32 = 0xffff;

/// How often each instruction was completed, VM-wide.
#[derive(Debug, Default)]
pub struct EmulationCounters {
    counts: [AtomicU64; KINDS.len()],
}

impl EmulationCounters {
    fn record(&self, kind: Completed) {
        let i = KINDS.iter().position(|k| *k == kind).unwrap_or(0);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
    }

    /// `(instruction, count)` for every instruction completed at least once.
    pub fn snapshot(&self) -> Vec<(Completed, u64)> {
        KINDS
            .iter()
            .zip(&self.counts)
            .map(|(k, c)| (*k, c.load(Ordering::Relaxed)))
            .filter(|(_, c)| *c > 0)
            .collect()
    }

    /// Total completions.
    pub fn total(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

/// Errors talking to KVM while completing an instruction.
#[derive(Debug, thiserror::Error)]
pub enum EmulateError {
    #[error("cannot access vCPU {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> EmulateError {
    move |source| EmulateError::Kvm { what, source }
}

/// The code size of the current CS.
pub fn code_bitness(sregs: &kvm_sregs) -> u32 {
    if sregs.cs.l == 1 {
        64
    } else if sregs.cs.db == 1 {
        32
    } else {
        16
    }
}

/// Decodes the instruction at CS:RIP, if its bytes are readable.
pub fn decode_at_rip(mem: &GuestMemory, regs: &kvm_regs, sregs: &kvm_sregs) -> Option<Instruction> {
    let mut bytes = [0u8; 15];
    let n = read_linear(mem, sregs, sregs.cs.base.wrapping_add(regs.rip), &mut bytes);
    if n == 0 {
        return None;
    }
    let mut decoder = Decoder::with_ip(
        code_bitness(sregs),
        &bytes[..n],
        regs.rip,
        DecoderOptions::NONE,
    );
    let instr = decoder.decode();
    (!instr.is_invalid()).then_some(instr)
}

/// The instruction in AT&T syntax, for reports.
pub fn format_instruction(instr: &Instruction) -> String {
    let mut out = String::new();
    GasFormatter::new().format(instr, &mut out);
    out
}

fn gpr_mut(regs: &mut kvm_regs, full: Register) -> Option<&mut u64> {
    Some(match full {
        Register::RAX => &mut regs.rax,
        Register::RBX => &mut regs.rbx,
        Register::RCX => &mut regs.rcx,
        Register::RDX => &mut regs.rdx,
        Register::RSI => &mut regs.rsi,
        Register::RDI => &mut regs.rdi,
        Register::RSP => &mut regs.rsp,
        Register::RBP => &mut regs.rbp,
        Register::R8 => &mut regs.r8,
        Register::R9 => &mut regs.r9,
        Register::R10 => &mut regs.r10,
        Register::R11 => &mut regs.r11,
        Register::R12 => &mut regs.r12,
        Register::R13 => &mut regs.r13,
        Register::R14 => &mut regs.r14,
        Register::R15 => &mut regs.r15,
        _ => return None,
    })
}

/// The value of a general-purpose register of any width.
fn read_gpr(regs: &kvm_regs, reg: Register) -> Option<u64> {
    let mut copy = *regs;
    let full = *gpr_mut(&mut copy, reg.full_register())?;
    Some(match reg.size() {
        8 => full,
        4 => full & 0xffff_ffff,
        2 => full & 0xffff,
        1 if reg.is_gpr8()
            && matches!(
                reg,
                Register::AH | Register::CH | Register::DH | Register::BH
            ) =>
        {
            (full >> 8) & 0xff
        }
        1 => full & 0xff,
        _ => return None,
    })
}

/// Writes a register with x86-64 semantics (32-bit writes zero-extend, 16-bit ones merge).
fn write_gpr(regs: &mut kvm_regs, reg: Register, value: u64) -> Option<()> {
    let size = reg.size();
    let slot = gpr_mut(regs, reg.full_register())?;
    *slot = match size {
        8 => value,
        4 => value & 0xffff_ffff,
        2 => (*slot & !0xffff) | (value & 0xffff),
        _ => return None,
    };
    Some(())
}

fn segment_base(sregs: &kvm_sregs, reg: Register) -> Option<u64> {
    Some(match reg {
        Register::ES => sregs.es.base,
        Register::CS => sregs.cs.base,
        Register::SS => sregs.ss.base,
        Register::DS => sregs.ds.base,
        Register::FS => sregs.fs.base,
        Register::GS => sregs.gs.base,
        _ => return None,
    })
}

/// The linear address of memory operand `op` of `instr`.
fn operand_address(
    regs: &kvm_regs,
    sregs: &kvm_sregs,
    instr: &Instruction,
    op: u32,
) -> Option<u64> {
    instr.virtual_address(op, 0, |reg, _, _| {
        segment_base(sregs, reg).or_else(|| read_gpr(regs, reg))
    })
}

/// Reads the value of operand `op` (register or memory) of `instr`.
fn read_operand(
    mem: &GuestMemory,
    regs: &kvm_regs,
    sregs: &kvm_sregs,
    instr: &Instruction,
    op: u32,
) -> Option<u64> {
    match instr.op_kind(op) {
        OpKind::Register => read_gpr(regs, instr.op_register(op)),
        OpKind::Memory => {
            let linear = operand_address(regs, sregs, instr, op)?;
            let size = instr.memory_size().size();
            let mut buf = [0u8; 8];
            if size == 0 || size > 8 {
                return None;
            }
            // Read through the page tables (the access may cross a page).
            if read_linear(mem, sregs, linear, &mut buf[..size]) != size {
                return None;
            }
            Some(u64::from_le_bytes(buf))
        }
        _ => None,
    }
}

/// Tries to complete the instruction at RIP after an emulation failure. Returns what was completed,
/// or `None` when ftvmm does not know this instruction (the caller then reports a crash).
pub fn try_complete(
    fd: &VcpuFd,
    mem: &GuestMemory,
    counters: &EmulationCounters,
) -> Result<Option<Completed>, EmulateError> {
    let mut regs = fd.get_regs().map_err(kvm("registers"))?;
    let sregs = fd.get_sregs().map_err(kvm("segment registers"))?;
    let Some(instr) = decode_at_rip(mem, &regs, &sregs) else {
        return Ok(None);
    };
    let next = regs.rip.wrapping_add(instr.len() as u64);
    let completed = match instr.mnemonic() {
        Mnemonic::Int3 => {
            regs.rip = next;
            fd.set_regs(&regs).map_err(kvm("registers"))?;
            let mut events = fd.get_vcpu_events().map_err(kvm("events"))?;
            events.exception.injected = 1;
            events.exception.nr = BP_VECTOR;
            events.exception.has_error_code = 0;
            events.exception.error_code = 0;
            fd.set_vcpu_events(&events).map_err(kvm("events"))?;
            counters.record(Completed::Int3);
            return Ok(Some(Completed::Int3));
        }
        Mnemonic::Clac => {
            regs.rflags &= !RFLAGS_AC;
            Completed::Clac
        }
        Mnemonic::Stac => {
            regs.rflags |= RFLAGS_AC;
            Completed::Stac
        }
        Mnemonic::Wait => Completed::Fwait,
        Mnemonic::Ldmxcsr => {
            let Some(value) = read_operand(mem, &regs, &sregs, &instr, 0) else {
                return Ok(None);
            };
            let value = value as u32;
            if value & !MXCSR_MASK != 0 {
                // Hardware raises #GP here; leave that to the guest's real fault path.
                return Ok(None);
            }
            let mut xsave = fd.get_xsave().map_err(kvm("XSAVE state"))?;
            xsave.region[XSAVE_MXCSR_WORD] = value;
            // SAFETY: the legacy 4 KiB XSAVE buffer just read from this vCPU, with one field changed;
            // ftvmm enables no dynamically sized XSAVE features.
            unsafe { fd.set_xsave(&xsave) }.map_err(kvm("XSAVE state"))?;
            Completed::Ldmxcsr
        }
        Mnemonic::Stmxcsr => {
            let xsave = fd.get_xsave().map_err(kvm("XSAVE state"))?;
            let mxcsr = xsave.region[XSAVE_MXCSR_WORD];
            let Some(linear) = operand_address(&regs, &sregs, &instr, 0) else {
                return Ok(None);
            };
            if write_linear(mem, &sregs, linear, &mxcsr.to_le_bytes()) != 4 {
                return Ok(None);
            }
            Completed::Stmxcsr
        }
        Mnemonic::Popcnt => {
            let Some(src) = read_operand(mem, &regs, &sregs, &instr, 1) else {
                return Ok(None);
            };
            let count = u64::from(src.count_ones());
            if write_gpr(&mut regs, instr.op_register(0), count).is_none() {
                return Ok(None);
            }
            regs.rflags &= !(RFLAGS_CF | RFLAGS_PF | RFLAGS_AF | RFLAGS_ZF | RFLAGS_SF | RFLAGS_OF);
            if src == 0 {
                regs.rflags |= RFLAGS_ZF;
            }
            Completed::Popcnt
        }
        _ => return Ok(None),
    };
    regs.rip = next;
    fd.set_regs(&regs).map_err(kvm("registers"))?;
    counters.record(completed);
    Ok(Some(completed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    fn decode(bytes: &[u8]) -> Instruction {
        Decoder::with_ip(64, bytes, 0x1000, DecoderOptions::NONE).decode()
    }

    #[test]
    fn register_access_follows_x86_width_rules() {
        let mut regs = kvm_regs {
            rax: 0xffff_ffff_ffff_ffff,
            rbx: 0x1234,
            ..Default::default()
        };
        assert_eq!(read_gpr(&regs, Register::BH), Some(0x12));
        assert_eq!(read_gpr(&regs, Register::BL), Some(0x34));
        write_gpr(&mut regs, Register::EAX, 5).unwrap();
        assert_eq!(regs.rax, 5);
        regs.rcx = 0xaaaa_bbbb_cccc_dddd;
        write_gpr(&mut regs, Register::CX, 3).unwrap();
        assert_eq!(regs.rcx, 0xaaaa_bbbb_cccc_0003);
    }

    #[test]
    fn decodes_the_instructions_it_completes() {
        assert_eq!(decode(&[0xcc]).mnemonic(), Mnemonic::Int3);
        assert_eq!(decode(&[0x0f, 0x01, 0xca]).mnemonic(), Mnemonic::Clac);
        assert_eq!(decode(&[0x0f, 0x01, 0xcb]).mnemonic(), Mnemonic::Stac);
        assert_eq!(decode(&[0x9b]).mnemonic(), Mnemonic::Wait);
        assert_eq!(
            decode(&[0x0f, 0xae, 0x54, 0x24, 0x04]).mnemonic(),
            Mnemonic::Ldmxcsr
        );
        assert_eq!(
            decode(&[0x0f, 0xae, 0x5c, 0x24, 0x04]).mnemonic(),
            Mnemonic::Stmxcsr
        );
        let p = decode(&[0xf3, 0x48, 0x0f, 0xb8, 0xc3]); // popcnt %rbx,%rax
        assert_eq!(p.mnemonic(), Mnemonic::Popcnt);
        assert_eq!(p.op_register(0), Register::RAX);
        assert_eq!(format_instruction(&p), "popcnt %rbx,%rax");
    }

    #[test]
    fn popcnt_reads_register_and_memory_operands() {
        let mem = crate::memory::create_guest_memory(16).unwrap();
        let regs = kvm_regs {
            rbx: 0xf0f0,
            rsi: 0x2000,
            ..Default::default()
        };
        let sregs = kvm_sregs::default(); // paging off: linear == physical
        mem.write_obj(0x7u64, GuestAddress(0x2008)).unwrap();
        let reg = decode(&[0xf3, 0x48, 0x0f, 0xb8, 0xc3]);
        assert_eq!(read_operand(&mem, &regs, &sregs, &reg, 1), Some(0xf0f0));
        let m = decode(&[0xf3, 0x48, 0x0f, 0xb8, 0x46, 0x08]); // popcnt 8(%rsi),%rax
        assert_eq!(read_operand(&mem, &regs, &sregs, &m, 1), Some(7));
    }

    #[test]
    fn counters_report_only_what_fired() {
        let c = EmulationCounters::default();
        c.record(Completed::Int3);
        c.record(Completed::Int3);
        c.record(Completed::Popcnt);
        assert_eq!(
            c.snapshot(),
            vec![(Completed::Int3, 2), (Completed::Popcnt, 1)]
        );
        assert_eq!(c.total(), 3);
    }
}
