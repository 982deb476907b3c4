//! The migrating side: pre-copy rounds on a thread of their own while the guest runs, then the
//! fenced hand-over on the VM's event-loop thread.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm::control::{ControlHandle, VmCommand, VmReply};
use vmm::dirty::{DirtySet, DirtyTracker};
use vmm::memory::{GuestMemory, PAGE_SIZE};
use vmm::vm::Vm;
use vmm::Machine;

use super::{MigrationParams, MigrationState, MigrationStatus};
use crate::link::{self, Link, OpenError};
use crate::wire::{read_frame, write_frame, FrameError, Message, PageRun};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// What the hand-over costs besides the last pages (state capture, transfer, apply, round trip), in
/// milliseconds, as measured on the development machine.
const HANDOVER_OVERHEAD_MS: f64 = 10.0;
/// Bandwidth assumed before any measurement, bytes per second.
const ASSUMED_BANDWIDTH: f64 = 100e6;
/// Sends smaller than this are too short to measure bandwidth by.
const MEASURE_MIN_BYTES: u64 = 256 << 10;
/// Raw page bytes per `Pages` message.
const BATCH_BYTES: usize = 4 << 20;

/// A migration in progress, as its starter sees it.
pub struct MigrationHandle {
    status: Arc<Mutex<MigrationStatus>>,
    cancel: Arc<AtomicBool>,
    _thread: JoinHandle<()>,
}

impl MigrationHandle {
    /// Current progress.
    pub fn status(&self) -> MigrationStatus {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Asks the migration to stop before the hand-over; the guest keeps running here.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }
}

