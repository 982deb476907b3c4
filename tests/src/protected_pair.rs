//! A protected guest in the two-host topology, for the replication and fault tests: the standby on
//! host B, the primary on host A, the test guest's counter service, one client connection counting
//! on it; and the helpers those tests share (protecting, waiting for a protection state, cutting a
//! host off, counting a copy's frames).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::netns::TwoHosts;
use crate::witness::TestEtcd;
use crate::{ftvmm_bin, testguest, tls_pki, RunningVm};

/// The log filter of the pair's ftvmm processes: `FTVMM_PAIR_LOG`, else `replication=info`.
fn pair_log() -> String {
    std::env::var("FTVMM_PAIR_LOG").unwrap_or_else(|_| "replication=info".into())
}

/// How long any one step of a pair's life may take.
pub const DEADLINE: Duration = Duration::from_secs(180);

/// One protected pair at a time: each runs two or three VMs and a client on two cores, and their
/// heartbeats and timeouts should measure ftvmm, not a crowded machine.
pub fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A protected guest in the two-host topology: the standby on host b, the primary on host a (both
/// with TAP `tap0` on the LAN), the test guest's counter service, and one client connection on
/// the LAN incrementing it without pause (every reply must be exactly one more).
pub struct ProtectedPair {
    pub hosts: TwoHosts,
    pub _etcd: Option<TestEtcd>,
    pub pki: std::path::PathBuf,
    pub witness_args: Vec<String>,
    pub failure_timeout_ms: u64,
    /// Whether the guest has a disk (`disk-a.img`, `disk-b.img` in `dir`).
    pub disk: bool,
    pub dir: std::path::PathBuf,
    pub standby: RunningVm,
    pub primary: RunningVm,
    pub api: std::path::PathBuf,
    pub stop: Arc<AtomicBool>,
    pub acknowledged: Arc<AtomicU64>,
    pub client: Option<std::thread::JoinHandle<Result<u64, String>>>,
    /// The size in MiB of the second disk the guest's storm writes (`storm-a.img`, `storm-b.img`).
    pub storm_disk_mib: Option<u64>,
    /// The impairment of the replication link, while it runs.
    pub impairment: Option<impair::link::RunningImpairment>,
    /// The proxy between the copies and etcd, if any.
    pub witness_proxy: Option<WitnessProxy>,
}

/// `ftvmm-impair tcp-proxy` on the LAN in front of the pair's etcd.
pub struct WitnessProxy {
    child: std::process::Child,
    pub url: String,
    control: std::path::PathBuf,
}

impl WitnessProxy {
    fn start(hosts: &TwoHosts, etcd: &TestEtcd, dir: &std::path::Path) -> Self {
        let control = dir.join("witness-proxy.ctl");
        let _ = std::fs::remove_file(&control);
        let listen = format!("{}:2479", hosts.lan_ip());
        let bin = impair::link::impair_bin().expect("the ftvmm-impair binary (cargo build)");
        let child = hosts
            .lan
            .command(bin.to_str().unwrap())
            .args(["tcp-proxy", "--listen", &listen])
            .args(["--to", etcd.url().trim_start_matches("http://")])
            .arg("--control")
            .arg(&control)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start ftvmm-impair tcp-proxy");
        let t0 = Instant::now();
        while impair::proxy::send_control(&control, "mode pass").is_err() {
            assert!(t0.elapsed() < DEADLINE, "the witness proxy did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            child,
            url: format!("http://{listen}"),
            control,
        }
    }
}

impl Drop for WitnessProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How a [`ProtectedPair`] is made.
#[derive(Clone, Debug)]
pub struct PairOptions {
    pub failure_timeout_ms: u64,
    /// An etcd on the LAN decides which copy acts.
    pub witness: bool,
    /// The guest logs its store to a 16 MiB disk (`disk-a.img` on host A, `disk-b.img` on B;
    /// B's starts as junk).
    pub disk: bool,
    /// A second disk of this many MiB (B's starts as junk), which the guest writes with
    /// `storm_cmdline` (`storm=MIB storm_chunk=KIB`: images/testguest/src/modes/disk_storm.rs).
    pub storm_disk_mib: Option<u64>,
    pub storm_cmdline: String,
    /// Impairs the replication link (in host A's namespace) from before the primary starts.
    pub link: Option<impair::link::LinkImpairment>,
    /// Starts the client that increments the counter without pause (else there is none).
    pub client: bool,
    /// With `witness`: both copies reach etcd through a proxy (`ftvmm-impair tcp-proxy`) whose
    /// answers the test can delay or lose ([`ProtectedPair::set_witness_answers`]).
    pub witness_proxy: bool,
    /// With `witness`: how many members the etcd cluster has (the copies are given them all).
    pub witness_members: u16,
}

impl PairOptions {
    pub fn new(failure_timeout_ms: u64) -> Self {
        Self {
            failure_timeout_ms,
            witness: false,
            disk: false,
            storm_disk_mib: None,
            storm_cmdline: String::new(),
            link: None,
            client: true,
            witness_proxy: false,
            witness_members: 1,
        }
    }
}

/// `--disk` arguments for the images named `{stem}-{identity}.img` in `dir`, made if missing: host
/// A's zeroed, every other host's junk (the first copy must overwrite all of it).
fn image_args(dir: &std::path::Path, stem: &str, identity: &str, bytes: usize) -> Vec<String> {
    use std::io::Write;
    let image = dir.join(format!("{stem}-{identity}.img"));
    if !image.exists() {
        let mut f = std::fs::File::create(&image).unwrap();
        if identity == "a" {
            f.set_len(bytes as u64).unwrap();
        } else {
            let junk: Vec<u8> = (0..bytes.min(1 << 20)).map(|i| (i * 7 + 3) as u8).collect();
            let mut left = bytes;
            while left > 0 {
                let n = left.min(junk.len());
                f.write_all(&junk[..n]).unwrap();
                left -= n;
            }
        }
    }
    vec!["--disk".into(), format!("path={}", image.display())]
}

impl ProtectedPair {
    pub fn start(name: &str, failure_timeout_ms: u64) -> Self {
        Self::start_with(name, failure_timeout_ms, false)
    }

    /// As [`ProtectedPair::start`]; with `witness`, an etcd on the LAN decides which copy acts.
    pub fn start_with(name: &str, failure_timeout_ms: u64, witness: bool) -> Self {
        Self::start_full(name, failure_timeout_ms, witness, false)
    }

    /// As [`ProtectedPair::start_with`]; with `disk`, the guest logs its store to a 16 MiB disk
    /// (`disk-a.img` on host A, `disk-b.img` on B; B's starts as junk).
    pub fn start_full(name: &str, failure_timeout_ms: u64, witness: bool, disk: bool) -> Self {
        Self::start_opts(
            name,
            PairOptions {
                witness,
                disk,
                ..PairOptions::new(failure_timeout_ms)
            },
        )
    }

    /// The pair as `options` say.
    pub fn start_opts(name: &str, options: PairOptions) -> Self {
        let PairOptions {
            failure_timeout_ms,
            witness,
            disk,
            storm_disk_mib,
            storm_cmdline,
            link,
            client,
            witness_proxy,
            witness_members,
        } = options;
        let hosts = TwoHosts::new().expect("two-host topology");
        let etcd =
            witness.then(|| TestEtcd::start_members(&hosts.lan, &hosts.lan_ip(), witness_members));
        let dir =
            std::env::temp_dir().join(format!("ftvmm-replication-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let proxy = match (&etcd, witness_proxy) {
            (Some(etcd), true) => Some(WitnessProxy::start(&hosts, etcd, &dir)),
            _ => None,
        };
        let witness_args: Vec<String> = match &etcd {
            Some(etcd) => vec![
                "--witness".into(),
                proxy
                    .as_ref()
                    .map_or(etcd.url().to_string(), |p| p.url.clone()),
                "--guest-name".into(),
                format!("pair-{name}"),
            ],
            None => vec![],
        };
        let api = dir.join("primary.sock");
        let (a_ip, b_ip) = (hosts.a_ip(), hosts.b_ip());
        let pki = tls_pki(
            &dir,
            &[
                ("a", &["127.0.0.1", a_ip.as_str()]),
                ("b", &[b_ip.as_str()]),
            ],
        );
        let listen = format!("{b_ip}:7100");
        let disk_args = |identity: &str| -> Vec<String> {
            let mut args = Vec::new();
            if disk {
                args.extend(image_args(&dir, "disk", identity, DISK_BYTES));
            }
            if let Some(mib) = storm_disk_mib {
                args.extend(image_args(&dir, "storm", identity, (mib << 20) as usize));
            }
            args
        };
        let mut standby = spawn_standby(
            &hosts.b,
            &listen,
            &pki.join("b"),
            failure_timeout_ms,
            &[witness_args.clone(), disk_args("b")].concat(),
            &dir.join("standby-b.sock"),
        );
        standby.wait_for_stderr("standing by on", DEADLINE);
        let impairment = link.map(|spec| {
            let spec = impair::link::LinkImpairment {
                ports: vec![7100],
                ..spec
            };
            impair::link::spawn_in_netns(hosts.a.name(), &spec)
                .unwrap_or_else(|e| panic!("ftvmm-impair {spec:?}: {e}"))
        });

        let mut primary_cmd = hosts.a.command(ftvmm_bin().to_str().unwrap());
        primary_cmd
            .env("FTVMM_LOG", pair_log())
            .args(["run", "--kernel", testguest().to_str().unwrap()])
            .args(["--memory", "128", "--net", "tap=tap0"])
            .args([
                "--cmdline",
                &format!(
                    "mode=net ip={}/24 dirty=500 dirty_mb=8 {storm_cmdline}",
                    hosts.guest_ip()
                ),
            ])
            .args(["--standby", &listen, "--epoch-ms", "50"])
            .args(&witness_args)
            .args(disk_args("a"))
            .arg("--tls")
            .arg(pki.join("a"))
            .arg("--api-socket")
            .arg(&api);
        let mut primary = RunningVm::spawn(primary_cmd);
        primary.wait_for("testguest: net up", DEADLINE);
        primary.wait_for_stderr("guest protected by", DEADLINE);

        let stop = Arc::new(AtomicBool::new(false));
        let acknowledged = Arc::new(AtomicU64::new(0));
        let client = client.then(|| {
            crate::clients::incrementer(
                hosts.lan.name(),
                format!("{}:4000", hosts.guest_ip()),
                stop.clone(),
                acknowledged.clone(),
                Duration::from_secs(60),
            )
        });
        Self {
            hosts,
            _etcd: etcd,
            pki,
            witness_args,
            failure_timeout_ms,
            disk,
            dir,
            standby,
            primary,
            api,
            stop,
            acknowledged,
            client,
            storm_disk_mib,
            impairment,
            witness_proxy: proxy,
        }
    }

    /// Waits for the standby to end on its own with `code`, having said `says`, and never having
    /// taken over.
    pub fn assert_standby_ends_without_takeover(&mut self, code: i32, says: &str) {
        assert_eq!(
            self.standby.wait_exit(DEADLINE),
            Some(code),
            "{}",
            self.standby.stderr()
        );
        let err = self.standby.stderr();
        assert!(err.contains(says), "{err}");
        assert!(!err.contains("taking over"), "{err}");
    }

    /// How the proxy in front of the witness treats etcd's answers from now on: `pass`,
    /// `delay MS`, `lose PCT`, `blackhole` (docs/impairment.md).
    pub fn set_witness_answers(&self, mode: &str) {
        let proxy = self
            .witness_proxy
            .as_ref()
            .expect("the pair was made with witness_proxy");
        let answer = impair::proxy::send_control(&proxy.control, &format!("mode {mode}"))
            .unwrap_or_else(|e| panic!("the witness proxy's control socket: {e}"));
        assert_eq!(answer, "ok", "mode {mode}");
    }

    /// A new standby on host A (`on_a`) or B, listening on that host's address, port 7100, with an
    /// API socket in the pair's directory; returns it and its address.
    pub fn new_standby(&self, on_a: bool) -> (RunningVm, String) {
        let (host, ip, identity) = if on_a {
            (&self.hosts.a, self.hosts.a_ip(), "a")
        } else {
            (&self.hosts.b, self.hosts.b_ip(), "b")
        };
        let listen = format!("{ip}:7100");
        let mut args = self.witness_args.clone();
        if self.disk {
            args.extend(image_args(&self.dir, "disk", identity, DISK_BYTES));
        }
        if let Some(mib) = self.storm_disk_mib {
            args.extend(image_args(
                &self.dir,
                "storm",
                identity,
                (mib << 20) as usize,
            ));
        }
        let mut standby = spawn_standby(
            host,
            &listen,
            &self.pki.join(identity),
            self.failure_timeout_ms,
            &args,
            &self.dir.join(format!("standby-{identity}.sock")),
        );
        standby.wait_for_stderr("standing by on", DEADLINE);
        (standby, listen)
    }

    /// After a failover: a fresh standby where the dead primary was (host A if
    /// `dead_primary_on_a`) protects the survivor, which becomes the pair's primary. Returns the
    /// survivor's API socket.
    pub fn reprotect_survivor(
        &mut self,
        dead_primary_on_a: bool,
        what: &str,
    ) -> std::path::PathBuf {
        let survivor_api = self.dir.join(format!(
            "standby-{}.sock",
            if dead_primary_on_a { "b" } else { "a" }
        ));
        let (standby, listen) = self.new_standby(dead_primary_on_a);
        protect(&survivor_api, &listen, what);
        self.primary = std::mem::replace(&mut self.standby, standby);
        survivor_api
    }

    pub fn acknowledged(&self) -> u64 {
        self.acknowledged.load(Ordering::SeqCst)
    }

    /// Waits until the client has `n` acknowledged increments.
    pub fn wait_acknowledged(&self, n: u64, what: &str) {
        let t0 = Instant::now();
        while self.acknowledged() < n {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "{what}: {} of {n} increments acknowledged\nprotection: {}\nprimary:\n{}\nguest:\n{}\nstandby:\n{}",
                self.acknowledged(),
                self.protection(),
                self.primary.stderr(),
                self.primary.output(),
                self.standby.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The primary's protection status.
    pub fn protection(&self) -> serde_json::Value {
        let status = crate::run_ftvmm(
            &[
                "vm",
                "--api-socket",
                self.api.to_str().unwrap(),
                "protection",
            ],
            DEADLINE,
        );
        assert_eq!(status.code(), Some(0), "{status:?}");
        serde_json::from_str(&status.stdout).unwrap()
    }

    /// Stops the client and both VMs; the client's last acknowledged value (it checked every
    /// reply).
    pub fn stop_all(&mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        let last = self
            .client
            .take()
            .expect("the client runs until stopped once")
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("client: {e}\nstandby:\n{}", self.standby.stderr()));
        self.primary.kill();
        self.standby.kill();
        last
    }

    /// As [`ProtectedPair::stop_all`], then removes the pair's files.
    pub fn finish(mut self) -> u64 {
        let last = match self.client {
            Some(_) => self.stop_all(),
            None => self.acknowledged(),
        };
        let _ = std::fs::remove_dir_all(&self.dir);
        last
    }
}

/// Size of a protected guest's disk in the tests.
pub const DISK_BYTES: usize = 16 << 20;

/// `ftvmm standby` in `host`'s namespace on its TAP `tap0`.
pub fn spawn_standby(
    host: &crate::netns::NetNs,
    listen: &str,
    identity: &std::path::Path,
    failure_timeout_ms: u64,
    witness_args: &[String],
    api: &std::path::Path,
) -> RunningVm {
    let mut cmd = host.command(ftvmm_bin().to_str().unwrap());
    cmd.env("FTVMM_LOG", pair_log())
        .args(["standby", "--listen", listen, "--net", "tap=tap0"])
        .args(["--failure-timeout-ms", &failure_timeout_ms.to_string()])
        .args(witness_args)
        .arg("--tls")
        .arg(identity)
        .arg("--api-socket")
        .arg(api);
    RunningVm::spawn(cmd)
}

pub fn signal(vm: &RunningVm, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([signal, &vm.pid().to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill {signal}");
}

/// Cuts host B (the standby's) off the network, or heals it.
pub fn set_standby_host_link(pair: &ProtectedPair, up: bool) {
    set_host_link(&pair.hosts.b, up);
}

/// Cuts a host off the network (its uplink down), or heals it.
pub fn set_host_link(host: &crate::netns::NetNs, up: bool) {
    let status = host
        .command("ip")
        .args(["link", "set", "uplink", if up { "up" } else { "down" }])
        .status()
        .expect("ip link");
    assert!(status.success());
}

/// Frames a guest on `host` has put on its TAP (the host side receives them).
pub fn frames_on_tap(host: &crate::netns::NetNs) -> u64 {
    let out = host
        .command("cat")
        .arg("/sys/class/net/tap0/statistics/rx_packets")
        .output()
        .expect("read TAP counters");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("a count")
}

/// Frames the guest on host A has put on its TAP.
pub fn frames_from_primary(pair: &ProtectedPair) -> u64 {
    frames_on_tap(&pair.hosts.a)
}

/// Continues a primary stopped (SIGSTOP) while its standby took over: it must fence itself (exit
/// 5) without putting a frame on its TAP, and the survivor must go on acknowledging.
pub fn wake_old_primary_and_expect_it_fenced(pair: &mut ProtectedPair) {
    let frames_at_wake = frames_from_primary(pair);
    signal(&pair.primary, "-CONT");
    assert_eq!(
        pair.primary.wait_exit(DEADLINE),
        Some(5),
        "{}",
        pair.primary.stderr()
    );
    assert!(
        pair.primary.stderr().contains("fenced"),
        "{}",
        pair.primary.stderr()
    );
    assert_eq!(
        frames_from_primary(pair),
        frames_at_wake,
        "the woken primary put frames on its TAP\n{}",
        pair.primary.stderr()
    );
    let now = pair.acknowledged();
    pair.wait_acknowledged(now + 10, "on the standby after the old primary woke");
}

/// The standby's copy never ran: its TAP on host B never saw a frame from a guest.
pub fn assert_standby_never_sent(pair: &ProtectedPair) {
    assert_eq!(
        frames_on_tap(&pair.hosts.b),
        0,
        "the standby's copy put frames on its TAP\n{}",
        pair.standby.stderr()
    );
}

/// `ftvmm vm protect --standby STANDBY` on the VM behind `api`; it must succeed.
pub fn protect(api: &std::path::Path, standby: &str, what: &str) {
    let out = crate::run_ftvmm(
        &[
            "vm",
            "--api-socket",
            api.to_str().unwrap(),
            "protect",
            "--standby",
            standby,
        ],
        DEADLINE,
    );
    assert_eq!(out.code(), Some(0), "{what}: {out:?}");
}

/// Waits until the VM behind `api` reports protection in `state`.
pub fn wait_protection_state(api: &std::path::Path, state: &str, what: &str) {
    let t0 = Instant::now();
    loop {
        let out = crate::run_ftvmm(
            &["vm", "--api-socket", api.to_str().unwrap(), "protection"],
            DEADLINE,
        );
        if out.stdout.contains(&format!("\"{state}\"")) {
            return;
        }
        assert!(t0.elapsed() < DEADLINE, "{what}: not {state}: {out:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Random kill points, 0 to 149 ms apart from now (xorshift from the clock; the seed is printed).
pub struct KillPoints(u64);

impl KillPoints {
    pub fn from_clock() -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        eprintln!("kill points from seed {seed}");
        Self(seed | 1)
    }

    pub fn next_point(&mut self) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        Duration::from_millis(self.0 % 150)
    }
}

/// Waits until the VM behind `api` reports protection `protected` with a committed epoch.
pub fn wait_protected(api: &std::path::Path, what: &str) {
    let t0 = Instant::now();
    loop {
        let out = crate::run_ftvmm(
            &["vm", "--api-socket", api.to_str().unwrap(), "protection"],
            DEADLINE,
        );
        if let Ok(s) = serde_json::from_str::<serde_json::Value>(&out.stdout) {
            if s["state"] == "protected" && s["committed_epoch"].as_u64().unwrap_or(0) > 0 {
                return;
            }
            assert_ne!(s["state"], "degraded", "{what}: protection failed: {s}");
        }
        assert!(t0.elapsed() < DEADLINE, "{what}: not protected: {out:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One request to the key-value service at `addr` from inside `ns`; the reply line.
pub fn kv_request(ns: &crate::netns::NetNs, addr: String, command: &str) -> String {
    let command = format!("{command}\n");
    ns.run(move || {
        use std::io::{BufRead, Write};
        let s = std::net::TcpStream::connect_timeout(&addr.parse().unwrap(), DEADLINE)
            .expect("connect to the key-value service");
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut r = std::io::BufReader::new(s);
        r.get_mut().write_all(command.as_bytes()).unwrap();
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        line.trim().to_string()
    })
}
