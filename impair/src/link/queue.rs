//! The NFQUEUE handler: receives the queued packets, hands each to the [`Scheduler`] of its
//! direction (a [`Lane`]), and gives the kernel each packet's verdict when the scheduler releases
//! or drops it.
//!
//! Sent packets that may be held (delay, jitter, rate) are *stolen* rather than held: copied whole,
//! the original dropped at once, and the copy sent through a raw socket when released. A locally
//! sent packet held in the kernel's queue keeps counting against its TCP socket's small-queue
//! budget (TSQ, about 1 ms of the socket's rate), so holding it for milliseconds throttles the
//! sender to a trickle (netem avoids this by orphaning the packets it delays; NFQUEUE cannot).
//! Received packets are held in the kernel and given their verdict when due.
//!
//! Throughput matters (a checkpoint stream runs at tens of MB/s), so:
//!
//! - where the payload is not needed only the first [`HEADER_COPY`] bytes of a packet are copied
//!   (the kernel then also reports its full length, which the token bucket needs), and the queue
//!   takes GSO packets whole (`NFQA_CFG_F_GSO`): one verdict for up to 64 KiB, and no software
//!   checksumming in the kernel;
//! - the kernel queue is long, the socket's receive buffer large, and the queue fails open: a
//!   packet that finds the queue full passes unimpaired instead of being dropped.
//!
//! The `nfq` crate does the netlink work but does not expose its socket, which a timed wait needs
//! (`poll` until the next release or the next packet). We find the socket by its identity: the one
//! netfilter-netlink socket that appeared in `/proc/self/fd` while the queue was opened.

use std::collections::BTreeSet;
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nfq::{Message, Queue, Verdict};

use super::inject::Injector;
use super::schedule::{Outcome, Scheduler};
use super::{Counters, Error};
use crate::rng::Rng;

/// Bytes of each packet copied to us when the payload is not needed: enough for the IPv4 and
/// TCP/UDP headers.
const HEADER_COPY: u16 = 64;
/// Bytes copied when whole packets are needed: any IPv4 packet (segmented, they are at most the
/// route's MTU: 64 KiB on loopback).
const PACKET_COPY: u16 = u16::MAX;
/// The first queue number tried when none is given.
const FIRST_QUEUE: u16 = 4100;
/// How many queue numbers are tried before giving up.
const QUEUE_TRIES: u16 = 1000;
/// The netlink socket's receive buffer (the kernel's copy of queued packets waits there).
const RECEIVE_BUFFER: libc::c_int = 32 << 20;
/// Packets taken from the socket before releases are looked at again.
const RECEIVE_BATCH: usize = 256;
/// Receive errors in a row after which the queue is taken for broken.
const MAX_ERRORS_IN_A_ROW: u32 = 100;
/// The longest sleep of the serving loop, so that a stop request is seen promptly.
const MAX_SLEEP: Duration = Duration::from_millis(100);

/// How much of each packet the kernel copies to us.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Capture {
    /// The first [`HEADER_COPY`] bytes (and the length); GSO packets come whole.
    Headers,
    /// Whole packets, segmented and with their checksums done: for copies sent again.
    WholePackets,
}

/// How the queue is set up.
pub struct QueueConfig {
    /// The queue number, or `None` to take a free one.
    pub number: Option<u16>,
    /// Queue numbers not to take (referenced by rules already, or taken by the other lane).
    pub avoid: BTreeSet<u16>,
    pub capture: Capture,
    /// The kernel's queue length in packets (held packets count against it).
    pub max_len: u32,
}

/// A bound NFQUEUE and its netlink socket.
pub struct PacketQueue {
    queue: Queue,
    fd: RawFd,
    number: u16,
    /// Receive errors since the last packet (see [`PacketQueue::try_recv`]).
    errors_in_a_row: u32,
}

