//! The probe loop both ends run: every interval it sends a ping stamped with its own clock to the
//! peer, echoes the peer's pings, and keeps [`PeerLiveness`], its view of the peer. UDP, so that a
//! lost datagram loses one probe and nothing else (`crate::wire::probe`).

use std::collections::VecDeque;
use std::io::ErrorKind;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::wire::{Probe, ProbeKey, ProbeKind, ProbeSender, PROBE_LEN};

/// One end's view of the other, kept by its probe loop.
///
/// The peer is *alive* until `failure_timeout` after the newest ping of ours it echoed — a time on
/// our own clock, so an old echo delivered late proves nothing new, and a peer that stops echoing
/// is no longer counted alive at most `failure_timeout` later, whatever the network delivers.
///
/// Our own clock may stop with our whole host (a paused VM) while the peer's runs on: on waking,
/// the last echo looks recent though the peer may have given up on us long ago. The peer's pings
/// carry its clock, and a jump of it against ours ([`ClockJumps`]) shows such a stop: from then on
/// only an echo of a ping sent after the jump counts as alive ([`PeerLiveness::alive`]).
pub struct PeerLiveness {
    clock: Instant,
    failure_timeout: Duration,
    /// Our clock (µs) of the newest ping of ours the peer echoed (0: none yet).
    echoed_us: AtomicU64,
    /// Our clock (µs) when our clock was last seen to have stopped (0: never); echoes of pings
    /// sent before it are stale.
    stale_before_us: AtomicU64,
    /// Times our clock was seen to have stopped.
    clock_jumps: AtomicU64,
    /// Our clock (µs) when this end last woke from a stall of its own (its process stopped or
    /// starved for a good part of the failure timeout): silence before it is ours, not the peer's.
    awake_since_us: AtomicU64,
    /// Newest stamp of the peer's pings (replayed or reordered ones prove nothing new).
    peer_stamp_us: AtomicU64,
    /// Until when, on our clock (µs; 0: never answered), the peer surely counts us alive by its
    /// own rule ([`PeerLiveness::counted_alive_by_peer`]).
    peer_counts_us_alive_until_us: AtomicU64,
    /// Round trips (µs) of our latest echoed pings: how late the peer's pings may reach us.
    round_trips: Mutex<VecDeque<u64>>,
    /// Whether we echo the peer's pings.
    answering: AtomicBool,
    /// Ends the probe loop.
    stop: AtomicBool,
    /// Where the peer's probes come from (the standby learns it from the primary's first ping).
    peer: Mutex<Option<SocketAddr>>,
}

impl PeerLiveness {
    pub fn new(failure_timeout: Duration) -> Self {
        Self {
            clock: Instant::now(),
            failure_timeout,
            echoed_us: AtomicU64::new(0),
            stale_before_us: AtomicU64::new(0),
            clock_jumps: AtomicU64::new(0),
            awake_since_us: AtomicU64::new(0),
            peer_stamp_us: AtomicU64::new(0),
            peer_counts_us_alive_until_us: AtomicU64::new(0),
            round_trips: Mutex::new(VecDeque::new()),
            answering: AtomicBool::new(true),
            stop: AtomicBool::new(false),
            peer: Mutex::new(None),
        }
    }

    /// Our clock in µs (never 0).
    pub fn now_us(&self) -> u64 {
        self.clock.elapsed().as_micros().max(1) as u64
    }

    pub fn failure_timeout(&self) -> Duration {
        self.failure_timeout
    }

    /// The peer echoed our ping stamped `stamp_us`.
    pub(super) fn echoed(&self, stamp_us: u64) {
        // Never beyond now: an echo can only carry a ping we have sent.
        let now = self.now_us();
        let stamp_us = stamp_us.min(now);
        self.echoed_us.fetch_max(stamp_us, Ordering::SeqCst);
        let mut trips = self.round_trips.lock().unwrap_or_else(|e| e.into_inner());
        if trips.len() == Self::ROUND_TRIPS_KEPT {
            trips.pop_front();
        }
        trips.push_back(now - stamp_us);
    }

