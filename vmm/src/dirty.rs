//! Dirty-page tracking for snapshots, migration and replication: KVM's dirty log (pages vCPUs wrote)
//! OR'ed with vm-memory's bitmap (pages the VMM and its devices wrote).
//!
//! The correctness rule: a dirty set is never lost. KVM and vm-memory both clear their logs when
//! read, so what they hand over is accumulated in `pending`; a consumer [`DirtyTracker::take`]s it
//! and, if it could not send or store those pages, gives them back with
//! [`DirtyTracker::fold_back`].

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

use std::sync::{Arc, Mutex};

use crate::dirty_ring::DirtyRings;
use crate::memory::{GuestMemory, PAGE_SIZE};
use crate::vm::{Vm, VmError};

/// The VMM-side dirty bitmap of a region (pages written through vm-memory).
fn vmm_bitmap(region: &GuestRegionMmap<AtomicBitmap>) -> &AtomicBitmap {
    let mapping: &vm_memory::MmapRegion<AtomicBitmap> = region;
    mapping.bitmap()
}

/// One memory region's dirty pages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionDirty {
    pub base: GuestAddress,
    pub len: u64,
    /// Bit `i` set: page `i` of the region is dirty.
    pub bitmap: Vec<u64>,
}

/// A set of dirty pages across guest memory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirtySet {
    pub regions: Vec<RegionDirty>,
}

impl DirtySet {
    /// Number of dirty pages.
    pub fn count(&self) -> u64 {
        self.regions
            .iter()
            .map(|r| {
                r.bitmap
                    .iter()
                    .map(|w| u64::from(w.count_ones()))
                    .sum::<u64>()
            })
            .sum()
    }

    /// Every page of guest memory, as a set (for a first full copy).
    pub fn all(mem: &GuestMemory) -> Self {
        Self {
            regions: mem
                .iter()
                .map(|r| {
                    let pages = r.len().div_ceil(PAGE_SIZE as u64) as usize;
                    let mut bitmap = vec![u64::MAX; pages.div_ceil(64)];
                    if !pages.is_multiple_of(64) {
                        if let Some(last) = bitmap.last_mut() {
                            *last = (1u64 << (pages % 64)) - 1;
                        }
                    }
                    RegionDirty {
                        base: r.start_addr(),
                        len: r.len(),
                        bitmap,
                    }
                })
                .collect(),
        }
    }

    /// Runs of consecutive dirty pages as `(guest address, length in bytes)`, in address order.
    pub fn runs(&self) -> Vec<(GuestAddress, u64)> {
        let mut runs = Vec::new();
        for r in &self.regions {
            let pages = r.len.div_ceil(PAGE_SIZE as u64);
            let mut start: Option<u64> = None;
            for page in 0..=pages {
                let dirty = page < pages
                    && r.bitmap
                        .get((page / 64) as usize)
                        .is_some_and(|w| w & (1 << (page % 64)) != 0);
                match (dirty, start) {
                    (true, None) => start = Some(page),
                    (false, Some(s)) => {
                        let addr = GuestAddress(r.base.0 + s * PAGE_SIZE as u64);
                        let end = (page * PAGE_SIZE as u64).min(r.len);
                        runs.push((addr, end - s * PAGE_SIZE as u64));
                        start = None;
                    }
                    _ => {}
                }
            }
        }
        runs
    }

    /// Adds every page of `other` (same memory layout).
    pub fn merge(&mut self, other: &DirtySet) {
        if self.regions.is_empty() {
            *self = other.clone();
            return;
        }
        for (mine, theirs) in self.regions.iter_mut().zip(&other.regions) {
            for (a, b) in mine.bitmap.iter_mut().zip(&theirs.bitmap) {
                *a |= *b;
            }
        }
    }
}

/// Accumulates dirty pages from KVM (its dirty log, or its dirty ring when the VM has one) and the
/// VMM's bitmap while tracking is on.
pub struct DirtyTracker {
    pending: DirtySet,
    active: bool,
    ring: Option<Arc<DirtyRings>>,
}

