//! The per-vCPU one-shot timer: the "intrclock" of OpenBSD's clockintr.
//!
//! Contract (spec VT-1..VT-6): `rearm(n)` asks for one interrupt no earlier than
//! `n` ns from now and replaces any pending deadline; `trigger` asks for one as
//! soon as possible and also replaces a pending deadline; `rearm(0)` is a guest
//! contract violation and behaves as trigger (counted); values above
//! [`TIMER_MAX_NS`] are clamped (counted). There is one slot: no queueing, no
//! auto-repeat.
//!
//! Time is an input: every operation takes `now`, the device clock in ns. The
//! device's output is [`VirtualTimer::next_deadline`], which the VMM programs
//! into a host timer, and [`VirtualTimer::poll`], which says when the deadline
//! has passed. The device never fires before its deadline, by construction.
//!
//! Registers (`metronome_abi::mmio`, 64-bit, one write each): `TIMER_REARM_NS`,
//! `TIMER_TRIGGER`, `TIMER_CANCEL` (write only); `TIMER_NOW`, `TIMER_FREQ_HZ`,
//! `TIMER_DEADLINE` (read only). Any other access is counted and refused.

use metronome_abi::mmio::{
    TIMER_CANCEL, TIMER_DEADLINE, TIMER_FREQ_HZ, TIMER_HZ, TIMER_MAX_NS, TIMER_NOW, TIMER_REARM_NS,
    TIMER_TRIGGER,
};

/// The result of [`VirtualTimer::poll`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    /// No deadline is pending.
    Idle,
    /// The deadline is still in the future.
    NotYet {
        /// The pending deadline.
        deadline: u64,
    },
    /// The deadline passed: raise the timer interrupt. The slot is now empty.
    Fired {
        /// The deadline that passed.
        deadline: u64,
        /// `now - deadline`.
        lateness_ns: u64,
    },
}

/// A refused register access.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RegisterError {
    /// No register at this offset.
    #[error("no timer register at offset {0:#x}")]
    UnknownOffset(u64),
    /// A write to a read-only register.
    #[error("timer register at offset {0:#x} is read-only")]
    ReadOnly(u64),
    /// A read of a write-only register.
    #[error("timer register at offset {0:#x} is write-only")]
    WriteOnly(u64),
}

/// Counters of one timer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TimerCounters {
    /// Rearm operations (rearm(0) included).
    pub rearms: u64,
    /// Trigger operations (rearm(0) included, VT-6).
    pub triggers: u64,
    /// Cancel operations.
    pub cancels: u64,
    /// rearm(0): a contract violation treated as trigger.
    pub rearm_zero: u64,
    /// Rearms above the device maximum, clamped.
    pub clamped: u64,
    /// Deadlines that passed.
    pub expirations: u64,
    /// Timer interrupts the VMM injected ([`VirtualTimer::note_injection`]).
    pub injections: u64,
    /// Expiries whose interrupt was already pending ([`VirtualTimer::note_coalesced`]).
    pub coalesced: u64,
    /// Injections before their deadline. The device cannot cause one; the VMM
    /// reports this to prove it.
    pub early_injections: u64,
    /// Refused register accesses.
    pub bad_accesses: u64,
}

/// One vCPU's timer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VirtualTimer {
    deadline: Option<u64>,
    counters: TimerCounters,
}

impl VirtualTimer {
    /// An idle timer.
    pub fn new() -> Self {
        Self::default()
    }

    /// One interrupt no earlier than `delta_ns` after `now` (VT-1, VT-2).
    pub fn rearm(&mut self, now: u64, delta_ns: u64) {
        self.counters.rearms += 1;
        if delta_ns == 0 {
            self.counters.rearm_zero += 1;
            self.trigger(now);
            return;
        }
        let delta = if delta_ns > TIMER_MAX_NS {
            self.counters.clamped += 1;
            TIMER_MAX_NS
        } else {
            delta_ns
        };
        self.deadline = Some(now.saturating_add(delta));
    }

    /// One interrupt as soon as possible (VT-3).
    pub fn trigger(&mut self, now: u64) {
        self.counters.triggers += 1;
        self.deadline = Some(now);
    }

    /// No interrupt.
    pub fn cancel(&mut self) {
        self.counters.cancels += 1;
        self.deadline = None;
    }

    /// The pending deadline: the host timer should expire then.
    pub fn next_deadline(&self) -> Option<u64> {
        self.deadline
    }

    /// Fires if the deadline has passed at `now` (never before it).
    pub fn poll(&mut self, now: u64) -> Expiry {
        match self.deadline {
            None => Expiry::Idle,
            Some(deadline) if now < deadline => Expiry::NotYet { deadline },
            Some(deadline) => {
                self.deadline = None;
                self.counters.expirations += 1;
                Expiry::Fired {
                    deadline,
                    lateness_ns: now - deadline,
                }
            }
        }
    }

    /// The VMM injected the timer interrupt for `deadline` at `now`.
    pub fn note_injection(&mut self, now: u64, deadline: u64) {
        self.counters.injections += 1;
        if now < deadline {
            self.counters.early_injections += 1;
        }
    }

    /// An expiry found the timer interrupt still pending (one interrupt for both).
    pub fn note_coalesced(&mut self) {
        self.counters.coalesced += 1;
    }

