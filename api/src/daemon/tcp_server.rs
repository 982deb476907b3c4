//! The daemon's TCP listener, which anyone who reaches the port can talk to before a certificate or
//! token is checked: every connection takes a slot (at most [`Limits::connections`] in all and
//! [`Limits::per_source`] from one address; over either it is closed at once), has
//! [`Limits::handshake`] to finish TLS and [`Limits::header`] to send each request's head (the
//! same bound holds a kept-alive connection that sends nothing), and [`Limits::body`] to send a
//! body of at most [`Limits::body_bytes`]. A connection serves one request at a time, so requests
//! in flight are bounded by the connections. Refusals go to a
//! [`RefusalLog`] (a few a minute are logged, the rest counted).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use replication::link::RefusalLog;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::server::routes::error;

/// What the listener allows a connection.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections at once, handshaking or served.
    pub connections: usize,
    /// Connections at once from one address.
    pub per_source: usize,
    /// From accept to the end of the TLS handshake.
    pub handshake: Duration,
    /// For each request's head, and for the next one on a kept-alive connection.
    pub header: Duration,
    /// For a request's whole body.
    pub body: Duration,
    /// Largest request body.
    pub body_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            connections: 512,
            per_source: 16,
            handshake: Duration::from_secs(10),
            header: Duration::from_secs(10),
            body: Duration::from_secs(10),
            body_bytes: 1 << 20,
        }
    }
}

/// Serves `router` on `listener` behind TLS (`tls`) within `limits`; runs until the runtime ends.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: axum::Router,
    limits: Limits,
) -> io::Result<()> {
    let acceptor = TlsAcceptor::from(tls);
    let slots = Slots::new(limits);
    let refusals = Arc::new(Mutex::new(RefusalLog::new("daemon API: ")));
    let router = router.layer(axum::middleware::from_fn_with_state(limits, bounded_body));
    loop {
        let (socket, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors, most likely: wait for connections to end.
                refused(&refusals, None, &format!("accept failed: {e}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let slot = match slots.take(peer.ip()) {
            Ok(slot) => slot,
            Err(full) => {
                refused(&refusals, Some(peer), full);
                continue;
            }
        };
        let (acceptor, router, refusals) = (acceptor.clone(), router.clone(), refusals.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let stream = match tokio::time::timeout(limits.handshake, acceptor.accept(socket)).await
            {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    refused(&refusals, Some(peer), &format!("TLS handshake: {e}"));
                    return;
                }
                Err(_) => {
                    refused(&refusals, Some(peer), "TLS handshake timed out");
                    return;
                }
            };
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header)
                .serve_connection(TokioIo::new(stream), TowerToHyperService::new(router))
                .await;
            if let Err(e) = served {
                tracing::debug!(%peer, "daemon API: connection ended: {e}");
            }
        });
    }
}

/// Middleware: the request's body, read whole within [`Limits::body`] and [`Limits::body_bytes`]
/// before any handler runs (413 or 408 otherwise). The API's bodies are small JSON documents.
async fn bounded_body(
    axum::extract::State(limits): axum::extract::State<Limits>,
    request: Request,
    next: Next,
) -> Response {
    let (parts, body) = request.into_parts();
    let read = axum::body::to_bytes(body, limits.body_bytes);
    let bytes = match tokio::time::timeout(limits.body, read).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(_)) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the request body is over {} bytes, or broken",
                    limits.body_bytes
                ),
            )
        }
        Err(_) => {
            return error(
                StatusCode::REQUEST_TIMEOUT,
                format!("the request body took over {:?}", limits.body),
            )
        }
    };
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

fn refused(log: &Mutex<RefusalLog>, peer: Option<SocketAddr>, reason: &str) {
    log.lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .refused(peer, reason);
}

/// The connections held, in all and per source address.
struct Slots {
    limits: Limits,
    held: Mutex<SlotCounts>,
}

#[derive(Default)]
struct SlotCounts {
    total: usize,
    per_source: HashMap<IpAddr, usize>,
}

/// One connection's place; given back when dropped.
struct Slot {
    slots: Arc<Slots>,
    source: IpAddr,
}

impl Slots {
    fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            held: Mutex::new(SlotCounts::default()),
        })
    }

    fn take(self: &Arc<Self>, source: IpAddr) -> Result<Slot, &'static str> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if held.total >= self.limits.connections {
            return Err("the daemon holds as many connections as it allows");
        }
        let from_source = held.per_source.entry(source).or_default();
        if *from_source >= self.limits.per_source {
            return Err("this address holds as many connections as one address may");
        }
        *from_source += 1;
        held.total += 1;
        Ok(Slot {
            slots: self.clone(),
            source,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self.slots.held.lock().unwrap_or_else(|p| p.into_inner());
        held.total -= 1;
        if let Some(n) = held.per_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                held.per_source.remove(&self.source);
            }
        }
    }
}

