//! The witness: a third party (etcd) that decides which copy of a protected guest may act when the
//! primary and the standby cannot agree by themselves (a hang, a partition, a host that died
//! silently). One key per guest holds a [`Claim`]; every change is a compare-and-swap on the key's
//! revision, so of two copies that race — a standby taking over, a primary going on without it —
//! exactly one wins (docs/wire-protocol.md, rules as built).
//!
//! - The primary creates the claim (`protected`) before it protects; a guest whose key exists is
//!   refused (another copy may be active).
//! - A standby takes over only by swapping the primary's `protected` claim for its own `active` one.
//! - A primary that loses its standby may go on (unprotected) only by swapping its claim for
//!   `unprotected`; if the swap fails the standby took over, and the primary fences itself: it never
//!   releases another frame and exits.

pub mod etcd;

use serde::{Deserialize, Serialize};

use etcd::{Etcd, EtcdError};

/// What the witness says about a guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClaimState {
    /// The primary runs the guest, checkpointed to a standby that may take over.
    Protected,
    /// A standby took over and runs the guest.
    Active,
    /// The primary runs the guest without a standby.
    Unprotected,
}

/// The value of a guest's key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// The holder's session (a random number per process and role).
    pub holder: u64,
    /// Bumped on every change of holder or state.
    pub generation: u64,
    pub state: ClaimState,
}

/// A claim as read or written, with the revision that any change must compare against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldClaim {
    pub claim: Claim,
    pub revision: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum WitnessError {
    #[error("witness: {0}")]
    Etcd(#[from] EtcdError),
    #[error("witness: key {key} holds what is not an ftvmm claim: {reason}")]
    Corrupt { key: String, reason: String },
    #[error(
        "witness: key {key} already holds a claim ({state:?}, generation {generation}): another \
         copy of this guest may be active; remove the key only if you know it is not"
    )]
    Exists {
        key: String,
        state: ClaimState,
        generation: u64,
    },
}

/// One guest's key at one etcd.
pub struct Witness {
    etcd: Etcd,
    key: String,
    url: String,
}

impl std::fmt::Debug for Witness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Witness({} {})", self.url, self.key)
    }
}

impl Witness {
    /// The witness at `url` (`http://HOST:PORT`, an etcd), for the guest named `name`.
    pub fn new(url: &str, name: &str) -> Result<Self, WitnessError> {
        Ok(Self {
            etcd: Etcd::new(url)?,
            key: format!("/ftvmm/guests/{name}/claim"),
            url: url.to_string(),
        })
    }

    /// The key this witness keeps.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The current claim, if any.
    pub fn read(&self) -> Result<Option<HeldClaim>, WitnessError> {
        let Some((value, revision)) = self.etcd.get(&self.key)? else {
            return Ok(None);
        };
        let claim = serde_json::from_slice(&value).map_err(|e| WitnessError::Corrupt {
            key: self.key.clone(),
            reason: e.to_string(),
        })?;
        Ok(Some(HeldClaim { claim, revision }))
    }

    /// Creates the first claim for `holder` in `state`; fails naming the claim that exists.
    pub fn create(&self, holder: u64, state: ClaimState) -> Result<HeldClaim, WitnessError> {
        let claim = Claim {
            holder,
            generation: 1,
            state,
        };
        match self.etcd.create(&self.key, &encode(&claim))? {
            Some(revision) => Ok(HeldClaim { claim, revision }),
            None => {
                let existing = self.read()?;
                let (state, generation) = existing
                    .map(|h| (h.claim.state, h.claim.generation))
                    .unwrap_or((ClaimState::Unprotected, 0));
                Err(WitnessError::Exists {
                    key: self.key.clone(),
                    state,
                    generation,
                })
            }
        }
    }

    /// Replaces `held` with a claim for `holder` in `state` (next generation) if nobody changed it
    /// since; `None` if somebody did.
    pub fn swap(
        &self,
        held: &HeldClaim,
        holder: u64,
        state: ClaimState,
    ) -> Result<Option<HeldClaim>, WitnessError> {
        let claim = Claim {
            holder,
            generation: held.claim.generation + 1,
            state,
        };
        Ok(self
            .etcd
            .replace(&self.key, held.revision, &encode(&claim))?
            .map(|revision| HeldClaim { claim, revision }))
    }

    /// Removes `held` (the guest ended) if nobody changed it since.
    pub fn remove(&self, held: &HeldClaim) -> Result<bool, WitnessError> {
        Ok(self.etcd.delete(&self.key, held.revision)?)
    }
}

fn encode(claim: &Claim) -> Vec<u8> {
    serde_json::to_vec(claim).expect("a claim always encodes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_round_trip_as_json() {
        let claim = Claim {
            holder: 7,
            generation: 3,
            state: ClaimState::Active,
        };
        let text = String::from_utf8(encode(&claim)).unwrap();
        assert_eq!(text, r#"{"holder":7,"generation":3,"state":"active"}"#);
        assert_eq!(serde_json::from_str::<Claim>(&text).unwrap(), claim);
    }

    #[test]
    fn only_http_urls_are_taken() {
        assert!(Witness::new("https://etcd:2379", "g").is_err());
        assert!(Witness::new("etcd:2379", "g").is_err());
        let w = Witness::new("http://127.0.0.1:2379/", "g1").unwrap();
        assert_eq!(w.key(), "/ftvmm/guests/g1/claim");
    }
}
