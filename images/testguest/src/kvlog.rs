//! The key-value store's log on a disk: what `mode=net` appends (and flushes) before it replies
//! to a command that changed the store, and replays at start.
//!
//! Layout, in 512-byte sectors (all integers little endian):
//!
//! * sectors 0 and 1: two copies of the header; generation `g` is written to sector `g % 2`, so
//!   rewriting the header never touches the copy in force. The valid copy (magic, checksum) with
//!   the highest generation wins.
//!   `magic "FTVMKVH1" | generation u64 | region u32 | 0 u32 | total_sectors u64 | fnv u64`
//!   (`fnv` is FNV-1a 64 of the 32 bytes before it; the rest of the sector is zero).
//! * two regions of `R = (total_sectors - 2) / 2` sectors: region 0 at sector 2, region 1 at
//!   `2 + R`. The header names the region in force; its log is a run of batches from the
//!   region's first sector.
//! * a batch starts on a sector boundary and fills whole sectors:
//!   `magic "FTVMKVB1" | generation u64 | seq u64 | prev u64 | payload_len u32 | 0 u32 |
//!   payload_fnv u64 | fnv u64 | payload | zero padding`
//!   (`fnv` covers the 48 bytes before it). `seq` counts from 0 within a generation; `prev` is
//!   the `fnv` of the batch before (0 for seq 0), so a stale batch left beyond a torn tail
//!   never continues the chain.
//! * a payload is operations back to back: `0x01 | key_len u16 | value_len u32 | key | value`
//!   (set) or `0x02 | key_len u16 | key` (delete).
//!
//! Replay applies batches while each one is whole and continues the chain, and stops at the
//! first that is not: a torn tail (a batch whose write was interrupted, never acknowledged) is
//! ignored and overwritten by the next append. When the region is full, the whole store is
//! written as batch 0 of generation `g + 1` in the other region, flushed, and only then the
//! header of `g + 1` is written and flushed: a crash at any point leaves one complete log.

use crate::blockdev::{BlockDev, SECTOR_SIZE};
use crate::hash::fnv1a64;
use crate::kv::{Op, Store};
use alloc::vec;
use alloc::vec::Vec;

const HEADER_MAGIC: &[u8; 8] = b"FTVMKVH1";
const BATCH_MAGIC: &[u8; 8] = b"FTVMKVB1";
/// Bytes of a batch before its payload.
pub const BATCH_HEADER: usize = 56;
const HEADER_LEN: usize = 40;
/// Header copies at the start of the disk.
pub const HEADER_SECTORS: u64 = 2;
/// Smallest region (sectors).
const MIN_REGION: u64 = 8;
/// Smallest usable disk.
pub const MIN_SECTORS: u64 = HEADER_SECTORS + 2 * MIN_REGION;
/// Sectors read at a time during replay.
const READ_WINDOW: u64 = 256;

const OP_SET: u8 = 1;
const OP_DEL: u8 = 2;

/// What went wrong with the log.
#[derive(Debug)]
pub enum LogError<E> {
    /// The disk failed a request.
    Dev(E),
    /// The disk is too small to hold a log.
    TooSmall { sectors: u64 },
    /// The header describes a bigger disk than this one.
    Shrunk { header_sectors: u64, sectors: u64 },
    /// Even the whole store alone does not fit in a region.
    Full { needed: u64, region: u64 },
}

impl<E: core::fmt::Display> core::fmt::Display for LogError<E> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            LogError::Dev(e) => write!(f, "disk error: {e}"),
            LogError::TooSmall { sectors } => write!(
                f,
                "disk of {sectors} sectors is too small for a log (at least {MIN_SECTORS})"
            ),
            LogError::Shrunk {
                header_sectors,
                sectors,
            } => write!(
                f,
                "log was made for {header_sectors} sectors but the disk has {sectors}"
            ),
            LogError::Full { needed, region } => write!(
                f,
                "log full: the store needs {needed} sectors, a region has {region}"
            ),
        }
    }
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(w)
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(w)
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

/// An operation too big for the format (key over 64 KiB, value over 4 GiB).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TooBig;

