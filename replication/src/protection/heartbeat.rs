//! Failure detection on its own channel: a second connection between primary and standby, apart
//! from the checkpoint stream, so that a long first sync or a slow apply never looks like death.
//!
//! The standby pings every `heartbeat` with its own clock (`Ping { sent_us }`); the primary echoes
//! each ping (`Pong`) for as long as it checkpoints for this standby. The standby counts the primary
//! as *alive* until `failure_timeout` after the ping its latest echo carries. Because the echo names
//! a time on the standby's own clock, a late-delivered old echo proves nothing new: once the
//! primary stops echoing (it has decided to go on without this standby), at most `failure_timeout`
//! later the standby no longer counts it alive, whatever the network delivers afterwards. The
//! primary therefore holds its output for `failure_timeout` (plus a margin) after it stops echoing
//! before releasing it; from then on the standby never takes over on its own (docs/wire-protocol.md).
//!
//! The primary, in turn, counts the standby lost when no ping arrives for `failure_timeout`.

use std::hash::{BuildHasher, Hasher};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::link::{self, Link, LinkSecurity, LinkShutdown};
use crate::wire::{read_frame, write_frame, FrameError, Message};

/// How long the primary may take to open the heartbeat channel after `Standing`.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// A fresh session number (std's hasher keys come from the OS's randomness).
pub fn new_session() -> u64 {
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

/// The standby's view of the primary's liveness, kept by the heartbeat thread.
pub struct Liveness {
    clock: Instant,
    failure_timeout: Duration,
    /// Standby-clock microseconds of the ping the latest echo carried (0: none yet).
    echoed_us: AtomicU64,
}

impl Liveness {
    fn new(failure_timeout: Duration) -> Self {
        Self {
            clock: Instant::now(),
            failure_timeout,
            echoed_us: AtomicU64::new(0),
        }
    }

    fn now_us(&self) -> u64 {
        self.clock.elapsed().as_micros().max(1) as u64
    }

    fn echoed(&self, sent_us: u64) {
        // Never beyond now: an echo can only carry a ping this standby has sent.
        let sent_us = sent_us.min(self.now_us());
        self.echoed_us.fetch_max(sent_us, Ordering::SeqCst);
    }

    /// Whether the primary is known alive and checkpointing for this standby now: it echoed a ping
    /// sent less than `failure_timeout` ago.
    pub fn alive(&self) -> bool {
        self.silent_for() < self.failure_timeout
    }

    /// Time since the ping the latest echo carried (since the standby started, if none).
    pub fn silent_for(&self) -> Duration {
        let echoed = self.echoed_us.load(Ordering::SeqCst);
        Duration::from_micros(self.now_us().saturating_sub(echoed))
    }
}

/// Standby side: accepts the primary's heartbeat channel for `session` on `listener` (in a thread of
/// its own), pings every `heartbeat` and keeps the returned [`Liveness`]. `on_silence`: shut down
/// when the primary falls silent (with a witness, silence is a reason to ask it for a takeover).
pub fn watch_primary(
    listener: TcpListener,
    security: LinkSecurity,
    session: u64,
    heartbeat: Duration,
    failure_timeout: Duration,
    on_silence: Option<LinkShutdown>,
) -> std::io::Result<Arc<Liveness>> {
    let liveness = Arc::new(Liveness::new(failure_timeout));
    let watched = liveness.clone();
    std::thread::Builder::new()
        .name("heartbeat".into())
        .spawn(move || {
            vmm::seccomp::apply_or_exit(vmm::seccomp::ThreadKind::Replication);
            let span = tracing::info_span!("heartbeat");
            let _guard = span.enter();
            let opened = link::accept_opening(&listener, &security, OPEN_TIMEOUT, |m| match m {
                Message::HeartbeatOpen { session: s } if *s == session => Ok(()),
                Message::HeartbeatOpen { .. } => {
                    Err("a heartbeat channel for another session".into())
                }
                other => Err(format!(
                    "it opened with {} while a primary is being followed",
                    other.name()
                )),
            });
            match opened {
                Ok((link, _)) => {
                    // Opening the channel is the primary's first sign of life.
                    watched.echoed(watched.now_us());
                    ping_until_silent(link, &watched, heartbeat, on_silence.is_some())
                }
                Err(e) => tracing::warn!("no heartbeat channel: {e}"),
            }
            if let Some(checkpoints) = on_silence {
                checkpoints.shutdown();
            }
        })?;
    Ok(liveness)
}

/// Pings until the channel ends (or, with `stop_when_silent`, until the primary falls silent).
fn ping_until_silent(
    mut link: Link,
    liveness: &Liveness,
    heartbeat: Duration,
    stop_when_silent: bool,
) {
    let _ = link.set_read_timeout(Some(heartbeat));
    let _ = link.set_write_timeout(Some(liveness.failure_timeout));
    let mut next_ping = Instant::now();
    let mut reported_silence = false;
    loop {
        if Instant::now() >= next_ping {
            let ping = Message::Ping {
                sent_us: liveness.now_us(),
            };
            if let Err(e) = write_frame(&mut link, &ping) {
                tracing::info!("heartbeat channel ended: {e}");
                return;
            }
            next_ping += heartbeat;
        }
        match read_frame::<_, Message>(&mut link) {
            Ok(Message::Pong { sent_us }) => liveness.echoed(sent_us),
            Ok(other) => {
                tracing::warn!("heartbeat channel: unexpected {}; closing it", other.name());
                return;
            }
            Err(FrameError::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => {
                tracing::info!("heartbeat channel ended: {e}");
                return;
            }
        }
        let alive = liveness.alive();
        if !alive && stop_when_silent {
            tracing::warn!(
                silent_ms = liveness.silent_for().as_millis() as u64,
                "the primary is silent: asking the witness"
            );
            return;
        }
        if !alive && !reported_silence {
            tracing::warn!(
                silent_ms = liveness.silent_for().as_millis() as u64,
                "the primary is silent (hung or cut off?): silence alone never starts a takeover"
            );
        } else if alive && reported_silence {
            tracing::info!("the primary answers again");
        }
        reported_silence = !alive;
    }
}

/// Primary side: the heartbeat channel to the standby. The thread is started with the epoch loop
/// (threads start only from the event loop: `vmm/src/seccomp.rs`) and opens the channel when the
/// loop has the standby's terms ([`StandbyWatch::open`]).
pub struct StandbyWatch {
    plans: Mutex<Option<std::sync::mpsc::Sender<ChannelPlan>>>,
    /// Echo pings only while set.
    answering: Arc<AtomicBool>,
    /// Set once no ping arrived for the failure timeout, or the channel ended.
    lost: Arc<AtomicBool>,
    /// When the last ping arrived.
    last_ping: Arc<Mutex<Option<Instant>>>,
}

/// What the heartbeat thread needs to open the channel.
struct ChannelPlan {
    to: String,
    security: LinkSecurity,
    session: u64,
    failure_timeout: Duration,
    checkpoints: LinkShutdown,
    opened: std::sync::mpsc::Sender<Result<(), String>>,
}

impl StandbyWatch {
    /// Starts the (idle) heartbeat thread.
    pub fn spawn() -> std::io::Result<Self> {
        let (plans, plan) = std::sync::mpsc::channel::<ChannelPlan>();
        let answering = Arc::new(AtomicBool::new(true));
        let lost = Arc::new(AtomicBool::new(false));
        let last_ping = Arc::new(Mutex::new(None));
        let (a, l, p) = (answering.clone(), lost.clone(), last_ping.clone());
        std::thread::Builder::new()
            .name("heartbeat".into())
            .spawn(move || {
                vmm::seccomp::apply_or_exit(vmm::seccomp::ThreadKind::Replication);
                let Ok(plan) = plan.recv() else {
                    return; // protection ended before it started
                };
                let span = tracing::info_span!("heartbeat", standby = %plan.to);
                let _guard = span.enter();
                let opened =
                    link::connect(&plan.to, &plan.security, OPEN_TIMEOUT, plan.failure_timeout)
                        .map_err(|e| e.to_string())
                        .and_then(|mut channel| {
                            write_frame(
                                &mut channel,
                                &Message::HeartbeatOpen {
                                    session: plan.session,
                                },
                            )
                            .map(|()| channel)
                            .map_err(|e| e.to_string())
                        });
                let mut channel = match opened {
                    Ok(channel) => {
                        let _ = plan.opened.send(Ok(()));
                        channel
                    }
                    Err(e) => {
                        let _ = plan.opened.send(Err(e));
                        return;
                    }
                };
                let why = answer_pings(&mut channel, &a, &p);
                if a.load(Ordering::SeqCst) {
                    tracing::warn!("the standby is lost: {why}");
                    l.store(true, Ordering::SeqCst);
                    plan.checkpoints.shutdown();
                }
            })?;
        Ok(Self {
            plans: Mutex::new(Some(plans)),
            answering,
            lost,
            last_ping,
        })
    }

    /// Opens the heartbeat channel for `session` to `to` and answers pings from then on. When pings
    /// stop for `failure_timeout` (the standby's), marks the standby lost and shuts `checkpoints`
    /// (the checkpoint link) down, so that the epoch loop stops waiting on it.
    pub fn open(
        &self,
        to: &str,
        security: &LinkSecurity,
        session: u64,
        failure_timeout: Duration,
        checkpoints: LinkShutdown,
    ) -> Result<(), String> {
        let (opened, result) = std::sync::mpsc::channel();
        let plan = ChannelPlan {
            to: to.to_string(),
            security: security.clone(),
            session,
            failure_timeout,
            checkpoints,
            opened,
        };
        let sent = self
            .plans
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .map(|plans| plans.send(plan));
        match sent {
            Some(Ok(())) => {}
            _ => return Err("the heartbeat thread is gone".into()),
        }
        result
            .recv_timeout(OPEN_TIMEOUT * 2)
            .unwrap_or_else(|_| Err("the heartbeat channel did not open in time".into()))
    }

    /// Stops echoing pings: from now on the standby's count of this primary as alive runs out.
    pub fn stop_answering(&self) {
        self.answering.store(false, Ordering::SeqCst);
    }

    /// Time since the standby's last ping (none yet: `None`).
    pub fn ping_age(&self) -> Option<Duration> {
        self.last_ping
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|at| at.elapsed())
    }

    /// Whether the standby stopped pinging (or its channel ended).
    pub fn standby_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }
}