#[derive(Debug, thiserror::Error)]
enum SourceError {
    #[error("{0}")]
    Link(#[from] OpenError),
    #[error("{0}")]
    Wire(#[from] FrameError),
    #[error("the destination refused: {0}")]
    Refused(String),
    #[error("unexpected message from the destination: {0}")]
    Protocol(String),
    #[error("dirty tracking: {0}")]
    Dirty(String),
    #[error("reading guest memory at {gpa:#x}: {reason}")]
    Memory { gpa: u64, reason: String },
    #[error("the VM: {0}")]
    Vm(String),
    #[error("cancelled")]
    Cancelled,
}

type Status = Arc<Mutex<MigrationStatus>>;

fn update(status: &Status, f: impl FnOnce(&mut MigrationStatus)) {
    f(&mut status.lock().unwrap_or_else(|e| e.into_inner()));
}

/// Starts migrating `machine` to `params.to`. Call on the VM's event-loop thread (from a control
/// command); `control` is used later to run the hand-over there.
pub fn start_migration(
    machine: &mut Machine,
    params: MigrationParams,
    control: ControlHandle,
) -> std::io::Result<MigrationHandle> {
    // Migration takes over the dirty logs until it ends; a later snapshot of this VM (if it stays)
    // must be full.
    let dirty_claim = machine
        .claim_dirty_tracking("a migration")
        .map_err(std::io::Error::other)?;
    let status = Arc::new(Mutex::new(MigrationStatus::new(&params.to)));
    let cancel = Arc::new(AtomicBool::new(false));
    let job = Job {
        params,
        memory: machine.memory().clone(),
        vm: machine.vm().clone(),
        tracker: machine.dirty_tracker(),
        description: machine.description().clone(),
        control,
        status: status.clone(),
        cancel: cancel.clone(),
        started: Instant::now(),
    };
    let thread = std::thread::Builder::new()
        .name("migration".into())
        .spawn(move || {
            // Held for the thread's life: nobody else collects the dirty bits meanwhile.
            let _dirty_claim = dirty_claim;
            // Before the sandbox, which forbids the files name resolution reads.
            let to = link::PeerAddress::resolve(&job.params.to);
            vmm::seccomp::apply_or_exit(vmm::seccomp::ThreadKind::Replication);
            job.run(to)
        })?;
    Ok(MigrationHandle {
        status,
        cancel,
        _thread: thread,
    })
}

struct Job {
    params: MigrationParams,
    memory: GuestMemory,
    vm: Arc<Vm>,
    description: vmm::machine::MachineDescription,
    tracker: DirtyTracker,
    control: ControlHandle,
    status: Status,
    cancel: Arc<AtomicBool>,
    started: Instant,
}

impl Job {
    fn run(self, to: Result<link::PeerAddress, OpenError>) {
        let span = tracing::info_span!("migration", to = %self.params.to);
        let _guard = span.enter();
        let status = self.status.clone();
        let started = self.started;
        let result = to
            .map_err(SourceError::from)
            .and_then(|to| self.migrate(&to));
        update(&status, |s| {
            s.elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
            match &result {
                Ok(()) => s.state = MigrationState::Completed,
                Err(SourceError::Cancelled) => s.state = MigrationState::Cancelled,
                Err(e) => {
                    s.state = MigrationState::Failed;
                    s.error = Some(e.to_string());
                }
            }
        });
        match result {
            Ok(()) => tracing::info!("migration completed"),
            Err(e) => {
                tracing::warn!("migration did not complete: {e}; the guest keeps running here")
            }
        }
    }

    fn migrate(mut self, to: &link::PeerAddress) -> Result<(), SourceError> {
        let mut stream = link::open(
            to,
            &self.description,
            &self.params.security,
            CONNECT_TIMEOUT,
            IO_TIMEOUT,
        )?;

        let mut tracker = std::mem::take(&mut self.tracker);
        tracker
            .start(&self.vm, &self.memory)
            .map_err(|e| SourceError::Dirty(e.to_string()))?;
        update(&self.status, |s| s.state = MigrationState::PreCopy);
        let result = self.precopy(&mut stream, &mut tracker);
        match result {
            Ok(()) => self.hand_over(stream, tracker),
            Err(e) => {
                if matches!(e, SourceError::Cancelled) {
                    let _ = write_frame(&mut stream, &Message::Cancel);
                }
                let _ = tracker.stop(&self.vm, &self.memory);
                Err(e)
            }
        }
    }

    fn precopy(&self, stream: &mut Link, tracker: &mut DirtyTracker) -> Result<(), SourceError> {
        // Round 0: everything (zero pages are skipped: the destination's memory starts zeroed).
        send_set(
            stream,
            &self.memory,
            &DirtySet::all(&self.memory),
            0,
            true,
            &self.status,
        )?;
        let mut last_collect = Instant::now();
        for round in 1.. {
            if self.cancel.load(Ordering::SeqCst) {
                return Err(SourceError::Cancelled);
            }
            tracker
                .collect(&self.vm, &self.memory)
                .map_err(|e| SourceError::Dirty(e.to_string()))?;
            let pending = tracker.pending_pages();
            let since = last_collect.elapsed().as_secs_f64().max(1e-6);
            last_collect = Instant::now();
            let measured = self
                .status
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .bandwidth_bytes_per_s;
            // Until a round has been big enough to measure, assume a modest 100 MB/s link.
            let bandwidth = if measured > 0.0 {
                measured
            } else {
                ASSUMED_BANDWIDTH
            };
            let estimate_ms = (pending * PAGE_SIZE as u64) as f64 / bandwidth * 1e3;
            update(&self.status, |s| {
                s.round = round;
                s.dirty_pages = pending;
                s.dirty_rate_pages_per_s = pending as f64 / since;
                s.estimated_downtime_ms = estimate_ms;
                s.elapsed_ms = self.started.elapsed().as_secs_f64() * 1e3;
            });
            tracing::debug!(round, pending, estimate_ms, "pre-copy round");
            // The hand-over also sends the device state and waits for the destination to apply it;
            // keep room for that inside the target.
            let target_ms = self.params.downtime_target.as_secs_f64() * 1e3;
            let page_budget_ms = (target_ms - HANDOVER_OVERHEAD_MS).max(target_ms / 2.0);
            if estimate_ms <= page_budget_ms
                || round > self.params.max_rounds
                || self.started.elapsed() > self.params.precopy_timeout
            {
                return Ok(());
            }
            let set = tracker.take();
            if let Err(e) = send_set(stream, &self.memory, &set, round, false, &self.status) {
                tracker.fold_back(&set);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Runs the stop-and-copy and fenced hand-over on the VM's event-loop thread.
    fn hand_over(&self, stream: Link, tracker: DirtyTracker) -> Result<(), SourceError> {
        update(&self.status, |s| s.state = MigrationState::StopAndCopy);
        let status = self.status.clone();
        let to = self.params.to.clone();
        let job = move |machine: &mut Machine| -> VmReply {
            match stop_and_copy(machine, stream, tracker, &status, &to) {
                Ok(downtime) => {
                    update(&status, |s| {
                        s.downtime_ms = Some(downtime.as_secs_f64() * 1e3)
                    });
                    VmReply::Done(machine.info())
                }
                Err(e) => VmReply::Error(e.to_string()),
            }
        };
        match self.control.request(
            VmCommand::OnEventLoop(Box::new(job)),
            Duration::from_secs(300),
        ) {
            Ok(VmReply::Done(_)) => Ok(()),
            Ok(VmReply::Error(e)) => Err(SourceError::Vm(e)),
            Ok(other) => Err(SourceError::Vm(format!("unexpected reply {other:?}"))),
            Err(e) => Err(SourceError::Vm(e.to_string())),
        }
    }
}

/// Stops the vCPUs, sends the last dirty pages and the state, and completes the fenced hand-over.
/// On any failure before `Go` is sent the guest is resumed here. Returns the downtime.
fn stop_and_copy(
    machine: &mut Machine,
    mut stream: Link,
    mut tracker: DirtyTracker,
    status: &Status,
    to: &str,
) -> Result<Duration, SourceError> {
    let t0 = Instant::now();
    machine
        .pause()
        .map_err(|e| SourceError::Vm(e.to_string()))?;
    let vm = machine.vm().clone();
    let memory = machine.memory().clone();
    let paused = t0.elapsed();
    let result = (|| -> Result<(), SourceError> {
        tracker
            .collect(&vm, &memory)
            .map_err(|e| SourceError::Dirty(e.to_string()))?;
        let set = tracker.take();
        update(status, |s| s.dirty_pages = set.count());
        let collected = t0.elapsed();
        send_set(&mut stream, &memory, &set, FINAL_ROUND, false, status)?;
        let pages_sent = t0.elapsed();
        let state = machine
            .capture_state()
            .map_err(|e| SourceError::Vm(e.to_string()))?;
        let snapshot = vmm::snapshot::encode(&state).map_err(|e| SourceError::Vm(e.to_string()))?;
        let captured = t0.elapsed();
        write_frame(&mut stream, &Message::State { snapshot })?;
        expect(&mut stream, |m| matches!(m, Message::Applied), "Applied")?;
        let applied = t0.elapsed();
        write_frame(&mut stream, &Message::Go)?;
        stream.flush().map_err(FrameError::from)?;
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        tracing::info!(
            pages = set.count(),
            paused_ms = ms(paused),
            collected_ms = ms(collected),
            pages_sent_ms = ms(pages_sent),
            state_captured_ms = ms(captured),
            applied_ms = ms(applied),
            "hand-over timeline"
        );
        Ok(())
    })();
    let _ = tracker.stop(&vm, &memory);
    match result {
        Ok(()) => {
            // From here on the guest belongs to the destination: never run it again.
            machine.mark_migrated(to.to_string());
            Ok(t0.elapsed())
        }
        Err(e) => {
            let _ = write_frame(&mut stream, &Message::Cancel);
            machine.resume();
            Err(e)
        }
    }
}

/// Reads one message and checks it is the expected one.
fn expect(stream: &mut Link, ok: impl Fn(&Message) -> bool, what: &str) -> Result<(), SourceError> {
    match read_frame::<_, Message>(stream)? {
        m if ok(&m) => Ok(()),
        Message::Error { message } => Err(SourceError::Refused(message)),
        other => Err(SourceError::Protocol(format!(
            "expected {what}, got {other:?}"
        ))),
    }
}

/// The round number of the stop-and-copy's pages.
const FINAL_ROUND: u32 = u32::MAX;

/// Sends the pages of `set`; with `skip_zero`, all-zero pages are left out. A pre-copy round ends
/// with `RoundEnd` and waits for the destination's `RoundReceived`: the bandwidth measured is what
/// reached the destination's memory, not what filled the socket buffers, and nothing is left in
/// flight when the source stops (pages queued there would all be downtime).
fn send_set(
    stream: &mut Link,
    mem: &GuestMemory,
    set: &DirtySet,
    round: u32,
    skip_zero: bool,
    status: &Status,
) -> Result<(), SourceError> {
    let started = Instant::now();
    let mut runs: Vec<PageRun> = Vec::new();
    let mut batch = 0usize;
    let mut bytes = 0u64;
    let mut pages = 0u64;
    let mut buf = vec![0u8; BATCH_BYTES];
    let flush = |runs: &mut Vec<PageRun>,
                 batch: &mut usize,
                 stream: &mut Link|
     -> Result<(), SourceError> {
        if runs.is_empty() {
            return Ok(());
        }
        write_frame(
            stream,
            &Message::Pages {
                round,
                runs: std::mem::take(runs),
            },
        )?;
        *batch = 0;
        Ok(())
    };
    for (addr, len) in set.runs() {
        let mut done = 0u64;
        while done < len {
            let n = ((len - done) as usize).min(BATCH_BYTES);
            let gpa = addr.0 + done;
            mem.read_slice(&mut buf[..n], GuestAddress(gpa))
                .map_err(|e| SourceError::Memory {
                    gpa,
                    reason: e.to_string(),
                })?;
            for (i, page) in buf[..n].chunks(PAGE_SIZE).enumerate() {
                if skip_zero && page.iter().all(|b| *b == 0) {
                    continue;
                }
                let page_gpa = gpa + (i * PAGE_SIZE) as u64;
                match runs.last_mut() {
                    Some(last) if last.gpa + last.data.len() as u64 == page_gpa => {
                        last.data.extend_from_slice(page)
                    }
                    _ => runs.push(PageRun {
                        gpa: page_gpa,
                        data: page.to_vec(),
                    }),
                }
                batch += page.len();
                bytes += page.len() as u64;
                pages += 1;
                if batch >= BATCH_BYTES {
                    flush(&mut runs, &mut batch, stream)?;
                }
            }
            done += n as u64;
        }
    }
    flush(&mut runs, &mut batch, stream)?;
    if round != FINAL_ROUND {
        write_frame(stream, &Message::RoundEnd { round })?;
        expect(
            stream,
            |m| matches!(m, Message::RoundReceived { round: r } if *r == round),
            "RoundReceived",
        )?;
    }
    let secs = started.elapsed().as_secs_f64();
    update(status, |s| {
        s.bytes_sent += bytes;
        s.pages_sent += pages;
        if bytes >= MEASURE_MIN_BYTES && secs > 0.0 {
            let sample = bytes as f64 / secs;
            s.bandwidth_bytes_per_s = if s.bandwidth_bytes_per_s > 0.0 {
                0.5 * s.bandwidth_bytes_per_s + 0.5 * sample
            } else {
                sample
            };
        }
    });
    Ok(())
}
