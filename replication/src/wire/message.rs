//! The messages of live migration and of protection (replication checkpoints).
//!
//! Byte payloads (pages, disk data, encoded state) are `serde_bytes`: postcard writes and reads them
//! as one length-prefixed block (the same bytes on the wire as a sequence of `u8`, without a call per
//! byte).

use serde::{Deserialize, Serialize};
use vmm::machine::MachineDescription;

/// A run of consecutive guest pages.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRun {
    /// Guest physical address of the first byte.
    pub gpa: u64,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

/// One dirty page of a checkpoint as it travels (`crate::protection::page_delta`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncodedPage {
    /// Guest physical address of the page.
    pub gpa: u64,
    pub encoding: PageEncoding,
}

/// How a page's contents travel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PageEncoding {
    /// All zeros.
    Zero,
    /// The whole page.
    Whole(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The bytes that differ from the copy the standby holds, whose CRC32C is `base_crc` (applied
    /// to anything else, it is refused): `unchanged: varint | changed: varint | bytes[changed]`
    /// runs from the start of the page, as QEMU's XBZRLE encodes them.
    Delta {
        base_crc: u32,
        #[serde(with = "serde_bytes")]
        changes: Vec<u8>,
    },
}

/// A write to a disk image: `data` at byte `offset`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRun {
    pub offset: u64,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

/// Why a primary stops sending checkpoints while it is alive (`Message::Goodbye`). Each one tells the
/// standby that the guest must not be resumed there: it ended, or it goes on at the primary.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ending {
    /// The guest powered off.
    PoweredOff,
    /// The guest reset itself (ftvmm ends a guest that resets).
    Reset,
    /// The guest crashed (a triple fault, an unhandled exit).
    Crashed,
    /// Protection was stopped (`vm unprotect`, or the primary gave up on this standby): the guest
    /// goes on at the primary, unprotected.
    Unprotected { reason: String },
    /// The primary's operator stopped the VM (SIGTERM): the guest ends, as at a power-off.
    Stopped,
}

impl std::fmt::Display for Ending {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            Ending::PoweredOff => write!(f, "the guest powered off"),
            Ending::Reset => write!(f, "the guest reset itself"),
            Ending::Crashed => write!(f, "the guest crashed"),
            Ending::Unprotected { reason } => {
                write!(f, "the guest goes on at the primary, unprotected: {reason}")
            }
            Ending::Stopped => write!(f, "the VM was stopped by its operator"),
        }
    }
}

/// One protocol message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Source → destination, first: the virtual hardware to build.
    Hello { description: MachineDescription },
    /// Destination → source: hardware built, ready for memory.
    Ready,
    /// Source → destination: guest memory contents.
    Pages { round: u32, runs: Vec<PageRun> },
    /// Source → destination: every page of pre-copy round `round` has been sent.
    RoundEnd { round: u32 },
    /// Destination → source: every page of round `round` is in guest memory (nothing of it is left
    /// in flight, so the source's next estimate of the downtime is true).
    RoundReceived { round: u32 },
    /// Source → destination, last: vCPU, VM and device state (an encoded `VmSnapshot`), sent
    /// with the vCPUs stopped.
    State {
        #[serde(with = "serde_bytes")]
        snapshot: Vec<u8>,
    },
    /// Destination → source: state applied; the destination will run the guest once told to.
    Applied,
    /// Source → destination: the source has stopped for good; run the guest.
    Go,
    /// Source → destination: migration abandoned; discard everything.
    Cancel,
    /// Either way: the sender gives up, with why.
    Error { message: String },
    /// Primary → standby: dirty pages of checkpoint `epoch` (one or more messages).
    EpochPages { epoch: u64, pages: Vec<EncodedPage> },
    /// Primary → standby: checkpoint `epoch` is complete: `pages` pages were sent for it, and this
    /// is the vCPU, VM and device state (an encoded `VmSnapshot`) at its end.
    EpochEnd {
        epoch: u64,
        pages: u64,
        /// Disk writes sent for this checkpoint (`EpochDiskWrites` runs, all disks).
        disk_writes: u64,
        /// The guest flushed a disk during the epoch (or this is the first checkpoint): the
        /// standby makes its images durable before it commits the checkpoint.
        flushed: bool,
        #[serde(with = "serde_bytes")]
        state: Vec<u8>,
    },
    /// Primary → standby, after `Standing`: the size in bytes of each of the guest's disks; the
    /// standby's own images must match.
    ProtectDisks { sizes: Vec<u64> },
    /// Primary → standby, before checkpoint 0: the first copy of guest memory (non-zero pages),
    /// read while the guest runs; the pages written meanwhile come with checkpoint 0.
    MemorySync { runs: Vec<PageRun> },
    /// Primary → standby, before checkpoint 0 commits: the first copy of disk `disk`, taken while
    /// the guest runs (its writes meanwhile come with checkpoint 0).
    DiskSync {
        disk: u32,
        offset: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Primary → standby: writes the guest completed on disk `disk` during checkpoint `epoch`, in
    /// order; applied with the checkpoint, never before.
    EpochDiskWrites {
        epoch: u64,
        disk: u32,
        writes: Vec<DiskRun>,
    },
    /// Standby → primary: checkpoint `epoch` is applied; its output may be released.
    Committed { epoch: u64 },
    /// Primary → standby, last: the primary stops checkpointing while alive, and why; the standby
    /// must not resume the guest.
    Goodbye { ending: Ending },
    /// Standby → primary, right after `Ready`: the standby's terms. `session` names this
    /// protection; both ends probe each other every `heartbeat_ms` with UDP datagrams to this
    /// link's address, signed with `probe_secret` (`crate::wire::probe`), and each counts the
    /// other alive for `failure_timeout_ms` after the probe of its own that the other last echoed.
    Standing {
        session: u64,
        failure_timeout_ms: u64,
        heartbeat_ms: u64,
        probe_secret: [u8; 32],
    },
    /// Primary → standby, first on the control channel (a second connection to the standby's
    /// address, for `session`): the channel a primary's end is told on. It carries nothing else
    /// until a `Goodbye`; its closing without one is what the primary's death looks like.
    HeartbeatOpen { session: u64 },
    /// Primary → standby, right after `Standing`, when the primary protects under a witness: the
    /// claim it holds there (its holder id and generation, the fencing token). The standby follows
    /// only if the witness holds exactly this claim, `protected`; a takeover swaps that claim.
    ClaimHeld { holder: u64, generation: u64 },
}

impl Message {
    /// The message's kind, for errors and logs (never its payload).
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "Hello",
            Message::Ready => "Ready",
            Message::Pages { .. } => "Pages",
            Message::RoundEnd { .. } => "RoundEnd",
            Message::RoundReceived { .. } => "RoundReceived",
            Message::State { .. } => "State",
            Message::Applied => "Applied",
            Message::Go => "Go",
            Message::Cancel => "Cancel",
            Message::Error { .. } => "Error",
            Message::EpochPages { .. } => "EpochPages",
            Message::EpochEnd { .. } => "EpochEnd",
            Message::Committed { .. } => "Committed",
            Message::Goodbye { .. } => "Goodbye",
            Message::Standing { .. } => "Standing",
            Message::ProtectDisks { .. } => "ProtectDisks",
            Message::DiskSync { .. } => "DiskSync",
            Message::MemorySync { .. } => "MemorySync",
            Message::EpochDiskWrites { .. } => "EpochDiskWrites",
            Message::HeartbeatOpen { .. } => "HeartbeatOpen",
            Message::ClaimHeld { .. } => "ClaimHeld",
        }
    }
}
