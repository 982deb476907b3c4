//! A standby the test scripts: it speaks the protocol (replication/src/wire, docs/wire-protocol.md)
//! to a real primary — takes its `Hello`, states its terms, follows its checkpoints and answers its
//! heartbeat probes — but acknowledges checkpoints, answers probes and sends held commits exactly
//! when the test says, so that a fault can be placed at one instant of the protocol.

use std::collections::VecDeque;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use replication::link::{self, LinkSecurity};
use replication::wire::{
    write_frame, FrameReader, Message, Probe, ProbeKey, ProbeKind, ProbeSender, PROBE_LEN,
};

/// What the test controls, shared with the standby's threads.
#[derive(Default)]
struct Script {
    /// Acknowledge each checkpoint as it completes (else hold its `Committed`).
    acking: AtomicBool,
    /// Echo the primary's probes.
    answering: AtomicBool,
    /// Ping the primary (as a standby does, every 50 ms).
    pinging: AtomicBool,
    /// Commits held back, oldest first.
    held: Mutex<VecDeque<u64>>,
    /// Set by the test: send the held commits now (the follower clears it once sent).
    release_held: AtomicBool,
    /// The claim the primary said it holds (`ClaimHeld`).
    claim: Mutex<Option<(u64, u64)>>,
}

/// A scripted standby listening on an address of the calling thread's network namespace.
pub struct ScriptedStandby {
    script: Arc<Script>,
    addr: SocketAddr,
}

