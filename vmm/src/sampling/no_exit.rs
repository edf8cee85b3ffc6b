//! The no-exit sampling tier: samples taken in the host kernel, never
//! stopping a vCPU (the `no-exit` and `hybrid` tiers of an action,
//! [`crate::config::SampleTier`]).
//!
//! One sample, hop by hop:
//! 1. Sampling starts with a timer whose action uses the tier
//!    ([`crate::config::kperf::perf_timer`]): the engine schedules no kick
//!    for it (hybrid: one every `kick_every` periods), the guest's event
//!    rings are switched on, and the perf reader thread is told the period.
//! 2. The reader opens a cpu-clock event on every vCPU thread whose tid that
//!    thread published at its start ([`NoExitShared::set_tid`];
//!    [`super::perf_ring::PerfEvent`]).
//! 3. While the vCPU thread runs, the host's hrtimer interrupt takes the
//!    sample (the guest IP when in guest mode) and appends it to the ring;
//!    the vCPU goes on running.
//! 4. The vCPU's own thread, at its loop tops (which the guest's own exits
//!    cause anyway), drains the guest's context switches into that vCPU's
//!    [`SwitchLog`] and marks it covered up to then
//!    ([`SamplingShared::drain_guest_events`]).
//! 5. The reader, every [`READ_PERIOD`], moves each ring's samples to its
//!    vCPU's [`Resolver`], attributes those the log covers to a guest thread,
//!    and pushes them, with the thread's name and the IP as the only frame,
//!    into the same [`super::SampleBuffer`] as the kick tier's samples: the
//!    folded, SVG and pprof profiles and `GET /profile` read them there.
//! 6. Stop disables every event at once ([`NoExitShared::stop`]); the reader
//!    drains the rings, resolves what is left with the log as it stands and
//!    closes the events. At the end of the run it drains the guest's rings
//!    a last time (the vCPUs are stopped) and exits ([`NoExitShared::close`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use kperf::sampler;
use serde::Serialize;
use utoipa::ToSchema;
use vm_memory::GuestMemoryMmap;

use super::attribution::{Attribution, Resolver, SwitchLog};
use super::capture::RawSample;
use super::perf_ring::{Mode, PerfEvent, Record};
use super::samplers::{thread_table, SamplerData};
use super::walk::Stack;
use super::SamplingShared;
use crate::config::kperf::PerfTimer;

/// How often the reader empties the rings (a ring holds over 300 ms at
/// 20 kHz, [`super::perf_ring::DATA_PAGES`]).
pub const READ_PERIOD: Duration = Duration::from_millis(10);
/// Samples held per vCPU while they wait for the switch log to cover them.
pub const PENDING_LIMIT: usize = 100_000;
/// The thread name of a sample before the vCPU's first context switch.
pub const BEFORE_FIRST_SWITCH: &str = "(before first switch)";
/// The thread name of a sample in a gap of the switch log.
pub const UNKNOWN_THREAD: &str = "(unknown: switch log overrun)";

/// The no-exit tier's figures (the summary's `sampling.no_exit`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, ToSchema)]
pub struct NoExitSummary {
    /// The sampling period, ns (the timer's).
    pub period_ns: u64,
    /// The tier: `no-exit` or `hybrid`.
    pub tier: String,
    /// Samples read from the rings.
    pub samples: u64,
    /// Of those, taken in guest user mode (in the profile).
    pub guest_user: u64,
    /// Taken in guest kernel mode (in the profile). kvm_pvm emulates guest
    /// CPL0 in the host, so there they count as `host`.
    pub guest_kernel: u64,
    /// Taken while the vCPU thread was in the host (exits, emulation): not
    /// in the profile.
    pub host: u64,
    /// Samples the kernel could not write into a full ring
    /// (`PERF_RECORD_LOST`).
    pub lost: u64,
    /// Guest-mode samples before the vCPU's first context switch.
    pub before_first_switch: u64,
    /// Guest-mode samples in a gap of the switch log (its ring overran).
    pub unknown_thread: u64,
    /// Samples dropped while waiting for the log (more than
    /// [`PENDING_LIMIT`] waiting on one vCPU).
    pub pending_overflow: u64,
    /// Context switches logged, all vCPUs.
    pub switches: u64,
    /// Gaps in the switch logs (guest ring overruns).
    pub log_gaps: u64,
    /// Unparsable ring bytes and implausible ring heads (0 unless the
    /// kernel and this reader disagree).
    pub ring_errors: u64,
    /// Why an event could not be opened, the first time it failed.
    pub open_error: Option<String>,
}

