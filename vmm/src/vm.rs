//! The KVM VM: the `/dev/kvm` handle, the VM file descriptor, its memory slots and in-kernel
//! interrupt controllers (PIC, IOAPIC, LAPICs) and PIT.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region,
    CpuId, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::layout::{KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS};
use crate::memory::GuestMemory;

/// Errors creating the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0} (is KVM available and are you allowed to use it?)")]
    OpenKvm(kvm_ioctls::Error),
    #[error("this host's KVM lacks the {0} capability")]
    MissingCap(&'static str),
    #[error("cannot create the KVM VM: {0}")]
    CreateVm(kvm_ioctls::Error),
    #[error("cannot create the in-kernel {what}: {source}")]
    Irqchip {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot register guest memory slot {slot} ({size:#x} bytes at {addr:#x}): {source}")]
    MemorySlot {
        slot: u32,
        addr: u64,
        size: u64,
        source: kvm_ioctls::Error,
    },
    #[error("cannot read the CPUID features KVM supports: {0}")]
    SupportedCpuid(kvm_ioctls::Error),
    #[error("cannot route interrupt line {gsi} to an eventfd: {source}")]
    Irqfd { gsi: u32, source: kvm_ioctls::Error },
    #[error("dirty ring: {0}")]
    DirtyRing(String),
    #[error("cannot read the dirty log of memory slot {slot}: {source}")]
    DirtyLog {
        slot: u32,
        source: kvm_ioctls::Error,
    },
    #[error("{requested} vCPUs requested but this host's KVM allows at most {max}")]
    TooManyVcpus { requested: usize, max: usize },
}

/// The VM-wide interrupt controllers, PIT and clock.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// Errors capturing or restoring VM state.
#[derive(Debug, thiserror::Error)]
#[error("cannot {op} the VM's {what}: {source}")]
pub struct VmStateError {
    op: &'static str,
    what: &'static str,
    source: kvm_ioctls::Error,
}

/// A KVM VM with its memory registered.
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
}

impl Vm {
    /// Creates the VM, its interrupt controllers and PIT, and registers `memory`.
    pub fn new(memory: &GuestMemory) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        for (cap, name) in [
            (Cap::Irqchip, "in-kernel irqchip"),
            (Cap::UserMemory, "user memory"),
            (Cap::ImmediateExit, "immediate exit"),
            (Cap::Irqfd, "irqfd"),
            (Cap::Ioeventfd, "ioeventfd"),
            (Cap::Pit2, "PIT2"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCap(name));
            }
        }
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        // Only needed on VMX hosts; harmless elsewhere, so a failure is just noted.
        if let Err(e) = fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS) {
            tracing::debug!("KVM_SET_IDENTITY_MAP_ADDR: {e}");
        }
        if let Err(e) = fd.set_tss_address(KVM_TSS_ADDRESS as usize) {
            tracing::debug!("KVM_SET_TSS_ADDR: {e}");
        }
        fd.create_irq_chip().map_err(|source| VmError::Irqchip {
            what: "interrupt controllers",
            source,
        })?;
        fd.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(|source| VmError::Irqchip {
            what: "PIT",
            source,
        })?;
        let vm = Self { kvm, fd };
        vm.register_memory(memory)?;
        Ok(vm)
    }

    fn register_memory(&self, memory: &GuestMemory) -> Result<(), VmError> {
        self.set_memory_slots(memory, 0)
    }

    /// Turns KVM's dirty-page logging on or off for every memory slot. Turning it on starts with an
    /// empty log.
    pub fn set_dirty_logging(&self, memory: &GuestMemory, enabled: bool) -> Result<(), VmError> {
        let flags = if enabled {
            kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        };
        self.set_memory_slots(memory, flags)
    }

    /// The pages of memory slot `slot` (of `size` bytes) written by vCPUs since the last call, as a
    /// bitmap; KVM clears its log as it hands it over.
    pub fn take_dirty_log(&self, slot: u32, size: usize) -> Result<Vec<u64>, VmError> {
        self.fd
            .get_dirty_log(slot, size)
            .map_err(|source| VmError::DirtyLog { slot, source })
    }

    fn set_memory_slots(&self, memory: &GuestMemory, flags: u32) -> Result<(), VmError> {
        for (slot, region) in memory.iter().enumerate() {
            let slot = slot as u32;
            let addr = region.start_addr().raw_value();
            let size = region.len();
            // The region is mapped for its whole length, so offset 0 is valid.
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .expect("a mapped region has a host address at offset 0");
            let mem_region = kvm_userspace_memory_region {
                slot,
                flags,
                guest_phys_addr: addr,
                memory_size: size,
                userspace_addr: host as u64,
            };
            // SAFETY: the region is a live mmap owned by `memory`, which the caller keeps alive for
            // as long as the VM (the Machine owns both and drops the VM first).
            unsafe { self.fd.set_user_memory_region(mem_region) }.map_err(|source| {
                VmError::MemorySlot {
                    slot,
                    addr,
                    size,
                    source,
                }
            })?;
        }
        Ok(())
    }

    /// The most vCPUs this host's KVM allows in one VM.
    pub fn max_vcpus(&self) -> usize {
        self.kvm.get_max_vcpus()
    }

    /// The CPUID features KVM can offer guests.
    pub fn supported_cpuid(&self) -> Result<CpuId, VmError> {
        self.kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(VmError::SupportedCpuid)
    }

    /// Routes writes to `eventfd` to interrupt line `gsi`.
    pub fn register_irqfd(&self, eventfd: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(eventfd, gsi)
            .map_err(|source| VmError::Irqfd { gsi, source })
    }

    /// Captures the interrupt controllers, PIT and clock (vCPUs paused).
    pub fn save_state(&self) -> Result<VmState, VmStateError> {
        let get = |what| {
            move |source| VmStateError {
                op: "read",
                what,
                source,
            }
        };
        let chip = |id| -> Result<kvm_irqchip, VmStateError> {
            let mut c = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            self.fd
                .get_irqchip(&mut c)
                .map_err(get("interrupt controller"))?;
            Ok(c)
        };
        Ok(VmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: self.fd.get_pit2().map_err(get("PIT"))?,
            clock: self.fd.get_clock().map_err(get("clock"))?,
        })
    }

    /// Loads a captured state (before any vCPU runs).
    pub fn restore_state(&self, state: &VmState) -> Result<(), VmStateError> {
        let set = |what| {
            move |source| VmStateError {
                op: "set",
                what,
                source,
            }
        };
        self.fd.set_pit2(&state.pit).map_err(set("PIT"))?;
        // Only the clock value is restored; KVM rejects flags it reports but does not accept.
        let clock = kvm_clock_data {
            clock: state.clock.clock,
            ..Default::default()
        };
        self.fd.set_clock(&clock).map_err(set("clock"))?;
        for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
            self.fd
                .set_irqchip(chip)
                .map_err(set("interrupt controller"))?;
        }
        Ok(())
    }

    /// The `/dev/kvm` handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The VM file descriptor.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }
}
