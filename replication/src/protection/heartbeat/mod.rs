//! Failure detection between primary and standby, apart from the checkpoint stream, so that a long
//! first sync, a slow apply or a stalled TCP stream never looks like death.
//!
//! - **Probes** (`prober.rs`, datagrams in `crate::wire::probe`): both ends send a UDP ping
//!   stamped with their own clock every `heartbeat` (a tenth of the failure timeout) to the other
//!   and echo the other's pings. Each counts the other *alive* until `failure_timeout` after the
//!   newest of its own pings the other echoed. Ten independent probes per timeout: ordinary loss
//!   (each lost datagram loses only itself) or jitter never silences a live peer, while a dead one
//!   is silent within the timeout. Because an echo names a time on the asker's own clock, a late
//!   old echo proves nothing new: once the primary stops echoing (it decided to go on without its
//!   standby), at most `failure_timeout` later the standby no longer counts it alive. A clock that
//!   stood still (a frozen host) is seen against the peer's stamps, and then only fresh echoes
//!   count.
//! - **The control channel** (`control_channel.rs`): a second authenticated connection on which the
//!   primary says nothing until it ends protection while alive (`Goodbye`). Its closing without a
//!   goodbye is the primary's death — what the standby without a witness takes over on, and only
//!   while the probes show the primary alive.
//!
//! The primary counts its standby lost when no probe of its own is answered for the standby's
//! failure timeout, stops answering the standby, tells it goodbye on the control channel, and holds
//! its output until the standby can no longer count it alive (docs/wire-protocol.md). After a
//! silence that long (or a stop of its own clock) it releases nothing before the witness confirms
//! it still holds the guest ([`StandbyWatch::may_have_been_silent`]).

mod control_channel;
mod primary_side;
mod prober;
mod standby_side;

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

pub use control_channel::{read_control, ControlRead, ControlVerdict};
pub use primary_side::{ReleasePermit, StandbyTerms, StandbyWatch};
pub use prober::{ClockJumps, NotTaken, PeerLiveness, ProbeTaker};
pub use standby_side::{watch_primary, PrimaryWatch, WatchPlan};

/// How long the primary may take to open the control channel after `Standing`, and to get its
/// first probe answered.
pub(crate) const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Probes per failure timeout.
pub const PROBES_PER_TIMEOUT: u32 = 10;

/// Fastest probing, whatever the failure timeout.
pub const MIN_HEARTBEAT: Duration = Duration::from_millis(5);

/// The probe interval for a failure timeout.
pub fn heartbeat_for(failure_timeout: Duration) -> Duration {
    (failure_timeout / PROBES_PER_TIMEOUT).max(MIN_HEARTBEAT)
}

/// A fresh session number (std's hasher keys come from the OS's randomness).
pub fn new_session() -> u64 {
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}
