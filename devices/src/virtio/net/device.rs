//! The virtio-net device: configuration (MAC, link status), features, activation.

use std::fmt;

use super::tap::{Tap, TapError, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6};
use crate::output_gate::{OutputGate, PassThroughGate};
use crate::persist::VirtioDeviceState;
use crate::virtio::device_queues::DeviceQueues;
use crate::virtio::{
    read_config_bytes, ActivateContext, ActivateError, VirtioDevice, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};

/// virtio device ID of a network card.
pub const VIRTIO_ID_NET: u32 = 1;
/// The driver may send frames with a partial checksum (it gives where to finish it).
const VIRTIO_NET_F_CSUM: u64 = 1 << 0;
/// The driver accepts frames with a partial checksum.
pub const VIRTIO_NET_F_GUEST_CSUM: u64 = 1 << 1;
/// The driver accepts TCP segments larger than the MTU (IPv4, IPv6).
const VIRTIO_NET_F_GUEST_TSO4: u64 = 1 << 7;
const VIRTIO_NET_F_GUEST_TSO6: u64 = 1 << 8;
/// The driver may send TCP segments larger than the MTU (IPv4, IPv6).
const VIRTIO_NET_F_HOST_TSO4: u64 = 1 << 11;
const VIRTIO_NET_F_HOST_TSO6: u64 = 1 << 12;
const VIRTIO_NET_F_MAC: u64 = 1 << 5;
const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
const VIRTIO_NET_S_LINK_UP: u16 = 1;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Size of `struct virtio_net_hdr_v1` (virtio 1.x always includes `num_buffers`): the header on
/// every frame, between the guest and the device and between the device and the TAP (`tap.rs`).
pub const NET_HDR_LEN: usize = 12;
/// Largest frame accepted from either side: a 64 KiB TCP segment (TSO) with its Ethernet and VLAN
/// headers.
pub const MAX_FRAME_LEN: usize = 65_550;

/// An Ethernet MAC address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MacAddr(pub [u8; 6]);

impl std::str::FromStr for MacAddr {
    type Err = NetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || NetError::Mac(s.to_string());
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(bad());
        }
        let mut mac = [0u8; 6];
        for (b, p) in mac.iter_mut().zip(parts) {
            if p.len() != 2 {
                return Err(bad());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if mac[0] & 1 != 0 {
            return Err(bad()); // multicast addresses cannot be a NIC's
        }
        Ok(Self(mac))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// A `--net` argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    pub tap: String,
    pub mac: Option<MacAddr>,
}

impl NetConfig {
    /// The MAC the guest gets: the configured one, or a locally administered default per index.
    pub fn mac_or_default(&self, index: usize) -> MacAddr {
        self.mac
            .unwrap_or(MacAddr([0x52, 0x54, 0x00, 0xf7, 0x00, index as u8]))
    }
}

/// Errors creating a network device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("invalid --net value {0:?}: expected tap=NAME[,mac=MAC]")]
    Parse(String),
    #[error("invalid MAC address {0:?}: expected six hex bytes like 52:54:00:12:34:56 (unicast)")]
    Mac(String),
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("cannot create an eventfd for network device {tap}: {source}")]
    EventFd { tap: String, source: std::io::Error },
}

impl std::str::FromStr for NetConfig {
    type Err = NetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut tap = None;
        let mut mac = None;
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("tap", t)) if !t.is_empty() => tap = Some(t.to_string()),
                Some(("mac", m)) => mac = Some(m.parse()?),
                _ => return Err(NetError::Parse(s.to_string())),
            }
        }
        Ok(Self {
            tap: tap.ok_or_else(|| NetError::Parse(s.to_string()))?,
            mac,
        })
    }
}

/// Index of the receive queue.
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue.
pub const TX_QUEUE: usize = 1;

/// Frame counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetCounters {
    pub rx_frames: u64,
    pub rx_dropped: u64,
    pub tx_frames: u64,
    pub tx_dropped: u64,
    /// Times transmit paused because the output gate held its byte cap (resumed on release).
    pub tx_paused: u64,
}

