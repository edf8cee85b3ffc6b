//! Pure device state machines for Metronome.
//!
//! Nothing here touches KVM, file descriptors, threads, locks or a host clock:
//! guest accesses come in as method calls, time comes in as an argument (ns of
//! device time), and the outputs are return values (the next deadline, the
//! vector to inject). The VMM (`vmm` crate) owns the host timers and threads,
//! wraps each device for its bus, and injects what the devices say.
//!
//! - [`VirtualInterruptController`]: one per vCPU, a minimal local-APIC-like
//!   controller: pending and in-service vectors with priority classes and EOI.
//! - [`VirtualTimer`]: one per vCPU, the one-shot "intrclock" the guest's
//!   clockintr runs on (spec statements VT-1..VT-6).
//! - [`LatencyHistogram`]: a fixed-size log-linear histogram for delivery lateness.

#![deny(missing_docs)]

pub mod histogram;
pub mod timer;
pub mod vic;

pub use histogram::LatencyHistogram;
pub use timer::{Expiry, RegisterError, TimerCounters, VirtualTimer};
pub use vic::{Raise, VicCounters, VirtualInterruptController};