    /// Round trips remembered: the quickest bounds the quickest one-way trip.
    const ROUND_TRIPS_KEPT: usize = 32;

    fn quickest_round_trip_us(&self) -> u64 {
        self.round_trips
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .copied()
            .min()
            .unwrap_or(0)
    }

    /// Whether the peer, by its own rule, surely still counts us alive. It counts us alive until its
    /// failure timeout after the stamp of the newest of its pings whose echo it took, and it says
    /// which in every ping (`echoed`). Moved onto our clock — by the lowest offset between the
    /// clocks seen lately (the offset itself plus the quickest trip), less our quickest round trip
    /// (which bounds that trip) — that gives a time before which it surely does. The newest such
    /// bound holds until it runs out: a peer that gave up on us (and took over) sends no newer
    /// one, and a ping that waited in our socket while we were stopped brings only what the peer
    /// thought then. A primary releases output only while this holds — even while its own pings
    /// are still answered, the standby may have given up.
    pub fn counted_alive_by_peer(&self) -> bool {
        self.now_us() < self.peer_counts_us_alive_until_us.load(Ordering::SeqCst)
    }

    /// How much longer the peer surely counts us alive ([`PeerLiveness::counted_alive_by_peer`]):
    /// never more than the failure timeout, whatever the peer says.
    pub fn counted_alive_by_peer_for(&self) -> Duration {
        let until = self.peer_counts_us_alive_until_us.load(Ordering::SeqCst);
        Duration::from_micros(until.saturating_sub(self.now_us()))
    }

    /// A fresh ping of the peer's says the newest of its pings whose echo it took was stamped
    /// `echoed_us` on its clock; `baseline` is the lowest offset (our clock − its stamp) lately.
    fn peer_took_echo_of(&self, echoed_us: u64, baseline: i64) {
        if echoed_us == 0 {
            return;
        }
        let until = (echoed_us as i64)
            .saturating_add(baseline)
            .saturating_sub(self.quickest_round_trip_us() as i64)
            .saturating_add(self.failure_timeout.as_micros() as i64);
        if until > 0 {
            self.peer_counts_us_alive_until_us
                .fetch_max(until as u64, Ordering::SeqCst);
        }
    }

    /// The stamp of our newest ping whose echo counts (after any stop of our clock), for our own
    /// pings to tell the peer.
    fn counted_echo_us(&self) -> u64 {
        let echoed = self.echoed_us.load(Ordering::SeqCst);
        if echoed > self.stale_before_us.load(Ordering::SeqCst) {
            echoed
        } else {
            0
        }
    }

    /// Whether the peer is known alive now: it echoed a ping we sent less than the failure
    /// timeout ago, and after our clock was last seen to have stopped.
    pub fn alive(&self) -> bool {
        let echoed = self.echoed_us.load(Ordering::SeqCst);
        echoed > self.stale_before_us.load(Ordering::SeqCst)
            && self.silent_for() < self.failure_timeout
    }

    /// Time since the ping the peer's newest echo carried (since we started, if none).
    pub fn silent_for(&self) -> Duration {
        let echoed = self.echoed_us.load(Ordering::SeqCst);
        Duration::from_micros(self.now_us().saturating_sub(echoed))
    }

    /// How long the peer has been silent while this end was running: the time since the newest
    /// echo or since this end last woke from a stall of its own, whichever is later. A peer is
    /// given up on only after that long (its echoes could not have come while we were stopped).
    pub fn silent_while_awake(&self) -> Duration {
        let since = self
            .echoed_us
            .load(Ordering::SeqCst)
            .max(self.awake_since_us.load(Ordering::SeqCst));
        Duration::from_micros(self.now_us().saturating_sub(since))
    }

    /// Whether the peer has ever echoed a ping.
    pub fn ever_echoed(&self) -> bool {
        self.echoed_us.load(Ordering::SeqCst) != 0
    }

    /// Times our clock was seen to have stopped while the peer's ran (a frozen host).
    pub fn clock_jumps(&self) -> u64 {
        self.clock_jumps.load(Ordering::SeqCst)
    }

