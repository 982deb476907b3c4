//! Heartbeat probes: the small UDP datagrams that primary and standby send each other several
//! times per failure timeout (`crate::protection::heartbeat`). A probe is self-contained: losing
//! one loses nothing but itself, so ordinary packet loss or a stalled TCP stream never silences the
//! heartbeat, unlike a ping/echo riding one TCP connection (a single lost segment stalls that for
//! at least the 200 ms minimum retransmission timeout).
//!
//! ```text
//! magic "FTHB" | version u16 | kind u8 | sender u8 | session u64 | stamp u64 | echoed u64 | mac [16]
//! ```
//!
//! (little endian, 48 bytes). `kind` is 1 for a ping, 2 for an echo; `sender` 0 for the primary, 1
//! for the standby. A ping's `stamp` is the sender's own clock in microseconds; an echo carries the
//! stamp of the ping it answers. A ping's `echoed` is the stamp of the newest of the sender's own
//! pings whose echo it has taken (0: none): the other end learns from it until when the sender
//! counts it alive (`crate::protection::heartbeat`). `mac` is HMAC-SHA256 over the first 32 bytes with the session's
//! probe key, truncated to 16 bytes. The key is random per protection session and travels inside
//! the authenticated link (`Message::Standing`), so only the two ends of that link can make a probe
//! that verifies; a replayed one carries an old stamp and proves nothing new.

use ring::hmac;

/// Identifies a heartbeat probe.
pub const PROBE_MAGIC: [u8; 4] = *b"FTHB";
/// Bumped on any change of the probe's layout.
pub const PROBE_VERSION: u16 = 1;
/// Size of every probe on the wire.
pub const PROBE_LEN: usize = 48;
/// Bytes of the probe the MAC covers.
const SIGNED_LEN: usize = 32;
/// Bytes of HMAC-SHA256 kept.
const MAC_LEN: usize = PROBE_LEN - SIGNED_LEN;

/// What a probe is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeKind {
    /// "Are you there?", stamped with the sender's clock.
    Ping,
    /// The answer to a ping, carrying that ping's stamp back.
    Echo,
}

/// Which end sent a probe: a probe is only taken from the other end (so that a ping reflected back
/// to its sender is never taken for the peer's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeSender {
    Primary,
    Standby,
}

/// One probe, decoded and verified.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe {
    pub kind: ProbeKind,
    pub sender: ProbeSender,
    pub session: u64,
    /// A ping: the sender's clock (µs). An echo: the stamp of the ping it answers.
    pub stamp_us: u64,
    /// A ping: the stamp of the sender's newest ping whose echo it took (0: none). An echo: 0.
    pub echoed_us: u64,
}

/// Why a datagram is not a probe of this session.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    #[error("a datagram of {0} bytes is not a heartbeat probe ({PROBE_LEN} bytes)")]
    Length(usize),
    #[error("not a heartbeat probe (bad magic {0:02x?})")]
    Magic([u8; 4]),
    #[error("heartbeat probe version {0}, this ftvmm speaks {PROBE_VERSION}")]
    Version(u16),
    #[error("heartbeat probe of unknown kind {kind} or sender {sender}")]
    Kind { kind: u8, sender: u8 },
    #[error("heartbeat probe that does not verify with this session's key")]
    Mac,
}

/// The secret of one protection session's probes.
#[derive(Clone)]
pub struct ProbeKey(hmac::Key);

impl std::fmt::Debug for ProbeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProbeKey(..)")
    }
}

impl ProbeKey {
    /// The key made of `secret` (the 32 bytes `Message::Standing` carries).
    pub fn new(secret: &[u8; 32]) -> Self {
        Self(hmac::Key::new(hmac::HMAC_SHA256, secret))
    }

    /// A fresh random secret, from the OS's randomness.
    pub fn random_secret() -> std::io::Result<[u8; 32]> {
        let mut secret = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
            .map_err(|_| std::io::Error::other("no randomness for the heartbeat key"))?;
        Ok(secret)
    }

    fn mac(&self, signed: &[u8]) -> [u8; MAC_LEN] {
        let tag = hmac::sign(&self.0, signed);
        let mut mac = [0u8; MAC_LEN];
        mac.copy_from_slice(&tag.as_ref()[..MAC_LEN]);
        mac
    }
}

