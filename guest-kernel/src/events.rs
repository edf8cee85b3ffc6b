//! The trace's event ring: this vCPU's clockintr dispatches and context
//! switches, published for the VMM (`metronome_abi::events`).
//!
//! Only when the VMM asked for a trace (the ring's enable flag, one load);
//! otherwise each hook returns after that load. When enabled, an event costs
//! a handful of loads and stores, and a switch one more `TIMER_NOW` read
//! (the scheduler does not otherwise know the time), taken before the switch
//! begins ([`switch_time`]). A full ring drops the
//! event and counts it: the guest never waits for the VMM.

use core::sync::atomic::{compiler_fence, Ordering};

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

/// The uptime of a context switch about to happen on vCPU `id` (the caller,
/// interrupts off), if its ring is enabled. Call it before the switch changes
/// anything the VMM reads: the read is an MMIO exit, at which the VMM may
/// sample this vCPU, and it must find the thread, its frame and the shared
/// page all still describing the outgoing thread. The compiler fences keep
/// the kernel's plain stores on their side of the exit.
pub fn switch_time(id: u32) -> Option<u64> {
    // SAFETY: the ring lies in this vCPU's region, which the VMM maps.
    if !unsafe { events::enabled(ring(id)) } {
        return None;
    }
    compiler_fence(Ordering::SeqCst);
    let now = timer::uptime_ns();
    compiler_fence(Ordering::SeqCst);
    Some(now)
}

/// The context switch on vCPU `id` (the caller, interrupts off) from thread
/// `out` to thread `into` (0 = idle) is done; `time` is its [`switch_time`]
/// (`None`: the ring is off, nothing to do).
pub fn switch(id: u32, time: Option<u64>, out: u32, into: u32) {
    let Some(time_ns) = time else { return };
    let event = GuestEvent {
        time_ns,
        kind: events::KIND_SWITCH | u64::from(into) << events::TID_SHIFT,
        arg0: u64::from(out),
        arg1: u64::from(into),
    };
    // SAFETY: as in `dispatch`.
    unsafe { events::produce(ring(id), event) };
}
