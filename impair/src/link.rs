//! Link impairment: loss, delay, jitter, reordering, duplication, rate limits and cuts applied to
//! the packets of the current network namespace that match a selector (ports, a peer).
//!
//! This host's kernel has no `netem` qdisc, so packets are impaired in user space through NFQUEUE:
//! iptables rules in OUTPUT and/or INPUT send the selected packets to a queue this process serves
//! ([`rules`]), the [`schedule`]r decides each packet's fate and release time, and the queue handler
//! ([`queue`]) gives the kernel each packet's verdict when it is due. Rules are tagged with the
//! process's pid and removed on every exit path but SIGKILL; they use `--queue-bypass`, so traffic
//! passes if the process dies without removing them.
//!
//! [`run`] impairs in this process (the `ftvmm-impair link` command). Tests run it as a child in a
//! namespace with [`spawn_in_netns`], which waits until the rules are in place.

pub mod inject;
pub mod queue;
pub mod rules;
pub mod schedule;
mod spawn;

use std::collections::BTreeSet;
use std::io;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::rng::Rng;
use queue::{Capture, Handler, Lane, PacketQueue, QueueConfig};
use rules::{InstalledRules, Selector};
use schedule::{Policy, RateLimit, Scheduler};

pub use rules::{remove_stale, rule_tag, Queues};
pub use spawn::{impair_bin, spawn_in_netns, spawn_in_netns_using, RunningImpairment};

/// Which packets of the namespace are impaired, by the way they go.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Direction {
    /// Packets sent from this namespace (iptables OUTPUT).
    Out,
    /// Packets received by this namespace (iptables INPUT).
    In,
    /// Both.
    #[default]
    Both,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Self::Out => "out",
            Self::In => "in",
            Self::Both => "both",
        }
    }
}

/// What to impair and how: the options of `ftvmm-impair link`.
#[derive(Clone, Debug, PartialEq, clap::Args)]
pub struct LinkImpairment {
    /// Impair TCP and UDP packets with this source or destination port (repeatable).
    ///
    /// Example: --port 7100 --port 7101
    #[arg(long = "port", value_name = "N")]
    pub ports: Vec<u16>,
    /// Impair only packets to (out) or from (in) this IPv4 address; without --port, every protocol.
    ///
    /// Example: --peer 10.99.1.2
    #[arg(long, value_name = "IP")]
    pub peer: Option<Ipv4Addr>,
    /// Which way the impaired packets go: out (sent), in (received) or both.
    ///
    /// Example: --direction out
    #[arg(long, value_enum, default_value_t = Direction::Both)]
    pub direction: Direction,
    /// Drop this percentage of the packets at random.
    ///
    /// Example: --loss 1.5
    #[arg(long, value_name = "PCT", default_value_t = 0.0, value_parser = parse_percent)]
    pub loss: f64,
    /// Hold each packet this many milliseconds (sent packets are copied, dropped and the copy
    /// re-sent when due, so that the sending socket is not throttled).
    ///
    /// Example: --delay 40
    #[arg(long = "delay", value_name = "MS", default_value_t = 0)]
    pub delay_ms: u64,
    /// Add a uniform random -MS..+MS to each packet's delay; packets are released at their own
    /// times, so they are reordered (unless --keep-order).
    ///
    /// Example: --delay 40 --jitter 10
    #[arg(long = "jitter", value_name = "MS", default_value_t = 0)]
    pub jitter_ms: u64,
    /// Never release a packet before one that arrived earlier: jitter bunches packets instead of
    /// reordering them.
    ///
    /// Example: --delay 40 --jitter 10 --keep-order
    #[arg(long)]
    pub keep_order: bool,
    /// Send this percentage of the outgoing packets twice (egress only: the copy is re-injected
    /// through a raw socket).
    ///
    /// Example: --duplicate 5
    #[arg(long, value_name = "PCT", default_value_t = 0.0, value_parser = parse_percent)]
    pub duplicate: f64,
    /// Release packets no faster than this many kilobits (1000 bits) per second, in each direction
    /// (token bucket, bursts of 10 ms).
    ///
    /// Example: --rate 100000 (100 Mbit/s)
    #[arg(long = "rate", value_name = "KBIT", value_parser = clap::value_parser!(u64).range(1..))]
    pub rate_kbit: Option<u64>,
    /// With --rate: drop packets that would wait longer than this for the token bucket, which
    /// bounds the backlog (as tbf's latency).
    ///
    /// Example: --rate 8000 --rate-latency 200
    #[arg(long = "rate-latency", value_name = "MS", default_value_t = 1000)]
    pub rate_latency_ms: u64,
    /// Drop every selected packet: a one-way cut with --direction out or in, a two-way cut with
    /// both.
    ///
    /// Example: --cut --direction out
    #[arg(long)]
    pub cut: bool,
    /// Stop after this many seconds (otherwise at SIGINT or SIGTERM).
    ///
    /// Example: --for 600
    #[arg(long = "for", value_name = "SECONDS")]
    pub duration_secs: Option<f64>,
    /// Use this NFQUEUE number (and the next one for received packets with --direction both)
    /// instead of the first free ones from 4100.
    ///
    /// Example: --queue 4200
    #[arg(long = "queue", value_name = "N")]
    pub queue: Option<u16>,
    /// The kernel queue's length in packets; held packets count against it and packets that find
    /// it full pass unimpaired.
    ///
    /// Example: --queue-len 200000
    #[arg(long = "queue-len", value_name = "PACKETS", default_value_t = 65536)]
    pub queue_len: u32,
    /// Seed of the random choices (loss, jitter, duplication), for a reproducible run.
    ///
    /// Example: --seed 42
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,
}

