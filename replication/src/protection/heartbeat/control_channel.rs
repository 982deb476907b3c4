//! The control channel: a second authenticated connection from the primary to the standby's
//! address, opened with `HeartbeatOpen { session }`, on which the primary says nothing more until
//! it ends protection while alive (`Goodbye`). It carries a few hundred bytes in its whole life, so
//! its send buffer never fills: a goodbye written before the primary closes it is always read
//! before the close, however long the standby's host was frozen or the network cut. Its closing
//! without a goodbye is therefore what the primary's death looks like — and the only end a standby
//! without a witness takes over on.

use std::io::Read;

use crate::wire::{Ending, FrameError, FrameReader, Message};

/// What the standby knows of the primary's end from the control channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ControlVerdict {
    /// The primary has not opened the channel (yet).
    NotOpened,
    /// Open; the primary has said nothing.
    Open,
    /// The primary ended protection while alive: the guest must not be resumed here.
    Goodbye(Ending),
    /// The channel closed or reset without a goodbye: the primary's process (or host) ended.
    /// `while_alive`: the primary was answering probes when it did.
    Closed { while_alive: bool, reason: String },
    /// Something a dying primary does not cause (a corrupt frame, a message out of protocol).
    Broken(String),
}

impl ControlVerdict {
    /// Whether the channel has said how the primary ended.
    pub fn is_final(&self) -> bool {
        !matches!(self, ControlVerdict::NotOpened | ControlVerdict::Open)
    }
}

/// What one read of the channel gave.
#[derive(Debug, PartialEq, Eq)]
pub enum ControlRead {
    /// Nothing whole yet (the read timed out; any part of a frame is kept).
    Nothing,
    Goodbye(Ending),
    /// Closed or reset, with why.
    Closed(String),
    Broken(String),
}

/// Reads the channel once (up to its socket's read timeout). A frame that arrives in pieces — its
/// header now, its payload after a lost segment is sent again — is kept whole across timeouts by
/// `reader`.
pub fn read_control<R: Read>(reader: &mut FrameReader, channel: &mut R) -> ControlRead {
    match reader.poll::<_, Message>(channel) {
        Ok(None) => ControlRead::Nothing,
        Ok(Some(Message::Goodbye { ending })) => ControlRead::Goodbye(ending),
        Ok(Some(other)) => ControlRead::Broken(format!(
            "unexpected {} on the control channel",
            other.name()
        )),
        Err(FrameError::Closed) => {
            ControlRead::Closed("the primary closed its control channel".into())
        }
        Err(FrameError::Io(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::UnexpectedEof
            ) =>
        {
            ControlRead::Closed(format!("the primary's control channel ended: {e}"))
        }
        Err(e) => ControlRead::Broken(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::write_frame;
    use std::io::{self, Write};
    use std::time::Duration;

    /// The primary writes a goodbye's header, then — after the standby's read timed out — its
    /// payload: the goodbye is read whole, not taken for a corrupt stream.
    #[test]
    fn a_goodbye_split_across_read_timeouts_is_read_whole() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut frame = Vec::new();
        write_frame(
            &mut frame,
            &Message::Goodbye {
                ending: Ending::Unprotected {
                    reason: "the standby was lost".into(),
                },
            },
        )
        .unwrap();
        let writer = std::thread::spawn(move || {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.write_all(&frame[..16]).unwrap();
            std::thread::sleep(Duration::from_millis(120));
            s.write_all(&frame[16..]).unwrap();
            std::thread::sleep(Duration::from_millis(50));
        });
        let (mut channel, _) = listener.accept().unwrap();
        channel
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let mut reader = FrameReader::new();
        let mut timeouts = 0;
        let read = loop {
            match read_control(&mut reader, &mut channel) {
                ControlRead::Nothing => timeouts += 1,
                other => break other,
            }
        };
        writer.join().unwrap();
        assert!(timeouts >= 2, "the payload came after some timeouts");
        assert_eq!(
            read,
            ControlRead::Goodbye(Ending::Unprotected {
                reason: "the standby was lost".into()
            })
        );
        let after = loop {
            match read_control(&mut reader, &mut channel) {
                ControlRead::Nothing => {}
                other => break other,
            }
        };
        assert!(matches!(after, ControlRead::Closed(_)), "{after:?}");
    }

    /// A reader that fails as a reset connection does.
    struct Reset;
    impl Read for Reset {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Err(io::ErrorKind::ConnectionReset.into())
        }
    }

    #[test]
    fn a_reset_is_a_close_and_garbage_is_broken() {
        let mut reader = FrameReader::new();
        assert!(matches!(
            read_control(&mut reader, &mut Reset),
            ControlRead::Closed(_)
        ));
        let mut reader = FrameReader::new();
        let mut garbage: &[u8] = b"GET / HTTP/1.1\r\n\r\n";
        assert!(matches!(
            read_control(&mut reader, &mut garbage),
            ControlRead::Broken(_)
        ));
    }
}
