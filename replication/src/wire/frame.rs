//! Framing: every message travels as
//!
//! ```text
//! magic "FTVM" | version u16 | flags u16 | length u32 | crc32c u32 | payload (length bytes)
//! ```
//!
//! (little endian). `flags` bit 0 says the payload is LZ4-compressed. The CRC covers the payload as
//! sent. A reader refuses a bad magic, an unknown version, an oversized length or a checksum
//! mismatch before decoding anything, so a corrupt or truncated stream is rejected with a clear error.

use std::io::{self, Read, Write};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Identifies ftvmm's protocol.
pub const MAGIC: [u8; 4] = *b"FTVM";
/// Bumped on any incompatible change to framing or messages.
pub const PROTOCOL_VERSION: u16 = 7;
/// Largest payload accepted on the wire.
pub const MAX_FRAME: u32 = 16 << 20;
pub const HEADER_LEN: usize = 16;
const FLAG_LZ4: u16 = 1;
/// Payloads smaller than this are not worth compressing.
const COMPRESS_MIN: usize = 4096;

/// Errors reading or writing frames.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("peer closed the connection")]
    Closed,
    #[error("connection error: {0}")]
    Io(#[from] io::Error),
    #[error("not an ftvmm stream (bad magic {0:02x?})")]
    Magic([u8; 4]),
    #[error("peer speaks protocol version {0}, this ftvmm speaks {PROTOCOL_VERSION}")]
    Version(u16),
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(u32),
    #[error(
        "frame checksum mismatch (sent {sent:#010x}, received {received:#010x}): corrupted stream"
    )]
    Checksum { sent: u32, received: u32 },
    #[error("cannot decompress a frame: {0}")]
    Decompress(String),
    #[error("cannot decode a message: {0}")]
    Decode(String),
    #[error("cannot encode a message: {0}")]
    Encode(String),
}

/// Encodes and writes one message.
pub fn write_frame<W: Write, T: Serialize>(w: &mut W, message: &T) -> Result<(), FrameError> {
    let raw = postcard::to_stdvec(message).map_err(|e| FrameError::Encode(e.to_string()))?;
    write_payload(w, &raw)
}

/// Writes one frame around an already encoded message (compressed when that pays). Public for the
/// fuzz targets, which send payloads of their own making in well-formed frames.
pub fn write_payload<W: Write>(w: &mut W, raw: &[u8]) -> Result<(), FrameError> {
    let (flags, payload) = if raw.len() >= COMPRESS_MIN {
        let packed = lz4_flex::compress_prepend_size(raw);
        if packed.len() < raw.len() {
            (FLAG_LZ4, std::borrow::Cow::Owned(packed))
        } else {
            (0, std::borrow::Cow::Borrowed(raw))
        }
    } else {
        (0, std::borrow::Cow::Borrowed(raw))
    };
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|l| *l <= MAX_FRAME);
    let len = len.ok_or(FrameError::TooLarge(u32::MAX))?;
    let mut header = [0u8; HEADER_LEN];
    header[..4].copy_from_slice(&MAGIC);
    header[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    header[6..8].copy_from_slice(&flags.to_le_bytes());
    header[8..12].copy_from_slice(&len.to_le_bytes());
    header[12..16].copy_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
    w.write_all(&header)?;
    w.write_all(&payload)?;
    // A TLS link may hold the last record until flushed.
    w.flush()?;
    Ok(())
}

/// The whole length (header and payload) of the frame whose header is `header`, once the header
/// is checked (magic, version, a payload within [`MAX_FRAME`]): for a reader that gathers a frame
/// before decoding it.
pub fn frame_len(header: &[u8; HEADER_LEN]) -> Result<usize, FrameError> {
    Ok(HEADER_LEN + FrameHeader::parse(header)?.len as usize)
}