/// Appends the encoding of `op` to `out`.
pub fn encode_op(out: &mut Vec<u8>, op: Op<'_>) -> Result<(), TooBig> {
    match op {
        Op::Set(k, v) => {
            let kl = u16::try_from(k.len()).map_err(|_| TooBig)?;
            let vl = u32::try_from(v.len()).map_err(|_| TooBig)?;
            out.push(OP_SET);
            out.extend_from_slice(&kl.to_le_bytes());
            out.extend_from_slice(&vl.to_le_bytes());
            out.extend_from_slice(k);
            out.extend_from_slice(v);
        }
        Op::Del(k) => {
            let kl = u16::try_from(k.len()).map_err(|_| TooBig)?;
            out.push(OP_DEL);
            out.extend_from_slice(&kl.to_le_bytes());
            out.extend_from_slice(k);
        }
    }
    Ok(())
}

/// A payload that does not decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeError {
    pub offset: usize,
}

/// Iterator over the operations of a payload.
pub struct Ops<'a> {
    rest: &'a [u8],
    offset: usize,
    failed: bool,
}

/// The operations of `payload`, in order.
pub fn decode_ops(payload: &[u8]) -> Ops<'_> {
    Ops {
        rest: payload,
        offset: 0,
        failed: false,
    }
}

impl<'a> Iterator for Ops<'a> {
    type Item = Result<Op<'a>, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() || self.failed {
            return None;
        }
        let r = self.rest;
        let err = DecodeError {
            offset: self.offset,
        };
        let parsed = match r[0] {
            OP_SET if r.len() >= 7 => {
                let kl = usize::from(u16_at(r, 1));
                let vl = u32_at(r, 3) as usize;
                let end = 7usize.checked_add(kl).and_then(|e| e.checked_add(vl));
                match end {
                    Some(end) if end <= r.len() => {
                        Some((Op::Set(&r[7..7 + kl], &r[7 + kl..end]), end))
                    }
                    _ => None,
                }
            }
            OP_DEL if r.len() >= 3 => {
                let kl = usize::from(u16_at(r, 1));
                (3 + kl <= r.len()).then(|| (Op::Del(&r[3..3 + kl]), 3 + kl))
            }
            _ => None,
        };
        match parsed {
            Some((op, used)) => {
                self.rest = &r[used..];
                self.offset += used;
                Some(Ok(op))
            }
            None => {
                self.failed = true;
                Some(Err(err))
            }
        }
    }
}

/// The whole store as a payload of sets (what a compaction writes).
pub fn snapshot_payload(store: &Store) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in store.iter() {
        // Keys and values in a store came through the protocol's limits, far below the format's.
        let _ = encode_op(&mut out, Op::Set(k, v));
    }
    out
}

/// Sectors taken by a batch with `payload_len` bytes of payload.
pub fn batch_sectors(payload_len: usize) -> u64 {
    (BATCH_HEADER + payload_len).div_ceil(SECTOR_SIZE) as u64
}

/// A decoded header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub generation: u64,
    pub region: u32,
    pub total_sectors: u64,
}

pub fn encode_header(h: &Header) -> [u8; SECTOR_SIZE] {
    let mut s = [0u8; SECTOR_SIZE];
    s[0..8].copy_from_slice(HEADER_MAGIC);
    s[8..16].copy_from_slice(&h.generation.to_le_bytes());
    s[16..20].copy_from_slice(&h.region.to_le_bytes());
    s[24..32].copy_from_slice(&h.total_sectors.to_le_bytes());
    let hash = fnv1a64(&s[..32]);
    s[32..40].copy_from_slice(&hash.to_le_bytes());
    s
}

/// The header in `sector` (at least `HEADER_LEN` bytes), if it is one and intact.
pub fn decode_header(sector: &[u8]) -> Option<Header> {
    if sector.len() < HEADER_LEN || &sector[0..8] != HEADER_MAGIC {
        return None;
    }
    if fnv1a64(&sector[..32]) != u64_at(sector, 32) {
        return None;
    }
    let h = Header {
        generation: u64_at(sector, 8),
        region: u32_at(sector, 16),
        total_sectors: u64_at(sector, 24),
    };
    (h.region <= 1 && h.generation != 0).then_some(h)
}

/// A decoded batch header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchHeader {
    pub generation: u64,
    pub seq: u64,
    pub prev: u64,
    pub payload_len: usize,
    pub payload_hash: u64,
    /// The header's own checksum (the next batch's `prev`).
    pub hash: u64,
}

