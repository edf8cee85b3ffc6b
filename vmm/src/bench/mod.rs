//! `metronome bench`: one process, one run, the figures issue 10 asks for.
//!
//! In order, each on a VM of its own built in this process:
//! 1. boot: a 2-vCPU VM with no threads; process start to the first clock
//!    dispatch on every vCPU (the guest's `first_dispatch_ns`);
//! 2. timer, halted: one vCPU with no thread (it waits in HLT between its
//!    clock interrupts); 3. timer, busy: one vCPU computing at CPL3 until each
//!    interrupt. The guest's clockintr runs at [`TIMER_STATHZ`] with a
//!    randomized statclock (`CL_RNDSTAT`), so each rearm is a pseudo-random
//!    interval; lateness comes from the guest's and the timer device's
//!    histograms, and from a host floor thread on a timerfd armed at the same
//!    deadlines ([`floor`], through the VM's deadline tap);
//! 4. sampling: one vCPU computing at CPL3 and counting its operations in the
//!    bench page; per rate (1, 10, 20 kHz) a baseline window, a window with
//!    Metronome's kptimer sampling (the kick tier), and a window with `perf
//!    kvm --guest record -e cpu-clock -F hz -p <this process>` attached
//!    ([`host::PerfRun`]); then the VMM's resident memory apart from guest
//!    memory ([`host::resident_bytes`]).
//!
//! [`report`] holds the JSON and Markdown, [`svg`] the histograms.

pub mod floor;
pub mod host;
pub mod report;
pub mod svg;

use std::path::{Path, PathBuf};
use std::sync::mpsc::sync_channel;
use std::time::{Duration, Instant};

use metronome_abi::{hist, Workload};

use crate::config::{ConsoleSink, KernelSource, KperfConfig, SamplingConfig, VmConfig};
use crate::summary::TimerAdvanceSummary;
use crate::vm::probe::{DeadlineTap, TimerLateness};
use crate::vm::{BuildVmError, RunningVm, SamplingError, Vm, VmController};
use floor::{FloorThread, FLOOR_QUEUE};
use report::{
    BenchReport, BootReport, FootprintReport, NoAdvanceReport, Percentiles, RateFigures,
    SamplingReport, TimerFigures, TimerReport,
};
use svg::Series;

/// The statclock frequency of the timer phases (randomized; hardclock stays
/// at 100 Hz): about this many timer deliveries per second.
pub const TIMER_STATHZ: u32 = 1_000;
/// The sampling rates measured, Hz per vCPU.
pub const RATES: [u32; 3] = [1_000, 10_000, 20_000];
/// The sampling tier the kptimer path is.
const KICK_TIER: &str = "kick";
const MIB: f64 = 1024.0 * 1024.0;

/// What `metronome bench` was asked for.
#[derive(Clone, Debug, Default)]
pub struct BenchOptions {
    /// The CI smoke run: fewer deliveries, shorter windows (under a minute).
    pub quick: bool,
    /// Write the JSON report here.
    pub json: Option<PathBuf>,
    /// Write the Markdown tables here.
    pub markdown: Option<PathBuf>,
    /// Write the SVG latency histograms here.
    pub svg_dir: Option<PathBuf>,
    /// Skip perf (its figures are then null, with the reason).
    pub no_perf: bool,
}

/// Why the bench could not finish.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A VM could not be built.
    #[error("cannot build the {phase} VM")]
    Build {
        /// The phase.
        phase: &'static str,
        /// Why.
        #[source]
        source: BuildVmError,
    },
    /// A VM could not be started.
    #[error("cannot start the {phase} VM: {reason}")]
    Start {
        /// The phase.
        phase: &'static str,
        /// Why.
        reason: String,
    },
    /// A VM ended before the bench stopped it.
    #[error("the {phase} VM ended early: {message}")]
    Ended {
        /// The phase.
        phase: &'static str,
        /// The summary's message.
        message: String,
    },
    /// Something the bench waits for did not happen in time.
    #[error("{phase}: {what} did not happen within {seconds} s")]
    Timeout {
        /// The phase.
        phase: &'static str,
        /// What was waited for.
        what: &'static str,
        /// The limit.
        seconds: u64,
    },
    /// kperf refused a step.
    #[error("sampling: {0}")]
    Sampling(String),
    /// A host resource (the floor thread, /proc) failed.
    #[error("{what}")]
    Host {
        /// What failed.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An output file could not be written.
    #[error("cannot write '{path}'")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A histogram could not be drawn.
    #[error(transparent)]
    Svg(#[from] svg::SvgError),
    /// SIGINT or SIGTERM arrived.
    #[error("stopped by signal {0}")]
    Signalled(i32),
}

/// SIGINT or SIGTERM pending for this process (the VMM blocks both in its
/// threads; the bench polls for them between its steps).
fn stop_signal_pending() -> Option<i32> {
    // SAFETY: sigpending fills a local set; sigismember reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        if libc::sigpending(&mut set) != 0 {
            return None;
        }
        [libc::SIGINT, libc::SIGTERM]
            .into_iter()
            .find(|&s| libc::sigismember(&set, s) == 1)
    }
}

