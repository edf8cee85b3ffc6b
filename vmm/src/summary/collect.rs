//! Turning a finished VM into its [`Summary`]: the VMM's own counters, the
//! device models' counters, and what the guest kernel published in its shared
//! pages (read consistently, TR-C-2).

use std::sync::atomic::Ordering;
use std::time::Duration;

use metronome_abi::{hist, layout, GuestReport, ThreadInfo, VcpuShared, Workload};
use vm_memory::{Address, GuestAddress};

use super::vcpu_page::read_vcpu_page;
use super::{
    ClockConfigSummary, ClockintrSummary, CpTime, GuestErrors, GuestVcpuSummary, IntervalSummary,
    Percentiles, StressSummary, Summary, ThreadSummary, TimerAdvanceSummary, TimerSummary,
    VcpuSummary,
};
use crate::config::VmConfig;
use crate::devices::DeviceErrors;
use crate::guestmem::read_plain;
use crate::sampling::samplers::entry_is_sane;
use crate::vcpu::VcpuRunStats;
use crate::vm::{Vm, VmExit, VmShared};

/// Every vCPU's clockintr statistics, each read consistently, and their
/// field-wise sum (kern.clockintr.stats, TR-C-2; spurious included, AMB-5).
pub fn clockintr_stats(shared: &VmShared) -> (Vec<ClockintrSummary>, ClockintrSummary) {
    let records: Vec<ClockintrSummary> = (0..shared.vcpus.len() as u32)
        .map(|id| {
            read_vcpu_page(&shared.mem, id)
                .map(|read| read.page.clockintr)
                .unwrap_or_default()
        })
        .collect();
    let mut total = ClockintrSummary::default();
    for record in &records {
        total.add(record);
    }
    (records, total)
}

/// What a summary is read from: the VM's configuration, its shared state
/// and its devices' counters; a [`Vm`]'s, or a running VM's through its
/// [`crate::VmController`].
#[derive(Clone, Copy, Debug)]
pub struct SummarySource<'a> {
    /// The configuration the VM was built with.
    pub config: &'a VmConfig,
    /// The state every thread of the VM shares.
    pub shared: &'a VmShared,
    /// The devices' refused accesses.
    pub device_errors: &'a DeviceErrors,
}

impl<'a> SummarySource<'a> {
    /// `vm`'s.
    pub fn of(vm: &'a Vm) -> Self {
        Self {
            config: &vm.config,
            shared: &vm.shared,
            device_errors: &vm.devices.errors,
        }
    }
}

/// Builds the summary of `vm` once its vCPU threads returned `stats`.
pub fn collect(vm: &Vm, stats: &[VcpuRunStats], wall: Duration, exit_wall: Duration) -> Summary {
    collect_from(SummarySource::of(vm), stats, wall, exit_wall)
}

/// Builds the summary from `source` and the vCPU threads' counters `stats`
/// (returned when they finished, or as last published while they run).
pub fn collect_from(
    source: SummarySource<'_>,
    stats: &[VcpuRunStats],
    wall: Duration,
    exit_wall: Duration,
) -> Summary {
    let vm = source;
    let shared = vm.shared;
    let reason = shared
        .exit_reason()
        .unwrap_or(VmExit::Host("no exit reason".into()));
    let (outcome, exit_code) = reason.outcome();
    let threads: Vec<ThreadInfo> = (0..metronome_abi::MAX_THREADS)
        .filter_map(|i| {
            let offset = (i * std::mem::size_of::<ThreadInfo>()) as u64;
            read_plain(
                &shared.mem,
                GuestAddress(layout::THREAD_TABLE).unchecked_add(offset),
            )
        })
        .collect();
    let period = hardclock_period_ns(&vm.config.clock);
    let mut errors = Vec::new();
    let vcpus: Vec<VcpuSummary> = (0..vm.config.vcpus)
        .map(|id| {
            let run = stats
                .iter()
                .find(|s| s.id == id)
                .cloned()
                .unwrap_or_default();
            let read = read_vcpu_page(&shared.mem, id);
            if read.is_some_and(|r| !r.consistent) {
                errors.push(format!(
                    "vCPU {id}: its clockintr statistics were read while the guest was \
                     writing them (the vCPU was stopped inside a dispatch)"
                ));
            }
            let guest = read.map(|r| r.page).unwrap_or_default();
            vcpu_summary(shared, id, &guest, &run, &threads, period)
        })
        .collect();
    let mut clockintr_total = ClockintrSummary::default();
    for v in &vcpus {
        clockintr_total.add(&v.clockintr);
    }
    Summary {
        outcome: outcome.to_string(),
        message: exit_message(&reason, stats),
        guest_exit_code: match reason {
            VmExit::Guest { code } => Some(code),
            _ => None,
        },
        guest_uptime_ns: shared.now(),
        host_wall_ns: wall.as_nanos() as u64,
        host_wall_to_exit_ns: exit_wall.as_nanos() as u64,
        vcpu_count: vm.config.vcpus,
        mem_mib: vm.config.mem_mib,
        workload: workload_name(vm.config.workload).to_string(),
        reports: guest_reports(shared),
        vcpus,
        exit_code,
        config: clock_config(vm.config),
        clockintr_total,
        sampling: None,
        guest_errors: guest_errors(vm, stats),
        errors,
    }
}

