//! Fault injection for testing protection under real network faults.
//!
//! - [`link`]: impairs the packets of the current network namespace that match a selector (loss,
//!   delay and jitter, reordering, duplication, rate limits, one- and two-way cuts) through
//!   NFQUEUE, since this host's kernel has no `netem`. Run in-process with [`link::run`], or as a
//!   child in a namespace with [`link::spawn_in_netns`].
//! - [`proxy`]: a TCP proxy whose replies can be delayed, lost after the request was applied, or
//!   swallowed, for the etcd witness's HTTP connections.
//!
//! The `ftvmm-impair` binary exposes both (docs/impairment.md).

pub mod link;
pub mod proxy;
mod rng;
