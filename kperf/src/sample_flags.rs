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

/// The samplers a sample with `flags` takes of an action's `samplers`
/// (`kperf_sample_internal`, KT-SM-4): [`EMPTY_CALLSTACK`] drops both call
/// stacks, [`ONLY_SYSTEM`] keeps only the system sampler, [`THREAD_ONLY`] and
/// [`TASK_ONLY`] keep only the thread or task samplers; and system memory is
/// taken only with [`SYSTEM`] (the fire's leader, KT-SM-1).
///
/// ```
/// use kperf::{sample_flags::{sampled, PEND_USER, SYSTEM}, sampler::{SYS_MEM, TH_INFO}};
///
/// assert_eq!(sampled(SYS_MEM | TH_INFO, PEND_USER | SYSTEM), SYS_MEM | TH_INFO);
/// assert_eq!(sampled(SYS_MEM | TH_INFO, PEND_USER), TH_INFO);
/// ```
pub const fn sampled(samplers: u32, flags: u32) -> u32 {
    use crate::sampler;
    let mut what = samplers;
    if flags & EMPTY_CALLSTACK != 0 {
        what &= !(sampler::KSTACK | sampler::USTACK);
    }
    if flags & ONLY_SYSTEM != 0 {
        what &= sampler::SYSTEM_MASK;
    }
    if flags & THREAD_ONLY != 0 {
        what &= sampler::THREAD_MASK;
    }
    if flags & TASK_ONLY != 0 {
        what &= sampler::TASK_MASK;
    }
    if flags & SYSTEM == 0 {
        what &= !sampler::SYSTEM_MASK;
    }
    what
}
