//! `mode=hello` (the default): print a marker and power off. The smallest boot test.

use super::Mode;
use crate::cmdline::Cmdline;
use crate::println;

pub const MODE: Mode = Mode {
    name: "hello",
    about: "print a marker and power off",
    run,
};

fn run(_cmdline: &Cmdline<'_>) {
    println!("testguest: hello");
}
