//! A disk-writing workload that runs alongside a mode's main loop: `storm=MIB` writes that many
//! MiB to the *second* virtio-blk disk as fast as the device takes them, `storm_chunk=KIB` (default
//! 1024) per request, sequentially and wrapping around the disk, then stops. It gives protection a
//! guest that writes far more than a checkpoint holds, during the first copy and after.
//!
//! Each chunk holds a pattern of its pass and offset that does not compress (as real data written
//! hard rarely does; the link compresses frames), so that the link carries every byte.
//!
//! Markers: `testguest: storm start bytes=N chunk=N disk=N`, `testguest: storm progress bytes=N`
//! every 64 MiB, `testguest: storm done bytes=N` at the end; `testguest: storm FAIL <why>`.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use crate::cmdline::Cmdline;
use crate::println;
use crate::virtio::blk::Disk;
use crate::virtio::probe;
use testguest::blockdev::{BlockDev, SECTOR_SIZE};

/// The 8 bytes at `offset` (a multiple of 8) of a chunk written in `pass`: splitmix64.
pub fn pattern(pass: u64, offset: u64) -> [u8; 8] {
    let mut z = (pass << 40 ^ offset / 8).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)).to_le_bytes()
}

/// Writes the second disk; call [`DiskStorm::tick`] from the main loop.
pub struct DiskStorm {
    disk: Disk,
    chunk: Vec<u8>,
    total: u64,
    written: u64,
    /// Next byte offset on the disk.
    offset: u64,
    pass: u64,
    done: bool,
}

impl DiskStorm {
    /// From `storm=` / `storm_chunk=`; `None` when `storm=` is absent or 0.
    pub fn from_cmdline(cmdline: &Cmdline<'_>) -> Result<Option<Self>, String> {
        let mib = match cmdline.get_u64("storm") {
            None | Some(Ok(0)) => return Ok(None),
            Some(Ok(m)) => m,
            Some(Err(e)) => return Err(format!("storm=: {e}")),
        };
        let chunk_kib = match cmdline.get_u64("storm_chunk") {
            None => 1024,
            Some(Ok(k)) if k > 0 && k * 1024 % SECTOR_SIZE as u64 == 0 => k,
            Some(_) => return Err("storm_chunk= must be a positive number of KiB".into()),
        };
        let slot = probe::scan()
            .filter(|s| s.device_id == probe::DEVICE_BLOCK)
            .nth(1)
            .ok_or("storm= needs a second virtio-blk disk")?;
        let mut disk = Disk::open(slot)?;
        let chunk_bytes = usize::try_from(chunk_kib * 1024).map_err(|_| "storm_chunk= too large")?;
        if chunk_bytes as u64 > disk.bytes() {
            return Err(format!(
                "storm_chunk={chunk_kib} KiB is larger than the disk ({} bytes)",
                disk.bytes()
            ));
        }
        // One request per chunk, however large.
        disk.set_max_request(chunk_bytes);
        let mut chunk = Vec::new();
        chunk
            .try_reserve_exact(chunk_bytes)
            .map_err(|_| format!("cannot allocate storm_chunk={chunk_kib} KiB"))?;
        chunk.resize(chunk_bytes, 0);
        println!(
            "testguest: storm start bytes={} chunk={} disk={}",
            mib << 20,
            chunk_bytes,
            disk.bytes()
        );
        Ok(Some(Self {
            disk,
            chunk,
            total: mib << 20,
            written: 0,
            offset: 0,
            pass: 0,
            done: false,
        }))
    }

    /// Writes one chunk, if any are left.
    pub fn tick(&mut self) {
        if self.done {
            return;
        }
        let len = self.chunk.len() as u64;
        if self.offset + len > self.disk.bytes() {
            self.offset = 0;
            self.pass += 1;
        }
        for (i, word) in self.chunk.chunks_exact_mut(8).enumerate() {
            word.copy_from_slice(&pattern(self.pass, self.offset + 8 * i as u64));
        }
        let sector = self.offset / SECTOR_SIZE as u64;
        if let Err(e) = self.disk.write(sector, &self.chunk) {
            println!("testguest: storm FAIL write at {}: {:?}", self.offset, e);
            self.done = true;
            return;
        }
        self.offset += len;
        let before = self.written;
        self.written += len;
        if self.written >> 26 != before >> 26 {
            println!("testguest: storm progress bytes={}", self.written);
        }
        if self.written >= self.total {
            let _ = self.disk.flush();
            println!("testguest: storm done bytes={}", self.written);
            self.done = true;
        }
    }
}
