//! The vCPU thread: enter the guest, handle its exits, deliver interrupts.
//!
//! ```text
//!            +--------------------------------------------------------------+
//!            |  loop top: clear immediate_exit; stop?                       |
//!            |  poll own timer device (fires -> raise timer vector in VIC)  |
//!            |  program own POSIX timer for the next deadline               |
//!            |  VIC deliverable && guest ready? KVM_INTERRUPT              |
//!            |                         : request_interrupt_window           |
//!            +----------------------------+---------------------------------+
//!                                         | KVM_RUN
//!     exits: PIO/MMIO -> bus | HLT -> park until deliverable | EINTR (kick,
//!     timer signal) -> loop | IRQ window -> loop | shutdown/internal -> VM ends
//! ```
//!
//! Running --- HLT (IF=1) ---> Parked --- interrupt pending / stop ---> Running
//! Running --- stop flag ---> Finished

use std::collections::BTreeMap;
use std::sync::Arc;

use kvm_bindings::kvm_interrupt;
use kvm_ioctls::{SyncReg, VcpuExit, VcpuFd};
use metronome_abi::Vector;
use metronome_devices::{Expiry, Raise};
use vmm_sys_util::errno;
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iow_nr;

use crate::bus::Bus;
use crate::kick::{self, HostTimer};
use crate::sampler::capture;
use crate::sampling::{SamplingShared, TraceRecord, NO_DEADLINE, SAMPLE_LIMIT};
use crate::shared::{IrqState, VmExit, VmShared};
use metronome_devices::kptimer::{self, sampler, trace};

/// kvm-ioctls has no wrapper for KVM_INTERRUPT (used without an in-kernel irqchip).
mod ioctls {
    #![allow(missing_docs)]
    use super::*;
    const KVMIO: u32 = 0xAE;
    ioctl_iow_nr!(KVM_INTERRUPT, KVMIO, 0x86, kvm_interrupt);
}
use ioctls::KVM_INTERRUPT;

/// How long a parked vCPU with no timer deadline sleeps before re-checking
/// (a safety net only: wake-ups are explicit).
const PARK_SAFETY_NS: u64 = 100_000_000;

/// How long a pause waits for a vCPU with interrupts disabled to enable them.
const PAUSE_POINT_LIMIT_NS: u64 = 50_000_000;

/// What one vCPU thread observed, returned when it finishes.
#[derive(Clone, Debug, Default)]
pub struct VcpuRunStats {
    /// The vCPU id.
    pub id: u32,
    /// Exits by reason.
    pub exits: BTreeMap<&'static str, u64>,
    /// HLT exits.
    pub halts: u64,
    /// Halts with interrupts disabled (the vCPU can only be stopped).
    pub dead_halts: u64,
    /// Port or MMIO accesses that hit no device.
    pub bus_misses: u64,
    /// RIP at the last exit.
    pub last_rip: u64,
    /// CS selector at the last exit.
    pub last_cs: u64,
    /// RFLAGS at the last exit.
    pub last_rflags: u64,
    /// Host-side sampling on this vCPU.
    pub sampling: crate::sampling::VcpuSampling,
}

/// Everything a vCPU thread needs.
pub struct VcpuRunner {
    id: u32,
    fd: VcpuFd,
    shared: Arc<VmShared>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    stats: VcpuRunStats,
    /// The kperf host deadline's POSIX timer (only with sampling).
    sample_timer: Option<HostTimer>,
}

