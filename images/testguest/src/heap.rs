//! The guest's heap: `testguest::heapcore`'s size-class allocator (freed blocks are reused)
//! behind a spinlock, usable from any vCPU. Its region starts at a 4 MiB reservation outside
//! .bss (never zeroed, never in the file, so the image's memory size guarantees at least that)
//! and, on first use, extends to the end of the e820 RAM range that holds it (at most up to
//! 3 GiB, where the uncached MMIO part of the identity map begins): long-running modes (the
//! key-value server) and large disk buffers have the guest's free RAM.
//!
//! Every address is identity mapped (virtual == physical), so heap memory is also DMA memory
//! for the virtio drivers (`virtio::hal`).

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, Ordering};
use testguest::heapcore::SizeClassHeap;

/// The part of the heap reserved in the image.
pub const HEAP_SIZE: usize = 4 << 20;
/// The heap never extends past this (the identity map is uncached from 3 GiB up).
const HEAP_LIMIT: u64 = 0xc000_0000;
const E820_RAM: u32 = 1;

core::arch::global_asm!(
    r#"
    .pushsection .heap, "aw", @nobits
    .balign 4096
    .global tg_heap
tg_heap:
    .skip {size}
    .popsection
    "#,
    size = const HEAP_SIZE,
);

unsafe extern "C" {
    static tg_heap: u8;
}

pub struct LockedHeap {
    lock: AtomicBool,
    heap: UnsafeCell<SizeClassHeap>,
}

// SAFETY: `heap` is only touched with `lock` held.
unsafe impl Sync for LockedHeap {}

/// End of the heap region: the end of the e820 RAM range holding `start`, capped at
/// HEAP_LIMIT, or just the reservation if the map says nothing useful.
fn region_end(start: usize) -> usize {
    let reserved = start + HEAP_SIZE;
    let s = start as u64;
    let end = crate::bootparams::e820()
        .filter(|e| e.kind == E820_RAM && e.addr <= s && s < e.addr.saturating_add(e.size))
        .map(|e| e.addr.saturating_add(e.size).min(HEAP_LIMIT))
        .max()
        .unwrap_or(0);
    usize::try_from(end).map_or(reserved, |e| e.max(reserved))
}

impl LockedHeap {
    fn with<R>(&self, f: impl FnOnce(&mut SizeClassHeap) -> R) -> R {
        while self
            .lock
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            while self.lock.load(Ordering::Relaxed) {
                core::hint::spin_loop();
            }
        }
        // SAFETY: the lock gives this CPU exclusive access until it is released below.
        let heap = unsafe { &mut *self.heap.get() };
        if !heap.is_initialized() {
            let start = core::ptr::addr_of!(tg_heap) as usize;
            // SAFETY: from tg_heap to the end of its RAM range nothing else lives: the image
            // ends with the heap reservation, and the VMM's boot data is all below 1 MiB.
            unsafe { heap.init(start, region_end(start)) };
        }
        let r = f(heap);
        self.lock.store(false, Ordering::Release);
        r
    }

    /// Bytes of the region handed out so far (high-water mark).
    pub fn used(&self) -> usize {
        self.with(|h| h.carved())
    }
}

// SAFETY: SizeClassHeap hands out distinct, suitably aligned blocks of its region; the lock
// serialises every access to it.
unsafe impl GlobalAlloc for LockedHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the heap was initialised with memory only it uses.
        self.with(|h| unsafe { h.alloc(layout) })
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller passes a block of this allocator with its layout.
        self.with(|h| unsafe { h.dealloc(ptr, layout) })
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if SizeClassHeap::fits_in_place(layout, new_size) {
            return ptr;
        }
        let Ok(new_layout) = Layout::from_size_align(new_size, layout.align()) else {
            return core::ptr::null_mut();
        };
        // SAFETY: as for alloc/dealloc; the old block stays valid until it is copied.
        unsafe {
            let new = self.alloc(new_layout);
            if !new.is_null() {
                core::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
            new
        }
    }
}

#[global_allocator]
pub static ALLOCATOR: LockedHeap = LockedHeap {
    lock: AtomicBool::new(false),
    heap: UnsafeCell::new(SizeClassHeap::empty()),
};
