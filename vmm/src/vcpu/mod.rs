//! The vCPU thread: enter the guest, handle its exits, deliver interrupts.
//!
//! ```text
//!            +--------------------------------------------------------------+
//!            |  loop top: stop? publish the counters                        |
//!            |  (every 20 ms); pause? hold?                                 |
//!            |  sampling: kperf deadline passed? expiry + own sample        |
//!            |  trace: drain the guest's event ring                         |
//!            |  within the timer advance of the deadline: wait for it       |
//!            |  under the irq lock: poll own timer device, pick the vector  |
//!            |  then: program own POSIX timer (early by the advance);       |
//!            |        KVM_INTERRUPT if the guest is ready, else             |
//!            |        request_interrupt_window                              |
//!            +----------------------------+---------------------------------+
//!                                         | KVM_RUN
//!     exits: PIO/MMIO -> bus | HLT -> park until deliverable | EINTR (kick,
//!     timer signal: consumed with sigtimedwait) -> loop | IRQ window -> loop |
//!     shutdown/internal -> VM ends
//! ```
//!
//! Running --- HLT (IF=1) ---> Parked --- interrupt pending / stop ---> Running
//! Running --- stop flag ---> Finished
//!
//! - [`inject`]: what a guest entry delivers, decided under the irq lock.
//! - `park`: HLT, pause and hold: where the thread waits outside the guest.
//! - [`advance`]: timer advance, arming the host timer early and waiting
//!   for the deadline.

pub mod advance;
pub mod inject;
mod park;
pub mod test_hooks;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use kvm_ioctls::{SyncReg, VcpuExit, VcpuFd};

use crate::bus::Bus;
use crate::host_time::{self, PosixTimer, TimerTag};
use crate::kick;
use crate::metrics::ExitReason;
use crate::sampling::{VcpuSampler, VcpuSampling};
use crate::vm::{VmExit, VmShared};
use advance::WakePath;

/// How often, in device time, a vCPU thread copies its counters where a
/// live summary reads them ([`crate::vm::shared::VcpuSlot::published`]): a
/// live summary's per-vCPU figures are at most this old, exact while paused.
pub const PUBLISH_PERIOD_NS: u64 = 20_000_000;

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
    pub sampling: VcpuSampling,
}

/// Everything a vCPU thread needs.
pub struct VcpuRunner {
    id: u32,
    fd: VcpuFd,
    shared: Arc<VmShared>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    stats: VcpuRunStats,
    /// The sampling side of this vCPU (only with sampling).
    sampler: Option<VcpuSampler>,
    /// Device time of the last copy of the counters for a live summary.
    published_at: Option<u64>,
    /// The device deadline the POSIX timer was last armed for (device time).
    armed_for: Option<u64>,
    /// The POSIX timer's signal ended the last `KVM_RUN`: the next entry
    /// measures that wake against `armed_for` (timer advance learns from it).
    timer_woke: bool,
}

impl std::fmt::Debug for VcpuRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuRunner")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

