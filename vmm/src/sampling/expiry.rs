//! The vCPU side of sampling: each vCPU thread owns a [`VcpuSampler`] that
//! arms the vCPU's kperf host deadline on its own POSIX timer and, when the
//! deadline passes, runs the expiry and takes the vCPU's own sample with the
//! guest stopped. No other thread touches a running vCPU.
//!
//! One expiry, hop by hop:
//! 1. the POSIX timer signals the vCPU thread; `KVM_RUN` returns `EINTR`;
//! 2. [`VcpuSampler::at_loop_top`] sees the deadline passed and locks the
//!    engine: [`kperf::Kperf::expire`] elects the fire's leader, which records
//!    `PERF_TM_FIRE`; every [`kperf::SampleRequest`] records `PERF_TM_HNDLR`
//!    start there, so no later `PERF_TM_FIRE` can precede it (TR-P-5); the next
//!    deadline is stored under the same lock;
//! 3. outside the lock, each request is captured ([`super::capture`]) with the
//!    action settings it carries, and the sample leaves the thread through
//!    [`super::SampleBuffer`]; `PERF_TM_HNDLR` end closes it;
//! 4. the guest resumes. With one on-CPU timer the POSIX timer is periodic
//!    (its period is the timer's, its grid the deadlines'): the next deadline
//!    lies on its grid and nothing is re-armed; the kernel re-armed it when
//!    its signal was consumed, and expirations missed meanwhile come back as
//!    the signal's overrun ([`VcpuSampling::timer_overruns`]). Otherwise (several
//!    timers, or PET's one-shot first) it is a one-shot re-armed for the
//!    next deadline. Either way it is re-armed only when the deadline changes
//!    off its grid: start, stop, halt and wake, pause and resume.
//!
//! Halted vCPUs are idle for kperf (KT-I-1): [`VcpuSampler::before_halt`]
//! cancels the deadline while the thread is parked, [`VcpuSampler::after_halt`]
//! re-derives it by dead reckoning.
//!
//! Lightweight PET (PET-L-2): a self-sample the guest asked for when it
//! switched a thread on ([`super::lightweight`]) is taken first at the loop
//! top, with the guest stopped in its scheduler; the expiry publishes the
//! generation its leader may have bumped, and stamps the sampled thread
//! (KT-SM-6).

use std::io;

use kperf::{trace, CpuExpiry, SampleRequest, PET_HANDLER_CPU};
use kvm_ioctls::VcpuFd;
use metronome_devices::LatencyHistogram;
use vm_memory::GuestMemoryMmap;

use super::capture::{capture, Capture};
use super::lightweight::Admission;
use super::state::SamplingShared;
use super::trace::{current_tid, TraceRecord};
use crate::host_time::{monotonic_ns, DeviceClock, PosixTimer, TimerTag};
use crate::kick::{self, Consumed};

/// Per-vCPU sampling counters (owned by the vCPU thread, read at the end).
#[derive(Clone, Debug, Default)]
pub struct VcpuSampling {
    /// Timer fires this vCPU answered (one per kptimer per expiry that found
    /// it due).
    pub timer_fires: u64,
    /// Of those, the fires this vCPU led (`PERF_TM_FIRE`).
    pub leader_fires: u64,
    /// Samples taken (the filter matched).
    pub samples: u64,
    /// Stack walks that ended on a bad pointer.
    pub walk_errors: u64,
    /// Expiries that found sampling stopping or off (a kick that raced a
    /// stop, KT-F-1): nothing sampled.
    pub not_running: u64,
    /// Traditional PET fires this vCPU handled (the handler vCPU only).
    pub pet_fires: u64,
    /// Host cost of each sample: from noticing the deadline to the sample kept, ns.
    pub cost: LatencyHistogram,
    /// Expirations of the periodic sampling timer that came while its signal
    /// was still pending (the kernel's overrun count: sampling fell behind).
    pub timer_overruns: u64,
    /// `timer_settime` calls on the sampling timer (arming, re-arming,
    /// disarming): with a fixed period, far fewer than the samples.
    pub timer_rearms: u64,
}

/// Which profile a sample goes to: the on-CPU timers' (whose samples are
/// periodic per vCPU) or PET's (its broadcast samples, with its passes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Buffer {
    OnCpu,
    Pet,
}

/// The sampling side of one vCPU thread.
#[derive(Debug)]
pub struct VcpuSampler {
    id: u32,
    timer: PosixTimer,
    clock: DeviceClock,
    stats: VcpuSampling,
    /// The guest thread current on this vCPU, read from its shared page when
    /// a fire or a sample begins (the guest is stopped until it ends): the
    /// `tid` of the trace records.
    tid: u64,
}