/// A virtio-net device on a TAP.
pub struct VirtioNet {
    pub(super) tap: Tap,
    pub(super) mac: MacAddr,
    pub(super) acked_features: u64,
    config: [u8; 8],
    /// Activation, the receive and transmit queues and their notifications on the event loop.
    pub(super) queues: DeviceQueues,
    pub(super) gate: Box<dyn OutputGate>,
    /// A frame read from the TAP that found no receive buffer yet: `(buffer, length)`.
    pub(super) rx_pending: Option<usize>,
    pub(super) rx_buf: Vec<u8>,
    pub(super) tx_buf: Vec<u8>,
    pub(super) tap_watched: bool,
    pub counters: NetCounters,
}

impl VirtioNet {
    /// Opens the TAP named by `config`; transmit goes through a pass-through gate.
    pub fn new(config: &NetConfig, index: usize) -> Result<Self, NetError> {
        let tap = Tap::open(&config.tap)?;
        let mac = config.mac_or_default(index);
        let mut cfg = [0u8; 8];
        cfg[..6].copy_from_slice(&mac.0);
        cfg[6..].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
        let queues =
            DeviceQueues::new(format!("virtio-net {}", config.tap), 2).map_err(|source| {
                NetError::EventFd {
                    tap: config.tap.clone(),
                    source,
                }
            })?;
        Ok(Self {
            tap,
            mac,
            acked_features: 0,
            config: cfg,
            queues,
            gate: Box::new(PassThroughGate::new()),
            rx_pending: None,
            rx_buf: vec![0u8; NET_HDR_LEN + MAX_FRAME_LEN],
            tx_buf: vec![0u8; NET_HDR_LEN + MAX_FRAME_LEN],
            tap_watched: false,
            counters: NetCounters::default(),
        })
    }

    /// Replaces the transmit gate (replication installs an epoch-holding gate). Whatever the old
    /// gate still held is released first.
    pub fn set_output_gate(&mut self, gate: Box<dyn OutputGate>) {
        if let Err(e) = self.gate.release_through(u64::MAX, &mut self.tap) {
            tracing::warn!("virtio-net {}: releasing held output: {e}", self.tap.name());
        }
        self.gate = gate;
        // Transmit may have been paused by the old gate's cap.
        self.process_tx();
    }

    /// Transmitted frames from now on belong to `epoch`.
    pub fn begin_output_epoch(&mut self, epoch: u64) {
        self.gate.begin_epoch(epoch);
    }

    /// Frames and bytes the output gate holds now.
    pub fn held_output(&self) -> (usize, usize) {
        (self.gate.held(), self.gate.held_bytes())
    }

    /// Sends the frames held for epochs up to `epoch` (their checkpoint is committed) while
    /// `permitted` says so, frame by frame, then resumes transmit if the gate's cap had paused it.
    pub fn release_output(&mut self, epoch: u64, permitted: &dyn Fn() -> bool) -> usize {
        let released = match self
            .gate
            .release_through_while(epoch, &mut self.tap, permitted)
        {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("virtio-net {}: releasing output: {e}", self.tap.name());
                0
            }
        };
        if released > 0 {
            self.process_tx();
        }
        released
    }

    /// Broadcasts the guest's MAC (RARP, three times) so the network learns where it is now.
    /// VMM-generated, so it bypasses the output gate.
    pub fn announce(&mut self) {
        use crate::output_gate::OutputSink;
        // A whole frame: an all-zero header.
        let mut frame = [0u8; NET_HDR_LEN + super::announce::FRAME_LEN];
        frame[NET_HDR_LEN..].copy_from_slice(&super::announce::rarp_frame(self.mac));
        for _ in 0..3 {
            if let Err(e) = self.tap.send(&frame) {
                tracing::warn!(
                    "virtio-net {}: cannot announce {}: {e}",
                    self.tap.name(),
                    self.mac
                );
                return;
            }
        }
        tracing::info!("announced {} on {}", self.mac, self.tap.name());
    }

    /// The guest's MAC.
    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    /// The TAP's name.
    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }
}

