//! One virtio-blk request: parse the descriptor chain, check it against the disk, execute it.
//!
//! Everything here is driven by guest-controlled data. A malformed chain fails that request with
//! `VIRTIO_BLK_S_IOERR` (when there is somewhere to put a status) and never touches memory outside
//! guest RAM: every access goes through vm-memory on the guest addresses the descriptors name,
//! which refuses what is not guest memory. Data moves between the image and guest memory in place
//! (`pread`/`pwrite` on the guest's pages, [`ImageAt`]); only a write that a standby must also
//! receive is copied first (`WriteJournal`), so that the image and the journal get the same bytes
//! even if the guest changes its buffer meanwhile.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use virtio_queue::DescriptorChain;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::volatile_memory::Error as VolatileMemoryError;
use vm_memory::{ByteValued, Bytes, GuestAddress, ReadVolatile, VolatileSlice, WriteVolatile};

use crate::virtio::GuestMemoryMmap;

/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
/// Length of the device ID returned by GET_ID.
pub const ID_BYTES: usize = 20;
/// The most data one request may move: the device's `seg_max` × `size_max` (254 MiB), rounded up.
/// A driver that honours those never meets it; a bigger request fails with `VIRTIO_BLK_S_IOERR`.
pub const MAX_REQUEST_BYTES: usize = 256 << 20;
/// The largest piece a write is copied and recorded in for a standby.
pub const PIECE_BYTES: usize = 1 << 20;

pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;

pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// The request header the driver puts first in the chain.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct RequestHeader {
    pub request_type: u32,
    pub reserved: u32,
    pub sector: u64,
}
// SAFETY: plain integers, no padding; any bytes are a valid value.
unsafe impl vm_memory::ByteValued for RequestHeader {}

/// Why a request failed (reported to the guest as a status byte, logged at debug level).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("descriptor chain has no room for a status byte")]
    NoStatus,
    #[error("descriptor chain is too short for a request header ({0} readable bytes)")]
    ShortHeader(usize),
    #[error("data length {0} is not a multiple of the sector size")]
    UnalignedLength(usize),
    #[error(
        "request for sectors {sector}..+{len} bytes goes past the disk end ({capacity} bytes)"
    )]
    OutOfRange {
        sector: u64,
        len: usize,
        capacity: u64,
    },
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    #[error("request moves {0} bytes; at most {MAX_REQUEST_BYTES} are taken")]
    TooLarge(usize),
    #[error("request has {count} data segments; the driver accepted seg_max {max}")]
    TooManySegments { count: usize, max: u32 },
    #[error("a data segment of {len} bytes; the driver accepted size_max {max}")]
    SegmentTooLarge { len: usize, max: u32 },
    #[error("disk I/O failed: {0}")]
    Io(String),
    #[error("guest memory access failed: {0}")]
    Memory(String),
}

impl RequestError {
    /// The status the guest sees.
    pub fn status(&self) -> u8 {
        match self {
            Self::Unsupported(_) => VIRTIO_BLK_S_UNSUPP,
            _ => VIRTIO_BLK_S_IOERR,
        }
    }
}

/// The disk a request runs against.
pub struct Disk<'a> {
    pub file: &'a File,
    pub capacity: u64,
    pub read_only: bool,
    pub id: &'a [u8; ID_BYTES],
    /// Where completed writes are recorded for a standby (inactive unless protected).
    pub journal: Option<&'a super::WriteJournal>,
    /// What the driver agreed to about a request's data segments.
    pub segments: SegmentLimits,
}

/// The `seg_max` and `size_max` a driver accepted (`None`: it did not negotiate that feature, and
/// is held to [`MAX_REQUEST_BYTES`] only).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SegmentLimits {
    pub count: Option<u32>,
    pub size: Option<u32>,
}

