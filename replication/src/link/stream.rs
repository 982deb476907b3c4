//! [`Link`]: one connection between two ftvmm processes, over TLS or (when asked for) plain TCP.
//! The wire protocol reads and writes it as a byte stream; timeouts are set on the socket beneath.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use rustls::{ClientConnection, ServerConnection, StreamOwned};

enum Transport {
    Plain(TcpStream),
    TlsClient(Box<StreamOwned<ClientConnection, TcpStream>>),
    TlsServer(Box<StreamOwned<ServerConnection, TcpStream>>),
}

/// Shuts a [`Link`] down from another thread.
pub struct LinkShutdown(TcpStream);

impl LinkShutdown {
    pub fn shutdown(&self) {
        let _ = self.0.shutdown(std::net::Shutdown::Both);
    }

    /// A second handle on the same link.
    pub fn try_clone(&self) -> io::Result<Self> {
        self.0.try_clone().map(Self)
    }
}

/// An established, authenticated (unless plain) connection to a peer ftvmm.
pub struct Link {
    transport: Transport,
    peer: SocketAddr,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("peer", &self.peer)
            .field("tls", &self.is_tls())
            .finish()
    }
}

impl Link {
    pub(super) fn plain(socket: TcpStream, peer: SocketAddr) -> Self {
        Self {
            transport: Transport::Plain(socket),
            peer,
        }
    }

    pub(super) fn tls_client(conn: ClientConnection, socket: TcpStream, peer: SocketAddr) -> Self {
        Self {
            transport: Transport::TlsClient(Box::new(StreamOwned::new(conn, socket))),
            peer,
        }
    }

    pub(super) fn tls_server(conn: ServerConnection, socket: TcpStream, peer: SocketAddr) -> Self {
        Self {
            transport: Transport::TlsServer(Box::new(StreamOwned::new(conn, socket))),
            peer,
        }
    }

    fn socket(&self) -> &TcpStream {
        match &self.transport {
            Transport::Plain(s) => s,
            Transport::TlsClient(s) => s.get_ref(),
            Transport::TlsServer(s) => s.get_ref(),
        }
    }

    /// Shuts the connection down both ways from any thread (through a clone of the socket): a read
    /// or write blocked on this link, or a later one, fails at once.
    pub fn shutdown_handle(&self) -> io::Result<LinkShutdown> {
        self.socket().try_clone().map(LinkShutdown)
    }

    /// The peer's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// This end's address (where a side channel to the same peer binds).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket().local_addr()
    }

    /// Whether the link is TLS (authenticated and encrypted).
    pub fn is_tls(&self) -> bool {
        !matches!(self.transport, Transport::Plain(_))
    }

    /// How long a read may wait for the peer (`None`: forever). A read that times out fails with
    /// `WouldBlock` or `TimedOut`; the link stays usable.
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.socket().set_read_timeout(timeout)
    }

    /// How long a write may wait for the peer (`None`: forever).
    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.socket().set_write_timeout(timeout)
    }

    /// Tells the peer this side is done (TLS close_notify, then a TCP shutdown), best effort.
    pub fn close(mut self) {
        match &mut self.transport {
            Transport::Plain(_) => {}
            Transport::TlsClient(s) => {
                s.conn.send_close_notify();
                let _ = s.flush();
            }
            Transport::TlsServer(s) => {
                s.conn.send_close_notify();
                let _ = s.flush();
            }
        }
        let _ = self.socket().shutdown(std::net::Shutdown::Both);
    }
}

impl Read for Link {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.transport {
            Transport::Plain(s) => s.read(buf),
            Transport::TlsClient(s) => s.read(buf),
            Transport::TlsServer(s) => s.read(buf),
        }
    }
}

impl Write for Link {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.transport {
            Transport::Plain(s) => s.write(buf),
            Transport::TlsClient(s) => s.write(buf),
            Transport::TlsServer(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.transport {
            Transport::Plain(s) => s.flush(),
            Transport::TlsClient(s) => s.flush(),
            Transport::TlsServer(s) => s.flush(),
        }
    }
}
