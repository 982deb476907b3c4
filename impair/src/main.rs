//! `ftvmm-impair`: network fault injection for testing protection (docs/impairment.md).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::{Parser, Subcommand};

use impair::link::{self, LinkImpairment};
use impair::proxy::{Mode, TcpProxy};

/// Set by SIGINT, SIGTERM and SIGHUP: finish cleanly.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn request_stop(_signal: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// Makes SIGINT, SIGTERM and SIGHUP set [`STOP`]. Without SA_RESTART, a blocking wait returns
/// early with EINTR, so the stop is seen at once.
fn install_signal_handlers() -> std::io::Result<()> {
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; the handler only
        // stores to an atomic, which is async-signal-safe.
        let ret = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = request_stop as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut())
        };
        if ret != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[derive(Parser)]
#[command(
    name = "ftvmm-impair",
    version,
    about = "Network fault injection for testing ftvmm's protection",
    long_about = "Network fault injection for testing ftvmm's protection: impair a network \
                  namespace's packets (loss, delay, jitter, duplication, rate, cuts) through \
                  NFQUEUE, or proxy TCP with delayed, lost or swallowed replies. Run it inside the \
                  namespace to impair: `ip netns exec NS ftvmm-impair ...`. Needs root.",
    after_help = "Examples:\n  \
        ip netns exec hostA ftvmm-impair link --port 7100 --loss 1 --for 600\n  \
        ip netns exec hostA ftvmm-impair link --port 7100 --port 7101 --delay 40 --jitter 10\n  \
        ip netns exec hostA ftvmm-impair link --peer 10.99.1.2 --cut --direction out\n  \
        ftvmm-impair tcp-proxy --listen 127.0.0.1:12379 --to 127.0.0.1:2379 --control /run/witness.ctl\n  \
        ftvmm-impair tcp-proxy-ctl --control /run/witness.ctl mode lose 30\n  \
        ip netns exec hostA ftvmm-impair cleanup"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Impair this namespace's packets that match --port/--peer, through NFQUEUE, until SIGINT,
    /// SIGTERM or --for. Prints `ready pid=P queues=Q[,Q2] rules=N` on stderr once its iptables rules
    /// are in place, and one JSON line of counters (seen, dropped, delayed, duplicated, released)
    /// on stdout at the end, after removing its rules.
    #[command(after_help = "Examples:\n  \
        ftvmm-impair link --port 7100 --loss 1 --for 600\n  \
        ftvmm-impair link --port 7100 --delay 40 --jitter 10 --keep-order\n  \
        ftvmm-impair link --port 7100 --duplicate 5 --direction out\n  \
        ftvmm-impair link --port 7100 --rate 100000 --rate-latency 200\n  \
        ftvmm-impair link --peer 10.99.1.2 --cut --direction in")]
    Link(LinkImpairment),
    /// A TCP proxy whose server-to-client bytes are passed, delayed, lost or swallowed (client to
    /// server bytes always go at once), until SIGINT or SIGTERM. Prints `ready listen=ADDR` on
    /// stderr once listening.
    #[command(
        after_help = "Modes: pass | delay MS | lose PCT [HOLD_MS] | blackhole\n\n\
        Examples:\n  \
        ftvmm-impair tcp-proxy --listen 127.0.0.1:12379 --to 127.0.0.1:2379 --mode 'delay 3000'\n  \
        ftvmm-impair tcp-proxy --listen 0.0.0.0:12379 --to 10.99.1.1:2379 --control /tmp/witness.ctl\n  \
        ftvmm-impair tcp-proxy-ctl --control /tmp/witness.ctl mode lose 30"
    )]
    TcpProxy(ProxyArgs),
    /// Send one command to a running tcp-proxy's control socket and print its answer; exits 1 if
    /// the answer is an error.
    #[command(after_help = "Examples:\n  \
        ftvmm-impair tcp-proxy-ctl --control /tmp/witness.ctl mode delay 3000\n  \
        ftvmm-impair tcp-proxy-ctl --control /tmp/witness.ctl mode")]
    TcpProxyCtl(ProxyCtlArgs),
    /// Remove the iptables rules that ftvmm-impair processes killed with SIGKILL left in this
    /// namespace (their traffic already passes: the rules use --queue-bypass).
    Cleanup,
}

