//! The per-vCPU one-shot timer: the "intrclock" of OpenBSD's clockintr.
//!
//! # Contract (spec 2.9, VT-1..VT-6)
//!
//! - [`VirtualTimer::rearm`]`(now, n)`: one interrupt no earlier than `n` ns
//!   after `now` (VT-1). It replaces any pending deadline: one slot, no
//!   queueing, no auto-repeat (VT-2). The device takes ns directly, so no
//!   conversion can round a deadline down (VT-4). `n` above
//!   [`TIMER_MAX_NS`] is clamped to it and counted (VT-4); `n == 0` is a guest
//!   contract violation, treated as trigger and counted (VT-6).
//! - [`VirtualTimer::trigger`]`(now)`: one interrupt as soon as possible
//!   (deadline = `now`), also replacing a pending deadline (VT-3).
//! - [`VirtualTimer::cancel`]: no interrupt.
//!
//! Time is an input: every operation takes `now`, the device clock in ns
//! since the VM was created ([`TIMER_HZ`]). The outputs are
//! [`VirtualTimer::next_deadline`], which the VMM programs into its host timer,
//! and [`VirtualTimer::poll`], which fires once the deadline has passed and
//! never before it.
//!
//! # Registers
//!
//! Offsets are relative to [`metronome_abi::mmio::TIMER_BASE`]; every register
//! is 64 bits wide (the VMM checks the access size).
//!
//! | Offset | Access | Meaning |
//! |---|---|---|
//! | [`TIMER_REARM_NS`] | write | [`VirtualTimer::rearm`] with the value |
//! | [`TIMER_TRIGGER`] | write (value ignored) | [`VirtualTimer::trigger`] |
//! | [`TIMER_CANCEL`] | write (value ignored) | [`VirtualTimer::cancel`] |
//! | [`TIMER_NOW`] | read | `now` |
//! | [`TIMER_FREQ_HZ`] | read | [`TIMER_HZ`] |
//! | [`TIMER_DEADLINE`] | read | the pending deadline, `u64::MAX` when none |
//! | [`TIMER_RESUMES`] | read | resumes with re-initialisation so far ([`VirtualTimer::note_resume`]) |
//!
//! # What the VMM must wire up
//!
//! After every guest access, reprogram the host timer from `next_deadline()`.
//! When it expires (and before entering the guest), call `poll(now)`; on
//! [`Expiry::Fired`] raise [`metronome_abi::Vector::Timer`] in the vCPU's
//! interrupt controller. When the vector is injected, call
//! [`VirtualTimer::note_injection`]: the timer remembers which deadline the
//! pending interrupt stands for, counts an expiry that merged into it as
//! coalesced (VT-5), and records the deadline-to-injection lateness. When the
//! VM resumes with re-initialisation, call [`VirtualTimer::note_resume`].
//!
//! # Threat model
//!
//! | Guest action | Effect |
//! |---|---|
//! | rearm(0) | treated as trigger, counted in `rearm_zero` |
//! | rearm(huge) | clamped to [`TIMER_MAX_NS`], counted in `clamped`; `now + n` saturates |
//! | rearm/trigger storm | one slot: the last one wins, nothing accumulates |
//! | bad offset, read of a write-only or write of a read-only register | refused, counted in `bad_accesses` |

use metronome_abi::mmio::{
    TIMER_CANCEL, TIMER_DEADLINE, TIMER_FREQ_HZ, TIMER_HZ, TIMER_MAX_NS, TIMER_NOW, TIMER_REARM_NS,
    TIMER_RESUMES, TIMER_TRIGGER,
};

use crate::LatencyHistogram;

/// The result of [`VirtualTimer::poll`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    /// A deadline is pending and has not passed yet.
    NotYet {
        /// The pending deadline, in ns of device time.
        deadline: u64,
    },
    /// No deadline is pending.
    Idle,
    /// The deadline has passed: the VMM raises the timer vector. The slot is
    /// now empty.
    Fired {
        /// The deadline that passed, in ns of device time.
        deadline: u64,
        /// How long after the deadline the poll came: `now - deadline`.
        lateness_ns: u64,
    },
}

/// A refused guest access to a timer register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RegisterError {
    /// There is no timer register at this offset.
    #[error("No timer register at offset {0:#x}")]
    UnknownOffset(u64),
    /// The guest wrote a read-only register.
    #[error("Timer register at offset {0:#x} is read-only")]
    ReadOnly(u64),
    /// The guest read a write-only register.
    #[error("Timer register at offset {0:#x} is write-only")]
    WriteOnly(u64),
}

