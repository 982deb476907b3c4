//! The standby's receive loop fed a primary's stream made by the fuzzer (well-formed frames around
//! the fuzzer's payloads): checkpoints must be applied only whole and in order, inside guest memory
//! and the disk image, and anything else must end the loop, never panic or write out of bounds.
#![no_main]

use ftvmm_fuzz::{framed, scratch_file, ScriptedPeer};
use libfuzzer_sys::fuzz_target;
use replication::protection::standby::follow_stream;
use vm_memory::{GuestAddress, GuestMemoryMmap};

const DISK_BYTES: u64 = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let memory: vmm::memory::GuestMemory =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("guest memory");
    let disks = vec![vmm::machine::DiskAccess {
        journal: devices::virtio::block::WriteJournal::new(DISK_BYTES).expect("a journal"),
        image: scratch_file(DISK_BYTES),
        capacity: DISK_BYTES,
    }];
    let stream = framed(data);
    let _ = follow_stream(&mut ScriptedPeer(&stream), &memory, disks);
});