impl Default for LinkImpairment {
    fn default() -> Self {
        Self {
            ports: Vec::new(),
            peer: None,
            direction: Direction::Both,
            loss: 0.0,
            delay_ms: 0,
            jitter_ms: 0,
            keep_order: false,
            duplicate: 0.0,
            rate_kbit: None,
            rate_latency_ms: 1000,
            cut: false,
            duration_secs: None,
            queue: None,
            queue_len: 65536,
            seed: None,
        }
    }
}

fn parse_percent(s: &str) -> Result<f64, String> {
    let value: f64 = s
        .parse()
        .map_err(|e| format!("{s:?} is not a number: {e}"))?;
    if (0.0..=100.0).contains(&value) {
        Ok(value)
    } else {
        Err(format!("{value} is not a percentage between 0 and 100"))
    }
}

impl LinkImpairment {
    /// Refuses impairments that cannot be done as asked.
    pub fn validate(&self) -> Result<(), Error> {
        if self.ports.is_empty() && self.peer.is_none() {
            return Err(Error::NoSelector);
        }
        if self.duplicate > 0.0 && self.direction == Direction::In {
            return Err(Error::DuplicateIngress);
        }
        if self.direction == Direction::Both && self.queue == Some(u16::MAX) {
            return Err(Error::QueueRange);
        }
        Ok(())
    }

    /// The command-line arguments after `link` that give this impairment.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        let mut push = |name: &str, value: String| {
            args.push(format!("--{name}"));
            args.push(value);
        };
        for port in &self.ports {
            push("port", port.to_string());
        }
        if let Some(peer) = self.peer {
            push("peer", peer.to_string());
        }
        push("direction", self.direction.as_str().to_string());
        push("loss", self.loss.to_string());
        push("delay", self.delay_ms.to_string());
        push("jitter", self.jitter_ms.to_string());
        push("duplicate", self.duplicate.to_string());
        if let Some(rate) = self.rate_kbit {
            push("rate", rate.to_string());
        }
        push("rate-latency", self.rate_latency_ms.to_string());
        if let Some(secs) = self.duration_secs {
            push("for", secs.to_string());
        }
        if let Some(queue) = self.queue {
            push("queue", queue.to_string());
        }
        push("queue-len", self.queue_len.to_string());
        if let Some(seed) = self.seed {
            push("seed", seed.to_string());
        }
        if self.keep_order {
            args.push("--keep-order".into());
        }
        if self.cut {
            args.push("--cut".into());
        }
        args
    }

    /// The scheduler's policy for these options.
    pub fn policy(&self) -> Policy {
        Policy {
            cut: self.cut,
            loss_percent: self.loss,
            delay: Duration::from_millis(self.delay_ms),
            jitter: Duration::from_millis(self.jitter_ms),
            keep_order: self.keep_order,
            rate: self.rate_kbit.map(|kbit| {
                RateLimit::from_kbit(kbit, Duration::from_millis(self.rate_latency_ms))
            }),
        }
    }
}

/// What happened to the queued packets, printed as one JSON line when `link` ends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Packets queued to us.
    pub seen: u64,
    /// Packets dropped (loss, cut, or a full rate backlog).
    pub dropped: u64,
    /// Packets held for a while (delay, jitter, rate) rather than decided at once.
    pub delayed: u64,
    /// Copies sent (each counts once more than `released`).
    pub duplicated: u64,
    /// Packets let through (held ones when released, and all held ones at exit).
    pub released: u64,
}

