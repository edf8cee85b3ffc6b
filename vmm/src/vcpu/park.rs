//! Where a vCPU thread waits outside the guest: a pause (until resumed), a
//! host hold (until its deadline), and HLT (until an interrupt is deliverable).
//! Every wait ends at once on a stop, and acknowledges a sampling stop.

use std::time::Duration;

use super::advance::{self, WakePath};
use super::VcpuRunner;
use crate::kick;
use crate::vm::VmExit;

/// How long a parked vCPU with no timer deadline sleeps before re-checking
/// (a safety net only: wake-ups are explicit).
const PARK_SAFETY_NS: u64 = 100_000_000;

/// How long a pause waits for a vCPU with interrupts disabled to enable them.
const PAUSE_POINT_LIMIT_NS: u64 = 50_000_000;

impl VcpuRunner {
    /// A pause or a host hold keeps this vCPU out of the guest: waits, and
    /// returns `true` so that the loop starts over. During a pause that
    /// finds the guest with interrupts disabled (in an interrupt handler, say)
    /// the guest runs on to the point where it enables them, with nothing new
    /// injected.
    pub(super) fn stay_out(&mut self) -> bool {
        if self.shared.pausing() {
            if self.at_pause_point() {
                self.serve_pet_request();
                self.publish_stats(true);
                self.pause_park();
                return true;
            }
            self.fd.get_kvm_run().request_interrupt_window = 1;
        }
        let hold_until = self.hold_until();
        let now = self.shared.now();
        if hold_until <= now {
            return false;
        }
        // Held by the host (VmController::hold_vcpu): the guest clock keeps
        // running. Parked on the condition variable, so that a wake-up (stop,
        // pause, sampling stop) is noticed at once; the loop re-checks until
        // the hold has passed.
        let slot = &self.shared.vcpus[self.id as usize];
        let mut irq = slot.lock();
        irq.parked = true;
        let timeout = Duration::from_nanos(hold_until - now);
        let (mut irq, _) = slot
            .wake
            .wait_timeout(irq, timeout)
            .unwrap_or_else(|p| p.into_inner());
        irq.parked = false;
        true
    }