impl SegmentLimits {
    /// Checks the data segments `data` against these limits and [`MAX_REQUEST_BYTES`].
    fn check(&self, data: &Segments) -> Result<(), RequestError> {
        if let Some(max) = self.count {
            if data.0.len() > max as usize {
                return Err(RequestError::TooManySegments {
                    count: data.0.len(),
                    max,
                });
            }
        }
        if let Some(max) = self.size {
            if let Some(&(_, len)) = data.0.iter().find(|&&(_, len)| len > max as usize) {
                return Err(RequestError::SegmentTooLarge { len, max });
            }
        }
        let len = data.len();
        if len > MAX_REQUEST_BYTES {
            return Err(RequestError::TooLarge(len));
        }
        Ok(())
    }
}

/// The guest memory a request's descriptor chain names, as the device uses it: what it reads (the
/// header, then a write's data) and what it writes (a read's data, then the status byte). As in
/// virtio-queue's `Reader`/`Writer`: readable descriptors up to the first writable one, then the
/// writable ones.
#[derive(Debug, Default)]
struct Segments(Vec<(GuestAddress, usize)>);

impl Segments {
    fn len(&self) -> usize {
        self.0.iter().map(|&(_, n)| n).sum()
    }

    /// Removes and returns the first `n` bytes (as many as there are).
    fn take_front(&mut self, mut n: usize) -> Segments {
        let mut front = Vec::new();
        while n > 0 && !self.0.is_empty() {
            let (addr, len) = self.0[0];
            if len <= n {
                front.push(self.0.remove(0));
                n -= len;
            } else {
                front.push((addr, n));
                self.0[0] = (GuestAddress(addr.0 + n as u64), len - n);
                n = 0;
            }
        }
        Segments(front)
    }

    /// Removes and returns the last byte's address.
    fn take_last_byte(&mut self) -> Option<GuestAddress> {
        let (addr, len) = self.0.pop()?;
        if len > 1 {
            self.0.push((addr, len - 1));
        }
        Some(GuestAddress(addr.0 + len as u64 - 1))
    }

    /// Copies the bytes out of guest memory.
    fn read(&self, mem: &GuestMemoryMmap) -> Result<Vec<u8>, RequestError> {
        let mut out = vec![0u8; self.len()];
        let mut at = 0;
        for &(addr, len) in &self.0 {
            mem.read_slice(&mut out[at..at + len], addr)
                .map_err(|e| RequestError::Memory(e.to_string()))?;
            at += len;
        }
        Ok(out)
    }
}

/// Splits `chain` into what the device reads and what it writes.
fn segments(chain: DescriptorChain<&GuestMemoryMmap>) -> (Segments, Segments) {
    let (mut readable, mut writable) = (Segments::default(), Segments::default());
    for d in chain {
        if d.len() == 0 {
            continue;
        }
        let segment = (d.addr(), d.len() as usize);
        if d.is_write_only() {
            writable.0.push(segment);
        } else if writable.0.is_empty() {
            readable.0.push(segment);
        }
    }
    (readable, writable)
}

/// A request done: the used length (bytes written to guest memory, status included) and the data
/// it moved between the image and guest memory, in either direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Completion {
    pub used: u32,
    pub moved: usize,
}