/// Encodes a batch: whole sectors, ready to write. Returns the bytes and the batch's `fnv`.
pub fn encode_batch(generation: u64, seq: u64, prev: u64, payload: &[u8]) -> (Vec<u8>, u64) {
    let sectors = batch_sectors(payload.len()) as usize;
    let mut b = vec![0u8; sectors * SECTOR_SIZE];
    b[0..8].copy_from_slice(BATCH_MAGIC);
    b[8..16].copy_from_slice(&generation.to_le_bytes());
    b[16..24].copy_from_slice(&seq.to_le_bytes());
    b[24..32].copy_from_slice(&prev.to_le_bytes());
    b[32..36].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    b[40..48].copy_from_slice(&fnv1a64(payload).to_le_bytes());
    let hash = fnv1a64(&b[..48]);
    b[48..56].copy_from_slice(&hash.to_le_bytes());
    b[BATCH_HEADER..BATCH_HEADER + payload.len()].copy_from_slice(payload);
    (b, hash)
}

/// The batch header at the start of `sector`, if it is one and intact (its payload unchecked).
pub fn decode_batch_header(sector: &[u8]) -> Option<BatchHeader> {
    if sector.len() < BATCH_HEADER || &sector[0..8] != BATCH_MAGIC {
        return None;
    }
    let hash = u64_at(sector, 48);
    if fnv1a64(&sector[..48]) != hash {
        return None;
    }
    Some(BatchHeader {
        generation: u64_at(sector, 8),
        seq: u64_at(sector, 16),
        prev: u64_at(sector, 24),
        payload_len: u32_at(sector, 32) as usize,
        payload_hash: u64_at(sector, 40),
        hash,
    })
}

/// Reads sectors through a window, so replay issues few large requests.
struct Reader<'d, D: BlockDev> {
    dev: &'d mut D,
    limit: u64,
    buf: Vec<u8>,
    start: u64,
    len: u64,
}

impl<D: BlockDev> Reader<'_, D> {
    /// Sectors `sector .. sector + count` (which must lie below `limit`).
    fn get(&mut self, sector: u64, count: u64) -> Result<&[u8], D::Error> {
        if sector < self.start || sector + count > self.start + self.len {
            let n = count.max(READ_WINDOW).min(self.limit - sector);
            self.buf.resize(n as usize * SECTOR_SIZE, 0);
            self.dev.read(sector, &mut self.buf)?;
            self.start = sector;
            self.len = n;
        }
        let off = (sector - self.start) as usize * SECTOR_SIZE;
        Ok(&self.buf[off..off + count as usize * SECTOR_SIZE])
    }
}

/// An open log, positioned after its last batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Log {
    total_sectors: u64,
    generation: u64,
    region: u32,
    /// Next free sector (absolute).
    next: u64,
    seq: u64,
    prev: u64,
}

/// What `Log::open` found.
#[derive(Debug)]
pub struct Opened {
    pub log: Log,
    /// No valid header was found, so a new, empty log was written.
    pub formatted: bool,
    /// Batches and operations replayed.
    pub batches: u64,
    pub ops: u64,
}

/// What `Log::append` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Appended {
    /// The batch was written (and flushed) after the previous one.
    Batch { sectors: u64 },
    /// The region was full: the whole store was written to the other region as a new
    /// generation (which includes this batch's changes).
    Compacted { generation: u64, sectors: u64 },
}

impl Log {
    fn region_len(total: u64) -> u64 {
        (total - HEADER_SECTORS) / 2
    }

    fn region_start_of(total: u64, region: u32) -> u64 {
        HEADER_SECTORS + u64::from(region) * Self::region_len(total)
    }

    /// First sector of the region in force.
    pub fn region_start(&self) -> u64 {
        Self::region_start_of(self.total_sectors, self.region)
    }

