//! Virtio devices through the independent `virtio-drivers` crate: the `Hal` for this guest's
//! identity map, the probe of the virtio-mmio window (docs/boot-abi.md, "Virtio devices") and a
//! block-device wrapper. The drivers run in ring 3 and poll; MMIO register accesses exit to
//! the VMM (the window is mapped user, uncached).

pub mod blk;
pub mod hal;
pub mod probe;
pub mod raw_blk;
