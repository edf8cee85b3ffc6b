//! The trace's event ring: this vCPU's clockintr dispatches and context
//! switches, published for the VMM (`metronome_abi::events`).
//!
//! Only when the VMM asked for a trace (the ring's enable flag, one load);
//! otherwise each hook returns after that load. When enabled, an event costs
//! a handful of loads and stores, and a switch one more `TIMER_NOW` read
//! (the scheduler does not otherwise know the time). A full ring drops the
//! event and counts it: the guest never waits for the VMM.

use clockintr::{DispatchReport, Outcome};
use metronome_abi::events::{self, outcome, EventRing, GuestEvent};
use metronome_abi::layout;

use crate::drivers::timer;

/// vCPU `id`'s ring.
fn ring(id: u32) -> *mut EventRing {
    layout::event_ring(id) as *mut EventRing
}

/// A clockintr dispatch on vCPU `id` (the caller, interrupts off), which
/// interrupted thread `tid` (0 = idle).
pub fn dispatch(id: u32, tid: u32, report: &DispatchReport) {
    let ring = ring(id);
    // SAFETY: the ring lies in this vCPU's region, which the VMM maps.
    if !unsafe { events::enabled(ring) } {
        return;
    }
    let outcome = match report.outcome {
        Outcome::Prompt => outcome::PROMPT,
        Outcome::Early => outcome::EARLY,
        Outcome::Spurious => outcome::SPURIOUS,
    };
    let event = GuestEvent {
        time_ns: report.start,
        kind: events::KIND_DISPATCH
            | outcome << events::OUTCOME_SHIFT
            | u64::from(tid) << events::TID_SHIFT,
        arg0: report.end,
        arg1: (report.calls.hardclock & 0xffff_ffff) | report.calls.statclock << 32,
    };
    // SAFETY: this vCPU's ring, and this vCPU is its only producer: it runs
    // here with interrupts off and never nests a dispatch or a switch.
    unsafe { events::produce(ring, event) };
}

/// A context switch on vCPU `id` (the caller, interrupts off) from thread
/// `out` to thread `into` (0 = idle).
pub fn switch(id: u32, out: u32, into: u32) {
    let ring = ring(id);
    // SAFETY: the ring lies in this vCPU's region, which the VMM maps.
    if !unsafe { events::enabled(ring) } {
        return;
    }
    let event = GuestEvent {
        time_ns: timer::uptime_ns(),
        kind: events::KIND_SWITCH | u64::from(into) << events::TID_SHIFT,
        arg0: u64::from(out),
        arg1: u64::from(into),
    };
    // SAFETY: as in `dispatch`.
    unsafe { events::produce(ring, event) };
}
