//! Abusive clients for tests of listeners that anyone can reach.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Connections to `addr` that start a TLS handshake and never finish it: `per_source` from each of
/// `sources` loopback addresses (127.0.1.1 on), each sending one more byte of a record that never
/// completes every half second, so that no read on them ever times out. Counts those the other end
/// closed (or that could not connect).
pub struct Dribblers {
    stop: Arc<AtomicBool>,
    closed: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Dribblers {
    /// Connections as above, each left closed once the other end closes it.
    pub fn start(addr: &str, sources: u8, per_source: usize) -> Self {
        Self::spawn(addr, sources, per_source, false)
    }

    /// Connections as above, each replaced by a new one from its address as soon as the other end
    /// closes it (or as soon as one can connect): a flood that holds whatever the listener lets it.
    pub fn replacing(addr: &str, sources: u8, per_source: usize) -> Self {
        Self::spawn(addr, sources, per_source, true)
    }

    fn spawn(addr: &str, sources: u8, per_source: usize, replace: bool) -> Self {
        let to: SocketAddr = addr.parse().unwrap();
        // A receiver that does not accept fills its backlog: the rest do not connect (in time).
        let connect_timeout = Duration::from_millis(if replace { 100 } else { 2000 });
        let mut slots = Vec::new();
        let mut unconnected = 0;
        for source in 0..sources {
            let from: SocketAddr = format!("127.0.1.{}:0", source + 1).parse().unwrap();
            for _ in 0..per_source {
                let s = open(from, to, connect_timeout);
                unconnected += usize::from(s.is_none());
                slots.push((from, s));
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let closed = Arc::new(AtomicUsize::new(unconnected));
        let thread = {
            let (stop, closed) = (stop.clone(), closed.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    for (from, slot) in slots.iter_mut() {
                        if let Some(s) = slot {
                            if s.write_all(&[0]).is_err() {
                                *slot = None;
                                closed.fetch_add(1, Ordering::SeqCst);
                            }
                        } else if replace && !stop.load(Ordering::SeqCst) {
                            *slot = open(*from, to, connect_timeout);
                        }
                    }
                    std::thread::sleep(Duration::from_millis(if replace { 50 } else { 500 }));
                }
            })
        };
        Self {
            stop,
            closed,
            thread: Some(thread),
        }
    }

    /// Connections the other end closed, and attempts that could not connect.
    pub fn closed(&self) -> usize {
        self.closed.load(Ordering::SeqCst)
    }
}

/// A connection from `from` to `to` that has sent a TLS handshake record's header announcing 512
/// bytes of body, or `None` if it could not connect within `timeout`.
fn open(from: SocketAddr, to: SocketAddr, timeout: Duration) -> Option<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.bind(&from.into()).unwrap();
    s.connect_timeout(&to.into(), timeout).ok()?;
    let mut s = TcpStream::from(s);
    s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00]).ok()?;
    Some(s)
}

impl Drop for Dribblers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
