//! Sampler bits of an action (`SAMPLER_*` of `action.h`, CFG-A-5).

/// Thread info: pid, tid, dispatch queue, run mode.
pub const TH_INFO: u32 = 1 << 0;
/// Thread snapshot.
pub const TH_SNAPSHOT: u32 = 1 << 1;
/// Kernel call stack.
pub const KSTACK: u32 = 1 << 2;
/// User call stack.
pub const USTACK: u32 = 1 << 3;
/// Per-thread PMC counters.
pub const PMC_THREAD: u32 = 1 << 4;
/// Per-CPU PMC counters; exclusive with [`PMC_THREAD`].
pub const PMC_CPU: u32 = 1 << 5;
/// PMC configuration.
pub const PMC_CONFIG: u32 = 1 << 6;
/// Task memory info.
pub const MEMINFO: u32 = 1 << 7;
/// Thread scheduling info.
pub const TH_SCHEDULING: u32 = 1 << 8;
/// Thread dispatch-queue info.
pub const TH_DISPATCH: u32 = 1 << 9;
/// Task snapshot.
pub const TK_SNAPSHOT: u32 = 1 << 10;
/// System memory: the only "system" sampler.
pub const SYS_MEM: u32 = 1 << 11;
/// Thread instructions and cycles.
pub const TH_INSCYC: u32 = 1 << 12;
/// Task info.
pub const TK_INFO: u32 = 1 << 13;

/// The samplers that describe a task.
pub const TASK_MASK: u32 = MEMINFO | TK_SNAPSHOT | TK_INFO;
/// The samplers that describe a thread.
pub const THREAD_MASK: u32 =
    TH_INFO | TH_SNAPSHOT | KSTACK | USTACK | PMC_THREAD | TH_SCHEDULING | TH_DISPATCH | TH_INSCYC;
/// The samplers that describe the whole system.
pub const SYSTEM_MASK: u32 = SYS_MEM;
