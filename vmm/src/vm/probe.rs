//! What `metronome bench` reads from a running VM besides the metrics: the
//! timer devices' and the guest's fine lateness histograms, the bench
//! workload's progress, every vCPU's first clock dispatch, where guest memory
//! lies in the VMM's address space, and a tap on the deadlines the vCPUs arm
//! their host timers for (the host floor's deadlines).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::SyncSender;

use metronome_abi::{hist, layout, BenchPage};
use metronome_devices::LatencyHistogram;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::VmController;
use crate::guestmem::{read_plain, Plain};
use crate::summary::read_vcpu_page;
use crate::vcpu::advance::TimerAdvance;

// SAFETY: repr(C), one array of u64, no padding.
unsafe impl Plain for BenchPage {}

/// Every new deadline a vCPU arms its host timer for, as absolute
/// `CLOCK_MONOTONIC` ns, offered to another thread without ever blocking the
/// vCPU: a deadline the receiver has no room for is counted and dropped.
#[derive(Debug)]
pub struct DeadlineTap {
    sender: SyncSender<(u32, u64)>,
    /// Per vCPU, the last deadline offered (so a re-entry with the same
    /// deadline offers nothing). Written only by that vCPU's thread.
    last: Vec<AtomicU64>,
    /// Deadlines dropped because the channel was full.
    dropped: AtomicU64,
}

impl DeadlineTap {
    /// A tap for `vcpus` vCPUs sending `(vcpu, deadline)` on `sender`.
    pub fn new(sender: SyncSender<(u32, u64)>, vcpus: u32) -> Self {
        Self {
            sender,
            last: (0..vcpus).map(|_| AtomicU64::new(0)).collect(),
            dropped: AtomicU64::new(0),
        }
    }

    /// Called by vCPU `id`'s thread with the deadline it arms its timer for.
    pub fn offer(&self, id: u32, deadline: u64) {
        let Some(last) = self.last.get(id as usize) else {
            return;
        };
        if last.swap(deadline, Ordering::Relaxed) == deadline {
            return;
        }
        if self.sender.try_send((id, deadline)).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Deadlines dropped on a full (or closed) channel.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// One vCPU's timer lateness so far, both sides, fine-grained.
#[derive(Clone, Debug, Default)]
pub struct TimerLateness {
    /// Deadline to `KVM_INTERRUPT`, as the timer device recorded it (12.5 %
    /// resolution, exact max).
    pub host: LatencyHistogram,
    /// Deadline to interrupt entry, as the guest measured it (its 12.5 %
    /// log-linear buckets, [`hist`]).
    pub guest: hist::Counts,
    /// The guest's largest lateness, exact.
    pub guest_max: u64,
    /// Timer injections before the deadline (the device's count).
    pub early_injections: u64,
    /// Early dispatches the guest's clockintr counted.
    pub guest_early: u64,
    /// Timer interrupts injected.
    pub injections: u64,
    /// The vCPU's timer advance: what it learned and waited.
    pub advance: TimerAdvance,
}

impl VmController {
    /// Installs `tap`; `false` if one was installed before.
    pub fn set_deadline_tap(&self, tap: DeadlineTap) -> bool {
        self.shared.deadline_tap.set(tap).is_ok()
    }

    /// Deadlines the tap dropped (0 without a tap).
    pub fn deadline_tap_dropped(&self) -> u64 {
        self.shared
            .deadline_tap
            .get()
            .map_or(0, DeadlineTap::dropped)
    }

    /// vCPU `id`'s timer lateness so far; `None` for no such vCPU.
    pub fn timer_lateness(&self, id: u32) -> Option<TimerLateness> {
        let slot = self.shared.vcpus.get(id as usize)?;
        let (host, early_injections, injections, advance) = {
            let irq = slot.lock();
            (
                irq.timer.lateness().clone(),
                irq.timer.counters().early_injections,
                irq.injected.timer,
                irq.advance,
            )
        };
        let page = read_vcpu_page(&self.shared.mem, id).map(|read| read.page);
        let page = page.unwrap_or_default();
        Some(TimerLateness {
            host,
            guest: page.lateness_hist,
            guest_max: page.lateness_max,
            early_injections,
            guest_early: page.clockintr.early,
            injections,
            advance,
        })
    }

    /// The bench page's operation counts, one per vCPU.
    pub fn bench_ops(&self) -> Vec<u64> {
        let page: BenchPage =
            read_plain(&self.shared.mem, GuestAddress(layout::BENCH_PAGE)).unwrap_or_default();
        page.ops[..self.shared.vcpus.len()].to_vec()
    }

    /// Per vCPU, the uptime of its first clock dispatch (`None` before it).
    pub fn first_dispatch_ns(&self) -> Vec<Option<u64>> {
        (0..self.shared.vcpus.len() as u32)
            .map(|id| {
                read_vcpu_page(&self.shared.mem, id)
                    .map(|read| read.page.first_dispatch_ns)
                    .filter(|&ns| ns != 0)
            })
            .collect()
    }

    /// Where guest memory lies in this process: each region's host address
    /// and length in bytes.
    pub fn guest_memory_host_ranges(&self) -> Vec<(u64, u64)> {
        self.shared
            .mem
            .iter()
            .map(|region| (region.as_ptr() as u64, region.len()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_tap_offers_each_new_deadline_once_and_counts_drops() {
        let (sender, receiver) = std::sync::mpsc::sync_channel(2);
        let tap = DeadlineTap::new(sender, 2);
        tap.offer(0, 100);
        tap.offer(0, 100);
        tap.offer(1, 100);
        tap.offer(0, 200);
        tap.offer(5, 300);
        assert_eq!(receiver.try_recv(), Ok((0, 100)));
        assert_eq!(receiver.try_recv(), Ok((1, 100)));
        assert!(receiver.try_recv().is_err());
        assert_eq!(
            tap.dropped(),
            1,
            "the third deadline found the channel full"
        );
    }
}
