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
pub const PROTOCOL_VERSION: u16 = 3;
/// Largest payload accepted on the wire.
pub const MAX_FRAME: u32 = 16 << 20;
const HEADER_LEN: usize = 16;
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
    let sent = u32::from_le_bytes(header[12..16].try_into().expect("4 bytes"));
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            FrameError::Closed
        } else {
            FrameError::Io(e)
        }
    })?;
    let received = crc32c::crc32c(&payload);
    if received != sent {
        return Err(FrameError::Checksum { sent, received });
    }
    let raw = if flags & FLAG_LZ4 != 0 {
        // The prepended size is bounded like any frame, so a hostile size cannot blow up memory.
        let claimed = payload
            .get(..4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")));
        match claimed {
            Some(c) if c <= 4 * MAX_FRAME => {}
            _ => return Err(FrameError::Decompress("bad uncompressed size".into())),
        }
        lz4_flex::decompress_size_prepended(&payload)
            .map_err(|e| FrameError::Decompress(e.to_string()))?
    } else {
        payload
    };
    postcard::from_bytes(&raw).map_err(|e| FrameError::Decode(e.to_string()))
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
}
