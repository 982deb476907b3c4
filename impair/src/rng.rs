//! A small seedable random number generator (SplitMix64) for loss, jitter and duplication decisions.
//! Impairment needs cheap, reproducible coin flips, not cryptographic randomness: a run given
//! `--seed` makes the same decisions for the same packet sequence.

use std::time::{SystemTime, UNIX_EPOCH};

/// SplitMix64: one 64-bit state, full period, passes BigCrush; ample for sampling percentages.
#[derive(Clone, Debug)]
pub struct Rng {
    state: u64,
}

impl Rng {
    /// A generator that starts from `seed`.
    pub fn from_seed(seed: u64) -> Self {
        Self { state: seed }
    }

    /// A generator seeded from the clock and the process id: different in every run.
    pub fn from_entropy() -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Self::from_seed(nanos ^ (u64::from(std::process::id()) << 32))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A uniform number in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        // The top 53 bits fill an f64's mantissa exactly.
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// True with probability `percent` / 100 (0 never, 100 always).
    pub fn chance(&mut self, percent: f64) -> bool {
        percent > 0.0 && self.next_f64() * 100.0 < percent
    }

    /// A uniform integer in `[-bound, bound]`.
    pub fn symmetric(&mut self, bound: u64) -> i64 {
        if bound == 0 {
            return 0;
        }
        let span = 2 * bound + 1;
        (self.next_u64() % span) as i64 - bound as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chance_matches_the_percentage() {
        let mut rng = Rng::from_seed(7);
        let hits = (0..100_000).filter(|_| rng.chance(20.0)).count();
        assert!(
            (19_000..21_000).contains(&hits),
            "{hits} hits of 100000 at 20%"
        );
        assert!(!(0..1000).any(|_| rng.chance(0.0)));
        assert!((0..1000).all(|_| rng.chance(100.0)));
    }

    #[test]
    fn symmetric_stays_in_bounds_and_reaches_both_ends() {
        let mut rng = Rng::from_seed(1);
        let values: Vec<i64> = (0..10_000).map(|_| rng.symmetric(3)).collect();
        assert!(values.iter().all(|v| (-3..=3).contains(v)));
        assert!(values.contains(&-3) && values.contains(&3));
        assert_eq!(rng.symmetric(0), 0);
    }

    #[test]
    fn same_seed_same_sequence() {
        let a: Vec<u64> = {
            let mut r = Rng::from_seed(42);
            (0..5).map(|_| r.next_u64()).collect()
        };
        let mut r = Rng::from_seed(42);
        assert!(a.iter().all(|&v| v == r.next_u64()));
    }
}
