//! Write-protecting guest memory with userfaultfd (`UFFDIO_REGISTER_MODE_WP`, Linux ≥ 5.7): a write
//! to a protected page, by a vCPU (through KVM's page fault) or by any VMM thread, stops the writer
//! until the page is unprotected, and the fault is reported on the descriptor. This is what lets a
//! checkpoint copy its pages after the vCPUs resumed (`replication/src/protection/copy_on_write.rs`).
//!
//! The ioctls are declared here from `<linux/userfaultfd.h>`: the `userfaultfd` crate generates its
//! bindings with bindgen at build time, which needs libclang on every build host.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::ioctl::ioctl_with_mut_ref;
use vmm_sys_util::{ioctl_ior_nr, ioctl_iowr_nr};

use crate::memory::{GuestMemory, PAGE_SIZE};

const UFFDIO: u32 = 0xAA;
const UFFD_API: u64 = 0xAA;
const UFFD_FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
/// Bit of `uffdio_register.ioctls`: the range supports `UFFDIO_WRITEPROTECT`.
const UFFDIO_WRITEPROTECT_BIT: u64 = 1 << 0x06;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

/// `struct uffd_msg` (packed, 32 bytes): the event, then for a page fault its flags and address.
#[repr(C, packed)]
#[derive(Default, Clone, Copy)]
struct UffdMsg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    flags: u64,
    address: u64,
    ptid: u32,
    pad: u32,
}

ioctl_iowr_nr!(UFFDIO_API_IOCTL, UFFDIO, 0x3F, UffdioApi);
ioctl_iowr_nr!(UFFDIO_REGISTER, UFFDIO, 0x00, UffdioRegister);
ioctl_ior_nr!(UFFDIO_UNREGISTER, UFFDIO, 0x01, UffdioRange);
ioctl_iowr_nr!(UFFDIO_WRITEPROTECT, UFFDIO, 0x06, UffdioWriteprotect);

/// Errors setting up or using write protection.
#[derive(Debug, thiserror::Error)]
pub enum UserfaultError {
    #[error("cannot create a userfaultfd: {0}")]
    Create(io::Error),
    #[error("userfaultfd handshake (UFFDIO_API): {0}")]
    Api(io::Error),
    #[error("this kernel's userfaultfd cannot write-protect anonymous memory (needs Linux 5.7 or later)")]
    NoWriteProtect,
    #[error("cannot register guest memory at {host:#x} (+{len:#x} bytes) for write protection: {source}")]
    Register {
        host: u64,
        len: u64,
        source: io::Error,
    },
    #[error("guest memory at {host:#x} cannot be write-protected (a mapping userfaultfd does not support)")]
    RegionUnsupported { host: u64 },
    #[error("cannot {what} {host:#x} (+{len:#x} bytes): {source}")]
    WriteProtect {
        what: &'static str,
        host: u64,
        len: u64,
        source: io::Error,
    },
    #[error("reading write faults: {0}")]
    Read(io::Error),
}

/// A userfaultfd with all of guest memory registered for write protection. Dropping it unprotects
/// whatever is still protected (so no thread stays stopped) and unregisters the memory.
pub struct WriteProtector {
    fd: OwnedFd,
    /// Host address and length of each registered region.
    ranges: Vec<(u64, u64)>,
}

impl WriteProtector {
    /// Registers every region of `mem`.
    pub fn new(mem: &GuestMemory) -> Result<Self, UserfaultError> {
        let fd = open()?;
        let mut api = UffdioApi {
            api: UFFD_API,
            ..Default::default()
        };
        // SAFETY: UFFDIO_API on our own userfaultfd with a properly sized struct it fills in.
        if unsafe { ioctl_with_mut_ref(&fd, UFFDIO_API_IOCTL(), &mut api) } < 0 {
            return Err(UserfaultError::Api(io::Error::last_os_error()));
        }
        let offered = api.features;
        if offered & UFFD_FEATURE_PAGEFAULT_FLAG_WP == 0 {
            return Err(UserfaultError::NoWriteProtect);
        }
        // The handshake is once per descriptor: ask again, on a new one, for what is wanted.
        let fd = open()?;
        let mut api = UffdioApi {
            api: UFFD_API,
            features: offered & (UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_WP_UNPOPULATED),
            ioctls: 0,
        };
        // SAFETY: as above.
        if unsafe { ioctl_with_mut_ref(&fd, UFFDIO_API_IOCTL(), &mut api) } < 0 {
            return Err(UserfaultError::Api(io::Error::last_os_error()));
        }
        let mut protector = Self {
            fd,
            ranges: Vec::new(),
        };
        for region in mem.iter() {
            let host = region.as_ptr() as u64;
            let len = region.len();
            let mut reg = UffdioRegister {
                range: UffdioRange { start: host, len },
                mode: UFFDIO_REGISTER_MODE_WP,
                ioctls: 0,
            };
            // SAFETY: registers a range of our own guest-memory mapping; the kernel only reads the
            // range and mode and writes `ioctls`.
            if unsafe { ioctl_with_mut_ref(&protector.fd, UFFDIO_REGISTER(), &mut reg) } < 0 {
                return Err(UserfaultError::Register {
                    host,
                    len,
                    source: io::Error::last_os_error(),
                });
            }
            protector.ranges.push((host, len));
            if reg.ioctls & UFFDIO_WRITEPROTECT_BIT == 0 {
                return Err(UserfaultError::RegionUnsupported { host });
            }
        }
        Ok(protector)
    }

    /// Write-protects `[host, host + len)` (page-aligned, inside registered memory).
    pub fn protect(&self, host: u64, len: u64) -> Result<(), UserfaultError> {
        self.write_protect(host, len, true)
    }

