//! Host-side sampling: XNU's kptimer on the host, with kicks that sample.
//!
//! The engine ([`metronome_devices::kptimer::Kperf`]) lives behind one mutex
//! (it subsumes XNU's per-timer locks, see its docs). Each vCPU has one kperf
//! host deadline, kept in [`SamplingShared::deadlines`] and programmed by the
//! vCPU thread into a POSIX timer that signals the thread itself; when it
//! expires the vCPU leaves `KVM_RUN` and, with the guest stopped, runs the
//! expiry on its own thread: leader election under the lock (the leader
//! records `PERF_TM_FIRE` there), then its own sample from sync regs and guest
//! memory (`PERF_TM_HNDLR` around it). No other thread touches a running vCPU.
//!
//! Halted vCPUs are idle for kperf (KT-I-1): their deadline is cancelled while
//! they are parked and re-derived by dead reckoning when they wake.
//!
//! Stop is synchronous (AMB-17): [`SamplingShared::begin_stop`] turns the engine off,
//! and [`SamplingShared::wait_for_acks`] waits until every vCPU thread has passed its loop top once more, so no
//! sample is taken after it returns.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use metronome_devices::kptimer::{self, Kperf, KperfError};

use crate::sampler::RawSample;

/// "No deadline".
pub const NO_DEADLINE: u64 = u64::MAX;
/// Trace records kept at most; later ones are counted as dropped.
const TRACE_LIMIT: usize = 4_000_000;
/// How long a synchronous stop waits for one vCPU before kicking it again.
const ACK_RETRY: Duration = Duration::from_millis(10);

/// One kdebug-style trace record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceRecord {
    /// Device time, ns.
    pub time_ns: u64,
    /// Event id (`kptimer::trace`).
    pub id: u32,
    /// The vCPU that recorded it.
    pub vcpu: u32,
    /// The guest thread current on that vCPU (0 = idle or unknown).
    pub tid: u64,
    /// Arguments.
    pub args: [u64; 4],
    /// For `PERF_TM_FIRE`: the deadline that fired (so readers can take the
    /// host's delivery latency out of the spacing); 0 otherwise.
    pub deadline_ns: u64,
}

/// What the sampling configuration asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SamplingConfig {
    /// Timer period in ns (raised to the kptimer minimum silently, KT-MIN-1).
    pub period_ns: u64,
    /// Sampler bits of the timer's action (`kptimer::sampler`).
    pub samplers: u32,
    /// Where to write profile.folded, profile.svg and profile.pb.gz.
    pub profile_dir: Option<std::path::PathBuf>,
    /// Where to write the trace as JSON lines.
    pub trace_file: Option<std::path::PathBuf>,
    /// Sample only this guest thread id (kperf's pid filter; -1 = all).
    pub filter_tid: i32,
}

/// Parses a sampler list: names (`th_info,ustack,kstack`, case-insensitive) or
/// one number (`0xc`). Errors name the bad entry and the allowed names.
pub fn parse_samplers(list: &str) -> Result<u32, String> {
    const NAMES: [(&str, u32); 14] = [
        ("th_info", kptimer::sampler::TH_INFO),
        ("th_snapshot", kptimer::sampler::TH_SNAPSHOT),
        ("kstack", kptimer::sampler::KSTACK),
        ("ustack", kptimer::sampler::USTACK),
        ("pmc_thread", kptimer::sampler::PMC_THREAD),
        ("pmc_cpu", kptimer::sampler::PMC_CPU),
        ("pmc_config", kptimer::sampler::PMC_CONFIG),
        ("meminfo", kptimer::sampler::MEMINFO),
        ("th_scheduling", kptimer::sampler::TH_SCHEDULING),
        ("th_dispatch", kptimer::sampler::TH_DISPATCH),
        ("tk_snapshot", kptimer::sampler::TK_SNAPSHOT),
        ("sys_mem", kptimer::sampler::SYS_MEM),
        ("th_inscyc", kptimer::sampler::TH_INSCYC),
        ("tk_info", kptimer::sampler::TK_INFO),
    ];
    let list = list.trim();
    let number = list
        .strip_prefix("0x")
        .map(|hex| u32::from_str_radix(hex, 16))
        .or_else(|| {
            list.chars()
                .all(|c| c.is_ascii_digit())
                .then(|| list.parse())
        });
    let bits = match number {
        Some(Ok(bits)) => bits,
        Some(Err(_)) => return Err(format!("'{list}' is not a sampler number")),
        None => {
            let mut bits = 0;
            for name in list.split(',').map(str::trim) {
                let Some((_, bit)) = NAMES.iter().find(|(n, _)| n.eq_ignore_ascii_case(name))
                else {
                    let allowed: Vec<&str> = NAMES.iter().map(|(n, _)| *n).collect();
                    return Err(format!(
                        "unknown sampler '{name}': allowed are {}",
                        allowed.join(", ")
                    ));
                };
                bits |= bit;
            }
            bits
        }
    };
    let all = NAMES.iter().fold(0, |acc, (_, b)| acc | b);
    if bits == 0 || bits & !all != 0 {
        return Err(format!(
            "sampler bits {bits:#x} are not a non-empty subset of {all:#x}"
        ));
    }
    Ok(bits)
}

