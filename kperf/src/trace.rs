//! kdebug event ids (TR-E-1) and the ones kptimer records (TR-E-2).

/// Qualifier: an event without a start or end.
pub const DBG_FUNC_NONE: u32 = 0;
/// Qualifier: the start of an interval.
pub const DBG_FUNC_START: u32 = 1;
/// Qualifier: the end of an interval.
pub const DBG_FUNC_END: u32 = 2;

/// The kperf class (`DBG_PERF`).
pub const DBG_PERF: u8 = 37;
/// kperf subclass of the timer events (`PERF_TIMER`).
pub const PERF_TIMER: u8 = 3;
/// kperf subclass of the PET events (`PERF_PET`).
pub const PERF_PET: u8 = 4;

/// An event id: class in bits 31..24, subclass in 23..16, code (14 bits)
/// in 15..2 and the qualifier in 1..0. Wider values are truncated to
/// their field, as `KDBG_CODE` does.
pub const fn kdebug_id(class: u8, subclass: u8, code: u16, qualifier: u32) -> u32 {
    (class as u32) << 24
        | (subclass as u32) << 16
        | ((code as u32) & 0x3fff) << 2
        | (qualifier & 0x3)
}

/// `PERF_TM_FIRE`: a timer fired; args (timer id, 1 if the PET timer,
/// period in ns, action id) (TR-P-1). Recorded by the leader of an
/// on-CPU fire and by the PET handler (which adds a
/// [`DBG_FUNC_END`] at its end).
pub const TM_FIRE: u32 = kdebug_id(DBG_PERF, PERF_TIMER, 0, DBG_FUNC_NONE);
/// `PERF_TM_HNDLR`: brackets each timer sample, with [`DBG_FUNC_START`]
/// (data level) and [`DBG_FUNC_END`] (info level) (TR-P-2).
pub const TM_HNDLR: u32 = kdebug_id(DBG_PERF, PERF_TIMER, 2, DBG_FUNC_NONE);
/// `PERF_PET_SCHED`: the PET one-shot was re-armed; args (period,
/// adjusted period, sample duration, deadline) (TR-P-3, [`crate::PetSchedule`]).
pub const PET_SCHED: u32 = kdebug_id(DBG_PERF, PERF_PET, 6, DBG_FUNC_NONE);
/// `PERF_PET_ERROR`: the PET sampler could not sample a task or a thread;
/// args (error kind, code) (TR-P-6).
pub const PET_ERROR: u32 = kdebug_id(DBG_PERF, PERF_PET, 1, DBG_FUNC_NONE);
/// `PERF_PET_RUN`: the PET sampler woke for a pass (TR-P-6).
pub const PET_RUN: u32 = kdebug_id(DBG_PERF, PERF_PET, 2, DBG_FUNC_NONE);
/// `PERF_PET_IDLE`: the PET sampler goes to sleep (TR-P-6).
pub const PET_IDLE: u32 = kdebug_id(DBG_PERF, PERF_PET, 4, DBG_FUNC_NONE);
/// `PERF_PET_SAMPLE`: brackets a PET pass; end arg: tasks sampled (TR-P-6).
pub const PET_SAMPLE: u32 = kdebug_id(DBG_PERF, PERF_PET, 5, DBG_FUNC_NONE);
/// `PERF_PET_SAMPLE_TASK`: brackets one task's sampling; end arg: its threads
/// sampled, or 1 when it could not be suspended (TR-P-6).
pub const PET_SAMPLE_TASK: u32 = kdebug_id(DBG_PERF, PERF_PET, 8, DBG_FUNC_NONE);
/// `PERF_PET_SAMPLE_THREAD`: brackets one thread's PET sample (TR-P-6).
pub const PET_SAMPLE_THREAD: u32 = kdebug_id(DBG_PERF, PERF_PET, 9, DBG_FUNC_NONE);