impl VcpuSampler {
    /// The sampler of vCPU `id`, on the calling thread (its POSIX timer
    /// signals this thread).
    pub fn for_current_thread(id: u32, clock: DeviceClock) -> io::Result<Self> {
        Ok(Self {
            id,
            timer: PosixTimer::for_current_thread(kick::sig_timer(), TimerTag::Sampling)?,
            clock,
            stats: VcpuSampling::default(),
            tid: 0,
        })
    }

    /// At the vCPU loop top, with the guest stopped (and a pending stop
    /// acknowledged): takes the lightweight PET self-sample the guest asked
    /// for, if any, then a PET sample another vCPU asked for, services the
    /// PET one-shot on the handler vCPU (AMB-7; `kick` reaches the others),
    /// runs the expiry if the deadline passed, and arms the POSIX timer for
    /// the next deadline.
    pub fn at_loop_top(
        &mut self,
        sampling: &SamplingShared,
        mem: &GuestMemoryMmap,
        fd: &VcpuFd,
        kick: &dyn Fn(u32),
    ) -> io::Result<()> {
        let now = self.clock.now();
        if let Some(tid) = sampling.lightweight.take_request(self.id) {
            self.pet_self_sample(sampling, mem, fd, tid, now);
        }
        self.serve_pet_request(sampling, mem, fd, now);
        if let Some(due) = self
            .handles_pet()
            .then(|| sampling.pet.deadline())
            .flatten()
        {
            if due <= now {
                self.pet_fire(sampling, mem, fd, (due, now), kick);
            }
        }
        if sampling.deadline(self.id).is_some_and(|d| d <= now) {
            self.expire(sampling, mem, fd, now);
        }
        self.arm(sampling)
    }

    /// Takes the PET sample another vCPU asked of this one, if any (PET-H-2).
    /// Also called before the vCPU parks for a hold or a pause, so that a
    /// PET pass that holds the guest does not delay the broadcast's samples.
    pub fn serve_pet_request(
        &mut self,
        sampling: &SamplingShared,
        mem: &GuestMemoryMmap,
        fd: &VcpuFd,
        now: u64,
    ) {
        if let Some(request) = sampling.pet.take_request(self.id as usize) {
            self.pet_remote_sample(sampling, mem, fd, request, now);
        }
    }

    /// Whether this vCPU services the traditional PET one-shot (AMB-7).
    pub fn handles_pet(&self) -> bool {
        self.id as usize == PET_HANDLER_CPU
    }

    /// The vCPU halts: it is idle for kperf (KT-I-1), no sampling kicks until
    /// it wakes.
    pub fn before_halt(&mut self, sampling: &SamplingShared) -> io::Result<()> {
        let mut engine = sampling.engine();
        engine.cpu_idle(self.id as usize);
        sampling.set_deadline(self.id, None);
        drop(engine);
        self.arm(sampling)
    }

    /// The vCPU woke from a halt: its deadline by dead reckoning (stored under
    /// the engine lock, so that a concurrent stop's cancel wins).
    pub fn after_halt(&mut self, sampling: &SamplingShared) {
        let mut engine = sampling.engine();
        let deadline = engine.cpu_wake(self.id as usize, self.clock.now());
        sampling.set_deadline(self.id, deadline);
    }

    /// Counts what the vCPU thread consumed of the sampling timer's
    /// signals: the expirations they could not carry.
    pub fn note_signals(&mut self, consumed: &Consumed) {
        self.stats.timer_overruns += consumed.sampling_overruns;
    }

    /// The counters so far.
    pub fn stats(&self) -> &VcpuSampling {
        &self.stats
    }

    /// The counters, when the vCPU thread ends.
    pub fn into_stats(self) -> VcpuSampling {
        self.stats
    }

    /// Arms the POSIX timer for the earliest of this vCPU's kperf deadline
    /// and (on the PET handler vCPU) PET's one-shot: periodic when the
    /// kperf deadline comes first and steps by a fixed period, one-shot
    /// otherwise. No system call when it is armed for that already.
    fn arm(&mut self, sampling: &SamplingShared) -> io::Result<()> {
        let own = sampling.deadline(self.id);
        let pet = self
            .handles_pet()
            .then(|| sampling.pet.deadline())
            .flatten();
        let armed = match (own, pet, sampling.fixed_period()) {
            (Some(own), pet, Some(period)) if pet.is_none_or(|pet| own <= pet) => self
                .timer
                .program_periodic(self.clock.to_monotonic(own), period),
            (own, pet, _) => {
                let next = match (own, pet) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                self.timer.program(next.map(|d| self.clock.to_monotonic(d)))
            }
        };
        self.stats.timer_rearms = self.timer.settime_calls();
        armed
    }

