//! Driving a running VM from any thread: pause, resume, hold a vCPU, stop,
//! and host-side sampling on and off.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::live::RunView;
use super::pet_thread::PetThread;
use super::{VmExit, VmShared};
use crate::sampling::{PendingStop, SamplingShared};
use crate::summary::{ClockintrSummary, VcpuClock};

/// Why a control operation was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ControlError {
    /// The VM has ended or is ending.
    #[error("the VM is not running")]
    NotRunning,
    /// pause while paused.
    #[error("the VM is already paused")]
    AlreadyPaused,
    /// resume while running.
    #[error("the VM is not paused")]
    NotPaused,
    /// No such vCPU.
    #[error("there is no vCPU {0}")]
    NoSuchVcpu(u32),
}

/// Why a sampling operation was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SamplingError {
    /// The VM was built without sampling.
    #[error("sampling is not configured for this VM")]
    NotConfigured,
    /// The VM has ended.
    #[error("the VM is not running")]
    NotRunning,
    /// The engine refused.
    #[error("kperf refused: {0}")]
    Kperf(kperf::KperfError),
    /// The PET sampler thread could not be created.
    #[error("cannot create the PET sampler thread: {0}")]
    PetThread(String),
    /// The no-exit or hybrid tier cannot run as configured.
    #[error("{0}")]
    Tier(String),
}

/// How a paused VM resumes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResumeMode {
    /// Just continue: the guest finds that its clock jumped.
    Continue,
    /// Tell the guest through the timer device (TIMER_RESUMES and a
    /// TimerResume interrupt on every vCPU) so that it re-runs clockintr_cpu_init.
    Reinit,
}

/// Drives a running VM from any thread: pause, resume, hold a vCPU, stop.
/// The guest clock keeps running while vCPUs are paused or held (spec AMB-6).
#[derive(Clone, Debug)]
pub struct VmController {
    pub(super) shared: Arc<VmShared>,
    /// What the live readers need besides `shared` ([`super::live`]).
    pub(super) view: Arc<RunView>,
}

impl VmController {
    pub(crate) fn new(shared: Arc<VmShared>, view: Arc<RunView>) -> Self {
        Self { shared, view }
    }

    /// The guest clock (device time) in ns.
    pub fn uptime_ns(&self) -> u64 {
        self.shared.now()
    }

    /// Whether the VM has ended or is ending.
    pub fn ended(&self) -> bool {
        self.shared.exit_reason().is_some()
    }

    /// Stops every vCPU out of the guest and returns once all are parked.
    pub fn pause(&self) -> Result<(), ControlError> {
        self.begin_pause()?;
        self.wait_paused();
        Ok(())
    }

    /// The first half of [`VmController::pause`], which does not wait: the
    /// pause is in force and every vCPU is asked to park. The VMM thread's
    /// event loop runs this; the waiting ([`VmController::wait_paused`])
    /// happens elsewhere, so that the loop still sees an exit or a signal.
    pub fn begin_pause(&self) -> Result<(), ControlError> {
        let mut state = self.shared.pause_state();
        if self.ended() {
            return Err(ControlError::NotRunning);
        }
        if state.user {
            return Err(ControlError::AlreadyPaused);
        }
        state.user = true;
        self.shared.update_pause(&mut state);
        drop(state);
        self.shared.wake_all();
        Ok(())
    }

    /// Waits until every vCPU is parked for the pause in force (kicking
    /// them again every 10 ms), the pause was lifted, or the VM ends.
    pub fn wait_paused(&self) {
        self.shared.wait_parked(|| self.ended());
    }

    /// Lets the vCPUs run again. With [`ResumeMode::Reinit`] the guest
    /// re-synchronises clockintr (CI-CPU-6). kptimer needs no step of its
    /// own: a vCPU's deadline that passed during the pause fires once at its
    /// first loop top, and the fire's dead reckoning (KT-F-2, KT-F-4) puts
    /// the next deadline on the timer's grid after now, so the cadence
    /// continues from now without a burst of missed fires.
    pub fn resume(&self, mode: ResumeMode) -> Result<(), ControlError> {
        let shared = &self.shared;
        let mut state = shared.pause_state();
        if self.ended() {
            // The end of the run holds every vCPU at a pause point.
            return Err(ControlError::NotRunning);
        }
        if !state.user {
            return Err(ControlError::NotPaused);
        }
        if mode == ResumeMode::Reinit {
            for slot in &shared.vcpus {
                slot.lock().raise_resume();
            }
        }
        state.user = false;
        shared.update_pause(&mut state);
        Ok(())
    }

    /// Keeps vCPU `id` out of the guest for `duration` (the guest clock runs on).
    pub fn hold_vcpu(&self, id: u32, duration: Duration) -> Result<(), ControlError> {
        let slot = self
            .shared
            .vcpus
            .get(id as usize)
            .ok_or(ControlError::NoSuchVcpu(id))?;
        if self.ended() {
            return Err(ControlError::NotRunning);
        }
        let nanos = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
        let until = self.shared.now().saturating_add(nanos);
        slot.hold_until.store(until, Ordering::Release);
        self.shared.wake(id);
        Ok(())
    }

    /// Ends the VM from the host.
    pub fn stop(&self) {
        self.shared.request_exit(VmExit::Stopped);
    }

    /// Ends the VM because the process received signal `signo` (SIGINT or
    /// SIGTERM) that the caller read ([`super::SignalWatch::Caller`]).
    pub fn stop_on_signal(&self, signo: i32) {
        self.shared.request_exit(VmExit::Signal(signo));
    }

    fn sampling(&self) -> Result<&SamplingShared, SamplingError> {
        self.shared
            .sampling
            .as_ref()
            .ok_or(SamplingError::NotConfigured)
    }

