//! Which guest thread ran at a given instant on one vCPU: the no-exit
//! tier's samples carry a time and an instruction pointer only, and are
//! matched against the context switches the guest kernel logs
//! ([`metronome_abi::events`], `KIND_SWITCH`, device time).
//!
//! The log of one vCPU ([`SwitchLog`]) is filled by that vCPU's thread when
//! it drains the guest's event ring at its loop top, and read by the perf
//! reader thread. It knows the thread at time `t` once it is *covered* up
//! to `t`: a drain at device time `c` has seen every switch whose time the
//! guest read before `c` (the guest reads a switch's time through an MMIO
//! exit, publishes the event before its next exit, and the vCPU is out of
//! the guest at the drain). A sample beyond the coverage waits for the next
//! drain ([`Resolver`]).
//!
//! - Before the first switch logged, the vCPU ran its bring-up:
//!   [`Attribution::BeforeFirstSwitch`].
//! - The guest drops events when its ring is full (and the host skips an
//!   implausible head): from the last switch kept until the next one seen,
//!   the thread is unknown ([`SwitchLog::gap`], [`Attribution::Unknown`]).
//! - Idle is thread 0, as the guest logs it.

use std::collections::VecDeque;

/// The thread a sample is attributed to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attribution {
    /// A guest thread id (0 = the vCPU's idle context).
    Thread(u64),
    /// Before the first context switch logged on this vCPU (bring-up).
    BeforeFirstSwitch,
    /// Inside a gap of the log (the guest's ring overran).
    Unknown,
}

/// One vCPU's context switches, oldest first, and how far they are known.
#[derive(Debug, Default)]
pub struct SwitchLog {
    /// (device time, thread switched in; `None`: unknown from then on).
    entries: VecDeque<(u64, Option<u64>)>,
    /// Every switch before this device time is in `entries`.
    covered_ns: u64,
    /// Switches logged, ever.
    switches: u64,
    /// Gaps logged, ever.
    gaps: u64,
    /// The guest's and host's dropped-event count at the last drain.
    pub dropped_seen: u64,
}

impl SwitchLog {
    /// Thread `tid` was switched in at device time `time_ns`. A switch
    /// older than the newest entry (the guest's words are untrusted) is
    /// moved up to it, so the log stays in time order.
    pub fn switch(&mut self, time_ns: u64, tid: u64) {
        self.push(time_ns, Some(tid));
        self.switches += 1;
    }

    /// The thread is unknown from device time `time_ns` until the next switch.
    pub fn gap(&mut self, time_ns: u64) {
        self.push(time_ns, None);
        self.gaps += 1;
    }

    fn push(&mut self, time_ns: u64, tid: Option<u64>) {
        let newest = self.entries.back().map_or(0, |e| e.0);
        self.entries.push_back((time_ns.max(newest), tid));
    }

    /// Every switch before device time `until_ns` has been logged.
    pub fn cover(&mut self, until_ns: u64) {
        self.covered_ns = self.covered_ns.max(until_ns);
    }

    /// Whether the thread at device time `time_ns` is known for good.
    pub fn covers(&self, time_ns: u64) -> bool {
        time_ns < self.covered_ns
    }

    /// The device time up to which the log is complete.
    pub fn covered_ns(&self) -> u64 {
        self.covered_ns
    }

    /// The thread running at device time `time_ns`, as far as the log knows.
    pub fn thread_at(&self, time_ns: u64) -> Attribution {
        // The last entry at or before `time_ns`.
        let after = self.entries.partition_point(|e| e.0 <= time_ns);
        match after.checked_sub(1).map(|i| self.entries[i].1) {
            None => Attribution::BeforeFirstSwitch,
            Some(None) => Attribution::Unknown,
            Some(Some(tid)) => Attribution::Thread(tid),
        }
    }

    /// Forgets what no sample at or after `time_ns` needs: every entry but
    /// the last one at or before it.
    pub fn prune_before(&mut self, time_ns: u64) {
        let after = self.entries.partition_point(|e| e.0 <= time_ns);
        for _ in 1..after {
            self.entries.pop_front();
        }
    }

    /// (switches, gaps) logged so far.
    pub fn counts(&self) -> (u64, u64) {
        (self.switches, self.gaps)
    }

    /// Entries held now (bounded by pruning).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the log holds no entry.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// A sample waiting for its vCPU's log to cover it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pending<T> {
    /// Device time of the sample.
    pub time_ns: u64,
    /// The sample.
    pub sample: T,
}