    /// A guest write to the register at `offset`.
    pub fn mmio_write(&mut self, now: u64, offset: u64, value: u64) -> Result<(), RegisterError> {
        match offset {
            TIMER_REARM_NS => self.rearm(now, value),
            TIMER_TRIGGER => self.trigger(now),
            TIMER_CANCEL => self.cancel(),
            TIMER_NOW | TIMER_FREQ_HZ | TIMER_DEADLINE => {
                self.counters.bad_accesses += 1;
                return Err(RegisterError::ReadOnly(offset));
            }
            _ => {
                self.counters.bad_accesses += 1;
                return Err(RegisterError::UnknownOffset(offset));
            }
        }
        Ok(())
    }

    /// A guest read of the register at `offset`.
    pub fn mmio_read(&mut self, now: u64, offset: u64) -> Result<u64, RegisterError> {
        match offset {
            TIMER_NOW => Ok(now),
            TIMER_FREQ_HZ => Ok(TIMER_HZ),
            TIMER_DEADLINE => Ok(self.deadline.unwrap_or(u64::MAX)),
            TIMER_REARM_NS | TIMER_TRIGGER | TIMER_CANCEL => {
                self.counters.bad_accesses += 1;
                Err(RegisterError::WriteOnly(offset))
            }
            _ => {
                self.counters.bad_accesses += 1;
                Err(RegisterError::UnknownOffset(offset))
            }
        }
    }

    /// The counters.
    pub fn counters(&self) -> TimerCounters {
        self.counters
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_vt1_never_fires_before_the_deadline() {
        let mut timer = VirtualTimer::new();
        let mut seed: u64 = 0x9e37_79b9;
        let mut now = 1_000u64;
        for _ in 0..100_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let n = 1 + seed % 1_000_000_000;
            timer.rearm(now, n);
            let armed_at = now;
            // Poll at a few random points; it may only fire at or after armed_at + n.
            loop {
                now += 1 + (seed >> 20) % (n / 3 + 1);
                match timer.poll(now) {
                    Expiry::Fired { deadline, .. } => {
                        assert_eq!(deadline, armed_at + n);
                        assert!(now - armed_at >= n);
                        break;
                    }
                    Expiry::NotYet { deadline } => assert!(now < deadline),
                    Expiry::Idle => panic!("lost the deadline"),
                }
            }
        }
        assert_eq!(timer.counters().expirations, 100_000);
    }

    #[test]
    fn test_vt2_rearm_replaces_pending_deadline() {
        let mut timer = VirtualTimer::new();
        timer.rearm(0, 1_000_000_000);
        timer.rearm(0, 1_000_000);
        assert_eq!(
            timer.poll(1_000_000),
            Expiry::Fired {
                deadline: 1_000_000,
                lateness_ns: 0
            }
        );
        assert_eq!(
            timer.poll(2_000_000_000),
            Expiry::Idle,
            "exactly one interrupt"
        );
    }

    #[test]
    fn test_vt3_trigger_replaces_pending_deadline_and_fires_now() {
        let mut timer = VirtualTimer::new();
        timer.rearm(10, 1_000_000_000);
        timer.trigger(20);
        assert_eq!(
            timer.poll(20),
            Expiry::Fired {
                deadline: 20,
                lateness_ns: 0
            }
        );
        assert_eq!(timer.poll(2_000_000_000), Expiry::Idle);
    }

    #[test]
    fn test_vt4_values_past_the_maximum_are_clamped_and_counted() {
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
    }

    #[test]
    fn test_vt6_rearm_zero_behaves_as_trigger_and_is_counted() {
        let mut timer = VirtualTimer::new();
        timer.rearm(7, 0);
        assert_eq!(timer.next_deadline(), Some(7));
        let c = timer.counters();
        assert_eq!((c.rearms, c.rearm_zero, c.triggers), (1, 1, 1));
    }

    #[test]
    fn test_cancel_clears_the_deadline() {
        let mut timer = VirtualTimer::new();
        timer.rearm(0, 100);
        timer.cancel();
        assert_eq!(timer.poll(1_000), Expiry::Idle);
    }

    #[test]
    fn test_injection_accounting_flags_early_injections() {
        let mut timer = VirtualTimer::new();
        timer.note_injection(100, 100);
        timer.note_injection(99, 100);
        timer.note_coalesced();
        let c = timer.counters();
        assert_eq!((c.injections, c.early_injections, c.coalesced), (2, 1, 1));
    }

    #[test]
    fn test_registers_decode_and_refuse_bad_accesses() {
        let mut timer = VirtualTimer::new();
        timer.mmio_write(100, TIMER_REARM_NS, 50).unwrap();
        assert_eq!(timer.mmio_read(120, TIMER_DEADLINE), Ok(150));
        assert_eq!(timer.mmio_read(120, TIMER_NOW), Ok(120));
        assert_eq!(timer.mmio_read(120, TIMER_FREQ_HZ), Ok(1_000_000_000));
        timer.mmio_write(130, TIMER_TRIGGER, 0).unwrap();
        assert_eq!(timer.next_deadline(), Some(130));
        timer.mmio_write(130, TIMER_CANCEL, 0).unwrap();
        assert_eq!(timer.mmio_read(130, TIMER_DEADLINE), Ok(u64::MAX));
        assert_eq!(
            timer.mmio_write(0, TIMER_NOW, 1),
            Err(RegisterError::ReadOnly(TIMER_NOW))
        );
        assert_eq!(
            timer.mmio_read(0, TIMER_REARM_NS),
            Err(RegisterError::WriteOnly(TIMER_REARM_NS))
        );
        assert_eq!(
            timer.mmio_write(0, 0x800, 1),
            Err(RegisterError::UnknownOffset(0x800))
        );
        assert_eq!(timer.counters().bad_accesses, 3);
    }
}
