//! The witness: a third party (etcd) that decides which copy of a protected guest may act when the
//! primary and the standby cannot agree by themselves (a hang, a partition, a host that died
//! silently). One key per guest holds a [`Claim`]; every change is a compare-and-swap on the key's
//! revision, so of two copies that race — a standby taking over, a primary going on without it —
//! exactly one wins (docs/wire-protocol.md, rules as built).
//!
//! - Every change compares the key's *value* (holder, generation, state) with the claim the copy
//!   holds, never etcd's revision alone (revisions start again in an etcd restored from a backup);
//!   an answer that may or may not have taken effect is resolved by reading the claim back
//!   ([`Witness::swap`]).
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
        let created = match self.etcd.create(&self.key, &encode(&claim)) {
            Ok(Some(revision)) => return Ok(HeldClaim { claim, revision }),
            Ok(None) => None,
            // The answer was lost: the key may hold our claim already.
            Err(e) => Some(e),
        };
        match (self.read(), created) {
            (Ok(Some(now)), _) if now.claim == claim => Ok(now),
            (Ok(None), Some(e)) | (Err(_), Some(e)) => Err(e.into()),
            (Ok(now), _) => {
                let (state, generation) = now
                    .map(|h| (h.claim.state, h.claim.generation))
                    .unwrap_or((ClaimState::Unprotected, 0));
                Err(WitnessError::Exists {
                    key: self.key.clone(),
                    state,
                    generation,
                })
            }
            (Err(e), None) => Err(e),
        }
    }

    /// Replaces `held` with a claim for `holder` in `state` (next generation) if nobody changed it
    /// since; `None` if somebody did.
    ///
    /// Decided by the claim's value, not by etcd's revision, and robust to the witness's
    /// troubles: an answer lost to a timeout, a leader change or a restart is resolved by reading
    /// the key back — holding our new claim, the swap took effect (a winner must never think it
    /// lost); an error is returned only when the read cannot tell, and the caller's retry is then
    /// resolved the same way. A witness that lost its history — the key gone (its data wiped), or
    /// an older generation than `held` (restored from a backup) — is given the new claim afresh,
    /// still by a compare-and-swap on what it holds, so that of two copies racing exactly one wins.
    pub fn swap(
        &self,
        held: &HeldClaim,
        holder: u64,
        state: ClaimState,
    ) -> Result<Option<HeldClaim>, WitnessError> {
        let next = Claim {
            holder,
            generation: held.claim.generation + 1,
            state,
        };
        match self
            .etcd
            .replace_value(&self.key, &encode(&held.claim), &encode(&next))
        {
            Ok(Some(revision)) => {
                return Ok(Some(HeldClaim {
                    claim: next,
                    revision,
                }))
            }
            Ok(None) => {}
            Err(e) => match self.read() {
                Ok(Some(now)) if now.claim == next => return Ok(Some(now)),
                // Not applied (yet): the caller tries again.
                Ok(Some(now)) if now.claim == held.claim => return Err(e.into()),
                Ok(_) => {}
                Err(_) => return Err(e.into()),
            },
        }
        self.resolve_changed(&held.claim, &next)
    }

    /// The key no longer holds `held`: our own earlier attempt at `next` took effect, the witness
    /// lost its history, or another copy changed it (then `None`).
    fn resolve_changed(
        &self,
        held: &Claim,
        next: &Claim,
    ) -> Result<Option<HeldClaim>, WitnessError> {
        let written = match self.read()? {
            Some(now) if now.claim == *next => return Ok(Some(now)),
            Some(now) if now.claim.generation < held.generation => {
                tracing::warn!(
                    key = %self.key,
                    found = now.claim.generation,
                    held = held.generation,
                    "the witness holds an older claim than this copy's: it was restored from a \
                     backup; replacing it"
                );
                self.etcd
                    .replace_value(&self.key, &encode(&now.claim), &encode(next))?
            }
            None => {
                tracing::warn!(
                    key = %self.key,
                    "the witness holds no claim for this guest (its data was wiped?): writing \
                     this copy's afresh"
                );
                self.etcd.create(&self.key, &encode(next))?
            }
            Some(_) => return Ok(None),
        };
        match written {
            Some(revision) => Ok(Some(HeldClaim {
                claim: next.clone(),
                revision,
            })),
            // Another copy got there first — unless it was our own lost attempt.
            None => Ok(self.read()?.filter(|now| now.claim == *next)),
        }
    }

    /// Removes `held` (the guest ended) if nobody changed it since; `false` if somebody did. A key
    /// already gone counts as removed (an earlier attempt whose answer was lost, or a witness that
    /// lost its data: either way nobody claims the guest).
    pub fn remove(&self, held: &HeldClaim) -> Result<bool, WitnessError> {
        let failed = match self.etcd.delete_value(&self.key, &encode(&held.claim)) {
            Ok(true) => return Ok(true),
            Ok(false) => None,
            Err(e) => Some(e),
        };
        match (self.read(), failed) {
            (Ok(None), _) => Ok(true),
            (Ok(Some(now)), Some(e)) if now.claim == held.claim => Err(e.into()),
            (Ok(Some(now)), _) if now.claim.generation < held.claim.generation => {
                Ok(self.etcd.delete_value(&self.key, &encode(&now.claim))?)
            }
            (Ok(Some(_)), _) => Ok(false),
            (Err(e), _) => Err(e),
        }
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
