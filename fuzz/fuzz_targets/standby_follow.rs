//! The standby's receive loop fed a primary's stream made by the fuzzer: checkpoints must be
//! applied only whole and in order, inside guest memory and the disk image, and anything else must
//! end the loop, never panic or write out of bounds.
#![no_main]

use std::io::{Read, Write};

use libfuzzer_sys::fuzz_target;
use replication::protection::standby::follow_stream;
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// Reads the fuzzer's bytes; writes (the standby's acknowledgements) go nowhere.
struct Peer<'a>(&'a [u8]);

impl Read for Peer<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Peer<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let memory: vmm::memory::GuestMemory =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("guest memory");
    let image = tempfile(64 * 1024);
    let disks = vec![vmm::machine::DiskAccess {
        journal: Default::default(),
        image,
        capacity: 64 * 1024,
    }];
    let _ = follow_stream(&mut Peer(data), &memory, disks);
});

fn tempfile(len: u64) -> std::fs::File {
    let path = std::env::temp_dir().join(format!("ftvmm-fuzz-standby-{}", std::process::id()));
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let _ = std::fs::remove_file(&path);
    f.set_len(len).unwrap();
    f
}
