//! A TCP proxy that mistreats replies, meant to sit in front of etcd (the witness: an HTTP/1.1 JSON
//! gateway on keep-alive connections). Requests (client to server) are always forwarded at once,
//! so the server applies them; what happens to the replies (server to client) depends on the
//! [`Mode`], which can change while connections are open:
//!
//! - `pass`: forwarded at once;
//! - `delay MS`: each chunk held MS before it is forwarded, so replies arrive after a client's
//!   timeout;
//! - `lose PCT [HOLD_MS]`: with probability PCT per chunk, the chunk is swallowed, and so is
//!   everything after it on that connection, which is held open HOLD_MS (default 5000) and then
//!   closed: the request was applied but its answer is lost (the "ambiguous result" case);
//! - `blackhole`: nothing comes back (replies are discarded; connections stay open).
//!
//! The mode is set by [`TcpProxy::set_mode`] in-process, or through a control socket
//! ([`TcpProxy::serve_control`]) that takes one command per line (`mode delay 3000`, or `mode` to
//! ask) and answers `ok`, the mode, or `error: ...`.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::rng::Rng;

/// How long a lost reply's connection is held open before it is closed, unless the mode says.
pub const DEFAULT_LOSE_HOLD: Duration = Duration::from_secs(5);
/// How long the proxy waits for the server when a client connects.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest single sleep of a waiting thread, so that stopping is prompt.
const SLEEP_SLICE: Duration = Duration::from_millis(20);

/// What happens to server-to-client bytes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    /// Forwarded at once.
    Pass,
    /// Each chunk held this long.
    Delay(Duration),
    /// With probability `percent` per chunk, the connection's replies are swallowed from that
    /// chunk on, and the connection is closed after `hold`.
    Lose { percent: f64, hold: Duration },
    /// Nothing is forwarded.
    Blackhole,
}

/// A mode that could not be read.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("bad mode {given:?}: {reason} (expected pass, delay MS, lose PCT [HOLD_MS] or blackhole)")]
pub struct ParseModeError {
    given: String,
    reason: String,
}

impl FromStr for Mode {
    type Err = ParseModeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let fail = |reason: &str| ParseModeError {
            given: s.to_string(),
            reason: reason.to_string(),
        };
        let words: Vec<&str> = s.split_whitespace().collect();
        let millis = |w: &str| -> Result<Duration, ParseModeError> {
            w.parse::<u64>()
                .map(Duration::from_millis)
                .map_err(|_| fail(&format!("{w:?} is not a number of milliseconds")))
        };
        match words[..] {
            ["pass"] => Ok(Self::Pass),
            ["blackhole"] => Ok(Self::Blackhole),
            ["delay", ms] => Ok(Self::Delay(millis(ms)?)),
            ["lose", pct] | ["lose", pct, _] => {
                let percent: f64 = pct
                    .parse()
                    .ok()
                    .filter(|p| (0.0..=100.0).contains(p))
                    .ok_or_else(|| fail(&format!("{pct:?} is not a percentage")))?;
                let hold = match words.get(2) {
                    Some(ms) => millis(ms)?,
                    None => DEFAULT_LOSE_HOLD,
                };
                Ok(Self::Lose { percent, hold })
            }
            _ => Err(fail("unknown mode or wrong number of arguments")),
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Pass => write!(f, "pass"),
            Self::Delay(d) => write!(f, "delay {}", d.as_millis()),
            Self::Lose { percent, hold } => write!(f, "lose {percent} {}", hold.as_millis()),
            Self::Blackhole => write!(f, "blackhole"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: io::Error },
    #[error("control socket {path}: {source}")]
    Control { path: PathBuf, source: io::Error },
}

/// What the proxy's threads share.
struct Shared {
    to: SocketAddr,
    mode: Mutex<Mode>,
    stop: AtomicBool,
    /// Open connections (client side, server side), to be shut down when the proxy stops.
    connections: Mutex<HashMap<u64, (TcpStream, TcpStream)>>,
    next_id: AtomicU64,
    /// Seeds each connection's random choices.
    seeds: Mutex<Rng>,
}

impl Shared {
    fn mode(&self) -> Mode {
        *self.mode.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Sleeps until `deadline`; false if the proxy stopped meanwhile.
    fn sleep_until(&self, deadline: Instant) -> bool {
        loop {
            if self.stopped() {
                return false;
            }
            let now = Instant::now();
            if now >= deadline {
                return true;
            }
            std::thread::sleep((deadline - now).min(SLEEP_SLICE));
        }
    }
}

/// A running proxy; stopped (listener closed, connections shut down) when dropped.
pub struct TcpProxy {
    local: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
    control: Option<(PathBuf, JoinHandle<()>)>,
}

impl TcpProxy {
    /// Listens on `listen` (port 0 picks one: see [`TcpProxy::local_addr`]) and forwards each
    /// connection to `to`, replies treated as `mode` says.
    pub fn start(listen: SocketAddr, to: SocketAddr, mode: Mode) -> Result<Self, Error> {
        let listener = TcpListener::bind(listen).map_err(|source| Error::Listen {
            addr: listen,
            source,
        })?;
        let local = listener.local_addr().map_err(|source| Error::Listen {
            addr: listen,
            source,
        })?;
        let shared = Arc::new(Shared {
            to,
            mode: Mutex::new(mode),
            stop: AtomicBool::new(false),
            connections: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            seeds: Mutex::new(Rng::from_entropy()),
        });
        let accepting = Arc::clone(&shared);
        let acceptor = std::thread::spawn(move || accept_loop(listener, accepting));
        Ok(Self {
            local,
            shared,
            acceptor: Some(acceptor),
            control: None,
        })
    }