    /// The traditional PET one-shot fired (PET-H-2): `PERF_TM_FIRE` (the
    /// broadcast counted by the engine), a PET sample asked of every other
    /// vCPU without waiting, the PET sampler woken, this vCPU's own sample
    /// with `SYSTEM`, then `PERF_TM_FIRE` end. No re-arm here (PET-R-1).
    fn pet_fire(
        &mut self,
        sampling: &SamplingShared,
        mem: &GuestMemoryMmap,
        fd: &VcpuFd,
        (due, now): (u64, u64),
        kick: &dyn Fn(u32),
    ) {
        self.tid = current_tid(mem, self.id);
        let fire = {
            let mut engine = sampling.engine();
            let fire = engine.pet_fired(now);
            sampling.pet.set_deadline(engine.pet_deadline());
            if let Some(fire) = &fire {
                sampling.record(self.fire_record(fire.tm_fire_args(), due));
            }
            fire
        };
        let Some(fire) = fire else { return };
        self.stats.pet_fires += 1;
        for &cpu in &fire.remote_cpus {
            sampling.pet.request(cpu, fire.remote_sample);
            kick(cpu as u32);
        }
        sampling.pet.wake();
        let started = monotonic_ns();
        sampling.record(self.handler_record(&fire.handler_sample, trace::DBG_FUNC_START));
        self.take(
            sampling,
            mem,
            fd,
            &fire.handler_sample,
            now,
            started,
            Buffer::Pet,
        );
        sampling.record(TraceRecord {
            time_ns: self.clock.now(),
            id: trace::TM_FIRE | trace::DBG_FUNC_END,
            vcpu: self.id,
            tid: self.tid,
            args: fire.tm_fire_args(),
            deadline_ns: 0,
        });
    }

    /// A PET sample the handler vCPU asked of this one: taken only if sampling
    /// is still on (PET-H-2).
    fn pet_remote_sample(
        &mut self,
        sampling: &SamplingShared,
        mem: &GuestMemoryMmap,
        fd: &VcpuFd,
        request: SampleRequest,
        now: u64,
    ) {
        let started = monotonic_ns();
        self.tid = current_tid(mem, self.id);
        {
            let engine = sampling.engine();
            if !engine.sampling() {
                self.stats.not_running += 1;
                return;
            }
            sampling.record(self.handler_record(&request, trace::DBG_FUNC_START));
        }
        self.take(sampling, mem, fd, &request, now, started, Buffer::Pet);
    }

    /// Lightweight PET (PET-L-2): the guest switched thread `tid` on with a
    /// stale generation and asked for a sample. Admitted under the engine
    /// lock (which stamps the thread), then taken like a timer sample, with
    /// PET's action and `NON_INTERRUPT | PEND_USER`, between
    /// `PET_SAMPLE_THREAD` start and end, into the PET profile.
    fn pet_self_sample(
        &mut self,
        sampling: &SamplingShared,
        mem: &GuestMemoryMmap,
        fd: &VcpuFd,
        tid: u64,
        now: u64,
    ) {
        let record = |id, args| TraceRecord {
            time_ns: self.clock.now(),
            id,
            vcpu: self.id,
            tid,
            args,
            deadline_ns: 0,
        };
        let request = {
            let engine = sampling.engine();
            match sampling.lightweight.admit(&engine, mem, self.id, tid) {
                Admission::Sample(request, args) => {
                    sampling.record(record(
                        trace::PET_SAMPLE_THREAD | trace::DBG_FUNC_START,
                        args,
                    ));
                    request
                }
                Admission::Matched(args) => {
                    sampling.record(record(trace::PET_SAMPLE_THREAD, args));
                    return;
                }
                Admission::Refused | Admission::Bad => return,
            }
        };
        let regs = fd.sync_regs();
        let taken = capture(
            mem,
            self.id,
            now,
            (&regs.regs, &regs.sregs),
            &request.sampled(),
        );
        if let Capture::Sample(raw) = taken {
            self.stats.walk_errors += u64::from(raw.walk_error());
            sampling.pet.samples.push(raw);
        }
        sampling
            .lightweight
            .self_samples
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        sampling.record(record(
            trace::PET_SAMPLE_THREAD | trace::DBG_FUNC_END,
            [0; 4],
        ));
    }