    /// Lifts the protection of `[host, host + len)` and wakes the writers stopped there.
    pub fn unprotect(&self, host: u64, len: u64) -> Result<(), UserfaultError> {
        self.write_protect(host, len, false)
    }

    fn write_protect(&self, host: u64, len: u64, protect: bool) -> Result<(), UserfaultError> {
        let mut wp = UffdioWriteprotect {
            range: UffdioRange { start: host, len },
            mode: if protect {
                UFFDIO_WRITEPROTECT_MODE_WP
            } else {
                0
            },
        };
        // SAFETY: changes the write permission of a range of our own registered mapping; the
        // kernel checks that the range is registered.
        if unsafe { ioctl_with_mut_ref(&self.fd, UFFDIO_WRITEPROTECT(), &mut wp) } < 0 {
            return Err(UserfaultError::WriteProtect {
                what: if protect {
                    "write-protect"
                } else {
                    "unprotect"
                },
                host,
                len,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Waits up to `timeout` for a write fault to read; whether one is there.
    pub fn wait_for_faults(&self, timeout: std::time::Duration) -> Result<bool, UserfaultError> {
        let mut poll = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: polls one descriptor we own through a pollfd we own, for the call's duration.
        let n = unsafe { libc::poll(&mut poll, 1, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::Interrupted => Ok(false),
                _ => Err(UserfaultError::Read(e)),
            };
        }
        Ok(n > 0 && poll.revents & libc::POLLIN != 0)
    }

    /// The host addresses (page-aligned) of the write faults waiting now, without blocking; at most
    /// `out`'s capacity is added.
    pub fn pending_faults(&self, out: &mut Vec<u64>) -> Result<(), UserfaultError> {
        let mut msgs = [UffdMsg::default(); 16];
        let room = (out.capacity() - out.len()).clamp(1, msgs.len());
        // SAFETY: reads whole messages into a buffer of `room` of them that we own; the descriptor
        // is non-blocking.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                msgs.as_mut_ptr().cast(),
                room * std::mem::size_of::<UffdMsg>(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(()),
                _ => Err(UserfaultError::Read(e)),
            };
        }
        for msg in &msgs[..n as usize / std::mem::size_of::<UffdMsg>()] {
            let (event, flags, address) = (msg.event, msg.flags, msg.address);
            if event == UFFD_EVENT_PAGEFAULT && flags & UFFD_PAGEFAULT_FLAG_WP != 0 {
                out.push(address & !(PAGE_SIZE as u64 - 1));
            }
        }
        Ok(())
    }
}

impl Drop for WriteProtector {
    fn drop(&mut self) {
        for &(host, len) in &self.ranges {
            if let Err(e) = self.unprotect(host, len) {
                tracing::error!("{e}");
            }
            let mut range = UffdioRange { start: host, len };
            // SAFETY: unregisters a range this descriptor registered.
            unsafe { ioctl_with_mut_ref(&self.fd, UFFDIO_UNREGISTER(), &mut range) };
        }
    }
}

/// A new non-blocking userfaultfd.
fn open() -> Result<OwnedFd, UserfaultError> {
    // SAFETY: the userfaultfd system call takes only flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        return Err(UserfaultError::Create(io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned to us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn the_message_layout_matches_the_kernels() {
        assert_eq!(std::mem::size_of::<UffdMsg>(), 32);
        assert_eq!(UFFDIO_WRITEPROTECT(), 0xc018_aa06);
        assert_eq!(UFFDIO_REGISTER(), 0xc020_aa00);
        assert_eq!(UFFDIO_API_IOCTL(), 0xc018_aa3f);
    }

    /// Guest memory whose (populated) page at `gpa` is write-protected: the memory, the protector,
    /// and the page's host address.
    fn protected_page(gpa: u64) -> (GuestMemory, WriteProtector, u64) {
        let mem = crate::memory::create_guest_memory(16).unwrap();
        mem.write_obj(1u64, GuestAddress(gpa)).unwrap();
        let wp = WriteProtector::new(&mem).unwrap();
        let host = mem.get_host_address(GuestAddress(gpa)).unwrap() as u64;
        wp.protect(host, PAGE_SIZE as u64).unwrap();
        (mem, wp, host)
    }

    /// A write to a protected page waits, is reported as a fault at that page, and goes through once
    /// the page is unprotected.
    #[test]
    fn a_write_to_a_protected_page_waits_until_it_is_unprotected() {
        let (mem, wp, host) = protected_page(0x3000);
        let written = Arc::new(AtomicBool::new(false));
        let writer = {
            let (mem, written) = (mem.clone(), written.clone());
            std::thread::spawn(move || {
                mem.write_obj(2u64, GuestAddress(0x3008)).unwrap();
                written.store(true, Ordering::SeqCst);
            })
        };
        let mut faults = Vec::with_capacity(16);
        let t0 = std::time::Instant::now();
        while faults.is_empty() {
            assert!(t0.elapsed().as_secs() < 10, "no write fault reported");
            wp.pending_faults(&mut faults).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(faults, vec![host]);
        assert!(
            !written.load(Ordering::SeqCst),
            "the write went through a protected page"
        );
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x3008)).unwrap(), 0);
        wp.unprotect(host, PAGE_SIZE as u64).unwrap();
        writer.join().unwrap();
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x3008)).unwrap(), 2);
    }

    /// Dropping the protector lets a stopped writer through.
    #[test]
    fn dropping_the_protector_releases_stopped_writers() {
        let (mem, wp, _) = protected_page(0x5000);
        let writer = {
            let mem = mem.clone();
            std::thread::spawn(move || mem.write_obj(3u64, GuestAddress(0x5000)).unwrap())
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        drop(wp);
        writer.join().unwrap();
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x5000)).unwrap(), 3);
    }
}
