//! `ftvmm tls-certs`: make a CA and one TLS identity per host for `--tls`.

use std::path::PathBuf;

use clap::Args;

/// Make a new CA and a certificate and key for each named host, for mutual TLS between ftvmm hosts
/// (`--tls DIR/NAME` on each).
#[derive(Args, Debug)]
#[command(
    after_help = "Writes DIR/ca.crt and DIR/ca.key (the CA: keep ca.key offline), and for each \
NODE a directory DIR/NAME with ca.crt, node.crt and node.key — all a host needs for --tls. Keys are \
ECDSA P-256, files 0600, directories 0700. DIR must not exist yet.\n\n\
Each NODE is NAME=ADDR[,ADDR...]: the addresses and host names peers will dial that host by; a peer \
checks that the certificate names the one it dialled.\n\n\
Example:\n  ftvmm tls-certs --out /etc/ftvmm/pki host-a=10.0.0.1,host-a.example host-b=10.0.0.2\n  \
ftvmm standby --listen 10.0.0.2:7100 --tls /etc/ftvmm/pki/host-b ...\n  \
ftvmm run ... --standby 10.0.0.2:7100 --tls /etc/ftvmm/pki/host-a"
)]
pub struct TlsCertsArgs {
    /// Directory to create.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,

    /// The hosts to make identities for: NAME=ADDR[,ADDR...].
    #[arg(value_name = "NODE", required = true, value_parser = parse_node)]
    nodes: Vec<(String, Vec<String>)>,
}

fn parse_node(s: &str) -> Result<(String, Vec<String>), String> {
    let (name, addrs) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NAME=ADDR[,ADDR...]"))?;
    let addrs: Vec<String> = addrs
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(String::from)
        .collect();
    Ok((name.to_string(), addrs))
}

pub fn tls_certs(args: TlsCertsArgs) -> Result<u8, Box<dyn std::error::Error>> {
    replication::link::certs::generate(&args.out, &args.nodes)?;
    for (name, _) in &args.nodes {
        println!("{}", args.out.join(name).display());
    }
    Ok(0)
}
