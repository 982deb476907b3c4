//! Copying a checkpoint's pages after the vCPUs resumed, so that the pause does not grow with the
//! dirty set.
//!
//! While the vCPUs are paused the checkpoint write-protects the chunks of guest memory that hold its
//! dirty pages ([`CopyOnWrite::protect`], userfaultfd: `vmm::userfault`) and captures the state; the
//! guest then runs on while the epoch-loop thread copies the pages ([`ProtectedPages::copy`]). The
//! rule that keeps a checkpoint consistent: *no dirty page is written before its content of the
//! checkpoint was copied*. A write to a protected page — by a vCPU, through KVM's page fault, or by
//! a device model on the event-loop thread — stops the writer and is reported as a fault; the copier
//! serves faults before anything else, copying the faulting page's chunk first and only then
//! unprotecting it, which lets the writer go on. A page written after its copy belongs to the next
//! epoch: the write goes through KVM's dirty log or vm-memory's bitmap as any other.
//!
//! Every fault is answered, whenever it comes: the fault server (a thread of its own, the only
//! reader of the descriptor) hands the copier the faults in chunks still waiting for their copy, and
//! answers any other at once by unprotecting its page, which wakes the writer. Answering only during
//! a copy is not enough: a writer that faulted just before its chunk was unprotected can go to sleep
//! after that unprotection's wake-up (the kernel decides to wait by looking at the page table, which
//! the unprotection leaves read-only), and its fault is then read after the copy ended. Left to the
//! next copy, such a fault stops the event loop until the next checkpoint — which the event loop
//! itself must take: a deadlock, seen once in the nested tier.
//!
//! Protection works on [`CHUNK`]s (2 MiB, a huge page): one ioctl per chunk while paused, whatever
//! the number of dirty pages in it, and huge pages are not split. A write to a page of a protected
//! chunk that is not dirty costs its writer the copy of that chunk's dirty pages, which is also what
//! a fault on a dirty one costs.
//!
//! The copier must never write guest memory itself, nor wait for the event loop while pages are
//! protected: the event loop may be stopped on one of them. Whatever stops the copy (an error, a
//! checkpoint dropped unsent) unprotects the chunks not yet copied.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm::dirty::DirtySet;
use vmm::memory::{GuestMemory, PAGE_SIZE};
use vmm::userfault::{UserfaultError, WriteProtector};

use crate::wire::PageRun;

/// The unit of write protection: one x86 large page. Guest RAM is 2 MiB-aligned both in the guest
/// and in the VMM (`vmm/src/memory.rs`), so a chunk is one huge page of the mapping.
pub(super) const CHUNK: u64 = 2 << 20;

/// Faults read from the descriptor at once.
const FAULT_BATCH: usize = 16;

/// How long the fault server waits for a fault before it looks whether it should stop.
const FAULT_POLL: Duration = Duration::from_millis(20);

/// Write protection of guest memory for checkpoints, and the fault server that answers every write
/// fault. Dropping it stops the server; the protection itself is lifted when the last checkpoint
/// holding it is gone (`WriteProtector`'s drop).
pub(super) struct CopyOnWrite {
    shared: Arc<Shared>,
    server: Option<JoinHandle<()>>,
}

struct Shared {
    protector: WriteProtector,
    protected: Mutex<Protected>,
    stop: AtomicBool,
    /// Faults answered while no copy waited for them.
    faults_between_copies: AtomicU64,
}

/// What the copier and the fault server share.
#[derive(Default)]
struct Protected {
    /// Chunks protected and not yet copied: host address → length.
    uncopied: BTreeMap<u64, u64>,
    /// Faults in those chunks, read by the server, for the copier to serve first.
    faults: Vec<u64>,
}

impl Protected {
    fn is_uncopied(&self, host: u64) -> bool {
        self.uncopied
            .range(..=host)
            .next_back()
            .is_some_and(|(&start, &len)| host < start + len)
    }
}

impl Shared {
    fn protected(&self) -> MutexGuard<'_, Protected> {
        self.protected.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Lets the writer stopped at `host` go on: its page's content was copied, or was never part of
    /// a checkpoint waiting for its copy.
    fn release_page(&self, host: u64) -> Result<(), String> {
        self.protector
            .unprotect(host, PAGE_SIZE as u64)
            .map_err(|e| e.to_string())
    }