/// Reads and decodes one message.
pub fn read_frame<R: Read, T: DeserializeOwned>(r: &mut R) -> Result<T, FrameError> {
    let mut header = [0u8; HEADER_LEN];
    if let Err(e) = r.read_exact(&mut header) {
        return Err(if e.kind() == io::ErrorKind::UnexpectedEof {
            FrameError::Closed
        } else {
            FrameError::Io(e)
        });
    }
    let header = FrameHeader::parse(&header)?;
    let mut payload = vec![0u8; header.len as usize];
    r.read_exact(&mut payload).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            FrameError::Closed
        } else {
            FrameError::Io(e)
        }
    })?;
    header.decode(&payload)
}

/// A frame's header, checked: known magic and version, a length within bounds.
struct FrameHeader {
    flags: u16,
    len: u32,
    crc: u32,
}

impl FrameHeader {
    fn parse(header: &[u8; HEADER_LEN]) -> Result<Self, FrameError> {
        let magic: [u8; 4] = header[..4].try_into().expect("4 bytes");
        if magic != MAGIC {
            return Err(FrameError::Magic(magic));
        }
        let version = u16::from_le_bytes([header[4], header[5]]);
        if version != PROTOCOL_VERSION {
            return Err(FrameError::Version(version));
        }
        let flags = u16::from_le_bytes([header[6], header[7]]);
        let len = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
        if len > MAX_FRAME {
            return Err(FrameError::TooLarge(len));
        }
        let crc = u32::from_le_bytes(header[12..16].try_into().expect("4 bytes"));
        Ok(Self { flags, len, crc })
    }

    /// Checks the payload against the header's checksum, decompresses it if need be, and decodes.
    fn decode<T: DeserializeOwned>(&self, payload: &[u8]) -> Result<T, FrameError> {
        let received = crc32c::crc32c(payload);
        if received != self.crc {
            return Err(FrameError::Checksum {
                sent: self.crc,
                received,
            });
        }
        if self.flags & FLAG_LZ4 == 0 {
            return postcard::from_bytes(payload).map_err(|e| FrameError::Decode(e.to_string()));
        }
        // The prepended size is bounded like any frame, so a hostile size cannot blow up memory.
        let claimed = payload
            .get(..4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")));
        match claimed {
            Some(c) if c <= 4 * MAX_FRAME => {}
            _ => return Err(FrameError::Decompress("bad uncompressed size".into())),
        }
        let raw = lz4_flex::decompress_size_prepended(payload)
            .map_err(|e| FrameError::Decompress(e.to_string()))?;
        postcard::from_bytes(&raw).map_err(|e| FrameError::Decode(e.to_string()))
    }
}

/// Reads frames from a stream whose reads time out (a read timeout set on its socket): the bytes
/// of a frame that has only partly arrived are kept until the rest comes, so a timeout never loses
/// the stream's place. The epoch loop waits for acknowledgements this way between checkpoints.
#[derive(Default)]
pub struct FrameReader {
    buffered: Vec<u8>,
}

impl FrameReader {
    pub fn new() -> Self {
        Self::default()
    }