/// One vCPU's samples on their way to a thread: in time order (one perf
/// ring per vCPU thread is in time order), held until the log covers them.
#[derive(Debug)]
pub struct Resolver<T> {
    pending: VecDeque<Pending<T>>,
    limit: usize,
    /// Samples dropped because `limit` were waiting.
    pub overflowed: u64,
}

impl<T> Resolver<T> {
    /// A resolver holding at most `limit` samples.
    pub fn new(limit: usize) -> Self {
        Self {
            pending: VecDeque::new(),
            limit,
            overflowed: 0,
        }
    }

    /// Queues a sample.
    pub fn push(&mut self, time_ns: u64, sample: T) {
        if self.pending.len() >= self.limit {
            self.overflowed += 1;
            return;
        }
        self.pending.push_back(Pending { time_ns, sample });
    }

    /// Attributes every queued sample `log` covers (every one with `all`,
    /// at the end of sampling) into `sink`, in order, then prunes the log.
    pub fn resolve(
        &mut self,
        log: &mut SwitchLog,
        all: bool,
        mut sink: impl FnMut(T, Attribution),
    ) {
        while let Some(front) = self.pending.front() {
            if !all && !log.covers(front.time_ns) {
                break;
            }
            let attribution = log.thread_at(front.time_ns);
            let Some(p) = self.pending.pop_front() else {
                break;
            };
            sink(p.sample, attribution);
        }
        let oldest = self.pending.front().map_or(log.covered_ns(), |p| p.time_ns);
        log.prune_before(oldest);
    }

    /// Samples waiting.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Whether no sample waits.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Attribution::*;

    fn log(switches: &[(u64, u64)]) -> SwitchLog {
        let mut log = SwitchLog::default();
        for &(t, tid) in switches {
            log.switch(t, tid);
        }
        log
    }

    #[test]
    fn test_a_sample_belongs_to_the_last_switch_at_or_before_it() {
        let log = log(&[(100, 3), (200, 0), (300, 4)]);
        let got: Vec<Attribution> = [50, 100, 150, 199, 200, 250, 300, 10_000]
            .iter()
            .map(|&t| log.thread_at(t))
            .collect();
        assert_eq!(
            got,
            vec![
                BeforeFirstSwitch,
                Thread(3),
                Thread(3),
                Thread(3),
                Thread(0),
                Thread(0),
                Thread(4),
                Thread(4)
            ]
        );
    }

    #[test]
    fn test_a_gap_makes_the_thread_unknown_until_the_next_switch() {
        let mut log = log(&[(100, 3)]);
        log.gap(150);
        log.switch(400, 5);
        assert_eq!(
            [120, 150, 399, 400].map(|t| log.thread_at(t)),
            [Thread(3), Unknown, Unknown, Thread(5)]
        );
        assert_eq!(log.counts(), (2, 1));
    }

    #[test]
    fn test_an_out_of_order_switch_is_kept_in_order() {
        let log = log(&[(300, 1), (200, 2)]);
        assert_eq!(
            [250, 300].map(|t| log.thread_at(t)),
            [BeforeFirstSwitch, Thread(2)]
        );
    }

    #[test]
    fn test_samples_wait_for_coverage_then_resolve_in_order_and_prune() {
        let mut log = log(&[(100, 3)]);
        let mut resolver = Resolver::new(8);
        for t in [150, 250, 350] {
            resolver.push(t, t);
        }
        let mut out = Vec::new();
        // Covered up to 200 only: the sample at 250 may belong to a switch
        // not drained yet.
        log.cover(200);
        resolver.resolve(&mut log, false, |s, a| out.push((s, a)));
        assert_eq!(out, vec![(150, Thread(3))]);
        log.switch(240, 7);
        log.cover(300);
        resolver.resolve(&mut log, false, |s, a| out.push((s, a)));
        assert_eq!(out[1..], [(250, Thread(7))]);
        // Pruned down to the entry the next sample needs.
        assert_eq!(log.len(), 1);
        // The end of sampling resolves the rest with what is known.
        resolver.resolve(&mut log, true, |s, a| out.push((s, a)));
        assert_eq!(out[2..], [(350, Thread(7))]);
        assert!(resolver.is_empty());
    }

    #[test]
    fn test_a_full_resolver_counts_what_it_drops() {
        let mut resolver = Resolver::new(2);
        for t in 0..5 {
            resolver.push(t, ());
        }
        assert_eq!((resolver.len(), resolver.overflowed), (2, 3));
    }
}