    /// The fault server: reads every fault; those in a chunk waiting for its copy go to the copier,
    /// the others are answered here.
    fn serve_faults(&self) {
        let mut faults = Vec::with_capacity(FAULT_BATCH);
        while !self.stop.load(Ordering::SeqCst) {
            faults.clear();
            let read = self
                .protector
                .wait_for_faults(FAULT_POLL)
                .and_then(|_| self.protector.pending_faults(&mut faults));
            if let Err(e) = read {
                tracing::error!("write-fault server: {e}");
                std::thread::sleep(FAULT_POLL);
                continue;
            }
            for &host in &faults {
                self.answer_fault(host, || {});
            }
        }
    }

    /// Hands a fault at `host` to the copier if its chunk waits for a copy, else unprotects its
    /// page at once. Both under the lock that [`CopyOnWrite::protect`] holds while it protects a
    /// checkpoint's chunks: unprotecting after the lock was let go could lift the protection the
    /// next checkpoint has just put on that page, which would then be written before its copy.
    /// (`between` runs between the decision and the release: the tests' seam.)
    fn answer_fault(&self, host: u64, between: impl FnOnce()) {
        let mut protected = self.protected();
        if protected.is_uncopied(host) {
            protected.faults.push(host);
            return;
        }
        between();
        self.faults_between_copies.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(host, "write fault answered between copies");
        if let Err(e) = self.release_page(host) {
            tracing::error!("write-fault server: {e}");
        }
    }
}

impl CopyOnWrite {
    /// Registers all of `mem` for write protection and starts the fault server.
    pub(super) fn new(mem: &GuestMemory) -> Result<Self, UserfaultError> {
        let shared = Arc::new(Shared {
            protector: WriteProtector::new(mem)?,
            protected: Mutex::default(),
            stop: AtomicBool::new(false),
            faults_between_copies: AtomicU64::new(0),
        });
        let server = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("write-faults".into())
                .spawn(move || {
                    vmm::seccomp::apply_or_exit(vmm::seccomp::ThreadKind::Replication);
                    shared.serve_faults()
                })
                .map_err(UserfaultError::Create)?
        };
        Ok(Self {
            shared,
            server: Some(server),
        })
    }

    /// Faults answered while no copy waited for them, since protection began.
    pub(super) fn faults_between_copies(&self) -> u64 {
        self.shared.faults_between_copies.load(Ordering::Relaxed)
    }

    /// With the vCPUs paused: write-protects every chunk holding a page of `set`.
    pub(super) fn protect(
        &self,
        mem: &GuestMemory,
        set: &DirtySet,
    ) -> Result<ProtectedPages, String> {
        let mut chunks: Vec<Chunk> = Vec::new();
        for (addr, len) in set.runs() {
            let (mut gpa, end) = (addr.0, addr.0 + len);
            while gpa < end {
                let chunk_start = gpa & !(CHUNK - 1);
                let piece_end = end.min(chunk_start + CHUNK);
                let run = (gpa, piece_end - gpa);
                match chunks.last_mut() {
                    // Runs come in guest-address order: a chunk's runs are consecutive.
                    Some(last) if last.runs[0].0 & !(CHUNK - 1) == chunk_start => {
                        last.runs.push(run)
                    }
                    _ => chunks.push(chunk_at(mem, chunk_start, gpa, run)?),
                }
                gpa = piece_end;
            }
        }
        chunks.sort_unstable_by_key(|c| c.host);
        // Known as waiting for their copy before they are protected, and protected under the lock
        // the fault server answers under: a fault in them goes to the copier, never to a release.
        let mut protected = self.shared.protected();
        if !protected.uncopied.is_empty() {
            return Err("the previous checkpoint's pages are still protected".into());
        }
        protected
            .uncopied
            .extend(chunks.iter().map(|c| (c.host, c.len)));
        for (i, chunk) in chunks.iter().enumerate() {
            if let Err(e) = self.shared.protector.protect(chunk.host, chunk.len) {
                // Undo what this checkpoint did; no fault can have been handed over for it yet
                // (the server waits for this lock).
                for done in &chunks[..i] {
                    let _ = self.shared.protector.unprotect(done.host, done.len);
                }
                protected.uncopied.clear();
                return Err(e.to_string());
            }
        }
        drop(protected);
        Ok(ProtectedPages {
            shared: self.shared.clone(),
            chunks,
        })
    }
}