    /// The next whole message, or `None` if none was complete when a read timed out.
    pub fn poll<R: Read, T: DeserializeOwned>(
        &mut self,
        r: &mut R,
    ) -> Result<Option<T>, FrameError> {
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(message) = self.take_buffered()? {
                return Ok(Some(message));
            }
            match r.read(&mut chunk) {
                Ok(0) => return Err(FrameError::Closed),
                Ok(n) => self.buffered.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None)
                }
                Err(e) => return Err(FrameError::Io(e)),
            }
        }
    }

    /// A message from the bytes already read, if a whole frame is there.
    fn take_buffered<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        let Some(header) = self.buffered.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let header = FrameHeader::parse(header.try_into().expect("HEADER_LEN bytes"))?;
        let end = HEADER_LEN + header.len as usize;
        let Some(payload) = self.buffered.get(HEADER_LEN..end) else {
            return Ok(None);
        };
        let message = header.decode(payload)?;
        self.buffered.drain(..end);
        Ok(Some(message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::message::{Message, PageRun};

    fn pages() -> Message {
        Message::Pages {
            round: 3,
            runs: vec![PageRun {
                gpa: 0x1000,
                data: vec![7u8; 8192],
            }],
        }
    }

    #[test]
    fn round_trips_plain_and_compressed() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &Message::Go).unwrap();
        write_frame(&mut buf, &pages()).unwrap();
        assert!(buf.len() < 8192, "page data should have been compressed");
        let mut r = &buf[..];
        assert_eq!(read_frame::<_, Message>(&mut r).unwrap(), Message::Go);
        assert_eq!(read_frame::<_, Message>(&mut r).unwrap(), pages());
        assert!(matches!(
            read_frame::<_, Message>(&mut r),
            Err(FrameError::Closed)
        ));
    }

    #[test]
    fn corrupt_and_truncated_streams_are_refused() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &pages()).unwrap();
        let mut bad = buf.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(matches!(
            read_frame::<_, Message>(&mut &bad[..]),
            Err(FrameError::Checksum { .. })
        ));
        assert!(matches!(
            read_frame::<_, Message>(&mut &buf[..buf.len() - 3]),
            Err(FrameError::Closed)
        ));
        let mut bad = buf.clone();
        bad[0] = b'X';
        assert!(matches!(
            read_frame::<_, Message>(&mut &bad[..]),
            Err(FrameError::Magic(_))
        ));
        let mut bad = buf.clone();
        bad[4] = 9;
        assert!(matches!(
            read_frame::<_, Message>(&mut &bad[..]),
            Err(FrameError::Version(9))
        ));
        let mut bad = buf;
        bad[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            read_frame::<_, Message>(&mut &bad[..]),
            Err(FrameError::TooLarge(_))
        ));
    }

    #[test]
    fn garbage_never_panics() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for len in 0..300 {
            let mut data = Vec::with_capacity(len);
            for _ in 0..len {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                data.push(seed as u8);
            }
            if len >= 4 {
                data[..4].copy_from_slice(&MAGIC);
            }
            let _ = read_frame::<_, Message>(&mut &data[..]);
        }
    }

    /// A reader that hands out at most `step` bytes per read and times out every other read.
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
        calls: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.calls += 1;
            if self.calls.is_multiple_of(2) {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = self.step.min(buf.len()).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    #[test]
    fn a_frame_reader_keeps_its_place_across_timeouts() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &Message::Committed { epoch: 1 }).unwrap();
        write_frame(&mut buf, &pages()).unwrap();
        write_frame(&mut buf, &Message::Committed { epoch: 2 }).unwrap();
        let mut r = Trickle {
            data: &buf,
            step: 5,
            calls: 0,
        };
        let mut reader = FrameReader::new();
        let mut got = Vec::new();
        let mut timeouts = 0;
        while got.len() < 3 {
            match reader.poll::<_, Message>(&mut r).unwrap() {
                Some(m) => got.push(m),
                None => timeouts += 1,
            }
        }
        assert!(
            timeouts > 3,
            "the trickle timed out in the middle of frames"
        );
        assert_eq!(
            got,
            vec![
                Message::Committed { epoch: 1 },
                pages(),
                Message::Committed { epoch: 2 }
            ]
        );
        // The end of the stream (past a last timeout) is the peer closing it.
        let end = loop {
            match reader.poll::<_, Message>(&mut r) {
                Ok(None) => continue,
                other => break other,
            }
        };
        assert!(matches!(end, Err(FrameError::Closed)), "{end:?}");
        // A corrupt frame is refused, not waited for.
        let mut bad = Vec::new();
        write_frame(&mut bad, &Message::Go).unwrap();
        bad[0] = b'X';
        assert!(matches!(
            FrameReader::new().poll::<_, Message>(&mut &bad[..]),
            Err(FrameError::Magic(_))
        ));
    }
}
