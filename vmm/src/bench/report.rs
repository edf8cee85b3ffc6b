//! The bench's record: the JSON document (`--json`), its Markdown tables,
//! and the percentile helpers that fill it.
//!
//! Key names are part of the interface (issue 10 lists them); later changes
//! add keys, never rename them.

use std::fmt::Write as _;

use metronome_abi::hist;
use metronome_devices::LatencyHistogram;
use serde::Serialize;

use crate::summary::TimerAdvanceSummary;

/// Percentiles of one latency distribution, ns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest value.
    pub max: u64,
}

/// The percentiles the report gives, in its order, as fractions of 1000.
const PERMILLES: [u64; 4] = [500, 900, 990, 999];

impl Percentiles {
    fn from_fn(max: u64, mut at: impl FnMut(u64) -> u64) -> Self {
        let [p50, p90, p99, p999] = PERMILLES.map(|p| at(p).min(max));
        Self {
            p50,
            p90,
            p99,
            p999,
            max,
        }
    }

    /// Exact percentiles of per-delivery `values` (nearest rank).
    pub fn of_values(values: &[u64]) -> Self {
        let mut sorted = values.to_vec();
        sorted.sort_unstable();
        let max = sorted.last().copied().unwrap_or(0);
        Self::from_fn(max, |permille| {
            rank(sorted.len() as u64, permille).map_or(0, |r| sorted[r as usize - 1])
        })
    }

    /// Percentiles of the timer device's histogram (each the upper bound of
    /// its 12.5 % bucket, capped at the exact max).
    pub fn of_histogram(histogram: &LatencyHistogram) -> Self {
        Self::from_fn(histogram.max(), |permille| {
            histogram.percentile(permille as f64 / 10.0)
        })
    }

    /// Percentiles of the guest's histogram ([`hist`]: 12.5 % buckets), capped
    /// at the guest's exact max.
    pub fn of_guest(counts: &hist::Counts, max: u64) -> Self {
        let total = counts.0.iter().fold(0u64, |a, &n| a.saturating_add(n));
        Self::from_fn(max, |permille| {
            let Some(rank) = rank(total, permille) else {
                return 0;
            };
            let mut seen = 0u64;
            for (index, &n) in counts.0.iter().enumerate() {
                seen = seen.saturating_add(n);
                if seen >= rank {
                    return hist::upper(index);
                }
            }
            max
        })
    }

    /// Whether p50 <= p90 <= p99 <= p999 <= max.
    pub fn ordered(&self) -> bool {
        self.p50 <= self.p90
            && self.p90 <= self.p99
            && self.p99 <= self.p999
            && self.p999 <= self.max
    }
}

/// The 1-based nearest rank of `permille` among `total` values; `None` when
/// there are none.
fn rank(total: u64, permille: u64) -> Option<u64> {
    (total > 0).then(|| ((u128::from(total) * u128::from(permille)).div_ceil(1000) as u64).max(1))
}

/// The host.
#[derive(Clone, Debug, Default, Serialize)]
pub struct HostInfo {
    /// CPU model (`/proc/cpuinfo`).
    pub cpu: String,
    /// CPUs this process may run on.
    pub cores: usize,
    /// Kernel release.
    pub kernel: String,
    /// The KVM module(s) loaded (`kvm_intel`, `kvm_amd`, `kvm_pvm`, ...).
    pub kvm_module: String,
}

/// Timer delivery on one kind of vCPU (halted or busy).
#[derive(Clone, Debug, Default, Serialize)]
pub struct TimerFigures {
    /// Guest-side lateness: the deadline the guest programmed to its interrupt
    /// entry, from the guest's histogram (12.5 % buckets, exact max).
    pub guest_ns: Percentiles,
    /// Host-side lateness: the deadline to `KVM_INTERRUPT`, from the timer
    /// device's histogram (12.5 % buckets, exact max).
    pub host_ns: Percentiles,
    /// The host floor: a host thread's timerfd wake lateness at the same
    /// deadlines in the same run (exact, per wake-up).
    pub host_floor_ns: Percentiles,
    /// Timer interrupts delivered (`KVM_INTERRUPT`s of the timer vector).
    pub count: u64,
    /// Deliveries before their deadline (must be 0).
    pub early: u64,
    /// Dispatches the guest measured (its histogram's count).
    pub guest_count: u64,
    /// Deadlines the floor thread slept to.
    pub host_floor_count: u64,
    /// Deadlines the floor thread skipped: already past when it got them.
    pub host_floor_skipped: u64,
    /// Early dispatches the guest's clockintr counted (the trigger after
    /// `clockintr_cpu_init` on a secondary vCPU; expected 0 with one vCPU).
    pub guest_early_dispatches: u64,
    /// Wall time of the phase, s.
    pub seconds: f64,
    /// Timer advance in this phase: whether on, the advances learned, the
    /// wakes and the waits (the summary's `timer.advance`).
    pub advance: TimerAdvanceSummary,
    /// The time waited for deadlines on the phase's path (running for busy,
    /// halted for halted) per delivery, ns: advance's cost per interrupt.
    pub advance_wait_ns_per_delivery: f64,
    /// Guest time lost to advance: the running vCPU's waits over the phase's
    /// wall time, percent (host CPU only for a halted vCPU, counted apart).
    pub advance_guest_time_pct: f64,
}

