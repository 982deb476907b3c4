//! The iptables rules that send the selected packets to our queue. Each rule carries a comment
//! with the owner's pid ([`rule_tag`]) and is removed with exactly the arguments it was inserted
//! with, so that several impairments (several processes, several queues) can share a namespace and
//! each removes only its own. Rules use `--queue-bypass`: if nobody serves the queue (the process
//! was killed with SIGKILL) the packets pass, and `ftvmm-impair cleanup` removes the leftovers.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use super::Error;

/// The mark bit of packets we re-inject ourselves (duplicates): the rules skip them, so a copy is
/// not queued again.
pub const DUPLICATE_MARK: u32 = 0x2000_0000;

/// The prefix of every rule comment; the owner's pid follows.
const TAG_PREFIX: &str = "ftvmm-impair-pid-";

/// The comment on every rule installed by the process `pid`.
pub fn rule_tag(pid: u32) -> String {
    format!("{TAG_PREFIX}{pid}")
}

/// `iptables -m multiport` takes at most 15 ports per rule.
const MULTIPORT_MAX: usize = 15;

/// Which packets are queued.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selector {
    /// TCP and UDP packets with one of these as source or destination port; empty: any packet.
    pub ports: Vec<u16>,
    /// Only packets to (egress) or from (ingress) this address.
    pub peer: Option<Ipv4Addr>,
}

/// One rule: the chain and the arguments that follow `-I CHAIN` / `-D CHAIN`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub chain: &'static str,
    pub args: Vec<String>,
}

/// The queues the rules send packets to: sent packets to `egress`, received ones to `ingress`
/// (`None`: that way is not impaired).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Queues {
    pub egress: Option<u16>,
    pub ingress: Option<u16>,
}

/// The rules that queue `selector`'s packets to `queues`, tagged `tag`.
pub fn rules_for(selector: &Selector, queues: Queues, tag: &str) -> Vec<Rule> {
    let mut chains = Vec::new();
    if let Some(queue) = queues.egress {
        chains.push(("OUTPUT", "-d", queue));
    }
    if let Some(queue) = queues.ingress {
        chains.push(("INPUT", "-s", queue));
    }
    // Each element: the protocol and port match of one rule.
    let mut matches: Vec<Vec<String>> = Vec::new();
    if selector.ports.is_empty() {
        matches.push(Vec::new());
    } else {
        for proto in ["tcp", "udp"] {
            for ports in selector.ports.chunks(MULTIPORT_MAX) {
                let list: Vec<String> = ports.iter().map(u16::to_string).collect();
                matches.push(
                    ["-p", proto, "-m", "multiport", "--ports", &list.join(",")]
                        .map(String::from)
                        .to_vec(),
                );
            }
        }
    }
    let mut rules = Vec::new();
    for (chain, peer_flag, queue) in chains {
        for m in &matches {
            let mut args = m.clone();
            if let Some(peer) = selector.peer {
                args.extend([peer_flag.to_string(), peer.to_string()]);
            }
            let mark = format!("{DUPLICATE_MARK:#x}/{DUPLICATE_MARK:#x}");
            args.extend(
                [
                    "-m",
                    "mark",
                    "!",
                    "--mark",
                    &mark,
                    "-m",
                    "comment",
                    "--comment",
                    tag,
                    "-j",
                    "NFQUEUE",
                    "--queue-num",
                ]
                .map(String::from),
            );
            args.extend([queue.to_string(), "--queue-bypass".to_string()]);
            rules.push(Rule { chain, args });
        }
    }
    rules
}

