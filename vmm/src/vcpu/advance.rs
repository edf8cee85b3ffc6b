//! Timer advance: arm the host timer early by the wake latency it has
//! learned, then wait precisely for the deadline and inject at it, never
//! before (as KVM's `lapic_timer_advance_ns` does for its in-kernel LAPIC
//! timer, `arch/x86/kvm/lapic.c`).
//!
//! A vCPU's host timer wakes its thread some time after the moment it was
//! armed for (a POSIX timer's signal ending `KVM_RUN`; a timed condition
//! variable wait ending a halt). Without advance that latency is the timer
//! device's lateness. With advance the host timer is armed for `deadline -
//! advance`; when the thread wakes before the deadline it spins on the device
//! clock until the deadline and only then polls the timer device, which never
//! fires before it (VT-1): an early injection is impossible by construction.
//!
//! # Adaptation
//!
//! Each vCPU learns two advances, one per wake path ([`WakePath`]): a
//! running vCPU is woken by a signal out of `KVM_RUN`, a halted one by the end
//! of a futex wait, and the two latencies differ. At each wake by the host
//! timer the thread measures `delta = now - deadline` (negative: woke early and
//! waits; positive: woke late) and moves that path's advance by `delta / 8`
//! toward the latency just seen, as KVM's `adjust_lapic_timer_advance` moves
//! by `LAPIC_TIMER_ADVANCE_ADJUST_STEP`. Deltas under [`ADJUST_MIN_NS`] are
//! noise and deltas over [`ADJUST_MAX_NS`] a spike (the thread was preempted,
//! the machine is loaded): neither is learned from, as in KVM.
//!
//! # Bounds
//!
//! The advance stays within [`ADVANCE_MIN_NS`] and [`ADVANCE_MAX_NS`] (0 and
//! 50 us): the wait is therefore at most 50 us per delivery, and a host whose
//! wake latency is larger than that keeps being late by the rest. It starts at
//! [`ADVANCE_INIT_NS`].
//!
//! # Cost
//!
//! Waiting on a running vCPU is guest time lost: the guest was stopped at the
//! early wake and re-enters only at the deadline ([`AdvanceStats::running_wait_ns`]).
//! Waiting on a halted vCPU costs host CPU only: its guest was idle anyway
//! ([`AdvanceStats::halted_wait_ns`]).

/// The smallest advance, ns.
pub const ADVANCE_MIN_NS: u64 = 0;
/// The largest advance, ns: the longest a vCPU thread waits per delivery.
pub const ADVANCE_MAX_NS: u64 = 50_000;
/// The advance before anything was learned, ns.
pub const ADVANCE_INIT_NS: u64 = 5_000;
/// Each wake moves the advance by `1 / ADJUST_STEP` of its delta.
const ADJUST_STEP: i64 = 8;
/// Deltas smaller than this (ns, either way) are not learned from.
pub const ADJUST_MIN_NS: u64 = 100;
/// Deltas larger than this (ns, either way) are spikes, not learned from.
pub const ADJUST_MAX_NS: u64 = 2 * ADVANCE_MAX_NS;

/// How a vCPU thread is woken by its host timer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WakePath {
    /// The vCPU runs the guest: the POSIX timer's signal ends `KVM_RUN`.
    Running,
    /// The vCPU is halted: its timed wait on the condition variable ends.
    Halted,
}

/// What timer advance did on one vCPU (in the summary's `timer.advance`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct AdvanceStats {
    /// Wakes by the host timer measured against their deadline.
    pub wakes: u64,
    /// Of those, wakes before the deadline (the thread then waited).
    pub early_wakes: u64,
    /// Of those, wakes after the deadline (the advance was too small).
    pub late_wakes: u64,
    /// Of those, wakes not learned from: a spike over 100 us (or noise
    /// under 100 ns).
    pub ignored_wakes: u64,
    /// Waits for a deadline on a running vCPU.
    pub running_waits: u64,
    /// Their total, ns: guest time lost to advance.
    pub running_wait_ns: u64,
    /// Waits for a deadline on a halted vCPU.
    pub halted_waits: u64,
    /// Their total, ns: host CPU time, the guest was idle.
    pub halted_wait_ns: u64,
}