impl std::fmt::Debug for VcpuRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuRunner")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl VcpuRunner {
    /// A runner for vCPU `id`.
    pub fn new(id: u32, fd: VcpuFd, shared: Arc<VmShared>, pio: Arc<Bus>, mmio: Arc<Bus>) -> Self {
        let stats = VcpuRunStats {
            id,
            ..Default::default()
        };
        Self {
            id,
            fd,
            shared,
            pio,
            mmio,
            stats,
            sample_timer: None,
        }
    }

    /// Runs the vCPU until the VM stops. Any failure ends the VM through
    /// `request_exit`; the statistics are returned either way.
    pub fn run(mut self) -> VcpuRunStats {
        kick::set_min_timer_slack();
        let run = self.fd.get_kvm_run() as *mut kvm_bindings::kvm_run;
        // SAFETY: kvm_run is mmap'd for the life of `self.fd`, which outlives the
        // binding: we unbind before returning (and so before the fd is dropped).
        unsafe { kick::bind_current_thread(std::ptr::addr_of_mut!((*run).immediate_exit)) };
        // SAFETY: pthread_self has no preconditions.
        let _ = self.shared.vcpus[self.id as usize]
            .thread
            .set(unsafe { libc::pthread_self() });
        self.fd.set_sync_valid_reg(SyncReg::Register);
        self.fd.set_sync_valid_reg(SyncReg::SystemRegister);
        if self.shared.sampling.is_some() {
            match HostTimer::for_current_thread() {
                Ok(timer) => self.sample_timer = Some(timer),
                Err(e) => self
                    .shared
                    .request_exit(VmExit::Host(format!("vCPU {}: timer_create: {e}", self.id))),
            }
        }
        match HostTimer::for_current_thread() {
            Ok(timer) => {
                if let Err(message) = self.run_loop(timer) {
                    self.shared.request_exit(message);
                }
            }
            Err(e) => self
                .shared
                .request_exit(VmExit::Host(format!("vCPU {}: timer_create: {e}", self.id))),
        }
        // From here on nobody may kick this thread (it may be joined), and a
        // synchronous sampling stop must not wait for it.
        self.shared.vcpus[self.id as usize].lock().exited = true;
        if let Some(sampling) = &self.shared.sampling {
            sampling.retire(self.id);
        }
        kick::unbind_current_thread();
        let regs = self.fd.sync_regs();
        self.stats.last_rip = regs.regs.rip;
        self.stats.last_rflags = regs.regs.rflags;
        self.stats.last_cs = u64::from(regs.sregs.cs.selector);
        self.stats
    }

    fn count(&mut self, reason: &'static str) {
        *self.stats.exits.entry(reason).or_insert(0) += 1;
    }

    fn run_loop(&mut self, mut timer: HostTimer) -> Result<(), VmExit> {
        let id = self.id;
        let shared = self.shared.clone();
        let slot = &shared.vcpus[id as usize];
        loop {
            self.fd.set_kvm_immediate_exit(0);
            if shared.stopping() {
                return Ok(());
            }
            if let Some(sampling) = &shared.sampling {
                sampling.acknowledge(id);
            }
            if shared.pausing() {
                if self.at_pause_point() {
                    self.pause_park();
                    continue;
                }
                // The guest has interrupts disabled (in the middle of an
                // interrupt handler, say): let it run to the point where it
                // enables them, injecting nothing new.
                self.fd.get_kvm_run().request_interrupt_window = 1;
            }
            let hold_until = slot.hold_until.load(std::sync::atomic::Ordering::Acquire);
            let now = shared.now();
            if hold_until > now {
                // Held by the host (VmController::hold_vcpu): the guest clock keeps
                // running. Parked on the condition variable, so that a wake-up
                // (stop, pause, sampling stop) is noticed at once; the loop
                // re-checks until the hold has passed.
                let mut irq = slot.lock();
                irq.parked = true;
                let timeout = std::time::Duration::from_nanos(hold_until - now);
                let (mut irq, _) = slot
                    .wake
                    .wait_timeout(irq, timeout)
                    .unwrap_or_else(|p| p.into_inner());
                irq.parked = false;
                continue;
            }
            if let Some(sampling) = &shared.sampling {
                let now = shared.now();
                if sampling.deadlines[id as usize].load(std::sync::atomic::Ordering::Acquire) <= now
                {
                    self.sample_expiry(sampling, now);
                }
                self.program_sample_timer(sampling)?;
            }
            if !shared.pausing() {
                let now = shared.now();
                let mut irq = slot.lock();
                fire_timer(&mut irq, now);
                let deadline = irq.timer.next_deadline().map(|d| shared.to_monotonic(d));
                timer
                    .program(deadline)
                    .map_err(|e| VmExit::Host(format!("vCPU {id}: timer_settime: {e}")))?;
                self.inject(&mut irq, now)?;
            }
            match self.fd.run() {
                Ok(VcpuExit::IoOut(port, data)) => {
                    if !self.pio.write(id, u64::from(port), data) {
                        self.stats.bus_misses += 1;
                        log::debug!("vCPU {id}: write to unclaimed port {port:#x}");
                    }
                    self.count("io");
                }
                Ok(VcpuExit::IoIn(port, data)) => {
                    if !self.pio.read(id, u64::from(port), data) {
                        self.stats.bus_misses += 1;
                    }
                    self.count("io");
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    if !self.mmio.write(id, addr, data) {
                        self.stats.bus_misses += 1;
                        log::debug!("vCPU {id}: write to unclaimed MMIO {addr:#x}");
                    }
                    self.count("mmio");
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if !self.mmio.read(id, addr, data) {
                        self.stats.bus_misses += 1;
                    }
                    self.count("mmio");
                }
                Ok(VcpuExit::Hlt) => {
                    self.count("hlt");
                    self.stats.halts += 1;
                    self.park()?;
                }
                Ok(VcpuExit::IrqWindowOpen) => self.count("irq_window"),
                Ok(VcpuExit::Intr) => self.count("intr"),
                Ok(VcpuExit::Shutdown) => {
                    self.count("shutdown");
                    let rip = self.fd.sync_regs().regs.rip;
                    return Err(VmExit::TripleFault { vcpu: id, rip });
                }
                Ok(VcpuExit::InternalError) => {
                    self.count("internal_error");
                    // SAFETY: the exit reason says the `internal` union member is valid.
                    let suberror =
                        unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                    let rip = self.fd.sync_regs().regs.rip;
                    return Err(VmExit::Emulation {
                        vcpu: id,
                        detail: format!("internal error (suberror {suberror}) at RIP {rip:#x}"),
                    });
                }
                Ok(VcpuExit::FailEntry(reason, cpu)) => {
                    self.count("fail_entry");
                    return Err(VmExit::Emulation {
                        vcpu: id,
                        detail: format!("VM entry failed (reason {reason:#x}, host cpu {cpu})"),
                    });
                }
                Ok(other) => {
                    let detail = format!("unexpected exit {other:?}");
                    self.count("other");
                    return Err(VmExit::Emulation { vcpu: id, detail });
                }
                Err(e) if e.errno() == libc::EINTR => self.count("intr"),
                Err(e) if e.errno() == libc::EAGAIN => self.count("again"),
                Err(e) => return Err(VmExit::Host(format!("vCPU {id}: KVM_RUN: {e}"))),
            }
        }
    }

    /// Injects the highest deliverable vector if the guest can take it now,
    /// otherwise asks KVM for an exit when it can.
    fn inject(&mut self, irq: &mut IrqState, now: u64) -> Result<(), VmExit> {
        let run = self.fd.get_kvm_run();
        let Some(vector) = irq.vic.deliverable() else {
            run.request_interrupt_window = 0;
            return Ok(());
        };
        if run.ready_for_interrupt_injection == 0 || run.if_flag == 0 {
            run.request_interrupt_window = 1;
            return Ok(());
        }
        let request = kvm_interrupt {
            irq: u32::from(vector),
        };
        // SAFETY: KVM_INTERRUPT on our own vCPU fd with a valid kvm_interrupt.
        let ret = unsafe { ioctl_with_ref(&self.fd, KVM_INTERRUPT(), &request) };
        if ret != 0 {
            return Err(VmExit::Host(format!(
                "vCPU {}: KVM_INTERRUPT: {}",
                self.id,
                errno::Error::last()
            )));
        }
        irq.vic.acknowledge(vector);
        match vector {
            v if v == Vector::Timer as u8 => {
                irq.injected.timer += 1;
                if let Some(deadline) = irq.fired_deadline.take() {
                    irq.timer.note_injection(now, deadline);
                    irq.host_lateness.record(now.saturating_sub(deadline));
                }
            }
            v if v == Vector::Ipi as u8 => irq.injected.ipi += 1,
            v if v == Vector::Stress as u8 => irq.injected.stress += 1,
            _ => irq.injected.other += 1,
        }
        let run = self.fd.get_kvm_run();
        run.request_interrupt_window = u8::from(irq.vic.deliverable().is_some());
        Ok(())
    }

    /// Whether this vCPU may park for a pause now: the guest is interruptible
    /// (IF set at the last exit), or it has kept interrupts disabled for longer
    /// than [`PAUSE_POINT_LIMIT_NS`] since the pause began (a guest spinning with
    /// interrupts off must not block a pause forever).
    fn at_pause_point(&mut self) -> bool {
        if self.fd.get_kvm_run().if_flag != 0 {
            return true;
        }
        let since = self.shared.pause_state().since_ns;
        self.shared.now().saturating_sub(since) > PAUSE_POINT_LIMIT_NS
    }

    /// Pause: stay out of the guest until resumed or stopped.
    fn pause_park(&mut self) {
        let shared = self.shared.clone();
        if let Some(sampling) = &shared.sampling {
            // A paused vCPU takes no sample before its next loop top.
            sampling.acknowledge(self.id);
        }
        let mut state = shared.pause_state();
        state.parked += 1;
        shared.pause_cv.notify_all();
        while state.paused && !shared.stopping() {
            state = shared
                .pause_cv
                .wait(state)
                .unwrap_or_else(|p| p.into_inner());
            if let Some(sampling) = &shared.sampling {
                // Still paused: no sample can follow, so a sampling stop may complete.
                sampling.acknowledge(self.id);
            }
        }
        state.parked -= 1;
        shared.pause_cv.notify_all();
    }

    /// HLT: park the thread until an interrupt is deliverable or the VM stops.
    fn park(&mut self) -> Result<(), VmExit> {
        let shared = self.shared.clone();
        let interrupts_off = self.fd.get_kvm_run().if_flag == 0;
        if interrupts_off {
            self.stats.dead_halts += 1;
        }
        // A halted vCPU is idle for kperf: no sampling kicks until it wakes (KT-I-1).
        if let Some(sampling) = &shared.sampling {
            sampling.engine().cpu_idle(self.id as usize);
            sampling.deadlines[self.id as usize]
                .store(NO_DEADLINE, std::sync::atomic::Ordering::Release);
            self.program_sample_timer(sampling)?;
        }
        let result = self.park_until_pending(interrupts_off);
        if let Some(sampling) = &shared.sampling {
            // Stored under the engine lock, so a concurrent stop's cancel wins.
            let mut engine = sampling.engine();
            let deadline = engine.cpu_wake(self.id as usize, shared.now());
            sampling.deadlines[self.id as usize].store(
                deadline.unwrap_or(NO_DEADLINE),
                std::sync::atomic::Ordering::Release,
            );
            drop(engine);
        }
        result
    }

    fn park_until_pending(&mut self, interrupts_off: bool) -> Result<(), VmExit> {
        let shared = self.shared.clone();
        let slot = &shared.vcpus[self.id as usize];
        let mut irq = slot.lock();
        loop {
            if let Some(sampling) = &shared.sampling {
                sampling.acknowledge(self.id);
            }
            if shared.stopping() || shared.pausing() {
                return Ok(());
            }
            let now = shared.now();
            fire_timer(&mut irq, now);
            if !interrupts_off && irq.vic.deliverable().is_some() {
                return Ok(());
            }
            let timeout = match irq.timer.next_deadline() {
                Some(deadline) if !interrupts_off => deadline.saturating_sub(now),
                _ => PARK_SAFETY_NS,
            };
            irq.parked = true;
            let (guard, _) = slot
                .wake
                .wait_timeout(irq, std::time::Duration::from_nanos(timeout))
                .unwrap_or_else(|p| p.into_inner());
            irq = guard;
            irq.parked = false;
        }
    }
}