/// Per-vCPU sampling counters (owned by the vCPU thread, read at the end).
#[derive(Clone, Debug, Default)]
pub struct VcpuSampling {
    /// Expiries of this vCPU's kperf deadline that fired at least one timer.
    pub timer_fires: u64,
    /// Of those, the fires this vCPU led (`PERF_TM_FIRE`).
    pub leader_fires: u64,
    /// Samples taken.
    pub samples: u64,
    /// Samples not kept (buffer full).
    pub dropped: u64,
    /// Stack walks that ended on a bad pointer.
    pub walk_errors: u64,
    /// Expiries while sampling was off (a race with stop; nothing sampled).
    pub not_running: u64,
    /// Host cost of each sample: from noticing the deadline to the sample kept, ns.
    pub cost: metronome_devices::LatencyHistogram,
    /// The samples.
    pub raw: Vec<RawSample>,
}

/// Samples kept per vCPU at most.
pub const SAMPLE_LIMIT: usize = 2_000_000;

/// Sampling state shared by the vCPU threads and the controller.
#[derive(Debug)]
pub struct SamplingShared {
    /// The engine.
    pub kperf: Mutex<Kperf>,
    /// Per vCPU: the kperf host deadline in device time ([`NO_DEADLINE`] = none).
    pub deadlines: Vec<AtomicU64>,
    /// Bumped by every stop; each vCPU acknowledges it at its loop top.
    epoch: AtomicU64,
    acked: Vec<AtomicU64>,
    ack_lock: Mutex<()>,
    ack_cv: Condvar,
    /// The trace.
    trace: Mutex<Vec<TraceRecord>>,
    /// Trace records not kept.
    pub trace_dropped: AtomicU64,
    /// Samples taken, all vCPUs (for observers while the VM runs).
    pub samples_taken: AtomicU64,
    /// The configuration.
    pub config: SamplingConfig,
}

impl SamplingShared {
    /// Configures one action and one timer from `config` (not yet sampling).
    pub fn new(config: SamplingConfig, vcpus: u32) -> Result<Self, KperfError> {
        let mut kperf = Kperf::new();
        kperf.set_action_count(1)?;
        kperf.set_action_samplers(1, config.samplers)?;
        kperf.set_timer_count(1)?;
        kperf.set_timer_period(0, config.period_ns)?;
        kperf.set_timer_action(0, 1)?;
        kperf.set_action_filter(1, config.filter_tid)?;
        let n = vcpus as usize;
        Ok(Self {
            kperf: Mutex::new(kperf),
            deadlines: (0..n).map(|_| AtomicU64::new(NO_DEADLINE)).collect(),
            epoch: AtomicU64::new(0),
            acked: (0..n).map(|_| AtomicU64::new(0)).collect(),
            ack_lock: Mutex::new(()),
            ack_cv: Condvar::new(),
            trace: Mutex::new(Vec::new()),
            trace_dropped: AtomicU64::new(0),
            samples_taken: AtomicU64::new(0),
            config,
        })
    }