/// One vCPU's timer advance: both paths' learned advances and the counts.
/// Kept in the vCPU's [`crate::vm::shared::IrqState`], used by its thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimerAdvance {
    enabled: bool,
    running_ns: u64,
    halted_ns: u64,
    stats: AdvanceStats,
}

impl Default for TimerAdvance {
    /// Off: the host timer is armed for the deadline itself.
    fn default() -> Self {
        Self::new(false)
    }
}

impl TimerAdvance {
    /// Advance on (learning from [`ADVANCE_INIT_NS`]) or off.
    pub fn new(enabled: bool) -> Self {
        Self {
            enabled,
            running_ns: ADVANCE_INIT_NS,
            halted_ns: ADVANCE_INIT_NS,
            stats: AdvanceStats::default(),
        }
    }

    /// Whether advance is on.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The current advance for `path`, ns (0 when off).
    pub fn advance_ns(&self, path: WakePath) -> u64 {
        match (self.enabled, path) {
            (false, _) => 0,
            (true, WakePath::Running) => self.running_ns,
            (true, WakePath::Halted) => self.halted_ns,
        }
    }

    /// When to arm the host timer for `deadline` (both device time).
    pub fn arm_at(&self, path: WakePath, deadline: u64) -> u64 {
        deadline.saturating_sub(self.advance_ns(path))
    }

    /// Whether a thread at `now` waits for `deadline` rather than leaving it
    /// to the host timer: the deadline is ahead, within the advance.
    pub fn should_wait(&self, path: WakePath, now: u64, deadline: u64) -> bool {
        now < deadline && now >= self.arm_at(path, deadline)
    }

    /// A wake by the host timer armed for `deadline`, at `now`: counts it
    /// and moves the path's advance toward the latency it shows. A wake
    /// before the moment the timer was armed for cannot be that timer's (a
    /// stale signal of an earlier arming): it is not counted.
    pub fn note_wake(&mut self, path: WakePath, now: u64, deadline: u64) {
        if !self.enabled || now < self.arm_at(path, deadline) {
            return;
        }
        self.stats.wakes += 1;
        // Positive: late by that much; negative: woke that much early.
        let delta = if now >= deadline {
            self.stats.late_wakes += u64::from(now > deadline);
            i64::try_from(now - deadline).unwrap_or(i64::MAX)
        } else {
            self.stats.early_wakes += 1;
            -i64::try_from(deadline - now).unwrap_or(i64::MAX)
        };
        let size = delta.unsigned_abs();
        if !(ADJUST_MIN_NS..=ADJUST_MAX_NS).contains(&size) {
            self.stats.ignored_wakes += 1;
            return;
        }
        let advance = match path {
            WakePath::Running => &mut self.running_ns,
            WakePath::Halted => &mut self.halted_ns,
        };
        // |delta| <= ADJUST_MAX_NS and the advance <= ADVANCE_MAX_NS: no
        // overflow, and the result is clamped back into the bounds.
        let moved = *advance as i64 + delta / ADJUST_STEP;
        *advance = (moved.max(0) as u64).clamp(ADVANCE_MIN_NS, ADVANCE_MAX_NS);
    }

    /// Records a wait of `waited_ns` for a deadline on `path`.
    pub fn note_wait(&mut self, path: WakePath, waited_ns: u64) {
        let (count, total) = match path {
            WakePath::Running => (
                &mut self.stats.running_waits,
                &mut self.stats.running_wait_ns,
            ),
            WakePath::Halted => (&mut self.stats.halted_waits, &mut self.stats.halted_wait_ns),
        };
        *count += 1;
        *total = total.saturating_add(waited_ns);
    }

    /// The counts so far.
    pub fn stats(&self) -> AdvanceStats {
        self.stats
    }
}

