//! Guest memory to and from files. Pages that are entirely zero are left as holes, so a snapshot of
//! a mostly idle guest is small on disk.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::dirty::DirtySet;

use crate::memory::{GuestMemory, PAGE_SIZE};

/// Bytes copied per read from guest memory.
const CHUNK: usize = 1 << 20;

/// Total bytes of guest RAM.
pub fn total_size(mem: &GuestMemory) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}

/// Writes all of guest RAM (regions back to back) to `path`. Returns the bytes of non-zero pages
/// written.
pub fn save_memory(mem: &GuestMemory, path: &Path) -> io::Result<u64> {
    let file = super::create_private(path)?;
    file.set_len(total_size(mem))?;
    let mut buf = vec![0u8; CHUNK];
    let mut file_offset = 0u64;
    let mut written = 0u64;
    for region in mem.iter() {
        let mut done = 0u64;
        while done < region.len() {
            let n = CHUNK.min((region.len() - done) as usize);
            mem.read_slice(&mut buf[..n], region.start_addr().unchecked_add_raw(done))
                .map_err(|e| io::Error::other(format!("reading guest memory: {e}")))?;
            written += write_nonzero_runs(&file, &buf[..n], file_offset + done)?;
            done += n as u64;
        }
        file_offset += region.len();
    }
    file.sync_all()?;
    Ok(written)
}

/// Writes the runs of non-zero pages of `data` at `offset`; returns bytes written.
fn write_nonzero_runs(file: &File, data: &[u8], offset: u64) -> io::Result<u64> {
    let mut written = 0;
    let mut run_start: Option<usize> = None;
    for (i, page) in data.chunks(PAGE_SIZE).enumerate() {
        let zero = page.iter().all(|b| *b == 0);
        match (zero, run_start) {
            (false, None) => run_start = Some(i * PAGE_SIZE),
            (true, Some(start)) => {
                file.write_all_at(&data[start..i * PAGE_SIZE], offset + start as u64)?;
                written += (i * PAGE_SIZE - start) as u64;
                run_start = None;
            }
            _ => {}
        }
    }
    if let Some(start) = run_start {
        file.write_all_at(&data[start..], offset + start as u64)?;
        written += (data.len() - start) as u64;
    }
    Ok(written)
}

/// Fills guest RAM from a file written by [`save_memory`]; its size must match.
pub fn load_memory(mem: &GuestMemory, path: &Path) -> io::Result<()> {
    let mut file = File::open(path)?;
    let size = file.metadata()?.len();
    let want = total_size(mem);
    if size != want {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "memory file {} is {size} bytes, the guest has {want}",
                path.display()
            ),
        ));
    }
    for region in mem.iter() {
        mem.read_exact_volatile_from(region.start_addr(), &mut file, region.len() as usize)
            .map_err(|e| io::Error::other(format!("loading guest memory: {e}")))?;
    }
    Ok(())
}

/// Where guest address `gpa` lives in a memory file (regions back to back).
fn file_offset(mem: &GuestMemory, gpa: u64) -> Option<u64> {
    let mut offset = 0;
    for region in mem.iter() {
        let start = region.start_addr().0;
        if gpa >= start && gpa < start + region.len() {
            return Some(offset + gpa - start);
        }
        offset += region.len();
    }
    None
}

/// Writes only the pages of `set` into a memory file laid out like [`save_memory`]'s (other pages
/// are holes). Returns the bytes written.
pub fn save_pages(mem: &GuestMemory, set: &DirtySet, path: &Path) -> io::Result<u64> {
    let file = super::create_private(path)?;
    file.set_len(total_size(mem))?;
    let mut buf = vec![0u8; CHUNK];
    let mut written = 0;
    for (addr, len) in set.runs() {
        let mut done = 0u64;
        while done < len {
            let n = CHUNK.min((len - done) as usize);
            let gpa = addr.0 + done;
            mem.read_slice(&mut buf[..n], GuestAddress(gpa))
                .map_err(|e| io::Error::other(format!("reading guest memory at {gpa:#x}: {e}")))?;
            let at = file_offset(mem, gpa)
                .ok_or_else(|| io::Error::other(format!("{gpa:#x} is not guest RAM")))?;
            file.write_all_at(&buf[..n], at)?;
            written += n as u64;
            done += n as u64;
        }
    }
    file.sync_all()?;
    Ok(written)
}

