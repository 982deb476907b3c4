//! The release scheduler: decides, for each queued packet, whether it is dropped, released at once
//! or held, and when held packets are due. It knows nothing of netfilter: items are opaque, time is
//! passed in, so the policy is tested without a kernel.
//!
//! A packet goes through two stages:
//!
//! 1. **Delay**: held until `arrival + delay ± jitter` (uniform). Each packet has its own release
//!    time, so with jitter a later packet may be released before an earlier one (reordering, as on
//!    a real network); with `keep_order` a packet's release time is raised to that of the packet
//!    before it, so order is kept and jitter only bunches packets.
//! 2. **Rate**: packets leave the delay stage into a FIFO drained by a token bucket. The bucket
//!    fills at the rate up to a burst; the head goes out when the bucket holds its length (or a
//!    full burst, for packets larger than the burst), and may leave the bucket in debt, so the
//!    average rate is exact even for 64 KiB GSO packets. A packet that would wait longer than
//!    `max_wait` behind the backlog is dropped (as TBF's `latency`), which bounds the backlog.
//!
//! Loss and cut are decided on arrival.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, VecDeque};
use std::time::{Duration, Instant};

use crate::rng::Rng;

/// A token bucket's parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateLimit {
    /// The average rate, in bytes per second.
    pub bytes_per_sec: f64,
    /// How many bytes may go out back to back after an idle period.
    pub burst_bytes: f64,
    /// The longest a packet may wait for tokens; one that would wait longer is dropped.
    pub max_wait: Duration,
}

impl RateLimit {
    /// A bucket of `kbit` kilobits (1000 bits) per second whose burst is 10 ms of traffic (at least
    /// two full-size Ethernet frames), dropping what would wait longer than `max_wait`.
    pub fn from_kbit(kbit: u64, max_wait: Duration) -> Self {
        let bytes_per_sec = kbit as f64 * 1000.0 / 8.0;
        Self {
            bytes_per_sec,
            burst_bytes: (bytes_per_sec / 100.0).max(3028.0),
            max_wait,
        }
    }
}

/// What the scheduler does to packets.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Policy {
    /// Drop everything.
    pub cut: bool,
    /// Percentage of packets dropped at random, 0..=100.
    pub loss_percent: f64,
    /// Base hold time.
    pub delay: Duration,
    /// Uniform spread around `delay` (a release time never precedes the arrival).
    pub jitter: Duration,
    /// Never release a packet before one that arrived earlier.
    pub keep_order: bool,
    /// Token bucket, if the rate is limited.
    pub rate: Option<RateLimit>,
}

/// A decision on one packet.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome<T> {
    /// Let it through now.
    Release(T),
    /// Discard it.
    Drop(T),
}

/// A packet waiting in the delay stage, ordered by release time then arrival.
struct Delayed<T> {
    release_at: Instant,
    arrival_seq: u64,
    len: usize,
    item: T,
}

impl<T> PartialEq for Delayed<T> {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl<T> Eq for Delayed<T> {}
impl<T> PartialOrd for Delayed<T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for Delayed<T> {
    /// Reversed, so that `BinaryHeap` (a max-heap) pops the earliest release first.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.release_at, other.arrival_seq).cmp(&(self.release_at, self.arrival_seq))
    }
}

/// The token bucket and the FIFO of packets waiting for tokens.
struct Shaper<T> {
    limit: RateLimit,
    tokens: f64,
    refilled_at: Instant,
    waiting: VecDeque<(usize, T)>,
    waiting_bytes: usize,
}

impl<T> Shaper<T> {
    fn new(limit: RateLimit, now: Instant) -> Self {
        Self {
            limit,
            tokens: limit.burst_bytes,
            refilled_at: now,
            waiting: VecDeque::new(),
            waiting_bytes: 0,
        }
    }

    fn refill(&mut self, now: Instant) {
        if now > self.refilled_at {
            let earned =
                now.duration_since(self.refilled_at).as_secs_f64() * self.limit.bytes_per_sec;
            self.tokens = (self.tokens + earned).min(self.limit.burst_bytes);
            self.refilled_at = now;
        }
    }