    /// Locks the engine (a poisoned lock is taken over: the engine's state is
    /// plain data, valid between calls).
    pub fn engine(&self) -> MutexGuard<'_, Kperf> {
        self.kperf.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends a trace record.
    pub fn record(&self, record: TraceRecord) {
        if self.config.trace_file.is_none() {
            return;
        }
        let mut trace = self.trace.lock().unwrap_or_else(|p| p.into_inner());
        if trace.len() < TRACE_LIMIT {
            trace.push(record);
        } else {
            self.trace_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Takes the trace.
    pub fn take_trace(&self) -> Vec<TraceRecord> {
        std::mem::take(&mut *self.trace.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Turns sampling on at device time `now`; returns the per-vCPU deadlines
    /// to program (the caller kicks every vCPU so it notices).
    pub fn start(&self, now: u64) -> Result<(), KperfError> {
        let mut engine = self.engine();
        let programs = engine.set_sampling(true, now, self.deadlines.len())?;
        for (slot, deadline) in self.deadlines.iter().zip(programs) {
            slot.store(deadline.unwrap_or(NO_DEADLINE), Ordering::Release);
        }
        Ok(())
    }

    /// Turns sampling off and cancels every deadline; returns the epoch every
    /// vCPU must acknowledge before the stop is complete.
    pub fn begin_stop(&self, now: u64) -> Result<u64, KperfError> {
        let mut engine = self.engine();
        engine.set_sampling(false, now, self.deadlines.len())?;
        for slot in &self.deadlines {
            slot.store(NO_DEADLINE, Ordering::Release);
        }
        Ok(self.epoch.fetch_add(1, Ordering::AcqRel) + 1)
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

    /// Waits until every vCPU acknowledged `epoch`; `kick(id)` is called on
    /// those that have not, every 10 ms; `gone()` ends the wait (the VM stopped).
    pub fn wait_for_acks(&self, epoch: u64, kick: impl Fn(u32), gone: impl Fn() -> bool) {
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

    #[test]
    fn test_sampler_lists_parse_and_bad_ones_are_named() {
        assert_eq!(parse_samplers("th_info,ustack,kstack"), Ok(0b1101));
        assert_eq!(parse_samplers("SYS_MEM"), Ok(1 << 11));
        assert_eq!(parse_samplers("0xc"), Ok(0xc));
        assert_eq!(parse_samplers("12"), Ok(12));
        let err = parse_samplers("ustack,bogus").unwrap_err();
        assert!(
            err.contains("unknown sampler 'bogus'") && err.contains("th_info"),
            "{err}"
        );
        assert!(parse_samplers("0").is_err());
        assert!(parse_samplers("0x100000").is_err());
        assert!(parse_samplers("0xzz").is_err());
    }

    #[test]
    fn test_stop_waits_for_every_vcpu() {
        let config = SamplingConfig {
            period_ns: 1_000_000,
            samplers: 1,
            profile_dir: None,
            trace_file: None,
            filter_tid: -1,
        };
        let shared = std::sync::Arc::new(SamplingShared::new(config, 2).unwrap());
        shared.start(0).unwrap();
        assert!(shared
            .deadlines
            .iter()
            .all(|d| d.load(Ordering::Relaxed) == 1_000_000));
        let epoch = shared.begin_stop(10).unwrap();
        assert!(shared
            .deadlines
            .iter()
            .all(|d| d.load(Ordering::Relaxed) == NO_DEADLINE));
        let kicked = std::sync::Arc::new(AtomicU64::new(0));
        let (s2, k2) = (shared.clone(), kicked.clone());
        // The "vCPUs" acknowledge only when kicked.
        shared.wait_for_acks(
            epoch,
            move |id| {
                k2.fetch_add(1, Ordering::Relaxed);
                s2.acknowledge(id);
            },
            || false,
        );
        assert!(kicked.load(Ordering::Relaxed) >= 2);
    }
}
