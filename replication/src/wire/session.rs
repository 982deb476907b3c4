//! Opening a session to a peer ftvmm (a migration destination or a standby): resolve, connect, send
//! the VM's description and wait until the peer has built the same hardware.

use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use vmm::machine::MachineDescription;

use super::{read_frame, write_frame, FrameError, Message};

/// Errors opening a session.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("cannot resolve {0}")]
    Resolve(String),
    #[error("cannot connect to {to}: {source}")]
    Connect { to: String, source: std::io::Error },
    #[error(transparent)]
    Wire(#[from] FrameError),
    #[error("the peer refused: {0}")]
    Refused(String),
    #[error("unexpected message from the peer: {0}")]
    Protocol(String),
}

/// Connects to `to`, announces `description` and returns the stream once the peer is `Ready`.
pub fn open(
    to: &str,
    description: &MachineDescription,
    connect_timeout: Duration,
    io_timeout: Duration,
) -> Result<TcpStream, SessionError> {
    let addr = to
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| SessionError::Resolve(to.to_string()))?;
    let mut stream = TcpStream::connect_timeout(&addr, connect_timeout).map_err(|source| {
        SessionError::Connect {
            to: to.to_string(),
            source,
        }
    })?;
    let _ = stream.set_nodelay(true);
    stream
        .set_read_timeout(Some(io_timeout))
        .map_err(FrameError::from)?;
    stream
        .set_write_timeout(Some(io_timeout))
        .map_err(FrameError::from)?;
    write_frame(
        &mut stream,
        &Message::Hello {
            description: description.clone(),
        },
    )?;
    match read_frame::<_, Message>(&mut stream)? {
        Message::Ready => Ok(stream),
        Message::Error { message } => Err(SessionError::Refused(message)),
        other => Err(SessionError::Protocol(format!(
            "expected Ready, got {other:?}"
        ))),
    }
}
