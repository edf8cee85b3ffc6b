//! The run summary: a stable, machine-readable record of one VM run
//! (`--summary-json`), and its short human form.
//!
//! Field names are part of the interface; later features add fields, never
//! rename them.

mod clockintr_dump;
mod collect;
mod vcpu_page;

use std::collections::BTreeMap;

use metronome_devices::LatencyHistogram;
use serde::Serialize;
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::{Ref, RefOr};
use utoipa::{PartialSchema, ToSchema};

use crate::vcpu::advance::{AdvanceStats, TimerAdvance, WakePath};

pub use clockintr_dump::clockintr_dump;
pub use collect::{clockintr_stats, collect, collect_from, workload_name, SummarySource};
pub use vcpu_page::{read_vcpu_page, vcpu_clocks, VcpuClock, VcpuPage};

/// Percentiles of a latency histogram, in ns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, ToSchema)]
pub struct Percentiles {
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Largest value.
    pub max: u64,
    /// Number of values.
    pub count: u64,
}

impl Percentiles {
    /// The p50, p99, max and count of `histogram`.
    pub fn of(histogram: &LatencyHistogram) -> Self {
        Self {
            p50: histogram.percentile(50.0),
            p99: histogram.percentile(99.0),
            max: histogram.max(),
            count: histogram.count(),
        }
    }
}

/// The timer device's view of one vCPU.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, ToSchema)]
pub struct TimerSummary {
    /// Rearm writes.
    pub rearms: u64,
    /// Trigger writes (rearm(0) included).
    pub triggers: u64,
    /// rearm(0) writes, treated as trigger.
    pub rearm_zero: u64,
    /// Cancel writes.
    pub cancels: u64,
    /// Timer interrupts injected.
    pub injections: u64,
    /// Expiries that found the timer vector still pending.
    pub coalesced: u64,
    /// Rearms beyond the device maximum, clamped.
    pub clamped: u64,
    /// Injections before the deadline: 0 unless the host clock went backwards
    /// (the VMM injects only after a poll saw the deadline pass).
    pub early_injections: u64,
    /// Guest accesses to the timer registers that were refused (bad offset or width).
    pub bad_accesses: u64,
    /// Resumes with re-initialisation (the `TIMER_RESUMES` register).
    pub resumes: u64,
    /// Deadline-to-injection lateness on the host.
    pub host_lateness_ns: Percentiles,
    /// Timer advance on this vCPU: what it learned and what it cost.
    pub advance: TimerAdvanceSummary,
}

/// Timer advance on one vCPU (`--no-timer-advance` turns it off): the host
/// timer is armed early by a learned wake latency (0 to 50 us), and the
/// vCPU thread waits for the deadline before it injects.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, ToSchema)]
pub struct TimerAdvanceSummary {
    /// Whether advance is on.
    pub enabled: bool,
    /// The advance learned for a running vCPU (woken out of `KVM_RUN` by a
    /// signal), ns; 0 when off.
    pub running_advance_ns: u64,
    /// The advance learned for a halted vCPU (woken from its timed wait), ns;
    /// 0 when off.
    pub halted_advance_ns: u64,
    /// What advance did: its wakes and waits.
    #[serde(flatten)]
    pub stats: AdvanceStats,
}

impl TimerAdvanceSummary {
    /// The summary of `advance`.
    pub fn of(advance: &TimerAdvance) -> Self {
        Self {
            enabled: advance.enabled(),
            running_advance_ns: advance.advance_ns(WakePath::Running),
            halted_advance_ns: advance.advance_ns(WakePath::Halted),
            stats: advance.stats(),
        }
    }
}

/// The stress generator's record for one vCPU.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, ToSchema)]
pub struct StressSummary {
    /// Stress interrupts raised.
    pub sent: u64,
    /// Rounds skipped because one was still pending.
    pub skipped: u64,
    /// Stress interrupts injected.
    pub injected: u64,
    /// Stress interrupts the guest's handler counted.
    pub guest_received: u64,
}

