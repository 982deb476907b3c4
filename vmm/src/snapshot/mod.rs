//! Snapshot building blocks: the framed, checksummed state encoding (`format`) and guest memory
//! files (`memory`). `machine/snapshot.rs` puts them together for a whole VM.

pub mod format;
pub mod memory;

pub use format::{decode, encode, FormatError};
