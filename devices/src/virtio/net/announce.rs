//! Announcing a guest's MAC address after it moved hosts, so bridges and switches learn its new
//! port at once: a RARP request broadcast from the guest's MAC, as QEMU's announce-self sends.

use super::device::MacAddr;

const ETH_P_RARP: u16 = 0x8035;
const ARP_HTYPE_ETHERNET: u16 = 1;
const ETH_P_IP: u16 = 0x0800;
const RARP_REQUEST_REVERSE: u16 = 3;
/// Minimum Ethernet frame (without FCS).
pub const FRAME_LEN: usize = 60;

/// The RARP "request reverse" broadcast from `mac`.
pub fn rarp_frame(mac: MacAddr) -> [u8; FRAME_LEN] {
    let mut f = [0u8; FRAME_LEN];
    f[..6].fill(0xff);
    f[6..12].copy_from_slice(&mac.0);
    f[12..14].copy_from_slice(&ETH_P_RARP.to_be_bytes());
    f[14..16].copy_from_slice(&ARP_HTYPE_ETHERNET.to_be_bytes());
    f[16..18].copy_from_slice(&ETH_P_IP.to_be_bytes());
    f[18] = 6; // hardware address length
    f[19] = 4; // protocol address length
    f[20..22].copy_from_slice(&RARP_REQUEST_REVERSE.to_be_bytes());
    f[22..28].copy_from_slice(&mac.0); // sender hardware address
                                       // sender protocol address 0.0.0.0
    f[32..38].copy_from_slice(&mac.0); // target hardware address
                                       // target protocol address 0.0.0.0, then padding
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_is_a_broadcast_rarp_from_the_mac() {
        let mac = MacAddr([0x52, 0x54, 0, 1, 2, 3]);
        let f = rarp_frame(mac);
        assert_eq!(&f[..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &mac.0);
        assert_eq!(&f[12..14], &[0x80, 0x35]);
        assert_eq!(&f[20..22], &[0, 3]);
        assert_eq!(&f[22..28], &mac.0);
        assert_eq!(&f[32..38], &mac.0);
    }
}
