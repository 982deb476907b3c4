//! A size-class heap over one contiguous region: every block is a power of two (16 bytes and
//! up), freed blocks go on a free list per size and are reused for the next allocation of that
//! size. Fresh memory is carved from the region in whole 4 KiB pages: a page for blocks smaller
//! than a page is split into blocks of one size at once, so every block is naturally aligned
//! (blocks of a page or more are page aligned). Blocks never merge, which suits the guest's
//! steady workloads (packets, request buffers, key-value strings) and keeps every operation a
//! few instructions. Not thread safe by itself: `heap.rs` puts it behind a spinlock.

use core::alloc::Layout;
use core::ptr;

/// Smallest block: 16 bytes (holds the free-list link).
const MIN_SHIFT: u32 = 4;
/// Largest block: 2^47 bytes (more than any guest has).
const MAX_SHIFT: u32 = 47;
const CLASSES: usize = (MAX_SHIFT - MIN_SHIFT + 1) as usize;
pub const PAGE: usize = 4096;

pub struct SizeClassHeap {
    /// Next uncarved byte (page aligned) and end of the region.
    next: usize,
    end: usize,
    start: usize,
    /// Head of each class's free list (0: empty); a free block's first word links the next.
    free: [usize; CLASSES],
    /// Bytes in live blocks (by block size).
    live: usize,
}

impl Default for SizeClassHeap {
    fn default() -> Self {
        Self::empty()
    }
}

impl SizeClassHeap {
    /// A heap with no memory (every allocation fails until `init`).
    pub const fn empty() -> Self {
        SizeClassHeap {
            next: 0,
            end: 0,
            start: 0,
            free: [0; CLASSES],
            live: 0,
        }
    }

    /// Gives the heap the memory `start..end` (rounded inwards to pages).
    ///
    /// # Safety
    /// The range must be valid, writable memory that nothing else uses, for as long as the heap
    /// (or any block it handed out) is used; `init` must be called at most once.
    pub unsafe fn init(&mut self, start: usize, end: usize) {
        let s = start.next_multiple_of(PAGE);
        let e = end & !(PAGE - 1);
        if e > s {
            self.start = s;
            self.next = s;
            self.end = e;
        }
    }

    pub fn is_initialized(&self) -> bool {
        self.end != 0
    }

    /// Bytes of the region carved so far (the high-water mark).
    pub fn carved(&self) -> usize {
        self.next - self.start
    }

    /// Bytes in blocks currently allocated.
    pub fn live(&self) -> usize {
        self.live
    }

    /// Size of the region.
    pub fn capacity(&self) -> usize {
        self.end - self.start
    }

    /// The class index of `layout` (block size `16 << index`), if any class can hold it.
    fn class_of(layout: Layout) -> Option<usize> {
        let size = layout.size().max(layout.align()).max(1 << MIN_SHIFT);
        let block = size.checked_next_power_of_two()?;
        let shift = block.trailing_zeros();
        (shift <= MAX_SHIFT).then(|| (shift - MIN_SHIFT) as usize)
    }

    fn block_size(class: usize) -> usize {
        1 << (class as u32 + MIN_SHIFT)
    }

    /// Carves `size` bytes (a multiple of PAGE) aligned to `align` (a power of two, at least
    /// PAGE) from the region.
    fn carve(&mut self, size: usize, align: usize) -> Option<usize> {
        let start = self.next.checked_next_multiple_of(align)?;
        let end = start.checked_add(size)?;
        if end > self.end {
            return None;
        }
        self.next = end;
        Some(start)
    }

    /// Allocates a block for `layout`; null when out of memory.
    ///
    /// # Safety
    /// The heap must have been `init`ed with valid memory (or be empty).
    pub unsafe fn alloc(&mut self, layout: Layout) -> *mut u8 {
        let Some(class) = Self::class_of(layout) else {
            return ptr::null_mut();
        };
        let bs = Self::block_size(class);
        let head = self.free[class];
        // Blocks are naturally aligned up to a page; above that, only fresh ones are sure to be.
        if head != 0 && (layout.align() <= PAGE || head.is_multiple_of(layout.align())) {
            // SAFETY: `head` is a free block of this class, inside the region; its first word
            // holds the link to the next free block.
            self.free[class] = unsafe { (head as *const usize).read() };
            self.live += bs;
            return ptr::with_exposed_provenance_mut(head);
        }
        let block = if bs < PAGE {
            // Split a fresh page into blocks of this class: hand out the first, list the rest.
            let Some(page) = self.carve(PAGE, PAGE) else {
                return ptr::null_mut();
            };
            let mut b = page + PAGE - bs;
            while b > page {
                // SAFETY: `b` is a block-aligned address inside the page just carved.
                unsafe { (b as *mut usize).write(self.free[class]) };
                self.free[class] = b;
                b -= bs;
            }
            page
        } else {
            match self.carve(bs, layout.align().max(PAGE)) {
                Some(b) => b,
                None => return ptr::null_mut(),
            }
        };
        self.live += bs;
        ptr::with_exposed_provenance_mut(block)
    }

