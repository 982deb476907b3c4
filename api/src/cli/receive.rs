//! `ftvmm receive`: wait for a live migration and run the guest it brings.

use std::path::PathBuf;

use clap::Args;
use replication::migration::receive as receive_migration;
use vmm::{BlockConfig, NetConfig, RestoreOptions, SerialOutput};

/// Wait for one incoming live migration (from `ftvmm vm ... migrate --to`), then run the guest.
#[derive(Args, Debug)]
#[command(
    after_help = "If the migration fails before the hand-over (the source dies, the link breaks, \
the stream is corrupt), nothing runs here and ftvmm exits 1 with the reason; the source keeps its guest.\n\n\
Example:\n  ftvmm receive --listen 0.0.0.0:7000 --net tap=tap0 --disk path=/srv/disk.img --api-socket /run/vm.sock"
)]
pub struct ReceiveArgs {
    /// Address to listen on, HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    listen: String,

    /// Where the guest's COM1 output goes: stdout, null, or file:PATH.
    #[arg(long, value_name = "DEST", default_value = "stdout")]
    serial: SerialOutput,

    /// This host's path for each of the guest's disks (path=IMG[,readonly]), in order; without it
    /// the source's paths are used (shared storage).
    #[arg(long = "disk", value_name = "path=IMG[,readonly]")]
    disks: Vec<BlockConfig>,

    /// This host's TAP for each of the guest's NICs (tap=NAME), in order; the guest keeps its MAC,
    /// which is announced (RARP) once it runs.
    #[arg(long = "net", value_name = "tap=NAME")]
    nets: Vec<NetConfig>,

    /// Serve the VM's control API on this Unix socket once it runs.
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
}

pub fn receive(args: ReceiveArgs) -> Result<u8, Box<dyn std::error::Error>> {
    let options = RestoreOptions {
        serial: Some(args.serial),
        disks: (!args.disks.is_empty()).then_some(args.disks),
        nets: (!args.nets.is_empty()).then_some(args.nets),
    };
    let (machine, peer) = receive_migration(&args.listen, &options, |addr| {
        eprintln!("ftvmm: waiting for a migration on {addr}");
    })?;
    eprintln!("ftvmm: guest received from {peer}; running it here");
    super::run::run_machine_after(machine, args.api_socket.as_deref(), |m| {
        m.announce_network()
    })
}
