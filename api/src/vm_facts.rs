//! What a VM process tells the daemon that started it, as a typed file (`--facts-file`) instead of
//! lines in its log: where a standby or a migration's destination listens, and that it runs the
//! guest now (a standby that took over, a migration received). A log holds text a peer or a guest
//! can have put there; this file holds only what the process itself wrote, as [`VmFacts`].
//!
//! The process opens the file once, before it is sandboxed, and rewrites it through that
//! descriptor (`pwrite`, then `ftruncate`): a reader may catch it half-written, sees JSON that does
//! not parse, and reads again.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The stage a hosted copy's process is at.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "stage", rename_all = "snake_case", deny_unknown_fields)]
pub enum VmFacts {
    /// `ftvmm standby`, waiting for and following its primary on `listening` (HOST:PORT).
    StandingBy { listening: String },
    /// `ftvmm receive`, waiting for a migration on `listening` (HOST:PORT).
    Receiving { listening: String },
    /// Running the guest: the standby took over, or the migration arrived.
    Running,
}

impl VmFacts {
    /// Where the process listens, before it runs the guest.
    pub fn listening(&self) -> Option<&str> {
        match self {
            Self::StandingBy { listening } | Self::Receiving { listening } => Some(listening),
            Self::Running => None,
        }
    }
}

/// Errors opening the facts file.
#[derive(Debug, thiserror::Error)]
#[error("cannot open the facts file {path}: {source}")]
pub struct FactsFileError {
    path: PathBuf,
    source: io::Error,
}

/// The process's side: the file, open for rewriting.
#[derive(Debug)]
pub struct FactsFile {
    path: PathBuf,
    file: File,
}

impl FactsFile {
    /// Creates (or empties) `path`, mode 0640, refusing a symbolic link there.
    pub fn create(path: &Path) -> Result<Self, FactsFileError> {
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o640)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| FactsFileError {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Replaces what the file says with `facts`. A failure is logged: the daemon then learns the
    /// stage from the process's API, or from its end.
    pub fn publish(&self, facts: &VmFacts) {
        let json = serde_json::to_vec(facts).expect("facts serialize");
        let written = self
            .file
            .write_all_at(&json, 0)
            .and_then(|()| self.file.set_len(json.len() as u64));
        if let Err(e) = written {
            tracing::error!("cannot write the facts file {}: {e}", self.path.display());
        }
    }
}

/// The daemon's side: what the file at `path` says, if it exists and is whole.
pub fn read(path: &Path) -> Option<VmFacts> {
    let bytes = std::fs::read(path).ok()?;
    serde_json::from_slice(&bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facts_round_trip_and_a_shorter_rewrite_leaves_no_tail() {
        let dir = std::env::temp_dir().join(format!("ftvmm-facts-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("facts.json");
        assert_eq!(read(&path), None);
        let file = FactsFile::create(&path).unwrap();
        assert_eq!(read(&path), None, "an empty file says nothing");
        let standing = VmFacts::StandingBy {
            listening: "10.0.0.2:41234".into(),
        };
        file.publish(&standing);
        assert_eq!(read(&path), Some(standing.clone()));
        assert_eq!(standing.listening(), Some("10.0.0.2:41234"));
        file.publish(&VmFacts::Running);
        assert_eq!(read(&path), Some(VmFacts::Running));
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            r#"{"stage":"running"}"#
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_log_line_or_junk_is_not_a_fact() {
        for text in [
            "ftvmm: primary lost (x); taking over from checkpoint 3",
            // A shorter rewrite caught before its truncation: the new facts and the old tail.
            r#"{"stage":"running"}dby","listening":"10.0.0.2:1"}"#,
            r#"{"stage":"promoted"}"#,
            r#"{"stage":"standing_by"}"#,
        ] {
            assert_eq!(serde_json::from_str::<VmFacts>(text).ok(), None, "{text}");
        }
    }
}