impl VirtioDevice for VirtioNet {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
            | VIRTIO_NET_F_MAC
            | VIRTIO_NET_F_STATUS
            | VIRTIO_NET_F_CSUM
            | VIRTIO_NET_F_GUEST_CSUM
            | VIRTIO_NET_F_GUEST_TSO4
            | VIRTIO_NET_F_GUEST_TSO6
            | VIRTIO_NET_F_HOST_TSO4
            | VIRTIO_NET_F_HOST_TSO6
            | VIRTIO_RING_F_EVENT_IDX
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!("virtio-net: ignored config write at {offset:#x}");
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        // The TAP may hand over what the driver accepts (also after a restore, on a new TAP).
        let offload = tap_offload(self.acked_features);
        if let Err(e) = self.tap.set_offload(offload) {
            tracing::warn!(
                "virtio-net {}: cannot set offloads {offload:#x}: {e}; the guest gets whole frames",
                self.tap.name()
            );
        }
        self.queues.activate(ctx)
    }

    fn reset(&mut self) -> bool {
        self.queues.reset();
        self.rx_pending = None;
        if let Err(e) = self.tap.set_offload(0) {
            tracing::warn!("virtio-net {}: cannot clear offloads: {e}", self.tap.name());
        }
        true
    }

    fn stop_queue(&mut self, index: usize) {
        self.queues.stop_queue(index);
    }

    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        self.queues.queue_states()
    }

    fn save_state(&self) -> VirtioDeviceState {
        VirtioDeviceState::Net {
            acked_features: self.acked_features,
            mac: self.mac.0,
        }
    }

    fn restore_state(&mut self, state: &VirtioDeviceState) -> Result<(), String> {
        match state {
            VirtioDeviceState::Net {
                acked_features,
                mac,
            } => {
                if acked_features & !self.avail_features() != 0 {
                    return Err(format!(
                        "NIC {}: snapshot features {acked_features:#x} not offered",
                        self.tap.name()
                    ));
                }
                self.acked_features = *acked_features;
                // The guest's MAC is part of its state: it follows the guest whatever --net said.
                self.mac = MacAddr(*mac);
                self.config[..6].copy_from_slice(mac);
                Ok(())
            }
            other => Err(format!(
                "NIC {}: snapshot holds a {other:?}, not a network device",
                self.tap.name()
            )),
        }
    }
}

/// The TAP offloads (`TUN_F_*`) that match the driver's `features`: frames the guest accepts with a
/// partial checksum, and large TCP segments only where it accepts those too.
fn tap_offload(features: u64) -> u32 {
    if features & VIRTIO_NET_F_GUEST_CSUM == 0 {
        return 0;
    }
    let mut flags = TUN_F_CSUM;
    if features & VIRTIO_NET_F_GUEST_TSO4 != 0 {
        flags |= TUN_F_TSO4;
    }
    if features & VIRTIO_NET_F_GUEST_TSO6 != 0 {
        flags |= TUN_F_TSO6;
    }
    flags
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_offloads_follow_what_the_driver_accepts() {
        assert_eq!(tap_offload(0), 0);
        assert_eq!(
            tap_offload(VIRTIO_NET_F_GUEST_TSO4),
            0,
            "TSO needs GUEST_CSUM"
        );
        assert_eq!(tap_offload(VIRTIO_NET_F_GUEST_CSUM), TUN_F_CSUM);
        assert_eq!(
            tap_offload(
                VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_GUEST_TSO6
            ),
            TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
        );
    }

    #[test]
    fn parses_net_arguments_and_macs() {
        let c: NetConfig = "tap=tap0,mac=52:54:00:aa:bb:cc".parse().unwrap();
        assert_eq!(c.tap, "tap0");
        assert_eq!(c.mac.unwrap().to_string(), "52:54:00:aa:bb:cc");
        let c: NetConfig = "tap=tap1".parse().unwrap();
        assert_eq!(c.mac_or_default(3).to_string(), "52:54:00:f7:00:03");
        assert!("mac=52:54:00:aa:bb:cc".parse::<NetConfig>().is_err());
        assert!("tap=x,mac=zz:54:00:aa:bb:cc".parse::<NetConfig>().is_err());
        assert!("tap=x,mac=01:00:5e:00:00:01".parse::<NetConfig>().is_err());
        assert!("tap=x,mac=52:54:00:aa:bb".parse::<NetConfig>().is_err());
        assert!("tap=x,speed=10".parse::<NetConfig>().is_err());
    }
}
