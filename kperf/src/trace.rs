//! kdebug event ids (TR-E-1), the ids of TR-E-2, and the debug level each
//! event is recorded at (TR-E-3: [`level`]).

/// Qualifier: an event without a start or end.
pub const DBG_FUNC_NONE: u32 = 0;
/// Qualifier: the start of an interval.
pub const DBG_FUNC_START: u32 = 1;
/// Qualifier: the end of an interval.
pub const DBG_FUNC_END: u32 = 2;

/// The kperf class (`DBG_PERF`).
pub const DBG_PERF: u8 = 37;
/// kperf subclass of the generic sample events (`PERF_GENERIC`).
pub const PERF_GENERIC: u8 = 0;
/// kperf subclass of the thread-info events (`PERF_THREADINFO`).
pub const PERF_THREADINFO: u8 = 1;
/// kperf subclass of the call-stack events (`PERF_CALLSTACK`).
pub const PERF_CALLSTACK: u8 = 2;
/// kperf subclass of the timer events (`PERF_TIMER`).
pub const PERF_TIMER: u8 = 3;
/// kperf subclass of the PET events (`PERF_PET`).
pub const PERF_PET: u8 = 4;
/// kperf subclass of the AST events (`PERF_AST`).
pub const PERF_AST: u8 = 5;
/// kperf subclass of the PMC events (`PERF_KPC`).
pub const PERF_KPC: u8 = 6;
/// kperf subclass of the task events (`PERF_TASK`).
pub const PERF_TASK: u8 = 8;
/// kperf subclass of the memory-info events (`PERF_MEMINFO`).
pub const PERF_MEMINFO: u8 = 10;

/// An event id: class in bits 31..24, subclass in 23..16, code (14 bits)
/// in 15..2 and the qualifier in 1..0. Wider values are truncated to
/// their field, as `KDBG_CODE` does.
pub const fn kdebug_id(class: u8, subclass: u8, code: u16, qualifier: u32) -> u32 {
    (class as u32) << 24
        | (subclass as u32) << 16
        | ((code as u32) & 0x3fff) << 2
        | (qualifier & 0x3)
}

/// The id of a kperf event of `subclass` with `code`, no qualifier.
const fn perf(subclass: u8, code: u16) -> u32 {
    kdebug_id(DBG_PERF, subclass, code, DBG_FUNC_NONE)
}