    /// The address clients connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        self.shared.mode()
    }

    /// Changes the mode; it applies to the next chunk of every connection.
    pub fn set_mode(&self, mode: Mode) {
        *self.shared.mode.lock().unwrap_or_else(|e| e.into_inner()) = mode;
    }

    /// Makes the random choices of `lose` reproducible (for connections opened from now on).
    pub fn set_seed(&self, seed: u64) {
        *self.shared.seeds.lock().unwrap_or_else(|e| e.into_inner()) = Rng::from_seed(seed);
    }

    /// Accepts mode commands on a unix socket at `path` (replacing a stale socket there) until
    /// the proxy stops; the socket file is removed then.
    pub fn serve_control(&mut self, path: &Path) -> Result<(), Error> {
        let control_error = |source| Error::Control {
            path: path.to_path_buf(),
            source,
        };
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if meta.file_type().is_socket() {
                std::fs::remove_file(path).map_err(control_error)?;
            }
        }
        let listener = UnixListener::bind(path).map_err(control_error)?;
        let shared = Arc::clone(&self.shared);
        let handle = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if shared.stopped() {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let shared = Arc::clone(&shared);
                std::thread::spawn(move || serve_control_client(stream, &shared));
            }
        });
        self.control = Some((path.to_path_buf(), handle));
        Ok(())
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        // Wake the blocked accept calls with a connection of our own.
        let _ = TcpStream::connect_timeout(&wake_address(self.local), Duration::from_secs(1));
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        if let Some((path, handle)) = self.control.take() {
            let _ = UnixStream::connect(&path);
            let _ = handle.join();
            let _ = std::fs::remove_file(&path);
        }
        let connections = std::mem::take(
            &mut *self
                .shared
                .connections
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        for (client, server) in connections.values() {
            let _ = client.shutdown(Shutdown::Both);
            let _ = server.shutdown(Shutdown::Both);
        }
    }
}

/// Where to connect to reach a listener on `local` (a wildcard address is reached on loopback).
fn wake_address(local: SocketAddr) -> SocketAddr {
    let ip = match local.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, local.port())
}

/// Sends one command (`mode delay 3000`, or `mode`) to a proxy's control socket at `path` and
/// returns its answer (`ok`, `mode ...`, or `error: ...`).
pub fn send_control(path: &Path, command: &str) -> io::Result<String> {
    let mut stream = UnixStream::connect(path)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    writeln!(stream, "{}", command.trim())?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer)?;
    Ok(answer.trim_end().to_string())
}

/// Answers one control client's commands, one per line.
fn serve_control_client(stream: UnixStream, shared: &Shared) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { break };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let answer = match line.split_once(char::is_whitespace) {
            None if line == "mode" => format!("mode {}", shared.mode()),
            Some(("mode", spec)) => match spec.parse::<Mode>() {
                Ok(mode) => {
                    *shared.mode.lock().unwrap_or_else(|e| e.into_inner()) = mode;
                    "ok".to_string()
                }
                Err(e) => format!("error: {e}"),
            },
            _ => format!("error: unknown command {line:?} (expected: mode SPEC, or mode)"),
        };
        if writeln!(writer, "{answer}").is_err() {
            break;
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for client in listener.incoming() {
        if shared.stopped() {
            break;
        }
        let Ok(client) = client else {
            // Out of descriptors, most likely: give connections a moment to end.
            std::thread::sleep(SLEEP_SLICE);
            continue;
        };
        let shared = Arc::clone(&shared);
        std::thread::spawn(move || {
            if let Err(e) = open_connection(client, &shared) {
                eprintln!("ftvmm-impair: tcp-proxy: {e}");
            }
        });
    }
}

