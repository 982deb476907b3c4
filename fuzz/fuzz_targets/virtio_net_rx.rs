//! virtio-net receive: frames written into arbitrary receive chains.
#![no_main]

use devices::virtio::device_queues::GuestErrorLog;
use devices::virtio::net::device::NetCounters;
use devices::virtio::net::event_handler::deliver_frame;
use ftvmm_fuzz::queue_from_bytes;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((mem, mut queue)) = queue_from_bytes(data) else {
        return;
    };
    let mut counters = NetCounters::default();
    let mut errors = GuestErrorLog::new("fuzz-net");
    let frame = vec![0xa5u8; 1514];
    for len in [60usize, 1514, 0] {
        if deliver_frame(&mut queue, &mem, &frame[..len], &mut counters, &mut errors) != Some(true)
        {
            break;
        }
    }
});