/// Copies the pages of `set` from a file written by [`save_pages`] into guest memory.
pub fn load_pages(mem: &GuestMemory, set: &DirtySet, path: &Path) -> io::Result<()> {
    let file = File::open(path)?;
    let size = file.metadata()?.len();
    if size != total_size(mem) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "memory file {} is {size} bytes, the guest has {}",
                path.display(),
                total_size(mem)
            ),
        ));
    }
    let mut buf = vec![0u8; CHUNK];
    for (addr, len) in set.runs() {
        let mut done = 0u64;
        while done < len {
            let n = CHUNK.min((len - done) as usize);
            let gpa = addr.0 + done;
            let at = file_offset(mem, gpa).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("page {gpa:#x} is not guest RAM"),
                )
            })?;
            file.read_exact_at(&mut buf[..n], at)?;
            mem.write_slice(&buf[..n], GuestAddress(gpa))
                .map_err(|e| io::Error::other(format!("writing guest memory at {gpa:#x}: {e}")))?;
            done += n as u64;
        }
    }
    Ok(())
}

trait AddRaw {
    fn unchecked_add_raw(self, n: u64) -> Self;
}

impl AddRaw for vm_memory::GuestAddress {
    fn unchecked_add_raw(self, n: u64) -> Self {
        vm_memory::GuestAddress(self.0 + n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_leaves_zero_pages_as_holes() {
        let mem = crate::memory::create_guest_memory(16).unwrap();
        mem.write_slice(b"hello", GuestAddress(0x5000)).unwrap();
        mem.write_slice(&[0xee; PAGE_SIZE * 3], GuestAddress(0x10_0000))
            .unwrap();
        let dir = std::env::temp_dir().join(format!("ftvmm-mem-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("memory");
        let written = save_memory(&mem, &path).unwrap();
        assert_eq!(written, 4 * PAGE_SIZE as u64);
        let copy = crate::memory::create_guest_memory(16).unwrap();
        load_memory(&copy, &path).unwrap();
        let mut b = [0u8; 5];
        copy.read_slice(&mut b, GuestAddress(0x5000)).unwrap();
        assert_eq!(&b, b"hello");
        assert_eq!(copy.read_obj::<u8>(GuestAddress(0x10_2fff)).unwrap(), 0xee);
        let small = crate::memory::create_guest_memory(32).unwrap();
        assert!(load_memory(&small, &path).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn page_files_carry_only_the_set() {
        let mem = crate::memory::create_guest_memory(16).unwrap();
        mem.write_slice(&[1u8; PAGE_SIZE], GuestAddress(0x20_0000))
            .unwrap();
        mem.write_slice(&[2u8; PAGE_SIZE], GuestAddress(0x30_0000))
            .unwrap();
        let mut set = DirtySet::all(&mem);
        for r in &mut set.regions {
            r.bitmap.iter_mut().for_each(|w| *w = 0);
            let page = 0x20_0000 / PAGE_SIZE;
            r.bitmap[page / 64] |= 1 << (page % 64);
        }
        let dir = std::env::temp_dir().join(format!("ftvmm-pages-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("memory.diff");
        assert_eq!(save_pages(&mem, &set, &path).unwrap(), PAGE_SIZE as u64);
        let copy = crate::memory::create_guest_memory(16).unwrap();
        load_pages(&copy, &set, &path).unwrap();
        assert_eq!(copy.read_obj::<u8>(GuestAddress(0x20_0000)).unwrap(), 1);
        assert_eq!(copy.read_obj::<u8>(GuestAddress(0x30_0000)).unwrap(), 0);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
