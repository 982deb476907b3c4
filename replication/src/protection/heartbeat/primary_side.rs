//! The primary's side of failure detection: opens the control channel, probes the standby
//! (`prober.rs`) and counts it lost when it stops answering.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::prober::{PeerLiveness, ProbeLoop};
use super::OPEN_TIMEOUT;
use crate::link::{self, Link, LinkSecurity, LinkShutdown, PeerAddress};
use crate::wire::{write_frame, Ending, Message, ProbeKey, ProbeSender};

/// How long a goodbye on the control channel may take to write (it always fits its buffer).
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(2);

/// The primary's view of its standby. The probe thread is started with the epoch loop (threads
/// start only from the event loop: `vmm/src/seccomp.rs`) and opens the channel when the loop has
/// the standby's terms ([`StandbyWatch::open`]).
pub struct StandbyWatch {
    plans: Mutex<Option<Sender<ChannelPlan>>>,
    liveness: Arc<OnceLock<PeerLiveness>>,
    /// Set once the standby stopped answering for its failure timeout.
    lost: Arc<AtomicBool>,
    /// The control channel, until the goodbye is written on it.
    control: Arc<Mutex<Option<Link>>>,
    /// Clock jumps already confirmed with the witness.
    confirmed_jumps: Arc<AtomicU64>,
}

/// Whether output may leave now — asked before every frame of a release, so that a primary stopped
/// in the middle of one sends nothing more when it wakes: the standby answered a probe within its
/// failure timeout (by this primary's clock), it still counts this primary alive by its own rule
/// ([`PeerLiveness::counted_alive_by_peer`]), and this primary's clock was not seen to stand still
/// since the witness last confirmed it. Clones share the one view.
#[derive(Clone)]
pub struct ReleasePermit {
    liveness: Arc<OnceLock<PeerLiveness>>,
    confirmed_jumps: Arc<AtomicU64>,
}

impl ReleasePermit {
    pub fn allows(&self) -> bool {
        self.liveness.get().is_none_or(|l| {
            l.silent_for() < l.failure_timeout()
                && l.counted_alive_by_peer()
                && l.clock_jumps() <= self.confirmed_jumps.load(Ordering::SeqCst)
        })
    }
}

/// The standby's terms, as `Message::Standing` gave them.
#[derive(Clone, Debug)]
pub struct StandbyTerms {
    pub session: u64,
    pub failure_timeout: Duration,
    pub heartbeat: Duration,
    pub key: ProbeKey,
}

/// What the probe thread needs to open the channel.
struct ChannelPlan {
    /// The standby as the user named it and as resolved: the control channel dials it, its
    /// certificate must carry the name, the probes go to the same address's UDP port.
    to: PeerAddress,
    security: LinkSecurity,
    terms: StandbyTerms,
    checkpoints: LinkShutdown,
    opened: Sender<Result<(), String>>,
}