/// `PERF_GEN_EVENT`: brackets one sample (TR-P-4).
pub const GEN_EVENT: u32 = perf(PERF_GENERIC, 0);
/// `PERF_TI_SAMPLE`: a thread-info sample begins.
pub const TI_SAMPLE: u32 = perf(PERF_THREADINFO, 0);
/// `PERF_TI_DATA`: the thread-info record (CFG-A-6).
pub const TI_DATA: u32 = perf(PERF_THREADINFO, 1);
/// `PERF_TI_SNAPDATA`: the thread-snapshot record (`th_snapshot`).
pub const TI_SNAPDATA: u32 = perf(PERF_THREADINFO, 9);
/// `PERF_TI_INSCYCDATA`: the thread's instructions and cycles (`th_inscyc`).
pub const TI_INSCYCDATA: u32 = perf(PERF_THREADINFO, 17);
/// `PERF_TI_SCHEDDATA_2`: the thread-scheduling record (`th_scheduling`).
pub const TI_SCHEDDATA_2: u32 = perf(PERF_THREADINFO, 19);
/// `PERF_TI_CSWITCH`: a thread switched on (TR-P-7).
pub const TI_CSWITCH: u32 = perf(PERF_THREADINFO, 5);
/// `PERF_TI_DISPPEND`: dispatch-queue info deferred to user return (KT-SM-7).
pub const TI_DISPPEND: u32 = perf(PERF_THREADINFO, 12);
/// `PERF_CS_KSAMPLE`: brackets a kernel call-stack sample.
pub const CS_KSAMPLE: u32 = perf(PERF_CALLSTACK, 0);
/// `PERF_CS_UPEND`: a user call stack deferred to user return (KT-SM-7).
pub const CS_UPEND: u32 = perf(PERF_CALLSTACK, 1);
/// `PERF_CS_USAMPLE`: brackets a user call-stack sample.
pub const CS_USAMPLE: u32 = perf(PERF_CALLSTACK, 2);
/// `PERF_CS_KDATA`: kernel call-stack frames.
pub const CS_KDATA: u32 = perf(PERF_CALLSTACK, 3);
/// `PERF_CS_UDATA`: user call-stack frames.
pub const CS_UDATA: u32 = perf(PERF_CALLSTACK, 4);
/// `PERF_CS_KHDR`: kernel call-stack header.
pub const CS_KHDR: u32 = perf(PERF_CALLSTACK, 5);
/// `PERF_CS_UHDR`: user call-stack header.
pub const CS_UHDR: u32 = perf(PERF_CALLSTACK, 6);
/// `PERF_CS_ERROR`: a call stack could not be taken.
pub const CS_ERROR: u32 = perf(PERF_CALLSTACK, 7);
/// `PERF_TM_FIRE`: a timer fired; args (timer id, 1 if the PET timer,
/// period in ns, action id) (TR-P-1). Recorded by the leader of an
/// on-CPU fire and by the PET handler (which adds a
/// [`DBG_FUNC_END`] at its end).
pub const TM_FIRE: u32 = perf(PERF_TIMER, 0);
/// `PERF_TM_SCHED`: a timer was scheduled (older kperf; not recorded here).
pub const TM_SCHED: u32 = perf(PERF_TIMER, 1);
/// `PERF_TM_HNDLR`: brackets each timer sample, with [`DBG_FUNC_START`]
/// (data level) and [`DBG_FUNC_END`] (info level) (TR-P-2).
pub const TM_HNDLR: u32 = perf(PERF_TIMER, 2);
/// `PERF_TM_PENDING` (older kperf; not recorded here).
pub const TM_PENDING: u32 = perf(PERF_TIMER, 3);
/// `PERF_TM_SKIPPED` (older kperf; not recorded here).
pub const TM_SKIPPED: u32 = perf(PERF_TIMER, 4);
/// `PERF_PET_THREAD`.
pub const PET_THREAD: u32 = perf(PERF_PET, 0);
/// `PERF_PET_ERROR`: args (error kind, code) (TR-P-6).
pub const PET_ERROR: u32 = perf(PERF_PET, 1);
/// `PERF_PET_RUN`: the PET sampler woke (TR-P-6).
pub const PET_RUN: u32 = perf(PERF_PET, 2);
/// `PERF_PET_PAUSE`.
pub const PET_PAUSE: u32 = perf(PERF_PET, 3);
/// `PERF_PET_IDLE`: the PET sampler goes to sleep (TR-P-6).
pub const PET_IDLE: u32 = perf(PERF_PET, 4);
/// `PERF_PET_SAMPLE`: brackets one PET pass; end arg = tasks (TR-P-6).
pub const PET_SAMPLE: u32 = perf(PERF_PET, 5);
/// `PERF_PET_SCHED`: the PET one-shot was re-armed; args (period,
/// adjusted period, sample duration, deadline) (TR-P-3, [`crate::PetSchedule`]).
pub const PET_SCHED: u32 = perf(PERF_PET, 6);
/// `PERF_PET_END`.
pub const PET_END: u32 = perf(PERF_PET, 7);
/// `PERF_PET_SAMPLE_TASK`: brackets one task of a PET pass (TR-P-6).
pub const PET_SAMPLE_TASK: u32 = perf(PERF_PET, 8);
/// `PERF_PET_SAMPLE_THREAD`: brackets one thread of a PET pass, or a
/// lightweight-PET self-sample (TR-P-6).
pub const PET_SAMPLE_THREAD: u32 = perf(PERF_PET, 9);
/// `PERF_AST_HNDLR`: brackets the user-return handler of deferred samples.
pub const AST_HNDLR: u32 = perf(PERF_AST, 0);
/// `PERF_KPC_DATA`: per-CPU PMC counter values (`pmc_cpu`).
pub const KPC_DATA: u32 = perf(PERF_KPC, 3);
/// `PERF_KPC_CONFIG`: the PMC configuration.
pub const KPC_CONFIG: u32 = perf(PERF_KPC, 4);
/// `PERF_KPC_DATA_THREAD`: per-thread PMC counter values (`pmc_thread`).
pub const KPC_DATA_THREAD: u32 = perf(PERF_KPC, 8);
/// `PERF_TK_SNAP_DATA`: the task-snapshot record (`tk_snapshot`).
pub const TK_SNAP_DATA: u32 = perf(PERF_TASK, 1);
/// `PERF_TK_INFO_DATA`: the task-info record (`tk_info`).
pub const TK_INFO_DATA: u32 = perf(PERF_TASK, 4);
/// `PERF_MI_DATA`: the task memory record (`meminfo`).
pub const MI_DATA: u32 = perf(PERF_MEMINFO, 1);
/// `PERF_MI_SYS_DATA`: system memory, first record.
pub const MI_SYS_DATA: u32 = perf(PERF_MEMINFO, 2);
/// `PERF_MI_SYS_DATA_2`: system memory, second record.
pub const MI_SYS_DATA_2: u32 = perf(PERF_MEMINFO, 3);
/// `PERF_MI_SYS_DATA_3`: system memory, third record.
pub const MI_SYS_DATA_3: u32 = perf(PERF_MEMINFO, 4);

