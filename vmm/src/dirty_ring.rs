//! KVM's dirty ring: instead of a bitmap per memory slot fetched with `KVM_GET_DIRTY_LOG`, each vCPU
//! pushes the pages it dirties into a ring shared with the VMM (`KVM_CAP_DIRTY_LOG_RING`). The VMM
//! harvests the entries (marking each one for reset) and then asks KVM to recycle them
//! (`KVM_RESET_DIRTY_RINGS`). A vCPU whose ring fills exits with `KVM_EXIT_DIRTY_RING_FULL` until
//! the next harvest.
//!
//! The ring must be enabled before any vCPU exists, and once it is, KVM refuses `KVM_GET_DIRTY_LOG`.

use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{fence, Ordering};
use std::sync::Mutex;

use kvm_bindings::{
    kvm_dirty_gfn, kvm_enable_cap, KVM_CAP_DIRTY_LOG_RING, KVM_DIRTY_LOG_PAGE_OFFSET,
};
use kvm_ioctls::{VcpuFd, VmFd};
use vmm_sys_util::ioctl::ioctl;
use vmm_sys_util::ioctl_io_nr;

ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, kvm_bindings::KVMIO, 0xc7);

const DIRTY_GFN_F_DIRTY: u32 = 1;
const DIRTY_GFN_F_RESET: u32 = 2;

/// Errors setting up the ring.
#[derive(Debug, thiserror::Error)]
pub enum DirtyRingError {
    #[error("this host's KVM does not offer the dirty ring")]
    Unsupported,
    #[error("dirty ring of {entries} entries exceeds this host's limit of {max}")]
    TooLarge { entries: u32, max: u32 },
    #[error("cannot enable the dirty ring: {0}")]
    Enable(kvm_ioctls::Error),
    #[error("cannot map the dirty ring of vCPU {vcpu}: {source}")]
    Map { vcpu: u8, source: std::io::Error },
    #[error("KVM_RESET_DIRTY_RINGS failed: {0}")]
    Reset(std::io::Error),
}

/// Enables the dirty ring with `entries` entries per vCPU (a power of two). Call before creating vCPUs.
pub fn enable(vm: &VmFd, max_bytes: i32, entries: u32) -> Result<(), DirtyRingError> {
    if max_bytes <= 0 {
        return Err(DirtyRingError::Unsupported);
    }
    let bytes = u64::from(entries) * std::mem::size_of::<kvm_dirty_gfn>() as u64;
    if bytes > max_bytes as u64 || !entries.is_power_of_two() {
        return Err(DirtyRingError::TooLarge {
            entries,
            max: (max_bytes as u64 / std::mem::size_of::<kvm_dirty_gfn>() as u64) as u32,
        });
    }
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_DIRTY_LOG_RING,
        ..Default::default()
    };
    cap.args[0] = bytes;
    vm.enable_cap(&cap).map_err(DirtyRingError::Enable)
}

/// One vCPU's ring, mapped.
struct Ring {
    base: NonNull<kvm_dirty_gfn>,
    entries: u32,
    /// Next entry to look at.
    fetch: u32,
}

// SAFETY: the mapping is shared memory owned by this struct; access is serialised by the Mutex in
// `DirtyRings` and KVM's protocol (flags handshake), so moving it between threads is sound.
unsafe impl Send for Ring {}

impl Drop for Ring {
    fn drop(&mut self) {
        let len = self.entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
        // SAFETY: unmapping exactly the region mapped in `DirtyRings::map`.
        unsafe { libc::munmap(self.base.as_ptr().cast(), len) };
    }
}

/// Every vCPU's ring.
pub struct DirtyRings {
    rings: Mutex<Vec<Ring>>,
    entries: u32,
}

impl DirtyRings {
    /// Maps the rings of `vcpus` (which must have been created after [`enable`]).
    pub fn map(vcpus: &[&VcpuFd], entries: u32) -> Result<Self, DirtyRingError> {
        let page = page_size();
        let len = entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
        let mut rings = Vec::with_capacity(vcpus.len());
        for (i, fd) in vcpus.iter().enumerate() {
            // SAFETY: mapping KVM's dirty ring from a vCPU fd at the offset KVM documents; the
            // result is checked and owned by `Ring`, which unmaps it.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd.as_raw_fd(),
                    (KVM_DIRTY_LOG_PAGE_OFFSET as usize * page) as libc::off_t,
                )
            };
            if ptr == libc::MAP_FAILED {
                return Err(DirtyRingError::Map {
                    vcpu: i as u8,
                    source: std::io::Error::last_os_error(),
                });
            }
            rings.push(Ring {
                base: NonNull::new(ptr.cast()).ok_or(DirtyRingError::Map {
                    vcpu: i as u8,
                    source: std::io::Error::other("null mapping"),
                })?,
                entries,
                fetch: 0,
            });
        }
        Ok(Self {
            rings: Mutex::new(rings),
            entries,
        })
    }

    /// Entries per ring.
    pub fn entries(&self) -> u32 {
        self.entries
    }

    /// Collects every dirty `(slot, page offset within the slot)` pushed since the last harvest and
    /// recycles the entries.
    pub fn harvest(
        &self,
        vm: &VmFd,
        mut dirty: impl FnMut(u32, u64),
    ) -> Result<u64, DirtyRingError> {
        let mut rings = self.rings.lock().unwrap_or_else(|e| e.into_inner());
        let mut count = 0;
        for ring in rings.iter_mut() {
            loop {
                let index = (ring.fetch % ring.entries) as usize;
                // SAFETY: `index` < entries, inside the mapping; volatile because KVM writes it.
                let entry = unsafe { ring.base.as_ptr().add(index) };
                // SAFETY: as above; reading the flags word of a live entry.
                let flags = unsafe { std::ptr::read_volatile(&(*entry).flags) };
                if flags & DIRTY_GFN_F_DIRTY == 0 {
                    break;
                }
                // Pairs with KVM's release store of the flags: slot and offset are valid now.
                fence(Ordering::Acquire);
                // SAFETY: as above.
                let (slot, offset) = unsafe {
                    (
                        std::ptr::read_volatile(&(*entry).slot),
                        std::ptr::read_volatile(&(*entry).offset),
                    )
                };
                dirty(slot, offset);
                // SAFETY: as above; handing the entry back to KVM.
                unsafe { std::ptr::write_volatile(&mut (*entry).flags, DIRTY_GFN_F_RESET) };
                ring.fetch = ring.fetch.wrapping_add(1);
                count += 1;
            }
        }
        fence(Ordering::Release);
        // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument; `vm` is a valid VM fd.
        let ret = unsafe { ioctl(vm, KVM_RESET_DIRTY_RINGS()) };
        if ret < 0 {
            return Err(DirtyRingError::Reset(std::io::Error::last_os_error()));
        }
        Ok(count)
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no memory effects.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if v > 0 {
        v as usize
    } else {
        4096
    }
}