    /// Returns a block to its free list.
    ///
    /// # Safety
    /// `ptr` must come from `alloc` (or `realloc`) of this heap with this same `layout`, and not
    /// have been freed since.
    pub unsafe fn dealloc(&mut self, ptr: *mut u8, layout: Layout) {
        let Some(class) = Self::class_of(layout) else {
            return;
        };
        // SAFETY: the block is at least 16 bytes and 16-aligned, and no longer in use.
        unsafe { (ptr as *mut usize).write(self.free[class]) };
        self.free[class] = ptr as usize;
        self.live -= Self::block_size(class);
    }

    /// Whether a block allocated for `layout` can hold `new_size` bytes as it is.
    pub fn fits_in_place(layout: Layout, new_size: usize) -> bool {
        match (
            Self::class_of(layout),
            Layout::from_size_align(new_size, layout.align())
                .ok()
                .and_then(Self::class_of),
        ) {
            (Some(a), Some(b)) => a == b,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;
    use std::collections::HashSet;

    /// A page-aligned region of `pages` pages, leaked (tests only).
    fn region(pages: usize) -> (usize, usize) {
        let layout = Layout::from_size_align(pages * PAGE, PAGE).unwrap();
        // SAFETY: non-zero size.
        let p = unsafe { std::alloc::alloc_zeroed(layout) } as usize;
        assert_ne!(p, 0);
        (p, p + pages * PAGE)
    }

    fn heap(pages: usize) -> SizeClassHeap {
        let (s, e) = region(pages);
        let mut h = SizeClassHeap::empty();
        // SAFETY: the region is fresh, leaked memory used only by this heap.
        unsafe { h.init(s, e) };
        h
    }

    fn l(size: usize, align: usize) -> Layout {
        Layout::from_size_align(size, align).unwrap()
    }

    #[test]
    fn empty_heap_fails_cleanly() {
        let mut h = SizeClassHeap::empty();
        // SAFETY: an empty heap never touches memory.
        assert!(unsafe { h.alloc(l(8, 8)) }.is_null());
        assert!(!h.is_initialized());
    }

    #[test]
    fn blocks_are_aligned_distinct_and_reused() {
        let mut h = heap(64);
        let mut seen = HashSet::new();
        let mut blocks = Vec::new();
        for (i, &(size, align)) in [(1, 1), (16, 8), (17, 8), (100, 4), (4096, 4096), (5000, 8)]
            .iter()
            .cycle()
            .take(60)
            .enumerate()
        {
            // SAFETY: heap initialised with its own memory.
            let p = unsafe { h.alloc(l(size, align)) } as usize;
            assert_ne!(p, 0, "allocation {i} failed");
            assert_eq!(p % align, 0);
            assert!(seen.insert(p), "block {p:#x} handed out twice");
            blocks.push((p, l(size, align)));
        }
        let carved = h.carved();
        for &(p, layout) in &blocks {
            // SAFETY: each block came from this heap with this layout, freed once.
            unsafe { h.dealloc(p as *mut u8, layout) };
        }
        assert_eq!(h.live(), 0);
        // The same allocations again take no new memory.
        for &(_, layout) in &blocks {
            // SAFETY: as above.
            assert!(!unsafe { h.alloc(layout) }.is_null());
        }
        assert_eq!(h.carved(), carved);
    }

    #[test]
    fn small_blocks_share_a_page_and_do_not_overlap() {
        let mut h = heap(4);
        let ptrs: Vec<usize> = (0..PAGE / 32)
            // SAFETY: heap initialised with its own memory.
            .map(|_| unsafe { h.alloc(l(32, 8)) } as usize)
            .collect();
        assert_eq!(h.carved(), PAGE);
        let mut sorted = ptrs.clone();
        sorted.sort();
        for w in sorted.windows(2) {
            assert!(w[1] - w[0] >= 32);
        }
        // Writing every block does not disturb the others (no overlap with free-list links).
        for (i, &p) in ptrs.iter().enumerate() {
            // SAFETY: each block is 32 bytes of this heap's memory.
            unsafe { core::ptr::write_bytes(p as *mut u8, i as u8, 32) };
        }
        for (i, &p) in ptrs.iter().enumerate() {
            // SAFETY: as above.
            let b = unsafe { core::slice::from_raw_parts(p as *const u8, 32) };
            assert!(b.iter().all(|&x| x == i as u8));
        }
    }

    #[test]
    fn large_alignment_is_honoured_and_exhaustion_returns_null() {
        let mut h = heap(64);
        // SAFETY: heap initialised with its own memory.
        let p = unsafe { h.alloc(l(PAGE, 8 * PAGE)) } as usize;
        assert_eq!(p % (8 * PAGE), 0);
        // SAFETY: as above.
        let big = unsafe { h.alloc(l(1 << 30, 8)) };
        assert!(big.is_null());
        // SAFETY: as above; a size no class holds.
        assert!(unsafe { h.alloc(l(usize::MAX / 2, 1)) }.is_null());
    }

    #[test]
    fn fits_in_place_within_a_class() {
        assert!(SizeClassHeap::fits_in_place(l(20, 8), 32));
        assert!(!SizeClassHeap::fits_in_place(l(20, 8), 33));
        assert!(SizeClassHeap::fits_in_place(l(2000, 8), 1500));
        assert!(!SizeClassHeap::fits_in_place(l(2000, 8), 1000));
    }
}
