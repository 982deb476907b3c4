//! How long an epoch is: fixed, or adaptive within bounds the user gives (`--epoch-ms auto`).
//!
//! The adaptive rule: the shortest epoch the link keeps up with. Gated output waits half an epoch
//! on average (docs/benchmarks.md), so shorter is better for the guest's clients, as long as each
//! checkpoint commits well within its epoch; the epoch is kept at least [`COMMIT_SHARE`] times the
//! commit (smoothed over the last few epochs, so one slow checkpoint does not swing the cadence).
//! When the guest dirties more than the link carries, commits grow with the epoch and the epoch goes
//! to its maximum, where each checkpoint's fixed costs weigh least.
//!
//! The pause is not part of the rule: most of it is copying dirty pages, which grows with the epoch
//! as fast as the epoch does, so a longer epoch does not make pauses a smaller share of the guest's
//! time (measured: docs/benchmarks.md). The minimum bound is where a user limits the fixed part.

use std::str::FromStr;
use std::time::Duration;

/// The epoch is at least this many times the (smoothed) commit.
const COMMIT_SHARE: u32 = 2;
/// Weight of the newest observation in the smoothed figures.
const SMOOTHING: f64 = 0.25;
/// Bounds of `auto` without explicit ones.
const AUTO_MIN: Duration = Duration::from_millis(10);
const AUTO_MAX: Duration = Duration::from_millis(200);
/// What an epoch may be at all, in milliseconds.
const LIMITS_MS: (u64, u64) = (5, 10_000);

/// The length of an epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EpochLength {
    Fixed(Duration),
    /// Chosen from the guest's pauses and commits, between `min` and `max`.
    Adaptive {
        min: Duration,
        max: Duration,
    },
}

/// An epoch length that cannot be parsed or is out of bounds.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "epoch length {given:?}: {reason} (MS, auto, or auto:MIN-MAX, in milliseconds from 5 to 10000)"
)]
pub struct EpochLengthError {
    given: String,
    reason: String,
}

impl FromStr for EpochLength {
    type Err = EpochLengthError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason: &str| EpochLengthError {
            given: s.to_string(),
            reason: reason.to_string(),
        };
        let ms = |v: &str| -> Result<Duration, EpochLengthError> {
            let n: u64 = v.trim().parse().map_err(|_| err("not a number"))?;
            if !(LIMITS_MS.0..=LIMITS_MS.1).contains(&n) {
                return Err(err("out of bounds"));
            }
            Ok(Duration::from_millis(n))
        };
        match s.strip_prefix("auto") {
            Some("") => Ok(Self::Adaptive {
                min: AUTO_MIN,
                max: AUTO_MAX,
            }),
            Some(bounds) => {
                let (min, max) = bounds
                    .strip_prefix(':')
                    .and_then(|b| b.split_once('-'))
                    .ok_or_else(|| err("expected auto:MIN-MAX"))?;
                let (min, max) = (ms(min)?, ms(max)?);
                if min > max {
                    return Err(err("MIN is above MAX"));
                }
                Ok(Self::Adaptive { min, max })
            }
            None => Ok(Self::Fixed(ms(s)?)),
        }
    }
}

impl std::fmt::Display for EpochLength {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Fixed(d) => write!(f, "{}", d.as_millis()),
            Self::Adaptive { min, max } => {
                write!(f, "auto:{}-{}", min.as_millis(), max.as_millis())
            }
        }
    }
}

/// The epoch loop's clock: the length of the next epoch, from what the last ones cost.
pub(super) struct EpochClock {
    length: EpochLength,
    commit_ms: Option<f64>,
}

impl EpochClock {
    pub(super) fn new(length: EpochLength) -> Self {
        Self {
            length,
            commit_ms: None,
        }
    }

    /// A checkpoint committed `commit` after its pause ended.
    pub(super) fn observe(&mut self, commit: Duration) {
        let new = commit.as_secs_f64() * 1e3;
        self.commit_ms = Some(self.commit_ms.map_or(new, |o| o + SMOOTHING * (new - o)));
    }

    /// How long the next epoch is.
    pub(super) fn next(&self) -> Duration {
        match self.length {
            EpochLength::Fixed(d) => d,
            EpochLength::Adaptive { min, max } => {
                let wanted_ms = self.commit_ms.unwrap_or(0.0) * f64::from(COMMIT_SHARE);
                Duration::from_secs_f64(wanted_ms / 1e3).clamp(min, max)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn lengths_parse_and_bad_ones_are_named() {
        assert_eq!("50".parse(), Ok(EpochLength::Fixed(ms(50))));
        assert_eq!(
            "auto".parse(),
            Ok(EpochLength::Adaptive {
                min: ms(10),
                max: ms(200)
            })
        );
        assert_eq!(
            "auto:20-80".parse(),
            Ok(EpochLength::Adaptive {
                min: ms(20),
                max: ms(80)
            })
        );
        for bad in [
            "",
            "4",
            "fast",
            "auto:80-20",
            "auto:1-50",
            "auto:20",
            "auto20-30",
        ] {
            let err = bad.parse::<EpochLength>().unwrap_err().to_string();
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
        assert_eq!(
            "auto:20-80".parse::<EpochLength>().unwrap().to_string(),
            "auto:20-80"
        );
    }

    #[test]
    fn a_fixed_epoch_stays_fixed() {
        let mut clock = EpochClock::new(EpochLength::Fixed(ms(50)));
        clock.observe(ms(300));
        assert_eq!(clock.next(), ms(50));
    }

    #[test]
    fn an_adaptive_epoch_follows_the_commit_within_bounds() {
        let mut clock = EpochClock::new(EpochLength::Adaptive {
            min: ms(10),
            max: ms(200),
        });
        // Nothing observed yet: as short as allowed.
        assert_eq!(clock.next(), ms(10));
        // An idle guest: 0.3 ms commits: still the minimum.
        for _ in 0..20 {
            clock.observe(Duration::from_micros(300));
        }
        assert_eq!(clock.next(), ms(10));
        // Commits of 30 ms (a slow link) → 60 ms epochs.
        for _ in 0..40 {
            clock.observe(ms(30));
        }
        let next = clock.next();
        assert!(next >= ms(59) && next <= ms(61), "{next:?}");
        // One slow commit moves it by a quarter of the difference, not all the way.
        clock.observe(ms(110));
        let next = clock.next();
        assert!(next >= ms(99) && next <= ms(101), "{next:?}");
        // Never past the maximum.
        for _ in 0..40 {
            clock.observe(ms(500));
        }
        assert_eq!(clock.next(), ms(200));
        // The link catches up: back down to the minimum.
        for _ in 0..40 {
            clock.observe(Duration::from_micros(500));
        }
        assert_eq!(clock.next(), ms(10));
    }
}
