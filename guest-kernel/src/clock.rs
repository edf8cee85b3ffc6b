//! The per-vCPU timer device and the scheduler tick.
//!
//! The device (`metronome_abi::mmio::TIMER_*`) is banked: every vCPU reaches its
//! own one-shot timer at the same address. Its clock counts nanoseconds since
//! the VM was created; that is the guest's uptime clock too (one time base for
//! the clock and the timer).
//!
//! The tick runs on a fixed grid: each expiry advances the deadline by whole
//! periods past "now" and rearms for the remaining time, so ticks do not drift.

use metronome_abi::mmio::{TIMER_BASE, TIMER_NOW, TIMER_REARM_NS};

use crate::arch::{self, Frame};
use crate::percpu;

/// Guest uptime in ns: the device clock.
pub fn uptime_ns() -> u64 {
    // SAFETY: TIMER_NOW is a read-only register of this vCPU's timer bank.
    unsafe { arch::mmio_read(TIMER_BASE + TIMER_NOW) }
}

/// Asks for one timer interrupt no earlier than `ns` from now (replaces any pending one).
pub fn rearm(ns: u64) {
    // SAFETY: TIMER_REARM_NS is the rearm register of this vCPU's timer bank.
    unsafe { arch::mmio_write(TIMER_BASE + TIMER_REARM_NS, ns) };
}

/// Arms the first tick on this vCPU.
pub fn start(id: u32) {
    let boot = crate::boot_info();
    let hz = u64::from(boot.hz.max(1));
    let cpu = percpu::get(id);
    cpu.tick_period_ns = 1_000_000_000 / hz;
    let now = uptime_ns();
    cpu.next_tick_ns = now + cpu.tick_period_ns;
    rearm(cpu.tick_period_ns);
}

/// The timer interrupt: run the ticks that are due and rearm for the next one.
pub fn interrupt(id: u32, frame: &mut Frame) {
    let cpu = percpu::get(id);
    let shared = percpu::shared(id);
    shared.timer_interrupts += 1;
    let now = uptime_ns();
    if now < cpu.next_tick_ns {
        // Early (cannot happen with a correct device): rearm for the rest.
        rearm(cpu.next_tick_ns - now);
        return;
    }
    while cpu.next_tick_ns <= now {
        cpu.next_tick_ns += cpu.tick_period_ns;
        shared.ticks += 1;
    }
    crate::sched::tick(id, frame, now);
    if !percpu::get(id).exiting {
        rearm(cpu.next_tick_ns - now);
    }
}