/// What the guest kernel counted on one vCPU (from its shared page).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, ToSchema)]
pub struct GuestVcpuSummary {
    /// Timer interrupts handled.
    pub timer_interrupts: u64,
    /// Scheduler ticks.
    pub ticks: u64,
    /// IPIs handled.
    pub ipis_received: u64,
    /// System calls.
    pub syscalls: u64,
    /// Ping-pong messages handled.
    pub pingpong: u64,
    /// The `TIMER_RESUMES` value the guest read in its last TimerResume handler.
    pub timer_resumes_seen: u64,
}

/// clockintr statistics (`struct clockintr_stat`), as the guest publishes them.
pub type ClockintrSummary = metronome_abi::ClockintrStat;

/// Statclock ticks by state (OpenBSD's cp_time; no nice or spin states).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, ToSchema)]
pub struct CpTime {
    /// User mode.
    pub user: u64,
    /// Kernel on behalf of a thread.
    pub system: u64,
    /// Interrupt context.
    pub interrupt: u64,
    /// Idle.
    pub idle: u64,
}

/// One guest thread's statclock accounting.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, ToSchema)]
pub struct ThreadSummary {
    /// Thread id.
    pub tid: u64,
    /// Name.
    pub name: String,
    /// Statclock ticks by state.
    pub user: u64,
    /// System ticks.
    pub system: u64,
    /// Interrupt ticks.
    pub interrupt: u64,
    /// estcpu after schedclock.
    pub estcpu: u64,
    /// Priority after schedclock.
    pub priority: u64,
    /// Context switches onto it.
    pub switches: u64,
}

/// Randomized statclock intervals drawn on one vCPU.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, ToSchema)]
pub struct IntervalSummary {
    /// Intervals drawn.
    pub count: u64,
    /// Sum, ns.
    pub sum_ns: u64,
    /// Smallest.
    pub min_ns: u64,
    /// Largest.
    pub max_ns: u64,
    /// The first ones, in order.
    pub first: Vec<u64>,
}

/// The clock configuration in force.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, ToSchema)]
pub struct ClockConfigSummary {
    /// hardclock frequency.
    pub hz: u32,
    /// statclock frequency.
    pub stathz: u32,
    /// profiling statclock frequency.
    pub profhz: u32,
    /// schedclock frequency.
    pub schedhz: i64,
    /// Randomized statclock.
    pub rndstat: bool,
    /// statclock generator seed.
    pub stat_seed: u64,
    /// hardclock period, ns.
    pub hardclock_period_ns: u64,
    /// Randomized statclock parameters at stathz: avg, min, mask.
    pub statclock_avg_ns: u32,
    /// min.
    pub statclock_min_ns: u32,
    /// mask.
    pub statclock_mask: u32,
}

/// One vCPU.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, ToSchema)]
pub struct VcpuSummary {
    /// vCPU id.
    pub id: u32,
    /// Distinct user threads that ran on this vCPU (guest-reported).
    pub user_threads_run: u64,
    /// Context switches (guest-reported).
    pub context_switches: u64,
    /// Interrupts the VMM injected.
    pub interrupts_injected: u64,
    /// IPIs the VMM injected into this vCPU.
    pub ipis_received: u64,
    /// HLT exits.
    pub halts: u64,
    /// Exits by reason.
    pub exits: BTreeMap<String, u64>,
    /// Kicks other threads sent to this vCPU.
    pub kicks: u64,
    /// Accesses to ports or MMIO addresses with no device.
    pub bus_misses: u64,
    /// The timer device.
    pub timer: TimerSummary,
    /// The kick stress test (zero unless enabled).
    pub stress: StressSummary,
    /// The guest's own counters.
    pub guest: GuestVcpuSummary,
    /// hardclock() calls.
    pub hardclock: u64,
    /// statclock() calls.
    pub statclock: u64,
    /// schedclock() calls by the schedclock event.
    pub schedclock: u64,
    /// profclock() calls.
    pub profclock: u64,
    /// clockintr statistics.
    pub clockintr: ClockintrSummary,
    /// Guest-measured lateness: the timer interrupt's entry (the entry stub's
    /// clock read) minus the deadline the guest programmed.
    pub guest_lateness_ns: Percentiles,
    /// Statclock ticks by state.
    pub cp_time: CpTime,
    /// The threads of this vCPU with their statclock ticks by state.
    pub threads: Vec<ThreadSummary>,
    /// Randomized statclock intervals.
    pub statclock_intervals: IntervalSummary,
    /// Most hardclock() calls in one dispatch.
    pub max_hardclock_batch: u64,
    /// hardclock() calls of the first dispatch after the last clockintr_cpu_init.
    pub resume_first_batch: u64,
    /// hardclock() calls of the first dispatch after boot.
    pub first_dispatch_hardclocks: u64,
    /// clockintr_cpu_init calls.
    pub cpu_inits: u64,
    /// Pending hardclock expiration modulo the period (the stagger), ns.
    pub hardclock_phase_ns: u64,
    /// Uptime at the end of the last dispatch.
    pub last_dispatch_ns: u64,
    /// Uptime at the start of the last dispatch (it ran every event due then).
    pub last_dispatch_start_ns: u64,
    /// Uptime at the last clockintr_cpu_init.
    pub last_cpu_init_ns: u64,
}