/// Removes a connection from the registry once all its threads are done.
struct Registration {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.shared
            .connections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

/// What the reply reader tells the reply writer.
enum Reply {
    /// Forward these bytes at this time.
    Chunk(Instant, Vec<u8>),
    /// The server finished: end the client's side after what came before.
    End,
    /// A reply was lost: close both sides at this time.
    CloseAt(Instant),
}

/// Connects to the server and starts the three threads of a connection: requests, reply reader,
/// reply writer.
fn open_connection(client: TcpStream, shared: &Arc<Shared>) -> io::Result<()> {
    let server = TcpStream::connect_timeout(&shared.to, CONNECT_TIMEOUT)?;
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    shared
        .connections
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(id, (client.try_clone()?, server.try_clone()?));
    let registration = Arc::new(Registration {
        shared: Arc::clone(shared),
        id,
    });
    // The proxy may have stopped between accept and registration: then nobody shuts us down.
    if shared.stopped() {
        let _ = client.shutdown(Shutdown::Both);
        let _ = server.shutdown(Shutdown::Both);
        return Ok(());
    }
    let rng = Rng::from_seed(
        shared
            .seeds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .next_u64(),
    );
    let (tx, rx) = mpsc::channel();

    let (requests_from, requests_to) = (client.try_clone()?, server.try_clone()?);
    let reg = Arc::clone(&registration);
    std::thread::spawn(move || {
        forward_requests(requests_from, requests_to);
        drop(reg);
    });

    let replies_from = server.try_clone()?;
    let (reader_shared, reg) = (Arc::clone(shared), Arc::clone(&registration));
    std::thread::spawn(move || {
        read_replies(replies_from, &reader_shared, rng, tx);
        drop(reg);
    });

    let writer_shared = Arc::clone(shared);
    std::thread::spawn(move || {
        write_replies(client, server, &writer_shared, rx);
        drop(registration);
    });
    Ok(())
}

/// Client to server, always at once; the client's end of stream is passed on.
fn forward_requests(mut client: TcpStream, mut server: TcpStream) {
    let _ = io::copy(&mut client, &mut server);
    let _ = server.shutdown(Shutdown::Write);
}

/// Reads the server's replies and decides, per chunk, by the current mode.
fn read_replies(mut server: TcpStream, shared: &Shared, mut rng: Rng, tx: mpsc::Sender<Reply>) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut lost = false;
    loop {
        let n = match server.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if lost {
            continue;
        }
        let now = Instant::now();
        let reply = match shared.mode() {
            Mode::Pass => Reply::Chunk(now, buf[..n].to_vec()),
            Mode::Delay(d) => Reply::Chunk(now + d, buf[..n].to_vec()),
            Mode::Lose { percent, hold } => {
                if rng.chance(percent) {
                    lost = true;
                    Reply::CloseAt(now + hold)
                } else {
                    Reply::Chunk(now, buf[..n].to_vec())
                }
            }
            Mode::Blackhole => continue,
        };
        if tx.send(reply).is_err() {
            return;
        }
    }
    if !lost {
        let _ = tx.send(Reply::End);
    }
}