/// Executes the request `chain` names and writes the status byte.
pub fn execute(
    disk: &Disk,
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> Completion {
    let (mut readable, mut writable) = segments(chain);
    let Some(status_at) = writable.take_last_byte() else {
        tracing::debug!("virtio-blk: {}", RequestError::NoStatus);
        return Completion::default();
    };
    let (status, written, moved) = match run(disk, mem, &mut readable, &writable) {
        Ok((written, moved)) => (VIRTIO_BLK_S_OK, written, moved),
        Err(e) => {
            tracing::debug!("virtio-blk request failed: {e}");
            (e.status(), 0, 0)
        }
    };
    let written = u32::try_from(written).unwrap_or(u32::MAX);
    let used = match mem.write_obj(status, status_at) {
        Ok(()) => written.saturating_add(1),
        Err(e) => {
            tracing::debug!("virtio-blk: cannot write status: {e}");
            written
        }
    };
    Completion { used, moved }
}

fn check_range(disk: &Disk, sector: u64, len: usize) -> Result<u64, RequestError> {
    let out_of_range = || RequestError::OutOfRange {
        sector,
        len,
        capacity: disk.capacity,
    };
    if !(len as u64).is_multiple_of(SECTOR_SIZE) {
        return Err(RequestError::UnalignedLength(len));
    }
    let offset = sector.checked_mul(SECTOR_SIZE).ok_or_else(out_of_range)?;
    let end = offset.checked_add(len as u64).ok_or_else(out_of_range)?;
    if end > disk.capacity {
        return Err(out_of_range());
    }
    Ok(offset)
}

/// Executes the request; returns the bytes it wrote to guest memory (before the status) and the
/// data it moved.
fn run(
    disk: &Disk,
    mem: &GuestMemoryMmap,
    readable: &mut Segments,
    writable: &Segments,
) -> Result<(usize, usize), RequestError> {
    let header_len = std::mem::size_of::<RequestHeader>();
    if readable.len() < header_len {
        return Err(RequestError::ShortHeader(readable.len()));
    }
    let mut header = RequestHeader::default();
    header
        .as_mut_slice()
        .copy_from_slice(&readable.take_front(header_len).read(mem)?);
    match header.request_type {
        VIRTIO_BLK_T_IN => {
            disk.segments.check(writable)?;
            let len = writable.len();
            let mut image = ImageAt::new(disk.file, check_range(disk, header.sector, len)?);
            for &(addr, n) in &writable.0 {
                mem.read_exact_volatile_from(addr, &mut image, n)
                    .map_err(|e| RequestError::Io(e.to_string()))?;
            }
            Ok((len, len))
        }
        VIRTIO_BLK_T_OUT => {
            if disk.read_only {
                return Err(RequestError::ReadOnly);
            }
            disk.segments.check(readable)?;
            let len = readable.len();
            let offset = check_range(disk, header.sector, len)?;
            match disk.journal.filter(|j| j.records_data()) {
                // A standby gets the very bytes the image gets: each piece copied once, written
                // and recorded.
                Some(journal) => {
                    let mut at = offset;
                    while readable.len() > 0 {
                        let data = readable.take_front(PIECE_BYTES).read(mem)?;
                        disk.file
                            .write_all_at(&data, at)
                            .map_err(|e| RequestError::Io(e.to_string()))?;
                        at += data.len() as u64;
                        journal.record(at - data.len() as u64, data);
                    }
                }
                None => {
                    let mut image = ImageAt::new(disk.file, offset);
                    for &(addr, n) in &readable.0 {
                        mem.write_all_volatile_to(addr, &mut image, n)
                            .map_err(|e| RequestError::Io(e.to_string()))?;
                    }
                    // Tracked for a first copy (its blocks marked after the write landed), or
                    // recording started meanwhile: then what the image now holds is recorded.
                    if let Some(journal) = disk.journal {
                        journal
                            .written(offset, len as u64, |at, n| {
                                let mut data = vec![0u8; n];
                                disk.file.read_exact_at(&mut data, at).map(|()| data)
                            })
                            .map_err(|e| RequestError::Io(e.to_string()))?;
                    }
                }
            }
            Ok((0, len))
        }
        VIRTIO_BLK_T_FLUSH => {
            if !disk.read_only {
                disk.file
                    .sync_data()
                    .map_err(|e| RequestError::Io(e.to_string()))?;
                // The standby makes what this epoch wrote durable before it commits it.
                if let Some(journal) = disk.journal {
                    journal.record_flush();
                }
            }
            Ok((0, 0))
        }
        VIRTIO_BLK_T_GET_ID => {
            let mut left = ID_BYTES.min(writable.len());
            let mut id = &disk.id[..];
            for &(addr, n) in &writable.0 {
                let n = n.min(left);
                mem.write_slice(&id[..n], addr)
                    .map_err(|e| RequestError::Memory(e.to_string()))?;
                (id, left) = (&id[n..], left - n);
            }
            Ok((ID_BYTES.min(writable.len()), 0))
        }
        other => Err(RequestError::Unsupported(other)),
    }
}

/// The disk image at an advancing offset, read into and written from guest memory in place.
struct ImageAt<'a> {
    file: &'a File,
    offset: u64,
}

