//! Run-time metrics: what `GET /metrics` reports about a VM while it runs
//! and after it exited.
//!
//! Nothing here adds work to a vCPU's or a timer's path beyond relaxed
//! atomic increments in the vCPU's own slot:
//!
//! - exits by reason: [`ExitCounters`] in each [`crate::vm::shared::VcpuSlot`],
//!   counted by that vCPU's thread with one relaxed `fetch_add`;
//! - kicks: the slot's `kicks_sent` (already counted by the kicker);
//! - timer deliveries and host lateness: the vCPU's timer device and
//!   injection counts, which its thread updates under the irq lock it takes
//!   anyway at every guest entry;
//! - guest lateness: the histogram the guest kernel keeps in its shared page;
//! - timer advance: the advances and waits in the same irq state;
//! - kperf: the sampling state's counters and buffers.
//!
//! [`collect`] reads all of it from the caller's thread (the API's), taking
//! each vCPU's irq lock only to copy its timer histogram, and the kperf
//! engine's lock only to read one counter. [`prometheus`] turns a snapshot
//! into the Prometheus text exposition format.

pub mod prometheus;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use metronome_abi::hist;
use serde::Serialize;
use utoipa::ToSchema;

use crate::summary::read_vcpu_page;
use crate::vcpu::advance::WakePath;
use crate::vm::VmShared;

/// Why a vCPU left `KVM_RUN`, as the vCPU loop sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// Port I/O (`KVM_EXIT_IO`).
    Io,
    /// MMIO (`KVM_EXIT_MMIO`).
    Mmio,
    /// HLT (`KVM_EXIT_HLT`).
    Hlt,
    /// The requested interrupt window opened (`KVM_EXIT_IRQ_WINDOW_OPEN`).
    IrqWindow,
    /// Interrupted: a kick or a timer signal (`EINTR`, or `KVM_EXIT_INTR`).
    Intr,
    /// `EAGAIN` from `KVM_RUN`.
    Again,
    /// Triple fault (`KVM_EXIT_SHUTDOWN`).
    Shutdown,
    /// KVM could not emulate (`KVM_EXIT_INTERNAL_ERROR`).
    InternalError,
    /// VM entry failed (`KVM_EXIT_FAIL_ENTRY`).
    FailEntry,
    /// Any other exit (ends the VM).
    Other,
}

impl ExitReason {
    /// Every reason, in the order of [`ExitCounters`].
    pub const ALL: [Self; 10] = [
        Self::Io,
        Self::Mmio,
        Self::Hlt,
        Self::IrqWindow,
        Self::Intr,
        Self::Again,
        Self::Shutdown,
        Self::InternalError,
        Self::FailEntry,
        Self::Other,
    ];

    /// The reason's name in the summary's `exits` and the metrics' `reason`
    /// label.
    pub fn name(self) -> &'static str {
        match self {
            Self::Io => "io",
            Self::Mmio => "mmio",
            Self::Hlt => "hlt",
            Self::IrqWindow => "irq_window",
            Self::Intr => "intr",
            Self::Again => "again",
            Self::Shutdown => "shutdown",
            Self::InternalError => "internal_error",
            Self::FailEntry => "fail_entry",
            Self::Other => "other",
        }
    }
}

/// One vCPU's exits by reason: written only by that vCPU's thread (relaxed
/// increments, no lock), read by anyone.
#[derive(Debug, Default)]
pub struct ExitCounters([AtomicU64; ExitReason::ALL.len()]);

