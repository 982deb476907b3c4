//! Re-injection of duplicated packets. NFQUEUE cannot emit a packet twice, so a copy of the queued
//! IPv4 packet is sent through a raw socket (`IPPROTO_RAW`: the header is ours, as queued). The
//! socket marks what it sends with [`DUPLICATE_MARK`], which the rules skip, so the copy is not
//! queued and impaired again.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::AsRawFd;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::rules::DUPLICATE_MARK;

/// The raw socket's send buffer.
const SEND_BUFFER: libc::c_int = 16 << 20;

/// Sets the send buffer beyond `wmem_max` (we are root), or as large as allowed otherwise.
fn set_send_buffer_force(socket: &Socket, bytes: libc::c_int) {
    // SAFETY: setsockopt reads one c_int from `bytes`, a live local of the given size, for a
    // socket we own.
    let ret = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUFFORCE,
            (&bytes as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if ret != 0 {
        let _ = socket.set_send_buffer_size(bytes as usize);
    }
}

/// A raw socket that sends complete IPv4 packets.
pub struct Injector {
    socket: Socket,
}

impl Injector {
    /// Opens the raw socket (needs CAP_NET_RAW) in the current network namespace.
    pub fn open() -> io::Result<Self> {
        let socket = Socket::new(
            Domain::IPV4,
            Type::RAW,
            Some(Protocol::from(libc::IPPROTO_RAW)),
        )?;
        socket.set_mark(DUPLICATE_MARK)?;
        // Room for a burst of released packets: a sender blocked here stalls every release.
        set_send_buffer_force(&socket, SEND_BUFFER);
        Ok(Self { socket })
    }

    /// Sends a copy of `packet`, a whole IPv4 packet with valid checksums, to its destination.
    pub fn send_copy(&self, packet: &[u8]) -> io::Result<()> {
        let destination = ipv4_destination(packet)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "not an IPv4 packet"))?;
        let addr = SockAddr::from(SocketAddrV4::new(destination, 0));
        self.socket.send_to(packet, &addr)?;
        Ok(())
    }
}

/// The destination address of an IPv4 packet, if `packet` starts with an IPv4 header.
fn ipv4_destination(packet: &[u8]) -> Option<Ipv4Addr> {
    if packet.len() < 20 || packet[0] >> 4 != 4 {
        return None;
    }
    Some(Ipv4Addr::new(
        packet[16], packet[17], packet[18], packet[19],
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destination_is_read_from_the_ipv4_header() {
        let mut header = [0u8; 20];
        header[0] = 0x45;
        header[16..20].copy_from_slice(&[10, 99, 3, 2]);
        assert_eq!(ipv4_destination(&header), Some(Ipv4Addr::new(10, 99, 3, 2)));
    }

    #[test]
    fn non_ipv4_is_refused() {
        let mut header = [0u8; 40];
        header[0] = 0x60;
        assert_eq!(ipv4_destination(&header), None);
        assert_eq!(ipv4_destination(&[0x45; 10]), None);
    }
}
