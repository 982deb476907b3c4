//! TAP network devices (`/dev/net/tun`), opened by name: an existing TAP is attached, a missing one
//! is created (and disappears when ftvmm exits).
//!
//! The TAP is opened with `IFF_VNET_HDR` and a header size of [`NET_HDR_LEN`]: every frame read or
//! written starts with a `virtio_net_hdr_v1`, the very header the guest's driver uses, so checksum and
//! segmentation offloads pass between the guest and the host's network stack untouched. What the TAP
//! may hand over unfinished (partial checksums, TSO segments) is [`Tap::set_offload`]'s, set from what
//! the guest negotiated.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::device::NET_HDR_LEN;
use crate::output_gate::OutputSink;

const IFNAMSIZ: usize = 16;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
/// `TUNSETOFFLOAD` flags: the TAP may deliver frames with a partial checksum, TCP segments of IPv4
/// and of IPv6 larger than the MTU.
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;

#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Errors opening a TAP.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("invalid TAP name {0:?}: 1 to 15 characters, no '/' or whitespace")]
    Name(String),
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(io::Error),
    #[error("cannot attach to TAP device {name}: {source} (does it exist as a TAP, and may this user use it?)")]
    Attach { name: String, source: io::Error },
    #[error("TAP device {name}: cannot set the virtio-net header size: {source}")]
    VnetHeader { name: String, source: io::Error },
}

/// An open TAP device, non-blocking.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to (or creates) the TAP device `name`.
    pub fn open(name: &str) -> Result<Self, TapError> {
        if name.is_empty()
            || name.len() >= IFNAMSIZ
            || name.contains('/')
            || name.chars().any(char::is_whitespace)
        {
            return Err(TapError::Name(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut req = IfReq {
            name: [0; IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `IfReq` lays out (name, flags,
        // padding to its full size); `req` lives across the call and `file` is an open tun fd.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req) };
        if ret < 0 {
            return Err(TapError::Attach {
                name: name.to_string(),
                source: io::Error::last_os_error(),
            });
        }
        let size = NET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads an int from the pointer, which lives across the call.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ as _, &size) } < 0 {
            return Err(TapError::VnetHeader {
                name: name.to_string(),
                source: io::Error::last_os_error(),
            });
        }
        let tap = Self {
            file,
            name: name.to_string(),
        };
        // A TAP attached again keeps its last offloads: none until a guest negotiates them.
        tap.set_offload(0).map_err(|source| TapError::VnetHeader {
            name: name.to_string(),
            source,
        })?;
        Ok(tap)
    }

    /// What the TAP may deliver unfinished (`TUN_F_*`): only what the guest's driver accepted.
    pub fn set_offload(&self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its flags by value; `file` is an open TAP.
        if unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                TUNSETOFFLOAD as _,
                flags as libc::c_ulong,
            )
        } < 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame with its header; `WouldBlock` when none is waiting.
    pub fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl OutputSink for Tap {
    /// Writes one frame, which starts with its header.
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        match self.file.write(frame) {
            Ok(n) if n == frame.len() => Ok(()),
            Ok(n) => Err(io::Error::other(format!(
                "short TAP write: {n} of {} bytes",
                frame.len()
            ))),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_names_before_touching_the_system() {
        for bad in ["", "a/b", "has space", "sixteen-chars-xx"] {
            assert!(matches!(Tap::open(bad), Err(TapError::Name(_))), "{bad:?}");
        }
    }
}
