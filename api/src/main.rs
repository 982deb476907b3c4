//! The `ftvmm` command: a fault-tolerant KVM virtual machine monitor.

mod cli;
mod client;
mod daemon;
mod server;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    init_logging();
    match cli::dispatch(args) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("ftvmm: error: {e}");
            ExitCode::from(cli::EXIT_ERROR)
        }
    }
}

/// Logs go to stderr; `FTVMM_LOG` (tracing's env-filter syntax, e.g. `debug` or `vmm=trace`)
/// chooses what is shown, warnings and errors by default.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FTVMM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