fn hardclock_period_ns(clock: &clockintr::Config) -> u64 {
    1_000_000_000 / u64::from(clock.hz.max(1))
}

/// The exit reason; after a timeout, where every vCPU was.
fn exit_message(reason: &VmExit, stats: &[VcpuRunStats]) -> String {
    let mut message = reason.to_string();
    if matches!(reason, VmExit::Timeout { .. }) {
        for s in stats {
            let interrupts = if s.last_rflags & 0x200 != 0 {
                "on"
            } else {
                "off"
            };
            message.push_str(&format!(
                "; vCPU {} was at RIP {:#x} (CPL{}, interrupts {interrupts})",
                s.id,
                s.last_rip,
                s.last_cs & 3,
            ));
        }
    }
    message
}

/// The values the guest reported with its `report` system call.
fn guest_reports(shared: &VmShared) -> std::collections::BTreeMap<String, u64> {
    let report: GuestReport =
        read_plain(&shared.mem, GuestAddress(layout::GUEST_REPORT)).unwrap_or_default();
    report.reports[..(report.report_count as usize).min(report.reports.len())]
        .iter()
        .map(|[k, v]| (report_key_name(*k), *v))
        .collect()
}

/// One vCPU: the VMM's counters, its devices' and its guest page's.
fn vcpu_summary(
    shared: &VmShared,
    id: u32,
    guest: &VcpuShared,
    run: &VcpuRunStats,
    threads: &[ThreadInfo],
    period: u64,
) -> VcpuSummary {
    let slot = &shared.vcpus[id as usize];
    let irq = slot.lock();
    let t = irq.timer.counters();
    VcpuSummary {
        id,
        user_threads_run: guest.user_threads_run,
        context_switches: guest.context_switches,
        interrupts_injected: irq.injected.total(),
        ipis_received: irq.injected.ipi,
        halts: run.halts,
        exits: run.exits.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        kicks: slot.kicks_sent.load(Ordering::Relaxed),
        bus_misses: run.bus_misses,
        timer: TimerSummary {
            rearms: t.rearms,
            triggers: t.triggers,
            rearm_zero: t.rearm_zero,
            cancels: t.cancels,
            injections: t.injections,
            coalesced: t.coalesced,
            clamped: t.clamped,
            early_injections: t.early_injections,
            bad_accesses: t.bad_accesses,
            resumes: t.resumes,
            host_lateness_ns: Percentiles::of(irq.timer.lateness()),
            advance: TimerAdvanceSummary::of(&irq.advance),
        },
        stress: StressSummary {
            sent: irq.stress.sent,
            skipped: irq.stress.skipped,
            injected: irq.injected.stress,
            guest_received: guest.stress_received,
        },
        guest: GuestVcpuSummary {
            timer_interrupts: guest.timer_interrupts,
            ticks: guest.ticks,
            ipis_received: guest.ipis_received,
            syscalls: guest.syscalls,
            pingpong: guest.pingpong,
            timer_resumes_seen: guest.timer_resumes_seen,
        },
        hardclock: guest.hardclock,
        statclock: guest.statclock,
        schedclock: guest.schedclock,
        profclock: guest.profclock,
        clockintr: guest.clockintr,
        guest_lateness_ns: Percentiles {
            p50: hist::percentile(&guest.lateness_hist, guest.lateness_max, 50),
            p99: hist::percentile(&guest.lateness_hist, guest.lateness_max, 99),
            max: guest.lateness_max,
            count: guest
                .lateness_hist
                .0
                .iter()
                .fold(0u64, |a, &n| a.saturating_add(n)),
        },
        cp_time: CpTime {
            user: guest.cp_time[0],
            system: guest.cp_time[1],
            interrupt: guest.cp_time[2],
            idle: guest.cp_time[3],
        },
        threads: threads
            .iter()
            .enumerate()
            // A corrupt entry (a hostile guest's) is left out, as PET does.
            .filter(|&(slot, t)| {
                t.tid != 0 && t.vcpu == u64::from(id) && entry_is_sane(slot, t, shared.vcpus.len())
            })
            .map(|(_, t)| ThreadSummary {
                tid: t.tid,
                name: String::from_utf8_lossy(&t.name)
                    .trim_end_matches('\0')
                    .to_string(),
                user: t.user_ticks,
                system: t.sys_ticks,
                interrupt: t.intr_ticks,
                estcpu: t.estcpu,
                priority: t.priority,
                switches: t.switches,
            })
            .collect(),
        statclock_intervals: IntervalSummary {
            count: guest.stat_interval_count,
            sum_ns: guest.stat_interval_sum,
            min_ns: guest.stat_interval_min,
            max_ns: guest.stat_interval_max,
            first: guest.stat_intervals
                [..(guest.stat_interval_count as usize).min(metronome_abi::STAT_INTERVALS)]
                .to_vec(),
        },
        max_hardclock_batch: guest.max_hardclock_batch,
        resume_first_batch: guest.resume_first_batch,
        first_dispatch_hardclocks: guest.first_dispatch_hardclocks,
        cpu_inits: guest.cpu_inits,
        hardclock_phase_ns: guest.pending[..guest.pending_count.min(3) as usize]
            .iter()
            .find(|e| e.kind == metronome_abi::event_kind::HARDCLOCK)
            .map_or(0, |e| e.expiration % period.max(1)),
        last_dispatch_ns: guest.last_dispatch_ns,
        last_dispatch_start_ns: guest.last_dispatch_start_ns,
        last_cpu_init_ns: guest.last_cpu_init_ns,
    }
}

