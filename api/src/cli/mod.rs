//! Command-line interface: one module per subcommand.

mod api_socket;
mod backends;
mod link;
mod output;
mod receive;
mod restore;
mod run;
mod serve;
mod standby;
mod tls_certs;
mod vm;
mod witness;

use clap::{Parser, Subcommand};

/// Exit status when ftvmm itself fails (bad arguments, unusable image, no KVM).
pub const EXIT_ERROR: u8 = 1;

#[derive(Parser, Debug)]
#[command(
    name = "ftvmm",
    version,
    about = "ftvmm: a fault-tolerant KVM virtual machine monitor",
    long_about = "ftvmm runs KVM virtual machines and keeps them alive through the loss of their \
                  host by checkpointing them to a hot standby; it also snapshots and live-migrates \
                  them. Links between hosts use mutual TLS (`ftvmm tls-certs`).\n\n\
                  Logging: set FTVMM_LOG (e.g. FTVMM_LOG=info or FTVMM_LOG=vmm=debug)."
)]
pub struct Cli {
    /// Run without seccomp filters (for debugging only). By default every thread runs under an
    /// allowlist of the system calls its kind needs, and a forbidden call ends ftvmm (exit 159).
    #[arg(long, global = true)]
    no_seccomp: bool,

    /// Write the log, and whatever ftvmm prints on stderr, to FILE (appended) instead of stderr,
    /// kept to --log-max-mib: past it the file moves to FILE.1 and starts again. The host daemon
    /// gives each VM process its directory's ftvmm.log.
    #[arg(long, global = true, value_name = "FILE")]
    pub log_file: Option<std::path::PathBuf>,

    /// With --log-file: the most the file holds before it moves to FILE.1.
    #[arg(long, global = true, value_name = "MIB", default_value_t = 16,
          value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub log_max_mib: u64,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    Run(Box<run::RunArgs>),
    Serve(serve::ServeArgs),
    Restore(restore::RestoreArgs),
    Receive(receive::ReceiveArgs),
    Standby(standby::StandbyArgs),
    TlsCerts(tls_certs::TlsCertsArgs),
    Vm(vm::VmArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) for ftvmm, e.g.
    /// `ftvmm completions bash > /etc/bash_completion.d/ftvmm`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// Runs the chosen subcommand and returns the process exit status.
pub fn dispatch(cli: Cli) -> Result<u8, Box<dyn std::error::Error>> {
    if cli.no_seccomp {
        tracing::warn!("--no-seccomp: threads run without seccomp filters");
    } else {
        vmm::seccomp::enable();
    }
    match cli.command {
        Command::Run(args) => run::run(*args),
        Command::Serve(args) => serve::serve(args),
        Command::Restore(args) => restore::restore(args),
        Command::Receive(args) => receive::receive(args),
        Command::Standby(args) => standby::standby(args),
        Command::TlsCerts(args) => tls_certs::tls_certs(args),
        Command::Vm(args) => vm::vm(args),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "ftvmm", &mut std::io::stdout());
            Ok(0)
        }
    }
}
