//! `virtio_drivers::Hal` for the test guest: physical == virtual (the whole first 4 GiB are
//! identity mapped), DMA memory comes from the heap (page aligned, zeroed), and sharing a
//! buffer with a device needs nothing but its address (x86 DMA is cache coherent).

use alloc::alloc::{Layout, alloc_zeroed, dealloc};
use core::ptr::NonNull;
use virtio_drivers::{BufferDirection, Hal, PAGE_SIZE, PhysAddr};

pub struct TgHal;

fn dma_layout(pages: usize) -> Option<Layout> {
    Layout::from_size_align(pages.checked_mul(PAGE_SIZE)?, PAGE_SIZE).ok()
}

// SAFETY: dma_alloc returns zeroed, page-aligned, exclusively owned memory whose physical
// address equals its virtual one; share returns the (identity) physical address of memory the
// caller keeps valid until unshare; MMIO addresses are identity mapped, user, uncached.
unsafe impl Hal for TgHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let Some(layout) = dma_layout(pages).filter(|l| l.size() != 0) else {
            return (0, NonNull::dangling());
        };
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { alloc_zeroed(layout) };
        match NonNull::new(p) {
            Some(nn) => (p as usize as PhysAddr, nn),
            None => (0, NonNull::dangling()),
        }
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        match dma_layout(pages) {
            Some(layout) => {
                // SAFETY: the caller passes memory from dma_alloc with the same page count.
                unsafe { dealloc(vaddr.as_ptr(), layout) };
                0
            }
            None => -1,
        }
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        NonNull::new(paddr as usize as *mut u8).expect("MMIO at physical address 0")
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.cast::<u8>().as_ptr() as usize as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}
