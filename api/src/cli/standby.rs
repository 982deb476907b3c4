//! `ftvmm standby`: be the hot standby of a protected guest, and run it when its primary dies.

use std::time::Duration;

use clap::Args;
use replication::protection::{run_standby, StandbyEnd};

use super::backends::BackendArgs;
use crate::vm_facts::VmFacts;

/// Wait for a primary (`ftvmm run ... --standby HOST:PORT`), keep its latest committed checkpoint,
/// and when the primary is lost, resume the guest here from that checkpoint.
#[derive(Args, Debug)]
#[command(
    after_help = "The standby applies a checkpoint only once all of it has arrived and verified; a torn \
one is discarded whole. Output the guest produced after the last committed checkpoint was never released \
by the primary, so no client saw anything this copy does not also hold.\n\n\
Failure detection is separate from the checkpoint stream: both ends probe each other with signed UDP \
datagrams (to this address's port) ten times per --failure-timeout-ms, and the primary keeps a second \
TCP connection open, its control channel, on which it says goodbye when it ends protection while alive. \
Without a witness the standby takes over only when that channel closes without a goodbye while the \
primary was answering probes (its process or host died). Silence alone never makes it take over: a \
primary that is hung or cut off may still be running; when the channel closes after a silence longer \
than --failure-timeout-ms, the standby exits 1 without resuming. With a witness, a primary silent for the \
failure timeout is taken over if the witness agrees. It ends without resuming anything (exit 0) when the \
primary says goodbye: its guest powered off, reset or crashed, or protection was stopped, or the primary \
went on without this standby; and with an error when the link breaks in a way a dying primary does not \
cause (a corrupt frame, a message out of protocol).\n\n\
With --api-socket, `ftvmm vm --api-socket PATH standby` shows the standby's state and `ftvmm vm \
--api-socket PATH failover` makes it take over on the operator's word (for a primary known dead that \
died silently, without a witness); after a takeover the socket serves the VM's API.\n\n\
Only a primary holding a certificate from the same CA (--tls) is accepted; the disks and TAPs are this \
host's, given here.\n\n\
Example:\n  ftvmm standby --listen 0.0.0.0:7100 --tls /etc/ftvmm/pki/host-b --net tap=tap0 --api-socket /run/vm.sock"
)]
pub struct StandbyArgs {
    /// Address to listen on for the primary, HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    listen: String,

    /// How long after its last answer to a heartbeat probe the primary counts as alive, in
    /// milliseconds (both ends probe every tenth of it, over UDP on the --listen port). With a witness, a silent primary is taken over about this
    /// long after it fell silent (docs/benchmarks.md); raise it where hosts or the network stall
    /// for longer than that without having failed.
    #[arg(long, value_name = "MS", default_value_t = 180,
          value_parser = clap::value_parser!(u64).range(50..=600_000))]
    failure_timeout_ms: u64,

    #[command(flatten)]
    backends: BackendArgs,

    #[command(flatten)]
    witness: super::witness::WitnessArgs,

    /// Write this process's stage as JSON to FILE: where it listens, then that it runs the guest
    /// (the host daemon reads it; `api/src/vm_facts.rs`).
    #[arg(long, value_name = "FILE")]
    facts_file: Option<std::path::PathBuf>,
}

pub fn standby(args: StandbyArgs) -> Result<u8, Box<dyn std::error::Error>> {
    let security = args.backends.link.required("ftvmm standby")?;
    let facts = args
        .facts_file
        .as_deref()
        .map(crate::vm_facts::FactsFile::create)
        .transpose()?;
    // This thread follows the primary and then runs the event loop: filtered before the peer speaks.
    vmm::seccomp::apply(vmm::seccomp::ThreadKind::EventLoop)?;
    let witness = args.witness.witness()?;
    let api_socket = args.backends.api.socket()?;
    // While it follows, the standby's own API (state, failover) is served on the socket.
    let mut standby_api = None;
    let mut standby_api_error = None;
    let end = run_standby(
        &args.listen,
        &args.backends.restore_options(),
        &security,
        Duration::from_millis(args.failure_timeout_ms),
        witness.as_deref(),
        |addr| {
            eprintln!("ftvmm: standing by on {addr} ({})", security.name());
            if let Some(facts) = &facts {
                facts.publish(&VmFacts::StandingBy {
                    listening: addr.to_string(),
                });
            }
        },
        |control| {
            if let Some(socket) = &api_socket {
                match crate::server::spawn_standby(socket, control) {
                    Ok(server) => standby_api = Some(server),
                    Err(e) => standby_api_error = Some(e),
                }
            }
        },
    );
    drop(standby_api);
    if let Some(e) = standby_api_error {
        eprintln!("ftvmm: warning: no standby API: {e}");
    }
    let end = end?;
    let takeover = match end {
        StandbyEnd::Ended(ending) => {
            eprintln!("ftvmm: the primary ended protection ({ending}); nothing to take over");
            return Ok(0);
        }
        StandbyEnd::Takeover(takeover) => *takeover,
    };
    eprintln!(
        "ftvmm: primary lost ({}); taking over from checkpoint {}",
        takeover.reason, takeover.epoch
    );
    if let Some(facts) = &facts {
        facts.publish(&VmFacts::Running);
    }
    let mut machine = takeover.machine;
    // The survivor can be protected again (`vm protect`): its API knows the witness and the claim
    // this copy took over with.
    let held = witness.clone().zip(takeover.claim.clone());
    let server = match &api_socket {
        Some(socket) => {
            let server =
                crate::server::spawn(socket, machine.control_handle()?, Some(security.clone()))?;
            server.set_witness(witness, takeover.claim);
            Some(server)
        }
        None => None,
    };
    super::run::run_machine_after(machine, None, Some(security), server, held, |m| {
        m.announce_network()
    })
}