    fn clock_stopped(&self) {
        self.clock_jumps.fetch_add(1, Ordering::SeqCst);
        self.stale_before_us.store(self.now_us(), Ordering::SeqCst);
    }

    /// Stops echoing the peer's pings: from now on its count of us as alive runs out.
    pub fn stop_answering(&self) {
        self.answering.store(false, Ordering::SeqCst);
    }

    fn answering(&self) -> bool {
        self.answering.load(Ordering::SeqCst)
    }

    /// Ends the probe loop (it neither pings nor echoes any more).
    pub fn stop(&self) {
        self.stop_answering();
        self.stop.store(true, Ordering::SeqCst);
    }

    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn peer(&self) -> Option<SocketAddr> {
        *self.peer.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What one probe loop needs.
pub struct ProbeLoop<'a> {
    pub socket: UdpSocket,
    /// Who we are: we take probes only from the other end.
    pub me: ProbeSender,
    pub session: u64,
    pub key: ProbeKey,
    pub interval: Duration,
    /// Where to ping; `None` until the peer's first ping says (the standby's case).
    pub peer: Option<SocketAddr>,
    pub liveness: &'a PeerLiveness,
    /// Called after every wake-up (a received probe or the next ping's time): the caller's checks.
    pub after_each: &'a mut dyn FnMut(&PeerLiveness),
}

impl ProbeLoop<'_> {
    /// Probes until [`PeerLiveness::stop`].
    pub fn run(self) {
        if let Some(peer) = self.peer {
            *self.liveness.peer.lock().unwrap_or_else(|e| e.into_inner()) = Some(peer);
        }
        let mut taker = ProbeTaker::new(
            self.key.clone(),
            self.session,
            self.me,
            self.liveness.failure_timeout,
        );
        let mut next_ping = Instant::now();
        let mut buf = [0u8; PROBE_LEN + 1];
        let mut refused = 0u64;
        // Waking this much later than asked means this end itself was stopped or starved.
        let stall = self.liveness.failure_timeout / 4;
        let mut last_turn = Instant::now();
        while !self.liveness.stopped() {
            let now = Instant::now();
            if now >= next_ping {
                if let Some(peer) = self.liveness.peer() {
                    self.send(ProbeKind::Ping, self.liveness.now_us(), peer);
                }
                next_ping += self.interval;
                if next_ping < now {
                    next_ping = now + self.interval;
                }
            }
            let wait = next_ping
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1));
            let _ = self.socket.set_read_timeout(Some(wait));
            match self.socket.recv_from(&mut buf) {
                Ok((n, from)) => match taker.take(self.liveness, &buf[..n], from) {
                    Ok(Some(echo)) => self.send(ProbeKind::Echo, echo, from),
                    Ok(None) => {}
                    Err(e) => {
                        refused += 1;
                        if refused.is_power_of_two() {
                            tracing::warn!(%from, refused, "a datagram that is not a probe of this session: {e}");
                        }
                    }
                },
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                // An ICMP error for an earlier datagram (the peer's port closed): nothing to do
                // but go on probing.
                Err(e) => {
                    tracing::debug!("heartbeat probe socket: {e}");
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            // The loop turns at least once an interval; a longer turn means this end was stopped.
            let turn = last_turn.elapsed();
            last_turn = Instant::now();
            if turn > self.interval + stall {
                tracing::warn!(
                    stalled_ms = turn.as_millis() as u64,
                    "this end did not run for a while: the peer's silence meanwhile is not counted"
                );
                self.liveness
                    .awake_since_us
                    .store(self.liveness.now_us(), Ordering::SeqCst);
            }
            (self.after_each)(self.liveness);
        }
    }

    fn send(&self, kind: ProbeKind, stamp_us: u64, to: SocketAddr) {
        let probe = Probe {
            kind,
            sender: self.me,
            session: self.session,
            stamp_us,
            echoed_us: match kind {
                ProbeKind::Ping => self.liveness.counted_echo_us(),
                ProbeKind::Echo => 0,
            },
        };
        // A lost datagram is what probes are made to survive; errors are not worth more than a
        // debug line (an unreachable peer shows as silence).
        if let Err(e) = self.socket.send_to(&probe.encode(&self.key), to) {
            tracing::debug!(%to, "heartbeat probe not sent: {e}");
        }
    }
}