impl Drop for CopyOnWrite {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(server) = self.server.take() {
            let _ = server.join();
        }
    }
}

/// A write-protected chunk of guest memory and the dirty runs in it.
struct Chunk {
    /// Host address and length of the protected range (a chunk, cut at the ends of its region).
    host: u64,
    len: u64,
    /// Dirty runs in the chunk: guest address and length.
    runs: Vec<(u64, u64)>,
    copied: bool,
}

/// A checkpoint's dirty pages, write-protected, waiting to be copied. Dropped uncopied, it lifts the
/// protection it holds.
pub(super) struct ProtectedPages {
    shared: Arc<Shared>,
    /// In host-address order (what faults name).
    chunks: Vec<Chunk>,
}

/// Pages copied, as the checkpoint sends them.
pub(super) struct CopiedPages {
    pub(super) runs: Vec<PageRun>,
    /// Writes that had to wait for their chunk's copy.
    pub(super) write_faults: u64,
}

/// The protected range of the chunk at `chunk_start` whose first dirty run is `run` (at `gpa`).
fn chunk_at(
    mem: &GuestMemory,
    chunk_start: u64,
    gpa: u64,
    run: (u64, u64),
) -> Result<Chunk, String> {
    let region = mem
        .find_region(GuestAddress(gpa))
        .ok_or_else(|| format!("dirty page {gpa:#x} is outside guest memory"))?;
    let region_start = region.start_addr().0;
    let start = chunk_start.max(region_start);
    let end = (chunk_start + CHUNK).min(region_start + region.len());
    let host = mem
        .get_host_address(GuestAddress(start))
        .map_err(|e| format!("guest address {start:#x}: {e}"))? as u64;
    Ok(Chunk {
        host,
        len: end - start,
        runs: vec![run],
        copied: false,
    })
}

impl ProtectedPages {
    /// After the vCPUs resumed: copies every dirty page, serving the writers stopped on a protected
    /// chunk first, and unprotects each chunk right after its copy.
    pub(super) fn copy(mut self, mem: &GuestMemory) -> Result<CopiedPages, String> {
        let mut copied = CopiedPages {
            runs: Vec::new(),
            write_faults: 0,
        };
        let mut next = 0;
        loop {
            let faults = std::mem::take(&mut self.shared.protected().faults);
            for host in faults {
                copied.write_faults += 1;
                match self.chunk_holding(host) {
                    Some(i) if !self.chunks[i].copied => {
                        self.copy_chunk(i, mem, &mut copied.runs)?
                    }
                    // Copied since the server read the fault: the writer may have gone to sleep
                    // after the chunk's wake-up.
                    _ => self.shared.release_page(host)?,
                }
            }
            while next < self.chunks.len() && self.chunks[next].copied {
                next += 1;
            }
            if next == self.chunks.len() {
                break;
            }
            self.copy_chunk(next, mem, &mut copied.runs)?;
        }
        // Nothing waits for a copy any more: faults the server handed over meanwhile are answered
        // here, later ones by the server.
        let faults = std::mem::take(&mut self.shared.protected().faults);
        for host in faults {
            copied.write_faults += 1;
            self.shared.release_page(host)?;
        }
        Ok(copied)
    }

    fn chunk_holding(&self, host: u64) -> Option<usize> {
        let i = self.chunks.partition_point(|c| c.host + c.len <= host);
        (i < self.chunks.len() && self.chunks[i].host <= host).then_some(i)
    }

    fn copy_chunk(
        &mut self,
        i: usize,
        mem: &GuestMemory,
        runs: &mut Vec<PageRun>,
    ) -> Result<(), String> {
        let chunk = &mut self.chunks[i];
        for &(gpa, len) in &chunk.runs {
            runs.push(read_run(mem, gpa, len as usize)?);
        }
        chunk.copied = true;
        self.shared
            .protector
            .unprotect(chunk.host, chunk.len)
            .map_err(|e| e.to_string())?;
        self.shared.protected().uncopied.remove(&chunk.host);
        Ok(())
    }
}