/// What the reader is asked to do.
#[derive(Debug, Default)]
struct Control {
    /// The timer sampled now; `None`: stopped.
    plan: Option<PerfTimer>,
    /// Bumped at each start and stop.
    generation: u64,
    /// The VM ended: a last pass, then exit.
    closing: bool,
}

/// The tier's state shared by the vCPU threads, the controller and the reader.
#[derive(Debug)]
pub struct NoExitShared {
    /// Per vCPU: its host thread id, 0 until the thread started.
    tids: Vec<AtomicI32>,
    /// Per vCPU: its context switches (filled by its thread, read by the reader).
    logs: Vec<Mutex<SwitchLog>>,
    /// The guest's rings are drained into the logs (set by the first start).
    logging: AtomicBool,
    /// The open events (the reader opens and closes them; stop disables them).
    events: Mutex<Vec<Option<PerfEvent>>>,
    control: Mutex<Control>,
    control_cv: Condvar,
    figures: Mutex<NoExitSummary>,
    /// Samples pushed into the profile.
    pub pushed: AtomicU64,
    /// The reader thread once spawned; `closed` once the VM ended.
    reader: Mutex<ReaderSlot>,
}

/// The reader thread, and whether the VM's end closed the slot.
#[derive(Debug, Default)]
struct ReaderSlot {
    handle: Option<JoinHandle<()>>,
    closed: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl NoExitShared {
    /// The tier's state for `vcpus` vCPUs, stopped.
    pub fn new(vcpus: usize) -> Self {
        Self {
            tids: (0..vcpus).map(|_| AtomicI32::new(0)).collect(),
            logs: (0..vcpus)
                .map(|_| Mutex::new(SwitchLog::default()))
                .collect(),
            logging: AtomicBool::new(false),
            events: Mutex::new((0..vcpus).map(|_| None).collect()),
            control: Mutex::new(Control::default()),
            control_cv: Condvar::new(),
            figures: Mutex::new(NoExitSummary::default()),
            pushed: AtomicU64::new(0),
            reader: Mutex::new(ReaderSlot::default()),
        }
    }

    /// Spawns the reader thread with `spawn` unless it runs or the VM ended.
    pub fn ensure_reader(
        &self,
        spawn: impl FnOnce() -> std::io::Result<JoinHandle<()>>,
    ) -> std::io::Result<()> {
        let mut slot = lock(&self.reader);
        if slot.closed || slot.handle.is_some() {
            return Ok(());
        }
        slot.handle = Some(spawn()?);
        Ok(())
    }

    /// At the VM's end, after the vCPUs stopped: the reader's last pass
    /// ([`NoExitShared::close`]), then it is joined. No reader starts after.
    pub fn close_and_join(&self) {
        let handle = {
            let mut slot = lock(&self.reader);
            slot.closed = true;
            slot.handle.take()
        };
        self.close();
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }

    /// vCPU `id`'s thread publishes its host thread id (at its start).
    pub fn set_tid(&self, id: u32, tid: i32) {
        if let Some(slot) = self.tids.get(id as usize) {
            slot.store(tid, Ordering::Release);
        }
    }

    /// Whether the guest's switches are being logged.
    pub fn logging(&self) -> bool {
        self.logging.load(Ordering::Acquire)
    }

    /// vCPU `id`'s switch log.
    pub fn log(&self, id: u32) -> Option<MutexGuard<'_, SwitchLog>> {
        self.logs.get(id as usize).map(lock)
    }

    /// Starts sampling `plan` (the caller switched the guest's rings on).
    pub fn start(&self, plan: PerfTimer) {
        self.logging.store(true, Ordering::Release);
        let mut control = lock(&self.control);
        control.plan = Some(plan);
        control.generation += 1;
        let mut figures = lock(&self.figures);
        figures.period_ns = plan.period_ns;
        figures.tier = plan.tier.name().to_string();
        drop(figures);
        self.control_cv.notify_all();
    }

    /// Stops sampling at once: every event disabled now (the reader still
    /// drains what they recorded, then closes them).
    pub fn stop(&self) {
        for event in lock(&self.events).iter().flatten() {
            event.disable();
        }
        let mut control = lock(&self.control);
        if control.plan.take().is_some() {
            control.generation += 1;
        }
        self.control_cv.notify_all();
    }

    /// Ends the reader: a last pass over the rings and the logs (call after
    /// the vCPUs stopped), then it returns.
    pub fn close(&self) {
        self.stop();
        lock(&self.control).closing = true;
        self.control_cv.notify_all();
    }

    /// The figures so far.
    pub fn summary(&self) -> NoExitSummary {
        let mut figures = lock(&self.figures).clone();
        for log in &self.logs {
            let (switches, gaps) = lock(log).counts();
            figures.switches += switches;
            figures.log_gaps += gaps;
        }
        figures
    }

