//! `ftvmm restore`: continue a VM from a snapshot directory in this process.

use std::path::PathBuf;

use clap::Args;
use vmm::{BlockConfig, Machine, NetConfig, RestoreOptions, SerialOutput};

/// Restore a VM from a snapshot (written by `ftvmm vm ... snapshot`) and run it.
#[derive(Args, Debug)]
#[command(after_help = "Exit status: as for `ftvmm run`.\n\n\
Example:\n  ftvmm restore --dir /var/lib/ftvmm/snap1 --net tap=tap1 --api-socket /run/vm1.sock")]
pub struct RestoreArgs {
    /// The snapshot directory.
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,

    /// Where the guest's COM1 output goes: stdout, null, or file:PATH.
    #[arg(long, value_name = "DEST", default_value = "stdout")]
    serial: SerialOutput,

    /// Disk images to use instead of the snapshot's paths: path=IMG[,readonly], one per disk of the
    /// snapshot, in order. Without it the snapshot's paths are used.
    #[arg(long = "disk", value_name = "path=IMG[,readonly]")]
    disks: Vec<BlockConfig>,

    /// TAP devices to use instead of the snapshot's: tap=NAME, one per NIC, in order. The guest
    /// keeps its MAC address from the snapshot.
    #[arg(long = "net", value_name = "tap=NAME")]
    nets: Vec<NetConfig>,

    /// Serve the VM's control API on this Unix socket.
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
}

pub fn restore(args: RestoreArgs) -> Result<u8, Box<dyn std::error::Error>> {
    let options = RestoreOptions {
        serial: Some(args.serial),
        disks: (!args.disks.is_empty()).then_some(args.disks),
        nets: (!args.nets.is_empty()).then_some(args.nets),
    };
    let machine = Machine::restore(&args.dir, &options)?;
    super::run::run_machine(machine, args.api_socket.as_deref())
}
