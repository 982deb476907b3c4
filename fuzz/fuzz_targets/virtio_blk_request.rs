//! virtio-blk: every request a hostile guest can put on the queue, against a small disk.
#![no_main]

use devices::virtio::block::event_handler::process_requests;
use devices::virtio::block::request::{Disk, SegmentLimits, ID_BYTES};
use devices::virtio::device_queues::{GuestErrorLog, QUEUE_BUDGET};
use ftvmm_fuzz::{queue_from_bytes, scratch_file};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((mem, mut queue)) = queue_from_bytes(data) else {
        return;
    };
    let file = scratch_file(64 * 1024);
    let id = [7u8; ID_BYTES];
    let read_only = data.first().is_some_and(|b| b & 0x80 != 0);
    let disk = Disk {
        file: &file,
        capacity: 64 * 1024,
        read_only,
        id: &id,
        journal: None,
        // A driver that accepted seg_max and size_max, or one that did not.
        segments: if data.get(1).is_some_and(|b| b & 1 != 0) {
            SegmentLimits {
                count: Some(4),
                size: Some(4096),
            }
        } else {
            SegmentLimits::default()
        },
    };
    let mut errors = GuestErrorLog::new("fuzz-blk");
    process_requests(&mut queue, &mem, &disk, &mut errors, QUEUE_BUDGET);
});
