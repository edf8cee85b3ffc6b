//! The PET sampler thread, "kperf-pet-sampling" (PET-T-1, PET-T-2): woken by
//! each traditional PET fire on the handler vCPU, it holds the guest still
//! (the guest is the one task it samples, PET-T-4), samples every guest
//! thread ([`crate::sampling::pet`]), lets the guest run again and re-arms
//! the PET one-shot with the pass's duration (PET-R-1).
//!
//! Trace (TR-P-6): `PET_IDLE` before each sleep, `PET_RUN` on waking,
//! `PET_SAMPLE` around the pass (end: tasks sampled), `PET_SAMPLE_TASK`
//! around the guest (end: threads sampled), `PET_SAMPLE_THREAD` around each
//! thread and its sampler records, `PET_SCHED` at the re-arm.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

use kperf::{trace, PET_HANDLER_CPU};

use super::VmShared;
use crate::host_time::{monotonic_ns, set_min_timer_slack};
use crate::sampling::pet::{task_sample, PetSampler};
use crate::sampling::{SamplingShared, TraceRecord};

/// The running PET sampler thread.
#[derive(Debug)]
pub struct PetThread {
    handle: JoinHandle<()>,
}

/// A VM's PET sampler thread, once created, and whether the VM's end has
/// closed the slot (no thread is created after it).
#[derive(Debug, Default)]
pub struct PetSlot {
    thread: Option<PetThread>,
    closed: bool,
}

impl PetThread {
    /// Starts the thread when the VM's kperf configuration has a traditional
    /// PET timer (created lazily, as XNU does, only when PET is configured).
    fn start(shared: &Arc<VmShared>) -> std::io::Result<Option<Self>> {
        let Some(sampling) = &shared.sampling else {
            return Ok(None);
        };
        {
            let engine = sampling.engine();
            if engine.pet_action() == 0 || engine.lightweight_pet() {
                return Ok(None);
            }
        }
        let shared = shared.clone();
        let handle = std::thread::Builder::new()
            .name("kperf-pet-sampling".into())
            .spawn(move || run(&shared))?;
        Ok(Some(Self { handle }))
    }

    /// Creates the thread if traditional PET is configured and the VM has
    /// none yet: when the VM starts, and when sampling is turned on after
    /// PET was configured at run time (PET-T-1: created lazily the first time
    /// PET is configured; PET only fires while sampling is on). Nothing once
    /// the VM's end has closed the slot.
    pub fn ensure(shared: &Arc<VmShared>) -> std::io::Result<()> {
        let mut slot = shared.pet_thread.lock().unwrap_or_else(|p| p.into_inner());
        if slot.closed || slot.thread.is_some() {
            return Ok(());
        }
        slot.thread = Self::start(shared)?;
        Ok(())
    }

    /// Closes the VM's slot and ends its thread, if any (after the vCPUs
    /// stopped).
    pub fn close(shared: &VmShared) {
        let thread = {
            let mut slot = shared.pet_thread.lock().unwrap_or_else(|p| p.into_inner());
            slot.closed = true;
            slot.thread.take()
        };
        if let Some(thread) = thread {
            thread.stop(shared);
        }
    }

    /// Ends the thread (after the vCPUs stopped) and waits for it.
    fn stop(self, shared: &VmShared) {
        if let Some(sampling) = &shared.sampling {
            sampling.pet.close();
        }
        let _ = self.handle.join();
    }
}

/// A record of the PET sampler thread (`vcpu` `u32::MAX`) made now; `args[0]`
/// is the thread sampled for `PET_SAMPLE_THREAD`, its `tid`.
fn record(sampling: &SamplingShared, shared: &VmShared, id: u32, args: [u64; 4]) {
    record_at(sampling, shared.now(), id, args);
}

/// A record of the PET sampler thread at device time `time_ns`.
fn record_at(sampling: &SamplingShared, time_ns: u64, id: u32, args: [u64; 4]) {
    let tid = if id & !0x3 == trace::PET_SAMPLE_THREAD {
        args[0]
    } else {
        0
    };
    sampling.record(TraceRecord {
        time_ns,
        id,
        vcpu: u32::MAX,
        tid,
        args,
        deadline_ns: 0,
    });
}

/// Closes a pass's brackets: `PET_SAMPLE_TASK` end (threads sampled) and
/// `PET_SAMPLE` end (one task: the guest) (TR-P-6).
fn end_pass(sampling: &SamplingShared, shared: &VmShared, threads: u64) {
    record(
        sampling,
        shared,
        trace::PET_SAMPLE_TASK | trace::DBG_FUNC_END,
        [threads, 0, 0, 0],
    );
    record(
        sampling,
        shared,
        trace::PET_SAMPLE | trace::DBG_FUNC_END,
        [1, 0, 0, 0],
    );
}