impl StandbyWatch {
    /// Starts the (idle) probe thread.
    pub fn spawn() -> std::io::Result<Self> {
        let (plans, plan) = channel::<ChannelPlan>();
        let liveness = Arc::new(OnceLock::new());
        let lost = Arc::new(AtomicBool::new(false));
        let control = Arc::new(Mutex::new(None));
        let (liveness_t, lost_t, control_t) = (liveness.clone(), lost.clone(), control.clone());
        std::thread::Builder::new()
            .name("heartbeat".into())
            .spawn(move || {
                vmm::seccomp::apply_or_exit(vmm::seccomp::ThreadKind::Replication);
                let Ok(plan) = plan.recv() else {
                    return; // protection ended before it started
                };
                let span = tracing::info_span!("heartbeat", standby = %plan.to);
                let _guard = span.enter();
                let probes = match open_channels(&plan) {
                    Ok((channel, probes)) => {
                        *control_t.lock().unwrap_or_else(|e| e.into_inner()) = Some(channel);
                        probes
                    }
                    Err(e) => {
                        let _ = plan.opened.send(Err(e));
                        return;
                    }
                };
                let liveness =
                    liveness_t.get_or_init(|| PeerLiveness::new(plan.terms.failure_timeout));
                let _ = plan.opened.send(Ok(()));
                let opened_at = Instant::now();
                let timeout = plan.terms.failure_timeout;
                let mut after_each = |l: &PeerLiveness| {
                    let why = if l.ever_echoed() {
                        (l.silent_while_awake() >= timeout).then(|| {
                            format!(
                                "no answer to its heartbeat probes for {} ms",
                                l.silent_for().as_millis()
                            )
                        })
                    } else {
                        (opened_at.elapsed() >= OPEN_TIMEOUT)
                            .then(|| "it never answered a heartbeat probe".to_string())
                    };
                    if let Some(why) = why {
                        tracing::warn!("the standby is lost: {why}");
                        lost_t.store(true, Ordering::SeqCst);
                        l.stop();
                        plan.checkpoints.shutdown();
                    }
                };
                ProbeLoop {
                    socket: probes,
                    me: ProbeSender::Primary,
                    session: plan.terms.session,
                    key: plan.terms.key.clone(),
                    interval: plan.terms.heartbeat,
                    peer: Some(plan.to.addr()),
                    liveness,
                    after_each: &mut after_each,
                }
                .run();
            })?;
        Ok(Self {
            plans: Mutex::new(Some(plans)),
            liveness,
            lost,
            control,
            confirmed_jumps: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Opens the control channel to the standby at `to` and probes it there from then on. When it
    /// stops answering for its failure timeout, marks it lost and shuts `checkpoints` (the
    /// checkpoint link) down, so that the epoch loop stops waiting on it.
    pub fn open(
        &self,
        to: &PeerAddress,
        security: &LinkSecurity,
        terms: StandbyTerms,
        checkpoints: LinkShutdown,
    ) -> Result<(), String> {
        let (opened, result) = channel();
        let plan = ChannelPlan {
            to: to.clone(),
            security: security.clone(),
            terms,
            checkpoints,
            opened,
        };
        let sent = self
            .plans
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .is_some_and(|plans| plans.send(plan).is_ok());
        if !sent {
            return Err("the heartbeat thread is gone".into());
        }
        result
            .recv_timeout(OPEN_TIMEOUT * 2)
            .unwrap_or_else(|_| Err("the heartbeat channel did not open in time".into()))
    }

    /// Stops answering the standby's probes: from now on its count of this primary as alive runs
    /// out.
    pub fn stop_answering(&self) {
        if let Some(l) = self.liveness.get() {
            l.stop();
        }
    }

    /// Tells the standby, on the control channel, that protection ends while this primary lives
    /// (and why), then closes the channel. Whatever the checkpoint link's state, the standby reads
    /// this before the channel's close. Returns whether it was written.
    pub fn goodbye(&self, ending: &Ending) -> bool {
        let Some(mut channel) = self
            .control
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return false;
        };
        let _ = channel.set_write_timeout(Some(GOODBYE_TIMEOUT));
        match write_frame(
            &mut channel,
            &Message::Goodbye {
                ending: ending.clone(),
            },
        ) {
            Ok(()) => {
                tracing::info!(%ending, "said goodbye on the control channel");
                // Closing with unread bytes would reset the connection and throw the goodbye
                // away: read whatever came (the standby sends nothing, but be sure) first.
                let _ = channel.set_read_timeout(Some(Duration::from_millis(1)));
                let mut sink = [0u8; 4096];
                while matches!(std::io::Read::read(&mut channel, &mut sink), Ok(n) if n > 0) {}
                channel.close();
                true
            }
            Err(e) => {
                tracing::warn!("could not say goodbye on the control channel: {e}");
                false
            }
        }
    }

    /// Time since the ping the standby's newest answer echoed (`None` before the channel opened).
    pub fn answer_age(&self) -> Option<Duration> {
        self.liveness.get().map(PeerLiveness::silent_for)
    }

    /// Whether the standby stopped answering (or never did).
    pub fn standby_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    /// Whether this primary may have been silent to its standby for its failure timeout — the
    /// standby's answers stopped that long ago by our clock, or our clock itself stood still (a
    /// frozen host) since the last confirmation — so that the standby may have taken over: then
    /// nothing may be released before the witness confirms this copy still holds the guest.
    pub fn may_have_been_silent(&self) -> bool {
        !self.release_permit().allows()
    }

    /// The check every frame of a release passes.
    pub fn release_permit(&self) -> ReleasePermit {
        ReleasePermit {
            liveness: self.liveness.clone(),
            confirmed_jumps: self.confirmed_jumps.clone(),
        }
    }

    /// The witness confirmed this copy still holds the guest after a possible silence.
    pub fn silence_confirmed(&self) {
        if let Some(l) = self.liveness.get() {
            self.confirmed_jumps
                .store(l.clock_jumps(), Ordering::SeqCst);
        }
    }
}

impl Drop for StandbyWatch {
    fn drop(&mut self) {
        self.stop_answering();
    }
}

/// Connects the control channel and binds the probe socket beside it (the same local address).
fn open_channels(plan: &ChannelPlan) -> Result<(Link, UdpSocket), String> {
    let mut channel = link::connect(
        &plan.to,
        &plan.security,
        OPEN_TIMEOUT,
        plan.terms.failure_timeout,
    )
    .map_err(|e| e.to_string())?;
    write_frame(
        &mut channel,
        &Message::HeartbeatOpen {
            session: plan.terms.session,
        },
    )
    .map_err(|e| e.to_string())?;
    let local = channel.local_addr().map_err(|e| e.to_string())?;
    let probes = UdpSocket::bind(SocketAddr::new(local.ip(), 0)).map_err(|e| {
        format!(
            "cannot bind the heartbeat probe socket on {}: {e}",
            local.ip()
        )
    })?;
    Ok((channel, probes))
}
