//! Network namespaces for tests: each test makes its own namespace with a TAP device inside, runs
//! ftvmm and its clients there, and removes everything when dropped. Only addresses inside the
//! namespace are used.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run ip {args:?}: {e} (is iproute2 installed?)"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A network namespace with one TAP device (`tap0`, host side `HOST_IP/24`) inside it.
pub struct NetNs {
    name: String,
    /// The third octet of this namespace's 10.77.x.0/24 subnet.
    subnet: u8,
}

impl NetNs {
    /// Creates the namespace, its loopback and a TAP `tap0` with `10.77.<n>.1/24`.
    pub fn with_tap() -> Result<Self, String> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("ftvmm-t{}-{n}", std::process::id());
        let subnet = ((std::process::id() + n) % 200 + 10) as u8;
        ip(&["netns", "add", &name])?;
        let ns = Self { name, subnet };
        ns.exec_ip(&["link", "set", "lo", "up"])?;
        ns.exec_ip(&["tuntap", "add", "dev", "tap0", "mode", "tap"])?;
        ns.exec_ip(&[
            "addr",
            "add",
            &format!("{}/24", ns.host_ip()),
            "dev",
            "tap0",
        ])?;
        ns.exec_ip(&["link", "set", "tap0", "up"])?;
        Ok(ns)
    }

    fn exec_ip(&self, args: &[&str]) -> Result<(), String> {
        let mut full = vec!["netns", "exec", &self.name, "ip"];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The host's address on the TAP.
    pub fn host_ip(&self) -> String {
        format!("10.77.{}.1", self.subnet)
    }

    /// An address for the guest on the TAP's subnet.
    pub fn guest_ip(&self) -> String {
        format!("10.77.{}.2", self.subnet)
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs `f` on a thread that has joined this namespace (sockets it opens live there).
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // SAFETY: setns on a valid namespace fd only changes this (new, private) thread's network
            // namespace; no memory is shared with the kernel.
            let ret = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(ret, 0, "setns({path}): {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("netns thread panicked")
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace removes the TAP inside it.
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("cleanup: {e}");
        }
    }
}

/// Two "hosts" (namespaces `A` and `B`, each with a bridge holding its TAP `tap0` and a host address)
/// and a "LAN" namespace whose bridge joins them through veth pairs, where clients live. A guest
/// behind host A's TAP can move to host B's and keep its address: the LAN bridge learns where its MAC
/// is from the guest's traffic and the RARP announcement.
pub struct TwoHosts {
    pub lan: NetNs,
    pub a: NetNs,
    pub b: NetNs,
    subnet: u8,
}

impl TwoHosts {
    /// Builds the topology on `10.78.<n>.0/24`: client `.1`, host A `.11`, host B `.12`, guest `.2`.
    pub fn new() -> Result<Self, String> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let subnet = ((std::process::id() + n * 7) % 200 + 10) as u8;
        let base = format!("ftvmm-t{}-{n}", std::process::id());
        let make = |suffix: &str| -> Result<NetNs, String> {
            let name = format!("{base}{suffix}");
            ip(&["netns", "add", &name])?;
            let ns = NetNs { name, subnet };
            ns.exec_ip(&["link", "set", "lo", "up"])?;
            Ok(ns)
        };
        let lan = make("l")?;
        let a = make("a")?;
        let b = make("b")?;
        let hosts = Self { lan, a, b, subnet };
        hosts
            .lan
            .exec_ip(&["link", "add", "br0", "type", "bridge"])?;
        hosts
            .lan
            .exec_ip(&["addr", "add", &format!("10.78.{subnet}.1/24"), "dev", "br0"])?;
        hosts.lan.exec_ip(&["link", "set", "br0", "up"])?;
        for (host, octet, port) in [(&hosts.a, 11, "pa"), (&hosts.b, 12, "pb")] {
            // veth: one end in the LAN bridge, the other in the host's own bridge with its TAP.
            hosts.lan.exec_ip(&[
                "link", "add", port, "type", "veth", "peer", "name", "uplink",
            ])?;
            hosts
                .lan
                .exec_ip(&["link", "set", "uplink", "netns", &host.name])?;
            hosts.lan.exec_ip(&["link", "set", port, "master", "br0"])?;
            hosts.lan.exec_ip(&["link", "set", port, "up"])?;
            host.exec_ip(&["link", "add", "br0", "type", "bridge"])?;
            host.exec_ip(&["link", "set", "uplink", "master", "br0"])?;
            host.exec_ip(&["tuntap", "add", "dev", "tap0", "mode", "tap"])?;
            host.exec_ip(&["link", "set", "tap0", "master", "br0"])?;
            host.exec_ip(&[
                "addr",
                "add",
                &format!("10.78.{subnet}.{octet}/24"),
                "dev",
                "br0",
            ])?;
            for dev in ["uplink", "tap0", "br0"] {
                host.exec_ip(&["link", "set", dev, "up"])?;
            }
        }
        Ok(hosts)
    }

    /// The guest's address.
    pub fn guest_ip(&self) -> String {
        format!("10.78.{}.2", self.subnet)
    }

    /// The LAN's own address (where shared services such as a witness live).
    pub fn lan_ip(&self) -> String {
        format!("10.78.{}.1", self.subnet)
    }

    /// Host A's address.
    pub fn a_ip(&self) -> String {
        format!("10.78.{}.11", self.subnet)
    }

    /// Host B's address, where it receives migrations.
    pub fn b_ip(&self) -> String {
        format!("10.78.{}.12", self.subnet)
    }
}
