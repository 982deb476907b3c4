//! Protecting a running guest with a hot standby (Remus-style): the primary checkpoints the guest
//! every epoch and streams each checkpoint to the standby (`epoch_loop.rs`); output produced in epoch
//! N is held by the NICs' output gates until the standby has committed checkpoint N; when the
//! primary dies, the standby resumes the guest from its last committed checkpoint (`standby.rs`).
//!
//! The files, by what they do:
//! - the primary: `epoch_loop.rs` (the loop: first copy, checkpoints in flight, commits, the end),
//!   `checkpoint.rs` (taking and sending one checkpoint), `copy_on_write.rs` (its pages copied after
//!   the pause), `page_delta.rs` (how a page travels), `disk_copy.rs` (the disks' first copy while
//!   the guest writes), `in_flight.rs` (the window of checkpoints awaiting their commit),
//!   `epoch_length.rs` (fixed or adaptive epochs), `primary_claim.rs` (its claim at the witness);
//! - the standby: `standby.rs` (following, and the decision to take over), `standby_disks.rs`;
//! - both: `heartbeat/` (failure detection: UDP probes and the control channel).
//!
//! Correctness rules kept here (docs/wire-protocol.md has them as built): an epoch's dirty set is
//! never lost (it is folded back if it cannot be sent); the standby applies an epoch only when all
//! of it has arrived and verified, and discards a torn one whole; output of epoch N leaves only
//! after the standby acknowledged N, and only while the standby still counts the primary alive; a
//! lost standby leaves the primary running unprotected, its held output released, reported as
//! degraded; a primary that ends protection while alive says `Goodbye`, and the standby then never
//! resumes the guest; one user of dirty tracking at a time (protection, a migration, snapshots).
//! Disk writes of epoch N travel with checkpoint N and reach the standby's image at its commit,
//! durable there when the guest flushed; a guest that writes faster than the standby takes is
//! slowed, not unprotected. A witness (`crate::witness`) decides takeovers that the two cannot.

mod checkpoint;
mod copy_on_write;
mod disk_copy;
pub mod epoch_length;
pub mod epoch_loop;
pub mod heartbeat;
mod in_flight;
pub mod page_delta;
mod primary_claim;
pub mod standby;
mod standby_disks;

use serde::{Deserialize, Serialize};

pub use epoch_length::EpochLength;
pub use epoch_loop::{
    ending_of, start_protection, CheckpointCopy, ProtectionHandle, ProtectionParams,
};
pub use standby::{run_standby, StandbyControl, StandbyEnd, StandbyError, StandbyStatus, Takeover};

/// Where protection stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProtectionState {
    Connecting,
    /// The first, full checkpoint is being sent.
    Syncing,
    Protected,
    /// The standby was lost: the guest runs unprotected, its output no longer held.
    Degraded,
    /// Protection was stopped (`vm unprotect`) or the guest ended; the standby was told.
    Unprotected,
}

/// Progress of protection, as the API reports it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProtectionStatus {
    pub state: ProtectionState,
    pub standby: String,
    /// Last committed epoch.
    pub committed_epoch: u64,
    /// The length of the current epoch (fixed, or chosen by `--epoch-ms auto`).
    pub epoch_ms: f64,
    /// How long the vCPUs were paused for the last checkpoint.
    pub last_pause_ms: f64,
    /// Of that pause, the time it took to stop the vCPUs (the rest is taking the checkpoint —
    /// dirty pages, state, and their write protection or copy — and resuming).
    pub last_pause_stopping_ms: f64,
    /// Pages in the last checkpoint.
    pub last_pages: u64,
    /// Guest writes (vCPUs or devices) that waited, after the last checkpoint's pause, for the copy
    /// of the page they wrote (`copy_on_write.rs`).
    pub last_write_faults: u64,
    /// Guest writes stopped on a page when no copy was waiting for it (a writer that went to sleep
    /// just after its chunk's copy), answered at once; since protection began (`copy_on_write.rs`).
    pub write_faults_between_copies: u64,
    /// Bytes of page data the last checkpoint took on the link (zero pages as marks, deltas
    /// against the standby's copy; before frame compression), against `last_pages` × 4 KiB raw.
    pub last_page_bytes: u64,
    /// From the end of the pause to the standby's acknowledgement, last epoch.
    pub last_commit_ms: f64,
    /// Time since the standby's last heartbeat ping, if the heartbeat channel is open.
    pub heartbeat_age_ms: Option<f64>,
    /// The claim's generation at the witness, if there is one.
    pub generation: Option<u64>,
    /// Frames and bytes of guest output held until their checkpoint commits (after the last
    /// release).
    pub held_frames: u64,
    pub held_bytes: u64,
    /// The first copy of the guest's disks and memory (state `syncing`): how far it has got.
    pub sync: SyncProgress,
    pub error: Option<String>,
}

/// How much of the first copy (every disk image, then all of guest memory) has been read and sent.
/// Zero pages of memory are read but not sent, so `done_bytes` counts what was gone through.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncProgress {
    pub done_bytes: u64,
    pub total_bytes: u64,
}
