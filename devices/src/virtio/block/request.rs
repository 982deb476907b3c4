//! One virtio-blk request: parse the descriptor chain, check it against the disk, execute it.
//!
//! Everything here is driven by guest-controlled data. A malformed chain fails that request with
//! `VIRTIO_BLK_S_IOERR` (when there is somewhere to put a status) and never touches memory outside
//! guest RAM: all access goes through virtio-queue's `Reader`/`Writer`, which only hand out slices
//! of guest memory that the descriptors name and that exist.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;

use virtio_queue::{Reader, Writer};
use vm_memory::bitmap::BitmapSlice;

/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
/// Length of the device ID returned by GET_ID.
pub const ID_BYTES: usize = 20;

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
}

/// Executes the request in `reader` (driver-to-device part) / `writer` (device-to-driver part), writes
/// the status byte, and returns the number of bytes written to guest memory (the used length).
pub fn execute<B: BitmapSlice>(
    disk: &Disk,
    mut reader: Reader<'_, B>,
    mut writer: Writer<'_, B>,
) -> u32 {
    let writable = writer.available_bytes();
    if writable == 0 {
        tracing::debug!("virtio-blk: {}", RequestError::NoStatus);
        return 0;
    }
    let mut status_writer = match writer.split_at(writable - 1) {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!("virtio-blk: cannot split writable descriptors: {e}");
            return 0;
        }
    };
    let status = match run(disk, &mut reader, &mut writer) {
        Ok(()) => VIRTIO_BLK_S_OK,
        Err(e) => {
            tracing::debug!("virtio-blk request failed: {e}");
            e.status()
        }
    };
    if let Err(e) = status_writer.write_all(&[status]) {
        tracing::debug!("virtio-blk: cannot write status: {e}");
    }
    (writer.bytes_written() + status_writer.bytes_written()) as u32
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

/// Largest chunk moved through a bounce buffer at once.
const CHUNK: usize = 128 * 1024;

fn run<B: BitmapSlice>(
    disk: &Disk,
    reader: &mut Reader<'_, B>,
    writer: &mut Writer<'_, B>,
) -> Result<(), RequestError> {
    if reader.available_bytes() < std::mem::size_of::<RequestHeader>() {
        return Err(RequestError::ShortHeader(reader.available_bytes()));
    }
    let header: RequestHeader = reader
        .read_obj()
        .map_err(|e| RequestError::Memory(e.to_string()))?;
    match header.request_type {
        VIRTIO_BLK_T_IN => {
            let len = writer.available_bytes();
            let mut offset = check_range(disk, header.sector, len)?;
            let mut buf = vec![0u8; len.min(CHUNK)];
            let mut left = len;
            while left > 0 {
                let n = left.min(CHUNK);
                disk.file
                    .read_exact_at(&mut buf[..n], offset)
                    .map_err(|e| RequestError::Io(e.to_string()))?;
                writer
                    .write_all(&buf[..n])
                    .map_err(|e| RequestError::Memory(e.to_string()))?;
                offset += n as u64;
                left -= n;
            }
            Ok(())
        }
        VIRTIO_BLK_T_OUT => {
            if disk.read_only {
                return Err(RequestError::ReadOnly);
            }
            let len = reader.available_bytes();
            let mut offset = check_range(disk, header.sector, len)?;
            let mut buf = vec![0u8; len.min(CHUNK)];
            let mut left = len;
            while left > 0 {
                let n = left.min(CHUNK);
                reader
                    .read_exact(&mut buf[..n])
                    .map_err(|e| RequestError::Memory(e.to_string()))?;
                disk.file
                    .write_all_at(&buf[..n], offset)
                    .map_err(|e| RequestError::Io(e.to_string()))?;
                if let Some(journal) = disk.journal {
                    journal.record(offset, &buf[..n]);
                }
                offset += n as u64;
                left -= n;
            }
            Ok(())
        }
        VIRTIO_BLK_T_FLUSH => {
            if disk.read_only {
                return Ok(());
            }
            disk.file
                .sync_data()
                .map_err(|e| RequestError::Io(e.to_string()))
        }
        VIRTIO_BLK_T_GET_ID => {
            let n = writer.available_bytes().min(ID_BYTES);
            writer
                .write_all(&disk.id[..n])
                .map_err(|e| RequestError::Memory(e.to_string()))
        }
        other => Err(RequestError::Unsupported(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::GuestMemoryMmap;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{QueueOwnedT, QueueT};
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
        let reader = chain.clone().reader(mem).unwrap();
        let writer = chain.writer(mem).unwrap();
        let used = execute(disk, reader, writer);
        let status = mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap_or(0xee);
        let _ = queue.next_avail();
        (used, status)
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
        // Descriptor pointing outside guest memory: the chain is refused before execution.
        let q = MockSplitQueue::new(&m, 16);
        q.build_desc_chain(&[
            RawDescriptor::from(SplitDescriptor::new(HDR, 16, 0, 0)),
            RawDescriptor::from(SplitDescriptor::new(
                0xffff_ffff_0000,
                512,
                VRING_DESC_F_WRITE as u16,
                0,
            )),
        ])
        .unwrap();
        let mut queue: virtio_queue::Queue = q.create_queue().unwrap();
        let chain = queue.iter(&m).unwrap().next().unwrap();
        assert!(chain.writer(&m).is_err());
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
}