    /// One past the last sector of the region in force.
    pub fn region_end(&self) -> u64 {
        self.region_start() + Self::region_len(self.total_sectors)
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn region(&self) -> u32 {
        self.region
    }

    /// Next free sector.
    pub fn next_sector(&self) -> u64 {
        self.next
    }

    /// Sequence number the next batch gets.
    pub fn next_seq(&self) -> u64 {
        self.seq
    }

    /// Opens the log on `dev`, calling `apply` for every logged operation in order; formats
    /// the disk (generation `fresh_generation`, at least 1) if it holds no valid header.
    pub fn open<D: BlockDev>(
        dev: &mut D,
        fresh_generation: u64,
        mut apply: impl FnMut(Op<'_>),
    ) -> Result<Opened, LogError<D::Error>> {
        let total = dev.sectors();
        if total < MIN_SECTORS {
            return Err(LogError::TooSmall { sectors: total });
        }
        let mut hdrs = [0u8; 2 * SECTOR_SIZE];
        dev.read(0, &mut hdrs).map_err(LogError::Dev)?;
        let best = [0usize, 1]
            .iter()
            .filter_map(|&i| {
                decode_header(&hdrs[i * SECTOR_SIZE..(i + 1) * SECTOR_SIZE])
                    .filter(|h| h.generation % 2 == i as u64 && h.total_sectors >= MIN_SECTORS)
            })
            .max_by_key(|h| h.generation);
        let Some(h) = best else {
            let log = Self::format(dev, total, fresh_generation.max(1))?;
            return Ok(Opened {
                log,
                formatted: true,
                batches: 0,
                ops: 0,
            });
        };
        if h.total_sectors > total {
            return Err(LogError::Shrunk {
                header_sectors: h.total_sectors,
                sectors: total,
            });
        }
        let mut log = Log {
            total_sectors: h.total_sectors,
            generation: h.generation,
            region: h.region,
            next: 0,
            seq: 0,
            prev: 0,
        };
        log.next = log.region_start();
        let end = log.region_end();
        let mut reader = Reader {
            dev,
            limit: end,
            buf: Vec::new(),
            start: 0,
            len: 0,
        };
        let (mut batches, mut ops) = (0, 0);
        while log.next < end {
            let first = reader.get(log.next, 1).map_err(LogError::Dev)?;
            let Some(b) = decode_batch_header(first) else {
                break;
            };
            let sectors = batch_sectors(b.payload_len);
            if b.generation != log.generation
                || b.seq != log.seq
                || b.prev != log.prev
                || sectors > end - log.next
            {
                break;
            }
            let whole = reader.get(log.next, sectors).map_err(LogError::Dev)?;
            let payload = &whole[BATCH_HEADER..BATCH_HEADER + b.payload_len];
            if fnv1a64(payload) != b.payload_hash || decode_ops(payload).any(|r| r.is_err()) {
                break;
            }
            for op in decode_ops(payload).flatten() {
                apply(op);
                ops += 1;
            }
            batches += 1;
            log.next += sectors;
            log.seq += 1;
            log.prev = b.hash;
        }
        Ok(Opened {
            log,
            formatted: false,
            batches,
            ops,
        })
    }

    /// Writes an empty log of `generation` in region 0.
    fn format<D: BlockDev>(
        dev: &mut D,
        total: u64,
        generation: u64,
    ) -> Result<Log, LogError<D::Error>> {
        let log = Log {
            total_sectors: total,
            generation,
            region: 0,
            next: HEADER_SECTORS,
            seq: 0,
            prev: 0,
        };
        // Both header slots (the other one zeroed) and a zeroed first sector of region 0.
        let mut head = vec![0u8; 3 * SECTOR_SIZE];
        let slot = (generation % 2) as usize;
        head[slot * SECTOR_SIZE..(slot + 1) * SECTOR_SIZE].copy_from_slice(&encode_header(
            &Header {
                generation,
                region: 0,
                total_sectors: total,
            },
        ));
        dev.write(0, &head).map_err(LogError::Dev)?;
        dev.flush().map_err(LogError::Dev)?;
        Ok(log)
    }

    /// Appends one batch holding `payload` (encoded operations already applied to the store),
    /// and flushes. When the region is full, `snapshot` is called for the whole store's payload
    /// (which must include this batch's changes) and the log is compacted into the other
    /// region instead. On error nothing of the log in force is lost; the failed batch's
    /// changes may or may not be replayed later.
    pub fn append<D: BlockDev>(
        &mut self,
        dev: &mut D,
        payload: &[u8],
        snapshot: impl FnOnce() -> Vec<u8>,
    ) -> Result<Appended, LogError<D::Error>> {
        let sectors = batch_sectors(payload.len());
        if sectors <= self.region_end() - self.next {
            let (bytes, hash) = encode_batch(self.generation, self.seq, self.prev, payload);
            dev.write(self.next, &bytes).map_err(LogError::Dev)?;
            dev.flush().map_err(LogError::Dev)?;
            self.next += sectors;
            self.seq += 1;
            self.prev = hash;
            return Ok(Appended::Batch { sectors });
        }
        self.compact(dev, &snapshot())
    }

    /// Writes `snapshot` as batch 0 of the next generation in the other region, then that
    /// generation's header.
    pub fn compact<D: BlockDev>(
        &mut self,
        dev: &mut D,
        snapshot: &[u8],
    ) -> Result<Appended, LogError<D::Error>> {
        let region_len = Self::region_len(self.total_sectors);
        let sectors = batch_sectors(snapshot.len());
        if sectors > region_len {
            return Err(LogError::Full {
                needed: sectors,
                region: region_len,
            });
        }
        let generation = self.generation + 1;
        let region = 1 - self.region;
        let start = Self::region_start_of(self.total_sectors, region);
        let (bytes, hash) = encode_batch(generation, 0, 0, snapshot);
        dev.write(start, &bytes).map_err(LogError::Dev)?;
        dev.flush().map_err(LogError::Dev)?;
        let header = encode_header(&Header {
            generation,
            region,
            total_sectors: self.total_sectors,
        });
        dev.write(generation % 2, &header).map_err(LogError::Dev)?;
        dev.flush().map_err(LogError::Dev)?;
        *self = Log {
            total_sectors: self.total_sectors,
            generation,
            region,
            next: start + sectors,
            seq: 1,
            prev: hash,
        };
        Ok(Appended::Compacted {
            generation,
            sectors,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blockdev::mem::MemDisk;
    use crate::kv::parse;
    use alloc::format;
    use alloc::string::String;

    /// Executes `cmds` on `store`, appending each command's change as its own batch.
    fn run(log: &mut Log, disk: &mut MemDisk, store: &mut Store, cmds: &[&str]) -> Vec<Appended> {
        let mut results = Vec::new();
        for c in cmds {
            let mut payload = Vec::new();
            store.execute(parse(c.as_bytes()).unwrap(), &mut |op| {
                encode_op(&mut payload, op).unwrap()
            });
            if !payload.is_empty() {
                let snap = snapshot_payload(store);
                results.push(log.append(disk, &payload, || snap).unwrap());
            }
        }
        results
    }

    fn reopen(disk: &mut MemDisk) -> (Opened, Store) {
        let mut store = Store::new();
        let opened = Log::open(disk, 999, |op| store.apply(op)).unwrap();
        (opened, store)
    }

    #[test]
    fn op_encoding_round_trips_and_rejects_truncation() {
        let mut p = Vec::new();
        encode_op(&mut p, Op::Set(b"key", b"value with spaces")).unwrap();
        encode_op(&mut p, Op::Del(b"gone")).unwrap();
        encode_op(&mut p, Op::Set(b"e", b"")).unwrap();
        let ops: Vec<_> = decode_ops(&p).collect();
        assert_eq!(
            ops,
            vec![
                Ok(Op::Set(b"key", b"value with spaces")),
                Ok(Op::Del(b"gone")),
                Ok(Op::Set(b"e", b""))
            ]
        );
        for cut in 1..p.len() {
            let trunc = &p[..cut];
            let ok = decode_ops(trunc).all(|r| r.is_ok());
            // Only cuts at operation boundaries decode.
            assert_eq!(ok, cut == 27 || cut == 34, "cut at {cut}");
        }
        assert_eq!(
            decode_ops(&[9, 0, 0]).next(),
            Some(Err(DecodeError { offset: 0 }))
        );
    }

    #[test]
    fn headers_and_batches_round_trip_and_detect_damage() {
        let h = Header {
            generation: 7,
            region: 1,
            total_sectors: 1000,
        };
        let mut s = encode_header(&h);
        assert_eq!(decode_header(&s), Some(h));
        s[20] = 1; // a reserved byte, covered by the checksum
        assert_eq!(decode_header(&s), None);
        let (b, hash) = encode_batch(3, 4, 5, b"payload");
        assert_eq!(b.len(), SECTOR_SIZE);
        let bh = decode_batch_header(&b).unwrap();
        assert_eq!(
            (bh.generation, bh.seq, bh.prev, bh.payload_len, bh.hash),
            (3, 4, 5, 7, hash)
        );
        let mut bad = b.clone();
        bad[17] ^= 1;
        assert_eq!(decode_batch_header(&bad), None);
        assert_eq!(batch_sectors(SECTOR_SIZE - BATCH_HEADER), 1);
        assert_eq!(batch_sectors(SECTOR_SIZE - BATCH_HEADER + 1), 2);
    }

    #[test]
    fn formats_a_blank_disk_then_replays_what_was_appended() {
        let mut disk = MemDisk::new(64);
        let (opened, store) = reopen(&mut disk);
        assert!(opened.formatted);
        assert!(store.is_empty());
        let mut log = opened.log;
        assert_eq!(log.generation(), 999);
        let mut store = store;
        run(
            &mut log,
            &mut disk,
            &mut store,
            &["SET a 1", "INCR a", "SET b hello there", "DEL b", "INCR c"],
        );
        let (opened, replayed) = reopen(&mut disk);
        assert!(!opened.formatted);
        assert_eq!(opened.batches, 5);
        assert_eq!(opened.ops, 5);
        assert_eq!(replayed, store);
        assert_eq!(
            opened.log, log,
            "reopened log continues where the writer was"
        );
    }

    #[test]
    fn torn_tail_is_ignored_and_overwritten() {
        let mut disk = MemDisk::new(64);
        let (opened, mut store) = reopen(&mut disk);
        let mut log = opened.log;
        run(&mut log, &mut disk, &mut store, &["SET a 1", "SET b 2"]);
        let committed = store.clone();
        // A 3-sector batch of which only the first sector reaches the disk.
        let big = format!("SET c {}", "x".repeat(1000));
        let mut payload = Vec::new();
        store.execute(parse(big.as_bytes()).unwrap(), &mut |op| {
            encode_op(&mut payload, op).unwrap()
        });
        disk.tear_after_sectors = Some(1);
        assert!(matches!(
            log.append(&mut disk, &payload, Vec::new),
            Err(LogError::Dev(_))
        ));
        disk.tear_after_sectors = None;
        let (opened, replayed) = reopen(&mut disk);
        assert_eq!(opened.batches, 2);
        assert_eq!(replayed, committed);
        // Appending after the torn tail works, and replays.
        let mut log = opened.log;
        let mut store = replayed;
        run(&mut log, &mut disk, &mut store, &["SET d 4"]);
        let (opened, replayed) = reopen(&mut disk);
        assert_eq!(opened.batches, 3);
        assert_eq!(replayed, store);
    }

    #[test]
    fn stale_batch_beyond_the_tail_does_not_continue_the_chain() {
        let mut disk = MemDisk::new(64);
        let (opened, mut store) = reopen(&mut disk);
        let mut log = opened.log;
        run(
            &mut log,
            &mut disk,
            &mut store,
            &["SET a 1", "SET b 2", "SET c 3"],
        );
        // Pretend batch 1 was torn (zero its first sector); batch 2 (seq 2) is still there.
        let s1 = (log.region_start() + 1) as usize * SECTOR_SIZE;
        disk.data[s1..s1 + SECTOR_SIZE].fill(0);
        let (opened, replayed) = reopen(&mut disk);
        assert_eq!(opened.batches, 1);
        assert_eq!(replayed.len(), 1);
        // A new batch 1 is written over the hole; the old batch 2 after it has the right seq
        // but chains to the old batch 1, so replay stops before it.
        let mut log = opened.log;
        let mut store = replayed;
        run(&mut log, &mut disk, &mut store, &["SET x 9"]);
        let (opened, replayed) = reopen(&mut disk);
        assert_eq!(opened.batches, 2);
        assert_eq!(replayed, store);
        assert_eq!(replayed.get(b"c"), None);
    }

    #[test]
    fn compacts_into_the_other_region_when_full_and_survives_reopen() {
        // 2 + 2 * 8 sectors: one region holds 8 one-sector batches.
        let mut disk = MemDisk::new(MIN_SECTORS as usize);
        let (opened, mut store) = reopen(&mut disk);
        let mut log = opened.log;
        let g0 = log.generation();
        let cmds: Vec<_> = (0..20).map(|i| format!("SET k{} {}", i % 3, i)).collect();
        let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
        let results = run(&mut log, &mut disk, &mut store, &cmds);
        let compactions = results
            .iter()
            .filter(|r| matches!(r, Appended::Compacted { .. }))
            .count();
        assert!(compactions >= 2, "{results:?}");
        assert_eq!(log.generation(), g0 + compactions as u64);
        let (opened, replayed) = reopen(&mut disk);
        assert_eq!(replayed, store);
        assert_eq!(opened.log, log);
    }

    #[test]
    fn crash_before_the_new_header_keeps_the_old_log() {
        let mut disk = MemDisk::new(MIN_SECTORS as usize);
        let (opened, mut store) = reopen(&mut disk);
        let mut log = opened.log;
        run(&mut log, &mut disk, &mut store, &["SET a 1", "SET b 2"]);
        let before = store.clone();
        // The snapshot reaches the other region, the header write tears (nothing written).
        let mut copy = log.clone();
        let snap = snapshot_payload(&store);
        let mut d2 = MemDisk::new(MIN_SECTORS as usize);
        d2.data.clone_from(&disk.data);
        // Write the snapshot batch by hand, as compact() would, but not the header.
        let start = Log::region_start_of(MIN_SECTORS, 1);
        let (bytes, _) = encode_batch(copy.generation + 1, 0, 0, &snap);
        d2.write(start, &bytes).unwrap();
        let (opened, replayed) = reopen(&mut d2);
        assert_eq!(opened.log.generation(), log.generation());
        assert_eq!(replayed, before);
        // A complete compaction switches generation and region.
        copy.compact(&mut disk, &snap).unwrap();
        let (opened, replayed) = reopen(&mut disk);
        assert_eq!(opened.log.region(), 1);
        assert_eq!(replayed, before);
    }

    #[test]
    fn torn_header_falls_back_to_the_previous_generation() {
        let mut disk = MemDisk::new(MIN_SECTORS as usize);
        let (opened, mut store) = reopen(&mut disk);
        let mut log = opened.log;
        run(&mut log, &mut disk, &mut store, &["SET a 1"]);
        let snap = snapshot_payload(&store);
        log.compact(&mut disk, &snap).unwrap();
        run(&mut log, &mut disk, &mut store, &["SET b 2"]);
        let g = log.generation();
        // Damage the newest header: the older one (other slot) is used, with its own region.
        let slot = (g % 2) as usize * SECTOR_SIZE;
        disk.data[slot + 9] ^= 0xff;
        let (opened, replayed) = reopen(&mut disk);
        assert_eq!(opened.log.generation(), g - 1);
        assert_eq!(replayed.get(b"a"), Some(&b"1"[..]));
        assert_eq!(replayed.get(b"b"), None);
    }

    #[test]
    fn refuses_small_or_shrunk_disks_and_full_stores() {
        let mut tiny = MemDisk::new(MIN_SECTORS as usize - 1);
        assert!(matches!(
            Log::open(&mut tiny, 1, |_| {}),
            Err(LogError::TooSmall { .. })
        ));
        let mut disk = MemDisk::new(128);
        let _ = reopen(&mut disk);
        let mut small = MemDisk::new(64);
        small.data.copy_from_slice(&disk.data[..64 * SECTOR_SIZE]);
        assert!(matches!(
            Log::open(&mut small, 1, |_| {}),
            Err(LogError::Shrunk { .. })
        ));
        let mut disk = MemDisk::new(MIN_SECTORS as usize);
        let (opened, _) = reopen(&mut disk);
        let mut log = opened.log;
        let huge = vec![0u8; 9 * SECTOR_SIZE];
        assert!(matches!(
            log.append(&mut disk, &huge, || huge.clone()),
            Err(LogError::Full { .. })
        ));
    }

    #[test]
    fn replay_reads_in_windows() {
        let mut disk = MemDisk::new(4096);
        let (opened, mut store) = reopen(&mut disk);
        let mut log = opened.log;
        let cmds: Vec<_> = (0..300).map(|i| format!("SET k{i} {i}")).collect();
        let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
        run(&mut log, &mut disk, &mut store, &cmds);
        disk.reads = 0;
        let (opened, replayed) = reopen(&mut disk);
        assert_eq!(opened.batches, 300);
        assert_eq!(replayed, store);
        assert!(disk.reads <= 4, "{} reads", disk.reads);
    }
}