impl VcpuRunner {
    /// Programs the kperf POSIX timer from this vCPU's deadline.
    fn program_sample_timer(&mut self, sampling: &SamplingShared) -> Result<(), VmExit> {
        let deadline =
            sampling.deadlines[self.id as usize].load(std::sync::atomic::Ordering::Acquire);
        let at = (deadline != NO_DEADLINE).then(|| self.shared.to_monotonic(deadline));
        if let Some(timer) = self.sample_timer.as_mut() {
            timer
                .program(at)
                .map_err(|e| VmExit::Host(format!("vCPU {}: timer_settime: {e}", self.id)))?;
        }
        Ok(())
    }

    /// The kperf deadline passed: run the expiry (leader election under the
    /// engine lock, `PERF_TM_FIRE` by the leader there), then take this vCPU's
    /// own sample with the guest stopped (`PERF_TM_HNDLR` around it).
    fn sample_expiry(&mut self, sampling: &SamplingShared, now: u64) {
        let started = kick::monotonic_ns();
        let id = self.id;
        let mut requests = Vec::new();
        {
            let mut engine = sampling.engine();
            match engine.expire(id as usize, now) {
                kptimer::Expiry::Handled {
                    fires,
                    next_deadline,
                } => {
                    sampling.deadlines[id as usize].store(
                        next_deadline.unwrap_or(NO_DEADLINE),
                        std::sync::atomic::Ordering::Release,
                    );
                    if !fires.is_empty() {
                        self.stats.sampling.timer_fires += 1;
                    }
                    for fire in &fires {
                        if fire.leader {
                            self.stats.sampling.leader_fires += 1;
                            sampling.record(TraceRecord {
                                time_ns: self.shared.now(),
                                id: trace::TM_FIRE,
                                vcpu: id,
                                tid: 0,
                                args: fire.tm_fire_args(),
                                deadline_ns: fire.deadline,
                            });
                        }
                        if let Some(request) = fire.sample {
                            let samplers = engine.action_samplers(request.action).unwrap_or(0);
                            let udepth =
                                engine.action_ucallstack_depth(request.action).unwrap_or(0);
                            let kdepth =
                                engine.action_kcallstack_depth(request.action).unwrap_or(0);
                            let filter = engine.action_filter(request.action).unwrap_or(-1);
                            // TM_HNDLR start is recorded inside the critical
                            // section, so no later fire's TM_FIRE can precede
                            // it even if this thread is preempted (TR-P-5).
                            sampling.record(handler_record(
                                &self.shared,
                                id,
                                &request,
                                trace::DBG_FUNC_START,
                            ));
                            requests.push(Request {
                                request,
                                samplers,
                                udepth: udepth as usize,
                                kdepth: kdepth as usize,
                                filter,
                            });
                        }
                    }
                }
                kptimer::Expiry::NotRunning | kptimer::Expiry::NoSuchCpu => {
                    self.stats.sampling.not_running += 1;
                    sampling.deadlines[id as usize]
                        .store(NO_DEADLINE, std::sync::atomic::Ordering::Release);
                }
            }
        }
        for Request {
            request,
            samplers,
            udepth,
            kdepth,
            filter,
        } in requests
        {
            let thread_samplers = sampler::TH_INFO | sampler::USTACK | sampler::KSTACK;
            let wants_thread = samplers & thread_samplers != 0;
            // Capture only what is needed: the thread (for TH_INFO or the
            // filter) and only the stacks the action asks for.
            let raw = (wants_thread || filter != -1).then(|| {
                let regs = self.fd.sync_regs();
                let udepth = if samplers & sampler::USTACK != 0 {
                    udepth
                } else {
                    0
                };
                let kdepth = if samplers & sampler::KSTACK != 0 {
                    kdepth
                } else {
                    0
                };
                capture(
                    &self.shared.mem,
                    id,
                    now,
                    &regs.regs,
                    &regs.sregs,
                    udepth,
                    kdepth,
                )
            });
            // KT-SM-4: with a filter other than -1 that does not match, the
            // handler runs but nothing is sampled. The guest has threads, not
            // processes: the filter matches the guest thread id.
            let filtered_out = filter != -1
                && raw
                    .as_ref()
                    .is_some_and(|r| i64::from(filter) != r.tid as i64);
            if let (false, true, Some(mut raw)) = (filtered_out, wants_thread, raw) {
                if samplers & sampler::USTACK == 0 {
                    raw.user_stack = Default::default();
                }
                if samplers & sampler::KSTACK == 0 {
                    raw.kernel_stack = Default::default();
                }
                let v = &mut self.stats.sampling;
                v.walk_errors += u64::from(raw.walk_error());
                if v.raw.len() < SAMPLE_LIMIT {
                    v.raw.push(raw);
                } else {
                    v.dropped += 1;
                }
            }
            if !filtered_out {
                self.stats.sampling.samples += 1;
                sampling
                    .samples_taken
                    .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            }
            sampling.record(handler_record(
                &self.shared,
                id,
                &request,
                trace::DBG_FUNC_END,
            ));
            self.stats
                .sampling
                .cost
                .record(kick::monotonic_ns().saturating_sub(started));
        }
    }
}

/// A `PERF_TM_HNDLR` record (start or end qualifier) for `request` on vCPU `id`.
fn handler_record(
    shared: &VmShared,
    id: u32,
    request: &kptimer::SampleRequest,
    qualifier: u32,
) -> TraceRecord {
    TraceRecord {
        time_ns: shared.now(),
        id: trace::TM_HNDLR | qualifier,
        vcpu: id,
        tid: 0,
        args: [u64::from(request.timer), u64::from(request.flags), 0, 0],
        deadline_ns: 0,
    }
}

/// One sample a fire asks this vCPU for, with its action's settings.
struct Request {
    request: kptimer::SampleRequest,
    samplers: u32,
    udepth: usize,
    kdepth: usize,
    filter: i32,
}

/// Polls the timer device; an expiry raises the timer vector (or is counted as
/// coalesced when one is already pending).
fn fire_timer(irq: &mut IrqState, now: u64) {
    if let Expiry::Fired { deadline, .. } = irq.timer.poll(now) {
        match irq.vic.raise(Vector::Timer as u8) {
            Raise::Queued => irq.fired_deadline = Some(deadline),
            Raise::Coalesced => irq.timer.note_coalesced(),
            Raise::Rejected => {}
        }
    }
}
