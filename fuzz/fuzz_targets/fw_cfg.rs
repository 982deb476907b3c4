//! fw_cfg as a hostile guest drives it: the fuzzer's bytes are a script of port accesses (selector,
//! data, DMA address halves and whole, any offset and length) and writes to guest memory (DMA
//! descriptions pointing anywhere, with any control bits and lengths). Nothing may panic, and a
//! transfer's result word is only ever 0 or the error bit.
#![no_main]

use devices::fw_cfg::{key, FwCfg, FwCfgItems};
use devices::virtio::GuestMemoryMmap;
use devices::BusDevice;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};

const MEM_SIZE: usize = 0x1_0000;

fn device() -> FwCfg {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory");
    let mut items = FwCfgItems::new();
    items
        .add_file(
            "etc/e820",
            (0u8..=255).cycle().take(600).collect::<Vec<_>>(),
        )
        .expect("file");
    items.add_file("bootorder", &b"HALT\0"[..]).expect("file");
    items
        .add_item(key::KERNEL_DATA, vec![0x90u8; 5000])
        .expect("item");
    FwCfg::new(&items, mem)
}

fuzz_target!(|data: &[u8]| {
    let mut dev = device();
    let mut script = data;
    let mut take = |n: usize| -> Option<&[u8]> {
        if script.len() < n {
            return None;
        }
        let (head, rest) = script.split_at(n);
        script = rest;
        Some(head)
    };
    while let Some(&[op]) = take(1) {
        match op % 5 {
            0 => {
                let Some(v) = take(2) else { break };
                dev.write(0, v);
            }
            1 => {
                let Some(&[off, len]) = take(2) else { break };
                let mut buf = vec![0u8; usize::from(len % 9)];
                dev.read(u64::from(off % 16), &mut buf);
            }
            2 => {
                let Some(&[off, len]) = take(2) else { break };
                let len = usize::from(len % 9);
                let Some(v) = take(len) else { break };
                dev.write(u64::from(off % 16), v);
            }
            3 => {
                // A DMA description at a fuzzer-chosen place, then the transfer.
                let Some(at) = take(2) else { break };
                let at = u64::from(u16::from_le_bytes([at[0], at[1]]));
                let Some(access) = take(16) else { break };
                let _ = dev.guest_memory().write_slice(access, GuestAddress(at));
                dev.write(4, &0u32.to_be_bytes());
                dev.write(8, &(at as u32).to_be_bytes());
                // A whole description in memory always gets its result word.
                if at as usize + 16 <= MEM_SIZE {
                    let result = dev
                        .guest_memory()
                        .read_obj::<[u8; 4]>(GuestAddress(at))
                        .map(u32::from_be_bytes)
                        .expect("inside memory");
                    assert!(result <= 1, "transfer result {result:#x}");
                }
            }
            _ => {
                let Some(at) = take(8) else { break };
                dev.write(4, at);
            }
        }
    }
});
