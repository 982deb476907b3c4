//! A receiver's handshakes, many at once: every connection on the listening socket is carried from
//! TCP accept through TLS to its first message side by side with the others, on the one thread that
//! waits for the peer, so that no connection can hold the door for the next.
//!
//! Rules (docs/wire-protocol.md):
//! - One deadline for the whole of a connection's handshake (TLS and the first frame), however the
//!   peer spaces its bytes: a connection that dribbles holds only its own slot, and only until then.
//! - At most [`MAX_HANDSHAKES`] connections in handshake, and [`MAX_HANDSHAKES_PER_SOURCE`] from
//!   one address: beyond that a new connection is closed at once.
//! - Refusals are logged, at most [`super::refusals::REFUSALS_LOGGED`] a minute, then counted.
//!
//! The sockets are non-blocking while here (`poll(2)` on the listener and every connection); the
//! one that opens as wanted is handed over blocking, with the handshake timeout on its reads and
//! writes, as a [`Link`].

use std::collections::HashMap;
use std::io::{self, Read};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use rustls::ServerConnection;

use super::connect::handshake_reason;
use super::refusals::RefusalLog;
use super::security::LinkSecurity;
use super::stream::Link;
use crate::wire::frame::{frame_len, HEADER_LEN};
use crate::wire::{read_frame, Message};

/// Most connections in handshake at once.
pub const MAX_HANDSHAKES: usize = 256;
/// Most connections in handshake at once from one address.
pub const MAX_HANDSHAKES_PER_SOURCE: usize = 16;

/// One connection on its way to its first message.
struct Handshake {
    socket: TcpStream,
    peer: SocketAddr,
    /// The TLS session, or none on a plain link.
    tls: Option<ServerConnection>,
    deadline: Instant,
    /// The first frame's bytes so far.
    frame: Vec<u8>,
}

/// Where a handshake stands after the bytes that were there.
enum Step {
    Waiting,
    Opened(Message),
    Failed(String),
}

impl Handshake {
    fn new(
        socket: TcpStream,
        peer: SocketAddr,
        security: &LinkSecurity,
        deadline: Instant,
    ) -> Result<Self, String> {
        socket.set_nonblocking(true).map_err(|e| e.to_string())?;
        let _ = socket.set_nodelay(true);
        let tls = match security {
            LinkSecurity::PlainTcp => {
                tracing::warn!(%peer, "INSECURE: accepting a plain TCP link, neither authenticated nor encrypted");
                None
            }
            LinkSecurity::Tls(identity) => Some(
                ServerConnection::new(identity.server.clone()).map_err(|e| format!("TLS: {e}"))?,
            ),
        };
        Ok(Self {
            socket,
            peer,
            tls,
            deadline,
            frame: Vec::new(),
        })
    }

    /// Whether the TLS session has bytes to send (the poll then also waits for room).
    fn wants_write(&self) -> bool {
        self.tls.as_ref().is_some_and(|c| c.wants_write())
    }

    /// Moves every byte that is there without waiting.
    fn advance(&mut self) -> Step {
        match self.try_advance() {
            Ok(Some(message)) => Step::Opened(message),
            Ok(None) => Step::Waiting,
            Err(reason) => Step::Failed(reason),
        }
    }

    fn try_advance(&mut self) -> Result<Option<Message>, String> {
        let Some(conn) = self.tls.as_mut() else {
            return read_first_frame(&mut self.socket, &mut self.frame);
        };
        loop {
            flush_tls(conn, &mut self.socket)?;
            if !conn.is_handshaking() {
                if let Some(message) = read_first_frame(&mut conn.reader(), &mut self.frame)? {
                    return Ok(Some(message));
                }
            }
            match conn.read_tls(&mut self.socket) {
                Ok(0) if conn.is_handshaking() => {
                    let eof = io::Error::from(io::ErrorKind::UnexpectedEof);
                    return Err(format!("TLS handshake failed: {}", handshake_reason(&eof)));
                }
                Ok(0) => return Err("the peer closed the connection".into()),
                Ok(_) => {
                    if let Err(e) = conn.process_new_packets() {
                        // Tell the peer why (its alert) before closing.
                        let _ = flush_tls(conn, &mut self.socket);
                        return Err(format!("TLS handshake failed: {e}"));
                    }
                }
                // Everything queued for the peer was flushed at the top of the loop.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("TLS handshake failed: {}", handshake_reason(&e))),
            }
        }
    }