impl Probe {
    /// The probe as sent, signed with `key`.
    pub fn encode(&self, key: &ProbeKey) -> [u8; PROBE_LEN] {
        let mut out = [0u8; PROBE_LEN];
        out[..4].copy_from_slice(&PROBE_MAGIC);
        out[4..6].copy_from_slice(&PROBE_VERSION.to_le_bytes());
        out[6] = match self.kind {
            ProbeKind::Ping => 1,
            ProbeKind::Echo => 2,
        };
        out[7] = match self.sender {
            ProbeSender::Primary => 0,
            ProbeSender::Standby => 1,
        };
        out[8..16].copy_from_slice(&self.session.to_le_bytes());
        out[16..24].copy_from_slice(&self.stamp_us.to_le_bytes());
        out[24..32].copy_from_slice(&self.echoed_us.to_le_bytes());
        let mac = key.mac(&out[..SIGNED_LEN]);
        out[SIGNED_LEN..].copy_from_slice(&mac);
        out
    }

    /// Decodes and verifies a received datagram. The caller checks the session and sender.
    pub fn decode(datagram: &[u8], key: &ProbeKey) -> Result<Self, ProbeError> {
        let bytes: &[u8; PROBE_LEN] = datagram
            .try_into()
            .map_err(|_| ProbeError::Length(datagram.len()))?;
        let magic: [u8; 4] = bytes[..4].try_into().expect("4 bytes");
        if magic != PROBE_MAGIC {
            return Err(ProbeError::Magic(magic));
        }
        let version = u16::from_le_bytes([bytes[4], bytes[5]]);
        if version != PROBE_VERSION {
            return Err(ProbeError::Version(version));
        }
        // The tag is compared in constant time.
        let expected = key.mac(&bytes[..SIGNED_LEN]);
        if !constant_time_eq(&expected, &bytes[SIGNED_LEN..]) {
            return Err(ProbeError::Mac);
        }
        let kind = match bytes[6] {
            1 => Some(ProbeKind::Ping),
            2 => Some(ProbeKind::Echo),
            _ => None,
        };
        let sender = match bytes[7] {
            0 => Some(ProbeSender::Primary),
            1 => Some(ProbeSender::Standby),
            _ => None,
        };
        let (Some(kind), Some(sender)) = (kind, sender) else {
            return Err(ProbeError::Kind {
                kind: bytes[6],
                sender: bytes[7],
            });
        };
        Ok(Self {
            kind,
            sender,
            session: u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes")),
            stamp_us: u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes")),
            echoed_us: u64::from_le_bytes(bytes[24..32].try_into().expect("8 bytes")),
        })
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> ProbeKey {
        ProbeKey::new(&[byte; 32])
    }

    fn ping() -> Probe {
        Probe {
            kind: ProbeKind::Ping,
            sender: ProbeSender::Standby,
            session: 0x1234_5678_9abc_def0,
            stamp_us: 987_654_321,
            echoed_us: 987_000_000,
        }
    }

    #[test]
    fn probes_round_trip() {
        for probe in [
            ping(),
            Probe {
                kind: ProbeKind::Echo,
                sender: ProbeSender::Primary,
                ..ping()
            },
        ] {
            let bytes = probe.encode(&key(1));
            assert_eq!(Probe::decode(&bytes, &key(1)), Ok(probe));
        }
    }

    #[test]
    fn tampered_or_foreign_probes_are_refused() {
        let bytes = ping().encode(&key(1));
        assert_eq!(Probe::decode(&bytes, &key(2)), Err(ProbeError::Mac));
        for at in [6, 7, 8, 16, 20, 24, 31, 40] {
            let mut bad = bytes;
            bad[at] ^= 1;
            assert_eq!(
                Probe::decode(&bad, &key(1)),
                Err(ProbeError::Mac),
                "byte {at}"
            );
        }
        let mut bad = bytes;
        bad[0] = b'X';
        assert!(matches!(
            Probe::decode(&bad, &key(1)),
            Err(ProbeError::Magic(_))
        ));
        assert_eq!(
            Probe::decode(&bytes[..47], &key(1)),
            Err(ProbeError::Length(47))
        );
    }

    #[test]
    fn random_secrets_differ() {
        assert_ne!(
            ProbeKey::random_secret().unwrap(),
            ProbeKey::random_secret().unwrap()
        );
    }
}