impl ExitCounters {
    /// Counts one exit for `reason`.
    pub fn count(&self, reason: ExitReason) {
        self.0[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Exits for `reason` so far.
    pub fn get(&self, reason: ExitReason) -> u64 {
        self.0[reason as usize].load(Ordering::Relaxed)
    }

    /// Every reason's count, zeros included, by name.
    pub fn all(&self) -> BTreeMap<&'static str, u64> {
        ExitReason::ALL
            .iter()
            .map(|&reason| (reason.name(), self.get(reason)))
            .collect()
    }
}

/// The bucket bounds of the exported latency histograms, ns: 1, 2.5 and 5
/// per decade from 1 µs to 1 s (values above go to `+Inf`).
pub const LATENCY_BOUNDS_NS: [u64; 19] = [
    1_000,
    2_500,
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
];

/// One cumulative bucket of a latency histogram.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, ToSchema)]
pub struct LatencyBucket {
    /// The bucket's upper bound, ns.
    pub le_ns: u64,
    /// Values at most `le_ns` (cumulative, as Prometheus's `le` buckets).
    pub count: u64,
}

/// A latency histogram on the [`LATENCY_BOUNDS_NS`] bounds.
///
/// It is exported from a finer log-linear histogram (12.5 % resolution)
/// without guessing: a fine bucket counts toward a bound only when its
/// largest value is at most that bound, so every value counted under
/// `le_ns` is at most `le_ns`; a value less than 12.5 % below a bound may be
/// counted only under the next one.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, ToSchema)]
pub struct LatencyHistogram {
    /// Values recorded.
    pub count: u64,
    /// Their sum, ns.
    pub sum_ns: u64,
    /// Cumulative buckets on [`LATENCY_BOUNDS_NS`] (`+Inf` is `count`).
    pub buckets: Vec<LatencyBucket>,
}

impl LatencyHistogram {
    /// The histogram of fine buckets `fine` (each bucket's largest value and
    /// its count, in any order), with `sum_ns` their sum.
    pub fn from_fine(fine: impl IntoIterator<Item = (u64, u64)>, sum_ns: u64) -> Self {
        let mut buckets: Vec<LatencyBucket> = LATENCY_BOUNDS_NS
            .iter()
            .map(|&le_ns| LatencyBucket { le_ns, count: 0 })
            .collect();
        let mut count = 0u64;
        for (upper, n) in fine {
            count = count.saturating_add(n);
            for bucket in buckets.iter_mut().filter(|b| upper <= b.le_ns) {
                bucket.count = bucket.count.saturating_add(n);
            }
        }
        Self {
            count,
            sum_ns,
            buckets,
        }
    }
}

/// One vCPU's metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, ToSchema)]
pub struct VcpuMetrics {
    /// vCPU id.
    pub id: u32,
    /// Timer interrupts injected into the guest (`KVM_INTERRUPT` of the
    /// timer vector).
    pub timer_deliveries: u64,
    /// Kicks (signals out of `KVM_RUN`) other threads sent to this vCPU.
    pub kicks: u64,
    /// Exits from `KVM_RUN` by reason, every reason listed.
    #[schema(value_type = BTreeMap<String, u64>)]
    pub exits: BTreeMap<&'static str, u64>,
    /// Host lateness: timer deadline to the `KVM_INTERRUPT` that delivered it.
    pub host_lateness_ns: LatencyHistogram,
    /// Guest lateness: the deadline the guest programmed to the timer
    /// interrupt's entry, as the guest measured and reported it.
    pub guest_lateness_ns: LatencyHistogram,
    /// kperf samples not in the profile: a new stack when this vCPU's stack
    /// table had spent its memory budget and its folded entries (on-CPU
    /// timer samples).
    pub sample_drops: u64,
    /// The same for PET samples of this vCPU's threads.
    pub pet_sample_drops: u64,
    /// kperf samples counted in their thread under `[stack table full]`: a
    /// new stack when this vCPU's stack table had spent its memory budget
    /// (on-CPU timer samples).
    pub stacks_folded: u64,
    /// The same for PET samples of this vCPU's threads.
    pub pet_stacks_folded: u64,
    /// Guest trace events lost: dropped by the guest on a full event ring or
    /// skipped by the host.
    pub trace_ring_drops: u64,
    /// Timer advance learned for the running vCPU, ns (0 when off).
    pub timer_advance_running_ns: u64,
    /// Timer advance learned for the halted vCPU, ns (0 when off).
    pub timer_advance_halted_ns: u64,
    /// Time the vCPU thread waited for deadlines while the guest was
    /// running, ns: the guest time timer advance cost.
    pub timer_advance_running_wait_ns: u64,
    /// Time it waited while the guest was halted, ns (host CPU only).
    pub timer_advance_halted_wait_ns: u64,
}

/// kperf's counters, all vCPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, ToSchema)]
pub struct KperfMetrics {
    /// Samples taken (kept or dropped).
    pub samples: u64,
    /// Timer fires the vCPUs answered (one per kptimer per expiry).
    pub timer_fires: u64,
    /// PET passes completed by the PET sampler thread.
    pub pet_passes: u64,
    /// PET broadcasts (the PET handler's passes, `mycounter`, PET-C-1).
    pub pet_broadcasts: u64,
    /// Trace records not kept because the trace buffer was full.
    pub trace_drops: u64,
}

/// A VM's metrics at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, ToSchema)]
pub struct VmMetrics {
    /// The guest's uptime (device time), ns.
    pub guest_uptime_ns: u64,
    /// Per vCPU.
    pub vcpus: Vec<VcpuMetrics>,
    /// kperf, all vCPUs.
    pub kperf: KperfMetrics,
}

/// Reads the metrics of the VM `shared` belongs to, from the calling thread.
pub fn collect(shared: &VmShared) -> VmMetrics {
    let sampling = shared.sampling.as_ref();
    let vcpus = (0..shared.vcpus.len() as u32)
        .map(|id| {
            let slot = &shared.vcpus[id as usize];
            // Copied under the lock, turned into buckets after it.
            let (timer_deliveries, host, advance) = {
                let irq = slot.lock();
                (
                    irq.injected.timer,
                    irq.timer.lateness().clone(),
                    irq.advance,
                )
            };
            let waited = advance.stats();
            let guest = read_vcpu_page(&shared.mem, id)
                .map(|read| read.page)
                .unwrap_or_default();
            VcpuMetrics {
                id,
                timer_deliveries,
                kicks: slot.kicks_sent.load(Ordering::Relaxed),
                exits: slot.exits.all(),
                host_lateness_ns: LatencyHistogram::from_fine(host.buckets(), host.sum()),
                guest_lateness_ns: guest_lateness(&guest.lateness_hist, guest.lateness_sum),
                sample_drops: sampling.map_or(0, |s| s.samples.dropped(id)),
                pet_sample_drops: sampling.map_or(0, |s| s.pet.samples.dropped(id)),
                stacks_folded: sampling.map_or(0, |s| s.samples.folded(id)),
                pet_stacks_folded: sampling.map_or(0, |s| s.pet.samples.folded(id)),
                trace_ring_drops: sampling.map_or(0, |s| s.guest_events().dropped(&shared.mem, id)),
                timer_advance_running_ns: advance.advance_ns(WakePath::Running),
                timer_advance_halted_ns: advance.advance_ns(WakePath::Halted),
                timer_advance_running_wait_ns: waited.running_wait_ns,
                timer_advance_halted_wait_ns: waited.halted_wait_ns,
            }
        })
        .collect();
    VmMetrics {
        guest_uptime_ns: shared.now(),
        vcpus,
        kperf: sampling.map_or_else(KperfMetrics::default, |s| KperfMetrics {
            samples: s.samples_taken(),
            timer_fires: s.timer_fires(),
            pet_passes: s.pet.passes.load(Ordering::Relaxed),
            pet_broadcasts: s.engine().pet_broadcasts(),
            trace_drops: s.trace().map_or(0, |t| t.dropped()),
        }),
    }
}

/// The guest's lateness histogram (guest-written counts, read as they are).
fn guest_lateness(counts: &hist::Counts, sum_ns: u64) -> LatencyHistogram {
    let fine = counts
        .0
        .iter()
        .enumerate()
        .filter(|(_, &n)| n > 0)
        .map(|(index, &n)| {
            // The last bucket also holds every larger value.
            let upper = if index == hist::BUCKETS - 1 {
                u64::MAX
            } else {
                hist::upper(index)
            };
            (upper, n)
        });
    LatencyHistogram::from_fine(fine, sum_ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_exit_counters_count_each_reason_apart() {
        let counters = ExitCounters::default();
        counters.count(ExitReason::Io);
        counters.count(ExitReason::Io);
        counters.count(ExitReason::Hlt);
        let all = counters.all();
        assert_eq!(all.len(), ExitReason::ALL.len());
        assert_eq!((all["io"], all["hlt"], all["mmio"]), (2, 1, 0));
        let names: std::collections::BTreeSet<_> =
            ExitReason::ALL.iter().map(|r| r.name()).collect();
        assert_eq!(names.len(), ExitReason::ALL.len(), "names are distinct");
    }

    #[test]
    fn test_buckets_never_count_a_value_above_their_bound() {
        let mut fine = metronome_devices::LatencyHistogram::new();
        for ns in [500, 999, 1_000, 1_001, 2_400, 7_000, 3_000_000_000] {
            fine.record(ns);
        }
        let h = LatencyHistogram::from_fine(fine.buckets(), fine.sum());
        assert_eq!(h.count, 7);
        assert_eq!(h.sum_ns, fine.sum());
        let at = |le: u64| h.buckets.iter().find(|b| b.le_ns == le).unwrap().count;
        // 999, 1000 and 1001 share the fine bucket [960, 1023]: all three
        // are counted from 2.5 µs on, never under 1 µs.
        assert_eq!(at(1_000), 1);
        // 2400 is in [2304, 2559], which reaches above 2.5 µs: it is
        // counted from 5 µs on.
        assert_eq!(at(2_500), 4);
        assert_eq!(at(5_000), 5);
        assert_eq!(at(10_000), 6);
        // 3 s is beyond the last bound: only in +Inf (the count).
        assert_eq!(at(1_000_000_000), 6);
        assert!(h.buckets.windows(2).all(|w| w[0].count <= w[1].count));
    }

    #[test]
    fn test_guest_histogram_last_bucket_is_unbounded() {
        let mut counts = hist::Counts::default();
        counts.0[hist::bucket(700)] += 2;
        counts.0[hist::BUCKETS - 1] += 1;
        let h = guest_lateness(&counts, 1_400 + (1 << 40));
        assert_eq!(h.count, 3);
        assert_eq!(
            h.buckets[0],
            LatencyBucket {
                le_ns: 1_000,
                count: 2
            }
        );
        assert_eq!(h.buckets.last().unwrap().count, 2);
    }
}