/// The whole run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, ToSchema)]
pub struct Summary {
    /// How the run ended: `guest_exit`, `fault`, `panic`, `triple_fault`,
    /// `emulation`, `timeout`, `signal` or `host_error`.
    pub outcome: String,
    /// The human-readable reason.
    pub message: String,
    /// The guest's exit status, when it exited by itself.
    pub guest_exit_code: Option<u32>,
    /// Device clock (guest uptime) when the VM stopped.
    pub guest_uptime_ns: u64,
    /// Host wall time from process start to the end of the run.
    pub host_wall_ns: u64,
    /// Host wall time from process start to the guest's exit request.
    pub host_wall_to_exit_ns: u64,
    /// Number of vCPUs.
    pub vcpu_count: u32,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// The workload name.
    pub workload: String,
    /// Values the guest reported (`report` system call), by key.
    pub reports: BTreeMap<String, u64>,
    /// Per vCPU.
    pub vcpus: Vec<VcpuSummary>,
    /// The process exit code the VMM uses for this outcome.
    pub exit_code: i32,
    /// The clock configuration in force.
    pub config: ClockConfigSummary,
    /// clockintr statistics summed over vCPUs (kern.clockintr.stats; spurious included, AMB-5).
    pub clockintr_total: ClockintrSummary,
    /// Host-side sampling, when configured.
    pub sampling: Option<SamplingSummary>,
    /// Guest misbehaviour that was contained and counted.
    pub guest_errors: GuestErrors,
    /// Problems that did not end the run (a profile that could not be written, say).
    pub errors: Vec<String>,
}

/// Guest misbehaviour the VMM contained and counted, by kind, all vCPUs
/// together (per-vCPU counts are in `vcpus[]`: `bus_misses` and
/// `timer.bad_accesses`, `rearm_zero`, `clamped`). What counts as
/// misbehaviour per device is in [`crate::devices`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, ToSchema)]
pub struct GuestErrors {
    /// Every count below, summed.
    pub total: u64,
    /// Interrupt-controller accesses refused (bad offset or width, an IPI
    /// with reserved bits set or a vector below 32).
    pub vic_bad_accesses: u64,
    /// Well-formed IPIs to a vCPU that does not exist.
    pub ipis_to_absent_vcpus: u64,
    /// EOIs with nothing in service.
    pub spurious_eois: u64,
    /// Timer accesses refused (bad offset or width, a read of a write-only
    /// or a write of a read-only register).
    pub timer_bad_accesses: u64,
    /// Timer rearms of 0 ns, taken as a trigger (VT-6).
    pub timer_rearms_zero: u64,
    /// Timer rearms above 2^32 - 1 ns, clamped to it (VT-4).
    pub timer_rearms_clamped: u64,
    /// Control-page writes refused (bad offset or width, a PET request
    /// without sampling).
    pub control_bad_writes: u64,
    /// Lightweight PET self-sample requests refused: a value that is not the
    /// vCPU's current thread, or a second request before the first was served.
    pub pet_bad_requests: u64,
    /// COM1 writes refused: to the read-only LSR or MSR, or wider than a
    /// byte to a register other than THR.
    pub uart_bad_accesses: u64,
    /// Debug-exit writes refused: to ports 0xf5-0xf7, or of 1 or 2 bytes.
    pub debug_exit_bad_accesses: u64,
    /// MMIO accesses that hit no device.
    pub unmapped_mmio: u64,
    /// Port accesses that hit no device.
    pub unmapped_pio: u64,
    /// Stack walks (on-CPU samples and PET's thread samples) that ended on
    /// a bad frame pointer: unmapped, outside RAM, non-canonical,
    /// misaligned or not moving up the stack.
    pub walk_errors: u64,
    /// Thread-table entries PET found corrupt and left out of its passes: a
    /// thread id that is not the slot's, a vCPU that does not exist, an
    /// unknown state or a stack that ends below its start.
    pub corrupt_thread_entries: u64,
}

