//! xAPIC through its MMIO page (mapped user, uncached, by our page tables): id, software
//! enable, and INIT / STARTUP IPIs through the ICR.

use super::cpu::pause;

/// Default xAPIC MMIO base.
pub const DEFAULT_BASE: u64 = 0xfee0_0000;

const REG_ID: usize = 0x20;
const REG_SVR: usize = 0xf0;
const REG_ICR_LOW: usize = 0x300;
const REG_ICR_HIGH: usize = 0x310;

const SVR_ENABLE: u32 = 1 << 8;
/// Has an `iretq`-only IDT gate (`idt.rs`).
const SPURIOUS_VECTOR: u32 = 0xff;
const ICR_DELIVERY_PENDING: u32 = 1 << 12;
const ICR_LEVEL_ASSERT: u32 = 1 << 14;
const ICR_INIT: u32 = 0b101 << 8;
const ICR_STARTUP: u32 = 0b110 << 8;

/// The local APIC of the calling CPU (the MMIO page is per-CPU).
#[derive(Clone, Copy, Debug)]
pub struct LocalApic {
    base: usize,
}

impl LocalApic {
    /// `base` must be the xAPIC MMIO base below 4 GiB (mapped by our page tables).
    pub fn new(base: u64) -> Self {
        LocalApic {
            base: base as usize,
        }
    }

    pub fn read(&self, reg: usize) -> u32 {
        // SAFETY: the xAPIC page is identity-mapped (uncached, user) and registers are
        // 32-bit aligned.
        unsafe {
            core::ptr::read_volatile(core::ptr::with_exposed_provenance::<u32>(self.base + reg))
        }
    }

    pub fn write(&self, reg: usize, val: u32) {
        // SAFETY: as for `read`.
        unsafe {
            core::ptr::write_volatile(
                core::ptr::with_exposed_provenance_mut::<u32>(self.base + reg),
                val,
            )
        }
    }

    /// APIC id from the ID register (bits 31:24).
    pub fn id(&self) -> u32 {
        self.read(REG_ID) >> 24
    }

    /// Software-enable the APIC (SVR bit 8) if it is not already. Returns whether it was.
    pub fn enable(&self) -> bool {
        let svr = self.read(REG_SVR);
        if svr & SVR_ENABLE != 0 {
            return true;
        }
        self.write(REG_SVR, svr | SVR_ENABLE | SPURIOUS_VECTOR);
        false
    }

    /// Waits (bounded) until the previous IPI has been sent.
    fn wait_icr_idle(&self) -> bool {
        for _ in 0..100_000 {
            if self.read(REG_ICR_LOW) & ICR_DELIVERY_PENDING == 0 {
                return true;
            }
            pause();
        }
        false
    }

    fn send_ipi(&self, apic_id: u32, low: u32) -> bool {
        self.wait_icr_idle();
        self.write(REG_ICR_HIGH, apic_id << 24);
        self.write(REG_ICR_LOW, low);
        self.wait_icr_idle()
    }

    /// INIT IPI (level assert) to `apic_id`.
    pub fn send_init(&self, apic_id: u32) -> bool {
        self.send_ipi(apic_id, ICR_INIT | ICR_LEVEL_ASSERT)
    }

    /// STARTUP IPI: the AP starts in real mode at `page << 12`.
    pub fn send_startup(&self, apic_id: u32, page: u8) -> bool {
        self.send_ipi(apic_id, ICR_STARTUP | ICR_LEVEL_ASSERT | u32::from(page))
    }
}
