//! The mode table: `mode=<name>` on the command line picks one; `hello` is the default.
//! To add a mode: add a file with `pub const MODE: Mode`, and list it in `MODES`.
//! A mode's `run` returns when it is done; the caller then powers off. Modes print their
//! markers as `testguest: ...` lines.

use crate::cmdline::Cmdline;

pub mod blk;
pub mod crash;
pub mod dirtier;
pub mod disk_storm;
pub mod emulate;
pub mod hello;
pub mod info;
pub mod net;
pub mod pm_flood;
pub mod smp;
pub mod spin;
pub mod triple;

/// One workload the guest can run.
pub struct Mode {
    pub name: &'static str,
    /// One line for humans.
    pub about: &'static str,
    pub run: fn(&Cmdline<'_>),
}

/// Mode used when the command line has no `mode=`.
pub const DEFAULT: &str = "hello";

pub static MODES: &[Mode] = &[
    hello::MODE,
    emulate::MODE,
    info::MODE,
    crash::MODE,
    smp::MODE,
    spin::MODE,
    triple::MODE,
    blk::MODE,
    net::MODE,
    pm_flood::MODE,
];

pub fn find(name: &str) -> Option<&'static Mode> {
    MODES.iter().find(|m| m.name == name)
}