/// Event counts of one [`VirtualTimer`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TimerCounters {
    /// Rearms, `rearm(0)` and clamped ones included.
    pub rearms: u64,
    /// Triggers (a `rearm(0)` is counted in `rearm_zero`, not here).
    pub triggers: u64,
    /// Cancels.
    pub cancels: u64,
    /// Rearms with 0 ns, treated as trigger (VT-6).
    pub rearm_zero: u64,
    /// Rearms above [`TIMER_MAX_NS`], clamped to it (VT-4).
    pub clamped: u64,
    /// Deadlines that passed ([`Expiry::Fired`]).
    pub expirations: u64,
    /// Timer vectors the VMM injected ([`VirtualTimer::note_injection`]).
    pub injections: u64,
    /// Expirations while an earlier one still waited for its injection: they
    /// merge into that one interrupt (VT-5).
    pub coalesced: u64,
    /// Injections noted at a time before their deadline: 0 unless the VMM's
    /// clock went backwards or it injected without a poll (VT-1).
    pub early_injections: u64,
    /// Resumes with re-initialisation ([`VirtualTimer::note_resume`]).
    pub resumes: u64,
    /// Refused register accesses.
    pub bad_accesses: u64,
}

/// One vCPU's one-shot timer.
///
/// # Example
///
/// ```
/// use metronome_devices::{Expiry, VirtualTimer};
///
/// let mut timer = VirtualTimer::new();
/// timer.rearm(1_000, 500);
/// assert_eq!(timer.next_deadline(), Some(1_500));
/// assert_eq!(timer.poll(1_499), Expiry::NotYet { deadline: 1_500 });
/// assert_eq!(timer.poll(1_510), Expiry::Fired { deadline: 1_500, lateness_ns: 10 });
/// assert_eq!(timer.poll(2_000), Expiry::Idle);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VirtualTimer {
    /// The single pending deadline, in ns of device time.
    deadline: Option<u64>,
    /// The deadline of the expiry whose interrupt is raised but not yet injected.
    awaiting_injection: Option<u64>,
    /// Deadline-to-injection lateness, ns.
    lateness: LatencyHistogram,
    counters: TimerCounters,
}

impl VirtualTimer {
    /// An idle timer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks for one interrupt no earlier than `delta_ns` after `now`,
    /// replacing any pending deadline (VT-1, VT-2).
    ///
    /// `delta_ns == 0` behaves as [`trigger`](Self::trigger) and is counted in
    /// `rearm_zero` (VT-6); `delta_ns` above [`TIMER_MAX_NS`] is clamped and
    /// counted in `clamped` (VT-4). The deadline saturates at `u64::MAX`.
    pub fn rearm(&mut self, now: u64, delta_ns: u64) {
        self.counters.rearms += 1;
        if delta_ns == 0 {
            self.counters.rearm_zero += 1;
        }
        let delta_ns = if delta_ns > TIMER_MAX_NS {
            self.counters.clamped += 1;
            TIMER_MAX_NS
        } else {
            delta_ns
        };
        self.deadline = Some(now.saturating_add(delta_ns));
    }

    /// Asks for one interrupt as soon as possible (deadline = `now`),
    /// replacing any pending deadline (VT-3).
    pub fn trigger(&mut self, now: u64) {
        self.counters.triggers += 1;
        self.deadline = Some(now);
    }

    /// Clears the pending deadline, if any.
    pub fn cancel(&mut self) {
        self.counters.cancels += 1;
        self.deadline = None;
    }

    /// The pending deadline in ns of device time: when the VMM's host timer
    /// should expire. `None` when idle.
    pub fn next_deadline(&self) -> Option<u64> {
        self.deadline
    }

    /// Fires if a deadline is pending and `now` has reached it, emptying the
    /// slot. Never fires before the deadline (VT-1). An expiry while an earlier
    /// one still waits for its injection is counted as coalesced: the pending
    /// interrupt stands for both (VT-5).
    pub fn poll(&mut self, now: u64) -> Expiry {
        match self.deadline {
            None => Expiry::Idle,
            Some(deadline) if now < deadline => Expiry::NotYet { deadline },
            Some(deadline) => {
                self.deadline = None;
                self.counters.expirations += 1;
                if self.awaiting_injection.is_some() {
                    self.counters.coalesced += 1;
                } else {
                    self.awaiting_injection = Some(deadline);
                }
                Expiry::Fired {
                    deadline,
                    lateness_ns: now - deadline,
                }
            }
        }
    }

