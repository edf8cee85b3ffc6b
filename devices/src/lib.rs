//! Metronome's device models: pure, I/O-free state machines.
//!
//! # Contract
//!
//! Nothing in this crate touches KVM, file descriptors, threads, locks or a
//! host clock. Guest register accesses come in as method calls, time comes in
//! as an argument (`now`: ns of device time since the VM was created, see
//! [`metronome_abi::mmio::TIMER_HZ`]), and the outputs are return values: the
//! next deadline to program, the vector to inject. Every device state is a
//! fixed-size value, and guest misbehaviour is counted, never a panic.
//!
//! - [`VirtualInterruptController`], one per vCPU: pending and in-service
//!   vectors with priority classes and EOI, like a minimal local APIC.
//! - [`VirtualTimer`], one per vCPU: the one-shot "intrclock" the guest's
//!   clockintr runs on (spec statements VT-1 to VT-6).
//! - [`LatencyHistogram`]: a fixed-size log-linear histogram for delivery
//!   lateness.
//!
//! # What the VMM wires up
//!
//! - Decode the [`metronome_abi::mmio::VIC_BASE`] page itself: `VIC_EOI`
//!   calls [`VirtualInterruptController::eoi`], `VIC_IPI` calls
//!   [`VirtualInterruptController::raise`] on the target vCPU's controller
//!   (and wakes that vCPU).
//! - Forward the [`metronome_abi::mmio::TIMER_BASE`] page to
//!   [`VirtualTimer::mmio_read`] and [`VirtualTimer::mmio_write`] of the
//!   accessing vCPU, then reprogram its host timer from
//!   [`VirtualTimer::next_deadline`].
//! - When the host timer expires, and before each guest entry, call
//!   [`VirtualTimer::poll`]; an [`Expiry::Fired`] raises
//!   [`metronome_abi::Vector::Timer`].
//! - Before each guest entry, inject [`VirtualInterruptController::deliverable`]
//!   if the guest can take an interrupt (`ready_for_interrupt_injection`),
//!   then [`VirtualInterruptController::acknowledge`] it; otherwise request an
//!   interrupt window.
//!
//! # Example
//!
//! One timer interrupt, from the guest's rearm to its EOI:
//!
//! ```
//! use metronome_abi::{mmio, Vector};
//! use metronome_devices::{Expiry, Raise, VirtualInterruptController, VirtualTimer};
//!
//! let mut vic = VirtualInterruptController::new();
//! let mut timer = VirtualTimer::new();
//!
//! // The guest asks for an interrupt in 1 ms.
//! timer.mmio_write(0, mmio::TIMER_REARM_NS, 1_000_000).unwrap();
//! assert_eq!(timer.next_deadline(), Some(1_000_000));
//!
//! // The host timer expires a little late.
//! let now = 1_000_250;
//! let Expiry::Fired { lateness_ns, .. } = timer.poll(now) else { panic!() };
//! assert_eq!(lateness_ns, 250);
//! assert_eq!(vic.raise(Vector::Timer as u8), Raise::Queued);
//!
//! // The guest can take it: inject, acknowledge, account.
//! let vector = vic.deliverable().unwrap();
//! assert!(vic.acknowledge(vector));
//! timer.note_injection(now);
//! assert_eq!(timer.lateness().max(), 250);
//!
//! // The guest's handler ends with an EOI.
//! assert_eq!(vic.eoi(), Some(Vector::Timer as u8));
//! ```

#![deny(missing_docs)]

pub mod histogram;
pub mod timer;
pub mod vic;

pub use histogram::LatencyHistogram;
pub use timer::{Expiry, RegisterError, TimerCounters, VirtualTimer};
pub use vic::{Raise, VicCounters, VirtualInterruptController};