impl From<SamplingError> for BenchError {
    fn from(e: SamplingError) -> Self {
        Self::Sampling(e.to_string())
    }
}

/// How much the run measures.
#[derive(Clone, Copy, Debug)]
struct Plan {
    /// Timer deliveries per timer phase.
    deliveries: u64,
    /// Each sampling window.
    window: Duration,
    /// Left unmeasured after a sampler starts: perf's start-up (it reads
    /// the process's threads and mappings after opening its events), and
    /// the same for Metronome so both windows are alike.
    warmup: Duration,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                deliveries: 1_000,
                window: Duration::from_millis(700),
                warmup: Duration::from_millis(300),
            }
        } else {
            Self {
                deliveries: 10_000,
                window: Duration::from_secs(4),
                warmup: Duration::from_secs(1),
            }
        }
    }
}

/// Runs the bench and writes the files `options` asks for. `process_start`
/// is when the process started (the boot figure's zero).
pub fn run(options: &BenchOptions, process_start: Instant) -> Result<BenchReport, BenchError> {
    let plan = Plan::new(options.quick);
    let boot = boot_phase(process_start)?;
    progress(&format!("boot: {:.1} ms", boot.first_dispatch_ms));
    let (halted, halted_series) = timer_phase("halted", Workload::BenchIdle, plan, true)?;
    let (busy, busy_series) = timer_phase("busy", Workload::BenchCompute, plan, true)?;
    let (halted_off, _) = timer_phase("halted", Workload::BenchIdle, plan, false)?;
    let (busy_off, _) = timer_phase("busy", Workload::BenchCompute, plan, false)?;
    let (sampling, footprint) = sampling_phase(plan, options.no_perf)?;
    let report = BenchReport {
        host: host::host_info(),
        timer: TimerReport {
            halted,
            busy,
            without_advance: NoAdvanceReport {
                halted: halted_off,
                busy: busy_off,
            },
            method: format!(
                "guest clockintr at hz 100, stathz {TIMER_STATHZ} randomized (CL_RNDSTAT): \
                 each rearm a pseudo-random interval; guest and host lateness from 12.5 % \
                 histograms (exact max), the host floor per wake-up"
            ),
        },
        sampling,
        boot,
        footprint,
        quick: options.quick,
        wall_s: process_start.elapsed().as_secs_f64(),
    };
    write_outputs(
        options,
        &report,
        &[("halted", halted_series), ("busy", busy_series)],
    )?;
    Ok(report)
}

fn progress(line: &str) {
    eprintln!("metronome bench: {line}");
}

fn write_file(path: &Path, text: &str) -> Result<(), BenchError> {
    crate::outfile::write_bytes(path, text.as_bytes()).map_err(|e| BenchError::Write {
        path: e.path,
        source: e.source,
    })
}

fn write_outputs(
    options: &BenchOptions,
    report: &BenchReport,
    charts: &[(&str, Vec<Series>)],
) -> Result<(), BenchError> {
    if let Some(path) = &options.json {
        let json = serde_json::to_string_pretty(report).expect("the report serialises");
        write_file(path, &(json + "\n"))?;
    }
    if let Some(path) = &options.markdown {
        write_file(path, &report.markdown())?;
    }
    if let Some(dir) = &options.svg_dir {
        std::fs::create_dir_all(dir).map_err(|source| BenchError::Write {
            path: dir.clone(),
            source,
        })?;
        for (mode, series) in charts {
            let title = format!("Timer lateness, {mode} vCPU");
            svg::latency_histogram(&dir.join(format!("timer_{mode}.svg")), &title, series)?;
        }
    }
    Ok(())
}

