//! The per-vCPU one-shot timer (`metronome_abi::mmio::TIMER_*`), as
//! clockintr's `intrclock`.
//!
//! The page is banked: every vCPU reaches its own timer at the same address.
//! Its clock counts nanoseconds since the VM was created and is also the
//! guest's uptime clock (`nsecuptime`).

use clockintr::IntrClock;
use metronome_abi::mmio::{TIMER_BASE, TIMER_NOW, TIMER_REARM_NS, TIMER_RESUMES, TIMER_TRIGGER};

use crate::arch;

/// Guest uptime in ns: the device clock.
pub fn uptime_ns() -> u64 {
    // SAFETY: TIMER_NOW is a read-only register of this vCPU's timer bank.
    unsafe { arch::mmio_read(TIMER_BASE + TIMER_NOW) }
}

/// How many times the VMM resumed the VM with re-initialisation so far.
pub fn resumes() -> u64 {
    // SAFETY: TIMER_RESUMES is a read-only register of this vCPU's timer bank.
    unsafe { arch::mmio_read(TIMER_BASE + TIMER_RESUMES) }
}

/// This vCPU's timer as clockintr's `intrclock` (OpenBSD's `struct intrclock`).
#[derive(Debug)]
pub struct Intrclock;

impl IntrClock for Intrclock {
    fn rearm(&mut self, nsecs: u64) {
        // SAFETY: TIMER_REARM_NS is the rearm register of this vCPU's timer bank.
        unsafe { arch::mmio_write(TIMER_BASE + TIMER_REARM_NS, nsecs) };
    }

    fn trigger(&mut self) {
        // SAFETY: TIMER_TRIGGER is the trigger register of this vCPU's timer bank.
        unsafe { arch::mmio_write(TIMER_BASE + TIMER_TRIGGER, 0) };
    }
}