/// Serves `router` as [`serve`] does on a loopback port of its own, on a thread of its own; its
/// address. For tests.
#[cfg(test)]
pub(crate) fn serve_on_loopback(
    tls: Arc<rustls::ServerConfig>,
    router: axum::Router,
    limits: Limits,
) -> SocketAddr {
    let (send, addr) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
            send.send(tcp.local_addr().unwrap()).unwrap();
            let _ = serve(tcp, tls, router, limits).await;
        });
    });
    addr.recv().unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::path::Path;

    use replication::link::TlsIdentity;

    /// A server and a client identity of one CA, in `dir`.
    fn identities(dir: &Path) -> (TlsIdentity, TlsIdentity) {
        let _ = std::fs::remove_dir_all(dir);
        let nodes = [
            ("server".to_string(), vec!["127.0.0.1".to_string()]),
            ("client".to_string(), vec!["127.0.0.1".to_string()]),
        ];
        replication::link::certs::generate(dir, &nodes).unwrap();
        let load = |name: &str| TlsIdentity::load(&dir.join(name)).unwrap();
        (load("server"), load("client"))
    }

    /// Serves `POST /echo` (the body back) within `limits` on loopback; its address.
    fn serve_echo(server: &TlsIdentity, limits: Limits) -> SocketAddr {
        let router = axum::Router::new().route(
            "/echo",
            axum::routing::post(|body: axum::body::Bytes| async move { body }),
        );
        serve_on_loopback(server.server_config(), router, limits)
    }

    /// A TLS connection to `addr` as `client`, its handshake done.
    fn connect(
        addr: SocketAddr,
        client: &TlsIdentity,
    ) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let conn = rustls::ClientConnection::new(client.client_config(), name).unwrap();
        let socket = std::net::TcpStream::connect(addr).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut stream = rustls::StreamOwned::new(conn, socket);
        while stream.conn.is_handshaking() {
            stream.conn.complete_io(&mut stream.sock).unwrap();
        }
        stream
    }

    /// Everything the server sends until it closes; an error if it does not close within the
    /// socket's read timeout (10 s).
    fn read_all(stream: &mut impl Read) -> Result<String, std::io::Error> {
        let mut raw = Vec::new();
        match stream.read_to_end(&mut raw) {
            Ok(_) => {}
            // The server may close without close_notify.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
            Err(e) => return Err(e),
        }
        Ok(String::from_utf8_lossy(&raw).into_owned())
    }

    #[test]
    fn a_client_that_sends_no_request_or_no_whole_body_is_cut_off() {
        let dir = std::env::temp_dir().join(format!("ftvmm-tcp-server-{}", std::process::id()));
        let (server, client) = identities(&dir);
        let limits = Limits {
            header: Duration::from_millis(300),
            body: Duration::from_millis(300),
            ..Limits::default()
        };
        let addr = serve_echo(&server, limits);

        // A request is answered, and the kept-alive connection is closed once idle.
        let mut stream = connect(addr, &client);
        write!(
            stream,
            "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
        )
        .unwrap();
        stream.flush().unwrap();
        let answer = read_all(&mut stream).expect("an idle kept-alive connection is closed");
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("hello"),
            "{answer}"
        );

        // Nothing sent after the handshake: closed without an answer.
        let mut silent = connect(addr, &client);
        let answer = read_all(&mut silent).expect("a silent connection is closed");
        assert_eq!(answer, "");

        // Half a body: 408.
        let mut slow = connect(addr, &client);
        write!(
            slow,
            "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nhalf"
        )
        .unwrap();
        slow.flush().unwrap();
        let answer = read_all(&mut slow).unwrap();
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");

        // A body over the limit: 413.
        let mut big = connect(addr, &client);
        let body = vec![b'x'; limits.body_bytes + 1];
        write!(
            big,
            "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .unwrap();
        let _ = big.write_all(&body);
        let _ = big.flush();
        let answer = read_all(&mut big).unwrap();
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn limits(connections: usize, per_source: usize) -> Limits {
        Limits {
            connections,
            per_source,
            ..Limits::default()
        }
    }

    #[test]
    fn slots_are_bounded_in_all_and_per_source_and_given_back() {
        let slots = Slots::new(limits(3, 2));
        let (a, b, c): (IpAddr, IpAddr, IpAddr) = (
            "10.0.0.1".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
            "10.0.0.3".parse().unwrap(),
        );
        let a1 = slots.take(a).unwrap();
        let _a2 = slots.take(a).unwrap();
        assert!(slots.take(a).is_err(), "a third from one source");
        let _b1 = slots.take(b).unwrap();
        assert!(slots.take(c).is_err(), "a fourth in all");
        drop(a1);
        let _c1 = slots.take(c).unwrap();
        assert!(slots.take(a).is_err(), "the total is full again");
        let held = slots.held.lock().unwrap();
        assert_eq!(held.total, 3);
        assert_eq!(held.per_source[&a], 1);
    }

    #[test]
    fn a_source_with_no_connection_left_is_forgotten() {
        let slots = Slots::new(limits(8, 8));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        drop(slots.take(a).unwrap());
        let held = slots.held.lock().unwrap();
        assert_eq!(held.total, 0);
        assert!(held.per_source.is_empty());
    }
}
