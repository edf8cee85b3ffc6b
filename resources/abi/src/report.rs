//! What the guest reports to the VMM: values (the `report` system call),
//! an unhandled exception, a kernel panic.

use crate::InterruptFrame;

/// Largest number of key/value pairs in the [`GuestReport`].
pub const MAX_REPORTS: usize = 32;

/// The guest-wide report page at [`crate::layout::GUEST_REPORT`], written by the guest.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestReport {
    /// Guest uptime in ns when the guest decided to exit.
    pub uptime_at_exit_ns: u64,
    /// Number of valid entries in `reports`.
    pub report_count: u64,
    /// `(key, value)` pairs reported by workloads through the `report` system call.
    pub reports: [[u64; 2]; MAX_REPORTS],
}

/// What the guest reports when it takes an exception it cannot handle.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultReport {
    /// The registers at the fault, as the entry path saved them: the vector,
    /// the error code (0 when the vector has none), RIP, CS (its low two bits
    /// are the CPL), RFLAGS, RSP and the general-purpose registers.
    pub frame: InterruptFrame,
    /// CR2 (the faulting address for a page fault).
    pub cr2: u64,
    /// The vCPU that faulted.
    pub vcpu: u64,
    /// Thread id running at the fault (0 = kernel/idle).
    pub tid: u64,
}

/// What the guest reports when its kernel panics.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PanicReport {
    /// Guest address of the UTF-8 message.
    pub message_addr: u64,
    /// Length of the message in bytes (the VMM reads at most 512).
    pub message_len: u64,
    /// The vCPU that panicked.
    pub vcpu: u64,
}

/// Report keys used by the built-in workloads (the `report` system call).
pub mod report_key {
    /// Ping-pong round trips completed, summed over all partners.
    pub const PINGPONG_ROUNDS: u64 = 1;
    /// Total stress interrupts the guest counted.
    pub const STRESS_RECEIVED: u64 = 2;
    /// Work units completed by the demo threads.
    pub const DEMO_WORK: u64 = 3;
    /// Uptime (ns) when statclock profiling was switched on.
    pub const PROFIL_ON_NS: u64 = 4;
    /// Uptime (ns) when statclock profiling was switched off.
    pub const PROFIL_OFF_NS: u64 = 5;
    /// Chaos actions done by every chaos thread together.
    pub const CHAOS_ACTIONS: u64 = 6;
    /// Uptime (ns) up to which every chaos vCPU was still acting: the
    /// smallest, over the chaos vCPUs, of the end of its last chaos action.
    pub const CHAOS_ALIVE_NS: u64 = 7;
}