/// The netfilter-netlink sockets this process has open.
fn netfilter_sockets() -> io::Result<BTreeSet<RawFd>> {
    let mut sockets = BTreeSet::new();
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let Some(fd) = entry?
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<RawFd>().ok())
        else {
            continue;
        };
        let domain = socket_option(fd, libc::SO_DOMAIN);
        let protocol = socket_option(fd, libc::SO_PROTOCOL);
        if domain == Some(libc::AF_NETLINK) && protocol == Some(libc::NETLINK_NETFILTER) {
            sockets.insert(fd);
        }
    }
    Ok(sockets)
}

/// An integer `SOL_SOCKET` option of `fd`, or `None` if `fd` is not a socket (or is gone).
fn socket_option(fd: RawFd, option: libc::c_int) -> Option<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `value`, a live local of that size; an fd
    // that is not a socket only makes it fail.
    let ret = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    (ret == 0).then_some(value)
}

impl PacketQueue {
    /// Opens a netfilter queue socket in the current namespace and binds it to a queue number.
    pub fn open(config: &QueueConfig) -> Result<Self, Error> {
        let before = netfilter_sockets().map_err(Error::Queue)?;
        let mut queue = Queue::open().map_err(Error::Queue)?;
        let after = netfilter_sockets().map_err(Error::Queue)?;
        let new: Vec<RawFd> = after.difference(&before).copied().collect();
        let [fd] = new[..] else {
            return Err(Error::Queue(io::Error::other(format!(
                "cannot tell the queue's socket among {new:?}"
            ))));
        };
        let candidates: Vec<u16> = match config.number {
            Some(n) => vec![n],
            None => (FIRST_QUEUE..FIRST_QUEUE + QUEUE_TRIES)
                .filter(|n| !config.avoid.contains(n))
                .collect(),
        };
        let mut last_error = None;
        let mut bound = None;
        for number in candidates {
            // Another process's queue refuses the bind (EPERM): try the next number.
            match queue.bind(number) {
                Ok(()) => {
                    bound = Some(number);
                    break;
                }
                Err(e) => last_error = Some((number, e)),
            }
        }
        let Some(number) = bound else {
            let (number, source) = last_error.expect("at least one queue number was tried");
            return Err(Error::Bind { number, source });
        };
        let whole = config.capture == Capture::WholePackets;
        let copy = if whole { PACKET_COPY } else { HEADER_COPY };
        let configure = |queue: &mut Queue| -> io::Result<()> {
            queue.set_copy_range(number, copy)?;
            queue.set_fail_open(number, true)?;
            queue.set_queue_max_len(number, config.max_len)?;
            // Whole GSO packets are delivered with checksums not yet computed: fine for a verdict,
            // not for a copy sent again.
            queue.set_recv_gso(number, !whole)?;
            Ok(())
        };
        configure(&mut queue).map_err(Error::Queue)?;
        queue.set_nonblocking(true);
        set_receive_buffer(fd, RECEIVE_BUFFER);
        Ok(Self {
            queue,
            fd,
            number,
            errors_in_a_row: 0,
        })
    }

    /// The queue number the rules must send packets to.
    pub fn number(&self) -> u16 {
        self.number
    }

