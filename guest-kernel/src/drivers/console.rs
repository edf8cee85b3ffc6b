//! The console: the COM1 16550 UART the VMM emulates (`metronome_abi::port::COM1`).
//!
//! Output only. A whole buffer goes out with one `rep outsb` (one VM exit).
//! User threads format their text natively at CPL3 and hand the bytes to the
//! `write` system call; the kernel itself only writes fixed strings.

use core::sync::atomic::{AtomicBool, Ordering};

use metronome_abi::port::COM1;

use crate::arch;

/// Serialises console output across vCPUs: KVM may split one `rep outsb` into
/// several exits, so concurrent writers would interleave bytes. Only taken by
/// kernel code with interrupts disabled, so it is never held across a switch.
static CONSOLE_LOCK: AtomicBool = AtomicBool::new(false);

/// Writes bytes to the console as one unit.
pub fn write(bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    while CONSOLE_LOCK
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        arch::pause();
    }
    // SAFETY: COM1 is the console UART; writing its transmit register only outputs.
    unsafe { arch::outsb(COM1, bytes) };
    CONSOLE_LOCK.store(false, Ordering::Release);
}