/// The configuration of a bench VM: the embedded kernel, 64 MiB, no
/// console, running until the bench stops it (10 minutes at most).
fn vm_config(vcpus: u32, workload: Workload, stathz: u32) -> VmConfig {
    VmConfig {
        vcpus,
        mem_mib: metronome_abi::layout::MIN_MEM_MIB,
        kernel: KernelSource::Embedded,
        duration: None,
        timeout: Some(Duration::from_secs(600)),
        console: ConsoleSink::Null,
        workload,
        clock: clockintr::Config {
            hz: 100,
            stathz,
            profhz: stathz * 10,
            schedhz: 0,
            flags: clockintr::CL_RNDSTAT,
        },
        ..VmConfig::default()
    }
}

/// A bench VM while it runs.
struct Running {
    phase: &'static str,
    vm: RunningVm,
    controller: VmController,
}

impl Running {
    fn start(phase: &'static str, config: VmConfig) -> Result<Self, BenchError> {
        let vm = Vm::build(config).map_err(|source| BenchError::Build { phase, source })?;
        let vm = vm
            .start(Instant::now())
            .map_err(|(_, reason)| BenchError::Start {
                phase,
                reason: reason.to_string(),
            })?;
        let controller = vm.controller();
        Ok(Self {
            phase,
            vm,
            controller,
        })
    }

