//! `ftvmm restore`: continue a VM from a snapshot directory in this process.

use std::path::PathBuf;

use clap::Args;
use vmm::Machine;

use super::backends::BackendArgs;

/// Restore a VM from a snapshot (written by `ftvmm vm ... snapshot`) and run it.
#[derive(Args, Debug)]
#[command(after_help = "Exit status: as for `ftvmm run`.\n\n\
Example:\n  ftvmm restore --dir /var/lib/ftvmm/snap1 --net tap=tap1 --api-socket /run/vm1.sock")]
pub struct RestoreArgs {
    /// The snapshot directory.
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,

    #[command(flatten)]
    backends: BackendArgs,

    #[command(flatten)]
    witness: super::witness::WitnessArgs,
}

pub fn restore(args: RestoreArgs) -> Result<u8, Box<dyn std::error::Error>> {
    let security = args.backends.link.security()?;
    let api_socket = args.backends.api.socket()?;
    let machine = Machine::restore(&args.dir, &args.backends.restore_options())?;
    // With a witness, the restored copy claims the guest before it runs it: refused while another
    // copy holds the claim.
    let witness = args.witness.witness()?;
    let held = match witness {
        Some(w) => {
            let claim = super::run::claim_guest(&w)?;
            Some((w, claim))
        }
        None => None,
    };
    super::run::run_machine(machine, api_socket.as_ref(), security, None, held)
}
