//! `mode=blk`: checks the first virtio-blk disk with the pattern of `testguest::pattern`.
//!
//! * `blk=write` (default): writes the pattern of `seed=N` (default 1) over the whole disk,
//!   flushes, reads everything back and verifies it: `testguest: blk ok bytes=N` or
//!   `testguest: blk FAIL <reason>`.
//! * `blk=verify`: only reads and verifies (a disk written before with the same seed):
//!   `testguest: blk verify ok bytes=N` / `testguest: blk verify FAIL <reason>`.
//! * `blk=readonly-check`: tries to overwrite sector 0; passes if the device refuses with an
//!   I/O error and the sector is unchanged: `testguest: blk readonly ok` /
//!   `testguest: blk readonly FAIL <why>`.
//! * `blk=huge-write`: a hostile guest's request, through a hand-driven queue that negotiates no
//!   segment limits: after `wait_ms=` (default 0) ms, every `every_ms=` (default 1000) ms, `times=` (default 30) times, one write of
//!   `huge_mib=` (default 1024) MiB at sector 0 whose 254 data segments all name one buffer of
//!   `huge_mib` / 254 (so the guest needs only that much memory); each prints
//!   `testguest: blk huge-write status=S bytes=N` (0 done, 1 I/O error), then
//!   `testguest: blk huge-write ok`.
//!
//! `chunk=BYTES` sets the request size (default 512 KiB). Before the result, a line
//! `testguest: blk device ...` describes the disk and `testguest: blk stats ...` the timings.

use super::Mode;
use crate::arch::{cpu, time};
use crate::cmdline::Cmdline;
use crate::println;
use crate::virtio::blk::{DEFAULT_MAX_REQUEST, Disk};
use alloc::format;
use alloc::string::String;
use alloc::vec;
use testguest::blockdev::{BlockDev, SECTOR_SIZE};
use testguest::pattern;

pub const MODE: Mode = Mode {
    name: "blk",
    about: "pattern-write and verify the first virtio-blk disk (blk=write|verify|readonly-check|huge-write, seed=N, chunk=BYTES)",
    run,
};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Action {
    Write,
    Verify,
    ReadonlyCheck,
}

impl Action {
    /// The marker prefix after `testguest: `.
    fn prefix(self) -> &'static str {
        match self {
            Action::Write => "blk",
            Action::Verify => "blk verify",
            Action::ReadonlyCheck => "blk readonly",
        }
    }
}

fn run(cmdline: &Cmdline<'_>) {
    let action = match cmdline.get("blk").unwrap_or("write") {
        "write" | "" => Action::Write,
        "verify" => Action::Verify,
        "readonly-check" => Action::ReadonlyCheck,
        "huge-write" => {
            match huge_write(cmdline) {
                Ok(()) => println!("testguest: blk huge-write ok"),
                Err(why) => println!("testguest: blk huge-write FAIL {}", why),
            }
            return;
        }
        other => {
            println!(
                "testguest: blk FAIL unknown blk={} (write, verify, readonly-check, huge-write)",
                other
            );
            return;
        }
    };
    let mut disk = None;
    let result = check(cmdline, action, &mut disk);
    match result {
        Ok(msg) => println!("testguest: {} ok{}", action.prefix(), msg),
        Err(why) => println!("testguest: {} FAIL {}", action.prefix(), why),
    }
    // The device is released (queue stopped, reset) only after the verdict is printed.
    drop(disk);
}

fn number(cmdline: &Cmdline<'_>, key: &str, default: u64) -> Result<u64, String> {
    match cmdline.get_u64(key) {
        None => Ok(default),
        Some(Ok(v)) => Ok(v),
        Some(Err(_)) => Err(format!("bad {key}= value")),
    }
}

/// Runs `action`; Ok holds what follows "ok" in the marker.
/// `slot` receives the disk once it is open (so that the caller drops it after printing).
fn check(cmdline: &Cmdline<'_>, action: Action, slot: &mut Option<Disk>) -> Result<String, String> {
    let seed = number(cmdline, "seed", 1)?;
    let chunk = number(cmdline, "chunk", DEFAULT_MAX_REQUEST as u64)?;
    let chunk = usize::try_from(chunk)
        .ok()
        .filter(|&c| (SECTOR_SIZE..=16 << 20).contains(&c))
        .ok_or("chunk= must be 512 bytes to 16 MiB")?;
    let disk = slot.insert(Disk::open_first()?);
    disk.set_max_request(chunk);
    let id = disk
        .device_id()
        .unwrap_or_else(|e| format!("<get-id failed: {e}>"));
    println!(
        "testguest: blk device slot={} bytes={} ro={} id=\"{}\" chunk={} seed={}",
        disk.slot.index,
        disk.bytes(),
        u8::from(disk.readonly()),
        id,
        disk.max_request(),
        seed
    );
    // Calibrate the TSC now, not inside the first timing.
    time::tsc_hz();
    match action {
        Action::ReadonlyCheck => readonly_check(disk).map(|()| String::new()),
        Action::Write => {
            let t = cpu::rdtsc();
            write_pattern(disk, seed)?;
            let write_ms = ms_since(t);
            let t = cpu::rdtsc();
            verify_pattern(disk, seed)?;
            let read_ms = ms_since(t);
            println!(
                "testguest: blk stats write_ms={} read_ms={} bytes={}",
                write_ms,
                read_ms,
                disk.bytes()
            );
            Ok(format!(" bytes={}", disk.bytes()))
        }
        Action::Verify => {
            let t = cpu::rdtsc();
            verify_pattern(disk, seed)?;
            println!(
                "testguest: blk stats read_ms={} bytes={}",
                ms_since(t),
                disk.bytes()
            );
            Ok(format!(" bytes={}", disk.bytes()))
        }
    }
}

