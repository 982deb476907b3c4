//! `ftvmm receive`: wait for a live migration and run the guest it brings.

use clap::Args;
use replication::migration::receive as receive_migration;

use super::backends::BackendArgs;
use crate::vm_facts::VmFacts;

/// Wait for one incoming live migration (from `ftvmm vm ... migrate --to`), then run the guest.
#[derive(Args, Debug)]
#[command(
    after_help = "If the migration fails before the hand-over (the source dies, the link breaks, \
the stream is corrupt), nothing runs here and ftvmm exits 1 with the reason; the source keeps its guest.\n\n\
Only a source holding a certificate from the same CA (--tls) is accepted; any other connection is refused \
with a warning and the wait goes on. The disks and TAPs are this host's, given here, one per device of the \
guest: the source never names host paths.\n\n\
Example:\n  ftvmm receive --listen 0.0.0.0:7000 --tls /etc/ftvmm/pki/host-b --net tap=tap0 --disk path=/srv/disk.img --api-socket /run/vm.sock"
)]
pub struct ReceiveArgs {
    /// Address to listen on, HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    listen: String,

    #[command(flatten)]
    backends: BackendArgs,

    /// Write this process's stage as JSON to FILE: where it listens, then that it runs the guest
    /// (the host daemon reads it; `api/src/vm_facts.rs`).
    #[arg(long, value_name = "FILE")]
    facts_file: Option<std::path::PathBuf>,
}

pub fn receive(args: ReceiveArgs) -> Result<u8, Box<dyn std::error::Error>> {
    let security = args.backends.link.required("ftvmm receive")?;
    let api_socket = args.backends.api.socket()?;
    let facts = args
        .facts_file
        .as_deref()
        .map(crate::vm_facts::FactsFile::create)
        .transpose()?;
    // This thread serves the peer and then runs the event loop: filtered before the peer speaks.
    vmm::seccomp::apply(vmm::seccomp::ThreadKind::EventLoop)?;
    let (machine, peer) = receive_migration(
        &args.listen,
        &args.backends.restore_options(),
        &security,
        |addr| {
            eprintln!(
                "ftvmm: waiting for a migration on {addr} ({})",
                security.name()
            );
            if let Some(facts) = &facts {
                facts.publish(&VmFacts::Receiving {
                    listening: addr.to_string(),
                });
            }
        },
    )?;
    eprintln!("ftvmm: guest received from {peer}; running it here");
    if let Some(facts) = &facts {
        facts.publish(&VmFacts::Running);
    }
    super::run::run_machine_after(
        machine,
        api_socket.as_ref(),
        Some(security),
        None,
        None,
        |m| m.announce_network(),
    )
}