/// Forwards replies to the client at their times; closes the connection when a reply was lost.
fn write_replies(
    mut client: TcpStream,
    server: TcpStream,
    shared: &Shared,
    rx: mpsc::Receiver<Reply>,
) {
    for reply in rx {
        match reply {
            Reply::Chunk(at, bytes) => {
                if !shared.sleep_until(at) || client.write_all(&bytes).is_err() {
                    break;
                }
            }
            Reply::End => {
                let _ = client.shutdown(Shutdown::Write);
                return;
            }
            Reply::CloseAt(at) => {
                shared.sleep_until(at);
                break;
            }
        }
    }
    let _ = client.shutdown(Shutdown::Both);
    let _ = server.shutdown(Shutdown::Both);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A line server on loopback: answers each line `X` with `reply X`, counting the requests it
    /// applied. Keep-alive: many requests per connection.
    struct LineServer {
        addr: SocketAddr,
        applied: Arc<AtomicUsize>,
    }

    impl LineServer {
        fn start() -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            let applied = Arc::new(AtomicUsize::new(0));
            let counter = Arc::clone(&applied);
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    let Ok(conn) = conn else { break };
                    let counter = Arc::clone(&counter);
                    std::thread::spawn(move || {
                        let mut writer = conn.try_clone().unwrap();
                        for line in BufReader::new(conn).lines() {
                            let Ok(line) = line else { break };
                            counter.fetch_add(1, Ordering::SeqCst);
                            if writeln!(writer, "reply {line}").is_err() {
                                break;
                            }
                        }
                    });
                }
            });
            Self { addr, applied }
        }
    }

    /// A client connection through the proxy.
    struct Client {
        reader: BufReader<TcpStream>,
        writer: TcpStream,
    }

    impl Client {
        fn connect(proxy: &TcpProxy, timeout: Duration) -> Self {
            let stream = TcpStream::connect(proxy.local_addr()).unwrap();
            stream.set_read_timeout(Some(timeout)).unwrap();
            Self {
                writer: stream.try_clone().unwrap(),
                reader: BufReader::new(stream),
            }
        }

        /// Sends `line` and reads the answer: `Ok(Some(answer))`, `Ok(None)` at end of stream,
        /// `Err` on a read timeout.
        fn request(&mut self, line: &str) -> io::Result<Option<String>> {
            writeln!(self.writer, "{line}")?;
            let mut answer = String::new();
            match self.reader.read_line(&mut answer)? {
                0 => Ok(None),
                _ => Ok(Some(answer.trim_end().to_string())),
            }
        }
    }

    fn start(server: &LineServer, mode: Mode) -> TcpProxy {
        TcpProxy::start("127.0.0.1:0".parse().unwrap(), server.addr, mode).unwrap()
    }

    fn wait_for(what: impl Fn() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if what() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    #[test]
    fn modes_parse_and_print() {
        for text in [
            "pass",
            "delay 3000",
            "lose 30 5000",
            "lose 12.5 100",
            "blackhole",
        ] {
            let mode: Mode = text.parse().unwrap();
            assert_eq!(mode.to_string(), text);
        }
        assert_eq!(
            "lose 30".parse::<Mode>().unwrap(),
            Mode::Lose {
                percent: 30.0,
                hold: DEFAULT_LOSE_HOLD
            }
        );
        for bad in [
            "", "delay", "delay x", "lose 101", "lose 5 x", "teleport", "pass 1",
        ] {
            assert!(bad.parse::<Mode>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn pass_forwards_replies_on_a_kept_alive_connection() {
        let server = LineServer::start();
        let proxy = start(&server, Mode::Pass);
        let mut client = Client::connect(&proxy, Duration::from_secs(5));
        for i in 0..20 {
            assert_eq!(
                client.request(&format!("r{i}")).unwrap().unwrap(),
                format!("reply r{i}")
            );
        }
        assert_eq!(server.applied.load(Ordering::SeqCst), 20);
    }

    #[test]
    fn delay_holds_replies_but_not_requests() {
        let server = LineServer::start();
        let proxy = start(&server, Mode::Delay(Duration::from_millis(300)));
        let mut client = Client::connect(&proxy, Duration::from_secs(5));
        let sent = Instant::now();
        writeln!(client.writer, "a").unwrap();
        assert!(wait_for(|| server.applied.load(Ordering::SeqCst) == 1));
        assert!(
            sent.elapsed() < Duration::from_millis(250),
            "the request was held"
        );
        let mut answer = String::new();
        client.reader.read_line(&mut answer).unwrap();
        assert_eq!(answer, "reply a\n");
        let took = sent.elapsed();
        assert!(took >= Duration::from_millis(300), "reply after {took:?}");
    }

    #[test]
    fn delay_past_the_client_timeout_times_the_client_out() {
        let server = LineServer::start();
        let proxy = start(&server, Mode::Delay(Duration::from_millis(800)));
        let mut client = Client::connect(&proxy, Duration::from_millis(200));
        let err = client.request("a").unwrap_err();
        assert!(matches!(
            err.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ));
        assert_eq!(
            server.applied.load(Ordering::SeqCst),
            1,
            "the request was applied"
        );
    }

    #[test]
    fn lose_applies_the_request_swallows_the_reply_then_closes() {
        let server = LineServer::start();
        let hold = Duration::from_millis(300);
        let proxy = start(
            &server,
            Mode::Lose {
                percent: 100.0,
                hold,
            },
        );
        let mut client = Client::connect(&proxy, Duration::from_secs(5));
        let sent = Instant::now();
        assert_eq!(client.request("a").unwrap(), None, "a reply came through");
        assert!(sent.elapsed() >= hold, "closed after {:?}", sent.elapsed());
        assert_eq!(server.applied.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn lose_zero_loses_nothing() {
        let server = LineServer::start();
        let proxy = start(
            &server,
            Mode::Lose {
                percent: 0.0,
                hold: Duration::from_millis(1),
            },
        );
        let mut client = Client::connect(&proxy, Duration::from_secs(5));
        for i in 0..10 {
            assert_eq!(
                client.request(&i.to_string()).unwrap().unwrap(),
                format!("reply {i}")
            );
        }
    }

    #[test]
    fn lose_some_loses_about_that_share_of_connections() {
        let server = LineServer::start();
        let proxy = start(
            &server,
            Mode::Lose {
                percent: 50.0,
                hold: Duration::ZERO,
            },
        );
        proxy.set_seed(11);
        let mut answered = 0;
        for i in 0..40 {
            let mut client = Client::connect(&proxy, Duration::from_secs(5));
            if client.request(&i.to_string()).unwrap().is_some() {
                answered += 1;
            }
        }
        assert!(
            (8..=32).contains(&answered),
            "{answered} of 40 answered at 50% loss"
        );
        assert_eq!(server.applied.load(Ordering::SeqCst), 40);
    }

    #[test]
    fn blackhole_answers_nothing_and_pass_resumes_on_new_connections() {
        let server = LineServer::start();
        let proxy = start(&server, Mode::Blackhole);
        let mut client = Client::connect(&proxy, Duration::from_millis(300));
        assert!(
            client.request("a").is_err(),
            "an answer came out of the blackhole"
        );
        assert_eq!(server.applied.load(Ordering::SeqCst), 1);
        proxy.set_mode(Mode::Pass);
        assert_eq!(proxy.mode(), Mode::Pass);
        let mut client = Client::connect(&proxy, Duration::from_secs(5));
        assert_eq!(client.request("b").unwrap().unwrap(), "reply b");
    }

    #[test]
    fn mode_changes_apply_to_open_connections() {
        let server = LineServer::start();
        let proxy = start(&server, Mode::Pass);
        let mut client = Client::connect(&proxy, Duration::from_millis(300));
        assert_eq!(client.request("a").unwrap().unwrap(), "reply a");
        proxy.set_mode(Mode::Blackhole);
        assert!(client.request("b").is_err());
        assert_eq!(server.applied.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn control_socket_sets_and_reports_the_mode() {
        let server = LineServer::start();
        let mut proxy = start(&server, Mode::Pass);
        let path =
            std::env::temp_dir().join(format!("ftvmm-impair-ctl-{}.sock", std::process::id()));
        proxy.serve_control(&path).unwrap();
        let stream = UnixStream::connect(&path).unwrap();
        let mut writer = stream.try_clone().unwrap();
        let mut reader = BufReader::new(stream);
        let mut ask = |command: &str| {
            writeln!(writer, "{command}").unwrap();
            let mut answer = String::new();
            reader.read_line(&mut answer).unwrap();
            answer.trim_end().to_string()
        };
        assert_eq!(ask("mode delay 3000"), "ok");
        assert_eq!(proxy.mode(), Mode::Delay(Duration::from_secs(3)));
        assert_eq!(ask("mode"), "mode delay 3000");
        assert!(ask("mode warp 9").starts_with("error: bad mode"));
        assert!(ask("reboot").starts_with("error: unknown command"));
        assert_eq!(proxy.mode(), Mode::Delay(Duration::from_secs(3)));
        assert_eq!(send_control(&path, "mode blackhole").unwrap(), "ok");
        assert_eq!(proxy.mode(), Mode::Blackhole);
        drop(proxy);
        assert!(!path.exists(), "control socket left behind");
    }

    #[test]
    fn dropping_the_proxy_stops_it() {
        let server = LineServer::start();
        let proxy = start(&server, Mode::Pass);
        let addr = proxy.local_addr();
        let mut client = Client::connect(&proxy, Duration::from_secs(5));
        assert_eq!(client.request("a").unwrap().unwrap(), "reply a");
        drop(proxy);
        assert!(TcpStream::connect(addr).is_err(), "still listening");
        // The open connection was shut down: its next request finds the end of stream.
        assert!(!matches!(client.request("b"), Ok(Some(_))));
    }
}
