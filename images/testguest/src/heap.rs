//! Bump allocator over a 4 MiB region outside .bss (never zeroed, never in the file), so that
//! `alloc` (Vec, String, ...) is available. Lock-free (CAS), usable from any vCPU. Only the most
//! recent allocation is ever given back.

use core::alloc::{GlobalAlloc, Layout};
use core::sync::atomic::{AtomicUsize, Ordering};

pub const HEAP_SIZE: usize = 4 << 20;

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

pub struct BumpAllocator {
    /// Offset of the first free byte.
    next: AtomicUsize,
}

impl BumpAllocator {
    fn base() -> usize {
        core::ptr::addr_of!(tg_heap) as usize
    }

    /// Bytes handed out so far.
    pub fn used(&self) -> usize {
        self.next.load(Ordering::Relaxed)
    }
}

// SAFETY: every allocation is a distinct, suitably aligned range inside the heap region.
unsafe impl GlobalAlloc for BumpAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let base = Self::base();
        let mut cur = self.next.load(Ordering::Relaxed);
        loop {
            let start = (base + cur).next_multiple_of(layout.align()) - base;
            let Some(end) = start.checked_add(layout.size()).filter(|&e| e <= HEAP_SIZE) else {
                return core::ptr::null_mut();
            };
            match self
                .next
                .compare_exchange_weak(cur, end, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return core::ptr::with_exposed_provenance_mut(base + start),
                Err(actual) => cur = actual,
            }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let end = ptr as usize - Self::base() + layout.size();
        // Give the block back only if it is the last one handed out.
        let _ = self.next.compare_exchange(
            end,
            ptr as usize - Self::base(),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }
}

#[global_allocator]
pub static ALLOCATOR: BumpAllocator = BumpAllocator {
    next: AtomicUsize::new(0),
};
