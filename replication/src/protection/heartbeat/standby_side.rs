//! The standby's side of failure detection: probes the primary (`prober.rs`), accepts its control
//! channel (`control_channel.rs`) and keeps both views for the standby's decision.

use std::net::{TcpListener, UdpSocket};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::control_channel::{read_control, ControlRead, ControlVerdict};
use super::prober::{PeerLiveness, ProbeLoop};
use super::OPEN_TIMEOUT;
use crate::link::{self, LinkSecurity, LinkShutdown};
use crate::wire::{FrameReader, Message, ProbeKey, ProbeSender};

/// How often the control channel's reader looks up from its socket (to see whether to stop).
const CONTROL_POLL: Duration = Duration::from_millis(100);

/// The standby's view of its primary.
#[derive(Clone)]
pub struct PrimaryWatch {
    liveness: Arc<PeerLiveness>,
    verdict: Arc<(Mutex<ControlVerdict>, Condvar)>,
}

/// What [`watch_primary`] needs.
pub struct WatchPlan {
    /// The standby's listening socket, where the primary opens its control channel.
    pub listener: TcpListener,
    /// Bound to the listener's address (same port, UDP): where the primary's probes come.
    pub probes: UdpSocket,
    pub security: LinkSecurity,
    pub session: u64,
    pub key: ProbeKey,
    pub heartbeat: Duration,
    pub failure_timeout: Duration,
    /// The checkpoint link: shut down when the control channel ends (the standby's follower then
    /// stops reading), and, with `shut_on_silence`, when the primary falls silent (with a witness,
    /// silence is a reason to ask it for the guest).
    pub checkpoints: LinkShutdown,
    pub shut_on_silence: bool,
}

impl PrimaryWatch {
    /// The primary's liveness as the probes show it.
    pub fn liveness(&self) -> &PeerLiveness {
        &self.liveness
    }

    /// What the control channel says now.
    pub fn verdict(&self) -> ControlVerdict {
        self.verdict
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits until the control channel says how the primary ended. It may never say (the network
    /// is cut): the wait also ends when `give_up` says so (the operator forced a failover), when
    /// the channel never opened, and — with `witness`, which decides then — when the primary is no
    /// longer alive by its probes.
    pub fn await_end(&self, witness: bool, give_up: impl Fn() -> bool) -> ControlVerdict {
        let (lock, changed) = &*self.verdict;
        let mut verdict = lock.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let waiting = match &*verdict {
                // With a witness, a silent primary is the witness's to judge.
                ControlVerdict::Open => !witness || self.liveness.alive(),
                _ => false,
            };
            if !waiting || give_up() {
                return verdict.clone();
            }
            verdict = changed
                .wait_timeout(verdict, Duration::from_millis(5))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Stops probing and echoing: the primary, if alive, counts this standby lost within its
    /// failure timeout.
    pub fn stop(&self) {
        self.liveness.stop();
    }

    fn set_verdict(&self, verdict: ControlVerdict) {
        let (lock, changed) = &*self.verdict;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = verdict;
        changed.notify_all();
    }
}

/// Starts watching the primary (two threads: the probe loop and the control channel's reader).
pub fn watch_primary(plan: WatchPlan) -> std::io::Result<PrimaryWatch> {
    let watch = PrimaryWatch {
        liveness: Arc::new(PeerLiveness::new(plan.failure_timeout)),
        verdict: Arc::new((Mutex::new(ControlVerdict::NotOpened), Condvar::new())),
    };
    let checkpoints_on_silence = plan.checkpoints.try_clone()?;
    let (probes, key, session, heartbeat) = (plan.probes, plan.key, plan.session, plan.heartbeat);
    let shut_on_silence = plan.shut_on_silence;
    let probing = watch.clone();
    std::thread::Builder::new()
        .name("heartbeat".into())
        .spawn(move || {
            vmm::seccomp::apply_or_exit(vmm::seccomp::ThreadKind::Replication);
            let span = tracing::info_span!("heartbeat");
            let _guard = span.enter();
            let mut reported_silence = false;
            let mut asked = false;
            let mut after_each = |l: &PeerLiveness| {
                let alive = l.silent_while_awake() < l.failure_timeout();
                if !alive && l.ever_echoed() && !reported_silence {
                    let silent_ms = l.silent_for().as_millis() as u64;
                    if shut_on_silence {
                        tracing::warn!(silent_ms, "the primary is silent: asking the witness");
                    } else {
                        tracing::warn!(
                            silent_ms,
                            "the primary is silent (hung or cut off?): silence alone never starts a takeover"
                        );
                    }
                } else if alive && reported_silence {
                    tracing::info!("the primary answers again");
                }
                reported_silence = !alive && l.ever_echoed();
                if reported_silence && shut_on_silence && !asked {
                    asked = true;
                    checkpoints_on_silence.shutdown();
                }
            };
            ProbeLoop {
                socket: probes,
                me: ProbeSender::Standby,
                session,
                key,
                interval: heartbeat,
                peer: None,
                liveness: &probing.liveness,
                after_each: &mut after_each,
            }
            .run();
        })?;
    let control = watch.clone();
    let (listener, security, checkpoints) = (plan.listener, plan.security, plan.checkpoints);
    std::thread::Builder::new()
        .name("heartbeat-control".into())
        .spawn(move || {
            vmm::seccomp::apply_or_exit(vmm::seccomp::ThreadKind::Replication);
            let span = tracing::info_span!("control_channel");
            let _guard = span.enter();
            let opened = link::accept_opening(&listener, &security, OPEN_TIMEOUT, |m| match m {
                Message::HeartbeatOpen { session: s } if *s == session => Ok(()),
                Message::HeartbeatOpen { .. } => {
                    Err("a control channel for another session".into())
                }
                other => Err(format!(
                    "it opened with {} while a primary is being followed",
                    other.name()
                )),
            });
            let mut channel = match opened {
                Ok((channel, _)) => channel,
                Err(e) => {
                    tracing::warn!("no control channel: {e}");
                    return;
                }
            };
            control.set_verdict(ControlVerdict::Open);
            let _ = channel.set_read_timeout(Some(CONTROL_POLL));
            let mut reader = FrameReader::new();
            let verdict = loop {
                if control.liveness.stopped() {
                    return;
                }
                match read_control(&mut reader, &mut channel) {
                    ControlRead::Nothing => {}
                    ControlRead::Goodbye(ending) => break ControlVerdict::Goodbye(ending),
                    ControlRead::Closed(reason) => {
                        break ControlVerdict::Closed {
                            while_alive: control.liveness.alive(),
                            reason,
                        }
                    }
                    ControlRead::Broken(reason) => break ControlVerdict::Broken(reason),
                }
            };
            tracing::info!(?verdict, "the control channel ended");
            control.set_verdict(verdict);
            // The follower stops reading checkpoints: the primary's end is known.
            checkpoints.shutdown();
        })?;
    Ok(watch)
}