/// The debug level an event is recorded at (TR-E-3, kperf's `BUF_DATA`,
/// `BUF_INFO` and `BUF_VERB`). Ordered: a trace at debug level `n` keeps
/// the events whose level is at most `n` ([`Level::records`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Always recorded (`BUF_DATA`; `kperf.debug_level` 0).
    Data = 0,
    /// Recorded at debug level 1 and above (`BUF_INFO`).
    Info = 1,
    /// Recorded at debug level 2 (`BUF_VERB`).
    Verbose = 2,
}

impl Level {
    /// The level of `kperf.debug_level` value `n` (0, 1 or 2); `None` above.
    pub const fn from_debug_level(n: u32) -> Option<Self> {
        match n {
            0 => Some(Self::Data),
            1 => Some(Self::Info),
            2 => Some(Self::Verbose),
            _ => None,
        }
    }

    /// The `kperf.debug_level` value: 0, 1 or 2.
    pub const fn debug_level(self) -> u32 {
        self as u32
    }

    /// Whether a trace at this debug level records event `id` (qualifier
    /// included): [`level`]`(id) <= self`.
    pub const fn records(self, id: u32) -> bool {
        level(id) as u32 <= self as u32
    }
}

/// The level event `id` (with its `DBG_FUNC_*` qualifier) is recorded at
/// (TR-E-3), as xnu-8019.41.5 records it:
///
/// - [`Level::Data`]: `TM_FIRE` without a qualifier and `TM_HNDLR | START`
///   (TR-P-1, TR-P-2), the sample itself (`GEN_EVENT`, TR-P-4, and its
///   payload records) and every id not listed below;
/// - [`Level::Info`]: `TM_FIRE | END` and `TM_HNDLR | END` (TR-P-1, TR-P-2),
///   `PET_SCHED` (TR-P-3), the PET sampler's `PET_IDLE`, `PET_RUN`,
///   `PET_SAMPLE` and `PET_ERROR` (`pet.c`), and the sample's `TI_SAMPLE`,
///   `TI_DISPPEND`, `CS_KSAMPLE`, `CS_USAMPLE`, `CS_UPEND`, `CS_ERROR` and
///   `AST_HNDLR` markers;
/// - [`Level::Verbose`]: `PET_SAMPLE_TASK` and `PET_SAMPLE_THREAD` (`pet.c`).
///
/// ```
/// use kperf::trace::{level, Level, DBG_FUNC_END, DBG_FUNC_START, TM_HNDLR};
///
/// assert_eq!(level(TM_HNDLR | DBG_FUNC_START), Level::Data);
/// assert_eq!(level(TM_HNDLR | DBG_FUNC_END), Level::Info);
/// assert!(!Level::Data.records(TM_HNDLR | DBG_FUNC_END));
/// ```
pub const fn level(id: u32) -> Level {
    let qualifier = id & 0x3;
    match id & !0x3 {
        TM_FIRE | TM_HNDLR if qualifier == DBG_FUNC_END => Level::Info,
        PET_SCHED | PET_IDLE | PET_RUN | PET_SAMPLE | PET_ERROR | TI_SAMPLE | TI_DISPPEND
        | CS_KSAMPLE | CS_USAMPLE | CS_UPEND | CS_ERROR | AST_HNDLR => Level::Info,
        PET_SAMPLE_TASK | PET_SAMPLE_THREAD => Level::Verbose,
        _ => Level::Data,
    }
}