/// Runs `iptables -w ARGS` and returns its standard output.
fn iptables(args: &[&str]) -> Result<String, Error> {
    let out = Command::new("iptables")
        .arg("-w")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| Error::IptablesSpawn { source })?;
    if !out.status.success() {
        return Err(Error::Iptables {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The namespace's filter rules as `iptables -S` prints them.
pub fn list_rules() -> Result<String, Error> {
    iptables(&["-S"])
}

/// Queue numbers that rules in this namespace already send packets to (ours or another tool's,
/// possibly of a process that died): a new impairment must not use them.
pub fn queues_in_use() -> Result<BTreeSet<u16>, Error> {
    let listing = list_rules()?;
    let mut queues = BTreeSet::new();
    for line in listing.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        for pair in words.windows(2) {
            if matches!(pair[0], "--queue-num" | "--queue-balance") {
                // A balance range `A:B` reserves every queue in it.
                let mut ends = pair[1].split(':').filter_map(|n| n.parse::<u16>().ok());
                if let Some(first) = ends.next() {
                    let last = ends.next().unwrap_or(first);
                    queues.extend(first..=last);
                }
            }
        }
    }
    Ok(queues)
}

/// Rules inserted by this process; removed when dropped (on every exit path but SIGKILL).
pub struct InstalledRules {
    rules: Vec<Rule>,
}

impl InstalledRules {
    /// Inserts `rules` at the top of their chains. On failure the ones already inserted are
    /// removed again.
    pub fn install(rules: Vec<Rule>) -> Result<Self, Error> {
        let mut installed = Self { rules: Vec::new() };
        for rule in rules {
            let mut args = vec!["-I", rule.chain];
            args.extend(rule.args.iter().map(String::as_str));
            iptables(&args)?;
            installed.rules.push(rule);
        }
        Ok(installed)
    }

    /// How many rules are installed.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether no rule is installed.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Removes the rules, reporting the first failure (after trying them all).
    pub fn remove(mut self) -> Result<(), Error> {
        self.remove_all()
    }

    fn remove_all(&mut self) -> Result<(), Error> {
        let mut first_error = None;
        for rule in std::mem::take(&mut self.rules) {
            let mut args = vec!["-D", rule.chain];
            args.extend(rule.args.iter().map(String::as_str));
            if let Err(e) = iptables(&args) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for InstalledRules {
    fn drop(&mut self) {
        if let Err(e) = self.remove_all() {
            eprintln!("ftvmm-impair: removing rules: {e}");
        }
    }
}

/// Whether a process with this pid exists.
fn process_exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes the rules of ftvmm-impair processes that are gone (killed with SIGKILL) from this
/// namespace; returns how many were removed.
pub fn remove_stale() -> Result<usize, Error> {
    let mut removed = 0;
    for line in list_rules()?.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some(pid) = words
            .iter()
            .find_map(|w| w.strip_prefix(TAG_PREFIX))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        // Our own rules never contain quoted words, so the words are the exact arguments.
        if words.first() != Some(&"-A") || process_exists(pid) {
            continue;
        }
        let mut args = vec!["-D"];
        args.extend(&words[1..]);
        iptables(&args)?;
        removed += 1;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_make_tcp_and_udp_rules_in_each_chain() {
        let selector = Selector {
            ports: vec![7100, 7101],
            peer: Some(Ipv4Addr::new(10, 99, 1, 2)),
        };
        let queues = Queues {
            egress: Some(4100),
            ingress: Some(4101),
        };
        let rules = rules_for(&selector, queues, "ftvmm-impair-pid-7");
        assert_eq!(rules.len(), 4);
        let out_tcp = &rules[0];
        assert_eq!(out_tcp.chain, "OUTPUT");
        assert_eq!(
            out_tcp.args.join(" "),
            "-p tcp -m multiport --ports 7100,7101 -d 10.99.1.2 -m mark ! --mark \
             0x20000000/0x20000000 -m comment --comment ftvmm-impair-pid-7 -j NFQUEUE \
             --queue-num 4100 --queue-bypass"
        );
        let in_udp = &rules[3];
        assert_eq!(in_udp.chain, "INPUT");
        let in_udp = in_udp.args.join(" ");
        assert!(in_udp.starts_with("-p udp -m multiport --ports 7100,7101 -s 10.99.1.2 "));
        assert!(in_udp.ends_with("--queue-num 4101 --queue-bypass"));
    }

    #[test]
    fn one_direction_uses_one_chain() {
        let selector = Selector {
            ports: vec![53],
            peer: None,
        };
        let queues = Queues {
            egress: None,
            ingress: Some(1),
        };
        let rules = rules_for(&selector, queues, "t");
        assert!(rules.iter().all(|r| r.chain == "INPUT"));
        assert_eq!(rules.len(), 2);
        assert!(!rules[0].args.contains(&"-s".to_string()));
    }

    #[test]
    fn peer_without_ports_matches_every_protocol() {
        let selector = Selector {
            ports: vec![],
            peer: Some(Ipv4Addr::new(192, 0, 2, 1)),
        };
        let queues = Queues {
            egress: Some(9),
            ingress: None,
        };
        let rules = rules_for(&selector, queues, "t");
        assert_eq!(rules.len(), 1);
        assert!(rules[0].args.join(" ").starts_with("-d 192.0.2.1 -m mark"));
    }

    #[test]
    fn many_ports_are_split_per_multiport_limit() {
        let selector = Selector {
            ports: (1..=20).collect(),
            peer: None,
        };
        let queues = Queues {
            egress: Some(9),
            ingress: None,
        };
        let rules = rules_for(&selector, queues, "t");
        assert_eq!(rules.len(), 4, "tcp and udp, 15 + 5 ports each");
    }

    #[test]
    fn tag_carries_the_pid() {
        assert_eq!(rule_tag(1234), "ftvmm-impair-pid-1234");
    }
}
