//! A host stop and continue (SIGSTOP or SIGTSTP, then SIGCONT) seen by each
//! vCPU thread, told to the guest as the API's Resume tells it (CI-CPU-6).
//!
//! The guest clock is the host's `CLOCK_MONOTONIC` (AMB-6): it runs on while
//! the process is stopped. Left alone, the guest's clockintr would run every
//! hardclock missed during the stop in one dispatch (200 after 2 s at hz
//! 100). So each vCPU thread raises a resume with re-initialisation on its own
//! vCPU (`TIMER_RESUMES` and the TimerResume vector, which the guest answers
//! with `clockintr_cpu_init`) the first time it reads the device clock after
//! a continue: at its loop top, before it polls the timer and injects, and in
//! every read of its timer page, before the guest sees the time.
//!
//! A large gap between two readings alone is not a stop: a vCPU held by the
//! host or descheduled must still catch up by repetition (CI-EV-1). A gap
//! longer than [`STOP_GAP_NS`] only makes the thread look for a continue:
//! it takes a pending SIGCONT, or finds it taken and counted by another thread
//! ([`crate::stop_signals::take_continue`]); the kernel makes SIGCONT pending
//! before any stopped thread returns to user space. The vCPU was stopped iff
//! the count of continues changed since its previous reading *and* the gap
//! between the two readings is long: a continue without a gap (SIGCONT sent
//! to a process that was not stopped, taken by another thread) changes nothing.
//!
//! The guest's side (`guest-kernel/src/clock.rs`): a dispatch whose clock
//! reading jumped and finds `TIMER_RESUMES` changed leaves the clock where it
//! stood and lets the pending TimerResume re-place the events, for a stop that
//! came while the vCPU was already inside its timer interrupt.

use std::sync::atomic::{AtomicU64, Ordering};

/// A gap longer than this (ns of device time) between two readings of the
/// device clock by one vCPU thread makes it look for a continue. Shorter
/// stops are caught up by repetition like any other delay.
pub const STOP_GAP_NS: u64 = 20_000_000;

/// One vCPU thread's last reading of the device clock and the continues it
/// had seen then. Only that thread uses it (atomics, so that it can sit in
/// the shared slot where its timer page reaches it).
#[derive(Debug, Default)]
pub struct ContinueWatch {
    /// Device time of the thread's last reading.
    last_ns: AtomicU64,
    /// [`crate::stop_signals::continues`] as of that reading.
    seen: AtomicU64,
}

impl ContinueWatch {
    /// A watch that has seen `continues` (the count when the VM is built:
    /// continues before the VM existed are not its stops).
    pub fn new(continues: u64) -> Self {
        Self {
            last_ns: AtomicU64::new(0),
            seen: AtomicU64::new(continues),
        }
    }

    /// Notes the thread's reading `now` of the device clock. `before` is the
    /// count of continues loaded *before* `now` was read; after a long gap,
    /// `take` takes a pending SIGCONT and returns the count then. Returns
    /// whether the vCPU was stopped and continued since the previous reading.
    ///
    /// Why `before` must precede the reading: a continue counted after `now`
    /// was read but before the count is loaded would be recorded as seen with
    /// a short gap, and the stop would never be found.
    pub fn note(&self, now: u64, before: u64, take: impl FnOnce() -> u64) -> bool {
        let last = self.last_ns.swap(now, Ordering::Relaxed);
        let long_gap = now.saturating_sub(last) > STOP_GAP_NS;
        let continues = if long_gap { take() } else { before };
        let seen = self.seen.swap(continues, Ordering::Relaxed);
        long_gap && continues != seen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn test_a_long_gap_with_a_continue_is_a_stop_once() {
        let watch = ContinueWatch::new(3);
        assert!(!watch.note(5 * MS, 3, || 3));
        // Stopped for 2 s: a SIGCONT is pending and taken.
        assert!(watch.note(2_005 * MS, 3, || 4));
        // The next readings are short gaps: nothing more.
        assert!(!watch.note(2_006 * MS, 4, || unreachable!()));
        // Another long gap without a continue (descheduled): not a stop.
        assert!(!watch.note(2_100 * MS, 4, || 4));
    }

    #[test]
    fn test_a_long_gap_alone_is_not_a_stop() {
        // A vCPU held for 55 ms (CI-EV-1): it looks, finds no continue.
        let watch = ContinueWatch::new(0);
        watch.note(10 * MS, 0, || 0);
        let mut looked = false;
        assert!(!watch.note(65 * MS, 0, || {
            looked = true;
            0
        }));
        assert!(looked, "a long gap takes a pending SIGCONT");
    }

    #[test]
    fn test_a_continue_without_a_gap_changes_nothing() {
        // A stray SIGCONT, taken by another thread, seen on a short gap.
        let watch = ContinueWatch::new(0);
        watch.note(10 * MS, 0, || 0);
        assert!(!watch.note(11 * MS, 1, || unreachable!()));
        // ...and it is not taken for a stop at the next long gap.
        assert!(!watch.note(100 * MS, 1, || 1));
    }

    #[test]
    fn test_a_continue_taken_by_another_thread_is_found_after_the_gap() {
        let watch = ContinueWatch::new(0);
        watch.note(10 * MS, 0, || 0);
        // The count was loaded before the stop; another thread took the
        // SIGCONT meanwhile: the long gap's look finds it counted.
        assert!(watch.note(3_000 * MS, 0, || 1));
    }

    #[test]
    fn test_continues_before_the_vm_are_not_its_stops() {
        let watch = ContinueWatch::new(7);
        assert!(!watch.note(500 * MS, 7, || 7));
    }
}