    /// Records that the VMM injected the timer vector at `now`: the lateness
    /// from the deadline that interrupt stands for, or `early_injections` if
    /// `now` is before it. An injection with no expiry waiting (the VMM raised
    /// the vector on its own) is counted but has no lateness.
    pub fn note_injection(&mut self, now: u64) {
        self.counters.injections += 1;
        if let Some(deadline) = self.awaiting_injection.take() {
            if now < deadline {
                self.counters.early_injections += 1;
            }
            self.lateness.record(now.saturating_sub(deadline));
        }
    }

    /// Records a resume with re-initialisation: [`TIMER_RESUMES`] counts them.
    pub fn note_resume(&mut self) {
        self.counters.resumes += 1;
    }

    /// Deadline-to-injection lateness of every injection so far, ns.
    pub fn lateness(&self) -> &LatencyHistogram {
        &self.lateness
    }

    /// Decodes a guest write of `value` to the register at `offset` (relative
    /// to the timer page).
    ///
    /// # Errors
    ///
    /// [`RegisterError::ReadOnly`] or [`RegisterError::UnknownOffset`]; either
    /// is counted in `bad_accesses` and changes nothing else.
    pub fn mmio_write(&mut self, now: u64, offset: u64, value: u64) -> Result<(), RegisterError> {
        match offset {
            TIMER_REARM_NS => self.rearm(now, value),
            TIMER_TRIGGER => self.trigger(now),
            TIMER_CANCEL => self.cancel(),
            TIMER_NOW | TIMER_FREQ_HZ | TIMER_DEADLINE | TIMER_RESUMES => {
                return Err(self.refuse(RegisterError::ReadOnly(offset)))
            }
            _ => return Err(self.refuse(RegisterError::UnknownOffset(offset))),
        }
        Ok(())
    }

    /// Decodes a guest read of the register at `offset` (relative to the timer
    /// page). Takes `&mut self` only to count refused reads.
    ///
    /// # Errors
    ///
    /// [`RegisterError::WriteOnly`] or [`RegisterError::UnknownOffset`]; either
    /// is counted in `bad_accesses`.
    pub fn mmio_read(&mut self, now: u64, offset: u64) -> Result<u64, RegisterError> {
        match offset {
            TIMER_NOW => Ok(now),
            TIMER_FREQ_HZ => Ok(TIMER_HZ),
            // The ABI's documented sentinel for "no deadline".
            TIMER_DEADLINE => Ok(self.deadline.unwrap_or(u64::MAX)),
            TIMER_RESUMES => Ok(self.counters.resumes),
            TIMER_REARM_NS | TIMER_TRIGGER | TIMER_CANCEL => {
                Err(self.refuse(RegisterError::WriteOnly(offset)))
            }
            _ => Err(self.refuse(RegisterError::UnknownOffset(offset))),
        }
    }

    /// The event counts so far.
    pub fn counters(&self) -> TimerCounters {
        self.counters
    }

