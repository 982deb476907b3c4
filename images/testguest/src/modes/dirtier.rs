//! A memory-dirtying workload that runs alongside a mode's main loop: `dirty=PAGES_PER_S` writes one
//! byte into that many distinct 4 KiB pages per second, cycling through a buffer of `dirty_mb=N`
//! MiB (default 64). It gives migration and replication a guest whose memory keeps changing at a
//! known rate.
//!
//! It also checks that its memory is one consistent image: each page's first word counts the writes
//! to that page, and before every write the dirtier checks that the count is the one its own position
//! says (pages before it in this pass written once more than pages after it). A snapshot, migration
//! or checkpoint that kept a page older or newer than the rest (a dirty page missed, or copied after
//! a later write) shows as `testguest: FAIL dirtier: ...` when the restored guest comes back to that
//! page.

use alloc::vec::Vec;

use crate::arch::cpu;
use crate::cmdline::Cmdline;

const PAGE: usize = 4096;

/// Dirties pages at a fixed rate; call [`Dirtier::tick`] from the main loop.
pub struct Dirtier {
    buffer: Vec<u8>,
    pages_per_s: u64,
    hz: u64,
    start: u64,
    done: u64,
    next_page: usize,
    /// Whole passes over the buffer: the write count of every page from `next_page` on.
    passes: u64,
    /// Set after the first inconsistency is reported (one report, not one per page).
    failed: bool,
}

impl Dirtier {
    /// From `dirty=` / `dirty_mb=` on the command line; `None` when `dirty=` is absent or 0.
    pub fn from_cmdline(cmdline: &Cmdline<'_>, tsc_hz: u64) -> Result<Option<Self>, alloc::string::String> {
        let rate = match cmdline.get_u64("dirty") {
            None => return Ok(None),
            Some(Err(e)) => return Err(alloc::format!("dirty=: {e}")),
            Some(Ok(0)) => return Ok(None),
            Some(Ok(r)) => r,
        };
        let mb = match cmdline.get_u64("dirty_mb") {
            None => 64,
            Some(Ok(m)) if m > 0 => m,
            Some(_) => return Err("dirty_mb= must be a positive number of MiB".into()),
        };
        let bytes = usize::try_from(mb << 20).map_err(|_| "dirty_mb= too large")?;
        let mut buffer = Vec::new();
        buffer
            .try_reserve_exact(bytes)
            .map_err(|_| alloc::format!("cannot allocate dirty_mb={mb} MiB"))?;
        buffer.resize(bytes, 0);
        Ok(Some(Self {
            buffer,
            pages_per_s: rate,
            hz: tsc_hz.max(1),
            start: cpu::rdtsc(),
            done: 0,
            next_page: 0,
            passes: 0,
            failed: false,
        }))
    }

    /// Pages dirtied per second.
    pub fn rate(&self) -> u64 {
        self.pages_per_s
    }

    /// Buffer size in MiB.
    pub fn buffer_mb(&self) -> usize {
        self.buffer.len() >> 20
    }

    /// Dirties the pages due by now (at most one second's worth at once, so a long stall does not
    /// turn into a burst).
    pub fn tick(&mut self) {
        let elapsed = cpu::rdtsc().wrapping_sub(self.start);
        let due = (u128::from(elapsed) * u128::from(self.pages_per_s) / u128::from(self.hz)) as u64;
        if due.saturating_sub(self.done) > self.pages_per_s {
            // Skip what a stall left behind beyond one second's worth.
            self.done = due - self.pages_per_s;
        }
        let behind = due.saturating_sub(self.done);
        let pages = self.buffer.len() / PAGE;
        for _ in 0..behind {
            let offset = self.next_page * PAGE;
            let word: &mut [u8; 8] = (&mut self.buffer[offset..offset + 8]).try_into().expect("8 bytes");
            let count = u64::from_le_bytes(*word);
            if count != self.passes && !self.failed {
                self.failed = true;
                crate::println!(
                    "testguest: FAIL dirtier: page {} was written {} times, expected {}: memory is not one consistent image",
                    self.next_page,
                    count,
                    self.passes
                );
            }
            // A changing value, so every write really modifies the page.
            *word = (count + 1).to_le_bytes();
            self.next_page += 1;
            if self.next_page == pages {
                self.next_page = 0;
                self.passes += 1;
            }
        }
        self.done += behind;
    }
}
