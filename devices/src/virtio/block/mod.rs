//! virtio-blk backed by a raw image file.
//!
//! `request.rs` parses and executes one request (the part a malicious guest controls, fuzzed and
//! unit-tested); `device.rs` is the virtio device; `event_handler.rs` runs it on the event loop.

pub mod device;
pub mod event_handler;
pub mod request;

pub use device::{BlockConfig, BlockError, VirtioBlock};
