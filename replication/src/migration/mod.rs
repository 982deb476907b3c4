//! Live migration, pre-copy: the source copies guest memory while the guest runs, then copies what
//! the guest dirtied meanwhile, round after round, until what is left can be copied within the
//! downtime target; then it stops the vCPUs, sends the last pages and the device state, and hands the
//! guest over (`source.rs`). The destination builds the same virtual hardware, fills memory, applies
//! the state and runs the guest once the source has let go (`destination.rs`).
//!
//! Hand-over is fenced so that the guest never runs in two places: the destination applies the state
//! and answers `Applied`; the source then stops for good and sends `Go`; only on `Go` does the
//! destination start. If anything fails before the source sends `Go`, the source resumes its guest
//! and the destination discards everything.

pub mod destination;
pub mod source;

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::link::LinkSecurity;

pub use destination::{receive, receive_stream, ReceiveError};
pub use source::{start_migration, MigrationHandle};

/// How a migration is run.
#[derive(Clone, Debug)]
pub struct MigrationParams {
    /// Destination `HOST:PORT`.
    pub to: String,
    /// How the link to the destination is protected.
    pub security: LinkSecurity,
    /// Stop-and-copy once the estimated downtime is below this.
    pub downtime_target: Duration,
    /// Give up pre-copy rounds (and stop-and-copy anyway) after this long.
    pub precopy_timeout: Duration,
    /// Most pre-copy rounds before stop-and-copy.
    pub max_rounds: u32,
}

impl MigrationParams {
    /// Defaults: 50 ms downtime target, 60 s of pre-copy, 30 rounds.
    pub fn to(to: impl Into<String>, security: LinkSecurity) -> Self {
        Self {
            to: to.into(),
            security,
            downtime_target: Duration::from_millis(50),
            precopy_timeout: Duration::from_secs(60),
            max_rounds: 30,
        }
    }
}

/// Where a migration stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationState {
    Connecting,
    PreCopy,
    StopAndCopy,
    Completed,
    Failed,
    Cancelled,
}

/// Progress of a migration, as the API reports it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MigrationStatus {
    pub state: MigrationState,
    pub to: String,
    pub round: u32,
    pub bytes_sent: u64,
    pub pages_sent: u64,
    /// Pages dirtied during the last round.
    pub dirty_pages: u64,
    /// Pages dirtied per second, last round.
    pub dirty_rate_pages_per_s: f64,
    /// Measured send bandwidth, bytes per second.
    pub bandwidth_bytes_per_s: f64,
    pub estimated_downtime_ms: f64,
    /// Time the vCPUs were stopped for the hand-over (when completed).
    pub downtime_ms: Option<f64>,
    pub elapsed_ms: f64,
    pub error: Option<String>,
}

impl MigrationStatus {
    fn new(to: &str) -> Self {
        Self {
            state: MigrationState::Connecting,
            to: to.to_string(),
            round: 0,
            bytes_sent: 0,
            pages_sent: 0,
            dirty_pages: 0,
            dirty_rate_pages_per_s: 0.0,
            bandwidth_bytes_per_s: 0.0,
            estimated_downtime_ms: 0.0,
            downtime_ms: None,
            elapsed_ms: 0.0,
            error: None,
        }
    }

    /// Whether the migration has ended one way or another.
    pub fn finished(&self) -> bool {
        matches!(
            self.state,
            MigrationState::Completed | MigrationState::Failed | MigrationState::Cancelled
        )
    }
}
