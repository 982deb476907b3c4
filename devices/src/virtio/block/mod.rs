//! virtio-blk backed by a raw image file.
//!
//! `request.rs` parses and executes one request (the part a malicious guest controls, fuzzed and
//! unit-tested); `device.rs` is the virtio device; `event_handler.rs` runs it on the event loop;
//! `write_journal.rs` tracks a protected guest's writes for its standby (blocks written during the
//! first copy, then every write per epoch) and slows the queue when the standby cannot keep up.

pub mod device;
pub mod event_handler;
pub mod request;
pub mod write_journal;

pub use device::{BlockConfig, BlockError, VirtioBlock};
pub use write_journal::{DiskWrite, EpochWrites, WriteJournal};
