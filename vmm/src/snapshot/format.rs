//! The on-disk and on-wire framing of a state blob: magic, format version, payload length, CRC32C of
//! the payload, then the payload (postcard-encoded serde data). A reader checks all four before
//! decoding, so a truncated or corrupted blob is refused with a clear error, never half-applied.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Identifies an ftvmm state blob.
pub const MAGIC: [u8; 8] = *b"FTVMSTAT";
/// Bumped whenever the encoded types change incompatibly.
pub const FORMAT_VERSION: u32 = 4;
const HEADER_LEN: usize = 8 + 4 + 8 + 4;
/// Largest payload accepted (guards allocations on corrupt input).
pub const MAX_PAYLOAD: u64 = 256 << 20;

/// Errors framing or unframing state.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("not an ftvmm state blob (bad magic)")]
    Magic,
    #[error(
        "state format version {found} is not supported (this ftvmm reads version {FORMAT_VERSION})"
    )]
    Version { found: u32 },
    #[error("state blob truncated: {have} bytes, expected {want}")]
    Truncated { have: usize, want: usize },
    #[error("state blob payload of {0} bytes is larger than the {MAX_PAYLOAD}-byte limit")]
    TooLarge(u64),
    #[error("state blob checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): corrupted")]
    Checksum { stored: u32, computed: u32 },
    #[error("cannot encode state: {0}")]
    Encode(String),
    #[error("cannot decode state: {0}")]
    Decode(String),
}

/// Encodes `value` into a framed blob.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, FormatError> {
    let payload = postcard::to_stdvec(value).map_err(|e| FormatError::Encode(e.to_string()))?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Checks and decodes a framed blob.
pub fn decode<T: DeserializeOwned>(blob: &[u8]) -> Result<T, FormatError> {
    if blob.len() < HEADER_LEN {
        return Err(FormatError::Truncated {
            have: blob.len(),
            want: HEADER_LEN,
        });
    }
    if blob[..8] != MAGIC {
        return Err(FormatError::Magic);
    }
    let version = u32::from_le_bytes(blob[8..12].try_into().expect("4 bytes"));
    if version != FORMAT_VERSION {
        return Err(FormatError::Version { found: version });
    }
    let len = u64::from_le_bytes(blob[12..20].try_into().expect("8 bytes"));
    if len > MAX_PAYLOAD {
        return Err(FormatError::TooLarge(len));
    }
    let want = HEADER_LEN + len as usize;
    if blob.len() < want {
        return Err(FormatError::Truncated {
            have: blob.len(),
            want,
        });
    }
    let stored = u32::from_le_bytes(blob[20..24].try_into().expect("4 bytes"));
    let payload = &blob[HEADER_LEN..want];
    let computed = crc32c::crc32c(payload);
    if stored != computed {
        return Err(FormatError::Checksum { stored, computed });
    }
    postcard::from_bytes(payload).map_err(|e| FormatError::Decode(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Sample {
        a: u64,
        b: Vec<u8>,
        c: String,
    }

    fn sample() -> Sample {
        Sample {
            a: 42,
            b: vec![1, 2, 3],
            c: "x".into(),
        }
    }

    #[test]
    fn round_trips() {
        let blob = encode(&sample()).unwrap();
        assert_eq!(decode::<Sample>(&blob).unwrap(), sample());
    }

    #[test]
    fn every_corruption_is_caught() {
        let blob = encode(&sample()).unwrap();
        assert_eq!(
            decode::<Sample>(&blob[..10]),
            Err(FormatError::Truncated {
                have: 10,
                want: HEADER_LEN
            })
        );
        assert!(matches!(
            decode::<Sample>(&blob[..blob.len() - 1]),
            Err(FormatError::Truncated { .. })
        ));
        let mut bad = blob.clone();
        bad[0] ^= 1;
        assert_eq!(decode::<Sample>(&bad), Err(FormatError::Magic));
        let mut bad = blob.clone();
        bad[8] = 9;
        assert_eq!(
            decode::<Sample>(&bad),
            Err(FormatError::Version { found: 9 })
        );
        let mut bad = blob.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0x40;
        assert!(matches!(
            decode::<Sample>(&bad),
            Err(FormatError::Checksum { .. })
        ));
        let mut bad = blob;
        bad[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(decode::<Sample>(&bad), Err(FormatError::TooLarge(u64::MAX)));
    }
}