impl GuestErrors {
    /// Every count but `total`, summed (saturating: guest-driven counts).
    pub fn sum(&self) -> u64 {
        [
            self.vic_bad_accesses,
            self.ipis_to_absent_vcpus,
            self.spurious_eois,
            self.timer_bad_accesses,
            self.timer_rearms_zero,
            self.timer_rearms_clamped,
            self.control_bad_writes,
            self.pet_bad_requests,
            self.uart_bad_accesses,
            self.debug_exit_bad_accesses,
            self.unmapped_mmio,
            self.unmapped_pio,
            self.walk_errors,
            self.corrupt_thread_entries,
        ]
        .into_iter()
        .fold(0, u64::saturating_add)
    }
}

/// Host-side sampling of one vCPU.
#[derive(Clone, Debug, Default, PartialEq, Serialize, ToSchema)]
pub struct VcpuSamplingSummary {
    /// vCPU id.
    pub id: u32,
    /// Timer fires this vCPU answered: one per kptimer per expiry that
    /// found it due (the same unit as the run's `timer_fires`, which counts
    /// each fire once).
    pub timer_fires: u64,
    /// Fires it led (`PERF_TM_FIRE`).
    pub leader_fires: u64,
    /// Samples taken.
    pub samples: u64,
    /// Samples not in the profile: their stack was new when the vCPU's
    /// stack table had spent its memory budget and its folded entries.
    pub dropped: u64,
    /// Samples counted in their thread under `[stack table full]`, not
    /// their own stack: it was new when the vCPU's stack table had spent its
    /// memory budget.
    pub folded: u64,
    /// Stack walks that ended on a bad pointer.
    pub walk_errors: u64,
    /// Expiries that found sampling off (a stop racing them).
    pub not_running: u64,
    /// Expirations of the periodic sampling timer that came while its
    /// previous signal was still pending (the host timer's overrun count:
    /// the vCPU fell behind the period; kperf dead-reckons past them).
    pub timer_overruns: u64,
    /// `timer_settime` calls on the sampling timer: with one on-CPU timer it
    /// is periodic and re-armed only when its deadline leaves the grid
    /// (start, stop, halt and wake), not per sample.
    pub timer_rearms: u64,
    /// Samples per second of guest uptime.
    pub achieved_hz: f64,
    /// With a trace: events (dispatches, switches) drained from this vCPU's
    /// guest event ring.
    pub trace_guest_events: u64,
    /// With a trace: events this vCPU's guest dropped on a full ring (plus
    /// any the VMM had to skip).
    pub trace_ring_dropped: u64,
}

