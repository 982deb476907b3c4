//! Snapshot building blocks: the framed, checksummed state encoding (`format`) and guest memory
//! files (`memory`). `machine/snapshot.rs` puts them together for a whole VM.

pub mod format;
pub mod memory;

pub use format::{decode, encode, FormatError};

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Snapshot files hold guest RAM and state: only their owner may read them.
pub const FILE_MODE: u32 = 0o600;
/// Snapshot directories this process creates.
pub const DIR_MODE: u32 = 0o700;

/// Creates (or truncates) `path` for writing with mode [`FILE_MODE`], also when it existed with
/// wider permissions; a symbolic link there is refused (`ELOOP`), not followed.
pub fn create_private(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(FILE_MODE))?;
    Ok(file)
}

/// Writes `data` to `path` through [`create_private`].
pub fn write_private(path: &Path, data: &[u8]) -> io::Result<()> {
    io::Write::write_all(&mut create_private(path)?, data)
}

/// Creates `dir` and its missing parents with mode [`DIR_MODE`] (existing ones are left alone).
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_symbolic_link_where_a_snapshot_file_goes_is_refused_not_followed() {
        let dir = std::env::temp_dir().join(format!("ftvmm-private-link-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        create_private_dir(&dir).unwrap();
        let target = dir.join("precious");
        std::fs::write(&target, b"keep").unwrap();
        let link = dir.join("state");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let refused = write_private(&link, b"overwritten");
        assert_eq!(
            refused.map_err(|e| e.raw_os_error()),
            Err(Some(libc::ELOOP))
        );
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn snapshot_files_are_private_even_over_an_existing_file() {
        let dir = std::env::temp_dir().join(format!("ftvmm-private-{}", std::process::id()));
        create_private_dir(&dir.join("a/b")).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.join("a/b")), DIR_MODE);
        let f = dir.join("a/b/state");
        std::fs::write(&f, b"old").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&f, b"new").unwrap();
        assert_eq!(mode(&f), FILE_MODE);
        assert_eq!(std::fs::read(&f).unwrap(), b"new");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
