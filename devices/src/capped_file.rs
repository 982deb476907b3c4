//! Output files a guest can make grow — the serial console, the VMM's log — kept to a cap: once the
//! live file (`PATH`) holds more than `max_bytes`, its content moves to `PATH.1` (replacing what
//! was there) and the live file starts again, at the end of a line, so at most about twice the cap
//! is on disk (three times for output that never ends a line).
//!
//! Both files are opened once, up front (`O_NOFOLLOW`: a symbolic link planted at either path is
//! refused); rotating uses only their descriptors (`copy_file_range`, `ftruncate`), no path, so
//! the threads that write — a vCPU thread for the console, any thread for the log — need no
//! permission to open or rename files. The live file is opened `O_APPEND`, so writes through
//! another descriptor of it (the process's stderr, [`CappedFile::redirect_stderr`]) land at its
//! end too, and its inode never changes.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Why an output file could not be opened or kept.
#[derive(Debug, thiserror::Error)]
pub enum CappedFileError {
    #[error("cannot open {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot point stderr at {path}: {source}")]
    Redirect { path: PathBuf, source: io::Error },
}

/// Whether opening keeps what the files hold or starts them empty.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// Go on after what the live file holds (a log across restarts).
    Append,
    /// Start both files empty (a console per boot).
    Empty,
}

/// A file kept to about `max_bytes`, with the previous `max_bytes` in `PATH.1`.
pub struct CappedFile {
    path: PathBuf,
    live: File,
    previous: File,
    max_bytes: u64,
}

impl CappedFile {
    /// Opens (creating, mode 0640) `path` and `path.1`.
    pub fn open(path: &Path, max_bytes: u64, start: Start) -> Result<Self, CappedFileError> {
        // The live file is read too: its content is copied out when it rotates.
        let live = open_one(path, true, start)?;
        let previous = open_one(&previous_path(path), false, start)?;
        Ok(Self {
            path: path.to_path_buf(),
            live,
            previous,
            max_bytes: max_bytes.max(1),
        })
    }

    /// Points this process's stderr (descriptor 2) at the live file, so that what is printed there
    /// (messages, a panic) is kept with the rest; the cap holds for it too, counted at the next
    /// write through this file.
    pub fn redirect_stderr(&self) -> Result<(), CappedFileError> {
        // SAFETY: dup2 on two descriptors this process holds; descriptor 2 is replaced atomically.
        if unsafe { libc::dup2(self.live.as_raw_fd(), libc::STDERR_FILENO) } < 0 {
            return Err(CappedFileError::Redirect {
                path: self.path.clone(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Moves the live file's content to `PATH.1` and empties it, if it is over the cap and the
    /// last write ended a line (or it is over twice the cap: a guest's console need not end lines).
    fn rotate_if_full(&mut self, ended_line: bool) -> io::Result<()> {
        let len = self.live.metadata()?.len();
        if len <= self.max_bytes || (!ended_line && len <= 2 * self.max_bytes) {
            return Ok(());
        }
        self.previous.set_len(0)?;
        let (mut from, mut to): (libc::loff_t, libc::loff_t) = (0, 0);
        while (from as u64) < len {
            let left = (len - from as u64) as usize;
            // SAFETY: copy_file_range between two open descriptors of this struct, with offsets
            // in local variables it updates; it touches no memory of this process.
            let n = unsafe {
                libc::copy_file_range(
                    self.live.as_raw_fd(),
                    &mut from,
                    self.previous.as_raw_fd(),
                    &mut to,
                    left,
                    0,
                )
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            if n == 0 {
                break;
            }
        }
        self.live.set_len(0)
    }
}

impl Write for CappedFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.live.write(buf)?;
        self.rotate_if_full(buf[..n].ends_with(b"\n"))?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.live.flush()
    }
}

/// Opens `path` for reading and appending (`append`) or writing, refusing a symbolic link, and
/// empties it for [`Start::Empty`].
fn open_one(path: &Path, append: bool, start: Start) -> Result<File, CappedFileError> {
    let failed = |source| CappedFileError::Open {
        path: path.to_path_buf(),
        source,
    };
    let mut options = OpenOptions::new();
    options
        .create(true)
        .read(true)
        .mode(0o640)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC);
    if append {
        options.append(true);
    } else {
        options.write(true);
    }
    let file = options.open(path).map_err(failed)?;
    if start == Start::Empty {
        file.set_len(0).map_err(failed)?;
    }
    Ok(file)
}

/// Where a capped file's previous content goes: `PATH.1`.
pub fn previous_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ftvmm-capped-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_file_past_its_cap_moves_to_dot_one_and_starts_again() {
        let dir = scratch("rotate");
        let path = dir.join("out.log");
        let mut file = CappedFile::open(&path, 100, Start::Empty).unwrap();
        for i in 0..30 {
            writeln!(file, "line {i:03}").unwrap();
        }
        let live = std::fs::read_to_string(&path).unwrap();
        let previous = std::fs::read_to_string(previous_path(&path)).unwrap();
        assert!(
            live.len() <= 100 && previous.len() <= 100 + 9,
            "{live:?} {previous:?}"
        );
        assert!(live.ends_with("line 029\n"), "{live:?}");
        // Nothing between the two is lost: .1 ends where the live file starts.
        let last_previous: u32 = previous.lines().last().unwrap()[5..].parse().unwrap();
        let first_live: u32 = live.lines().next().map_or(30, |l| l[5..].parse().unwrap());
        assert_eq!(first_live, last_previous + 1);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn appending_keeps_what_was_there_and_a_planted_link_is_refused() {
        let dir = scratch("append");
        let path = dir.join("out.log");
        std::fs::write(&path, "before\n").unwrap();
        let mut file = CappedFile::open(&path, 1 << 20, Start::Append).unwrap();
        writeln!(file, "after").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "before\nafter\n");

        let target = dir.join("elsewhere");
        std::fs::write(&target, "keep").unwrap();
        let link = dir.join("linked.log");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let refused = CappedFile::open(&link, 1 << 20, Start::Empty);
        assert!(
            matches!(&refused, Err(CappedFileError::Open { source, .. }) if source.raw_os_error() == Some(libc::ELOOP)),
            "{:?}",
            refused.err()
        );
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
        let _ = std::fs::remove_dir_all(dir);
    }
}
