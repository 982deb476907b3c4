//! The primary's side of the witness (`crate::witness`): the claim a protection holds, and what
//! the primary does with it. It protects under a `protected` claim; when protection ends it gives
//! the claim back (the guest ended) or swaps it for `unprotected` (it goes on without its
//! standby) — and if that swap finds the standby took over, it fences itself: it releases nothing
//! more and exits. After a silence of its own it releases nothing before the witness confirms
//! the claim is still its own. An unreachable witness is retried; output stays held meanwhile.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::epoch_loop::{LoopError, FENCED_EXIT};
use crate::witness::{ClaimState, HeldClaim, Witness, WitnessError};

/// Time between attempts to reach an unreachable witness.
const WITNESS_RETRY: Duration = Duration::from_millis(200);

/// The claim of one protection at the witness.
pub(super) struct PrimaryClaim {
    witness: Arc<Witness>,
    /// This primary's session: its holder id.
    session: u64,
    /// The claim as this primary last wrote it (shared with `ProtectionHandle`, which hands it to
    /// the next protection or gives it back when the VM ends).
    held: Arc<Mutex<Option<HeldClaim>>>,
}

impl PrimaryClaim {
    /// Claims the guest for protection: creates a `protected` claim, or swaps the one this copy
    /// already holds (`before`: it booted with one, went on unprotected, or took over) for one.
    /// Fails if another copy holds the guest.
    pub(super) fn protect(
        witness: Arc<Witness>,
        before: Option<HeldClaim>,
        session: u64,
        held: Arc<Mutex<Option<HeldClaim>>>,
    ) -> Result<Self, String> {
        let claim = match &before {
            None => witness
                .create(session, ClaimState::Protected)
                .map_err(|e| e.to_string())?,
            Some(before) => witness
                .swap(before, session, ClaimState::Protected)
                .map_err(|e| e.to_string())?
                .ok_or_else(|| {
                    format!(
                        "the witness's key {} changed since this copy's claim (generation {}): \
                         another copy may be active",
                        witness.key(),
                        before.claim.generation
                    )
                })?,
        };
        *held.lock().unwrap_or_else(|e| e.into_inner()) = Some(claim);
        Ok(Self {
            witness,
            session,
            held,
        })
    }

    /// The claim as this primary last wrote it.
    pub(super) fn current(&self) -> Option<HeldClaim> {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Protection ended. The guest ended (`guest_ended`) → the claim is removed; if the standby
    /// took over meanwhile the removal fails and the guest lives on there, from its last committed
    /// checkpoint. The guest goes on here → the claim becomes `unprotected`, which succeeds only if
    /// the standby has not taken over; if it has, this copy fences itself (never returns).
    pub(super) fn settle(&self, guest_ended: bool) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let Some(current) = held.clone() else { return };
        if guest_ended {
            match self.witness.remove(&current) {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!("the standby took over before the guest's end was recorded")
                }
                Err(e) => tracing::warn!("could not remove the guest's claim at the witness: {e}"),
            }
            *held = None;
            return;
        }
        let next = retry(|| {
            self.witness
                .swap(&current, self.session, ClaimState::Unprotected)
        });
        match next {
            Some(next) => {
                tracing::info!(
                    generation = next.claim.generation,
                    "the witness says this copy goes on, unprotected"
                );
                *held = Some(next);
            }
            None => fence(&format!(
                "the witness's claim changed under this primary ({}): the standby took over",
                self.describe_now()
            )),
        }
    }

    /// After a possible silence of this primary: returns once the witness shows this copy still
    /// holds its claim; fences this copy if another holds it. While the witness does not answer it
    /// waits, unless `give_up` says the standby is lost (protection then ends, and `settle`
    /// decides).
    pub(super) fn confirm_still_held(&self, give_up: impl Fn() -> bool) -> Result<(), LoopError> {
        let Some(held) = self.current() else {
            return Ok(());
        };
        tracing::info!(
            "the standby may count this primary silent (a stall, a frozen host, a late probe): \
             asking the witness before releasing anything"
        );
        loop {
            match self.witness.read() {
                Ok(Some(now)) if now.claim == held.claim => {
                    tracing::debug!("the witness says this copy still holds the guest");
                    return Ok(());
                }
                Ok(_) => fence(&format!(
                    "after a silence the witness's claim is no longer this primary's ({}): the \
                     standby took over",
                    self.describe_now()
                )),
                Err(e) if give_up() => {
                    return Err(LoopError::Heartbeat(format!(
                        "the standby is lost and the witness does not answer: {e}"
                    )))
                }
                Err(e) => {
                    tracing::warn!("{e}; holding output and retrying");
                    std::thread::sleep(WITNESS_RETRY);
                }
            }
        }
    }

    /// What the witness holds now, in words.
    fn describe_now(&self) -> String {
        self.witness
            .read()
            .ok()
            .flatten()
            .map_or("gone".into(), |h| {
                format!("{:?}, generation {}", h.claim.state, h.claim.generation)
            })
    }
}

/// Runs `attempt` until the witness answers (output stays held meanwhile).
fn retry<T>(attempt: impl Fn() -> Result<T, WitnessError>) -> T {
    loop {
        match attempt() {
            Ok(answer) => return answer,
            Err(e) => {
                tracing::warn!("{e}; holding output and retrying");
                std::thread::sleep(WITNESS_RETRY);
            }
        }
    }
}

/// Stops this copy for good: the witness says another one took over. Nothing held is released.
pub(super) fn fence(reason: &str) -> ! {
    tracing::error!("fenced: {reason}");
    eprintln!("ftvmm: fenced: {reason}; this copy stops for good and releases nothing more");
    std::process::exit(FENCED_EXIT)
}