    /// Tokens the bucket must hold before a packet of `len` bytes may go.
    fn needed(&self, len: usize) -> f64 {
        (len as f64).min(self.limit.burst_bytes)
    }

    /// Lets a packet through at once if nothing waits ahead of it and its tokens are there.
    fn try_pass(&mut self, now: Instant, len: usize) -> bool {
        self.refill(now);
        if self.waiting.is_empty() && self.tokens >= self.needed(len) {
            self.tokens -= len as f64;
            true
        } else {
            false
        }
    }

    /// Queues a packet, or hands it back to be dropped when it would wait longer than allowed:
    /// it waits for the bytes ahead of it plus its own share, less the tokens in the bucket.
    fn push(&mut self, now: Instant, len: usize, item: T) -> Result<(), T> {
        self.refill(now);
        let deficit = self.waiting_bytes as f64 + self.needed(len) - self.tokens;
        let wait = Duration::from_secs_f64((deficit / self.limit.bytes_per_sec).max(0.0));
        if wait > self.limit.max_wait {
            return Err(item);
        }
        self.waiting_bytes += len;
        self.waiting.push_back((len, item));
        Ok(())
    }

    /// Moves every packet whose tokens are there to `out`.
    fn release_due(&mut self, now: Instant, out: &mut Vec<Outcome<T>>) {
        self.refill(now);
        while let Some(&(len, _)) = self.waiting.front() {
            if self.tokens < self.needed(len) {
                break;
            }
            self.tokens -= len as f64;
            self.waiting_bytes -= len;
            let (_, item) = self.waiting.pop_front().expect("front exists");
            out.push(Outcome::Release(item));
        }
    }

    /// When the head of the FIFO will have its tokens.
    fn next_due(&self) -> Option<Instant> {
        let &(len, _) = self.waiting.front()?;
        let missing = (self.needed(len) - self.tokens).max(0.0);
        Some(self.refilled_at + Duration::from_secs_f64(missing / self.limit.bytes_per_sec))
    }
}

/// Holds packets and tells when each is due. `T` is whatever identifies a packet to the caller.
pub struct Scheduler<T> {
    policy: Policy,
    rng: Rng,
    delayed: BinaryHeap<Delayed<T>>,
    shaper: Option<Shaper<T>>,
    arrivals: u64,
    /// With `keep_order`, the release time of the last packet admitted.
    last_release_at: Option<Instant>,
}

impl<T> Scheduler<T> {
    /// A scheduler applying `policy`, drawing its random choices from `rng`; `now` starts the token
    /// bucket full.
    pub fn new(policy: Policy, rng: Rng, now: Instant) -> Self {
        let shaper = policy.rate.map(|limit| Shaper::new(limit, now));
        Self {
            policy,
            rng,
            delayed: BinaryHeap::new(),
            shaper,
            arrivals: 0,
            last_release_at: None,
        }
    }

    /// Takes a packet of `len` bytes that arrived at `now`. Returns its fate if decided at once;
    /// `None` means it is held, and will come out of [`Scheduler::release_due`].
    pub fn admit(&mut self, now: Instant, len: usize, item: T) -> Option<Outcome<T>> {
        if self.policy.cut || self.rng.chance(self.policy.loss_percent) {
            return Some(Outcome::Drop(item));
        }
        let jitter = self
            .rng
            .symmetric(self.policy.jitter.as_micros().min(u64::MAX as u128) as u64);
        let hold_micros = (self.policy.delay.as_micros() as i64 + jitter).max(0) as u64;
        let mut release_at = now + Duration::from_micros(hold_micros);
        if self.policy.keep_order {
            if let Some(last) = self.last_release_at {
                release_at = release_at.max(last);
            }
            self.last_release_at = Some(release_at);
        }
        let seq = self.arrivals;
        self.arrivals += 1;
        // Straight to the rate stage (or out) when there is nothing to wait for and nothing held
        // ahead of it that it must not overtake.
        if release_at <= now && (!self.policy.keep_order || self.delayed.is_empty()) {
            return self.shape(now, len, item);
        }
        self.delayed.push(Delayed {
            release_at,
            arrival_seq: seq,
            len,
            item,
        });
        None
    }