    /// The next queued packet, if one is waiting.
    ///
    /// Netlink reports a failed verdict (say, for a packet the kernel no longer has) as an error
    /// message on the socket, which `recv` returns as an error: one is noted and passed over; only
    /// a run of them (a broken socket) is fatal.
    fn try_recv(&mut self) -> io::Result<Option<Message>> {
        match self.queue.recv() {
            Ok(message) => {
                self.errors_in_a_row = 0;
                Ok(Some(message))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(None),
            Err(e) => {
                self.errors_in_a_row += 1;
                if self.errors_in_a_row > MAX_ERRORS_IN_A_ROW {
                    return Err(e);
                }
                eprintln!("ftvmm-impair: queue {}: {e}", self.number);
                Ok(None)
            }
        }
    }

    /// Gives a packet its verdict. A verdict the kernel no longer wants (the packet is gone) is
    /// not an error worth stopping for.
    fn verdict(&mut self, mut message: Message, verdict: Verdict) {
        message.set_verdict(verdict);
        if let Err(e) = self.queue.verdict(message) {
            eprintln!("ftvmm-impair: verdict: {e}");
        }
    }
}

/// Asks for a large receive buffer, beyond `rmem_max` if we may (root), else as large as allowed.
fn set_receive_buffer(fd: RawFd, bytes: libc::c_int) {
    for option in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: setsockopt reads one c_int from `bytes`, a live local of the given size.
        let ret = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                option,
                (&bytes as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if ret == 0 {
            return;
        }
    }
}

/// Waits until one of `fds` is readable or `timeout` passes (or a signal arrives).
fn wait_readable(fds: &[RawFd], timeout: Duration) -> io::Result<()> {
    let mut poll_fds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let timeout = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: ppoll reads and writes `poll_fds.len()` pollfds in the live vector and reads the
    // timeout from a live local; a null sigmask keeps the signal mask unchanged.
    let ret = unsafe {
        libc::ppoll(
            poll_fds.as_mut_ptr(),
            poll_fds.len() as libc::nfds_t,
            &timeout,
            std::ptr::null(),
        )
    };
    if ret < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
}

/// A packet the scheduler holds: still in the kernel's queue, awaiting its verdict, or stolen —
/// copied, the original dropped at once, the copy sent by us when released.
pub enum Packet {
    Queued(Message),
    Stolen(Vec<u8>),
}

impl Packet {
    fn bytes(&self) -> &[u8] {
        match self {
            Self::Queued(message) => message.get_payload(),
            Self::Stolen(bytes) => bytes,
        }
    }
}

/// A packet in the scheduler and whether a copy goes out with it.
pub struct Held {
    packet: Packet,
    duplicate: bool,
}

/// One way of traffic (sent or received): its queue, its scheduler, and how its packets are
/// treated.
pub struct Lane {
    queue: PacketQueue,
    scheduler: Scheduler<Held>,
    /// Steal packets instead of holding them in the kernel. A locally sent packet held in the
    /// kernel's queue still counts against its socket's TCP Small Queues budget (about 1 ms of the
    /// socket's rate), so delaying it throttles the sender to a trickle; a stolen packet's
    /// original is freed at once. Needs [`Capture::WholePackets`].
    steal: bool,
    /// Percentage of packets sent twice (sent packets only). Needs [`Capture::WholePackets`].
    duplicate_percent: f64,
}

impl Lane {
    /// The queue number the rules must send this lane's packets to.
    pub fn queue_number(&self) -> u16 {
        self.queue.number()
    }

    pub fn new(
        queue: PacketQueue,
        scheduler: Scheduler<Held>,
        steal: bool,
        duplicate_percent: f64,
    ) -> Self {
        Self {
            queue,
            scheduler,
            steal,
            duplicate_percent,
        }
    }
}

/// Decides, applies and counts what happens to queued packets.
pub struct Handler {
    lanes: Vec<Lane>,
    /// Draws duplication choices.
    rng: Rng,
    /// Sends copies (duplicates, stolen packets); present when a lane needs it.
    injector: Option<Injector>,
    counters: Counters,
    send_errors: u64,
}

impl Handler {
    pub fn new(lanes: Vec<Lane>, rng: Rng, injector: Option<Injector>) -> Self {
        Self {
            lanes,
            rng,
            injector,
            counters: Counters::default(),
            send_errors: 0,
        }
    }

