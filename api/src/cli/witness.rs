//! Options naming the witness (an etcd) that decides which copy of a protected guest may act
//! (`replication/src/witness`). Both the primary (`run --standby`) and its standby take the same
//! two options.

use std::sync::Arc;

use clap::Args;
use replication::witness::{Witness, WitnessError};

/// The witness of a protected guest.
#[derive(Args, Debug, Default)]
pub struct WitnessArgs {
    /// The witness: an etcd cluster's client URLs, http://HOST:PORT, several separated by commas
    /// (a member that cannot be reached is skipped for the next). With it, a standby takes over a primary
    /// that fell silent (hung, cut off, or its host died) once the witness agrees, and a primary
    /// that lost its standby goes on only with the witness's agreement (else it fences itself:
    /// exit 5). Without it, only a primary's certain death is taken over.
    #[arg(long, value_name = "URL", requires = "guest_name")]
    witness: Option<String>,

    /// The guest's name at the witness (the key /ftvmm/guests/NAME/claim): the same on the primary
    /// and the standby, unique per protected guest.
    #[arg(long, value_name = "NAME", requires = "witness", value_parser = guest_name)]
    guest_name: Option<String>,
}

fn guest_name(name: &str) -> Result<String, String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(name.to_string())
    } else {
        Err(format!(
            "{name:?}: a guest name is 1 to 64 letters, digits, '-', '_' or '.'"
        ))
    }
}

impl WitnessArgs {
    /// The witness, if one was given.
    pub fn witness(&self) -> Result<Option<Arc<Witness>>, WitnessError> {
        match (&self.witness, &self.guest_name) {
            (Some(url), Some(name)) => Ok(Some(Arc::new(Witness::new(url, name)?))),
            _ => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_names_are_plain_words() {
        assert!(guest_name("web-1.prod_a").is_ok());
        for bad in ["", "a/b", "../x", "a b", &"x".repeat(65)] {
            assert!(guest_name(bad).is_err(), "{bad:?}");
        }
    }
}
