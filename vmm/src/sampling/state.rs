//! Sampling state shared by the vCPU threads and the controller: the kperf
//! engine behind one mutex, each vCPU's kperf deadline, the synchronous stop
//! protocol, and where samples and trace records go.
//!
//! The engine lock subsumes XNU's per-timer locks (see the `kperf` crate).
//!
//! Stop is synchronous (KT-SP-1, AMB-17) and goes through kperf's SHUTDOWN
//! state (KT-F-1): [`SamplingShared::stop`] moves the engine ON → SHUTDOWN and
//! cancels every deadline, waits until every vCPU thread has passed its loop
//! top once more (an expiry racing the stop samples nothing in SHUTDOWN), then
//! moves it SHUTDOWN → OFF. No sample is taken after it returns.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use kperf::{Kperf, KperfError, SampleRequest};
use metronome_devices::LatencyHistogram;
use vm_memory::{GuestMemoryError, GuestMemoryMmap};

use super::buffer::SampleBuffer;
use super::guest_events::GuestEventRings;
use super::lightweight::LightweightPet;
use super::no_exit::NoExitShared;
use super::trace::{TraceBuffer, TraceRecord, GUEST_SWITCH};
use crate::config::{KperfConfigError, SamplingConfig};

/// "No deadline".
pub const NO_DEADLINE: u64 = u64::MAX;
/// How long a synchronous stop waits for one vCPU before kicking it again.
const ACK_RETRY: Duration = Duration::from_millis(10);

/// A sampling stop begun by [`SamplingShared::begin_stop`]: the
/// acknowledgement epoch it waits for, and whether it turns sampling OFF
/// when complete (another thread's stop does that itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingStop {
    epoch: u64,
    owner: bool,
}

/// Sampling state shared by the vCPU threads and the controller.
#[derive(Debug)]
pub struct SamplingShared {
    kperf: Mutex<Kperf>,
    /// Per vCPU: the kperf host deadline in device time ([`NO_DEADLINE`] = none).
    deadlines: Vec<AtomicU64>,
    /// The step of every vCPU's deadlines while sampling runs, when fixed
    /// ([`Kperf::fixed_on_cpu_period`]; 0 = not fixed). Written by
    /// [`SamplingShared::start`] under the engine lock; the period cannot
    /// change until sampling stops, which cancels every deadline.
    fixed_period_ns: AtomicU64,
    /// Bumped by every stop; each vCPU acknowledges it at its loop top.
    epoch: AtomicU64,
    acked: Vec<AtomicU64>,
    ack_lock: Mutex<()>,
    ack_cv: Condvar,
    /// The trace, when the configuration asks for one (a trace file or a
    /// profile directory, which gets `trace.json`).
    trace: Option<TraceBuffer>,
    /// The guest's event rings (drained only with a trace).
    guest_events: GuestEventRings,
    /// Samples on their way out of the vCPU threads.
    pub samples: SampleBuffer,
    samples_taken: AtomicU64,
    timer_fires: AtomicU64,
    /// Traditional PET.
    pub pet: PetShared,
    /// Lightweight PET: the PET page and the self-sample requests.
    pub lightweight: LightweightPet,
    /// The no-exit tier: perf events, switch logs, the reader's figures.
    pub no_exit: NoExitShared,
    /// The configuration.
    pub config: SamplingConfig,
}