/// What [`run`] reports once its rules are in place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ready {
    /// The NFQUEUE numbers served.
    pub queues: Queues,
    /// How many iptables rules were inserted.
    pub rules: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "nothing selected: give --port or --peer (queueing every packet of the namespace is refused)"
    )]
    NoSelector,
    #[error("--duplicate applies to sent packets only: use --direction out or both")]
    DuplicateIngress,
    #[error("--queue 65535 leaves no number for the second queue of --direction both")]
    QueueRange,
    #[error("cannot run iptables: {source} (is Debian's iptables package installed?)")]
    IptablesSpawn { source: io::Error },
    #[error("iptables {args}: {stderr}")]
    Iptables { args: String, stderr: String },
    #[error("netfilter queue: {0} (root and CONFIG_NETFILTER_NETLINK_QUEUE are needed)")]
    Queue(io::Error),
    #[error("cannot bind netfilter queue {number}: {source} (is it served by another process?)")]
    Bind { number: u16, source: io::Error },
    #[error("raw socket for duplicates: {0}")]
    Injector(io::Error),
    #[error("no ftvmm-impair binary: set FTVMM_IMPAIR_BIN or build it (searched {searched:?})")]
    BinaryNotFound { searched: Vec<PathBuf> },
    #[error("cannot start ip netns exec {netns} ftvmm-impair: {source}")]
    Spawn { netns: String, source: io::Error },
    #[error("ftvmm-impair in {netns} did not get ready: {reason}; its stderr:\n{stderr}")]
    NotReady {
        netns: String,
        reason: String,
        stderr: String,
    },
    #[error("ftvmm-impair exited with {status}; its stderr:\n{stderr}")]
    Failed { status: ExitStatus, stderr: String },
    #[error("ftvmm-impair printed no counters; its stdout: {stdout:?}")]
    NoCounters { stdout: String },
    #[error(
        "ftvmm-impair in {netns} did not exit within {waited:?} of SIGTERM; its stderr:\n{stderr}"
    )]
    Hung {
        netns: String,
        waited: Duration,
        stderr: String,
    },
    #[error("waiting for ftvmm-impair: {0}")]
    Wait(io::Error),
    /// A failure once packets were being impaired; the counters up to then are kept.
    #[error("{source}")]
    AfterStart {
        counters: Counters,
        source: Box<Error>,
    },
}