/// What a probe loop does with each datagram it receives, apart from sending: it takes a probe of
/// this session from the other end into the [`PeerLiveness`], and says which of the peer's pings to
/// echo. Everything here is what the peer (or anyone on the path) sends, so it is fuzzed
/// (`fuzz/fuzz_targets/heartbeat_probes.rs`).
pub struct ProbeTaker {
    key: ProbeKey,
    session: u64,
    me: ProbeSender,
    jumps: ClockJumps,
}

/// Why a datagram was not taken.
#[derive(Debug, thiserror::Error)]
pub enum NotTaken {
    #[error("{0}")]
    NotAProbe(#[from] crate::wire::probe::ProbeError),
    #[error("a probe of another session or from this end")]
    Foreign,
    #[error("a probe whose clock readings no clock reaches (over 2^62 µs)")]
    Implausible,
}

/// The largest clock reading a probe may carry: µs since a process started, 146,000 years. Larger
/// ones would overflow the signed offsets between the two clocks.
const MAX_STAMP_US: u64 = 1 << 62;

impl ProbeTaker {
    pub fn new(key: ProbeKey, session: u64, me: ProbeSender, failure_timeout: Duration) -> Self {
        Self {
            key,
            session,
            me,
            jumps: ClockJumps::new(failure_timeout / 2),
        }
    }

    /// Takes `datagram` from `from` into `liveness`; `Some(stamp)`: echo the peer's ping of that
    /// stamp (when `liveness` still answers).
    pub fn take(
        &mut self,
        liveness: &PeerLiveness,
        datagram: &[u8],
        from: SocketAddr,
    ) -> Result<Option<u64>, NotTaken> {
        let probe = Probe::decode(datagram, &self.key)?;
        if probe.session != self.session || probe.sender == self.me {
            return Err(NotTaken::Foreign);
        }
        if probe.stamp_us > MAX_STAMP_US || probe.echoed_us > MAX_STAMP_US {
            return Err(NotTaken::Implausible);
        }
        match probe.kind {
            ProbeKind::Echo => {
                liveness.echoed(probe.stamp_us);
                Ok(None)
            }
            ProbeKind::Ping => {
                let newest = liveness
                    .peer_stamp_us
                    .fetch_max(probe.stamp_us, Ordering::SeqCst)
                    < probe.stamp_us;
                if newest {
                    // A fresh ping from the peer: where it is now, and how its clock ran against ours.
                    *liveness.peer.lock().unwrap_or_else(|e| e.into_inner()) = Some(from);
                    if self.jumps.observe(liveness.now_us(), probe.stamp_us) {
                        tracing::warn!(
                            "this host's clock stood still while the peer's ran (a frozen host?): \
                             only fresh answers count from now on"
                        );
                        liveness.clock_stopped();
                    }
                    let now = liveness.now_us();
                    let baseline = self
                        .jumps
                        .baseline()
                        .unwrap_or(now as i64 - probe.stamp_us as i64);
                    // The peer can only have taken the echo of a ping it sent no later than this one.
                    liveness.peer_took_echo_of(probe.echoed_us.min(probe.stamp_us), baseline);
                }
                Ok(liveness.answering().then_some(probe.stamp_us))
            }
        }
    }
}

/// Detects that our clock stood still while the peer's ran: each fresh ping gives
/// `offset = our clock at arrival − the peer's stamp`, which stays within the network's delay
/// variation of a constant while both clocks run. A stop of our clock lowers it by the time
/// stopped. The baseline is the lowest offset of the last few seconds (so slow drift between two
/// clocks never adds up to a jump); an offset below it by more than `threshold` is a jump.
pub struct ClockJumps {
    threshold_us: i64,
    /// (second of our clock, lowest offset seen in it), for the last [`Self::WINDOW_SECONDS`].
    window: VecDeque<(u64, i64)>,
}

impl ClockJumps {
    const WINDOW_SECONDS: u64 = 10;

