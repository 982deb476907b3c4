//! Shared set-up for the fuzz targets: guest memory holding a virtqueue whose descriptor table, avail
//! ring and buffers all come from the fuzzer's bytes, exactly as a hostile guest could lay them out.

use devices::virtio::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

/// Guest RAM size used by the targets. Descriptors may point anywhere, including past it.
pub const MEM_SIZE: usize = 0x10_0000;
const DESC_TABLE: u64 = 0x1000;
const AVAIL_RING: u64 = 0x2000;
const USED_RING: u64 = 0x3000;
const DATA: u64 = 0x1_0000;

/// Guest memory and a ready queue built from `data`; `None` if `data` is too short to describe one.
pub fn queue_from_bytes(data: &[u8]) -> Option<(GuestMemoryMmap, Queue)> {
    let (&size_sel, rest) = data.split_first()?;
    let size: u16 = 1 << (size_sel % 9); // 1..=256, a power of two as the spec requires
    let table_len = usize::from(size) * 16;
    if rest.len() < table_len + 2 {
        return None;
    }
    let (table, rest) = rest.split_at(table_len);
    let (avail, buffers) = rest.split_at(2 + (rest.len() - 2).min(2 * usize::from(size)));
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).ok()?;
    mem.write_slice(table, GuestAddress(DESC_TABLE)).ok()?;
    // avail: flags = 0, idx from the fuzzer, then ring entries.
    mem.write_obj(0u16, GuestAddress(AVAIL_RING)).ok()?;
    mem.write_obj(
        u16::from_le_bytes([avail[0], avail[1]]),
        GuestAddress(AVAIL_RING + 2),
    )
    .ok()?;
    mem.write_slice(&avail[2..], GuestAddress(AVAIL_RING + 4))
        .ok()?;
    let n = buffers.len().min(MEM_SIZE - DATA as usize);
    mem.write_slice(&buffers[..n], GuestAddress(DATA)).ok()?;

    let mut queue = Queue::new(256).ok()?;
    queue.set_size(size);
    queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
    queue.set_used_ring_address(Some(USED_RING as u32), Some(0));
    queue.set_ready(true);
    queue.is_valid(&mem).then_some((mem, queue))
}

/// A peer on the other end of a replication or migration link, played by the fuzzer: reads come
/// from its bytes, writes (acknowledgements) go nowhere.
pub struct ScriptedPeer<'a>(pub &'a [u8]);

impl std::io::Read for ScriptedPeer<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl std::io::Write for ScriptedPeer<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Well-formed frames (right magic, version, length and checksum, compressed when large) around
/// message payloads the fuzzer chose, so that the decoders and receive loops behind the checksum
/// are reached: `data` is a sequence of `length: u16 LE | payload[length]` (a short last payload is
/// taken as it is).
pub fn framed(data: &[u8]) -> Vec<u8> {
    let mut stream = Vec::new();
    let mut rest = data;
    while rest.len() >= 2 {
        let len = usize::from(u16::from_le_bytes([rest[0], rest[1]]));
        let (payload, after) = rest[2..].split_at(len.min(rest.len() - 2));
        replication::wire::write_payload(&mut stream, payload).expect("writing to a Vec");
        rest = after;
    }
    stream
}

/// A scratch file of `len` zero bytes, already unlinked.
pub fn scratch_file(len: u64) -> std::fs::File {
    let path = scratch_path("file");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .expect("scratch file");
    let _ = std::fs::remove_file(&path);
    f.set_len(len).expect("scratch file size");
    f
}

/// A path for a scratch file of this fuzzing process.
pub fn scratch_path(what: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("ftvmm-fuzz-{what}-{}", std::process::id()))
}