    /// Waits up to `timeout` for a change of plan; returns the control
    /// state (generation, plan, closing).
    fn wait(&self, seen: u64, timeout: Duration) -> (u64, Option<PerfTimer>, bool) {
        let control = lock(&self.control);
        let control = if control.generation == seen && !control.closing {
            self.control_cv
                .wait_timeout(control, timeout)
                .unwrap_or_else(|p| p.into_inner())
                .0
        } else {
            control
        };
        (control.generation, control.plan, control.closing)
    }
}

/// One pending sample: its IP and mode.
type Sampled = (u64, Mode);

/// The reader thread's own state.
#[derive(Debug)]
struct Reader {
    resolvers: Vec<Resolver<Sampled>>,
    names: HashMap<u64, String>,
    epoch_ns: u64,
}

/// The reader thread's body: runs until [`NoExitShared::close`].
/// `epoch_ns` is the VM's device-time zero in `CLOCK_MONOTONIC`.
pub fn run_reader(sampling: &SamplingShared, mem: &GuestMemoryMmap, epoch_ns: u64) {
    let tier = &sampling.no_exit;
    let mut reader = Reader {
        resolvers: (0..tier.tids.len())
            .map(|_| Resolver::new(PENDING_LIMIT))
            .collect(),
        names: HashMap::new(),
        epoch_ns,
    };
    let mut generation = 0;
    let mut plan = None;
    // Per vCPU: its event failed to open under this generation.
    let mut failed = vec![false; tier.tids.len()];
    loop {
        let (now_generation, now_plan, closing) = tier.wait(generation, READ_PERIOD);
        if now_generation != generation || closing {
            // Stopped, restarted or closing: what the old events recorded is
            // resolved with the logs as they stand, and they are closed.
            reader.read_all(sampling);
            if closing {
                for id in 0..tier.tids.len() as u32 {
                    sampling.drain_guest_events(id, mem, u64::MAX);
                }
            }
            reader.resolve(sampling, mem, true);
            lock(&tier.events).iter_mut().for_each(|e| *e = None);
            (generation, plan) = (now_generation, now_plan);
            failed.fill(false);
            if closing {
                return;
            }
        }
        if let Some(plan) = plan {
            open_missing(tier, plan, &mut failed);
        }
        reader.read_all(sampling);
        reader.resolve(sampling, mem, false);
    }
}

/// Opens the event of every vCPU whose thread has started and has none
/// (once per start: a vCPU whose open `failed` is not retried until the
/// next start).
fn open_missing(tier: &NoExitShared, plan: PerfTimer, failed: &mut [bool]) {
    let mut events = lock(&tier.events);
    for (id, slot) in events.iter_mut().enumerate() {
        let tid = tier.tids[id].load(Ordering::Acquire);
        if slot.is_some() || tid == 0 || failed[id] {
            continue;
        }
        match PerfEvent::open(tid, plan.period_ns) {
            Ok(event) => *slot = Some(event),
            Err(e) => {
                let mut figures = lock(&tier.figures);
                if figures.open_error.is_none() {
                    log::warn!("no-exit sampling: perf_event_open on vCPU {id}: {e}");
                    figures.open_error = Some(format!("vCPU {id}: perf_event_open: {e}"));
                }
                failed[id] = true;
            }
        }
    }
}

impl Reader {
    /// Moves every ring's records into the resolvers (lock order: the
    /// events, then the figures, as everywhere).
    fn read_all(&mut self, sampling: &SamplingShared) {
        let tier = &sampling.no_exit;
        let mut events = lock(&tier.events);
        let mut figures = lock(&tier.figures);
        for (id, event) in events.iter_mut().enumerate() {
            let Some(event) = event else { continue };
            let resolver = &mut self.resolvers[id];
            let epoch = self.epoch_ns;
            let stats = event.read(|record| match record {
                Record::Sample {
                    ip, mode, time_ns, ..
                } => {
                    figures.samples += 1;
                    *match mode {
                        Mode::GuestUser => &mut figures.guest_user,
                        Mode::GuestKernel => &mut figures.guest_kernel,
                        Mode::Host => &mut figures.host,
                    } += 1;
                    if mode != Mode::Host {
                        resolver.push(time_ns.saturating_sub(epoch), (ip, mode));
                    }
                }
                Record::Lost(n) => figures.lost += n,
            });
            figures.ring_errors += stats.bad_heads + stats.parse.corrupt_bytes.min(1);
        }
        figures.pending_overflow = self.resolvers.iter().map(|r| r.overflowed).sum();
    }