/// Timer delivery with timer advance off, for comparison.
#[derive(Clone, Debug, Default, Serialize)]
pub struct NoAdvanceReport {
    /// The vCPU waits in HLT between interrupts.
    pub halted: TimerFigures,
    /// The vCPU computes at CPL3 until the interrupt.
    pub busy: TimerFigures,
}

/// Both timer phases.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TimerReport {
    /// The vCPU waits in HLT between interrupts (the default: timer
    /// advance on).
    pub halted: TimerFigures,
    /// The vCPU computes at CPL3 until the interrupt (advance on).
    pub busy: TimerFigures,
    /// The same two phases with `--no-timer-advance`, in the same run.
    pub without_advance: NoAdvanceReport,
    /// How the deadlines are drawn.
    pub method: String,
}

/// Sampling at one rate.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RateFigures {
    /// Requested rate per vCPU.
    pub hz: u32,
    /// The sampling tier: `kick` (the vCPU leaves `KVM_RUN` for each sample).
    pub tier: String,
    /// Guest work lost against the baseline, percent.
    pub metronome_overhead_pct: f64,
    /// Guest work lost under `perf kvm --guest record -e cpu-clock -F hz`,
    /// percent; `null` without perf.
    pub perf_overhead_pct: Option<f64>,
    /// Samples per second per vCPU, from the samples taken.
    pub achieved_hz: f64,
    /// Sampling periods that elapsed without a sample (expected fires minus
    /// samples taken, at least 0).
    pub missed_fires: u64,
    /// Guest time lost per sample, us.
    pub cost_per_sample_us: f64,
    /// The baseline window measured right before this rate's phases, ops/s.
    pub baseline_ops_per_s: f64,
    /// Guest ops/s while Metronome sampled.
    pub metronome_ops_per_s: f64,
    /// Guest ops/s while perf sampled (`null` without perf).
    pub perf_ops_per_s: Option<f64>,
    /// Samples Metronome took in its window.
    pub samples: u64,
    /// kperf timer fires in the window.
    pub timer_fires: u64,
    /// Sampling periods in the window (hz x window x vCPUs).
    pub expected_fires: u64,
    /// Samples perf wrote (from its own report), when it ran.
    pub perf_samples: Option<u64>,
}

/// The sampling overhead figures.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SamplingReport {
    /// Guest ops/s without sampling (the median of the baseline windows).
    pub baseline_ops_per_s: f64,
    /// One entry per rate.
    pub rates: Vec<RateFigures>,
    /// Each window's length, s.
    pub window_s: f64,
    /// Left unmeasured after each sampler starts, s.
    pub warmup_s: f64,
    /// Why `perf_overhead_pct` is null, when it is.
    pub perf_unavailable: Option<String>,
    /// The perf command line used (with the rate and pid filled in).
    pub perf_command: String,
}

/// Boot.
#[derive(Clone, Debug, Default, Serialize)]
pub struct BootReport {
    /// Process start to the first clock dispatch on every vCPU (the last of
    /// them), ms.
    pub first_dispatch_ms: f64,
    /// vCPUs of the VM measured.
    pub vcpus: u32,
}

/// Memory.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FootprintReport {
    /// VMM resident memory apart from guest memory, MiB: `VmRSS` minus the
    /// resident pages of the guest memory mappings (`/proc/self/smaps`).
    pub vmm_rss_mib: f64,
    /// The process's `VmRSS`, MiB.
    pub process_rss_mib: f64,
    /// Guest memory touched (resident), MiB.
    pub guest_resident_mib: f64,
}