    /// Hands a packet that is done with its delay to the token bucket.
    fn shape(&mut self, now: Instant, len: usize, item: T) -> Option<Outcome<T>> {
        let Some(shaper) = self.shaper.as_mut() else {
            return Some(Outcome::Release(item));
        };
        if shaper.try_pass(now, len) {
            return Some(Outcome::Release(item));
        }
        match shaper.push(now, len, item) {
            Ok(()) => None,
            Err(item) => Some(Outcome::Drop(item)),
        }
    }

    /// Appends to `out` the fate of every held packet that is due at `now`, in release order.
    pub fn release_due(&mut self, now: Instant, out: &mut Vec<Outcome<T>>) {
        while self.delayed.peek().is_some_and(|d| d.release_at <= now) {
            let d = self.delayed.pop().expect("peeked");
            match self.shaper.as_mut() {
                None => out.push(Outcome::Release(d.item)),
                Some(shaper) => {
                    if let Err(item) = shaper.push(now, d.len, d.item) {
                        out.push(Outcome::Drop(item));
                    }
                }
            }
        }
        if let Some(shaper) = self.shaper.as_mut() {
            shaper.release_due(now, out);
        }
    }

    /// The next time a held packet becomes due, if any is held.
    pub fn next_due(&self) -> Option<Instant> {
        let delayed = self.delayed.peek().map(|d| d.release_at);
        let shaped = self.shaper.as_ref().and_then(Shaper::next_due);
        match (delayed, shaped) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// How many packets are held.
    pub fn held(&self) -> usize {
        self.delayed.len() + self.shaper.as_ref().map_or(0, |s| s.waiting.len())
    }

    /// Empties the scheduler (on exit), handing back every held packet, oldest first.
    pub fn drain(&mut self) -> Vec<T> {
        let mut delayed: Vec<Delayed<T>> = std::mem::take(&mut self.delayed).into_vec();
        delayed.sort_by_key(|d| d.arrival_seq);
        let mut items: Vec<T> = Vec::with_capacity(self.held());
        if let Some(shaper) = self.shaper.as_mut() {
            shaper.waiting_bytes = 0;
            items.extend(shaper.waiting.drain(..).map(|(_, item)| item));
        }
        items.extend(delayed.into_iter().map(|d| d.item));
        items
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Runs `arrivals` (time offset, length, id) through a scheduler, stepping time in 100 µs
    /// ticks, and returns the released ids with their release offsets, and the dropped ids.
    fn simulate(
        policy: Policy,
        arrivals: &[(Duration, usize, u32)],
    ) -> (Vec<(u32, Duration)>, Vec<u32>) {
        let start = Instant::now();
        let mut sched = Scheduler::new(policy, Rng::from_seed(3), start);
        let mut released = Vec::new();
        let mut dropped = Vec::new();
        let mut record = |outcome: Outcome<u32>, at: Duration| match outcome {
            Outcome::Release(id) => released.push((id, at)),
            Outcome::Drop(id) => dropped.push(id),
        };
        let end = arrivals.last().map_or(Duration::ZERO, |a| a.0) + Duration::from_secs(10);
        let mut next = 0;
        let mut t = Duration::ZERO;
        while t <= end {
            let now = start + t;
            let mut out = Vec::new();
            sched.release_due(now, &mut out);
            for o in out {
                record(o, t);
            }
            while next < arrivals.len() && arrivals[next].0 <= t {
                let (_, len, id) = arrivals[next];
                if let Some(o) = sched.admit(now, len, id) {
                    record(o, t);
                }
                next += 1;
            }
            if let Some(due) = sched.next_due() {
                assert!(
                    due + ms(1) >= now,
                    "next_due {due:?} is in the past at {t:?}"
                );
            }
            t += Duration::from_micros(100);
        }
        assert_eq!(sched.held(), 0, "packets still held after the run");
        (released, dropped)
    }

    fn inversions(ids: &[u32]) -> usize {
        ids.windows(2).filter(|w| w[0] > w[1]).count()
    }

    #[test]
    fn no_policy_releases_everything_at_once() {
        let mut sched = Scheduler::new(Policy::default(), Rng::from_seed(1), Instant::now());
        assert_eq!(
            sched.admit(Instant::now(), 100, 7),
            Some(Outcome::Release(7))
        );
        assert_eq!(sched.held(), 0);
        assert_eq!(sched.next_due(), None);
    }

    #[test]
    fn cut_drops_everything() {
        let policy = Policy {
            cut: true,
            ..Policy::default()
        };
        let arrivals: Vec<_> = (0..100).map(|i| (ms(i), 100, i as u32)).collect();
        let (released, dropped) = simulate(policy, &arrivals);
        assert!(released.is_empty());
        assert_eq!(dropped.len(), 100);
    }

    #[test]
    fn loss_drops_about_the_percentage() {
        let policy = Policy {
            loss_percent: 20.0,
            ..Policy::default()
        };
        let mut sched = Scheduler::new(policy, Rng::from_seed(9), Instant::now());
        let now = Instant::now();
        let dropped = (0..10_000)
            .filter(|&i| matches!(sched.admit(now, 100, i), Some(Outcome::Drop(_))))
            .count();
        assert!(
            (1_800..2_200).contains(&dropped),
            "{dropped} of 10000 dropped at 20%"
        );
    }

    #[test]
    fn delay_holds_each_packet_exactly_that_long() {
        let policy = Policy {
            delay: ms(40),
            ..Policy::default()
        };
        let arrivals: Vec<_> = (0..20).map(|i| (ms(i * 3), 100, i as u32)).collect();
        let (released, dropped) = simulate(policy, &arrivals);
        assert!(dropped.is_empty());
        assert_eq!(released.len(), 20);
        for (id, at) in released {
            let arrived = ms(u64::from(id) * 3);
            assert!(
                at >= arrived + ms(40) && at <= arrived + ms(41),
                "packet {id} arrived at {arrived:?}, released at {at:?}"
            );
        }
    }

    #[test]
    fn jitter_reorders_packets() {
        let policy = Policy {
            delay: ms(50),
            jitter: ms(40),
            ..Policy::default()
        };
        let arrivals: Vec<_> = (0..500)
            .map(|i| (Duration::from_micros(i * 500), 100, i as u32))
            .collect();
        let (released, _) = simulate(policy, &arrivals);
        let order: Vec<u32> = released.iter().map(|r| r.0).collect();
        assert_eq!(order.len(), 500);
        assert!(
            inversions(&order) > 50,
            "only {} inversions with 40 ms jitter",
            inversions(&order)
        );
        for (id, at) in &released {
            let arrived = Duration::from_micros(u64::from(*id) * 500);
            assert!(
                *at >= arrived + ms(10) && *at <= arrived + ms(91),
                "packet {id} at {at:?}"
            );
        }
    }

    #[test]
    fn keep_order_keeps_order_under_jitter() {
        let policy = Policy {
            delay: ms(50),
            jitter: ms(40),
            keep_order: true,
            ..Policy::default()
        };
        let arrivals: Vec<_> = (0..500)
            .map(|i| (Duration::from_micros(i * 500), 100, i as u32))
            .collect();
        let (released, _) = simulate(policy, &arrivals);
        let order: Vec<u32> = released.iter().map(|r| r.0).collect();
        assert_eq!(order, (0..500).collect::<Vec<u32>>());
        // Every packet still waits at least the delay minus the jitter.
        for (id, at) in &released {
            assert!(*at >= Duration::from_micros(u64::from(*id) * 500) + ms(10));
        }
    }

    #[test]
    fn token_bucket_holds_the_average_rate() {
        // 80 kbit/s = 10,000 bytes/s; a 3,028-byte burst; 30 packets of 1,000 bytes at once.
        let policy = Policy {
            rate: Some(RateLimit::from_kbit(80, Duration::from_secs(10))),
            ..Policy::default()
        };
        let arrivals: Vec<_> = (0..30).map(|i| (Duration::ZERO, 1000, i)).collect();
        let (released, dropped) = simulate(policy, &arrivals);
        assert!(dropped.is_empty());
        let order: Vec<u32> = released.iter().map(|r| r.0).collect();
        assert_eq!(order, (0..30).collect::<Vec<u32>>());
        // The burst goes at once; then one packet per 100 ms.
        assert_eq!(released.iter().filter(|r| r.1 == Duration::ZERO).count(), 3);
        let last = released.last().unwrap().1;
        assert!(
            last >= ms(2650) && last <= ms(2800),
            "30,000 bytes at 10,000 B/s took {last:?}"
        );
        for pair in released[3..].windows(2) {
            let gap = pair[1].1 - pair[0].1;
            assert!(
                gap >= ms(99) && gap <= ms(101),
                "gap {gap:?} between packets"
            );
        }
    }

    #[test]
    fn token_bucket_drops_what_would_wait_too_long() {
        // 10,000 bytes/s, 3,028 burst, at most 500 ms wait: about 3 + 5 packets of 1,000 bytes fit.
        let policy = Policy {
            rate: Some(RateLimit::from_kbit(80, ms(500))),
            ..Policy::default()
        };
        let arrivals: Vec<_> = (0..30).map(|i| (Duration::ZERO, 1000, i)).collect();
        let (released, dropped) = simulate(policy, &arrivals);
        assert!(
            (7..=9).contains(&released.len()),
            "{} released",
            released.len()
        );
        assert_eq!(released.len() + dropped.len(), 30);
        assert!(released.iter().all(|r| r.1 <= ms(501)));
    }

    #[test]
    fn token_bucket_lets_a_packet_larger_than_the_burst_through() {
        let policy = Policy {
            rate: Some(RateLimit::from_kbit(80, Duration::from_secs(10))),
            ..Policy::default()
        };
        // A 64 KiB GSO packet, then a small one that must wait for the debt to be paid.
        let (released, dropped) = simulate(
            policy,
            &[(Duration::ZERO, 65_536, 0), (Duration::ZERO, 100, 1)],
        );
        assert!(dropped.is_empty());
        assert_eq!(released[0], (0, Duration::ZERO));
        assert!(
            released[1].1 >= ms(6_200),
            "second packet at {:?}",
            released[1].1
        );
    }

    #[test]
    fn delay_then_rate_compose() {
        let policy = Policy {
            delay: ms(100),
            rate: Some(RateLimit::from_kbit(80, Duration::from_secs(10))),
            ..Policy::default()
        };
        let arrivals: Vec<_> = (0..5).map(|i| (Duration::ZERO, 1000, i)).collect();
        let (released, _) = simulate(policy, &arrivals);
        assert!(released.iter().all(|r| r.1 >= ms(100)));
        assert!(
            released[4].1 >= ms(250),
            "fifth packet at {:?}",
            released[4].1
        );
    }

    #[test]
    fn drain_hands_back_everything_held() {
        let policy = Policy {
            delay: ms(1000),
            ..Policy::default()
        };
        let now = Instant::now();
        let mut sched = Scheduler::new(policy, Rng::from_seed(1), now);
        for i in 0..10 {
            assert_eq!(sched.admit(now, 100, i), None);
        }
        assert_eq!(sched.held(), 10);
        assert_eq!(sched.next_due(), Some(now + ms(1000)));
        assert_eq!(sched.drain(), (0..10).collect::<Vec<_>>());
        assert_eq!(sched.held(), 0);
    }
}