impl<'a> ImageAt<'a> {
    fn new(file: &'a File, offset: u64) -> Self {
        Self { file, offset }
    }
}

impl ReadVolatile for ImageAt<'_> {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let guard = buf.ptr_guard_mut();
        // SAFETY: `guard` points at `buf.len()` bytes of guest memory that stay mapped while the
        // guard lives (VolatileSlice's invariant); pread writes at most that many; the file is open.
        let n = unsafe {
            libc::pread(
                self.file.as_raw_fd(),
                guard.as_ptr().cast(),
                buf.len(),
                self.offset as libc::off_t,
            )
        };
        if n < 0 {
            // A partial read may have happened: count it all as written.
            buf.bitmap().mark_dirty(0, buf.len());
            return Err(VolatileMemoryError::IOError(std::io::Error::last_os_error()));
        }
        let n = n as usize;
        // The device wrote these guest pages: dirty tracking must see them.
        buf.bitmap().mark_dirty(0, n);
        self.offset += n as u64;
        Ok(n)
    }
}

impl WriteVolatile for ImageAt<'_> {
    fn write_volatile<B: BitmapSlice>(
        &mut self,
        buf: &VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let guard = buf.ptr_guard();
        // SAFETY: `guard` points at `buf.len()` readable bytes of guest memory that stay mapped
        // while the guard lives; pwrite only reads them; the file is open.
        let n = unsafe {
            libc::pwrite(
                self.file.as_raw_fd(),
                guard.as_ptr().cast(),
                buf.len(),
                self.offset as libc::off_t,
            )
        };
        if n < 0 {
            return Err(VolatileMemoryError::IOError(std::io::Error::last_os_error()));
        }
        self.offset += n as u64;
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::GuestMemoryMmap;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::QueueOwnedT;
    use vm_memory::{Bytes, GuestAddress};

    const HDR: u64 = 0x10_0000;
    const DATA: u64 = 0x20_0000;
    const STATUS: u64 = 0x30_0000;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
    }

    fn disk_file(bytes: usize) -> File {
        let path = std::env::temp_dir().join(format!(
            "ftvmm-blk-req-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f.set_len(bytes as u64).unwrap();
        f
    }

    /// Builds a chain of (addr, len, writable) descriptors and runs it; returns (used len, status).
    fn run_chain(mem: &GuestMemoryMmap, disk: &Disk, descs: &[(u64, u32, bool)]) -> (u32, u8) {
        let used = execute_chain(mem, disk, descs).used;
        let status = mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap_or(0xee);
        (used, status)
    }

    /// Builds a chain of (addr, len, writable) descriptors and executes it.
    fn execute_chain(mem: &GuestMemoryMmap, disk: &Disk, descs: &[(u64, u32, bool)]) -> Completion {
        let q = MockSplitQueue::new(mem, 16);
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .map(|&(addr, len, w)| {
                RawDescriptor::from(SplitDescriptor::new(
                    addr,
                    len,
                    if w { VRING_DESC_F_WRITE as u16 } else { 0 },
                    0,
                ))
            })
            .collect();
        q.build_desc_chain(&raw).unwrap();
        let mut queue: virtio_queue::Queue = q.create_queue().unwrap();
        let chain = queue.iter(mem).unwrap().next().unwrap();
        execute(disk, mem, chain)
    }

    fn header(mem: &GuestMemoryMmap, t: u32, sector: u64) {
        mem.write_obj(
            RequestHeader {
                request_type: t,
                reserved: 0,
                sector,
            },
            GuestAddress(HDR),
        )
        .unwrap();
    }

    fn disk<'a>(file: &'a File, read_only: bool, id: &'a [u8; ID_BYTES]) -> Disk<'a> {
        Disk {
            file,
            capacity: file.metadata().unwrap().len(),
            read_only,
            id,
            journal: None,
            segments: SegmentLimits::default(),
        }
    }

    #[test]
    fn write_then_read_round_trips() {
        let m = mem();
        let f = disk_file(8192);
        let id = [b'x'; ID_BYTES];
        let d = disk(&f, false, &id);
        m.write_slice(&[0xab; 1024], GuestAddress(DATA)).unwrap();
        header(&m, VIRTIO_BLK_T_OUT, 2);
        let (used, st) = run_chain(
            &m,
            &d,
            &[(HDR, 16, false), (DATA, 1024, false), (STATUS, 1, true)],
        );
        assert_eq!((used, st), (1, VIRTIO_BLK_S_OK));
        let mut on_disk = [0u8; 1024];
        f.read_exact_at(&mut on_disk, 1024).unwrap();
        assert_eq!(on_disk, [0xab; 1024]);
        m.write_slice(&[0u8; 1024], GuestAddress(DATA)).unwrap();
        header(&m, VIRTIO_BLK_T_IN, 2);
        let (used, st) = run_chain(
            &m,
            &d,
            &[(HDR, 16, false), (DATA, 1024, true), (STATUS, 1, true)],
        );
        assert_eq!((used, st), (1025, VIRTIO_BLK_S_OK));
        let mut back = [0u8; 1024];
        m.read_slice(&mut back, GuestAddress(DATA)).unwrap();
        assert_eq!(back, [0xab; 1024]);
    }

    #[test]
    fn read_only_disk_rejects_writes() {
        let m = mem();
        let f = disk_file(4096);
        let id = [0; ID_BYTES];
        let d = disk(&f, true, &id);
        header(&m, VIRTIO_BLK_T_OUT, 0);
        let (_, st) = run_chain(
            &m,
            &d,
            &[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)],
        );
        assert_eq!(st, VIRTIO_BLK_S_IOERR);
    }

    #[test]
    fn requests_past_the_end_fail() {
        let m = mem();
        let f = disk_file(4096);
        let id = [0; ID_BYTES];
        let d = disk(&f, false, &id);
        header(&m, VIRTIO_BLK_T_IN, 7);
        let (_, st) = run_chain(
            &m,
            &d,
            &[(HDR, 16, false), (DATA, 1024, true), (STATUS, 1, true)],
        );
        assert_eq!(st, VIRTIO_BLK_S_IOERR);
        header(&m, VIRTIO_BLK_T_IN, u64::MAX / 2);
        let (_, st) = run_chain(
            &m,
            &d,
            &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)],
        );
        assert_eq!(st, VIRTIO_BLK_S_IOERR);
    }

    #[test]
    fn malformed_chains_fail_cleanly() {
        let m = mem();
        let f = disk_file(4096);
        let id = [0; ID_BYTES];
        let d = disk(&f, false, &id);
        // Header too short.
        header(&m, VIRTIO_BLK_T_IN, 0);
        let (_, st) = run_chain(&m, &d, &[(HDR, 8, false), (STATUS, 1, true)]);
        assert_eq!(st, VIRTIO_BLK_S_IOERR);
        // Unaligned data length.
        let (_, st) = run_chain(
            &m,
            &d,
            &[(HDR, 16, false), (DATA, 100, true), (STATUS, 1, true)],
        );
        assert_eq!(st, VIRTIO_BLK_S_IOERR);
        // No writable descriptor at all: nothing written, nothing used.
        m.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
        let (used, st) = run_chain(&m, &d, &[(HDR, 16, false), (DATA, 512, false)]);
        assert_eq!((used, st), (0, 0xee));
        // Data outside guest memory: the request fails, its status says so.
        header(&m, VIRTIO_BLK_T_IN, 0);
        let (used, st) = run_chain(
            &m,
            &d,
            &[
                (HDR, 16, false),
                (0xffff_ffff_0000, 512, true),
                (STATUS, 1, true),
            ],
        );
        assert_eq!((used, st), (1, VIRTIO_BLK_S_IOERR));
    }

    /// Which pages of `m` the device marked dirty (vm-memory's bitmap), at `addr`.
    fn dirty_at(m: &GuestMemoryMmap, addr: u64) -> bool {
        use vm_memory::bitmap::Bitmap;
        use vm_memory::GuestMemoryBackend;
        let region = m.find_region(GuestAddress(addr)).unwrap();
        let mapping: &vm_memory::MmapRegion<vm_memory::bitmap::AtomicBitmap> = region;
        mapping.bitmap().dirty_at(addr as usize)
    }

    #[test]
    fn a_read_marks_the_pages_it_fills_dirty_and_headers_may_be_split() {
        let m = mem();
        let f = disk_file(8192);
        f.write_all_at(&[0x5a; 4096], 4096).unwrap();
        let id = [0; ID_BYTES];
        let d = disk(&f, false, &id);
        header(&m, VIRTIO_BLK_T_IN, 8);
        assert!(!dirty_at(&m, DATA + 4096));
        // The header in two descriptors, the data in two.
        let (used, st) = run_chain(
            &m,
            &d,
            &[
                (HDR, 8, false),
                (HDR + 8, 8, false),
                (DATA, 1024, true),
                (DATA + 4096, 3072, true),
                (STATUS, 1, true),
            ],
        );
        assert_eq!((used, st), (4097, VIRTIO_BLK_S_OK));
        assert!(dirty_at(&m, DATA) && dirty_at(&m, DATA + 4096));
        let mut back = [0u8; 3072];
        m.read_slice(&mut back, GuestAddress(DATA + 4096)).unwrap();
        assert_eq!(back, [0x5a; 3072]);
    }

    #[test]
    fn a_recording_journal_gets_exactly_what_the_image_got() {
        let m = mem();
        let f = disk_file(8192);
        let id = [0; ID_BYTES];
        let journal = crate::virtio::block::WriteJournal::new(8192).unwrap();
        journal.start_recording();
        let d = Disk {
            journal: Some(&journal),
            ..disk(&f, false, &id)
        };
        // Header and the first data bytes share a descriptor.
        header(&m, VIRTIO_BLK_T_OUT, 1);
        m.write_slice(&[7u8; 512], GuestAddress(HDR + 16)).unwrap();
        m.write_slice(&[9u8; 512], GuestAddress(DATA)).unwrap();
        let (used, st) = run_chain(
            &m,
            &d,
            &[
                (HDR, 16 + 512, false),
                (DATA, 512, false),
                (STATUS, 1, true),
            ],
        );
        assert_eq!((used, st), (1, VIRTIO_BLK_S_OK));
        let mut on_disk = [0u8; 1024];
        f.read_exact_at(&mut on_disk, 512).unwrap();
        assert_eq!(&on_disk[..512], &[7u8; 512]);
        assert_eq!(&on_disk[512..], &[9u8; 512]);
        let writes = journal.take().writes;
        assert_eq!(writes.len(), 1);
        assert_eq!((writes[0].offset, &writes[0].data[..]), (512, &on_disk[..]));
    }

    #[test]
    fn unsupported_type_and_get_id() {
        let m = mem();
        let f = disk_file(4096);
        let id = *b"ftvmm-disk-0\0\0\0\0\0\0\0\0";
        let d = disk(&f, false, &id);
        header(&m, 99, 0);
        let (_, st) = run_chain(&m, &d, &[(HDR, 16, false), (STATUS, 1, true)]);
        assert_eq!(st, VIRTIO_BLK_S_UNSUPP);
        header(&m, VIRTIO_BLK_T_GET_ID, 0);
        let (used, st) = run_chain(
            &m,
            &d,
            &[(HDR, 16, false), (DATA, 20, true), (STATUS, 1, true)],
        );
        assert_eq!((used, st), (21, VIRTIO_BLK_S_OK));
        let mut got = [0u8; 20];
        m.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert_eq!(&got, &id);
        header(&m, VIRTIO_BLK_T_FLUSH, 0);
        let (_, st) = run_chain(&m, &d, &[(HDR, 16, false), (STATUS, 1, true)]);
        assert_eq!(st, VIRTIO_BLK_S_OK);
    }

    #[test]
    fn a_request_over_the_limits_fails_and_touches_nothing() {
        let m = mem();
        let f = disk_file(1 << 20);
        let id = [0; ID_BYTES];
        let limited = Disk {
            segments: SegmentLimits {
                count: Some(2),
                size: Some(1024),
            },
            ..disk(&f, false, &id)
        };
        m.write_slice(&[5u8; 4096], GuestAddress(DATA)).unwrap();
        header(&m, VIRTIO_BLK_T_OUT, 0);
        let three = [
            (HDR, 16, false),
            (DATA, 512, false),
            (DATA + 512, 512, false),
            (DATA + 1024, 512, false),
            (STATUS, 1, true),
        ];
        assert_eq!(run_chain(&m, &limited, &three), (1, VIRTIO_BLK_S_IOERR));
        let big = [(HDR, 16, false), (DATA, 2048, false), (STATUS, 1, true)];
        assert_eq!(run_chain(&m, &limited, &big), (1, VIRTIO_BLK_S_IOERR));
        let mut on_disk = [0u8; 2048];
        f.read_exact_at(&mut on_disk, 0).unwrap();
        assert_eq!(on_disk, [0u8; 2048], "a refused write reached the image");
        // Within them, and without them for a driver that did not accept them.
        let two = [
            (HDR, 16, false),
            (DATA, 1024, false),
            (DATA + 1024, 1024, false),
            (STATUS, 1, true),
        ];
        assert_eq!(run_chain(&m, &limited, &two), (1, VIRTIO_BLK_S_OK));
        assert_eq!(
            run_chain(&m, &disk(&f, false, &id), &three),
            (1, VIRTIO_BLK_S_OK)
        );
        // Over MAX_REQUEST_BYTES whatever was negotiated: 14 segments of 32 MiB naming the same
        // guest memory (most of it outside this guest's 4 MiB: refused before any access).
        let mut huge = vec![(HDR, 16, false)];
        huge.extend((0..14).map(|_| (DATA, 32 << 20, false)));
        huge.push((STATUS, 1, true));
        let over = 14 * (32 << 20);
        assert!(over > MAX_REQUEST_BYTES);
        assert_eq!(
            run_chain(&m, &disk(&f, false, &id), &huge),
            (1, VIRTIO_BLK_S_IOERR)
        );
    }

    #[test]
    fn a_recorded_write_is_copied_in_pieces() {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x80_0000)]).unwrap();
        let f = disk_file(4 << 20);
        let id = [0; ID_BYTES];
        let journal = crate::virtio::block::WriteJournal::new(4 << 20).unwrap();
        journal.start_recording();
        let d = Disk {
            journal: Some(&journal),
            ..disk(&f, false, &id)
        };
        let len = PIECE_BYTES * 2 + PIECE_BYTES / 2;
        let data: Vec<u8> = (0..len).map(|i| (i / 4096) as u8).collect();
        m.write_slice(&data, GuestAddress(0x20_0000)).unwrap();
        header(&m, VIRTIO_BLK_T_OUT, 8);
        // Two segments, the first ending in the middle of a piece.
        let split = PIECE_BYTES / 3;
        let chain = [
            (HDR, 16, false),
            (0x20_0000, split as u32, false),
            (0x20_0000 + split as u64, (len - split) as u32, false),
            (0x70_0000, 1, true),
        ];
        let done = execute_chain(&m, &d, &chain);
        assert_eq!((done.used, done.moved), (1, len));
        let writes = journal.take().writes;
        let sizes: Vec<(u64, usize)> = writes.iter().map(|w| (w.offset, w.data.len())).collect();
        let p = PIECE_BYTES as u64;
        assert_eq!(
            sizes,
            [
                (4096, PIECE_BYTES),
                (4096 + p, PIECE_BYTES),
                (4096 + 2 * p, PIECE_BYTES / 2)
            ]
        );
        let recorded: Vec<u8> = writes.into_iter().flat_map(|w| w.data).collect();
        assert!(
            recorded == data,
            "the pieces recorded are not the data written"
        );
        let mut on_disk = vec![0u8; len];
        f.read_exact_at(&mut on_disk, 4096).unwrap();
        assert!(on_disk == data, "the image does not hold the data written");
    }
}