/// The whole run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct BenchReport {
    /// The host.
    pub host: HostInfo,
    /// Timer delivery.
    pub timer: TimerReport,
    /// Sampling overhead.
    pub sampling: SamplingReport,
    /// Boot.
    pub boot: BootReport,
    /// Memory.
    pub footprint: FootprintReport,
    /// `--quick` (CI smoke) or a full run.
    pub quick: bool,
    /// Wall time of the whole bench, s.
    pub wall_s: f64,
}

fn us(ns: u64) -> String {
    format!("{:.1}", ns as f64 / 1000.0)
}

fn pct(value: Option<f64>) -> String {
    value.map_or_else(|| "n/a".into(), |v| format!("{v:.1} %"))
}

fn yes(met: bool) -> &'static str {
    if met {
        "yes"
    } else {
        "no"
    }
}

impl BenchReport {
    /// The Markdown tables: the host, timer lateness, sampling overhead, boot
    /// and memory, then the targets against these figures.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let h = &self.host;
        let _ = writeln!(
            out,
            "Host: {} ({} CPUs), Linux {}, KVM module `{}`{}.\n",
            h.cpu,
            h.cores,
            h.kernel,
            h.kvm_module,
            if self.quick { "; `--quick` run" } else { "" }
        );
        out.push_str("| timer lateness (us) | p50 | p90 | p99 | p99.9 | max | count | early |\n");
        out.push_str("|---|---|---|---|---|---|---|---|\n");
        let off = &self.timer.without_advance;
        for (mode, t) in [
            ("halted", &self.timer.halted),
            ("busy", &self.timer.busy),
            ("halted, no advance", &off.halted),
            ("busy, no advance", &off.busy),
        ] {
            for (side, p, count) in [
                ("guest", &t.guest_ns, t.guest_count),
                ("host", &t.host_ns, t.count),
                ("host floor (timerfd)", &t.host_floor_ns, t.host_floor_count),
            ] {
                let _ = writeln!(
                    out,
                    "| {mode}, {side} | {} | {} | {} | {} | {} | {count} | {} |",
                    us(p.p50),
                    us(p.p90),
                    us(p.p99),
                    us(p.p999),
                    us(p.max),
                    if side == "host" {
                        t.early.to_string()
                    } else {
                        String::new()
                    }
                );
            }
        }
        out.push_str(
            "\n| timer advance | learned (us) | wakes early / late / ignored | wait per delivery (us) | guest time lost |\n",
        );
        out.push_str("|---|---|---|---|---|\n");
        for (mode, t) in [("halted", &self.timer.halted), ("busy", &self.timer.busy)] {
            let a = &t.advance;
            let learned = if mode == "halted" {
                a.halted_advance_ns
            } else {
                a.running_advance_ns
            };
            let _ = writeln!(
                out,
                "| {mode} | {} | {} / {} / {} | {:.2} | {:.2} % |",
                us(learned),
                a.stats.early_wakes,
                a.stats.late_wakes,
                a.stats.ignored_wakes,
                t.advance_wait_ns_per_delivery / 1000.0,
                t.advance_guest_time_pct
            );
        }
        let s = &self.sampling;
        let _ = writeln!(
            out,
            "\n| sampling (baseline {:.3e} ops/s) | tier | Metronome overhead | perf overhead | achieved Hz | missed fires | cost per sample (us) |",
            s.baseline_ops_per_s
        );
        out.push_str("|---|---|---|---|---|---|---|\n");
        for r in &s.rates {
            let _ = writeln!(
                out,
                "| {} kHz | {} | {} | {} | {:.0} | {} | {:.1} |",
                r.hz / 1000,
                r.tier,
                pct(Some(r.metronome_overhead_pct)),
                pct(r.perf_overhead_pct),
                r.achieved_hz,
                r.missed_fires,
                r.cost_per_sample_us
            );
        }
        let _ = writeln!(
            out,
            "\nBoot: first dispatch on every vCPU {:.1} ms after process start ({} vCPUs). \
             Footprint: VMM resident {:.1} MiB apart from guest memory ({:.1} MiB of guest memory resident).",
            self.boot.first_dispatch_ms,
            self.boot.vcpus,
            self.footprint.vmm_rss_mib,
            self.footprint.guest_resident_mib
        );
        out.push_str(&self.targets());
        out
    }

    /// The targets against this run's figures.
    fn targets(&self) -> String {
        let mut out = String::from("\n| target | this run | met |\n|---|---|---|\n");
        let rate = |hz: u32| self.sampling.rates.iter().find(|r| r.hz == hz);
        let cost = rate(1_000).map(|r| r.cost_per_sample_us);
        let mut row = |target: &str, value: String, met: bool| {
            let _ = writeln!(out, "| {target} | {value} | {} |", yes(met));
        };
        if let Some(cost) = cost {
            row(
                "kick tier: guest time lost per sample <= 35 us",
                format!("{cost:.1} us at 1 kHz"),
                cost <= 35.0,
            );
        }
        for hz in [1_000, 10_000] {
            if let Some(r) = rate(hz) {
                let value = format!(
                    "Metronome {} / perf {}",
                    pct(Some(r.metronome_overhead_pct)),
                    pct(r.perf_overhead_pct)
                );
                let met = r
                    .perf_overhead_pct
                    .is_some_and(|p| r.metronome_overhead_pct <= p);
                row(
                    &format!("overhead at {} kHz <= perf kvm's", hz / 1000),
                    value,
                    met,
                );
            }
        }
        if let Some(r) = rate(20_000) {
            let sampled = if r.expected_fires == 0 {
                0.0
            } else {
                100.0 * r.samples as f64 / r.expected_fires as f64
            };
            row(
                "20 kHz per vCPU, >= 99 % of fires sampled",
                format!("{sampled:.1} % ({:.0} Hz)", r.achieved_hz),
                sampled >= 99.0,
            );
        }
        for (mode, t) in [("halted", &self.timer.halted), ("busy", &self.timer.busy)] {
            row(
                &format!("timer ({mode}): host-side p50 <= 5 us"),
                format!("{} us", us(t.host_ns.p50)),
                t.host_ns.p50 <= 5_000,
            );
            row(
                &format!("timer ({mode}): guest-side p50 <= timerfd floor p50"),
                format!(
                    "{} us vs {} us",
                    us(t.guest_ns.p50),
                    us(t.host_floor_ns.p50)
                ),
                t.guest_ns.p50 <= t.host_floor_ns.p50,
            );
            row(
                &format!("timer ({mode}): zero early"),
                t.early.to_string(),
                t.early == 0,
            );
        }
        row(
            "first dispatch on every vCPU <= 20 ms after process start",
            format!("{:.1} ms", self.boot.first_dispatch_ms),
            self.boot.first_dispatch_ms <= 20.0,
        );
        row(
            "VMM resident memory apart from guest memory < 5 MiB",
            format!("{:.1} MiB", self.footprint.vmm_rss_mib),
            self.footprint.vmm_rss_mib < 5.0,
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_exact_percentiles_use_the_nearest_rank() {
        let values: Vec<u64> = (1..=1000).rev().collect();
        let p = Percentiles::of_values(&values);
        assert_eq!(
            (p.p50, p.p90, p.p99, p.p999, p.max),
            (500, 900, 990, 999, 1000)
        );
        assert!(p.ordered());
        assert_eq!(Percentiles::of_values(&[]), Percentiles::default());
        assert_eq!(Percentiles::of_values(&[7]).p50, 7);
    }

    #[test]
    fn test_guest_histogram_percentiles_are_bucket_bounds_capped_at_max() {
        let mut counts = hist::Counts::default();
        for v in [1_000u64, 2_000, 3_000, 40_000] {
            counts.0[hist::bucket(v)] += 1;
        }
        let p = Percentiles::of_guest(&counts, 40_000);
        assert!(p.p50 >= 2_000 && p.p50 < 2_300, "{p:?}");
        assert_eq!(p.max, 40_000);
        assert_eq!(p.p999, 40_000, "capped at the exact max");
        assert!(p.ordered());
    }

    #[test]
    fn test_device_histogram_percentiles_never_exceed_max() {
        let mut h = LatencyHistogram::new();
        for v in [10, 20, 30_001] {
            h.record(v);
        }
        let p = Percentiles::of_histogram(&h);
        assert_eq!(p.max, 30_001);
        assert_eq!(p.p999, 30_001);
        assert!(p.ordered());
    }

    #[test]
    fn test_markdown_has_every_table_and_target() {
        let mut report = BenchReport::default();
        report.sampling.rates.push(RateFigures {
            hz: 1_000,
            tier: "kick".into(),
            cost_per_sample_us: 40.0,
            ..RateFigures::default()
        });
        let md = report.markdown();
        assert!(md.contains("| timer lateness (us) |"), "{md}");
        assert!(md.contains("| 1 kHz | kick |"), "{md}");
        assert!(
            md.contains(
                "| kick tier: guest time lost per sample <= 35 us | 40.0 us at 1 kHz | no |"
            ),
            "{md}"
        );
        assert!(md.contains("| perf overhead |"));
    }
}