fn run(shared: &VmShared) {
    set_min_timer_slack();
    crate::sampling::samplers::open_statm();
    crate::seccomp::install_or_exit(crate::seccomp::ThreadKind::Pet);
    let Some(sampling) = &shared.sampling else {
        return;
    };
    let mut pet = PetSampler::default();
    loop {
        record(sampling, shared, trace::PET_IDLE, [0; 4]);
        // Spurious wake-ups (no PET action, or sampling off) sleep again,
        // without another PET_IDLE (PET-T-2).
        let (action, idle_rate) = loop {
            if !sampling.pet.wait() {
                return;
            }
            let engine = sampling.engine();
            let action = engine.action(engine.pet_action());
            if action.samplers != 0 && engine.sampling() {
                break (action, engine.pet_idle_rate());
            }
        };
        record(sampling, shared, trace::PET_RUN, [0; 4]);
        let started = monotonic_ns();
        record(
            sampling,
            shared,
            trace::PET_SAMPLE | trace::DBG_FUNC_START,
            [0; 4],
        );
        let samples = {
            let _hold = shared.hold_all();
            // A stop (or the end of the run) that came while the guest was
            // being held: no pass after it.
            if sampling.engine().sampling() && !shared.stopping() {
                record(
                    sampling,
                    shared,
                    trace::PET_SAMPLE_TASK | trace::DBG_FUNC_START,
                    [0; 4],
                );
                let parked: Vec<_> = shared
                    .vcpus
                    .iter()
                    .map(|slot| *slot.parked_regs.lock().unwrap_or_else(|p| p.into_inner()))
                    .collect();
                let task = task_sample(&shared.mem, &action, shared.now());
                let threads = pet.pass(&shared.mem, &parked, &action, idle_rate, &|| shared.now());
                Some((task, threads))
            } else {
                None
            }
        };
        let Some((task, samples)) = samples else {
            // No task was sampled: the pass's bracket closes with 0 tasks.
            record(
                sampling,
                shared,
                trace::PET_SAMPLE | trace::DBG_FUNC_END,
                [0; 4],
            );
            continue;
        };
        if let Some(task) = task {
            for data in task.samplers.trace_records(&task) {
                sampling.record(data);
            }
            sampling.pet.samples.push(task);
        }
        for sample in &samples {
            // Recorded after the hold, at the times the pass sampled it.
            let args = [sample.raw.tid, u64::from(sample.dirty), 0, 0];
            record_at(
                sampling,
                sample.raw.time_ns,
                trace::PET_SAMPLE_THREAD | trace::DBG_FUNC_START,
                args,
            );
            for data in sample.raw.samplers.trace_records(&sample.raw) {
                sampling.record(data);
            }
            record_at(
                sampling,
                sample.ended_ns,
                trace::PET_SAMPLE_THREAD | trace::DBG_FUNC_END,
                args,
            );
        }
        end_pass(sampling, shared, samples.len() as u64);
        let walk_errors = samples.iter().filter(|s| s.raw.walk_error()).count() as u64;
        sampling
            .pet
            .walk_errors
            .fetch_add(walk_errors, Ordering::Relaxed);
        sampling
            .pet
            .corrupt_thread_entries
            .store(pet.corrupt_entries(), Ordering::Relaxed);
        let threads = samples.len() as u64;
        for sample in samples {
            sampling.pet.samples.push(sample.raw);
        }
        let duration = monotonic_ns().saturating_sub(started);
        sampling.pet.passes.fetch_add(1, Ordering::Relaxed);
        sampling
            .pet
            .threads_sampled
            .fetch_add(threads, Ordering::Relaxed);
        sampling
            .pet
            .pass_ns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(duration);
        let schedule = {
            let mut engine = sampling.engine();
            let schedule = engine.pet_rearm(shared.now(), duration);
            sampling.pet.set_deadline(engine.pet_deadline());
            schedule
        };
        if let Some(s) = schedule {
            let args = [
                s.period_ns,
                s.adjusted_period_ns,
                s.sample_duration_ns,
                s.deadline,
            ];
            record(sampling, shared, trace::PET_SCHED, args);
            // The handler vCPU arms its timer for the new deadline.
            shared.wake(PET_HANDLER_CPU as u32);
        }
    }
}