impl Drop for ProtectedPages {
    fn drop(&mut self) {
        for chunk in self.chunks.iter().filter(|c| !c.copied) {
            if let Err(e) = self.shared.protector.unprotect(chunk.host, chunk.len) {
                tracing::error!("{e}");
            }
        }
        let faults = {
            let mut protected = self.shared.protected();
            for chunk in &self.chunks {
                protected.uncopied.remove(&chunk.host);
            }
            std::mem::take(&mut protected.faults)
        };
        for host in faults {
            if let Err(e) = self.shared.release_page(host) {
                tracing::error!("{e}");
            }
        }
    }
}

/// `len` bytes of guest memory at `gpa`, as a run to send.
pub(super) fn read_run(mem: &GuestMemory, gpa: u64, len: usize) -> Result<PageRun, String> {
    let mut data = vec![0u8; len];
    mem.read_slice(&mut data, GuestAddress(gpa))
        .map_err(|e| format!("reading guest pages {gpa:#x} (+{len} bytes): {e}"))?;
    Ok(PageRun { gpa, data })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    /// The set of `pages` (page numbers in the region at guest address 0).
    fn dirty(mem: &GuestMemory, pages: &[u64]) -> DirtySet {
        let mut set = DirtySet::all(mem);
        for region in &mut set.regions {
            region.bitmap.fill(0);
        }
        for &p in pages {
            set.regions[0].bitmap[(p / 64) as usize] |= 1 << (p % 64);
        }
        set
    }

    fn page_value(runs: &[PageRun], gpa: u64) -> Option<u64> {
        runs.iter().find_map(|r| {
            let off = gpa.checked_sub(r.gpa)? as usize;
            (off < r.data.len())
                .then(|| u64::from_le_bytes(r.data[off..off + 8].try_into().unwrap()))
        })
    }

    /// Writers hammer every dirty page (and pages beside them) while the copy runs: each copied page
    /// holds the checkpoint's content, never a later one, and every write lands afterwards.
    #[test]
    fn a_page_written_during_the_copy_is_copied_with_its_checkpoint_content() {
        let mem = vmm::memory::create_guest_memory(64).unwrap();
        // Dirty pages spread over several chunks, with runs that cross a chunk boundary.
        let pages: Vec<u64> = (0..2000u64)
            .map(|i| (i * 7) % 16384)
            .chain(510..515)
            .collect();
        for &p in &pages {
            mem.write_obj(p, GuestAddress(p * PAGE_SIZE as u64))
                .unwrap();
        }
        let set = dirty(&mem, &pages);
        let cow = CopyOnWrite::new(&mem).unwrap();
        let protected = cow.protect(&mem, &set).unwrap();
        assert!(protected.chunks.len() > 4);

        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..2u64)
            .map(|w| {
                let (mem, stop, pages) = (mem.clone(), stop.clone(), pages.clone());
                std::thread::spawn(move || {
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let p = pages[((n * 31 + w * 977) % pages.len() as u64) as usize];
                        mem.write_obj(u64::MAX - p, GuestAddress(p * PAGE_SIZE as u64))
                            .unwrap();
                        // A clean page beside it, in a protected chunk.
                        mem.write_obj(1u64, GuestAddress(p * PAGE_SIZE as u64 + 4096 * 16384))
                            .ok();
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(20));
        let copied = protected.copy(&mem).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        stop.store(true, Ordering::Relaxed);
        let writes: u64 = writers.into_iter().map(|w| w.join().unwrap()).sum();
        assert!(writes > 0);
        assert!(copied.write_faults > 0, "no writer met a protected page");

        let total: usize = copied.runs.iter().map(|r| r.data.len()).sum();
        assert_eq!(total as u64, set.count() * PAGE_SIZE as u64);
        for &p in &pages {
            assert_eq!(
                page_value(&copied.runs, p * PAGE_SIZE as u64),
                Some(p),
                "page {p}"
            );
        }
        // The writes went through after the copy.
        assert!(pages.iter().any(|&p| mem
            .read_obj::<u64>(GuestAddress(p * PAGE_SIZE as u64))
            .unwrap()
            == u64::MAX - p));
    }

    /// A checkpoint dropped before its copy leaves no page protected.
    #[test]
    fn dropped_uncopied_pages_are_unprotected() {
        let mem = vmm::memory::create_guest_memory(16).unwrap();
        mem.write_obj(7u64, GuestAddress(0x20_0000)).unwrap();
        let cow = CopyOnWrite::new(&mem).unwrap();
        let protected = cow.protect(&mem, &dirty(&mem, &[0x200])).unwrap();
        drop(protected);
        // Would stop this thread for good if the page were still protected.
        mem.write_obj(8u64, GuestAddress(0x20_0000)).unwrap();
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x20_0000)).unwrap(), 8);
    }

    /// A write fault read while no copy waits for it — a writer that went to sleep after its
    /// chunk's wake-up, or a page left protected — is answered by the fault server at once.
    #[test]
    fn a_write_fault_between_copies_is_answered() {
        let mem = vmm::memory::create_guest_memory(16).unwrap();
        mem.write_obj(7u64, GuestAddress(0x40_0000)).unwrap();
        let cow = CopyOnWrite::new(&mem).unwrap();
        let host = mem.get_host_address(GuestAddress(0x40_0000)).unwrap() as u64;
        // Protected behind the copier's back: no checkpoint waits for this page.
        cow.shared
            .protector
            .protect(host, PAGE_SIZE as u64)
            .unwrap();
        let (done, written) = std::sync::mpsc::channel();
        let writer = {
            let mem = mem.clone();
            std::thread::spawn(move || {
                mem.write_obj(8u64, GuestAddress(0x40_0000)).unwrap();
                done.send(()).unwrap();
            })
        };
        assert!(
            written.recv_timeout(Duration::from_secs(10)).is_ok(),
            "the writer is still stopped on the page"
        );
        writer.join().unwrap();
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x40_0000)).unwrap(), 8);
        assert_eq!(cow.faults_between_copies(), 1);
    }

    /// The fault server decides that a fault needs no copy (no checkpoint waits for its page) and
    /// releases the page; the next checkpoint protecting that page in between must wait, or the
    /// release would lift its protection and the page be written before its copy.
    #[test]
    fn the_next_checkpoints_protection_never_lands_between_a_faults_decision_and_its_release() {
        let mem = vmm::memory::create_guest_memory(16).unwrap();
        mem.write_obj(7u64, GuestAddress(0x20_0000)).unwrap();
        let cow = Arc::new(CopyOnWrite::new(&mem).unwrap());
        let host = mem.get_host_address(GuestAddress(0x20_0000)).unwrap() as u64;
        let (protected_tx, protected_rx) = std::sync::mpsc::channel();
        let mut next = None;
        cow.shared.answer_fault(host, || {
            // The next checkpoint's pause comes now, on another thread.
            let (cow, mem) = (cow.clone(), mem.clone());
            next = Some(std::thread::spawn(move || {
                let pages = cow.protect(&mem, &dirty(&mem, &[0x200])).unwrap();
                protected_tx.send(()).unwrap();
                pages
            }));
            assert!(
                protected_rx
                    .recv_timeout(Duration::from_millis(200))
                    .is_err(),
                "the checkpoint protected the page between the decision and the release"
            );
        });
        let pages = next.unwrap().join().unwrap();
        // The page is still protected for that checkpoint: a write waits for its copy.
        let writer = {
            let mem = mem.clone();
            std::thread::spawn(move || mem.write_obj(8u64, GuestAddress(0x20_0000)).unwrap())
        };
        std::thread::sleep(Duration::from_millis(50));
        let copied = pages.copy(&mem).unwrap();
        writer.join().unwrap();
        assert_eq!(page_value(&copied.runs, 0x20_0000), Some(7));
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x20_0000)).unwrap(), 8);
    }

    /// A second checkpoint cannot protect pages while the first one's wait for their copy.
    #[test]
    fn pages_are_protected_for_one_checkpoint_at_a_time() {
        let mem = vmm::memory::create_guest_memory(16).unwrap();
        mem.write_obj(7u64, GuestAddress(0x20_0000)).unwrap();
        let cow = CopyOnWrite::new(&mem).unwrap();
        let first = cow.protect(&mem, &dirty(&mem, &[0x200])).unwrap();
        let second = cow.protect(&mem, &dirty(&mem, &[0x200]));
        assert!(second.is_err());
        first.copy(&mem).unwrap();
        cow.protect(&mem, &dirty(&mem, &[0x200])).unwrap();
    }
}