#[derive(clap::Args)]
struct ProxyArgs {
    /// Address to accept clients on.
    ///
    /// Example: --listen 127.0.0.1:12379
    #[arg(long, value_name = "ADDR")]
    listen: SocketAddr,
    /// The server to forward to.
    ///
    /// Example: --to 127.0.0.1:2379
    #[arg(long, value_name = "ADDR")]
    to: SocketAddr,
    /// What happens to replies: pass, "delay MS" (each chunk held MS), "lose PCT [HOLD_MS]" (with
    /// probability PCT per chunk the reply is swallowed and the connection held HOLD_MS, default
    /// 5000, then closed), or blackhole (no reply ever).
    ///
    /// Example: --mode 'lose 30 5000'
    #[arg(long, value_name = "MODE", default_value = "pass")]
    mode: Mode,
    /// Unix socket that takes one command per line: `mode SPEC` to change the mode (answers `ok`
    /// or `error: ...`), `mode` to ask it.
    ///
    /// Example: --control /tmp/witness.ctl
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Seed of the random choices of `lose`, for a reproducible run.
    ///
    /// Example: --seed 42
    #[arg(long, value_name = "N")]
    seed: Option<u64>,
}

#[derive(clap::Args)]
struct ProxyCtlArgs {
    /// The proxy's control socket (its --control).
    ///
    /// Example: --control /tmp/witness.ctl
    #[arg(long, value_name = "PATH")]
    control: PathBuf,
    /// The command: `mode SPEC` to change the mode, `mode` to ask it.
    ///
    /// Example: mode lose 30 5000
    #[arg(required = true, num_args = 1.., value_name = "COMMAND")]
    command: Vec<String>,
}

fn run_proxy_ctl(args: &ProxyCtlArgs) -> ExitCode {
    match impair::proxy::send_control(&args.control, &args.command.join(" ")) {
        Ok(answer) => {
            println!("{answer}");
            if answer.starts_with("error") {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!(
                "ftvmm-impair tcp-proxy-ctl: {}: {e}",
                args.control.display()
            );
            ExitCode::FAILURE
        }
    }
}

fn run_link(spec: &LinkImpairment) -> ExitCode {
    let result = link::run(spec, &STOP, |ready| {
        let queues: Vec<String> = [ready.queues.egress, ready.queues.ingress]
            .into_iter()
            .flatten()
            .map(|q| q.to_string())
            .collect();
        eprintln!(
            "ready pid={} queues={} rules={}",
            std::process::id(),
            queues.join(","),
            ready.rules
        );
    });
    // One line of counters on every exit path (zeros if it failed before impairing anything).
    let (counters, error) = match result {
        Ok(counters) => (counters, None),
        Err(link::Error::AfterStart { counters, source }) => (counters, Some(*source)),
        Err(e) => (link::Counters::default(), Some(e)),
    };
    println!(
        "{}",
        serde_json::to_string(&counters).expect("counters serialize")
    );
    match error {
        None => ExitCode::SUCCESS,
        Some(e) => {
            eprintln!("ftvmm-impair link: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_proxy(args: &ProxyArgs) -> ExitCode {
    let mut proxy = match TcpProxy::start(args.listen, args.to, args.mode) {
        Ok(proxy) => proxy,
        Err(e) => {
            eprintln!("ftvmm-impair tcp-proxy: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(seed) = args.seed {
        proxy.set_seed(seed);
    }
    if let Some(path) = &args.control {
        if let Err(e) = proxy.serve_control(path) {
            eprintln!("ftvmm-impair tcp-proxy: {e}");
            return ExitCode::FAILURE;
        }
    }
    eprintln!("ready listen={} mode={}", proxy.local_addr(), proxy.mode());
    while !STOP.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(proxy);
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = install_signal_handlers() {
        eprintln!("ftvmm-impair: cannot handle signals: {e}");
        return ExitCode::FAILURE;
    }
    match cli.command {
        Command::Link(spec) => run_link(&spec),
        Command::TcpProxy(args) => run_proxy(&args),
        Command::TcpProxyCtl(args) => run_proxy_ctl(&args),
        Command::Cleanup => match link::remove_stale() {
            Ok(n) => {
                eprintln!("removed {n} stale rule(s)");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("ftvmm-impair cleanup: {e}");
                ExitCode::FAILURE
            }
        },
    }
}