    /// Polls `done` every 10 ms for up to `limit`; the VM ending first is an
    /// error with its summary's message.
    fn wait_for(
        self,
        what: &'static str,
        limit: Duration,
        mut done: impl FnMut(&VmController) -> bool,
    ) -> Result<Self, BenchError> {
        let give_up = Instant::now() + limit;
        loop {
            if done(&self.controller) {
                return Ok(self);
            }
            if let Some(signo) = stop_signal_pending() {
                self.stop();
                return Err(BenchError::Signalled(signo));
            }
            if self.controller.ended() {
                let phase = self.phase;
                let message = self.vm.wait().message;
                return Err(BenchError::Ended { phase, message });
            }
            if Instant::now() > give_up {
                let phase = self.phase;
                self.stop();
                return Err(BenchError::Timeout {
                    phase,
                    what,
                    seconds: limit.as_secs(),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn stop(self) {
        self.controller.stop();
        let _ = self.vm.wait();
    }
}

fn boot_phase(process_start: Instant) -> Result<BootReport, BenchError> {
    const VCPUS: u32 = 2;
    let running = Running::start("boot", vm_config(VCPUS, Workload::BenchIdle, 100))?;
    let all_dispatched = |c: &VmController| c.first_dispatch_ns().iter().all(Option::is_some);
    let running = running.wait_for(
        "a clock dispatch on every vCPU",
        Duration::from_secs(30),
        all_dispatched,
    )?;
    // Device time 0 (the VM's creation) relative to the process start.
    let since_start = process_start.elapsed().as_nanos() as u64;
    let epoch = since_start.saturating_sub(running.controller.uptime_ns());
    let last = running
        .controller
        .first_dispatch_ns()
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(0);
    running.stop();
    Ok(BootReport {
        first_dispatch_ms: (epoch + last) as f64 / 1e6,
        vcpus: VCPUS,
    })
}

/// One timer phase: a 1-vCPU VM, halted or busy, with timer advance on
/// or off, until `plan.deliveries` timer interrupts.
fn timer_phase(
    mode: &'static str,
    workload: Workload,
    plan: Plan,
    advance: bool,
) -> Result<(TimerFigures, Vec<Series>), BenchError> {
    let host_error = |what| move |source| BenchError::Host { what, source };
    let (sender, receiver) = sync_channel(FLOOR_QUEUE);
    let floor =
        FloorThread::spawn(receiver).map_err(host_error("cannot start the floor thread"))?;
    let phase = match (mode, advance) {
        ("halted", true) => "timer (halted)",
        ("halted", false) => "timer (halted, no advance)",
        (_, true) => "timer (busy)",
        (_, false) => "timer (busy, no advance)",
    };
    let started = Instant::now();
    let config = VmConfig {
        timer_advance: advance,
        ..vm_config(1, workload, TIMER_STATHZ)
    };
    let running = Running::start(phase, config)?;
    running
        .controller
        .set_deadline_tap(DeadlineTap::new(sender, 1));
    let injections = |c: &VmController| c.timer_lateness(0).map_or(0, |t| t.injections);
    let limit = Duration::from_secs(30 + plan.deliveries / 50);
    let running = running.wait_for("the timer deliveries", limit, |c| {
        injections(c) >= plan.deliveries
    })?;
    let lateness = running.controller.timer_lateness(0).unwrap_or_default();
    let dropped = running.controller.deadline_tap_dropped();
    running.stop();
    let seconds = started.elapsed().as_secs_f64();
    let floor = floor
        .finish()
        .map_err(host_error("the floor thread failed"))?;
    let figures = timer_figures(&lateness, &floor, dropped, seconds, mode == "halted");
    progress(&format!(
        "{phase}: {} deliveries, host p50 {} ns, guest p50 {} ns, floor p50 {} ns, \
         advance {} ns, wait {:.0} ns per delivery",
        figures.count,
        figures.host_ns.p50,
        figures.guest_ns.p50,
        figures.host_floor_ns.p50,
        if mode == "halted" {
            figures.advance.halted_advance_ns
        } else {
            figures.advance.running_advance_ns
        },
        figures.advance_wait_ns_per_delivery
    ));
    Ok((figures, timer_series(&lateness, &floor.lateness_ns)))
}

fn timer_figures(
    lateness: &TimerLateness,
    floor: &floor::FloorRecord,
    tap_dropped: u64,
    seconds: f64,
    halted: bool,
) -> TimerFigures {
    let advance = TimerAdvanceSummary::of(&lateness.advance);
    let waited = if halted {
        advance.stats.halted_wait_ns
    } else {
        advance.stats.running_wait_ns
    };
    TimerFigures {
        guest_ns: Percentiles::of_guest(&lateness.guest, lateness.guest_max),
        host_ns: Percentiles::of_histogram(&lateness.host),
        host_floor_ns: Percentiles::of_values(&floor.lateness_ns),
        count: lateness.injections,
        early: lateness.early_injections,
        guest_count: lateness.guest.0.iter().sum(),
        host_floor_count: floor.lateness_ns.len() as u64,
        host_floor_skipped: floor.skipped + tap_dropped,
        guest_early_dispatches: lateness.guest_early,
        seconds,
        advance_wait_ns_per_delivery: waited as f64 / lateness.injections.max(1) as f64,
        advance_guest_time_pct: 100.0 * advance.stats.running_wait_ns as f64
            / (seconds * 1e9).max(1.0),
        advance,
    }
}

/// The three distributions of a timer phase, as chart series.
fn timer_series(lateness: &TimerLateness, floor_ns: &[u64]) -> Vec<Series> {
    let guest = lateness
        .guest
        .0
        .iter()
        .enumerate()
        .filter(|(_, &n)| n > 0)
        .map(|(i, &n)| (hist::upper(i).min(lateness.guest_max.max(1)), n))
        .collect();
    let mut floor = metronome_devices::LatencyHistogram::new();
    for &ns in floor_ns {
        floor.record(ns);
    }
    vec![
        Series {
            name: "guest: deadline to interrupt entry".into(),
            buckets: guest,
        },
        Series {
            name: "host: deadline to KVM_INTERRUPT".into(),
            buckets: lateness.host.buckets().collect(),
        },
        Series {
            name: "host floor: timerfd wake".into(),
            buckets: floor.buckets().collect(),
        },
    ]
}

/// The guest's operations per second over `window`, and the window's length.
fn ops_window(controller: &VmController, window: Duration) -> Result<(f64, f64), BenchError> {
    let ops = || controller.bench_ops().first().copied().unwrap_or(0);
    let (o0, t0) = (ops(), Instant::now());
    // The window is the measurement itself: the guest computes meanwhile.
    std::thread::sleep(window);
    let (o1, seconds) = (ops(), t0.elapsed().as_secs_f64());
    if let Some(signo) = stop_signal_pending() {
        return Err(BenchError::Signalled(signo));
    }
    Ok((o1.saturating_sub(o0) as f64 / seconds, seconds))
}

fn lost_pct(baseline: f64, rate: f64) -> f64 {
    if baseline > 0.0 {
        100.0 * (1.0 - rate / baseline)
    } else {
        0.0
    }
}

fn sampling_phase(
    plan: Plan,
    no_perf: bool,
) -> Result<(SamplingReport, FootprintReport), BenchError> {
    let phase = "sampling";
    let mut config = vm_config(1, Workload::BenchCompute, 100);
    let samplers = kperf::sampler::TH_INFO | kperf::sampler::USTACK | kperf::sampler::KSTACK;
    config.sampling = Some(SamplingConfig {
        start_at_boot: false,
        ..SamplingConfig::new(KperfConfig::on_cpu(1_000_000, samplers, None))
    });
    let running = Running::start(phase, config)?;
    let computing = |c: &VmController| c.bench_ops().first().is_some_and(|&n| n > 0);
    let running = running.wait_for(
        "the compute loop's first count",
        Duration::from_secs(30),
        computing,
    )?;
    let c = running.controller.clone();
    let perf_data =
        std::env::temp_dir().join(format!("metronome-bench-{}.perf.data", std::process::id()));
    let mut perf_unavailable = no_perf.then(|| "--no-perf".to_string());
    let mut rates = Vec::new();
    let mut baselines = Vec::new();
    let result = (|| -> Result<(), BenchError> {
        for hz in RATES {
            let (baseline, _) = ops_window(&c, plan.window)?;
            baselines.push(baseline);
            c.with_kperf(|k| k.set_timer_period(0, 1_000_000_000 / u64::from(hz)))?
                .map_err(|e| BenchError::Sampling(e.to_string()))?;
            c.sampling_start()?;
            std::thread::sleep(plan.warmup);
            let (s0, f0) = (c.samples_taken(), c.timer_fires());
            let (rate, seconds) = ops_window(&c, plan.window)?;
            let (samples, fires) = (c.samples_taken() - s0, c.timer_fires() - f0);
            c.sampling_stop()?;
            let (mut perf_rate, mut perf_samples) = (None, None);
            if perf_unavailable.is_none() {
                match host::PerfRun::start(hz, &perf_data) {
                    Ok(perf) => {
                        std::thread::sleep(plan.warmup);
                        let window = ops_window(&c, plan.window);
                        perf_samples = perf.stop();
                        perf_rate = Some(window?.0);
                    }
                    Err(reason) => perf_unavailable = Some(reason),
                }
            }
            let lost = lost_pct(baseline, rate);
            let expected = (f64::from(hz) * seconds) as u64;
            let figures = RateFigures {
                hz,
                tier: KICK_TIER.into(),
                metronome_overhead_pct: lost,
                perf_overhead_pct: perf_rate.map(|r| lost_pct(baseline, r)),
                achieved_hz: samples as f64 / seconds,
                missed_fires: expected.saturating_sub(samples),
                cost_per_sample_us: if samples > 0 {
                    lost / 100.0 * seconds * 1e6 / samples as f64
                } else {
                    0.0
                },
                baseline_ops_per_s: baseline,
                metronome_ops_per_s: rate,
                perf_ops_per_s: perf_rate,
                samples,
                timer_fires: fires,
                expected_fires: expected,
                perf_samples,
            };
            progress(&format!(
                "sampling {} kHz: Metronome {:.1} %, perf {}, {:.0} Hz achieved, {:.1} us/sample",
                hz / 1000,
                figures.metronome_overhead_pct,
                figures
                    .perf_overhead_pct
                    .map_or_else(|| "n/a".into(), |p| format!("{p:.1} %")),
                figures.achieved_hz,
                figures.cost_per_sample_us
            ));
            rates.push(figures);
        }
        Ok(())
    })();
    let memory = host::resident_bytes(&c.guest_memory_host_ranges());
    running.stop();
    result?;
    let (rss, guest) = memory.map_err(|source| BenchError::Host {
        what: "cannot read this process's memory figures",
        source,
    })?;
    baselines.sort_by(f64::total_cmp);
    let sampling = SamplingReport {
        baseline_ops_per_s: baselines.get(baselines.len() / 2).copied().unwrap_or(0.0),
        rates,
        window_s: plan.window.as_secs_f64(),
        warmup_s: plan.warmup.as_secs_f64(),
        perf_unavailable,
        perf_command: host::PERF_COMMAND.into(),
    };
    let footprint = FootprintReport {
        vmm_rss_mib: rss.saturating_sub(guest) as f64 / MIB,
        process_rss_mib: rss as f64 / MIB,
        guest_resident_mib: guest as f64 / MIB,
    };
    Ok((sampling, footprint))
}