/// `blk=huge-write` (module docs).
fn huge_write(cmdline: &Cmdline<'_>) -> Result<(), String> {
    use crate::virtio::raw_blk::RawBlk;
    let mib = number(cmdline, "huge_mib", 1024)?;
    let every_ms = number(cmdline, "every_ms", 1000)?;
    let times = number(cmdline, "times", 30)?;
    let wait_ms = number(cmdline, "wait_ms", 0)?;
    let segments = RawBlk::MAX_SEGMENTS;
    let per_segment = usize::try_from((mib << 20).div_ceil(segments as u64))
        .map_err(|_| "huge_mib= too large")?
        .next_multiple_of(SECTOR_SIZE);
    let slot = crate::virtio::probe::find(crate::virtio::probe::DEVICE_BLOCK)
        .ok_or("no virtio-blk device")?;
    let mut disk = RawBlk::open(&slot)?;
    let buffer = vec![0x5au8; per_segment];
    time::delay_us(wait_ms * 1000);
    for _ in 0..times {
        let status = disk.write_repeated(0, &buffer, segments)?;
        println!(
            "testguest: blk huge-write status={} bytes={}",
            status,
            per_segment * segments
        );
        time::delay_us(every_ms * 1000);
    }
    Ok(())
}

fn ms_since(tsc: u64) -> u64 {
    let hz = time::tsc_hz().0.max(1);
    cpu::rdtsc().wrapping_sub(tsc) / (hz / 1000).max(1)
}

/// `(first sector, sector count)` of each request-sized piece of the disk.
fn chunks(disk: &Disk) -> impl Iterator<Item = (u64, usize)> + use<> {
    let total = disk.sectors();
    let per = (disk.max_request() / SECTOR_SIZE) as u64;
    (0..total.div_ceil(per)).map(move |i| {
        let s = i * per;
        (s, per.min(total - s) as usize)
    })
}

fn write_pattern(disk: &mut Disk, seed: u64) -> Result<(), String> {
    let mut buf = vec![0u8; disk.max_request()];
    for (s, n) in chunks(disk) {
        let b = &mut buf[..n * SECTOR_SIZE];
        pattern::fill(seed, s, b);
        disk.write(s, b)
            .map_err(|e| format!("write of sectors {}..{}: {e}", s, s + n as u64))?;
    }
    disk.flush().map_err(|e| format!("flush: {e}"))
}

fn verify_pattern(disk: &mut Disk, seed: u64) -> Result<(), String> {
    let mut buf = vec![0u8; disk.max_request()];
    for (s, n) in chunks(disk) {
        let b = &mut buf[..n * SECTOR_SIZE];
        disk.read(s, b)
            .map_err(|e| format!("read of sectors {}..{}: {e}", s, s + n as u64))?;
        pattern::check(seed, s, b).map_err(|m| {
            format!(
                "mismatch sector={} offset={} expected={:#018x} found={:#018x}",
                m.sector, m.offset, m.expected, m.found
            )
        })?;
    }
    Ok(())
}

/// Tries to overwrite sector 0 with its complement; the device must refuse with an I/O error
/// and leave the sector as it was (it is restored if the write went through).
fn readonly_check(disk: &mut Disk) -> Result<(), String> {
    let mut orig = vec![0u8; SECTOR_SIZE];
    disk.read(0, &mut orig)
        .map_err(|e| format!("read of sector 0: {e}"))?;
    let flipped: alloc::vec::Vec<u8> = orig.iter().map(|b| !b).collect();
    let result = disk.write(0, &flipped);
    let mut now = vec![0u8; SECTOR_SIZE];
    disk.read(0, &mut now)
        .map_err(|e| format!("read back of sector 0: {e}"))?;
    let ro = disk.readonly();
    match result {
        Err(virtio_drivers::Error::IoError) if now == orig => Ok(()),
        Err(virtio_drivers::Error::IoError) => Err(format!(
            "write refused with an I/O error but sector 0 changed (ro feature={})",
            u8::from(ro)
        )),
        Err(e) => Err(format!(
            "write refused with {e}, not an I/O error (ro feature={})",
            u8::from(ro)
        )),
        Ok(()) => {
            // Put the sector back.
            let _ = disk.write(0, &orig).and_then(|()| disk.flush());
            Err(format!(
                "write accepted (ro feature={}, sector 0 {})",
                u8::from(ro),
                if now == orig {
                    "unchanged"
                } else {
                    "changed, restored"
                }
            ))
        }
    }
}
