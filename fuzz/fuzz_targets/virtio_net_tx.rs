//! virtio-net transmit: arbitrary transmit chains go through the output gate to a sink, which gets
//! each frame with its virtio-net header, as a TAP does.
#![no_main]

use devices::output_gate::{OutputSink, PassThroughGate};
use devices::virtio::device_queues::{GuestErrorLog, QUEUE_BUDGET};
use devices::virtio::net::device::{NetCounters, MAX_FRAME_LEN, NET_HDR_LEN};
use devices::virtio::net::event_handler::TxPath;
use ftvmm_fuzz::queue_from_bytes;
use libfuzzer_sys::fuzz_target;

struct Discard;
impl OutputSink for Discard {
    fn send(&mut self, data: &[u8]) -> std::io::Result<()> {
        assert!(data.len() > NET_HDR_LEN && data.len() <= NET_HDR_LEN + MAX_FRAME_LEN);
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((mem, mut queue)) = queue_from_bytes(data) else {
        return;
    };
    let mut buf = vec![0u8; NET_HDR_LEN + MAX_FRAME_LEN];
    let mut gate = PassThroughGate::new();
    let mut counters = NetCounters::default();
    let mut errors = GuestErrorLog::new("fuzz-net");
    let mut tx = TxPath {
        buf: &mut buf,
        gate: &mut gate,
        sink: &mut Discard,
        counters: &mut counters,
        errors: &mut errors,
    };
    tx.drain(&mut queue, &mem, QUEUE_BUDGET);
});
