//! virtio-net receive: frames (as the TAP delivers them: header, then frame) written into arbitrary
//! receive chains, with and without the driver's partial checksums.
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
    let packet = vec![0xa5u8; 12 + 1514];
    for (len, guest_csum) in [
        (12 + 60usize, true),
        (12 + 1514, false),
        (12, true),
        (3, false),
    ] {
        if deliver_frame(
            &mut queue,
            &mem,
            &packet[..len],
            guest_csum,
            &mut counters,
            &mut errors,
        ) != Some(true)
        {
            break;
        }
    }
});