    /// Counts a refused access and passes its error through.
    fn refuse(&mut self, error: RegisterError) -> RegisterError {
        self.counters.bad_accesses += 1;
        error
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift64 (Marsaglia 2003): deterministic randomness without crates.
    fn xorshift(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    #[test]
    fn test_vt1_never_fires_before_the_deadline() {
        let mut timer = VirtualTimer::new();
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut now = 1_000u64;
        for _ in 0..100_000 {
            let n = 1 + xorshift(&mut rng) % 1_000_000_000;
            let armed_at = now;
            timer.rearm(armed_at, n);
            // A fake clock advancing in random steps, often past the deadline.
            loop {
                now += 1 + xorshift(&mut rng) % (n / 2 + 1);
                match timer.poll(now) {
                    Expiry::Fired {
                        deadline,
                        lateness_ns,
                    } => {
                        assert_eq!(deadline, armed_at + n);
                        assert!(now - armed_at >= n);
                        assert_eq!(lateness_ns, now - deadline);
                        timer.note_injection(now);
                        break;
                    }
                    Expiry::NotYet { deadline } => assert!(now < deadline),
                    Expiry::Idle => panic!("deadline lost"),
                }
            }
        }
        let c = timer.counters();
        assert_eq!((c.expirations, c.injections), (100_000, 100_000));
        assert_eq!((c.early_injections, c.clamped, c.coalesced), (0, 0, 0));
        assert_eq!(timer.lateness().count(), 100_000);
    }

    #[test]
    fn test_vt1_fires_exactly_at_the_deadline() {
        let mut timer = VirtualTimer::new();
        timer.rearm(100, 1);
        assert_eq!(timer.poll(100), Expiry::NotYet { deadline: 101 });
        assert_eq!(
            timer.poll(101),
            Expiry::Fired {
                deadline: 101,
                lateness_ns: 0
            }
        );
    }

    #[test]
    fn test_vt2_rearm_replaces_pending_deadline() {
        let mut timer = VirtualTimer::new();
        timer.rearm(0, 1_000_000_000);
        timer.rearm(0, 1_000_000);
        assert_eq!(
            timer.poll(999_999),
            Expiry::NotYet {
                deadline: 1_000_000
            }
        );
        assert!(matches!(
            timer.poll(1_000_000),
            Expiry::Fired {
                deadline: 1_000_000,
                ..
            }
        ));
        // Exactly one interrupt: nothing at 1 s.
        assert_eq!(timer.poll(1_000_000_000), Expiry::Idle);
        assert_eq!(timer.counters().expirations, 1);
    }

    #[test]
    fn test_vt2_rearm_can_move_deadline_later() {
        let mut timer = VirtualTimer::new();
        timer.rearm(0, 1_000);
        timer.rearm(500, 1_000);
        assert_eq!(timer.poll(1_000), Expiry::NotYet { deadline: 1_500 });
    }

    #[test]
    fn test_vt3_trigger_replaces_pending_deadline() {
        let mut timer = VirtualTimer::new();
        timer.rearm(10, 1_000_000_000);
        timer.trigger(20);
        assert_eq!(timer.next_deadline(), Some(20));
        assert_eq!(
            timer.poll(20),
            Expiry::Fired {
                deadline: 20,
                lateness_ns: 0
            }
        );
        assert_eq!(timer.poll(2_000_000_000), Expiry::Idle);
        assert_eq!(timer.counters().triggers, 1);
    }

    #[test]
    fn test_vt4_rearm_above_maximum_is_clamped() {
        let mut timer = VirtualTimer::new();
        timer.rearm(5, u64::MAX);
        assert_eq!(timer.next_deadline(), Some(5 + TIMER_MAX_NS));
        assert_eq!(timer.counters().clamped, 1);
        assert_eq!(
            timer.poll(5 + TIMER_MAX_NS - 1),
            Expiry::NotYet {
                deadline: 5 + TIMER_MAX_NS
            }
        );
        assert!(matches!(timer.poll(5 + TIMER_MAX_NS), Expiry::Fired { .. }));
        // The maximum itself is not clamped.
        timer.rearm(0, TIMER_MAX_NS);
        assert_eq!(timer.counters().clamped, 1);
    }

    #[test]
    fn test_vt4_deadline_saturates_at_end_of_time() {
        let mut timer = VirtualTimer::new();
        timer.rearm(u64::MAX - 10, 100);
        assert_eq!(timer.next_deadline(), Some(u64::MAX));
        assert_eq!(
            timer.poll(u64::MAX - 1),
            Expiry::NotYet { deadline: u64::MAX }
        );
    }

    #[test]
    fn test_vt6_rearm_zero_behaves_as_trigger_and_is_counted() {
        let mut timer = VirtualTimer::new();
        timer.rearm(0, 1_000_000_000);
        timer.rearm(7, 0);
        assert_eq!(timer.next_deadline(), Some(7));
        assert_eq!(
            timer.poll(7),
            Expiry::Fired {
                deadline: 7,
                lateness_ns: 0
            }
        );
        let c = timer.counters();
        assert_eq!((c.rearms, c.rearm_zero, c.triggers), (2, 1, 0));
    }

    #[test]
    fn test_cancel_clears_the_deadline() {
        let mut timer = VirtualTimer::new();
        timer.rearm(0, 100);
        timer.cancel();
        assert_eq!(timer.next_deadline(), None);
        assert_eq!(timer.poll(1_000), Expiry::Idle);
        // Cancelling an idle timer is harmless.
        timer.cancel();
        let c = timer.counters();
        assert_eq!((c.cancels, c.expirations), (2, 0));
    }

    #[test]
    fn test_injection_accounting() {
        let mut timer = VirtualTimer::new();
        // On time, then 50 ns late.
        for (deadline, injected_at) in [(100, 100), (200, 250)] {
            timer.rearm(deadline - 10, 10);
            assert!(matches!(timer.poll(injected_at), Expiry::Fired { .. }));
            timer.note_injection(injected_at);
        }
        assert_eq!(timer.lateness().max(), 50);
        assert_eq!(timer.lateness().count(), 2);
        // A clock that goes backwards between the poll and the injection.
        timer.trigger(300);
        assert!(matches!(timer.poll(300), Expiry::Fired { .. }));
        timer.note_injection(299);
        // An injection no expiry asked for: counted, no lateness.
        timer.note_injection(400);
        let c = timer.counters();
        assert_eq!((c.injections, c.early_injections, c.coalesced), (4, 1, 0));
        assert_eq!(timer.lateness().count(), 3);
    }

    #[test]
    fn test_vt5_an_expiry_before_the_injection_coalesces_into_it() {
        let mut timer = VirtualTimer::new();
        timer.rearm(0, 100);
        assert!(matches!(timer.poll(100), Expiry::Fired { .. }));
        // The guest cannot take the interrupt yet; a trigger fires again.
        timer.trigger(150);
        assert!(matches!(timer.poll(160), Expiry::Fired { .. }));
        timer.note_injection(170);
        let c = timer.counters();
        assert_eq!((c.expirations, c.coalesced, c.injections), (2, 1, 1));
        // The lateness is that of the first deadline, which the interrupt stands for.
        assert_eq!(timer.lateness().max(), 70);
    }

    #[test]
    fn test_timer_resumes_register_counts_reinit_resumes() {
        let mut timer = VirtualTimer::new();
        assert_eq!(timer.mmio_read(0, TIMER_RESUMES), Ok(0));
        timer.note_resume();
        timer.note_resume();
        assert_eq!(timer.mmio_read(0, TIMER_RESUMES), Ok(2));
        assert_eq!(
            timer.mmio_write(0, TIMER_RESUMES, 0),
            Err(RegisterError::ReadOnly(TIMER_RESUMES))
        );
        assert_eq!(timer.counters().resumes, 2);
    }

    #[test]
    fn test_registers_decode() {
        let mut timer = VirtualTimer::new();
        assert_eq!(timer.mmio_read(0, TIMER_DEADLINE), Ok(u64::MAX));
        assert_eq!(timer.mmio_write(100, TIMER_REARM_NS, 50), Ok(()));
        assert_eq!(timer.mmio_read(120, TIMER_DEADLINE), Ok(150));
        assert_eq!(timer.mmio_read(120, TIMER_NOW), Ok(120));
        assert_eq!(timer.mmio_read(120, TIMER_FREQ_HZ), Ok(TIMER_HZ));
        assert_eq!(timer.mmio_write(130, TIMER_TRIGGER, 0xdead), Ok(()));
        assert_eq!(timer.next_deadline(), Some(130));
        assert_eq!(timer.mmio_write(130, TIMER_CANCEL, 0), Ok(()));
        assert_eq!(timer.mmio_read(130, TIMER_DEADLINE), Ok(u64::MAX));
        let c = timer.counters();
        assert_eq!(
            (c.rearms, c.triggers, c.cancels, c.bad_accesses),
            (1, 1, 1, 0)
        );
    }

    #[test]
    fn test_registers_refuse_bad_accesses() {
        let mut timer = VirtualTimer::new();
        timer.rearm(0, 1_000);
        let before = timer.clone();
        for offset in [TIMER_NOW, TIMER_FREQ_HZ, TIMER_DEADLINE, TIMER_RESUMES] {
            assert_eq!(
                timer.mmio_write(0, offset, 1),
                Err(RegisterError::ReadOnly(offset))
            );
        }
        for offset in [TIMER_REARM_NS, TIMER_TRIGGER, TIMER_CANCEL] {
            assert_eq!(
                timer.mmio_read(0, offset),
                Err(RegisterError::WriteOnly(offset))
            );
        }
        // Past the last register, misaligned, and far out of range.
        for offset in [0x38, 0x04, 0xfff, u64::MAX] {
            assert_eq!(
                timer.mmio_write(0, offset, 1),
                Err(RegisterError::UnknownOffset(offset))
            );
            assert_eq!(
                timer.mmio_read(0, offset),
                Err(RegisterError::UnknownOffset(offset))
            );
        }
        assert_eq!(timer.counters().bad_accesses, 15);
        assert_eq!(timer.next_deadline(), before.next_deadline());
        let c = timer.counters();
        assert_eq!((c.rearms, c.triggers, c.cancels), (1, 0, 0));
    }

    #[test]
    fn test_register_error_messages() {
        assert_eq!(
            RegisterError::UnknownOffset(0x38).to_string(),
            "No timer register at offset 0x38"
        );
    }
}