    /// Serves the queues until `stop` is set or `deadline` passes.
    pub fn serve(&mut self, stop: &AtomicBool, deadline: Option<Instant>) -> Result<(), Error> {
        let fds: Vec<RawFd> = self.lanes.iter().map(|lane| lane.queue.fd).collect();
        let mut due = Vec::new();
        loop {
            let now = Instant::now();
            if stop.load(Ordering::Relaxed) || deadline.is_some_and(|d| now >= d) {
                return Ok(());
            }
            let mut wake = now + MAX_SLEEP;
            if let Some(d) = deadline {
                wake = wake.min(d);
            }
            for lane in &self.lanes {
                if let Some(next) = lane.scheduler.next_due() {
                    wake = wake.min(next);
                }
            }
            if wake > now {
                wait_readable(&fds, wake - now).map_err(Error::Queue)?;
            }
            for lane in 0..self.lanes.len() {
                for _ in 0..RECEIVE_BATCH {
                    let Some(message) = self.lanes[lane].queue.try_recv().map_err(Error::Queue)?
                    else {
                        break;
                    };
                    self.admit(lane, message);
                }
                self.lanes[lane]
                    .scheduler
                    .release_due(Instant::now(), &mut due);
                for outcome in due.drain(..) {
                    self.apply(lane, outcome);
                }
            }
        }
    }

    fn admit(&mut self, lane_index: usize, message: Message) {
        self.counters.seen += 1;
        let can_send = self.injector.is_some();
        let lane = &mut self.lanes[lane_index];
        let len = message.get_original_len();
        let whole = message.get_payload().len() == len;
        let duplicate = can_send && whole && self.rng.chance(lane.duplicate_percent);
        let packet = if lane.steal && can_send && whole {
            let copy = message.get_payload().to_vec();
            lane.queue.verdict(message, Verdict::Drop);
            Packet::Stolen(copy)
        } else {
            Packet::Queued(message)
        };
        let held = Held { packet, duplicate };
        match lane.scheduler.admit(Instant::now(), len, held) {
            Some(outcome) => self.apply(lane_index, outcome),
            None => self.counters.delayed += 1,
        }
    }

    fn apply(&mut self, lane: usize, outcome: Outcome<Held>) {
        match outcome {
            Outcome::Drop(held) => {
                self.counters.dropped += 1;
                if let Packet::Queued(message) = held.packet {
                    self.lanes[lane].queue.verdict(message, Verdict::Drop);
                }
            }
            Outcome::Release(held) => self.release(lane, held),
        }
    }

    fn release(&mut self, lane: usize, held: Held) {
        if held.duplicate && self.send(held.packet.bytes()) {
            self.counters.duplicated += 1;
        }
        self.counters.released += 1;
        match held.packet {
            Packet::Queued(message) => self.lanes[lane].queue.verdict(message, Verdict::Accept),
            Packet::Stolen(bytes) => {
                self.send(&bytes);
            }
        }
    }

    /// Sends a copy of a packet; false (and a note on stderr, now and then) if it failed.
    fn send(&mut self, packet: &[u8]) -> bool {
        let Some(injector) = &self.injector else {
            return false;
        };
        match injector.send_copy(packet) {
            Ok(()) => true,
            Err(e) => {
                self.send_errors += 1;
                if self.send_errors.is_power_of_two() {
                    eprintln!(
                        "ftvmm-impair: sending a packet copy: {e} ({} failures)",
                        self.send_errors
                    );
                }
                false
            }
        }
    }

    /// After the rules are gone: lets every held packet go, then whatever is still queued in the
    /// kernel (packets queued just before the rules went), so that no packet is lost to the queues
    /// closing (the kernel drops what is pending on a closed queue). Returns the counters.
    pub fn flush(mut self) -> Counters {
        for lane in 0..self.lanes.len() {
            for held in self.lanes[lane].scheduler.drain() {
                self.release(lane, held);
            }
        }
        let fds: Vec<RawFd> = self.lanes.iter().map(|lane| lane.queue.fd).collect();
        let quiet_for = Duration::from_millis(50);
        let mut last_packet = Instant::now();
        while last_packet.elapsed() < quiet_for {
            if wait_readable(&fds, Duration::from_millis(10)).is_err() {
                break;
            }
            for lane in &mut self.lanes {
                while let Ok(Some(message)) = lane.queue.try_recv() {
                    self.counters.seen += 1;
                    self.counters.released += 1;
                    lane.queue.verdict(message, Verdict::Accept);
                    last_packet = Instant::now();
                }
            }
        }
        self.counters
    }
}