/// Traditional PET's shared state: the one-shot's deadline (serviced on the
/// handler vCPU, AMB-7), the sample requests it broadcasts, the PET sampler
/// thread's wake-up, and what its passes produce.
#[derive(Debug)]
pub struct PetShared {
    /// The PET one-shot's deadline in device time ([`NO_DEADLINE`] = none).
    deadline: AtomicU64,
    /// Per vCPU: a PET sample waiting for that vCPU's next loop top.
    requests: Vec<Mutex<Option<SampleRequest>>>,
    pending: Vec<AtomicBool>,
    /// Set to wake the PET sampler; `closing` ends it.
    wake: Mutex<PetWake>,
    wake_cv: Condvar,
    /// The PET passes' thread samples.
    pub samples: SampleBuffer,
    /// PET passes completed.
    pub passes: AtomicU64,
    /// Threads sampled over all passes.
    pub threads_sampled: AtomicU64,
    /// How long each pass took (the `d` of PET-R-1), ns.
    pub pass_ns: Mutex<LatencyHistogram>,
    /// Broadcast requests a vCPU had not served when the next fire asked
    /// again (the later one replaces it).
    pub remote_missed: AtomicU64,
    /// Thread samples whose stack walk ended on a bad frame pointer.
    pub walk_errors: AtomicU64,
    /// Thread-table entries the passes found corrupt and left out.
    pub corrupt_thread_entries: AtomicU64,
}

/// Why the PET sampler thread wakes.
#[derive(Debug, Default)]
struct PetWake {
    woken: bool,
    closing: bool,
}

impl PetShared {
    fn new(vcpus: usize) -> Self {
        Self {
            deadline: AtomicU64::new(NO_DEADLINE),
            requests: (0..vcpus).map(|_| Mutex::new(None)).collect(),
            pending: (0..vcpus).map(|_| AtomicBool::new(false)).collect(),
            wake: Mutex::new(PetWake::default()),
            wake_cv: Condvar::new(),
            samples: SampleBuffer::with_default_budget(vcpus),
            passes: AtomicU64::new(0),
            threads_sampled: AtomicU64::new(0),
            pass_ns: Mutex::new(LatencyHistogram::new()),
            remote_missed: AtomicU64::new(0),
            walk_errors: AtomicU64::new(0),
            corrupt_thread_entries: AtomicU64::new(0),
        }
    }

    /// The PET one-shot's deadline, if armed.
    pub fn deadline(&self) -> Option<u64> {
        let deadline = self.deadline.load(Ordering::Acquire);
        (deadline != NO_DEADLINE).then_some(deadline)
    }

    /// Sets the PET one-shot's deadline (callers hold the engine lock).
    pub fn set_deadline(&self, deadline: Option<u64>) {
        self.deadline
            .store(deadline.unwrap_or(NO_DEADLINE), Ordering::Release);
    }

    /// Asks vCPU `cpu` to take `request` at its next loop top (the caller
    /// kicks it, without waiting: PET-H-2).
    pub fn request(&self, cpu: usize, request: SampleRequest) {
        if let (Some(slot), Some(flag)) = (self.requests.get(cpu), self.pending.get(cpu)) {
            if slot
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .replace(request)
                .is_some()
            {
                self.remote_missed.fetch_add(1, Ordering::Relaxed);
            }
            flag.store(true, Ordering::Release);
        }
    }

    /// Whether a PET sample waits for vCPU `cpu`.
    pub fn has_request(&self, cpu: usize) -> bool {
        self.pending
            .get(cpu)
            .is_some_and(|flag| flag.load(Ordering::Acquire))
    }

