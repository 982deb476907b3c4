//! The wire protocol between two ftvmm processes: versioned, framed, checksummed messages over a
//! byte stream (a `crate::link::Link`: TLS or, when asked for, plain TCP). `frame.rs` is the framing;
//! `message.rs` the messages; `probe.rs` the heartbeat's UDP datagrams, which travel beside the link.

pub mod frame;
pub mod message;
pub mod probe;

pub use frame::{
    read_frame, write_frame, write_payload, FrameError, FrameReader, PROTOCOL_VERSION,
};
pub use message::{DiskRun, EncodedPage, Ending, Message, PageEncoding, PageRun};
pub use probe::{Probe, ProbeError, ProbeKey, ProbeKind, ProbeSender, PROBE_LEN};