impl DirtyTracker {
    /// A tracker using KVM's dirty log, not yet tracking.
    pub fn new() -> Self {
        Self {
            pending: DirtySet::default(),
            active: false,
            ring: None,
        }
    }

    /// A tracker using the VM's dirty rings (the VM was built with them), not yet tracking.
    pub fn with_ring(ring: Arc<DirtyRings>) -> Self {
        Self {
            ring: Some(ring),
            ..Self::new()
        }
    }

    /// Starts tracking: KVM logging on, both logs cleared, nothing pending.
    pub fn start(&mut self, vm: &Vm, mem: &GuestMemory) -> Result<(), VmError> {
        vm.set_dirty_logging(mem, true)?;
        if let Some(ring) = &self.ring {
            // Entries pushed before now belong to nobody.
            ring.harvest(vm.fd(), |_, _| {})
                .map_err(|e| VmError::DirtyRing(e.to_string()))?;
        }
        for region in mem.iter() {
            vmm_bitmap(region).reset();
        }
        self.pending = DirtySet {
            regions: mem
                .iter()
                .map(|r| RegionDirty {
                    base: r.start_addr(),
                    len: r.len(),
                    bitmap: vec![0; (r.len().div_ceil(PAGE_SIZE as u64) as usize).div_ceil(64)],
                })
                .collect(),
        };
        self.active = true;
        Ok(())
    }

    /// Moves what KVM and the VMM logged since the last call into the pending set.
    pub fn collect(&mut self, vm: &Vm, mem: &GuestMemory) -> Result<(), VmError> {
        if let Some(ring) = &self.ring {
            let regions = &mut self.pending.regions;
            ring.harvest(vm.fd(), |slot, page| {
                if let Some(r) = regions.get_mut(slot as usize) {
                    if let Some(word) = r.bitmap.get_mut((page / 64) as usize) {
                        *word |= 1 << (page % 64);
                    }
                }
            })
            .map_err(|e| VmError::DirtyRing(e.to_string()))?;
        }
        for (slot, (region, pending)) in mem.iter().zip(&mut self.pending.regions).enumerate() {
            let kvm = match self.ring {
                Some(_) => Vec::new(),
                None => vm.take_dirty_log(slot as u32, region.len() as usize)?,
            };
            let vmm = vmm_bitmap(region).get_and_reset();
            for (i, word) in pending.bitmap.iter_mut().enumerate() {
                *word |= kvm.get(i).copied().unwrap_or(0) | vmm.get(i).copied().unwrap_or(0);
            }
        }
        Ok(())
    }

    /// Hands over the pending set (now owned by the caller, who must fold it back on failure).
    pub fn take(&mut self) -> DirtySet {
        let empty = DirtySet {
            regions: self
                .pending
                .regions
                .iter()
                .map(|r| RegionDirty {
                    base: r.base,
                    len: r.len,
                    bitmap: vec![0; r.bitmap.len()],
                })
                .collect(),
        };
        std::mem::replace(&mut self.pending, empty)
    }

    /// Gives back a set that was taken but not delivered.
    pub fn fold_back(&mut self, set: &DirtySet) {
        self.pending.merge(set);
    }

    /// Pages pending.
    pub fn pending_pages(&self) -> u64 {
        self.pending.count()
    }

    /// Stops tracking (KVM logging off).
    pub fn stop(&mut self, vm: &Vm, mem: &GuestMemory) -> Result<(), VmError> {
        self.active = false;
        vm.set_dirty_logging(mem, false)
    }

    /// Whether tracking is on.
    pub fn is_active(&self) -> bool {
        self.active
    }
}

impl Default for DirtyTracker {
    fn default() -> Self {
        Self::new()
    }
}