impl ScriptedStandby {
    /// Listens on `listen` (TCP, and UDP on the same port for probes) with `security`; follows the
    /// first primary that opens, acknowledging and answering until told otherwise.
    pub fn start(listen: &str, security: LinkSecurity) -> Self {
        let listener = TcpListener::bind(listen).expect("bind the scripted standby");
        let addr = listener.local_addr().unwrap();
        let probes = UdpSocket::bind(addr).expect("bind the probe socket");
        let script = Arc::new(Script::default());
        script.acking.store(true, Ordering::SeqCst);
        script.answering.store(true, Ordering::SeqCst);
        script.pinging.store(true, Ordering::SeqCst);
        let s = script.clone();
        std::thread::spawn(move || follow(listener, probes, security, s));
        Self { script, addr }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// From now on, hold each checkpoint's `Committed` instead of sending it.
    pub fn hold_commits(&self) {
        self.script.acking.store(false, Ordering::SeqCst);
    }

    /// How many commits are held.
    pub fn held_commits(&self) -> usize {
        self.script.held.lock().unwrap().len()
    }

    /// Sends every held `Committed`, in order; returns once they are written.
    pub fn send_held_commits(&self) {
        self.script.release_held.store(true, Ordering::SeqCst);
        let t0 = std::time::Instant::now();
        while self.script.release_held.load(Ordering::SeqCst) {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "the follower is gone"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops echoing the primary's probes (a standby gone silent, or one that took over).
    pub fn stop_answering(&self) {
        self.script.answering.store(false, Ordering::SeqCst);
    }

    /// Stops pinging the primary while still echoing its pings: by the standby's rule the primary
    /// then falls silent (nothing of it newer comes back), while the primary still hears from it.
    pub fn stop_pinging(&self) {
        self.script.pinging.store(false, Ordering::SeqCst);
    }

    /// The claim (holder, generation) the primary said it protects under.
    pub fn primary_claim(&self) -> Option<(u64, u64)> {
        *self.script.claim.lock().unwrap()
    }
}

fn follow(listener: TcpListener, probes: UdpSocket, security: LinkSecurity, script: Arc<Script>) {
    let incoming =
        link::accept_peer(&listener, &security, Duration::from_secs(30)).expect("a primary opens");
    let mut stream = incoming.link;
    write_frame(&mut stream, &Message::Ready).unwrap();
    let secret = [7u8; 32];
    let session = 0x5c1e_7ed0;
    write_frame(
        &mut stream,
        &Message::Standing {
            session,
            failure_timeout_ms: 500,
            heartbeat_ms: 50,
            probe_secret: secret,
        },
    )
    .unwrap();
    // The control channel: accepted and kept open (nothing is read from it).
    let control_security = security.clone();
    std::thread::spawn(move || {
        let channel =
            link::accept_opening(&listener, &control_security, Duration::from_secs(30), |m| {
                matches!(m, Message::HeartbeatOpen { .. })
                    .then_some(())
                    .ok_or_else(|| "not the control channel".to_string())
            });
        // Held for the standby's life.
        std::thread::sleep(Duration::from_secs(3600));
        drop(channel);
    });
    let answering = script.clone();
    std::thread::spawn(move || answer_probes(probes, ProbeKey::new(&secret), session, &answering));
    // One thread reads and writes the link (a TLS stream is one state): reads time out often
    // enough to send what the test asks for.
    let _ = stream.set_read_timeout(Some(Duration::from_millis(10)));
    let mut reader = FrameReader::new();
    loop {
        if script.release_held.load(Ordering::SeqCst) {
            let held: Vec<u64> = script.held.lock().unwrap().drain(..).collect();
            for epoch in held {
                if write_frame(&mut stream, &Message::Committed { epoch }).is_err() {
                    return;
                }
            }
            script.release_held.store(false, Ordering::SeqCst);
        }
        let message = match reader.poll::<_, Message>(&mut stream) {
            Ok(Some(m)) => m,
            Ok(None) => continue,
            Err(_) => return,
        };
        match message {
            Message::ClaimHeld { holder, generation } => {
                *script.claim.lock().unwrap() = Some((holder, generation))
            }
            Message::EpochEnd { epoch, .. } => {
                if script.acking.load(Ordering::SeqCst) {
                    if write_frame(&mut stream, &Message::Committed { epoch }).is_err() {
                        return;
                    }
                } else {
                    script.held.lock().unwrap().push_back(epoch);
                }
            }
            Message::Goodbye { .. } => return,
            _ => {}
        }
    }
}

fn answer_probes(socket: UdpSocket, key: ProbeKey, session: u64, script: &Script) {
    let mut buf = [0u8; PROBE_LEN + 1];
    let clock = std::time::Instant::now();
    let mut primary = None;
    // The stamp of our newest ping the primary echoed: every ping tells it (as a real standby's do).
    let mut echoed = 0u64;
    let mut next_ping = std::time::Instant::now();
    let _ = socket.set_read_timeout(Some(Duration::from_millis(10)));
    loop {
        let now = std::time::Instant::now();
        if let (Some(to), true) = (primary, script.pinging.load(Ordering::SeqCst)) {
            if now >= next_ping {
                let ping = Probe {
                    kind: ProbeKind::Ping,
                    sender: ProbeSender::Standby,
                    session,
                    stamp_us: clock.elapsed().as_micros().max(1) as u64,
                    echoed_us: echoed,
                };
                let _ = socket.send_to(&ping.encode(&key), to);
                next_ping = now + Duration::from_millis(50);
            }
        }
        let (n, from) = match socket.recv_from(&mut buf) {
            Ok(got) => got,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(_) => return,
        };
        let Ok(probe) = Probe::decode(&buf[..n], &key) else {
            continue;
        };
        if probe.kind == ProbeKind::Echo && probe.session == session {
            echoed = echoed.max(probe.stamp_us);
        }
        if probe.kind == ProbeKind::Ping
            && probe.session == session
            && script.answering.load(Ordering::SeqCst)
        {
            primary = Some(from);
            let echo = Probe {
                kind: ProbeKind::Echo,
                sender: ProbeSender::Standby,
                session,
                stamp_us: probe.stamp_us,
                echoed_us: 0,
            };
            let _ = socket.send_to(&echo.encode(&key), from);
        }
    }
}
