//! Flags of one sample (`SAMPLE_FLAG_*` of `sample.h`, CFG-A-5).

/// Defer user-space parts to the thread's next return to user mode.
pub const PEND_USER: u32 = 1 << 0;
/// Sample idle threads in full.
pub const IDLE_THREADS: u32 = 1 << 1;
/// Drop both call-stack samplers.
pub const EMPTY_CALLSTACK: u32 = 1 << 2;
/// The thread resumes through a continuation.
pub const CONTINUATION: u32 = 1 << 3;
/// Not taken from an interrupt.
pub const NON_INTERRUPT: u32 = 1 << 4;
/// Include the system-wide samplers: set for the leader of a fire.
pub const SYSTEM: u32 = 1 << 5;
/// Keep only the system-wide samplers.
pub const ONLY_SYSTEM: u32 = 1 << 6;
/// Keep only the task samplers.
pub const TASK_ONLY: u32 = 1 << 7;
/// Keep only the thread samplers.
pub const THREAD_ONLY: u32 = 1 << 8;
