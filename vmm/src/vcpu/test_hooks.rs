//! Test-only faults, off unless a hidden environment variable asks for one
//! (read once): `METRONOME_TEST_PANIC_VCPU=N` makes vCPU N's thread panic at
//! its first loop pass after 300 ms of device time, so that the integration
//! tests can show a dying vCPU thread ending the VM with a report while the
//! other threads' data is still written. Not meant for use otherwise.

use std::sync::OnceLock;

/// The hidden, test-only variable: the vCPU whose thread panics.
pub const PANIC_VCPU_ENV: &str = "METRONOME_TEST_PANIC_VCPU";

/// When the requested panic comes, device time.
const PANIC_AFTER_NS: u64 = 300_000_000;

/// The vCPU asked to panic, if any.
fn panic_vcpu() -> Option<u32> {
    static VCPU: OnceLock<Option<u32>> = OnceLock::new();
    *VCPU.get_or_init(|| std::env::var(PANIC_VCPU_ENV).ok()?.parse().ok())
}

/// Panics if the test hook asks vCPU `id` to, once `now()` (device time,
/// read only when the hook is armed for this vCPU) has passed 300 ms.
pub fn maybe_panic(id: u32, now: impl FnOnce() -> u64) {
    if panic_vcpu() == Some(id) && now() >= PANIC_AFTER_NS {
        panic!("vCPU {id}: the panic {PANIC_VCPU_ENV} asked for");
    }
}