fn clock_config(config: &VmConfig) -> ClockConfigSummary {
    let clock = config.clock;
    let stat = clockintr::StatVar::new(clock.stathz.max(1));
    ClockConfigSummary {
        hz: clock.hz,
        stathz: clock.stathz,
        profhz: clock.profhz,
        schedhz: clock.schedhz,
        rndstat: clock.flags & clockintr::CL_RNDSTAT != 0,
        stat_seed: config.stat_seed,
        hardclock_period_ns: hardclock_period_ns(&clock),
        statclock_avg_ns: stat.avg,
        statclock_min_ns: stat.min,
        statclock_mask: stat.mask,
    }
}

/// Every kind of guest misbehaviour, gathered from where it is counted: the
/// devices and buses ([`DeviceErrors`]), each vCPU's interrupt controller
/// and timer models, the vCPU threads' walks, and PET.
fn guest_errors(vm: SummarySource<'_>, stats: &[VcpuRunStats]) -> GuestErrors {
    let shared = vm.shared;
    let devices = vm.device_errors;
    let load = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
    let (mut spurious_eois, mut timer) = (0, metronome_devices::TimerCounters::default());
    for slot in &shared.vcpus {
        let irq = slot.lock();
        spurious_eois += irq.vic.counters().spurious_eois;
        let t = irq.timer.counters();
        timer.bad_accesses += t.bad_accesses;
        timer.rearm_zero += t.rearm_zero;
        timer.clamped += t.clamped;
    }
    let sampling = shared.sampling.as_ref();
    let mut errors = GuestErrors {
        total: 0,
        vic_bad_accesses: load(&devices.vic_bad_accesses),
        ipis_to_absent_vcpus: load(&devices.ipis_to_absent_vcpus),
        spurious_eois,
        timer_bad_accesses: timer.bad_accesses,
        timer_rearms_zero: timer.rearm_zero,
        timer_rearms_clamped: timer.clamped,
        control_bad_writes: load(&devices.control_bad_writes),
        pet_bad_requests: sampling.map_or(0, |s| load(&s.lightweight.bad_requests)),
        uart_bad_accesses: load(&devices.uart_bad_accesses),
        debug_exit_bad_accesses: load(&devices.debug_exit_bad_accesses),
        unmapped_mmio: load(&devices.unmapped_mmio),
        unmapped_pio: load(&devices.unmapped_pio),
        walk_errors: stats.iter().map(|s| s.sampling.walk_errors).sum::<u64>()
            + sampling.map_or(0, |s| load(&s.pet.walk_errors)),
        corrupt_thread_entries: sampling.map_or(0, |s| load(&s.pet.corrupt_thread_entries)),
    };
    errors.total = errors.sum();
    errors
}

/// The name of a workload, as the command line spells it.
pub fn workload_name(workload: Workload) -> &'static str {
    match workload {
        Workload::Demo => "demo",
        Workload::PingPong => "pingpong",
        Workload::Fault => "fault",
        Workload::SpinCpl0 => "spin-cpl0",
        Workload::ExitNow => "exit-now",
        Workload::KickStress => "kick-stress",
        Workload::Profile => "profile",
        Workload::BenchIdle => "bench-idle",
        Workload::Chaos => "chaos",
        Workload::BenchCompute => "bench-compute",
    }
}

fn report_key_name(key: u64) -> String {
    use metronome_abi::report_key::*;
    match key {
        PINGPONG_ROUNDS => "pingpong_rounds".into(),
        PROFIL_ON_NS => "profil_on_ns".into(),
        PROFIL_OFF_NS => "profil_off_ns".into(),
        STRESS_RECEIVED => "stress_received".into(),
        DEMO_WORK => "demo_work".into(),
        CHAOS_ACTIONS => "chaos_actions".into(),
        CHAOS_ALIVE_NS => "chaos_alive_ns".into(),
        other => format!("key_{other}"),
    }
}
