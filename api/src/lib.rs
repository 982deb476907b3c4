//! ftvmm's programs as a library: the command line (`cli`), the per-VM control API (`server`) and
//! its client (`client`), the host daemon (`daemon`), and what a VM process tells its daemon
//! (`vm_facts`). `src/main.rs` is the `ftvmm` binary; the fuzz targets drive the daemon's API
//! through this library.

pub mod cli;
pub mod client;
pub mod daemon;
pub mod server;
pub mod vm_facts;