    /// Starts host-side sampling (KT-ST-*): every vCPU gets its kperf deadline.
    pub fn sampling_start(&self) -> Result<(), SamplingError> {
        let sampling = self.sampling()?;
        if self.ended() {
            return Err(SamplingError::NotRunning);
        }
        PetThread::ensure(&self.shared).map_err(|e| SamplingError::PetThread(e.to_string()))?;
        // The API may have set actions and timers one by one: the tier's
        // rules are checked again here.
        let perf_timer = crate::config::kperf::perf_timer(&sampling.engine())
            .map_err(|e| SamplingError::Tier(e.to_string()))?;
        if perf_timer.is_some() {
            sampling
                .enable_guest_events_now(&self.shared.mem)
                .map_err(|e| SamplingError::Tier(format!("the guest's event rings: {e}")))?;
            super::no_exit_thread::ensure(&self.shared)
                .map_err(|e| SamplingError::Tier(format!("the perf reader thread: {e}")))?;
        }
        sampling
            .start(self.shared.now())
            .map_err(SamplingError::Kperf)?;
        if let Some(plan) = perf_timer {
            sampling.no_exit.start(plan);
        }
        self.shared.wake_all();
        Ok(())
    }

    /// Stops host-side sampling synchronously: when this returns, no vCPU
    /// takes another sample (KT-SP-1, AMB-17; through SHUTDOWN, KT-F-1).
    pub fn sampling_stop(&self) -> Result<(), SamplingError> {
        self.sampling()?
            .stop(|id| self.kick(id), || self.shared.stopping())
            .map_err(SamplingError::Kperf)
    }

    /// The first step of [`VmController::sampling_stop`], which does not
    /// wait (the VMM thread's event loop runs it): sampling SHUTDOWN and
    /// every deadline cancelled. `None` when sampling was off; otherwise
    /// wait with [`VmController::sampling_stop_wait`] (anywhere), then
    /// [`VmController::sampling_stop_finish`].
    pub fn sampling_stop_begin(&self) -> Result<Option<PendingStop>, SamplingError> {
        self.sampling()?.begin_stop().map_err(SamplingError::Kperf)
    }

    /// Waits until every vCPU acknowledged the stop (kicking those that
    /// have not), or the VM stops: afterwards no vCPU takes another sample.
    pub fn sampling_stop_wait(&self, pending: &PendingStop) {
        if let Ok(sampling) = self.sampling() {
            sampling.wait_stop(pending, |id| self.kick(id), || self.shared.stopping());
        }
    }

    /// The last step of a stop: sampling OFF; with `reset`, then every
    /// timer, PET and action back to the defaults (CFG-R-1).
    pub fn sampling_stop_finish(
        &self,
        pending: Option<PendingStop>,
        reset: bool,
    ) -> Result<(), SamplingError> {
        let sampling = self.sampling()?;
        if let Some(pending) = pending {
            sampling.finish_stop(pending);
        }
        if reset {
            sampling.reset_stopped();
        }
        Ok(())
    }

    /// Resets kperf (CFG-R-1): sampling stopped as by
    /// [`VmController::sampling_stop`], then every timer, PET and action back
    /// to the defaults, the counts kept.
    pub fn sampling_reset(&self) -> Result<(), SamplingError> {
        self.sampling()?
            .reset(|id| self.kick(id), || self.shared.stopping())
            .map_err(SamplingError::Kperf)
    }

    /// Makes vCPU `id` pass its loop top: running or halted vCPUs are kicked
    /// or woken; paused ones wait on the pause condition variable, which a
    /// signal does not end.
    fn kick(&self, id: u32) {
        self.shared.wake(id);
        self.shared.notify_pause_waiters();
    }

    /// Runs `f` on the kperf engine under its lock (held only for `f`, which
    /// must not wait): reads, and the configuration changes kperf allows at
    /// that moment (AMB-16: the vCPUs see a change whole, at their next
    /// expiry).
    pub fn with_kperf<T>(
        &self,
        f: impl FnOnce(&mut kperf::Kperf) -> T,
    ) -> Result<T, SamplingError> {
        Ok(f(&mut self.sampling()?.engine()))
    }

    /// Timer fires the vCPUs answered so far (one per kptimer per expiry).
    pub fn timer_fires(&self) -> u64 {
        self.sampling().map_or(0, SamplingShared::timer_fires)
    }

    /// Samples taken so far, all vCPUs.
    pub fn samples_taken(&self) -> u64 {
        self.sampling().map_or(0, SamplingShared::samples_taken)
    }

    /// Every vCPU's clockintr statistics, each read consistently (TR-C-2), and
    /// their field-wise sum (kern.clockintr.stats, spurious included).
    pub fn clockintr_stats(&self) -> (Vec<ClockintrSummary>, ClockintrSummary) {
        crate::summary::clockintr_stats(&self.shared)
    }

    /// The VM's run-time metrics (`GET /metrics`), read from the calling
    /// thread: relaxed loads, each vCPU's irq lock held only to copy its
    /// timer histogram.
    pub fn metrics(&self) -> crate::metrics::VmMetrics {
        crate::metrics::collect(&self.shared)
    }

    /// Every vCPU's hardclock count and re-sync figures ([`VcpuClock`]).
    pub fn vcpu_clocks(&self) -> Vec<VcpuClock> {
        crate::summary::vcpu_clocks(&self.shared.mem, self.shared.vcpus.len() as u32)
    }

    /// Every vCPU's pending clockintr events, like ddb's `show all clockintr`.
    pub fn dump_clockintr(&self) -> String {
        crate::summary::clockintr_dump(&self.shared)
    }
}