    /// The opened connection as a blocking [`Link`] with `timeout` on its reads and writes.
    fn into_link(self, timeout: Duration) -> Result<Link, String> {
        self.socket
            .set_nonblocking(false)
            .and_then(|()| self.socket.set_read_timeout(Some(timeout)))
            .and_then(|()| self.socket.set_write_timeout(Some(timeout)))
            .map_err(|e| e.to_string())?;
        Ok(match self.tls {
            Some(conn) => Link::tls_server(conn, self.socket, self.peer),
            None => Link::plain(self.socket, self.peer),
        })
    }
}

/// Sends what the TLS session has for the peer, as far as the socket takes it now.
fn flush_tls(conn: &mut ServerConnection, socket: &mut TcpStream) -> Result<(), String> {
    while conn.wants_write() {
        match conn.write_tls(socket) {
            Ok(0) => return Err("the peer closed the connection".into()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(())
}

/// Gathers the first frame from `from` into `frame`, reading no byte past it (what follows belongs
/// to the link); decodes it once whole. `Ok(None)`: not all there yet.
fn read_first_frame(from: &mut impl Read, frame: &mut Vec<u8>) -> Result<Option<Message>, String> {
    loop {
        let whole = match frame.get(..HEADER_LEN) {
            None => HEADER_LEN,
            Some(header) => frame_len(header.try_into().expect("HEADER_LEN bytes"))
                .map_err(|e| e.to_string())?,
        };
        if frame.len() >= HEADER_LEN && frame.len() == whole {
            return read_frame(&mut frame.as_slice())
                .map(Some)
                .map_err(|e| e.to_string());
        }
        let start = frame.len();
        let want = (whole - start).min(64 << 10);
        frame.resize(start + want, 0);
        let read = from.read(&mut frame[start..]);
        frame.truncate(start + *read.as_ref().unwrap_or(&0));
        match read {
            Ok(0) => return Err("the peer closed the connection before its first message".into()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Waits on `listener` for a connection that passes `security` and whose first message `wanted`
/// takes, carrying every connection's handshake at once (each within `timeout` of its accept);
/// returns that link and message. The others are refused, closed and logged.
pub(super) fn first_opening(
    listener: &TcpListener,
    security: &LinkSecurity,
    timeout: Duration,
    wanted: &dyn Fn(&Message) -> Result<(), String>,
) -> io::Result<(Link, Message)> {
    listener.set_nonblocking(true)?;
    let opened = serve(listener, security, timeout, wanted);
    listener.set_nonblocking(false)?;
    opened
}

fn serve(
    listener: &TcpListener,
    security: &LinkSecurity,
    timeout: Duration,
    wanted: &dyn Fn(&Message) -> Result<(), String>,
) -> io::Result<(Link, Message)> {
    let mut handshakes: Vec<Handshake> = Vec::new();
    let mut refusals = RefusalLog::new("");
    loop {
        let mut fds = Vec::with_capacity(handshakes.len() + 1);
        fds.push(pollfd(listener.as_raw_fd(), libc::POLLIN));
        for h in &handshakes {
            let out = if h.wants_write() { libc::POLLOUT } else { 0 };
            fds.push(pollfd(h.socket.as_raw_fd(), libc::POLLIN | out));
        }
        let now = Instant::now();
        let wait = handshakes
            .iter()
            .map(|h| h.deadline.saturating_duration_since(now))
            .min()
            .map_or(-1, |d| {
                d.as_millis().saturating_add(1).min(i32::MAX as u128) as i32
            });
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structures that outlives the call.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait) };
        if ready < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        // The handshakes that were polled (advanced when their socket is ready), then the new ones
        // (advanced at once: their first bytes may be there already).
        let polled = handshakes.len();
        if fds[0].revents != 0 {
            accept_all(listener, &mut handshakes, security, timeout, &mut refusals)?;
        }
        let now = Instant::now();
        let mut kept = Vec::with_capacity(handshakes.len());
        for (index, mut h) in handshakes.drain(..).enumerate() {
            let due = index >= polled || fds[index + 1].revents != 0;
            let peer = h.peer;
            let step = if due { h.advance() } else { Step::Waiting };
            let refused = match step {
                Step::Opened(message) => match wanted(&message) {
                    Ok(()) => match h.into_link(timeout) {
                        Ok(link) => return Ok((link, message)),
                        Err(reason) => reason,
                    },
                    Err(reason) => reason,
                },
                Step::Failed(reason) => reason,
                Step::Waiting if now >= h.deadline => {
                    format!("no first message within {timeout:?} of its connection")
                }
                Step::Waiting => {
                    kept.push(h);
                    continue;
                }
            };
            refusals.refused(Some(peer), &refused);
        }
        handshakes = kept;
    }
}

/// Accepts every connection waiting on `listener` into `handshakes`, closing at once those over
/// the limits.
fn accept_all(
    listener: &TcpListener,
    handshakes: &mut Vec<Handshake>,
    security: &LinkSecurity,
    timeout: Duration,
    refusals: &mut RefusalLog,
) -> io::Result<()> {
    let mut per_source: HashMap<IpAddr, usize> = HashMap::new();
    for h in handshakes.iter() {
        *per_source.entry(h.peer.ip()).or_default() += 1;
    }
    loop {
        let (socket, peer) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                ) =>
            {
                continue
            }
            // Out of descriptors or memory: the connections in handshake go on; so does the wait.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                ) =>
            {
                tracing::warn!("cannot accept a connection now: {e}");
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let from_source = per_source.entry(peer.ip()).or_default();
        if handshakes.len() >= MAX_HANDSHAKES {
            refusals.refused(
                Some(peer),
                &format!("{MAX_HANDSHAKES} connections are in handshake already"),
            );
            continue;
        }
        if *from_source >= MAX_HANDSHAKES_PER_SOURCE {
            refusals.refused(Some(peer),
                &format!("{MAX_HANDSHAKES_PER_SOURCE} connections from its address are in handshake already"),
            );
            continue;
        }
        match Handshake::new(socket, peer, security, Instant::now() + timeout) {
            Ok(h) => {
                *from_source += 1;
                handshakes.push(h);
            }
            Err(reason) => refusals.refused(Some(peer), &reason),
        }
    }
}

fn pollfd(fd: i32, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::write_frame;
    use std::io::Write;

    fn frame_of(message: &Message) -> Vec<u8> {
        let mut bytes = Vec::new();
        write_frame(&mut bytes, message).unwrap();
        bytes
    }

    /// A connection to `addr` that opens properly, with `HeartbeatOpen { session }`.
    fn opening(addr: SocketAddr, session: u64) -> TcpStream {
        let mut s = TcpStream::connect(addr).unwrap();
        write_frame(&mut s, &Message::HeartbeatOpen { session }).unwrap();
        s
    }

    /// [`first_opening`] on a plain link; its first message's session. The listener must be
    /// blocking again afterwards, for whoever uses it next.
    fn first_session(
        listener: &TcpListener,
        timeout: Duration,
        wanted: &dyn Fn(&Message) -> Result<(), String>,
    ) -> u64 {
        let (_link, first) =
            first_opening(listener, &LinkSecurity::PlainTcp, timeout, wanted).unwrap();
        // SAFETY: F_GETFL on a descriptor the listener owns; nothing is changed.
        let flags = unsafe { libc::fcntl(listener.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(
            flags & libc::O_NONBLOCK,
            0,
            "the listener was left non-blocking"
        );
        match first {
            Message::HeartbeatOpen { session } => session,
            other => panic!("opened with {}", other.name()),
        }
    }

    /// Hands out its bytes one per read, with "nothing now" between them, as a non-blocking socket
    /// fed by a dribbling peer does.
    struct Dribble {
        bytes: Vec<u8>,
        at: usize,
        starved: bool,
    }

    impl Read for Dribble {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.starved = !self.starved;
            if self.starved {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let Some(&b) = self.bytes.get(self.at) else {
                return Ok(0);
            };
            buf[0] = b;
            self.at += 1;
            Ok(1)
        }
    }

    #[test]
    fn the_first_frame_is_gathered_byte_by_byte_and_nothing_past_it_is_read() {
        let first = Message::HeartbeatOpen { session: 7 };
        let mut bytes = frame_of(&first);
        let whole = bytes.len();
        bytes.extend(frame_of(&Message::HeartbeatOpen { session: 8 }));
        let mut from = Dribble {
            bytes,
            at: 0,
            starved: false,
        };
        let mut frame = Vec::new();
        let mut waits = 0;
        let got = loop {
            match read_first_frame(&mut from, &mut frame).unwrap() {
                Some(message) => break message,
                None => waits += 1,
            }
        };
        assert!(matches!(got, Message::HeartbeatOpen { session: 7 }));
        assert_eq!(from.at, whole, "read past the first frame");
        assert!(waits >= whole, "{waits} waits for {whole} bytes");
    }

    /// A peer that closes in the middle of the TLS handshake is told apart, with the likely cause,
    /// as the blocking handshake said it.
    #[test]
    fn a_close_during_the_tls_handshake_names_the_likely_cause() {
        let dir = std::env::temp_dir().join(format!("ftvmm-handshakes-{}", std::process::id()));
        super::super::certs::generate(&dir, &[("b".into(), vec!["127.0.0.1".into()])]).unwrap();
        let security = LinkSecurity::tls(&dir.join("b")).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (socket, peer) = listener.accept().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut h = Handshake::new(socket, peer, &security, deadline).unwrap();
        client.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00]).unwrap();
        drop(client);
        let reason = loop {
            match h.advance() {
                Step::Waiting => std::thread::sleep(Duration::from_millis(10)),
                Step::Failed(reason) => break reason,
                Step::Opened(m) => panic!("opened with {}", m.name()),
            }
        };
        assert!(reason.contains("during the handshake"), "{reason}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_bad_header_or_an_early_close_is_refused() {
        let mut junk: &[u8] = &[0u8; HEADER_LEN];
        let err = read_first_frame(&mut junk, &mut Vec::new()).unwrap_err();
        assert!(err.contains("magic"), "{err}");
        let bytes = frame_of(&Message::HeartbeatOpen { session: 1 });
        let mut cut: &[u8] = &bytes[..bytes.len() - 1];
        let err = read_first_frame(&mut cut, &mut Vec::new()).unwrap_err();
        assert!(err.contains("closed"), "{err}");
    }

    /// Connections that say nothing, or dribble, hold neither the door nor the next in line: the
    /// one that opens properly is taken while they wait.
    #[test]
    fn a_proper_opening_is_taken_while_silent_connections_wait() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let silent: Vec<TcpStream> = (0..MAX_HANDSHAKES_PER_SOURCE - 2)
            .map(|_| TcpStream::connect(addr).unwrap())
            .collect();
        let mut dribbler = TcpStream::connect(addr).unwrap();
        dribbler
            .write_all(&frame_of(&Message::HeartbeatOpen { session: 9 })[..5])
            .unwrap();
        let opener = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            opening(addr, 3)
        });
        let session = first_session(&listener, Duration::from_secs(30), &|m| match m {
            Message::HeartbeatOpen { session: 3 } => Ok(()),
            other => Err(format!("not this one: {}", other.name())),
        });
        assert_eq!(session, 3);
        let _opener = opener.join().unwrap();
        drop((silent, dribbler));
    }

    #[test]
    fn a_silent_connection_is_closed_at_its_deadline() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let silent = TcpStream::connect(addr).unwrap();
        let opener = std::thread::spawn(move || {
            let mut silent = silent;
            let mut byte = [0u8; 1];
            // The receiver closes it: end of file, well before the opener below comes.
            let closed = silent.read(&mut byte).map(|n| n == 0).unwrap_or(true);
            (closed, opening(addr, 4))
        });
        assert_eq!(
            first_session(&listener, Duration::from_millis(200), &|_| Ok(())),
            4
        );
        let (closed, _s) = opener.join().unwrap();
        assert!(closed, "the silent connection was not closed");
    }

    #[test]
    fn connections_over_the_per_source_limit_are_closed_at_once() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let held: Vec<TcpStream> = (0..MAX_HANDSHAKES_PER_SOURCE)
            .map(|_| TcpStream::connect(addr).unwrap())
            .collect();
        let opener = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            // One over the limit from the same address: closed without a word.
            let mut over = TcpStream::connect(addr).unwrap();
            over.set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            let mut byte = [0u8; 1];
            let refused = over.read(&mut byte).map(|n| n == 0).unwrap_or(true);
            drop(held);
            // Their ends seen before the next connection comes.
            std::thread::sleep(Duration::from_millis(300));
            (refused, opening(addr, 5))
        });
        assert_eq!(
            first_session(&listener, Duration::from_secs(30), &|_| Ok(())),
            5
        );
        let (refused, _s) = opener.join().unwrap();
        assert!(refused, "a connection over the per-source limit was kept");
    }
}