/// Host-side sampling.
#[derive(Clone, Debug, Default, PartialEq, Serialize, ToSchema)]
pub struct SamplingSummary {
    /// The period in force of the on-CPU timer with the shortest period, ns
    /// (after the kptimer minimum; the pprof profile's period); 0 without an
    /// on-CPU timer. Every timer's is in `config.timers`.
    pub period_ns: u64,
    /// Sampler bits of that timer's action.
    pub samplers: u32,
    /// The configuration in force, read back from the engine.
    pub config: EffectiveSamplingConfig,
    /// Samples, all vCPUs.
    pub samples: u64,
    /// Timer fires, each counted once (the `PERF_TM_FIRE` events its leader
    /// recorded).
    pub timer_fires: u64,
    /// Samples not kept, all vCPUs.
    pub dropped: u64,
    /// Samples folded into `[stack table full]`, all vCPUs.
    pub folded: u64,
    /// Walk errors, all vCPUs.
    pub walk_errors: u64,
    /// Host cost per sample: deadline noticed to sample kept.
    pub cost_per_sample_ns: Percentiles,
    /// Per vCPU.
    pub vcpus: Vec<VcpuSamplingSummary>,
    /// Files written.
    pub files: Vec<String>,
    /// Trace records not kept.
    pub trace_dropped: u64,
    /// Guest event-ring events that never reached the trace, all vCPUs
    /// (`vcpus[].trace_ring_dropped`).
    pub trace_ring_dropped: u64,
    /// Traditional PET passes over every guest thread (PET-T-3).
    pub pet_passes: u64,
    /// Traditional PET fires (PET-C-1: never counts lightweight PET or
    /// on-CPU timers, never reset).
    pub pet_broadcasts: u64,
    /// Thread samples taken by PET passes.
    pub threads_sampled: u64,
    /// How long a PET pass took (the `d` of PET-R-1), ns.
    pub pet_sample_ns: Percentiles,
    /// PET broadcast requests a vCPU had not served when the next PET fire
    /// asked it again (not waited for, PET-H-2; the later one replaced it).
    pub pet_remote_missed: u64,
    /// Lightweight PET self-samples: threads switched on with a stale
    /// generation that sampled themselves (PET-L-2; in `pet.*`).
    pub lightweight_self_samples: u64,
    /// Well-formed self-sample requests that took no sample: sampling was
    /// stopping, or a timer sample had stamped the thread meanwhile.
    pub lightweight_refused: u64,
    /// Instruction-pointer histogram of the samples taken at CPL3, by function
    /// (ELF symbol of the sampled RIP), largest first: comparable with
    /// `perf kvm --guest`, which sees guest user mode only on kvm_pvm.
    pub user_functions: Vec<FunctionShare>,
    /// Samples kept that hold each sampler's data, by sampler name (call
    /// stacks: with at least one frame), on-CPU and PET samples alike.
    pub samplers_captured: BTreeMap<String, u64>,
    /// `sys_mem`: the VMM's resident memory over the samples, bytes.
    pub sys_mem_vmm_resident_bytes: Option<MemoryFigures>,
    /// `meminfo`: guest memory in use over the samples, bytes.
    pub meminfo_guest_in_use_bytes: Option<MemoryFigures>,
    /// The no-exit tier's figures, when a no-exit or hybrid timer sampled
    /// (its samples are in the profile with the kick tier's, and not in
    /// `samples`, which counts kicks).
    pub no_exit: Option<crate::sampling::no_exit::NoExitSummary>,
}

/// A memory figure over a run's samples: the last (latest sample), the
/// smallest and the largest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, ToSchema)]
pub struct MemoryFigures {
    /// The latest sample's.
    pub last: u64,
    /// The smallest.
    pub min: u64,
    /// The largest.
    pub max: u64,
}

impl MemoryFigures {
    /// Adds a value, later than every value added before.
    pub fn add(figures: &mut Option<Self>, value: u64) {
        let f = figures.get_or_insert(Self {
            last: value,
            min: value,
            max: value,
        });
        f.last = value;
        f.min = f.min.min(value);
        f.max = f.max.max(value);
    }
}

/// The sampling configuration in force: the kperf configuration as the
/// engine holds it, in the `--kperf` schema (periods after the minimum,
/// KT-MIN-1; every action and timer up to the counts), the engine's limits
/// and the trace level.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct EffectiveSamplingConfig {
    /// `action_count`, `timer_count`, `actions`, `timers`, `pet`, `background`.
    #[serde(flatten)]
    pub kperf: crate::config::KperfConfig,
    /// The engine's minimum periods (KT-MIN-2).
    pub limits: KperfLimits,
    /// The trace's debug level: 0 data, 1 info, 2 verbose (TR-E-3).
    pub trace_level: u32,
}

/// The OpenAPI schema: [`crate::config::KperfConfig`]'s properties (it
/// refuses unknown fields as a request, so an `allOf` of it with more
/// properties would accept no object) plus `limits` and `trace_level`.
impl utoipa::PartialSchema for EffectiveSamplingConfig {
    fn schema() -> RefOr<Schema> {
        let RefOr::T(Schema::Object(mut object)) = crate::config::KperfConfig::schema() else {
            unreachable!("KperfConfig derives an object schema")
        };
        object.additional_properties = None;
        object.description = Some(
            "The sampling configuration in force: the kperf configuration as the engine holds \
             it (the `--kperf` schema), the engine's minimum periods and the trace level"
                .into(),
        );
        object.properties.insert(
            "limits".into(),
            Ref::from_schema_name(KperfLimits::name()).into(),
        );
        object.properties.insert(
            "trace_level".into(),
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .minimum(Some(0))
                .description(Some(
                    "The trace's debug level: 0 data, 1 info, 2 verbose (TR-E-3)",
                ))
                .into(),
        );
        object
            .required
            .extend(["limits".into(), "trace_level".into()]);
        Schema::Object(object).into()
    }
}