fn host_error(id: u32, what: &str, e: impl std::fmt::Display) -> VmExit {
    VmExit::Host(format!("vCPU {id}: {what}: {e}"))
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
            sampler: None,
            published_at: None,
            armed_for: None,
            timer_woke: false,
        }
    }

    /// Runs the vCPU until the VM stops. Any failure ends the VM through
    /// `request_exit`; the statistics are returned either way.
    pub fn run(mut self) -> VcpuRunStats {
        host_time::set_min_timer_slack();
        // The kick and timer signals are blocked here before anyone can kick
        // this thread (its id is published below), and unblocked only inside
        // KVM_RUN (crate::kick).
        let blocked = kick::block_in_current_thread()
            .map_err(|e| host_error(self.id, "blocking the kick signals", e))
            .and_then(|()| {
                kick::set_kvm_signal_mask(&self.fd)
                    .map_err(|e| host_error(self.id, "KVM_SET_SIGNAL_MASK", e))
            });
        // SAFETY: pthread_self has no preconditions.
        let _ = self.shared.vcpus[self.id as usize]
            .thread
            .set(unsafe { libc::pthread_self() });
        if let Some(sampling) = &self.shared.sampling {
            // SAFETY: gettid has no preconditions.
            sampling.no_exit.set_tid(self.id, unsafe { libc::gettid() });
        }
        self.fd.set_sync_valid_reg(SyncReg::Register);
        self.fd.set_sync_valid_reg(SyncReg::SystemRegister);
        // A panic of this thread ends the VM with a report, as any failure
        // does; the other threads' data is still collected and written.
        let id = self.id;
        let started = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            blocked
                .and_then(|()| {
                    // From here on the thread runs guest code: only its list.
                    crate::sampling::samplers::open_statm();
                    crate::seccomp::install(crate::seccomp::ThreadKind::Vcpu)
                        .map_err(|e| host_error(id, "seccomp", e.chain()))
                })
                .and_then(|()| self.start_timers())
                .and_then(|timer| self.run_loop(timer))
        }))
        .unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".to_owned());
            Err(VmExit::Host(format!("vCPU {id}: its thread died: {what}")))
        });
        if let Err(reason) = started {
            self.shared.request_exit(reason);
        }
        // From here on nobody may kick this thread (it may be joined), and a
        // synchronous sampling stop must not wait for it.
        self.shared.vcpus[self.id as usize].lock().exited = true;
        if let Some(sampling) = &self.shared.sampling {
            sampling.retire(self.id);
        }
        let regs = self.fd.sync_regs();
        self.stats.last_rip = regs.regs.rip;
        self.stats.last_rflags = regs.regs.rflags;
        self.stats.last_cs = u64::from(regs.sregs.cs.selector);
        if let Some(sampler) = self.sampler.take() {
            self.stats.sampling = sampler.into_stats();
        }
        self.stats.exits = self.exit_counts();
        self.stats
    }

    /// The timer device's POSIX timer, and the sampler's (with sampling).
    fn start_timers(&mut self) -> Result<PosixTimer, VmExit> {
        let id = self.id;
        if self.shared.sampling.is_some() {
            let sampler = VcpuSampler::for_current_thread(id, self.shared.clock)
                .map_err(|e| host_error(id, "timer_create", e))?;
            self.sampler = Some(sampler);
        }
        PosixTimer::for_current_thread(kick::sig_timer(), TimerTag::Device)
            .map_err(|e| host_error(id, "timer_create", e))
    }

    /// Copies the counters where a live summary reads them, every
    /// [`PUBLISH_PERIOD_NS`] or at once with `force` (before parking for a
    /// pause). The copy is made before the slot's lock is taken.
    fn publish_stats(&mut self, force: bool) {
        let now = self.shared.now();
        if !force
            && self
                .published_at
                .is_some_and(|at| now.saturating_sub(at) < PUBLISH_PERIOD_NS)
        {
            return;
        }
        self.published_at = Some(now);
        let mut stats = self.stats.clone();
        stats.exits = self.exit_counts();
        if let Some(sampler) = &self.sampler {
            stats.sampling = sampler.stats().clone();
        }
        *self.shared.vcpus[self.id as usize]
            .published
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(stats);
    }

    /// Counts an exit in this vCPU's slot: one relaxed increment, read by
    /// `GET /metrics` from the API thread and by the summary at the end.
    fn count(&self, reason: ExitReason) {
        self.shared.vcpus[self.id as usize].exits.count(reason);
    }

    /// This vCPU's non-zero exit counts by reason, from its slot.
    fn exit_counts(&self) -> BTreeMap<&'static str, u64> {
        self.shared.vcpus[self.id as usize]
            .exits
            .all()
            .into_iter()
            .filter(|&(_, n)| n > 0)
            .collect()
    }

    fn run_loop(&mut self, mut timer: PosixTimer) -> Result<(), VmExit> {
        let id = self.id;
        let shared = self.shared.clone();
        loop {
            if shared.stopping() {
                return Ok(());
            }
            if let Some(sampling) = &shared.sampling {
                // Every pass acknowledges a pending sampling stop, held or not.
                sampling.acknowledge(id);
            }
            test_hooks::maybe_panic(id, || shared.now());
            self.publish_stats(false);
            if self.stay_out() {
                continue;
            }
            if let (Some(sampler), Some(sampling)) = (&mut self.sampler, &shared.sampling) {
                sampler
                    .at_loop_top(sampling, &shared.mem, &self.fd, &|cpu| shared.wake(cpu))
                    .map_err(|e| host_error(id, "timer_settime", e))?;
            }
            if let Some(sampling) = &shared.sampling {
                // With a trace: what the guest published since the last exit.
                // With the no-exit tier: the switch log, complete up to now.
                sampling.drain_guest_events(id, &shared.mem, shared.now());
            }
            if !shared.pausing() {
                self.prepare_entry(&mut timer)?;
            }
            match self.fd.run() {
                Ok(VcpuExit::IoOut(port, data)) => {
                    if !self.pio.write(id, u64::from(port), data) {
                        self.stats.bus_misses += 1;
                        log::debug!("vCPU {id}: write to unclaimed port {port:#x}");
                    }
                    self.count(ExitReason::Io);
                }
                Ok(VcpuExit::IoIn(port, data)) => {
                    if !self.pio.read(id, u64::from(port), data) {
                        self.stats.bus_misses += 1;
                    }
                    self.count(ExitReason::Io);
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    if !self.mmio.write(id, addr, data) {
                        self.stats.bus_misses += 1;
                        log::debug!("vCPU {id}: write to unclaimed MMIO {addr:#x}");
                    }
                    self.count(ExitReason::Mmio);
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if !self.mmio.read(id, addr, data) {
                        self.stats.bus_misses += 1;
                    }
                    self.count(ExitReason::Mmio);
                }
                Ok(VcpuExit::Hlt) => {
                    self.count(ExitReason::Hlt);
                    self.stats.halts += 1;
                    self.halt()?;
                }
                Ok(VcpuExit::IrqWindowOpen) => self.count(ExitReason::IrqWindow),
                Ok(VcpuExit::Intr) => self.count(ExitReason::Intr),
                Ok(VcpuExit::Shutdown) => {
                    self.count(ExitReason::Shutdown);
                    let rip = self.fd.sync_regs().regs.rip;
                    return Err(VmExit::TripleFault { vcpu: id, rip });
                }
                Ok(VcpuExit::InternalError) => {
                    self.count(ExitReason::InternalError);
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
                    self.count(ExitReason::FailEntry);
                    return Err(VmExit::Emulation {
                        vcpu: id,
                        detail: format!("VM entry failed (reason {reason:#x}, host cpu {cpu})"),
                    });
                }
                Ok(other) => {
                    let detail = format!("unexpected exit {other:?}");
                    self.count(ExitReason::Other);
                    return Err(VmExit::Emulation { vcpu: id, detail });
                }
                Err(e) if e.errno() == libc::EINTR => {
                    self.count(ExitReason::Intr);
                    self.note_signals(kick::drain_pending());
                }
                Err(e) if e.errno() == libc::EAGAIN => self.count(ExitReason::Again),
                Err(e) => return Err(host_error(id, "KVM_RUN", e)),
            }
        }
    }

    /// Notes the kick and timer signals consumed for this thread (blocked
    /// outside KVM_RUN; consumed, they do not end the next KVM_RUN at once):
    /// the sampler counts its timer's missed expirations. What they asked
    /// for is seen at the loop top, which follows.
    fn note_signals(&mut self, consumed: kick::Consumed) {
        self.timer_woke |= consumed.device_timer > 0;
        if let Some(sampler) = &mut self.sampler {
            sampler.note_signals(&consumed);
        }
    }

    /// Polls the timer device, programs the POSIX timer and injects what the
    /// guest can take (the decision under the irq lock, the system calls after).
    ///
    /// With timer advance the POSIX timer is armed early; an entry within
    /// the advance of the deadline (the early wake) first waits for the
    /// deadline outside the lock, so the poll fires and the vector is
    /// injected at it, never before.
    fn prepare_entry(&mut self, timer: &mut PosixTimer) -> Result<(), VmExit> {
        let id = self.id;
        let shared = &self.shared;
        let slot = &shared.vcpus[id as usize];
        let run = self.fd.get_kvm_run();
        let ready = run.ready_for_interrupt_injection != 0 && run.if_flag != 0;
        // After a host stop this raises the resume before the timer is
        // polled, so the TimerResume vector goes in ahead of the timer's.
        let mut now = shared.vcpu_now(id);
        let mut irq = slot.lock();
        // Decided with the advance the timer was armed with, before this
        // wake moves it.
        let wait_for = (irq.timer.next_deadline())
            .filter(|&d| irq.advance.should_wait(WakePath::Running, now, d));
        if std::mem::take(&mut self.timer_woke) {
            if let Some(armed_for) = self.armed_for {
                irq.advance.note_wake(WakePath::Running, now, armed_for);
            }
        }
        if let Some(deadline) = wait_for {
            {
                drop(irq);
                let start = now;
                now = advance::wait_until(deadline, || shared.now());
                irq = slot.lock();
                irq.advance.note_wait(WakePath::Running, now - start);
            }
        }
        let entry = inject::prepare_entry(&mut irq, now, ready);
        let arm_at = entry
            .timer_deadline
            .map(|d| irq.advance.arm_at(WakePath::Running, d));
        drop(irq);
        self.armed_for = entry.timer_deadline;
        if let (Some(tap), Some(deadline)) = (shared.deadline_tap.get(), entry.timer_deadline) {
            tap.offer(id, shared.clock.to_monotonic(deadline));
        }
        timer
            .program(arm_at.map(|at| shared.clock.to_monotonic(at)))
            .map_err(|e| host_error(id, "timer_settime", e))?;
        if let Some(vector) = entry.inject {
            inject::kvm_interrupt(&self.fd, vector)
                .map_err(|e| host_error(id, "KVM_INTERRUPT", e))?;
        }
        self.fd.get_kvm_run().request_interrupt_window = u8::from(entry.request_window);
        Ok(())
    }

    /// The hold deadline set by the controller, device time (0 = none).
    fn hold_until(&self) -> u64 {
        self.shared.vcpus[self.id as usize]
            .hold_until
            .load(Ordering::Acquire)
    }
}
