//! The virtio-mmio register window: arbitrary sequences of reads and writes, with a virtio-blk device
//! behind it, including activation with whatever queue addresses the sequence set.
#![no_main]

use std::sync::{Arc, Mutex};

use devices::virtio::block::{BlockConfig, VirtioBlock};
use devices::virtio::mmio::MmioTransport;
use devices::virtio::GuestMemoryMmap;
use devices::{BusDevice, EventFdTrigger};
use libfuzzer_sys::fuzz_target;
use vm_memory::GuestAddress;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("ftvmm-fuzz-mmio-{}", std::process::id()));
    std::fs::write(&path, [0u8; 4096]).unwrap();
    let dev = VirtioBlock::new(&BlockConfig { path: path.clone(), read_only: false }, 0).unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let mut t = MmioTransport::new(Arc::new(Mutex::new(dev)), mem, EventFdTrigger::new().unwrap()).unwrap();
    // Each operation: 1 byte kind/size, 2 bytes offset, 4 bytes value.
    for op in data.chunks_exact(7) {
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]]) % 0x200);
        let len = [1usize, 2, 4, 8][usize::from(op[0] & 3)];
        let mut bytes = [0u8; 8];
        bytes[..4].copy_from_slice(&op[3..7]);
        if op[0] & 0x80 != 0 {
            t.write(offset, &bytes[..len]);
        } else {
            t.read(offset, &mut bytes[..len]);
        }
    }
    let _ = std::fs::remove_file(path);
});