    /// The PET sample vCPU `cpu` was asked for, if any (cheap when none).
    pub fn take_request(&self, cpu: usize) -> Option<SampleRequest> {
        let flag = self.pending.get(cpu)?;
        if !flag.swap(false, Ordering::AcqRel) {
            return None;
        }
        self.requests[cpu]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    fn clear_requests(&self) {
        for (slot, flag) in self.requests.iter().zip(&self.pending) {
            flag.store(false, Ordering::Release);
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
    }

    /// Wakes the PET sampler thread for a pass.
    pub fn wake(&self) {
        self.wake.lock().unwrap_or_else(|p| p.into_inner()).woken = true;
        self.wake_cv.notify_all();
    }

    /// Ends the PET sampler thread's wait for good.
    pub fn close(&self) {
        self.wake.lock().unwrap_or_else(|p| p.into_inner()).closing = true;
        self.wake_cv.notify_all();
    }

    /// The PET sampler thread sleeps until woken (`true`) or closed (`false`).
    pub fn wait(&self) -> bool {
        let mut wake = self.wake.lock().unwrap_or_else(|p| p.into_inner());
        while !wake.woken && !wake.closing {
            wake = self.wake_cv.wait(wake).unwrap_or_else(|p| p.into_inner());
        }
        wake.woken = false;
        !wake.closing
    }
}

impl SamplingShared {
    /// Configures the engine from `config.kperf` for `vcpus` vCPUs (not yet
    /// sampling).
    pub fn new(config: &SamplingConfig, vcpus: u32) -> Result<Self, KperfConfigError> {
        let n = vcpus as usize;
        Ok(Self {
            kperf: Mutex::new(config.engine()?),
            deadlines: (0..n).map(|_| AtomicU64::new(NO_DEADLINE)).collect(),
            fixed_period_ns: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
            acked: (0..n).map(|_| AtomicU64::new(0)).collect(),
            ack_lock: Mutex::new(()),
            ack_cv: Condvar::new(),
            trace: (config.trace_file.is_some() || config.profile_dir.is_some())
                .then(TraceBuffer::default),
            guest_events: GuestEventRings::new(vcpus),
            samples: SampleBuffer::with_default_budget(n),
            samples_taken: AtomicU64::new(0),
            timer_fires: AtomicU64::new(0),
            pet: PetShared::new(n),
            lightweight: LightweightPet::new(n),
            no_exit: NoExitShared::new(n),
            config: config.clone(),
        })
    }

    /// Locks the engine (a poisoned lock is taken over: the engine's state is
    /// plain data, valid between calls).
    pub fn engine(&self) -> MutexGuard<'_, Kperf> {
        self.kperf.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// vCPU `id`'s kperf deadline in device time, if it has one.
    pub fn deadline(&self, id: u32) -> Option<u64> {
        let deadline = self.deadlines[id as usize].load(Ordering::Acquire);
        (deadline != NO_DEADLINE).then_some(deadline)
    }

    /// The fixed step of the vCPUs' deadlines, ns, when there is one
    /// ([`Kperf::fixed_on_cpu_period`], as of the last start).
    pub fn fixed_period(&self) -> Option<u64> {
        let period = self.fixed_period_ns.load(Ordering::Acquire);
        (period != 0).then_some(period)
    }

    /// Sets vCPU `id`'s kperf deadline. Callers hold the engine lock, so that
    /// a concurrent stop's cancel wins.
    pub fn set_deadline(&self, id: u32, deadline: Option<u64>) {
        self.deadlines[id as usize].store(deadline.unwrap_or(NO_DEADLINE), Ordering::Release);
    }

    /// Appends a trace record (nothing when no trace was asked for, or when
    /// the record's level is above the trace level, TR-E-3).
    pub fn record(&self, record: TraceRecord) {
        if let Some(trace) = &self.trace {
            if self.config.trace_level.records(record.id) {
                trace.record(record);
            }
        }
    }

    /// The trace buffer, when the configuration asks for one.
    pub fn trace(&self) -> Option<&TraceBuffer> {
        self.trace.as_ref()
    }

    /// The guest's event rings.
    pub fn guest_events(&self) -> &GuestEventRings {
        &self.guest_events
    }

    /// With a trace, turns the guest's event rings on (before the vCPUs start).
    pub fn enable_guest_events(&self, mem: &GuestMemoryMmap) -> Result<(), GuestMemoryError> {
        match self.trace {
            Some(_) => self.guest_events.enable(mem),
            None => Ok(()),
        }
    }

    /// Turns the guest's event rings on (idempotent, at any time: the guest
    /// checks the flag at each event).
    pub fn enable_guest_events_now(&self, mem: &GuestMemoryMmap) -> Result<(), GuestMemoryError> {
        self.guest_events.enable(mem)
    }

    /// With a trace, moves what vCPU `id`'s guest published into it; with
    /// the no-exit tier, its context switches into the vCPU's switch log,
    /// which is then complete up to device time `now` (read before the
    /// call; `u64::MAX` once the vCPUs stopped). Called by that vCPU's
    /// thread at its loop top, and once the vCPUs stopped: one consumer at a
    /// time per ring. Without new events it costs one load of guest memory.
    pub fn drain_guest_events(&self, id: u32, mem: &GuestMemoryMmap, now: u64) {
        let logging = self.no_exit.logging();
        if self.trace.is_none() && !logging {
            return;
        }
        let mut records = Vec::new();
        self.guest_events.drain(mem, id, |r| records.push(r));
        if logging {
            if let Some(mut log) = self.no_exit.log(id) {
                for r in records.iter().filter(|r| r.id == GUEST_SWITCH) {
                    log.switch(r.time_ns, r.args[1]);
                }
                let dropped = self.guest_events.dropped(mem, id);
                if dropped > log.dropped_seen {
                    // The guest dropped the newest events: from the last one
                    // kept on, the thread is unknown until the next switch.
                    let last = records.iter().map(|r| r.time_ns).max();
                    let from = last.map_or(log.covered_ns(), |t| t + 1);
                    log.gap(from);
                    log.dropped_seen = dropped;
                }
                log.cover(now);
            }
        }
        if let Some(trace) = &self.trace {
            if !records.is_empty() {
                trace.record_all(records);
            }
        }
    }

    /// Counts one sample taken (kept or dropped).
    pub fn count_sample(&self) {
        self.samples_taken.fetch_add(1, Ordering::AcqRel);
    }

    /// Samples taken so far, all vCPUs.
    pub fn samples_taken(&self) -> u64 {
        self.samples_taken.load(Ordering::Acquire)
    }

    /// Counts `n` timer fires a vCPU answered.
    pub fn count_timer_fires(&self, n: u64) {
        self.timer_fires.fetch_add(n, Ordering::Relaxed);
    }

    /// Timer fires answered so far, all vCPUs (one per kptimer per expiry
    /// that found it due).
    pub fn timer_fires(&self) -> u64 {
        self.timer_fires.load(Ordering::Relaxed)
    }

    /// Resets kperf (CFG-R-1): sampling stopped synchronously as by
    /// [`SamplingShared::stop`], then every timer, PET and action back to
    /// the defaults ([`Kperf::reset`]; the counts are kept).
    pub fn reset(&self, kick: impl Fn(u32), gone: impl Fn() -> bool) -> Result<(), KperfError> {
        self.stop(kick, gone)?;
        self.reset_stopped();
        Ok(())
    }

    /// The second half of a reset, once sampling is stopped: every timer,
    /// PET and action back to the defaults, the counts kept.
    pub fn reset_stopped(&self) {
        let mut engine = self.engine();
        engine.reset();
        // A start racing the reset: its deadlines go with it.
        for id in 0..self.deadlines.len() as u32 {
            self.set_deadline(id, None);
        }
        self.pet.set_deadline(None);
        self.pet.clear_requests();
        self.lightweight.publish(&engine);
    }

    /// Turns sampling on at device time `now` and sets every vCPU's first
    /// deadline (the caller kicks every vCPU so that it notices).
    pub fn start(&self, now: u64) -> Result<(), KperfError> {
        let mut engine = self.engine();
        let programs = engine.set_sampling(true, now, self.deadlines.len())?;
        self.fixed_period_ns
            .store(engine.fixed_on_cpu_period().unwrap_or(0), Ordering::Release);
        for (id, deadline) in programs.into_iter().enumerate() {
            self.set_deadline(id as u32, deadline);
        }
        self.pet.set_deadline(engine.pet_deadline());
        self.lightweight.publish(&engine);
        Ok(())
    }

    /// Stops sampling synchronously through SHUTDOWN (see the module docs):
    /// `kick(id)` is called on every vCPU that has not yet acknowledged, every
    /// 10 ms; `gone()` ends the wait early (the VM stopped).
    /// Stopping while already off does nothing; a stop while another thread's
    /// is under way waits for the same acknowledgements.
    pub fn stop(&self, kick: impl Fn(u32), gone: impl Fn() -> bool) -> Result<(), KperfError> {
        if let Some(pending) = self.begin_stop()? {
            self.wait_stop(&pending, kick, gone);
            self.finish_stop(pending);
        }
        Ok(())
    }

    /// The first step of [`SamplingShared::stop`], which does not wait:
    /// SHUTDOWN and every deadline cancelled. `None` when sampling was off;
    /// otherwise what the stop still waits for ([`SamplingShared::wait_stop`],
    /// then [`SamplingShared::finish_stop`]).
    ///
    /// # Errors
    ///
    /// What the engine refused.
    pub fn begin_stop(&self) -> Result<Option<PendingStop>, KperfError> {
        let mut engine = self.engine();
        match engine.begin_shutdown() {
            Ok(false) => Ok(None),
            Ok(true) => {
                // No perf sample after the stop either.
                self.no_exit.stop();
                for id in 0..self.deadlines.len() as u32 {
                    self.set_deadline(id, None);
                }
                self.pet.set_deadline(None);
                self.pet.clear_requests();
                // Generation 0: the guest stops asking for self-samples.
                self.lightweight.publish(&engine);
                Ok(Some(PendingStop {
                    epoch: self.epoch.fetch_add(1, Ordering::AcqRel) + 1,
                    owner: true,
                }))
            }
            // Another thread's stop is under way: this one is synchronous
            // too, so it waits for the same acknowledgements.
            Err(KperfError::Busy) => Ok(Some(PendingStop {
                epoch: self.epoch.load(Ordering::Acquire),
                owner: false,
            })),
            Err(e) => Err(e),
        }
    }

    /// Waits until every vCPU acknowledged the stop `pending` (kicking the
    /// others every 10 ms), or `gone()`. Changes nothing.
    pub fn wait_stop(&self, pending: &PendingStop, kick: impl Fn(u32), gone: impl Fn() -> bool) {
        self.wait_for_acks(pending.epoch, kick, gone);
    }

    /// The last step of a stop: sampling OFF (only for the stop that
    /// began the shutdown).
    pub fn finish_stop(&self, pending: PendingStop) {
        if pending.owner {
            self.engine().finish_shutdown();
        }
    }

    /// Called by vCPU `id` at every loop top and whenever it wakes while parked.
    pub fn acknowledge(&self, id: u32) {
        let epoch = self.epoch.load(Ordering::Acquire);
        let slot = &self.acked[id as usize];
        if slot.load(Ordering::Acquire) >= epoch {
            return;
        }
        if slot.swap(epoch, Ordering::AcqRel) != epoch {
            let _guard = self.ack_lock.lock().unwrap_or_else(|p| p.into_inner());
            self.ack_cv.notify_all();
        }
    }

    /// vCPU `id`'s thread has exited: it will never sample again, so it
    /// counts as having acknowledged every stop.
    pub fn retire(&self, id: u32) {
        self.acked[id as usize].store(u64::MAX, Ordering::Release);
        let _guard = self.ack_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.ack_cv.notify_all();
    }

    fn wait_for_acks(&self, epoch: u64, kick: impl Fn(u32), gone: impl Fn() -> bool) {
        let mut guard = self.ack_lock.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let pending: Vec<u32> = (0..self.acked.len() as u32)
                .filter(|&id| self.acked[id as usize].load(Ordering::Acquire) < epoch)
                .collect();
            if pending.is_empty() || gone() {
                return;
            }
            drop(guard);
            for id in pending {
                kick(id);
            }
            guard = self.ack_lock.lock().unwrap_or_else(|p| p.into_inner());
            guard = self
                .ack_cv
                .wait_timeout(guard, ACK_RETRY)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn config() -> SamplingConfig {
        SamplingConfig::new(crate::config::KperfConfig::on_cpu(
            1_000_000,
            kperf::sampler::TH_INFO,
            None,
        ))
    }

    #[test]
    fn test_tr_e3_record_keeps_only_events_up_to_the_trace_level() {
        use kperf::trace::{Level, DBG_FUNC_END, DBG_FUNC_START, TM_FIRE, TM_HNDLR};
        let ids = [TM_FIRE, TM_HNDLR | DBG_FUNC_START, TM_HNDLR | DBG_FUNC_END];
        for (level, kept) in [(Level::Data, 2), (Level::Info, 3), (Level::Verbose, 3)] {
            let shared = SamplingShared::new(
                &SamplingConfig {
                    trace_file: Some("unused".into()),
                    trace_level: level,
                    ..config()
                },
                1,
            )
            .unwrap();
            for id in ids {
                shared.record(TraceRecord {
                    id,
                    ..Default::default()
                });
            }
            let trace = shared.trace().unwrap().take();
            assert_eq!(trace.len(), kept, "{level:?}");
            assert!(level >= Level::Info || trace.iter().all(|r| r.id != ids[2]));
        }
    }

    #[test]
    fn test_kt_f1_stop_waits_for_every_vcpu_in_shutdown_then_turns_off() {
        let shared = Arc::new(SamplingShared::new(&config(), 2).unwrap());
        shared.start(0).unwrap();
        assert_eq!(
            (shared.deadline(0), shared.deadline(1)),
            (Some(1_000_000), Some(1_000_000))
        );
        let kicked = Arc::new(AtomicU64::new(0));
        let (s2, k2) = (shared.clone(), kicked.clone());
        // The "vCPUs" acknowledge only when kicked; while they have not, the
        // engine is in SHUTDOWN and every deadline is gone.
        shared
            .stop(
                move |id| {
                    assert_eq!(s2.engine().sampling_state(), kperf::SamplingState::Shutdown);
                    assert_eq!(s2.deadline(id), None);
                    k2.fetch_add(1, Ordering::Relaxed);
                    s2.acknowledge(id);
                },
                || false,
            )
            .unwrap();
        assert!(kicked.load(Ordering::Relaxed) >= 2);
        assert_eq!(shared.engine().sampling_state(), kperf::SamplingState::Off);
        // Off: it can start again.
        shared.start(20).unwrap();
        assert!(shared.deadline(0).is_some());
    }

    #[test]
    fn test_stop_does_not_wait_for_a_retired_vcpu() {
        let shared = SamplingShared::new(&config(), 2).unwrap();
        shared.start(0).unwrap();
        shared.retire(1);
        shared.stop(|id| shared.acknowledge(id), || false).unwrap();
        assert_eq!(shared.engine().sampling_state(), kperf::SamplingState::Off);
    }

    #[test]
    fn test_kt_sp_1_a_second_stop_waits_for_the_first_ones_acks() {
        let shared = Arc::new(SamplingShared::new(&config(), 1).unwrap());
        shared.start(0).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let first = {
            let shared = shared.clone();
            // The first stop's kick tells the test it is waiting, and the
            // vCPU acknowledges only after the second stop has begun.
            std::thread::spawn(move || {
                let told = std::sync::atomic::AtomicBool::new(false);
                shared
                    .stop(
                        |_| {
                            if !told.swap(true, Ordering::Relaxed) {
                                tx.send(()).unwrap();
                            }
                        },
                        || false,
                    )
                    .unwrap();
            })
        };
        rx.recv().unwrap();
        assert_eq!(
            shared.engine().sampling_state(),
            kperf::SamplingState::Shutdown
        );
        let acked_by_second = AtomicU64::new(0);
        shared
            .stop(
                |id| {
                    acked_by_second.fetch_add(1, Ordering::Relaxed);
                    shared.acknowledge(id);
                },
                || false,
            )
            .unwrap();
        // The second stop returned only once the vCPU had acknowledged.
        assert!(acked_by_second.load(Ordering::Relaxed) >= 1);
        first.join().unwrap();
        assert_eq!(shared.engine().sampling_state(), kperf::SamplingState::Off);
    }
}
