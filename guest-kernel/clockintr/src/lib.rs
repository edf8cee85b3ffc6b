//! OpenBSD 7.3's clock interrupt scheduler, `clockintr`, as a `no_std` library.
//!
//! Semantics follow `kern_clockintr.c` revision 1.5 (2023-03-14) and
//! `clockintr(9)` revision 1.3, the versions that shipped with OpenBSD 7.3
//! (spec section 2 and AMB-1): a sorted per-CPU queue of events; hardclock,
//! statclock and (when `schedhz` > 0) schedclock established per CPU;
//! catch-up by repetition; a randomized statclock; per-callback `run`
//! counting; a `spurious` statistic.
//!
//! The library has no clock and no hardware of its own. The caller provides:
//! - a [`Machine`]: `nsecuptime()` and the kernel's `hardclock`, `statclock`
//!   and `schedclock`, called with the interrupt frame in scope;
//! - an [`IntrClock`] per CPU: the one-shot interrupt clock (`rearm`, `trigger`).
//!
//! The guest kernel implements both on the VMM's timer device; the unit tests
//! implement them with a fake clock and a recording intrclock.
//!
//! Where 7.3 panics or asserts, this library returns an error ([`Error`]) and
//! the guest kernel turns it into a panic with the same message.
//!
//! Deliberate deviations, all documented where they apply:
//! - the per-CPU statistics sum includes `spurious`, as OpenBSD 7.4 does
//!   (7.3 reports 0 there; spec TR-C-3, AMB-5);
//! - `CL_RNDSTAT` is rejected for frequencies whose random mask would be 0 or
//!   wrap (above 250 MHz; AMB-4);
//! - the statclock pseudo-random generator is Park-Miller per CPU, seeded from
//!   a configurable seed and the CPU number, so that a fixed seed reproduces
//!   each CPU's sequence regardless of how CPUs interleave (CI-RND-4 allows any
//!   uniform 31-bit generator; OpenBSD shares one generator, seed 1).
//!
//! Modules (everything public is re-exported here): `config` (frequencies,
//! [`StatVar`], [`nsec_advance`]), `error`, `global` ([`ClockIntr`]), `queue`
//! ([`ClockQueue`]: events, `cpu_init`, trigger, inspection; its child
//! `dispatch` is `clockintr_dispatch`), `stats` ([`Stats`] and per-dispatch
//! reports), `rng`.

#![no_std]
#![deny(missing_docs)]

#[cfg(test)]
extern crate std;

mod config;
mod error;
mod global;
mod queue;
mod rng;
mod stats;
#[cfg(test)]
mod tests;

pub use config::{nsec_advance, Config, StatVar, CL_FLAG_MASK, CL_RNDSTAT};
pub use error::Error;
pub use global::ClockIntr;
pub use queue::{ClockQueue, Event, EventKind, MAX_EVENTS};
pub use rng::ParkMiller;
pub use stats::{Calls, DispatchReport, Outcome, Stats};

// White-box tests reach the event slots and the atomics by these names.
#[cfg(test)]
use core::sync::atomic::Ordering;
#[cfg(test)]
use queue::{HARDCLOCK, SCHEDCLOCK, STATCLOCK};

/// The one-shot interrupt clock of a CPU (`struct intrclock`).
pub trait IntrClock {
    /// Interrupt no earlier than `nsecs` (>= 1) ns from now; replaces a pending request.
    fn rearm(&mut self, nsecs: u64);
    /// Interrupt as soon as possible.
    fn trigger(&mut self);
}

/// The kernel around the scheduler: its clock and its periodic work.
pub trait Machine {
    /// `nsecuptime()`: the uptime clock, ns.
    fn nsecuptime(&mut self) -> u64;
    /// Whether the CPU runs at clock interrupt priority (asserted by dispatch).
    fn at_clock_ipl(&self) -> bool;
    /// `hardclock(frame)`.
    fn hardclock(&mut self);
    /// `statclock(frame)`.
    fn statclock(&mut self);
    /// Whether a process is current on this CPU (`curproc != NULL`).
    fn has_curproc(&self) -> bool;
    /// `schedclock(curproc)`.
    fn schedclock(&mut self);
}

/// A statclock interval observer (instrumentation: CI-RND tests on the real guest).
pub trait IntervalSink {
    /// A random statclock interval was drawn.
    fn interval(&mut self, ns: u64);
}
