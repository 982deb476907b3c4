//! virtio-blk behind its virtio-mmio transport and on a real event loop (event-manager), driven as a
//! hostile driver could: raw register reads and writes, the whole initialisation, requests put on
//! the ring, notifies, resets (Status = 0) and re-activations, QueueReady = 0, writes to the rings
//! in guest memory, and event-loop turns in between. Once the guest stops, the loop must go quiet
//! within a bounded number of turns (no eventfd left readable and unread, the spin of issue 10,
//! and no queue that keeps requeueing itself), and nothing may panic. virtio-net shares the queue
//! plumbing (devices/src/virtio/device_queues.rs) but needs a TAP, so blk stands for both here.
#![no_main]

use std::sync::{Arc, Mutex};

use devices::virtio::block::request::{ID_BYTES, SECTOR_SIZE};
use devices::virtio::block::{BlockConfig, VirtioBlock};
use devices::virtio::mmio::{MmioTransport, NOTIFY_OFFSET};
use devices::virtio::{status, GuestMemoryMmap, VIRTIO_F_VERSION_1};
use devices::{BusDevice, EventFdTrigger};
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use ftvmm_fuzz::scratch_path;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};

const MEM_SIZE: usize = 0x10_0000;
const DESC_TABLE: u64 = 0x1000;
const AVAIL_RING: u64 = 0x2000;
const USED_RING: u64 = 0x3000;
const DATA: u64 = 0x1_0000;
const QUEUE_SIZE: u16 = 16;
const DISK_BYTES: usize = 64 * 1024;
/// Event-loop turns after the last operation within which the loop must be quiet: one to activate,
/// one per budget's worth of a full ring, and slack.
const QUIET_WITHIN: usize = 8;

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

struct Driver {
    transport: MmioTransport,
    memory: GuestMemoryMmap,
    /// The next free avail-ring slot as this driver counts it.
    avail_idx: u16,
}

impl Driver {
    fn write(&mut self, offset: u64, value: u32) {
        self.transport.write(offset, &value.to_le_bytes());
    }

    fn initialise(&mut self, features_low: u32) {
        self.write(0x70, 0);
        self.write(0x70, status::ACKNOWLEDGE | status::DRIVER);
        self.write(0x24, 1);
        self.write(0x20, (VIRTIO_F_VERSION_1 >> 32) as u32);
        self.write(0x24, 0);
        self.write(0x20, features_low);
        self.write(
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        self.write(0x30, 0);
        self.write(0x38, u32::from(QUEUE_SIZE));
        self.write(0x80, DESC_TABLE as u32);
        self.write(0x84, 0);
        self.write(0x90, AVAIL_RING as u32);
        self.write(0x94, 0);
        self.write(0xa0, USED_RING as u32);
        self.write(0xa4, 0);
        self.write(0x44, 1);
        self.avail_idx = 0;
        self.write(
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
    }

    /// Puts a three-descriptor request (header, data, status byte) on the ring.
    fn add_request(&mut self, kind: u32, sector: u64, len: u32, slot: u16) {
        let head = slot % QUEUE_SIZE;
        let base = DATA + u64::from(head) * 0x1000;
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&kind.to_le_bytes());
        header[8..].copy_from_slice(&sector.to_le_bytes());
        let _ = self.memory.write_slice(&header, GuestAddress(base));
        // Each request owns descriptors head*3 .. head*3+2 of a 48-entry table laid out for 16
        // slots; the indices wrap inside the queue size, so collisions are the guest's mistake.
        let d0 = (head * 3) % QUEUE_SIZE;
        let d1 = (d0 + 1) % QUEUE_SIZE;
        let d2 = (d0 + 2) % QUEUE_SIZE;
        let write_data = if kind == 0 { 2u16 } else { 0 }; // a read fills the buffer
        self.descriptor(d0, base, 16, 1, d1);
        self.descriptor(d1, base + 0x100, len, 1 | write_data, d2);
        self.descriptor(d2, base + 0xf00, 1, 2, 0);
        let ring_slot = AVAIL_RING + 4 + u64::from(self.avail_idx % QUEUE_SIZE) * 2;
        let _ = self.memory.write_obj(d0, GuestAddress(ring_slot));
        self.avail_idx = self.avail_idx.wrapping_add(1);
        let _ = self
            .memory
            .write_obj(self.avail_idx, GuestAddress(AVAIL_RING + 2));
    }

    fn descriptor(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(DESC_TABLE + u64::from(index) * 16);
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        let _ = self.memory.write_slice(&d, at);
    }
}

fuzz_target!(|data: &[u8]| {
    let path = scratch_path("blk-lifecycle");
    std::fs::write(&path, [0u8; DISK_BYTES]).expect("disk image");
    let read_only = data.first().is_some_and(|b| b & 1 == 1);
    let block = Arc::new(Mutex::new(
        VirtioBlock::new(
            &BlockConfig {
                path: path.clone(),
                read_only,
            },
            0,
        )
        .expect("virtio-blk"),
    ));
    let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("memory");
    let transport = MmioTransport::new(
        block.clone(),
        memory.clone(),
        EventFdTrigger::new().unwrap(),
    )
    .expect("transport");
    let mut event_loop = EventManager::<Subscriber>::new().expect("event manager");
    event_loop.add_subscriber(block);
    let mut driver = Driver {
        transport,
        memory,
        avail_idx: 0,
    };

    // Each operation: kind, a 16-bit argument, a 32-bit value, one spare byte.
    for op in data.get(1..).unwrap_or_default().chunks_exact(8) {
        let arg = u16::from_le_bytes([op[1], op[2]]);
        let value = u32::from_le_bytes([op[3], op[4], op[5], op[6]]);
        match op[0] % 9 {
            0 => driver.write(u64::from(arg % 0x200), value),
            1 => {
                let mut bytes = [0u8; 4];
                driver.transport.read(u64::from(arg % 0x200), &mut bytes);
            }
            2 => driver.initialise(value),
            3 => driver.write(NOTIFY_OFFSET, u32::from(arg % 2)),
            4 => driver.write(0x70, 0),
            5 => {
                driver.write(0x30, 0);
                driver.write(0x44, 0);
            }
            6 => {
                let at = DESC_TABLE + u64::from(arg) % (USED_RING + 0x1000 - DESC_TABLE);
                let _ = driver.memory.write_obj(value, GuestAddress(at));
            }
            7 => {
                let kind = [0, 1, 4, 8][usize::from(op[7] & 3)]; // read, write, flush, get id
                let sector = u64::from(value) % (DISK_BYTES as u64 / SECTOR_SIZE + 2);
                let len = (u32::from(arg) % 8 + 1) * SECTOR_SIZE as u32;
                driver.add_request(
                    kind,
                    sector,
                    len.max(ID_BYTES as u32),
                    u16::from(op[7] >> 2),
                );
            }
            _ => {
                let _ = event_loop.run_with_timeout(0);
            }
        }
    }
    let quiet = (0..QUIET_WITHIN).any(|_| event_loop.run_with_timeout(0).expect("epoll") == 0);
    assert!(
        quiet,
        "the event loop still has events {QUIET_WITHIN} turns after the guest stopped"
    );
    let _ = std::fs::remove_file(path);
});