    /// Attributes what the logs cover (everything with `all`) and pushes it
    /// into the profile.
    fn resolve(&mut self, sampling: &SamplingShared, mem: &GuestMemoryMmap, all: bool) {
        let tier = &sampling.no_exit;
        let (mut before, mut unknown) = (0, 0);
        for (id, resolver) in self.resolvers.iter_mut().enumerate() {
            if resolver.is_empty() {
                continue;
            }
            let mut resolved = Vec::new();
            {
                let mut log = lock(&tier.logs[id]);
                resolver.resolve(&mut log, all, |s, a| resolved.push((s, a)));
            }
            for ((ip, mode), attribution) in resolved {
                let (tid, name) = match attribution {
                    Attribution::Thread(tid) => (tid, thread_name(&mut self.names, mem, tid)),
                    Attribution::BeforeFirstSwitch => {
                        before += 1;
                        (0, BEFORE_FIRST_SWITCH.to_string())
                    }
                    Attribution::Unknown => {
                        unknown += 1;
                        (0, UNKNOWN_THREAD.to_string())
                    }
                };
                // Cannot truncate: fewer vCPUs than u32::MAX.
                sampling
                    .samples
                    .push(raw_sample(id as u32, tid, name, ip, mode));
                tier.pushed.fetch_add(1, Ordering::Relaxed);
            }
        }
        let mut figures = lock(&tier.figures);
        figures.before_first_switch += before;
        figures.unknown_thread += unknown;
    }
}

/// Guest thread `tid`'s name from its thread table ("idle" for 0), cached.
fn thread_name(names: &mut HashMap<u64, String>, mem: &GuestMemoryMmap, tid: u64) -> String {
    if tid == 0 {
        return "idle".to_string();
    }
    if let Some(name) = names.get(&tid) {
        return name.clone();
    }
    let name = thread_table(mem)
        .iter()
        .find(|t| t.tid == tid)
        .map(|t| {
            let len = t.name.iter().position(|&b| b == 0).unwrap_or(t.name.len());
            String::from_utf8_lossy(&t.name[..len]).into_owned()
        })
        .unwrap_or_else(|| format!("tid {tid}"));
    // Bounded: the tids come from the guest's event ring.
    if names.len() < NAME_CACHE_LIMIT {
        names.insert(tid, name.clone());
    }
    name
}

/// Thread names [`thread_name`] keeps at most (the guest has at most
/// `MAX_THREADS` threads; a ring that names more is misbehaving).
const NAME_CACHE_LIMIT: usize = 4096;

/// The profile's sample of one no-exit sample: the thread and the IP as the
/// only frame (no stack in this tier).
fn raw_sample(vcpu: u32, tid: u64, thread_name: String, ip: u64, mode: Mode) -> RawSample {
    let leaf = Stack {
        frames: vec![ip],
        ..Stack::default()
    };
    let user = mode == Mode::GuestUser;
    RawSample {
        vcpu,
        tid,
        thread_name,
        cpl: if user { 3 } else { 0 },
        user_stack: if user { leaf.clone() } else { Stack::default() },
        kernel_stack: if user { Stack::default() } else { leaf },
        samplers: Box::new(SamplerData {
            sampled: sampler::TH_INFO
                | if user {
                    sampler::USTACK
                } else {
                    sampler::KSTACK
                },
            ..SamplerData::default()
        }),
        ..RawSample::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_a_no_exit_sample_is_its_thread_and_one_frame() {
        let user = raw_sample(1, 4, "cruncher".into(), 0x20_1234, Mode::GuestUser);
        assert_eq!((user.vcpu, user.tid, user.cpl), (1, 4, 3));
        assert_eq!(user.user_stack.frames, vec![0x20_1234]);
        assert!(user.kernel_stack.frames.is_empty() && user.in_profile());
        let kernel = raw_sample(0, 0, "idle".into(), 0x10_0000, Mode::GuestKernel);
        assert_eq!((kernel.cpl, kernel.kernel_stack.frames.len()), (0, 1));
    }

    #[test]
    fn test_stop_bumps_the_generation_once_and_close_ends_the_wait() {
        let tier = NoExitShared::new(1);
        let plan = PerfTimer {
            timer: 0,
            period_ns: 1_000_000,
            action: 1,
            tier: crate::config::SampleTier::NoExit,
        };
        tier.start(plan);
        assert!(tier.logging());
        assert_eq!(tier.wait(0, Duration::ZERO), (1, Some(plan), false));
        tier.stop();
        tier.stop();
        assert_eq!(tier.wait(1, Duration::ZERO), (2, None, false));
        tier.close();
        assert!(tier.wait(2, Duration::from_secs(60)).2);
        assert_eq!(tier.summary().tier, "no-exit");
    }
}