/// Spins on `clock` until it reads at least `deadline` and returns that
/// reading: the moment to poll the timer device at. Called only within an
/// advance of the deadline, so it spins at most [`ADVANCE_MAX_NS`] (plus
/// any time the thread is preempted meanwhile).
pub fn wait_until(deadline: u64, mut clock: impl FnMut() -> u64) -> u64 {
    loop {
        let now = clock();
        if now >= deadline {
            return now;
        }
        std::hint::spin_loop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metronome_devices::{Expiry, VirtualTimer};

    /// xorshift64: deterministic pseudo-random wake latencies.
    fn xorshift(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    #[test]
    fn test_off_arms_at_the_deadline_and_never_waits() {
        let mut advance = TimerAdvance::new(false);
        assert_eq!(advance.arm_at(WakePath::Running, 1_000_000), 1_000_000);
        assert!(!advance.should_wait(WakePath::Halted, 999_999, 1_000_000));
        advance.note_wake(WakePath::Running, 1_020_000, 1_000_000);
        assert_eq!(advance.stats(), AdvanceStats::default());
        assert_eq!(advance.advance_ns(WakePath::Running), 0);
    }

    #[test]
    fn test_the_wait_window_is_the_advance_before_the_deadline() {
        let advance = TimerAdvance::new(true);
        let d = 1_000_000;
        let a = ADVANCE_INIT_NS;
        assert_eq!(advance.arm_at(WakePath::Running, d), d - a);
        assert!(!advance.should_wait(WakePath::Running, d - a - 1, d));
        assert!(advance.should_wait(WakePath::Running, d - a, d));
        assert!(advance.should_wait(WakePath::Running, d - 1, d));
        assert!(
            !advance.should_wait(WakePath::Running, d, d),
            "due: no wait"
        );
        // A deadline closer to 0 than the advance arms at 0.
        assert_eq!(advance.arm_at(WakePath::Halted, 10), 0);
    }

    #[test]
    fn test_adaptation_converges_to_the_wake_latency() {
        for (path, latency) in [(WakePath::Running, 20_000), (WakePath::Halted, 31_000)] {
            let mut advance = TimerAdvance::new(true);
            let mut d = 1_000_000;
            for _ in 0..200 {
                let woke = advance.arm_at(path, d) + latency;
                advance.note_wake(path, woke, d);
                d += 1_000_000;
            }
            let learned = advance.advance_ns(path);
            // Each step closes 1/8 of the gap; it stops within the noise band.
            assert!(
                latency - learned <= 8 * ADJUST_MIN_NS,
                "{path:?}: {learned}"
            );
            let s = advance.stats();
            assert_eq!(s.wakes, 200);
            assert!(s.late_wakes > 0 && s.ignored_wakes > 0, "{s:?}");
        }
        // The paths learn apart.
        let mut advance = TimerAdvance::new(true);
        advance.note_wake(WakePath::Halted, 1_040_000, 1_000_000);
        assert_eq!(advance.advance_ns(WakePath::Running), ADVANCE_INIT_NS);
        assert_eq!(
            advance.advance_ns(WakePath::Halted),
            ADVANCE_INIT_NS + 5_000
        );
    }

    #[test]
    fn test_adaptation_stays_within_its_bounds() {
        let mut advance = TimerAdvance::new(true);
        let mut d = 1_000_000;
        // Always 90 us late (under the spike limit): it rises to the maximum.
        for _ in 0..500 {
            let woke = advance.arm_at(WakePath::Running, d) + 90_000;
            advance.note_wake(WakePath::Running, woke, d);
            assert!(advance.advance_ns(WakePath::Running) <= ADVANCE_MAX_NS);
            d += 1_000_000;
        }
        assert_eq!(advance.advance_ns(WakePath::Running), ADVANCE_MAX_NS);
        // Always woken at the moment armed for, with no latency: every wake
        // is early by the whole advance, which falls to the minimum's band.
        for _ in 0..500 {
            advance.note_wake(WakePath::Running, advance.arm_at(WakePath::Running, d), d);
            d += 1_000_000;
        }
        assert!(advance.advance_ns(WakePath::Running) <= 8 * ADJUST_MIN_NS);
        // A random mix, spikes included, never leaves the bounds.
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..10_000 {
            let late = xorshift(&mut rng) % 400_000;
            let woke = advance.arm_at(WakePath::Halted, d) + late;
            advance.note_wake(WakePath::Halted, woke, d);
            let a = advance.advance_ns(WakePath::Halted);
            assert!((ADVANCE_MIN_NS..=ADVANCE_MAX_NS).contains(&a), "{a}");
            d += 1_000_000;
        }
    }

    #[test]
    fn test_spikes_and_noise_are_not_learned_from() {
        let mut advance = TimerAdvance::new(true);
        advance.note_wake(WakePath::Running, 1_000_000 + ADJUST_MAX_NS + 1, 1_000_000);
        advance.note_wake(WakePath::Running, 1_000_050, 1_000_000);
        advance.note_wake(WakePath::Running, 1_000_000 - 50, 1_000_000);
        assert_eq!(advance.advance_ns(WakePath::Running), ADVANCE_INIT_NS);
        // Before the moment armed for: a stale signal, not even counted.
        advance.note_wake(
            WakePath::Running,
            1_000_000 - ADVANCE_INIT_NS - 1,
            1_000_000,
        );
        let s = advance.stats();
        assert_eq!((s.wakes, s.ignored_wakes), (3, 3));
        assert_eq!((s.late_wakes, s.early_wakes), (2, 1));
    }

    /// The whole delivery with a fake clock: arm early, wake with a random
    /// latency, wait if early, poll. The device never fires before the
    /// deadline and no injection is early, whatever the latency.
    #[test]
    fn test_never_injects_before_the_deadline() {
        let mut timer = VirtualTimer::new();
        let mut advance = TimerAdvance::new(true);
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut now = 1_000u64;
        for _ in 0..20_000 {
            timer.rearm(now, 1 + xorshift(&mut rng) % 2_000_000);
            let deadline = timer.next_deadline().unwrap();
            let path = if xorshift(&mut rng).is_multiple_of(2) {
                WakePath::Running
            } else {
                WakePath::Halted
            };
            let armed = advance.arm_at(path, deadline).max(now);
            now = armed + xorshift(&mut rng) % 60_000;
            // As the vCPU thread does: decided before the wake moves the advance.
            let wait = advance.should_wait(path, now, deadline);
            advance.note_wake(path, now, deadline);
            if wait {
                let start = now;
                // A clock that advances in uneven steps.
                now = wait_until(deadline, || {
                    now += 1 + xorshift(&mut rng) % 3_000;
                    now
                });
                advance.note_wait(path, now - start);
            }
            match timer.poll(now) {
                Expiry::Fired { .. } => timer.note_injection(now),
                other => panic!("not fired at {now} for {deadline}: {other:?}"),
            }
        }
        let c = timer.counters();
        assert_eq!((c.injections, c.early_injections), (20_000, 0));
        let s = advance.stats();
        assert!(s.running_waits > 0 && s.halted_waits > 0, "{s:?}");
    }

    #[test]
    fn test_waits_are_accounted_per_path() {
        let mut advance = TimerAdvance::new(true);
        advance.note_wait(WakePath::Running, 3_000);
        advance.note_wait(WakePath::Running, 4_000);
        advance.note_wait(WakePath::Halted, 10_000);
        let s = advance.stats();
        assert_eq!((s.running_waits, s.running_wait_ns), (2, 7_000));
        assert_eq!((s.halted_waits, s.halted_wait_ns), (1, 10_000));
        let mut clock = 0;
        let reached = wait_until(10, || {
            clock += 3;
            clock
        });
        assert_eq!(reached, 12, "the first reading at or past the deadline");
    }
}