    /// The kperf deadline passed: the expiry under the engine lock, then this
    /// vCPU's own samples (hops 2 and 3 of the module docs).
    fn expire(&mut self, sampling: &SamplingShared, mem: &GuestMemoryMmap, fd: &VcpuFd, now: u64) {
        let started = monotonic_ns();
        self.tid = current_tid(mem, self.id);
        let requests = self.elect(sampling, mem, now);
        for request in requests {
            self.take(sampling, mem, fd, &request, now, started, Buffer::OnCpu);
        }
    }

    /// Takes one sample of this vCPU for `request` (its `PERF_TM_HNDLR` start
    /// already recorded), keeps it in `buffer`, records the end and the host
    /// cost since `started`.
    #[allow(clippy::too_many_arguments)]
    fn take(
        &mut self,
        sampling: &SamplingShared,
        mem: &GuestMemoryMmap,
        fd: &VcpuFd,
        request: &SampleRequest,
        now: u64,
        started: u64,
        buffer: Buffer,
    ) {
        let regs = fd.sync_regs();
        // The samplers this sample takes: system memory for the leader only
        // (KT-SM-1, KT-SM-4).
        let settings = request.sampled();
        match capture(mem, self.id, now, (&regs.regs, &regs.sregs), &settings) {
            Capture::FilteredOut | Capture::NoRegisters => {}
            Capture::NoSamplers => self.count_sample(sampling),
            Capture::Sample(raw) => {
                self.tid = raw.tid;
                self.count_sample(sampling);
                self.stats.walk_errors += u64::from(raw.walk_error());
                for record in raw.samplers.trace_records(&raw) {
                    sampling.record(record);
                }
                match buffer {
                    Buffer::OnCpu => sampling.samples.push(raw),
                    Buffer::Pet => sampling.pet.samples.push(raw),
                };
            }
        }
        sampling.record(self.handler_record(request, trace::DBG_FUNC_END));
        self.stats
            .cost
            .record(monotonic_ns().saturating_sub(started));
    }

    /// Runs [`kperf::Kperf::expire`] under the engine lock; returns the
    /// samples this vCPU must take.
    fn elect(
        &mut self,
        sampling: &SamplingShared,
        mem: &GuestMemoryMmap,
        now: u64,
    ) -> Vec<SampleRequest> {
        let mut engine = sampling.engine();
        let expiry = engine.expire(self.id as usize, now);
        // A lightweight PET leader bumped the generation (PET-L-1).
        sampling.lightweight.publish(&engine);
        match expiry {
            CpuExpiry::Handled {
                fires,
                next_deadline,
            } => {
                sampling.set_deadline(self.id, next_deadline);
                self.stats.timer_fires += fires.len() as u64;
                sampling.count_timer_fires(fires.len() as u64);
                let mut requests = Vec::with_capacity(fires.len());
                for fire in &fires {
                    if fire.leader {
                        self.stats.leader_fires += 1;
                        sampling.record(self.fire_record(fire.tm_fire_args(), fire.deadline));
                    }
                    if let Some(request) = fire.sample {
                        // Inside the critical section: TR-P-5.
                        sampling.record(self.handler_record(&request, trace::DBG_FUNC_START));
                        requests.push(request);
                    }
                }
                if !requests.is_empty() {
                    // KT-SM-6: the thread sampled now is sampled for this generation.
                    sampling.lightweight.stamp_current(&engine, mem, self.id);
                }
                requests
            }
            CpuExpiry::ShuttingDown | CpuExpiry::NotRunning | CpuExpiry::NoSuchCpu => {
                self.stats.not_running += 1;
                sampling.set_deadline(self.id, None);
                Vec::new()
            }
        }
    }

    fn count_sample(&mut self, sampling: &SamplingShared) {
        self.stats.samples += 1;
        sampling.count_sample();
    }

    /// A `PERF_TM_FIRE` record of a fire of `deadline` with `args` (TR-P-1).
    fn fire_record(&self, args: [u64; 4], deadline: u64) -> TraceRecord {
        TraceRecord {
            time_ns: self.clock.now(),
            id: trace::TM_FIRE,
            vcpu: self.id,
            tid: self.tid,
            args,
            deadline_ns: deadline,
        }
    }

    /// A `PERF_TM_HNDLR` record (start or end qualifier) for `request`.
    fn handler_record(&self, request: &SampleRequest, qualifier: u32) -> TraceRecord {
        TraceRecord {
            time_ns: self.clock.now(),
            id: trace::TM_HNDLR | qualifier,
            vcpu: self.id,
            tid: self.tid,
            args: [u64::from(request.timer), u64::from(request.flags), 0, 0],
            deadline_ns: 0,
        }
    }
}