    /// A PET sample asked of this vCPU is taken before it parks (the guest
    /// is stopped either way), so a PET pass holding the guest does not
    /// delay the broadcast's samples past the pass.
    fn serve_pet_request(&mut self) {
        let shared = self.shared.clone();
        if let (Some(sampler), Some(sampling)) = (&mut self.sampler, &shared.sampling) {
            sampler.serve_pet_request(sampling, &shared.mem, &self.fd, shared.now());
        }
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
        let slot = &shared.vcpus[self.id as usize];
        let regs = self.fd.sync_regs();
        *slot.parked_regs.lock().unwrap_or_else(|p| p.into_inner()) = Some((regs.regs, regs.sregs));
        let mut state = shared.pause_state();
        state.parked += 1;
        shared.pause_cv.notify_all();
        while state.in_force() && !shared.stopping() {
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
        drop(state);
        *slot.parked_regs.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// HLT: park the thread until an interrupt is deliverable or the VM stops.
    /// A halted vCPU is idle for kperf: no sampling kicks until it wakes (KT-I-1).
    pub(super) fn halt(&mut self) -> Result<(), VmExit> {
        let shared = self.shared.clone();
        let interrupts_off = self.fd.get_kvm_run().if_flag == 0;
        if interrupts_off {
            self.stats.dead_halts += 1;
        }
        if let (Some(sampler), Some(sampling)) = (&mut self.sampler, &shared.sampling) {
            sampler
                .before_halt(sampling)
                .map_err(|e| super::host_error(self.id, "timer_settime", e))?;
        }
        self.publish_stats(false);
        self.park_until_pending(interrupts_off);
        // The device timer's signal for the deadline that ended the park (or
        // a kick sent before it) is still pending: consumed here, it does not
        // cost an extra KVM_RUN that returns at once.
        self.note_signals(kick::drain_pending());
        // The POSIX timer's signal consumed here woke nobody: the halted
        // path learned from its own wake.
        self.timer_woke = false;
        if let (Some(sampler), Some(sampling)) = (&mut self.sampler, &shared.sampling) {
            sampler.after_halt(sampling);
        }
        Ok(())
    }

    /// With sampling: `Some(0)` when PET needs this vCPU at its loop top now
    /// (a PET sample was asked of it, or it services the PET one-shot and
    /// that is due), `Some(ns)` until the one-shot is due, `None` otherwise.
    fn pet_work(&self, now: u64) -> Option<u64> {
        let sampling = self.shared.sampling.as_ref()?;
        if sampling.pet.has_request(self.id as usize) {
            return Some(0);
        }
        let handles = self.sampler.as_ref().is_some_and(|s| s.handles_pet());
        let deadline = handles.then(|| sampling.pet.deadline()).flatten()?;
        Some(deadline.saturating_sub(now))
    }

    fn park_until_pending(&mut self, interrupts_off: bool) {
        let shared = self.shared.clone();
        let slot = &shared.vcpus[self.id as usize];
        let mut irq = slot.lock();
        // A timed wait the deadline ended: when it ended, and the deadline.
        let mut timer_wake: Option<(u64, u64)> = None;
        loop {
            if let Some(sampling) = &shared.sampling {
                sampling.acknowledge(self.id);
            }
            if shared.stopping() {
                return;
            }
            if shared.pausing() {
                if !interrupts_off {
                    // The loop top parks it at this interruptible point.
                    return;
                }
                // Halted with interrupts off, the guest cannot run on to a
                // pause point: it is at one already. Park for the pause here
                // rather than re-entering the guest only to halt again.
                drop(irq);
                self.pause_park();
                irq = slot.lock();
                continue;
            }
            let now = shared.now();
            irq.poll_timer(now);
            let deadline = irq.timer.next_deadline().filter(|_| !interrupts_off);
            // Decided with the advance the wait was timed with, before the
            // wake that ended it moves it.
            let wait_for = deadline.filter(|&d| irq.advance.should_wait(WakePath::Halted, now, d));
            if let Some((at, deadline)) = timer_wake.take() {
                irq.advance.note_wake(WakePath::Halted, at, deadline);
            }
            if !interrupts_off && irq.vic.deliverable().is_some() {
                return;
            }
            // PET work does not wait for the guest (PET-H-2, AMB-15): a PET
            // sample asked of this vCPU, or the PET one-shot it services.
            let pet = self.pet_work(now);
            if pet == Some(0) {
                return;
            }
            if let Some(deadline) = wait_for {
                // Timer advance: woken early, wait for the deadline without
                // the lock, then poll at it (the loop's top).
                drop(irq);
                let reached = advance::wait_until(deadline, || shared.now());
                irq = slot.lock();
                irq.advance.note_wait(WakePath::Halted, reached - now);
                continue;
            }
            let until_deadline =
                deadline.map(|d| irq.advance.arm_at(WakePath::Halted, d).saturating_sub(now));
            let pet = pet.unwrap_or(u64::MAX);
            let timeout = until_deadline.unwrap_or(PARK_SAFETY_NS).min(pet);
            // Only a timeout set by the deadline is a wake timer advance learns from.
            let timed_by_deadline = deadline.filter(|_| until_deadline.is_some_and(|t| t <= pet));
            irq.parked = true;
            let (guard, result) = slot
                .wake
                .wait_timeout(irq, Duration::from_nanos(timeout))
                .unwrap_or_else(|p| p.into_inner());
            irq = guard;
            irq.parked = false;
            if let (true, Some(deadline)) = (result.timed_out(), timed_by_deadline) {
                timer_wake = Some((shared.now(), deadline));
            }
        }
    }
}