impl Drop for StandbyWatch {
    fn drop(&mut self) {
        self.stop_answering();
    }
}

/// Echoes pings while `answering`; returns why it stopped.
fn answer_pings(
    channel: &mut Link,
    answering: &AtomicBool,
    last_ping: &Mutex<Option<Instant>>,
) -> String {
    loop {
        match read_frame::<_, Message>(channel) {
            Ok(Message::Ping { sent_us }) => {
                *last_ping.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
                if !answering.load(Ordering::SeqCst) {
                    return "stopped answering".into();
                }
                if let Err(e) = write_frame(channel, &Message::Pong { sent_us }) {
                    return e.to_string();
                }
            }
            Ok(other) => return format!("unexpected {} on the heartbeat channel", other.name()),
            Err(FrameError::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return "no ping within its failure timeout".into()
            }
            Err(e) => return e.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_lasts_a_failure_timeout_after_the_echoed_ping() {
        let l = Liveness::new(Duration::from_millis(50));
        assert!(!l.alive() || l.silent_for() < Duration::from_millis(50));
        std::thread::sleep(Duration::from_millis(60));
        assert!(!l.alive(), "no echo yet");
        let sent = l.now_us();
        l.echoed(sent);
        assert!(l.alive());
        // An old echo arriving late does not move liveness back.
        l.echoed(1);
        assert!(l.alive());
        std::thread::sleep(Duration::from_millis(60));
        assert!(!l.alive(), "the echoed ping is older than the timeout");
        // An echo can never claim a ping from the future.
        l.echoed(u64::MAX);
        assert!(l.silent_for() < Duration::from_millis(5));
    }
}
