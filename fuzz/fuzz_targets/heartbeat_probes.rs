//! The heartbeat channel fed by a peer the fuzzer plays: UDP datagrams that are raw bytes (anyone on
//! the path) or probes signed with the session's key (the peer itself, with any clock and any
//! claims), taken by the probe loop's [`ProbeTaker`]; then the control channel's bytes (framed
//! messages or raw), read by [`read_control`] until it ends. Whatever arrives, nothing panics, the
//! primary's permission to release output never reaches past one failure timeout from now, and a
//! probe of another session or of this end is never taken.
#![no_main]

use std::net::SocketAddr;
use std::time::Duration;

use ftvmm_fuzz::{framed, ScriptedPeer};
use libfuzzer_sys::fuzz_target;
use replication::protection::heartbeat::{read_control, ControlRead, PeerLiveness, ProbeTaker};
use replication::wire::{FrameReader, Probe, ProbeKey, ProbeKind, ProbeSender};

const SESSION: u64 = 0x5e55_1011;
const TIMEOUT: Duration = Duration::from_millis(200);

fn word(bytes: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    let n = bytes.len().min(8);
    w[..n].copy_from_slice(&bytes[..n]);
    u64::from_le_bytes(w)
}

fuzz_target!(|data: &[u8]| {
    let (probes, control) = data.split_at(data.len().min(20 * 64) / 20 * 20);
    let key = ProbeKey::new(&[0x5a; 32]);
    let liveness = PeerLiveness::new(TIMEOUT);
    let mut taker = ProbeTaker::new(key.clone(), SESSION, ProbeSender::Primary, TIMEOUT);
    let from: SocketAddr = "192.0.2.1:7100".parse().unwrap();
    for chunk in probes.chunks_exact(20) {
        let select = chunk[0];
        let datagram = if select & 3 == 0 {
            chunk[1..1 + usize::from(chunk[1] % 19)].to_vec()
        } else {
            let now = liveness.now_us();
            // Stamps near our clock (either way) or anywhere.
            let stamp = if select & 4 != 0 {
                now.wrapping_add(word(&chunk[2..6]) as u32 as i32 as i64 as u64)
            } else {
                word(&chunk[2..10])
            };
            let foreign = select & 0x80 != 0;
            Probe {
                kind: if select & 8 != 0 {
                    ProbeKind::Echo
                } else {
                    ProbeKind::Ping
                },
                sender: if select & 0x40 != 0 {
                    ProbeSender::Primary
                } else {
                    ProbeSender::Standby
                },
                session: if foreign { SESSION ^ 1 } else { SESSION },
                stamp_us: stamp,
                echoed_us: word(&chunk[10..18]),
            }
            .encode(&key)
            .to_vec()
        };
        let taken = taker.take(&liveness, &datagram, from);
        if select & 0xc0 != 0 && select & 3 != 0 {
            assert!(
                taken.is_err(),
                "a probe of another session or of this end was taken"
            );
        }
        assert!(
            liveness.counted_alive_by_peer_for() <= TIMEOUT,
            "the peer's word counts us alive for {:?}",
            liveness.counted_alive_by_peer_for()
        );
    }
    let stream = if control.first().is_some_and(|b| b & 1 == 0) {
        framed(control)
    } else {
        control.to_vec()
    };
    let mut channel = ScriptedPeer(&stream);
    let mut reader = FrameReader::new();
    for _ in 0..stream.len() + 2 {
        if read_control(&mut reader, &mut channel) != ControlRead::Nothing {
            break;
        }
    }
});