/// Impairs this namespace's selected packets until `stop` is set or `--for` has passed, then
/// removes the rules, lets every held packet go, and returns the counters. `on_ready` is called
/// once the rules are in place.
///
/// Each direction has its own queue and scheduler: sent packets go to the first queue (`--queue`,
/// or the first free one), received ones to the next; a rate limit, keep-order and jitter apply
/// to each direction separately.
pub fn run(
    spec: &LinkImpairment,
    stop: &AtomicBool,
    on_ready: impl FnOnce(Ready),
) -> Result<Counters, Error> {
    spec.validate()?;
    let started = Instant::now();
    let deadline = spec
        .duration_secs
        .map(|secs| started + Duration::from_secs_f64(secs.max(0.0)));
    let egress = matches!(spec.direction, Direction::Out | Direction::Both);
    let ingress = matches!(spec.direction, Direction::In | Direction::Both);
    let holds = spec.delay_ms > 0 || spec.jitter_ms > 0 || spec.rate_kbit.is_some();
    let steal = egress && holds && !spec.cut;
    let duplicating = egress && spec.duplicate > 0.0;
    let injector = if steal || duplicating {
        Some(inject::Injector::open().map_err(Error::Injector)?)
    } else {
        None
    };
    let mut rng = match spec.seed {
        Some(seed) => Rng::from_seed(seed),
        None => Rng::from_entropy(),
    };
    let mut avoid: BTreeSet<u16> = rules::queues_in_use()?;
    let mut next_number = spec.queue;
    let mut open_lane = |capture, steal, duplicate, rng: &mut Rng| -> Result<Lane, Error> {
        let queue = PacketQueue::open(&QueueConfig {
            number: next_number,
            avoid: avoid.clone(),
            capture,
            max_len: spec.queue_len,
        })?;
        avoid.insert(queue.number());
        next_number = next_number.map(|n| n.wrapping_add(1));
        let scheduler = Scheduler::new(
            spec.policy(),
            Rng::from_seed(rng.next_u64()),
            Instant::now(),
        );
        Ok(Lane::new(queue, scheduler, steal, duplicate))
    };
    let mut lanes = Vec::new();
    let mut queues = Queues {
        egress: None,
        ingress: None,
    };
    if egress {
        let capture = if steal || duplicating {
            Capture::WholePackets
        } else {
            Capture::Headers
        };
        let lane = open_lane(capture, steal, spec.duplicate, &mut rng)?;
        queues.egress = Some(lane.queue_number());
        lanes.push(lane);
    }
    if ingress {
        let lane = open_lane(Capture::Headers, false, 0.0, &mut rng)?;
        queues.ingress = Some(lane.queue_number());
        lanes.push(lane);
    }
    let selector = Selector {
        ports: spec.ports.clone(),
        peer: spec.peer,
    };
    let tag = rule_tag(std::process::id());
    // The guard removes the rules even if serving fails or panics.
    let installed = InstalledRules::install(rules::rules_for(&selector, queues, &tag))?;
    on_ready(Ready {
        queues,
        rules: installed.len(),
    });
    let mut handler = Handler::new(lanes, Rng::from_seed(rng.next_u64()), injector);
    let served = handler.serve(stop, deadline);
    // Rules first, so no new packet is queued; then every packet still with us goes out.
    let removed = installed.remove();
    let counters = handler.flush();
    match served.and(removed) {
        Ok(()) => Ok(counters),
        Err(e) => Err(Error::AfterStart {
            counters,
            source: Box::new(e),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        spec: LinkImpairment,
    }

    fn parse(args: &[&str]) -> Result<LinkImpairment, clap::Error> {
        Cli::try_parse_from(std::iter::once("link").chain(args.iter().copied())).map(|c| c.spec)
    }

    #[test]
    fn args_round_trip() {
        let spec = LinkImpairment {
            ports: vec![7100, 7200],
            peer: Some(Ipv4Addr::new(10, 99, 1, 2)),
            direction: Direction::Out,
            loss: 1.5,
            delay_ms: 40,
            jitter_ms: 5,
            keep_order: true,
            duplicate: 2.0,
            rate_kbit: Some(8000),
            rate_latency_ms: 200,
            cut: true,
            duration_secs: Some(2.5),
            queue: Some(4321),
            queue_len: 1000,
            seed: Some(9),
        };
        let args = spec.to_args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_eq!(parse(&args).unwrap(), spec);
        let default_args = LinkImpairment::default().to_args();
        let default_args: Vec<&str> = default_args.iter().map(String::as_str).collect();
        assert_eq!(parse(&default_args).unwrap(), LinkImpairment::default());
        assert_eq!(parse(&[]).unwrap(), LinkImpairment::default());
    }

    #[test]
    fn percentages_are_checked() {
        assert!(parse(&["--loss", "101"]).is_err());
        assert!(parse(&["--loss", "-1"]).is_err());
        assert!(parse(&["--duplicate", "x"]).is_err());
        assert_eq!(parse(&["--loss", "100"]).unwrap().loss, 100.0);
        assert!(parse(&["--rate", "0"]).is_err());
    }

    #[test]
    fn validation_refuses_what_cannot_be_done() {
        let spec = LinkImpairment::default();
        assert!(matches!(spec.validate(), Err(Error::NoSelector)));
        let spec = LinkImpairment {
            ports: vec![1],
            duplicate: 10.0,
            direction: Direction::In,
            ..LinkImpairment::default()
        };
        assert!(matches!(spec.validate(), Err(Error::DuplicateIngress)));
        let spec = LinkImpairment {
            peer: Some(Ipv4Addr::LOCALHOST),
            ..LinkImpairment::default()
        };
        assert!(spec.validate().is_ok());
    }

    #[test]
    fn policy_follows_the_options() {
        let spec = LinkImpairment {
            ports: vec![1],
            delay_ms: 40,
            jitter_ms: 10,
            rate_kbit: Some(8),
            rate_latency_ms: 300,
            ..LinkImpairment::default()
        };
        let policy = spec.policy();
        assert_eq!(policy.delay, Duration::from_millis(40));
        assert_eq!(policy.jitter, Duration::from_millis(10));
        let rate = policy.rate.unwrap();
        assert_eq!(rate.bytes_per_sec, 1000.0);
        assert_eq!(rate.max_wait, Duration::from_millis(300));
    }

    #[test]
    fn counters_are_one_json_line() {
        let counters = Counters {
            seen: 5,
            dropped: 1,
            delayed: 2,
            duplicated: 0,
            released: 4,
        };
        let line = serde_json::to_string(&counters).unwrap();
        assert_eq!(
            line,
            r#"{"seen":5,"dropped":1,"delayed":2,"duplicated":0,"released":4}"#
        );
        assert_eq!(serde_json::from_str::<Counters>(&line).unwrap(), counters);
    }
}