impl ToSchema for EffectiveSamplingConfig {
    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        <crate::config::KperfConfig as ToSchema>::schemas(schemas);
        schemas.push((KperfLimits::name().into(), KperfLimits::schema()));
    }
}

/// The engine's minimum periods in ns (KT-MIN-2, `kperf.limits.*`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, ToSchema)]
pub struct KperfLimits {
    /// On-CPU timers, foreground.
    pub timer_min_period_ns: u64,
    /// On-CPU timers, background.
    pub timer_min_bg_period_ns: u64,
    /// The PET timer, foreground.
    pub timer_min_pet_period_ns: u64,
    /// The PET timer, background.
    pub timer_min_bg_pet_period_ns: u64,
}

impl From<kperf::Limits> for KperfLimits {
    fn from(limits: kperf::Limits) -> Self {
        Self {
            timer_min_period_ns: limits.timer_min_period_ns,
            timer_min_bg_period_ns: limits.timer_min_bg_period_ns,
            timer_min_pet_period_ns: limits.timer_min_pet_period_ns,
            timer_min_bg_pet_period_ns: limits.timer_min_bg_pet_period_ns,
        }
    }
}

/// One function's share of the sampled instruction pointers.
#[derive(Clone, Debug, Default, PartialEq, Serialize, ToSchema)]
pub struct FunctionShare {
    /// Demangled function name (or the address).
    pub function: String,
    /// Samples whose RIP was in it.
    pub samples: u64,
    /// Percent of the samples counted.
    pub percent: f64,
}

impl Summary {
    /// A few lines for people.
    pub fn human(&self) -> String {
        let mut out = format!(
            "metronome: {} after {:.3} s guest uptime ({:.3} s wall), {} vCPU(s)\n",
            self.message,
            self.guest_uptime_ns as f64 / 1e9,
            self.host_wall_ns as f64 / 1e9,
            self.vcpu_count
        );
        for v in &self.vcpus {
            out.push_str(&format!(
                "  vCPU {}: {} threads, {} context switches, {} interrupts ({} timer, {} IPI), \
                 {} halts, timer lateness p50 {} us p99 {} us\n",
                v.id,
                v.user_threads_run,
                v.context_switches,
                v.interrupts_injected,
                v.timer.injections,
                v.ipis_received,
                v.halts,
                v.timer.host_lateness_ns.p50 / 1000,
                v.timer.host_lateness_ns.p99 / 1000,
            ));
            let a = &v.timer.advance;
            if a.enabled {
                out.push_str(&format!(
                    "    timer advance {} us running, {} us halted; waited {:.3} ms \
                     of guest time ({} waits), {:.3} ms halted\n",
                    a.running_advance_ns / 1000,
                    a.halted_advance_ns / 1000,
                    a.stats.running_wait_ns as f64 / 1e6,
                    a.stats.running_waits,
                    a.stats.halted_wait_ns as f64 / 1e6,
                ));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_guest_errors_total_sums_every_kind_and_saturates() {
        let errors = GuestErrors {
            vic_bad_accesses: 1,
            ipis_to_absent_vcpus: 2,
            spurious_eois: 4,
            timer_bad_accesses: 8,
            timer_rearms_zero: 16,
            timer_rearms_clamped: 32,
            control_bad_writes: 64,
            pet_bad_requests: 128,
            uart_bad_accesses: 256,
            debug_exit_bad_accesses: 512,
            unmapped_mmio: 1024,
            unmapped_pio: 2048,
            walk_errors: 4096,
            corrupt_thread_entries: 8192,
            total: 99,
        };
        assert_eq!(errors.sum(), 16383, "each kind once, total left out");
        let huge = GuestErrors {
            walk_errors: u64::MAX,
            ..errors
        };
        assert_eq!(huge.sum(), u64::MAX);
    }
}
