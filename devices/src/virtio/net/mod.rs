//! virtio-net backed by a TAP device, with transmit going through an [`crate::output_gate`].
//!
//! `tap.rs` opens the TAP; `device.rs` is the virtio device; `event_handler.rs` moves frames between
//! the queues and the TAP on the event loop. Receive is not gated (input may always enter the guest).

pub mod announce;
pub mod device;
pub mod event_handler;
pub mod tap;

pub use device::{MacAddr, NetConfig, NetError, VirtioNet};