    pub fn new(threshold: Duration) -> Self {
        Self {
            threshold_us: threshold.as_micros().min(i64::MAX as u128) as i64,
            window: VecDeque::new(),
        }
    }

    /// The lowest offset (our clock at arrival − the peer's stamp, µs) seen lately: the peer's
    /// clock on ours, plus the quickest trip.
    pub fn baseline(&self) -> Option<i64> {
        self.window.iter().map(|(_, o)| *o).min()
    }

    /// A fresh ping stamped `peer_us` arrived at `our_us`; whether our clock jumped back against
    /// the peer's since the baseline.
    pub fn observe(&mut self, our_us: u64, peer_us: u64) -> bool {
        let offset = our_us as i64 - peer_us as i64;
        let second = our_us / 1_000_000;
        while self
            .window
            .front()
            .is_some_and(|(s, _)| *s + Self::WINDOW_SECONDS <= second)
        {
            self.window.pop_front();
        }
        let baseline = self.window.iter().map(|(_, o)| *o).min();
        if baseline.is_some_and(|b| offset < b - self.threshold_us) {
            // A new baseline from here.
            self.window.clear();
            self.window.push_back((second, offset));
            return true;
        }
        match self.window.back_mut() {
            Some((s, lowest)) if *s == second => *lowest = (*lowest).min(offset),
            _ => self.window.push_back((second, offset)),
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer holding the session's key whose pings claim it took the echo of a ping from after
    /// the ping itself (a bug, or a clock gone wrong) extends nothing past its failure timeout:
    /// the primary's permission to release output stays bounded.
    #[test]
    fn a_pings_claim_is_bounded_by_the_ping_itself() {
        let timeout = Duration::from_millis(100);
        let l = PeerLiveness::new(timeout);
        let key = ProbeKey::new(&[7; 32]);
        let mut taker = ProbeTaker::new(key.clone(), 9, ProbeSender::Primary, timeout);
        let from: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let ping = |stamp_us, echoed_us| {
            Probe {
                kind: ProbeKind::Ping,
                sender: ProbeSender::Standby,
                session: 9,
                stamp_us,
                echoed_us,
            }
            .encode(&key)
        };
        assert_eq!(
            taker.take(&l, &ping(1_000, 500), from).unwrap(),
            Some(1_000)
        );
        assert_eq!(
            taker.take(&l, &ping(2_000, u64::MAX / 4), from).unwrap(),
            Some(2_000)
        );
        assert!(
            l.counted_alive_by_peer_for() <= timeout,
            "the peer's word counts us alive for {:?}",
            l.counted_alive_by_peer_for()
        );
        // Another session's probe, or our own sent back, is not taken.
        let foreign = Probe {
            kind: ProbeKind::Ping,
            sender: ProbeSender::Primary,
            session: 9,
            stamp_us: 3_000,
            echoed_us: 0,
        };
        assert!(matches!(
            taker.take(&l, &foreign.encode(&key), from),
            Err(NotTaken::Foreign)
        ));
        assert!(matches!(
            taker.take(&l, b"not a probe", from),
            Err(NotTaken::NotAProbe(_))
        ));
        // Clock readings past any clock (found by fuzz/fuzz_targets/heartbeat_probes.rs: they
        // wrapped the signed offset between the clocks and counted us alive for 25,000 years).
        let wrapped = ping((1 << 63) + 5_000, 1 << 63);
        assert!(matches!(
            taker.take(&l, &wrapped, from),
            Err(NotTaken::Implausible)
        ));
        assert!(l.counted_alive_by_peer_for() <= timeout);
    }

    #[test]
    fn liveness_lasts_a_failure_timeout_after_the_echoed_ping() {
        let l = PeerLiveness::new(Duration::from_millis(50));
        assert!(!l.alive(), "no echo yet");
        let sent = l.now_us();
        l.echoed(sent);
        assert!(l.alive());
        // An old echo arriving late does not move liveness back.
        l.echoed(1);
        assert!(l.alive());
        std::thread::sleep(Duration::from_millis(60));
        assert!(!l.alive(), "the echoed ping is older than the timeout");
        // An echo can never claim a ping from the future.
        l.echoed(u64::MAX);
        assert!(l.silent_for() < Duration::from_millis(5));
    }

    /// The peer counts us alive until its timeout after the newest of its pings whose echo it took,
    /// which its pings tell: our bound on that leaves room for the quickest trip, and only newer
    /// news extends it.
    #[test]
    fn counted_alive_by_the_peer_until_its_timeout_after_the_echo_it_took() {
        let l = PeerLiveness::new(Duration::from_millis(100));
        assert!(!l.counted_alive_by_peer(), "no news yet");
        // The quickest round trip: 10 ms.
        let sent = l.now_us();
        std::thread::sleep(Duration::from_millis(10));
        l.echoed(sent);
        // Its clock 1 s ahead of ours (offset −1 s); it took the echo of its ping stamped now.
        let offset = -1_000_000i64;
        let its_now = (l.now_us() as i64 - offset) as u64;
        l.peer_took_echo_of(its_now, offset);
        assert!(l.counted_alive_by_peer(), "for about 100 − 10 ms more");
        std::thread::sleep(Duration::from_millis(95));
        assert!(!l.counted_alive_by_peer(), "past its timeout less a trip");
        // Older news (a ping that waited in our socket) brings nothing back.
        l.peer_took_echo_of(its_now, offset);
        assert!(!l.counted_alive_by_peer());
        // No echo taken yet: no news.
        l.peer_took_echo_of(0, offset);
        assert!(!l.counted_alive_by_peer());
    }

    #[test]
    fn after_a_clock_stop_only_fresh_echoes_count() {
        let l = PeerLiveness::new(Duration::from_secs(10));
        let before = l.now_us();
        l.echoed(before);
        assert!(l.alive());
        std::thread::sleep(Duration::from_millis(2));
        l.clock_stopped();
        assert!(!l.alive(), "the echo predates the stop");
        assert!(
            l.silent_for() < Duration::from_secs(1),
            "silence is not made up"
        );
        std::thread::sleep(Duration::from_millis(2));
        l.echoed(l.now_us());
        assert!(l.alive());
        assert_eq!(l.clock_jumps(), 1);
    }

    /// Pings every 18 ms with delays of 0–60 ms (jitter), the peer's clock 5 s ahead: feeds `n`
    /// of them from `(ours, peer)` and returns where the clocks are then.
    fn feed(j: &mut ClockJumps, n: u64, mut ours: u64, mut peer: u64) -> (u64, u64) {
        for i in 0..n {
            let delay = (i * 7919) % 60_000;
            assert!(!j.observe(ours + delay, peer), "a jump seen at ping {i}");
            ours += 18_000;
            peer += 18_000;
        }
        (ours, peer)
    }

    #[test]
    fn jitter_and_the_peers_clock_stopping_are_not_jumps() {
        let mut j = ClockJumps::new(Duration::from_millis(90));
        let (ours, peer) = feed(&mut j, 2000, 1_000_000, 6_000_000);
        // The peer's clock stops for 1 s (its host froze): its stamps fall behind, offsets rise.
        feed(&mut j, 2000, ours, peer - 1_000_000);
    }

    #[test]
    fn our_clock_stopping_is_a_jump_once() {
        let mut j = ClockJumps::new(Duration::from_millis(90));
        let (ours, peer) = feed(&mut j, 500, 1_000_000, 6_000_000);
        // Ours stands still for 1 s while the peer's runs.
        assert!(j.observe(ours, peer + 1_000_000), "our clock stood still");
        // The new baseline holds from then on.
        feed(&mut j, 500, ours + 18_000, peer + 1_018_000);
    }

    #[test]
    fn slow_drift_is_never_a_jump() {
        // The peer's clock 500 ppm fast, for ten minutes.
        let mut j = ClockJumps::new(Duration::from_millis(90));
        let (mut ours, mut peer) = (0u64, 0u64);
        for _ in 0..(600_000_000 / 18_000) {
            assert!(!j.observe(ours, peer));
            ours += 18_000;
            peer += 18_009;
        }
    }
}