/// Who tracks the guest's dirty pages. Collecting dirty bits clears them, so two users would each
/// see only part of the writes: one user at a time holds the claim (protection's epoch loop, a
/// migration), and a snapshot is refused meanwhile.
#[derive(Clone, Default)]
pub struct DirtyOwnership {
    holder: Arc<Mutex<Option<&'static str>>>,
}

impl DirtyOwnership {
    /// Takes the claim for `user`, or names who holds it.
    pub fn claim(&self, user: &'static str) -> Result<DirtyClaim, &'static str> {
        let mut holder = self.holder.lock().unwrap_or_else(|e| e.into_inner());
        match *holder {
            Some(other) => Err(other),
            None => {
                *holder = Some(user);
                Ok(DirtyClaim {
                    holder: self.holder.clone(),
                })
            }
        }
    }

    /// Who holds the claim now.
    pub fn holder(&self) -> Option<&'static str> {
        *self.holder.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The claim on dirty tracking; released when dropped (its user's thread ends).
pub struct DirtyClaim {
    holder: Arc<Mutex<Option<&'static str>>>,
}

impl Drop for DirtyClaim {
    fn drop(&mut self) {
        *self.holder.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(bits: &[u64], pages: u64) -> DirtySet {
        let mut bitmap = vec![0u64; (pages as usize).div_ceil(64)];
        for b in bits {
            bitmap[(*b / 64) as usize] |= 1 << (b % 64);
        }
        DirtySet {
            regions: vec![RegionDirty {
                base: GuestAddress(0x10_0000),
                len: pages * PAGE_SIZE as u64,
                bitmap,
            }],
        }
    }

    #[test]
    fn runs_group_consecutive_pages() {
        let s = set(&[0, 1, 2, 5, 63, 64, 99], 100);
        assert_eq!(s.count(), 7);
        let p = PAGE_SIZE as u64;
        assert_eq!(
            s.runs(),
            vec![
                (GuestAddress(0x10_0000), 3 * p),
                (GuestAddress(0x10_0000 + 5 * p), p),
                (GuestAddress(0x10_0000 + 63 * p), 2 * p),
                (GuestAddress(0x10_0000 + 99 * p), p),
            ]
        );
    }

    #[test]
    fn folding_back_loses_nothing() {
        let mut t = DirtyTracker::new();
        t.pending = set(&[3], 100);
        let taken = t.take();
        assert_eq!(t.pending_pages(), 0);
        t.pending.merge(&set(&[7], 100));
        t.fold_back(&taken);
        assert_eq!(t.pending_pages(), 2);
        assert_eq!(t.take().runs().len(), 2);
    }

    #[test]
    fn all_covers_every_page_once() {
        let mem = crate::memory::create_guest_memory(16).unwrap();
        let all = DirtySet::all(&mem);
        assert_eq!(all.count(), (16 << 20) / PAGE_SIZE as u64);
        assert_eq!(all.runs(), vec![(GuestAddress(0), 16 << 20)]);
    }

    #[test]
    fn vmm_writes_are_collected_without_kvm() {
        // The VMM-side half: device writes through vm-memory land in the region bitmap.
        use vm_memory::Bytes;
        let mem = crate::memory::create_guest_memory(16).unwrap();
        for r in mem.iter() {
            vmm_bitmap(r).reset();
        }
        mem.write_obj(1u8, GuestAddress(0x3000)).unwrap();
        let region = mem.iter().next().unwrap();
        let words = vmm_bitmap(region).get_and_reset();
        assert_eq!(words[0], 1 << 3);
    }

    #[test]
    fn one_user_of_dirty_tracking_at_a_time() {
        let ownership = DirtyOwnership::default();
        let claim = ownership.claim("protection").unwrap();
        assert_eq!(ownership.holder(), Some("protection"));
        assert_eq!(ownership.claim("migration").err(), Some("protection"));
        drop(claim);
        assert_eq!(ownership.holder(), None);
        assert!(ownership.claim("migration").is_ok());
    }
}
