//! The pure part of the ftvmm test guest: logic that touches no hardware, compiled as the
//! `testguest` library so that its unit tests run on the host (README.md, "Host unit tests").
//! The guest binary (`main.rs`) uses it for the disk pattern of `mode=blk`, the key-value
//! protocol and its on-disk log in `mode=net`, and its heap allocator.

#![no_std]

extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod blockdev;
pub mod hash;
pub mod heapcore;
pub mod kv;
pub mod kvlog;
pub mod pattern;
