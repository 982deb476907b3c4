//! The `ftvmm` command: a fault-tolerant KVM virtual machine monitor.

use ftvmm_api::cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    if let Err(e) = init_logging(args.log_file.as_deref(), args.log_max_mib) {
        eprintln!("ftvmm: error: {e}");
        return ExitCode::from(cli::EXIT_ERROR);
    }
    match cli::dispatch(args) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("ftvmm: error: {e}");
            ExitCode::from(cli::EXIT_ERROR)
        }
    }
}

/// Logs go to stderr, or to `log_file` kept to `max_mib` (and stderr with them); `FTVMM_LOG`
/// (tracing's env-filter syntax, e.g. `debug` or `vmm=trace`) chooses what is shown, warnings and
/// errors by default.
fn init_logging(
    log_file: Option<&std::path::Path>,
    max_mib: u64,
) -> Result<(), devices::capped_file::CappedFileError> {
    use devices::capped_file::{CappedFile, Start};
    let filter = tracing_subscriber::EnvFilter::try_from_env("FTVMM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let logger = tracing_subscriber::fmt().with_env_filter(filter);
    match log_file {
        None => logger.with_writer(std::io::stderr).init(),
        Some(path) => {
            let file = CappedFile::open(path, max_mib << 20, Start::Append)?;
            file.redirect_stderr()?;
            logger
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(file))
                .init();
        }
    }
    Ok(())
}
