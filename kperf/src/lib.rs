//! kperf's sampling timers (kptimer) and their configuration, as a pure engine.
//!
//! Semantics of XNU xnu-8019.41.5 `osfmk/kperf/kptimer.c`, with the
//! configuration rules of `kperf.c`, `action.c` and `pet.c` of the same
//! release (spec sections 3 and 5), translated to a VMM: a CPU is a vCPU, an
//! IPI is a kick, abs units are ns (spec section 1, AMB-18).
//!
//! # What is modelled
//!
//! - [`Kperf`]: actions (CFG-A-*), up to [`KPTIMER_MAX`] timers (CFG-T-*), the
//!   PET knobs (CFG-T-3, CFG-P-1, PET-L-3), the sampling state machine
//!   (CFG-S-1) and reset (CFG-R-1 without its ownership and ktrace parts).
//! - The on-CPU timers: start (KT-ST-*), per-vCPU expiry with dead reckoning
//!   and leader election (KT-F-*), what each vCPU samples (KT-SM-1/2), stop
//!   (KT-SP-*), idle and wake (KT-I-*), minimum periods (KT-MIN-*).
//! - The hooks of traditional PET: its one-shot deadline, its handler's
//!   kicks and the `pet_broadcasts` counter (PET-H-2, PET-C-1), its re-arm
//!   arithmetic (PET-R-1). The PET sampler itself is not here.
//!
//! Nothing here samples or traces: [`Kperf::expire`] says which timers fired,
//! which vCPU led each fire (and so records `PERF_TM_FIRE`), and what each vCPU
//! must sample ([`SampleRequest`]); the VMM does the rest.
//!
//! # What the VMM must wire up
//!
//! - **One lock.** Keep the engine in one `Mutex<Kperf>`. XNU guards a timer's
//!   global deadline with a per-timer spin lock (`kt_lock`) and everything else
//!   with the ktrace lock; the engine's only cross-vCPU critical section is
//!   [`Timer::elect`], a function of one timer's global state and one vCPU's
//!   deadline, so one mutex held across [`Kperf::expire`] (at most 8 short
//!   elections) subsumes every `kt_lock`. A VMM that ever splits the lock
//!   needs, per expiry, only the fired timer's lock around [`Timer::elect`]
//!   and the `PERF_TM_FIRE` record: a vCPU's deadline row is only touched by
//!   that vCPU's own expiry, wake and idle calls. Configuration, start, stop
//!   and reset still need exclusive access to everything (XNU's ktrace lock
//!   plus its synchronous broadcasts).
//! - **Trace order (TR-P-5).** For each [`Fire`] with `leader == true`, append
//!   `PERF_TM_FIRE` ([`Fire::tm_fire_args`]) *before releasing the lock*; take
//!   the samples (`PERF_TM_HNDLR` start/end around each) after releasing it.
//!   Any vCPU answering the same fire takes the lock first, so its handler
//!   events follow the `PERF_TM_FIRE`.
//! - **Per-vCPU host deadline.** Each vCPU has one kperf host deadline (the
//!   XNU "running timer"). Program it with what [`Kperf::set_sampling`],
//!   [`Kperf::expire`] and [`Kperf::cpu_wake`] return (`None` = cancel). When
//!   it expires, kick the vCPU; with the guest stopped, its thread calls
//!   `expire(cpu, now)`, programs `next_deadline` and takes the samples.
//!   [`Expiry::NotRunning`] and [`Expiry::NoSuchCpu`] are counted, not fatal.
//! - **Idle (KT-I-1, AMB-15).** When a vCPU halts (or the guest reports it
//!   idle), call [`Kperf::cpu_idle`] and cancel its kperf host deadline; do not
//!   kick it for on-CPU timers. When it resumes, program [`Kperf::cpu_wake`].
//! - **Start and stop.** [`Kperf::set_sampling`]`(true, ..)` returns one
//!   deadline per vCPU: kick each vCPU to program it (KT-ST-2), and arm the PET
//!   one-shot at [`Kperf::pet_deadline`] if it is `Some`. Disabling returns
//!   `None` for every vCPU: the VMM must kick every vCPU and wait until each
//!   one cancelled its host deadline before reporting success (AMB-17); an
//!   expiry that raced the stop sees the new state and samples nothing.
//!   [`Kperf::begin_shutdown`] / [`Kperf::finish_shutdown`] split the disable
//!   around that wait, as XNU's `SHUTDOWN` state does.
//! - **Traditional PET.** When the PET one-shot expires, call
//!   [`Kperf::pet_fired`]: kick the other vCPUs without waiting (each samples
//!   itself only if [`Kperf::sampling`] is still true when it runs), wake the
//!   PET sampler, then sample the handler vCPU. When the sampler is done, arm
//!   the one-shot at the deadline of [`Kperf::pet_rearm`].
//!
//! # Deviations from xnu-8019.41.5, all deliberate
//!
//! | XNU | Here |
//! |---|---|
//! | A timer fires while sampling is off: panic (KT-F-1) | [`Expiry::NotRunning`] |
//! | Enable or disable while `SHUTDOWN`: panic (CFG-S-1) | [`KperfError::Busy`] |
//! | A vCPU re-arms for the minimum over the timers that fired (KT-F-6) | minimum over all its active timers (AMB-12); [`Kperf::set_compat_fired_only`] restores XNU |
//! | `kptimer_fire` elects a leader even when the global deadline is 0 | a global deadline of 0 means "stopped": no fire, the vCPU deadline becomes "none" (KT-F-7) |
//! | PET idle rate 0: division by zero later | [`KperfError::Inval`] (AMB-13) |
//! | `kperf_action_has_non_system(0)` reads before the action array | `false` |
//! | The PET handler runs on whichever CPU the timer call picked | vCPU [`PET_HANDLER_CPU`] (AMB-7) |
//! | The start broadcast interrupts idle CPUs too | idle vCPUs are not kicked: `None`, re-derived on wake (KT-I-1) |
//!
//! PMC samplers (CFG-A-3, AMB-14) are accepted as bits; `PMC_THREAD` together
//! with `PMC_CPU` is refused with [`KperfError::Inval`], as in XNU.
//!
//! # Example
//!
//! One 1 ms timer on two vCPUs; vCPU 1 answers the fire vCPU 0 led.
//!
//! ```
//! use kperf::{sample_flags, sampler, Expiry, Kperf};
//!
//! let mut kperf = Kperf::new();
//! kperf.set_action_count(1).unwrap();
//! kperf.set_action_samplers(1, sampler::TH_INFO | sampler::KSTACK).unwrap();
//! kperf.set_timer_count(1).unwrap();
//! kperf.set_timer_period(0, 1_000_000).unwrap();
//! kperf.set_timer_action(0, 1).unwrap();
//!
//! let programs = kperf.set_sampling(true, 0, 2).unwrap();
//! assert_eq!(programs, vec![Some(1_000_000), Some(1_000_000)]);
//!
//! let Expiry::Handled { fires, next_deadline } = kperf.expire(0, 1_000_050) else { panic!() };
//! assert!(fires[0].leader);
//! let sample = fires[0].sample.unwrap();
//! assert_eq!(sample.flags, sample_flags::PEND_USER | sample_flags::SYSTEM);
//! assert_eq!(next_deadline, Some(2_000_000));
//!
//! let Expiry::Handled { fires, next_deadline } = kperf.expire(1, 1_000_090) else { panic!() };
//! assert!(!fires[0].leader);
//! assert_eq!(fires[0].sample.unwrap().flags, sample_flags::PEND_USER);
//! assert_eq!(next_deadline, Some(2_000_000));
//!
//! assert_eq!(kperf.set_sampling(false, 1_500_000, 2).unwrap(), vec![None, None]);
//! ```

#![deny(missing_docs)]

/// The most timers kperf has (`KPTIMER_MAX`, KT-S-1).
pub const KPTIMER_MAX: usize = 8;

/// The PET timer id that means "no PET timer" (`KPTIMER_PET_INACTIVE`,
/// KT-S-2); any id at or above the timer count disables PET as well (CFG-T-3).
pub const PET_TIMER_NONE: u32 = 999;

/// The most actions kperf has (`ACTION_MAX`, CFG-A-1). Action ids run from 1
/// to the count; 0 is the null action.
pub const ACTION_MAX: u32 = 32;

/// The pid filter value that matches every pid (CFG-A-1).
pub const PID_FILTER_ALL: i32 = -1;

/// The deepest user call stack an action can ask for, and the default
/// (`MAX_UCALLSTACK_FRAMES`, CFG-A-1/3).
pub const UCALLSTACK_DEPTH_MAX: u32 = 256;

/// The shallowest user call stack an action can ask for (CFG-A-3).
pub const UCALLSTACK_DEPTH_MIN: u32 = 2;

/// The deepest kernel call stack an action can ask for, and the default
/// (`MAX_KCALLSTACK_FRAMES`, CFG-A-1/3).
pub const KCALLSTACK_DEPTH_MAX: u32 = 128;

/// The shallowest kernel call stack an action can ask for (CFG-A-3).
pub const KCALLSTACK_DEPTH_MIN: u32 = 1;

/// The PET idle rate after boot and after reset (CFG-P-1).
pub const PET_DEFAULT_IDLE_RATE: u32 = 15;

/// Minimum on-CPU timer period in the foreground, in ns (x86_64 `KTPL_FG`,
/// "the minimum timer period in xnu", KT-MIN-1).
pub const MIN_PERIOD_NS: u64 = 20_000;

/// Minimum on-CPU timer period in background mode, in ns (`KTPL_BG`).
pub const MIN_BG_PERIOD_NS: u64 = 1_000_000;

/// Minimum PET timer period in the foreground, in ns (`KTPL_FG_PET`).
pub const MIN_PET_PERIOD_NS: u64 = 2_000_000;

/// Minimum PET timer period in background mode, in ns (`KTPL_BG_PET`).
pub const MIN_BG_PET_PERIOD_NS: u64 = 5_000_000;

/// The vCPU that runs the traditional PET handler and samples itself with
/// [`sample_flags::SYSTEM`] (AMB-7: the BSP).
pub const PET_HANDLER_CPU: usize = 0;

/// A vCPU's deadline for a timer that is not armed on it: XNU's
/// `EndOfAllTime`.
const NO_DEADLINE: u64 = u64::MAX;

/// Sampler bits of an action (`SAMPLER_*` of `action.h`, CFG-A-5).
pub mod sampler {
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
    pub const THREAD_MASK: u32 = TH_INFO
        | TH_SNAPSHOT
        | KSTACK
        | USTACK
        | PMC_THREAD
        | TH_SCHEDULING
        | TH_DISPATCH
        | TH_INSCYC;
    /// The samplers that describe the whole system.
    pub const SYSTEM_MASK: u32 = SYS_MEM;
}

/// Flags of one sample (`SAMPLE_FLAG_*` of `sample.h`, CFG-A-5).
pub mod sample_flags {
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
}

/// kdebug event ids (TR-E-1) and the ones kptimer records (TR-E-2).
pub mod trace {
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
    /// adjusted period, sample duration, deadline) (TR-P-3, [`super::PetSchedule`]).
    pub const PET_SCHED: u32 = kdebug_id(DBG_PERF, PERF_PET, 6, DBG_FUNC_NONE);
}

/// A refused kperf request, with the errno XNU returns for it (CFG-API-1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KperfError {
    /// `EINVAL`: an id or value out of range.
    #[error("Invalid kperf argument (EINVAL)")]
    Inval,
    /// `EBUSY`: the timers are started or sampling is on.
    #[error("kperf is busy: timers are started or sampling is on (EBUSY)")]
    Busy,
    /// `ECANCELED`: sampling cannot start without an action.
    #[error("kperf sampling cannot start without actions (ECANCELED)")]
    Canceled,
    /// `EPERM`: the caller may not configure kperf.
    #[error("Not permitted to configure kperf (EPERM)")]
    Perm,
    /// `EFAULT`: a request without its value.
    #[error("kperf request without a value (EFAULT)")]
    Fault,
    /// `ENOENT`: an unknown request.
    #[error("Unknown kperf request (ENOENT)")]
    NoEnt,
    /// `ENOMEM`: an allocation failed.
    #[error("Out of memory for kperf (ENOMEM)")]
    NoMem,
}

impl KperfError {
    /// The errno value (Linux and Darwin agree on these seven).
    pub const fn errno(self) -> i32 {
        match self {
            Self::Inval => 22,
            Self::Busy => 16,
            Self::Canceled => 125,
            Self::Perm => 1,
            Self::Fault => 14,
            Self::NoEnt => 2,
            Self::NoMem => 12,
        }
    }
}

/// The sampling state machine of CFG-S-1: `Off -> On -> Shutdown -> Off`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SamplingState {
    /// Not sampling; a timer expiry is a VMM bug ([`Expiry::NotRunning`]).
    #[default]
    Off,
    /// Sampling.
    On,
    /// Being disabled: an expiry clears its vCPU's deadlines and samples
    /// nothing (KT-F-1).
    Shutdown,
}

/// One action: what a sample records (CFG-A-1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Action {
    /// [`sampler`] bits.
    pub samplers: u32,
    /// Opaque value recorded with each sample.
    pub userdata: u32,
    /// Only sample this guest pid; [`PID_FILTER_ALL`] for every pid.
    pub pid_filter: i32,
    /// User call-stack depth in frames, 2..=256.
    pub ucallstack_depth: u32,
    /// Kernel call-stack depth in frames, 1..=128.
    pub kcallstack_depth: u32,
}

impl Default for Action {
    /// The null action, and every new action (CFG-A-1).
    fn default() -> Self {
        Self {
            samplers: 0,
            userdata: 0,
            pid_filter: PID_FILTER_ALL,
            ucallstack_depth: UCALLSTACK_DEPTH_MAX,
            kcallstack_depth: KCALLSTACK_DEPTH_MAX,
        }
    }
}

/// The read-only minimum periods in ns (KT-MIN-2, `kperf.limits.*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// `timer_min_period_ns`: on-CPU, foreground.
    pub timer_min_period_ns: u64,
    /// `timer_min_bg_period_ns`: on-CPU, background.
    pub timer_min_bg_period_ns: u64,
    /// `timer_min_pet_period_ns`: PET, foreground.
    pub timer_min_pet_period_ns: u64,
    /// `timer_min_bg_pet_period_ns`: PET, background.
    pub timer_min_bg_pet_period_ns: u64,
}

/// The minimum period in ns for a PET or on-CPU timer in foreground or
/// background mode (`kptimer_min_period_abs`, KT-MIN-1).
pub const fn min_period_ns(pet: bool, background: bool) -> u64 {
    match (pet, background) {
        (false, false) => MIN_PERIOD_NS,
        (false, true) => MIN_BG_PERIOD_NS,
        (true, false) => MIN_PET_PERIOD_NS,
        (true, true) => MIN_BG_PET_PERIOD_NS,
    }
}

/// Dead reckoning (KT-F-2): the first point of `deadline`'s grid
/// (`deadline + k * period_ns`) strictly after `now`, if `deadline` already
/// passed; otherwise `deadline` itself. `now` exactly on the grid gives
/// `now + period_ns`.
///
/// A period of 0 has no grid: `deadline` is returned unchanged. The result
/// saturates at `u64::MAX`.
///
/// ```
/// use kperf::dead_reckon;
///
/// assert_eq!(dead_reckon(100, 10, 125), 130);
/// assert_eq!(dead_reckon(100, 10, 130), 140);
/// assert_eq!(dead_reckon(100, 10, 95), 100);
/// ```
pub const fn dead_reckon(deadline: u64, period_ns: u64, now: u64) -> u64 {
    if period_ns == 0 || deadline >= now {
        return deadline;
    }
    let since = now - deadline;
    now.saturating_add(period_ns - since % period_ns)
}

/// One timer (`struct kptimer`): its configuration and its global deadline.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timer {
    /// Period in ns; 0 disables the timer.
    pub period_ns: u64,
    /// The action its samples use; 0 disables the timer at start. Not
    /// checked against the action count (CFG-T-2).
    pub action: u32,
    /// The global "current deadline" shared by all vCPUs: when the timer
    /// should next fire. 0 while the timers are stopped, and for a timer
    /// that is inactive or runs as the traditional PET one-shot.
    ///
    /// Protected by the timer's lock (XNU `kt_lock`): see [`Timer::elect`].
    pub deadline: u64,
}

/// The outcome of [`Timer::elect`] for one vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Election {
    /// This vCPU is the first to see this fire (KT-F-4): it moved the global
    /// deadline to `next_deadline`, records `PERF_TM_FIRE` and samples with
    /// [`sample_flags::SYSTEM`].
    Leader {
        /// The new deadline of the timer, globally and on this vCPU.
        next_deadline: u64,
    },
    /// Another vCPU led this fire; this vCPU adopts the global deadline,
    /// which also resynchronizes a vCPU that missed fires.
    Follower {
        /// The global deadline, now this vCPU's deadline too.
        next_deadline: u64,
    },
    /// The timer is stopped (global deadline 0) or disabled (period 0): no
    /// fire; this vCPU's deadline for it becomes "none" (KT-F-7).
    Stopped,
}

impl Timer {
    /// Leader election for a fire of this timer seen by a vCPU whose deadline
    /// `cpu_deadline` passed at `now` (`kptimer_fire`, KT-F-4/5).
    ///
    /// With `next = cpu_deadline + period`: if the global deadline is below
    /// `next`, nobody has answered this fire yet, so this vCPU leads and the
    /// global deadline becomes `next` dead-reckoned against `now`; otherwise
    /// the vCPU adopts the global deadline.
    ///
    /// # Locking
    ///
    /// This is XNU's `kt_lock` critical section: the caller must hold the
    /// lock that protects this timer's `deadline` across the call *and* across
    /// recording `PERF_TM_FIRE` when it returns [`Election::Leader`] (TR-P-5).
    pub fn elect(&mut self, cpu_deadline: u64, now: u64) -> Election {
        if self.deadline == 0 || self.period_ns == 0 {
            return Election::Stopped;
        }
        let next = cpu_deadline.saturating_add(self.period_ns);
        if self.deadline < next {
            let next_deadline = dead_reckon(next, self.period_ns, now);
            self.deadline = next_deadline;
            Election::Leader { next_deadline }
        } else {
            Election::Follower {
                next_deadline: self.deadline,
            }
        }
    }
}

/// A sample a vCPU must take of its current guest thread (KT-SM-2): trigger
/// type timer, trigger id `timer`. The VMM applies the action's samplers and
/// pid filter (KT-SM-4); an action that is 0 or beyond the count samples
/// nothing, but the `PERF_TM_HNDLR` bracket is still recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SampleRequest {
    /// The action id.
    pub action: u32,
    /// [`sample_flags`]: `PEND_USER`, plus `SYSTEM` for the leader.
    pub flags: u32,
    /// The timer id (the trigger id).
    pub timer: u32,
}

/// One timer that fired on one vCPU during [`Kperf::expire`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fire {
    /// The timer id.
    pub timer: u32,
    /// The timer's action id.
    pub action: u32,
    /// The timer's period in ns.
    pub period_ns: u64,
    /// Whether the timer is the PET timer (lightweight PET).
    pub pet: bool,
    /// Whether this vCPU led the fire: it records `PERF_TM_FIRE` under the
    /// lock (KT-F-4, TR-P-1).
    pub leader: bool,
    /// This vCPU's deadline that passed: the nominal fire time.
    pub deadline: u64,
    /// This vCPU's new deadline for the timer.
    pub next_deadline: u64,
    /// What to sample; `None` for a non-leader whose action has only system
    /// samplers (KT-SM-1).
    pub sample: Option<SampleRequest>,
}

impl Fire {
    /// The arguments of `PERF_TM_FIRE`: (timer id, 1 if the PET timer else 0,
    /// period in ns, action id) (TR-P-1).
    pub fn tm_fire_args(&self) -> [u64; 4] {
        [
            u64::from(self.timer),
            u64::from(self.pet),
            self.period_ns,
            u64::from(self.action),
        ]
    }
}

/// The result of [`Kperf::expire`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expiry {
    /// The expiry was handled: the timers that fired, and the vCPU's next
    /// kperf host deadline (`None`: cancel it). In the `Shutdown` state, or on
    /// an idle vCPU, nothing fires and the deadline is `None`.
    Handled {
        /// The timers that fired on this vCPU, by timer id.
        fires: Vec<Fire>,
        /// The next host deadline to program for this vCPU.
        next_deadline: Option<u64>,
    },
    /// Sampling is off: a kperf host deadline outlived the stop. XNU panics;
    /// the VMM counts it and cancels the deadline.
    NotRunning,
    /// The vCPU number is beyond the vCPUs the timers were started on.
    NoSuchCpu,
}

/// What the traditional PET handler asks for (PET-H-2, AMB-7).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PetFire {
    /// The PET timer id.
    pub timer: u32,
    /// The PET timer's action.
    pub action: u32,
    /// The PET timer's period in ns.
    pub period_ns: u64,
    /// The vCPUs to kick without waiting, each to take `remote_sample` of
    /// itself if sampling is still on when it runs.
    pub remote_cpus: Vec<usize>,
    /// The sample of each remote vCPU (`PEND_USER`, no `SYSTEM`).
    pub remote_sample: SampleRequest,
    /// The vCPU that runs the handler: [`PET_HANDLER_CPU`].
    pub handler_cpu: usize,
    /// Its sample (`PEND_USER | SYSTEM`), taken after the kicks and the wake
    /// of the PET sampler.
    pub handler_sample: SampleRequest,
}

impl PetFire {
    /// The arguments of the handler's `PERF_TM_FIRE`: (timer id, 1, period,
    /// action) (TR-P-1).
    pub fn tm_fire_args(&self) -> [u64; 4] {
        [
            u64::from(self.timer),
            1,
            self.period_ns,
            u64::from(self.action),
        ]
    }
}

/// A re-arm of the PET one-shot (PET-R-1); the fields are the arguments of
/// `PERF_PET_SCHED` (TR-P-3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PetSchedule {
    /// The PET timer's period in ns.
    pub period_ns: u64,
    /// The period minus the sample duration, raised to the PET minimum.
    pub adjusted_period_ns: u64,
    /// How long the PET pass took, in ns.
    pub sample_duration_ns: u64,
    /// When the one-shot must fire.
    pub deadline: u64,
}

/// kperf's configuration and kptimer's runtime state.
///
/// See the [module documentation](self) for the contract and the wiring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kperf {
    state: SamplingState,
    /// Actions 1..=`action_count` live at index `id - 1`.
    actions: [Action; ACTION_MAX as usize],
    action_count: u32,
    /// Timers at or above `timer_count` keep their settings (CFG-T-1).
    timers: [Timer; KPTIMER_MAX],
    timer_count: u32,
    pet_timer: u32,
    /// The PET sampler's action (`kppet.g_actionid`); 0 when PET is off.
    pet_action: u32,
    lightweight_pet: bool,
    pet_idle_rate: u32,
    background: bool,
    started: bool,
    /// The traditional PET one-shot is in use (`g_pet_active`).
    pet_active: bool,
    /// When the traditional PET one-shot fires; `None` when disarmed.
    pet_deadline: Option<u64>,
    /// PET handler passes (`mycounter`, PET-C-1); never reset.
    pet_broadcasts: u64,
    /// Lightweight PET generation (`kppet_gencount`); never reset.
    pet_generation: u64,
    compat_fired_only: bool,
    /// Per vCPU, per timer deadline; `u64::MAX` when none. Sized at start.
    cpu_deadlines: Vec<[u64; KPTIMER_MAX]>,
    /// Per vCPU: halted or guest-reported idle (KT-I-1).
    cpu_idle: Vec<bool>,
}

impl Default for Kperf {
    fn default() -> Self {
        Self::new()
    }
}

impl Kperf {
    /// kperf as after boot: no actions, no timers, PET timer
    /// [`PET_TIMER_NONE`], idle rate 15, foreground, sampling off.
    pub fn new() -> Self {
        Self {
            state: SamplingState::Off,
            actions: [Action::default(); ACTION_MAX as usize],
            action_count: 0,
            timers: [Timer::default(); KPTIMER_MAX],
            timer_count: 0,
            pet_timer: PET_TIMER_NONE,
            pet_action: 0,
            lightweight_pet: false,
            pet_idle_rate: PET_DEFAULT_IDLE_RATE,
            background: false,
            started: false,
            pet_active: false,
            pet_deadline: None,
            pet_broadcasts: 0,
            pet_generation: 0,
            compat_fired_only: false,
            cpu_deadlines: Vec::new(),
            cpu_idle: Vec::new(),
        }
    }

    // ---------------------------------------------------------------------
    // Actions (CFG-A-*)

    /// The number of actions.
    pub fn action_count(&self) -> u32 {
        self.action_count
    }

    /// Grows the action count; new actions get the defaults (CFG-A-1).
    /// Allowed while sampling (CFG-A-4).
    ///
    /// # Errors
    ///
    /// [`KperfError::Inval`] when shrinking or above [`ACTION_MAX`]; the same
    /// count is accepted.
    pub fn set_action_count(&mut self, count: u32) -> Result<(), KperfError> {
        if count == self.action_count {
            return Ok(());
        }
        if count < self.action_count || count > ACTION_MAX {
            return Err(KperfError::Inval);
        }
        for action in &mut self.actions[self.action_count as usize..count as usize] {
            *action = Action::default();
        }
        self.action_count = count;
        Ok(())
    }

    /// The action a getter reads: `None` for the null action 0.
    fn action_get(&self, id: u32) -> Result<Option<&Action>, KperfError> {
        match id {
            0 => Ok(None),
            id if id > self.action_count => Err(KperfError::Inval),
            id => Ok(Some(&self.actions[id as usize - 1])),
        }
    }

    /// The action a setter writes: ids 1..=count only (CFG-A-2).
    fn action_mut(&mut self, id: u32) -> Result<&mut Action, KperfError> {
        if id == 0 || id > self.action_count {
            return Err(KperfError::Inval);
        }
        Ok(&mut self.actions[id as usize - 1])
    }

    /// The action's [`sampler`] bits; 0 for action 0.
    ///
    /// # Errors
    ///
    /// [`KperfError::Inval`] for an id above the count.
    pub fn action_samplers(&self, id: u32) -> Result<u32, KperfError> {
        Ok(self.action_get(id)?.map_or(0, |a| a.samplers))
    }

    /// Sets the action's [`sampler`] bits. Unknown and PMC bits are kept
    /// (AMB-14).
    ///
    /// # Errors
    ///
    /// [`KperfError::Inval`] for id 0, an id above the count, or
    /// [`sampler::PMC_THREAD`] together with [`sampler::PMC_CPU`] (CFG-A-3).
    pub fn set_action_samplers(&mut self, id: u32, samplers: u32) -> Result<(), KperfError> {
        let action = self.action_mut(id)?;
        let pmc_both = sampler::PMC_THREAD | sampler::PMC_CPU;
        if samplers & pmc_both == pmc_both {
            return Err(KperfError::Inval);
        }
        action.samplers = samplers;
        Ok(())
    }

    /// The action's user data; 0 for action 0.
    ///
    /// # Errors
    ///
    /// [`KperfError::Inval`] for an id above the count.
    pub fn action_userdata(&self, id: u32) -> Result<u32, KperfError> {
        Ok(self.action_get(id)?.map_or(0, |a| a.userdata))
    }

    /// Sets the action's user data.
    ///
    /// # Errors
    ///
    /// [`KperfError::Inval`] for id 0 or an id above the count.
    pub fn set_action_userdata(&mut self, id: u32, userdata: u32) -> Result<(), KperfError> {
        self.action_mut(id)?.userdata = userdata;
        Ok(())
    }

    /// The action's pid filter; [`PID_FILTER_ALL`] for action 0.
    ///
    /// # Errors
    ///
    /// [`KperfError::Inval`] for an id above the count.
    pub fn action_filter(&self, id: u32) -> Result<i32, KperfError> {
        Ok(self
            .action_get(id)?
            .map_or(PID_FILTER_ALL, |a| a.pid_filter))
    }

    /// Sets the action's pid filter ([`PID_FILTER_ALL`] for every pid).
    ///
    /// # Errors
    ///
    /// [`KperfError::Inval`] for id 0 or an id above the count.
    pub fn set_action_filter(&mut self, id: u32, pid: i32) -> Result<(), KperfError> {
        self.action_mut(id)?.pid_filter = pid;
        Ok(())
    }

    /// The action's user call-stack depth; 256 for action 0.
    ///
    /// # Errors
    ///
    /// [`KperfError::Inval`] for an id above the count.
    pub fn action_ucallstack_depth(&self, id: u32) -> Result<u32, KperfError> {
        Ok(self
            .action_get(id)?
            .map_or(UCALLSTACK_DEPTH_MAX, |a| a.ucallstack_depth))
    }

    /// Sets the action's user call-stack depth, 2..=256 frames.
    ///
    /// # Errors
    ///
    /// [`KperfError::Inval`] for id 0, an id above the count (checked first),
    /// or a depth out of range.
    pub fn set_action_ucallstack_depth(&mut self, id: u32, depth: u32) -> Result<(), KperfError> {
        let action = self.action_mut(id)?;
        if !(UCALLSTACK_DEPTH_MIN..=UCALLSTACK_DEPTH_MAX).contains(&depth) {
            return Err(KperfError::Inval);
        }
        action.ucallstack_depth = depth;
        Ok(())
    }

    /// The action's kernel call-stack depth; 128 for action 0.
    ///
    /// # Errors
    ///
    /// [`KperfError::Inval`] for an id above the count.
    pub fn action_kcallstack_depth(&self, id: u32) -> Result<u32, KperfError> {
        Ok(self
            .action_get(id)?
            .map_or(KCALLSTACK_DEPTH_MAX, |a| a.kcallstack_depth))
    }

    /// Sets the action's kernel call-stack depth, 1..=128 frames.
    ///
    /// # Errors
    ///
    /// [`KperfError::Inval`] for id 0, an id above the count (checked first),
    /// or a depth out of range.
    pub fn set_action_kcallstack_depth(&mut self, id: u32, depth: u32) -> Result<(), KperfError> {
        let action = self.action_mut(id)?;
        if !(KCALLSTACK_DEPTH_MIN..=KCALLSTACK_DEPTH_MAX).contains(&depth) {
            return Err(KperfError::Inval);
        }
        action.kcallstack_depth = depth;
        Ok(())
    }

    /// The action's samplers for a sampling decision: 0 for action 0 and
    /// for ids above the count.
    fn samplers_of(&self, id: u32) -> u32 {
        match self.action_get(id) {
            Ok(Some(action)) => action.samplers,
            _ => 0,
        }
    }

    /// Whether the action has a sampler other than [`sampler::SYS_MEM`]
    /// (`kperf_action_has_non_system`, KT-SM-1); `false` for action 0 and for
    /// ids above the count.
    pub fn action_has_non_system(&self, id: u32) -> bool {
        self.samplers_of(id) & !sampler::SYSTEM_MASK != 0
    }

    /// Whether the action has a task sampler (`kperf_action_has_task`);
    /// `false` for action 0 and for ids above the count.
    pub fn action_has_task(&self, id: u32) -> bool {
        self.samplers_of(id) & sampler::TASK_MASK != 0
    }

    /// Whether the action has a thread sampler (`kperf_action_has_thread`);
    /// `false` for action 0 and for ids above the count.
    pub fn action_has_thread(&self, id: u32) -> bool {
        self.samplers_of(id) & sampler::THREAD_MASK != 0
    }

    // ---------------------------------------------------------------------
    // Timers (CFG-T-*, KT-MIN-*)

    /// The number of timers.
    pub fn timer_count(&self) -> u32 {
        self.timer_count
    }

    /// Sets the number of timers, 0..=8. Shrinking keeps the hidden timers'
    /// settings: growing again exposes them (CFG-T-1).
    ///
    /// # Errors
    ///
    /// [`KperfError::Busy`] while started (checked first), then
    /// [`KperfError::Inval`] above [`KPTIMER_MAX`].
    pub fn set_timer_count(&mut self, count: u32) -> Result<(), KperfError> {
        if self.started {
            return Err(KperfError::Busy);
        }
        if count as usize > KPTIMER_MAX {
            return Err(KperfError::Inval);
        }
        self.timer_count = count;
        Ok(())
    }

    /// Index of a configured timer id (CFG-T-2: ids below the count).
    fn timer_index(&self, id: u32) -> Result<usize, KperfError> {
        if id >= self.timer_count {
            return Err(KperfError::Inval);
        }
        Ok(id as usize)
    }

    /// A copy of a configured timer, global deadline included; `None` for an
    /// id at or above the count.
    pub fn timer(&self, id: u32) -> Option<Timer> {
        self.timer_index(id).ok().map(|i| self.timers[i])
    }

    /// The timer's period in ns (0 = disabled).
    ///
    /// # Errors
    ///
    /// [`KperfError::Inval`] for an id at or above the count.
    pub fn timer_period(&self, id: u32) -> Result<u64, KperfError> {
        Ok(self.timers[self.timer_index(id)?].period_ns)
    }

    /// Sets the timer's period in ns; 0 disables it, a non-zero period below
    /// the minimum ([`Kperf::min_period_ns`], PET minimum for the PET timer)
    /// is raised to it (KT-MIN-1, KT-MIN-3). On the PET timer in traditional
    /// mode this also gives PET the timer's action (CFG-T-2).
    ///
    /// # Errors
    ///
    /// [`KperfError::Inval`] for an id at or above the count (checked first),
    /// then [`KperfError::Busy`] while started.
    pub fn set_timer_period(&mut self, id: u32, period_ns: u64) -> Result<(), KperfError> {
        let index = self.timer_index(id)?;
        if self.started {
            return Err(KperfError::Busy);
        }
        let pet = self.pet_timer == id;
        let min = self.min_period_ns(pet);
        let period_ns = if period_ns != 0 && period_ns < min {
            min
        } else {
            period_ns
        };
        if pet && !self.lightweight_pet {
            self.pet_action = self.timers[index].action;
        }
        self.timers[index].period_ns = period_ns;
        Ok(())
    }

    /// The timer's action id.
    ///
    /// # Errors
    ///
    /// [`KperfError::Inval`] for an id at or above the count.
    pub fn timer_action(&self, id: u32) -> Result<u32, KperfError> {
        Ok(self.timers[self.timer_index(id)?].action)
    }

    /// Sets the timer's action id, not checked against the action count
    /// (CFG-T-2). On the PET timer in traditional mode this also becomes
    /// PET's action.
    ///
    /// # Errors
    ///
    /// [`KperfError::Inval`] for an id at or above the count (checked first),
    /// then [`KperfError::Busy`] while started.
    pub fn set_timer_action(&mut self, id: u32, action: u32) -> Result<(), KperfError> {
        let index = self.timer_index(id)?;
        if self.started {
            return Err(KperfError::Busy);
        }
        self.timers[index].action = action;
        if self.pet_timer == id && !self.lightweight_pet {
            self.pet_action = action;
        }
        Ok(())
    }

    /// The PET timer id, as stored (may be at or above the count).
    pub fn pet_timer(&self) -> u32 {
        self.pet_timer
    }

    /// Makes timer `id` the PET timer (CFG-T-3). A valid id gives PET the
    /// timer's action and raises its period to at least the PET minimum, even
    /// from 0; an id at or above the count disables PET but is stored and
    /// read back.
    ///
    /// # Errors
    ///
    /// [`KperfError::Busy`] while started.
    pub fn set_pet_timer(&mut self, id: u32) -> Result<(), KperfError> {
        if self.started {
            return Err(KperfError::Busy);
        }
        match self.timer_index(id) {
            Err(_) => self.pet_action = 0,
            Ok(index) => {
                self.pet_action = self.timers[index].action;
                let min = self.min_period_ns(true);
                let timer = &mut self.timers[index];
                timer.period_ns = timer.period_ns.max(min);
            }
        }
        self.pet_timer = id;
        Ok(())
    }

    /// PET's action (`kppet.g_actionid`): what the PET sampler and, in
    /// lightweight mode, the self-samples use. 0 when PET is off. In
    /// lightweight mode only [`Kperf::set_pet_timer`] captures it (PET-L-4).
    pub fn pet_action(&self) -> u32 {
        self.pet_action
    }

    /// Whether lightweight PET is selected.
    pub fn lightweight_pet(&self) -> bool {
        self.lightweight_pet
    }

    /// Selects lightweight PET (PET-L-3). A sysctl front end maps the value 1
    /// to `true` and any other value to `false`.
    ///
    /// # Errors
    ///
    /// [`KperfError::Busy`] while sampling is on.
    pub fn set_lightweight_pet(&mut self, on: bool) -> Result<(), KperfError> {
        if self.sampling() {
            return Err(KperfError::Busy);
        }
        self.lightweight_pet = on;
        Ok(())
    }

    /// Whether lightweight PET is in effect: selected and sampling on
    /// (`kppet_lightweight_active`), i.e. whether guest context switches must
    /// compare their generation with [`Kperf::pet_generation`].
    pub fn lightweight_pet_active(&self) -> bool {
        self.lightweight_pet && self.sampling()
    }

    /// How many PET passes an idle thread skips its call stacks for.
    pub fn pet_idle_rate(&self) -> u32 {
        self.pet_idle_rate
    }

    /// Sets the PET idle rate; allowed while sampling (CFG-P-1).
    ///
    /// # Errors
    ///
    /// [`KperfError::Inval`] for 0, which XNU would later divide by (AMB-13).
    pub fn set_pet_idle_rate(&mut self, rate: u32) -> Result<(), KperfError> {
        if rate == 0 {
            return Err(KperfError::Inval);
        }
        self.pet_idle_rate = rate;
        Ok(())
    }

    /// Whether the background minimum periods apply (CFG-R-4).
    pub fn background(&self) -> bool {
        self.background
    }

    /// Selects the background (or foreground) minimum periods for later
    /// configuration; stored periods are not re-clamped (KT-MIN-3).
    pub fn set_background(&mut self, background: bool) {
        self.background = background;
    }

    /// The minimum period in ns for the PET timer or an on-CPU timer in the
    /// current mode (KT-MIN-1).
    pub fn min_period_ns(&self, pet: bool) -> u64 {
        min_period_ns(pet, self.background)
    }

    /// The four minimum periods in ns (KT-MIN-2).
    pub fn limits(&self) -> Limits {
        Limits {
            timer_min_period_ns: MIN_PERIOD_NS,
            timer_min_bg_period_ns: MIN_BG_PERIOD_NS,
            timer_min_pet_period_ns: MIN_PET_PERIOD_NS,
            timer_min_bg_pet_period_ns: MIN_BG_PET_PERIOD_NS,
        }
    }

    /// Whether a vCPU re-arms for the timers that fired only, as XNU does
    /// (KT-F-6), instead of all its active timers (AMB-12).
    pub fn compat_fired_only(&self) -> bool {
        self.compat_fired_only
    }

    /// Selects XNU's re-arm rule (KT-F-6) when `true`; the default `false`
    /// re-arms for the earliest of all the vCPU's active timers (AMB-12).
    pub fn set_compat_fired_only(&mut self, compat: bool) {
        self.compat_fired_only = compat;
    }

    // ---------------------------------------------------------------------
    // Sampling state (CFG-S-*) and reset (CFG-R-1)

    /// The sampling state.
    pub fn sampling_state(&self) -> SamplingState {
        self.state
    }

    /// The "sampling" value: `true` only in [`SamplingState::On`] (CFG-S-2).
    pub fn sampling(&self) -> bool {
        self.state == SamplingState::On
    }

    /// Whether the timers are started (`g_started`).
    pub fn started(&self) -> bool {
        self.started
    }

    /// Turns sampling on or off at `now` for `ncpus` vCPUs (CFG-S-1), starting
    /// or stopping the timers. Returns the kperf host deadline of every vCPU
    /// (index = vCPU; `None` = cancel): on enable, what [`Kperf::start`]
    /// returns (the current deadlines if already on); on disable, `None` for
    /// all `ncpus`.
    ///
    /// # Errors
    ///
    /// - [`KperfError::Canceled`]: enable with no actions.
    /// - [`KperfError::Busy`]: a disable split with
    ///   [`Kperf::begin_shutdown`] is not finished (XNU panics here).
    pub fn set_sampling(
        &mut self,
        on: bool,
        now: u64,
        ncpus: usize,
    ) -> Result<Vec<Option<u64>>, KperfError> {
        if on {
            if self.action_count == 0 {
                return Err(KperfError::Canceled);
            }
            match self.state {
                SamplingState::On => Ok(self.cpu_programs()),
                SamplingState::Shutdown => Err(KperfError::Busy),
                SamplingState::Off => {
                    self.state = SamplingState::On;
                    Ok(self.start(now, ncpus))
                }
            }
        } else {
            if self.begin_shutdown()? {
                self.finish_shutdown();
            }
            Ok(vec![None; ncpus])
        }
    }

    /// The first half of a disable: `On -> Shutdown`, then stop the timers
    /// (KT-SP-1). Returns whether sampling was on; `Ok(false)` when already
    /// off. Until [`Kperf::finish_shutdown`], an expiry samples nothing and
    /// clears its vCPU's deadlines (KT-F-1).
    ///
    /// # Errors
    ///
    /// [`KperfError::Busy`] when already in [`SamplingState::Shutdown`].
    pub fn begin_shutdown(&mut self) -> Result<bool, KperfError> {
        match self.state {
            SamplingState::Off => Ok(false),
            SamplingState::Shutdown => Err(KperfError::Busy),
            SamplingState::On => {
                self.state = SamplingState::Shutdown;
                self.stop();
                Ok(true)
            }
        }
    }

    /// The second half of a disable: `Shutdown -> Off`, once every vCPU
    /// cancelled its kperf host deadline. Does nothing in other states.
    pub fn finish_shutdown(&mut self) {
        if self.state == SamplingState::Shutdown {
            self.state = SamplingState::Off;
        }
    }

    /// Resets kperf (CFG-R-1, without ownership): sampling off (the VMM
    /// cancels every vCPU's kperf host deadline, as after disabling), the PET
    /// timer [`PET_TIMER_NONE`], every timer's period and action 0 (KT-SP-2),
    /// PET reset (action 0, idle rate 15, lightweight off, CFG-P-2), every
    /// action back to the defaults. The action and timer counts, the
    /// background mode, the re-arm rule and the `pet_broadcasts` and
    /// generation counters are kept.
    pub fn reset(&mut self) {
        // Shutdown: the timers were stopped when it began.
        if self.state == SamplingState::On {
            self.state = SamplingState::Shutdown;
        }
        self.stop();
        self.state = SamplingState::Off;

        // kptimer_reset.
        self.pet_timer = PET_TIMER_NONE;
        self.pet_action = 0;
        for timer in &mut self.timers[..self.timer_count as usize] {
            timer.period_ns = 0;
            timer.action = 0;
        }
        let ntimers = self.timer_count as usize;
        for row in &mut self.cpu_deadlines {
            row[..ntimers].fill(NO_DEADLINE);
        }

        // kppet_reset.
        self.pet_action = 0;
        self.pet_idle_rate = PET_DEFAULT_IDLE_RATE;
        self.lightweight_pet = false;

        // kperf_action_reset.
        for action in &mut self.actions[..self.action_count as usize] {
            *action = Action::default();
        }
    }

    // ---------------------------------------------------------------------
    // Start, stop, expiry (KT-ST-*, KT-SP-*, KT-F-*)

    /// Starts the timers at `now` on `ncpus` vCPUs (`kptimer_start`,
    /// KT-ST-1..3). Usually called through [`Kperf::set_sampling`]: started
    /// timers only fire while sampling is on.
    ///
    /// Marks the timers started even when none is active (KT-ST-3). A timer
    /// with period or action 0 stays inactive. The PET timer in traditional
    /// mode arms the PET one-shot ([`Kperf::pet_deadline`]) instead of running
    /// on the vCPUs. Every other timer's global deadline becomes
    /// `now + period`, and each vCPU derives its deadlines from them
    /// (KT-ST-2). Returns each vCPU's earliest deadline (`None` for an idle
    /// vCPU or when no on-CPU timer is active). A second start changes
    /// nothing and returns the current deadlines.
    pub fn start(&mut self, now: u64, ncpus: usize) -> Vec<Option<u64>> {
        if self.started {
            return self.cpu_programs();
        }
        self.started = true;
        self.cpu_deadlines.resize(ncpus, [NO_DEADLINE; KPTIMER_MAX]);
        self.cpu_idle.resize(ncpus, false);

        let mut on_cpu_timers = 0;
        for id in 0..self.timer_count {
            let timer = &mut self.timers[id as usize];
            if timer.period_ns == 0 || timer.action == 0 {
                continue;
            }
            if !self.lightweight_pet && id == self.pet_timer {
                self.pet_active = true;
                self.pet_deadline = Some(now.saturating_add(timer.period_ns));
            } else {
                timer.deadline = now.saturating_add(timer.period_ns);
                on_cpu_timers += 1;
            }
        }
        if on_cpu_timers == 0 {
            return vec![None; ncpus];
        }
        (0..ncpus)
            .map(|cpu| {
                let deadline = self.earliest_deadline(cpu, now);
                if self.cpu_idle[cpu] {
                    None
                } else {
                    deadline
                }
            })
            .collect()
    }

    /// Stops the timers (`kptimer_stop`, KT-SP-1): disarms the PET one-shot,
    /// clears every vCPU's deadlines and zeroes every global deadline. A
    /// no-op when not started. The VMM must then cancel every vCPU's kperf
    /// host deadline and wait for each (AMB-17).
    pub fn stop(&mut self) {
        if !self.started {
            return;
        }
        self.pet_active = false;
        self.pet_deadline = None;
        self.started = false;
        let ntimers = self.timer_count as usize;
        for row in &mut self.cpu_deadlines {
            row[..ntimers].fill(NO_DEADLINE);
        }
        for timer in &mut self.timers[..ntimers] {
            timer.deadline = 0;
        }
    }

    /// Handles the expiry of `cpu`'s kperf host deadline at `now`
    /// (`kptimer_expire`, KT-F-1..7, KT-SM-1).
    ///
    /// - Sampling off: [`Expiry::NotRunning`].
    /// - `Shutdown`: clears this vCPU's deadlines; nothing fires.
    /// - An idle vCPU (a deadline that raced [`Kperf::cpu_idle`]): nothing
    ///   fires and the deadline is cancelled.
    /// - Otherwise every timer whose deadline on this vCPU lies strictly
    ///   before `now` fires ([`Timer::elect`]). The leader of a fire samples
    ///   with `PEND_USER | SYSTEM`; another vCPU samples with `PEND_USER` only
    ///   if the action has a non-system sampler.
    ///
    /// The next deadline is the earliest of all this vCPU's active timers
    /// (AMB-12), or of the timers that fired now under
    /// [`Kperf::set_compat_fired_only`] (KT-F-6; `None` if none fired).
    ///
    /// # Locking
    ///
    /// Call with the engine's lock held, and record `PERF_TM_FIRE` for each
    /// leader fire before releasing it (TR-P-5).
    pub fn expire(&mut self, cpu: usize, now: u64) -> Expiry {
        if self.state == SamplingState::Off {
            return Expiry::NotRunning;
        }
        if cpu >= self.cpu_deadlines.len() {
            return Expiry::NoSuchCpu;
        }
        let ntimers = self.timer_count as usize;
        if self.state == SamplingState::Shutdown {
            self.cpu_deadlines[cpu][..ntimers].fill(NO_DEADLINE);
            return Expiry::Handled {
                fires: Vec::new(),
                next_deadline: None,
            };
        }
        if self.cpu_idle[cpu] {
            return Expiry::Handled {
                fires: Vec::new(),
                next_deadline: None,
            };
        }

        let mut fires = Vec::new();
        let mut fired_min = NO_DEADLINE;
        for index in 0..ntimers {
            if self.timers[index].period_ns == 0 {
                continue;
            }
            let cpu_deadline = self.cpu_deadlines[cpu][index];
            if now <= cpu_deadline {
                continue;
            }
            let (leader, next_deadline) = match self.timers[index].elect(cpu_deadline, now) {
                Election::Stopped => {
                    self.cpu_deadlines[cpu][index] = NO_DEADLINE;
                    continue;
                }
                Election::Leader { next_deadline } => (true, next_deadline),
                Election::Follower { next_deadline } => (false, next_deadline),
            };
            self.cpu_deadlines[cpu][index] = next_deadline;
            fired_min = fired_min.min(next_deadline);

            // Cannot truncate: index < KPTIMER_MAX.
            let id = index as u32;
            let pet = id == self.pet_timer;
            if leader && pet && self.lightweight_pet {
                self.pet_generation += 1;
            }
            let timer = self.timers[index];
            let flags = if leader {
                sample_flags::PEND_USER | sample_flags::SYSTEM
            } else {
                sample_flags::PEND_USER
            };
            let sample =
                (leader || self.action_has_non_system(timer.action)).then_some(SampleRequest {
                    action: timer.action,
                    flags,
                    timer: id,
                });
            fires.push(Fire {
                timer: id,
                action: timer.action,
                period_ns: timer.period_ns,
                pet,
                leader,
                deadline: cpu_deadline,
                next_deadline,
                sample,
            });
        }

        let next_deadline = if self.compat_fired_only {
            (fired_min != NO_DEADLINE).then_some(fired_min)
        } else {
            self.cpu_next_deadline(cpu)
        };
        Expiry::Handled {
            fires,
            next_deadline,
        }
    }

    /// Re-derives `cpu`'s deadlines from the global ones by dead reckoning
    /// and returns the earliest (`kptimer_earliest_deadline`, KT-ST-2,
    /// KT-I-1). Timers with no global deadline are left alone.
    fn earliest_deadline(&mut self, cpu: usize, now: u64) -> Option<u64> {
        let mut earliest = NO_DEADLINE;
        for index in 0..self.timer_count as usize {
            let timer = &self.timers[index];
            if timer.deadline == 0 {
                continue;
            }
            let deadline = dead_reckon(timer.deadline, timer.period_ns, now);
            self.cpu_deadlines[cpu][index] = deadline;
            earliest = earliest.min(deadline);
        }
        (earliest != NO_DEADLINE).then_some(earliest)
    }

    /// Every vCPU's host deadline as things stand.
    fn cpu_programs(&self) -> Vec<Option<u64>> {
        (0..self.cpu_deadlines.len())
            .map(|cpu| self.cpu_next_deadline(cpu))
            .collect()
    }

    /// `cpu`'s earliest deadline over its active timers, `None` if it has
    /// none, is idle, is unknown or sampling is not on.
    pub fn cpu_next_deadline(&self, cpu: usize) -> Option<u64> {
        if !self.sampling() || self.cpu_idle.get(cpu).copied().unwrap_or(true) {
            return None;
        }
        let row = self.cpu_deadlines.get(cpu)?;
        (0..self.timer_count as usize)
            .filter(|&index| self.timers[index].period_ns != 0)
            .map(|index| row[index])
            .filter(|&deadline| deadline != NO_DEADLINE)
            .min()
    }

    /// `cpu`'s deadline for timer `id` (`None`: not armed on it).
    pub fn cpu_deadline(&self, cpu: usize, id: u32) -> Option<u64> {
        let index = self.timer_index(id).ok()?;
        let deadline = self.cpu_deadlines.get(cpu)?[index];
        (deadline != NO_DEADLINE).then_some(deadline)
    }

    /// Grows the per-vCPU tables to hold `cpu`.
    fn ensure_cpu(&mut self, cpu: usize) {
        if cpu >= self.cpu_deadlines.len() {
            self.cpu_deadlines
                .resize(cpu + 1, [NO_DEADLINE; KPTIMER_MAX]);
            self.cpu_idle.resize(cpu + 1, false);
        }
    }

    /// `cpu` halted or went idle (KT-I-1): it takes no on-CPU samples until
    /// [`Kperf::cpu_wake`]. The VMM cancels its kperf host deadline and does
    /// not kick it for on-CPU timers (PET kicks still reach it, AMB-15).
    pub fn cpu_idle(&mut self, cpu: usize) {
        self.ensure_cpu(cpu);
        self.cpu_idle[cpu] = true;
    }

    /// `cpu` resumed at `now` (KT-I-1), or came online (KT-I-2, which also
    /// grows the tables for a hot-added vCPU). With sampling on, its
    /// deadlines are re-derived from the global ones by dead reckoning, so it
    /// rejoins the cadence without a burst of missed fires; otherwise they
    /// are cleared. Returns its kperf host deadline.
    pub fn cpu_wake(&mut self, cpu: usize, now: u64) -> Option<u64> {
        self.ensure_cpu(cpu);
        self.cpu_idle[cpu] = false;
        if self.sampling() {
            self.earliest_deadline(cpu, now)
        } else {
            let ntimers = self.timer_count as usize;
            self.cpu_deadlines[cpu][..ntimers].fill(NO_DEADLINE);
            None
        }
    }

    /// Whether `cpu` is marked idle.
    pub fn is_cpu_idle(&self, cpu: usize) -> bool {
        self.cpu_idle.get(cpu).copied().unwrap_or(false)
    }

    // ---------------------------------------------------------------------
    // Traditional PET hooks (PET-H-*, PET-R-1, PET-C-1, PET-L-1)

    /// When the traditional PET one-shot must fire; `None` when disarmed.
    pub fn pet_deadline(&self) -> Option<u64> {
        self.pet_deadline
    }

    /// The PET one-shot fired at `now` (`kptimer_pet_handler`, PET-H-2):
    /// disarms it, counts one broadcast (PET-C-1) and says whom to kick and
    /// what to sample. The VMM records `PERF_TM_FIRE`
    /// ([`PetFire::tm_fire_args`]), kicks the remote vCPUs without waiting,
    /// wakes the PET sampler, samples the handler vCPU and records
    /// `PERF_TM_FIRE | DBG_FUNC_END`. The one-shot is re-armed by
    /// [`Kperf::pet_rearm`], not here.
    ///
    /// `None` (and nothing counted) when PET is not active, the one-shot is
    /// not armed, or `now` is before its deadline.
    pub fn pet_fired(&mut self, now: u64) -> Option<PetFire> {
        let deadline = self.pet_deadline?;
        if !self.pet_active || now < deadline {
            return None;
        }
        let timer = *self.timers.get(self.pet_timer as usize)?;
        self.pet_deadline = None;
        self.pet_broadcasts += 1;
        let sample = SampleRequest {
            action: timer.action,
            flags: sample_flags::PEND_USER,
            timer: self.pet_timer,
        };
        Some(PetFire {
            timer: self.pet_timer,
            action: timer.action,
            period_ns: timer.period_ns,
            remote_cpus: (0..self.cpu_deadlines.len())
                .filter(|&cpu| cpu != PET_HANDLER_CPU)
                .collect(),
            remote_sample: sample,
            handler_cpu: PET_HANDLER_CPU,
            handler_sample: SampleRequest {
                flags: sample_flags::PEND_USER | sample_flags::SYSTEM,
                ..sample
            },
        })
    }

    /// Re-arms the PET one-shot after a PET pass that took
    /// `sample_duration_ns` and ended at `now` (`kptimer_pet_enter`,
    /// PET-R-1): period minus duration if the period is longer, else the
    /// period, raised to the PET minimum. `None` (nothing armed) unless
    /// sampling is on with PET active.
    pub fn pet_rearm(&mut self, now: u64, sample_duration_ns: u64) -> Option<PetSchedule> {
        if !self.sampling() || !self.pet_active {
            return None;
        }
        let period_ns = self.timers.get(self.pet_timer as usize)?.period_ns;
        let adjusted = if period_ns > sample_duration_ns {
            period_ns - sample_duration_ns
        } else {
            period_ns
        };
        let adjusted_period_ns = adjusted.max(self.min_period_ns(true));
        let deadline = now.saturating_add(adjusted_period_ns);
        self.pet_deadline = Some(deadline);
        Some(PetSchedule {
            period_ns,
            adjusted_period_ns,
            sample_duration_ns,
            deadline,
        })
    }

    /// Passes of the traditional PET handler since the engine was created
    /// (PET-C-1: XNU's `mycounter`); never reset.
    pub fn pet_broadcasts(&self) -> u64 {
        self.pet_broadcasts
    }

    /// The lightweight PET generation (`kppet_gencount`): incremented by the
    /// leader of each PET timer fire in lightweight mode (KT-F-4, PET-L-1).
    pub fn pet_generation(&self) -> u64 {
        self.pet_generation
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    const US: u64 = 1_000;

    /// xorshift64 (Marsaglia 2003): deterministic randomness without crates.
    fn xorshift(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    /// One action with `samplers`, one timer with `period_ns` on it.
    fn one_timer(samplers: u32, period_ns: u64) -> Kperf {
        let mut k = Kperf::new();
        k.set_action_count(1).unwrap();
        k.set_action_samplers(1, samplers).unwrap();
        k.set_timer_count(1).unwrap();
        k.set_timer_period(0, period_ns).unwrap();
        k.set_timer_action(0, 1).unwrap();
        k
    }

    fn handled(expiry: Expiry) -> (Vec<Fire>, Option<u64>) {
        match expiry {
            Expiry::Handled {
                fires,
                next_deadline,
            } => (fires, next_deadline),
            other => panic!("expected Handled, got {other:?}"),
        }
    }

    /// What a simulated vCPU saw fire.
    #[derive(Clone, Copy, Debug)]
    struct Seen {
        now: u64,
        cpu: usize,
        fire: Fire,
    }

    /// N simulated vCPUs sharing one fake clock: each vCPU's host deadline
    /// expires at the programmed deadline plus a random latency.
    struct Sim {
        kperf: Kperf,
        now: u64,
        /// Programmed host deadline and the time it will actually expire.
        armed: Vec<Option<(u64, u64)>>,
        rng: u64,
        max_latency: u64,
        /// Every this many expiries, one is this late instead (0: never).
        stall_every: u64,
        stall: u64,
        expiries: u64,
        seen: Vec<Seen>,
    }

    impl Sim {
        fn new(kperf: Kperf, ncpus: usize, start: u64, max_latency: u64) -> Self {
            let mut sim = Sim {
                kperf,
                now: start,
                armed: vec![None; ncpus],
                rng: 0x2545_f491_4f6c_dd1d,
                max_latency,
                stall_every: 0,
                stall: 0,
                expiries: 0,
                seen: Vec::new(),
            };
            let programs = sim.kperf.set_sampling(true, start, ncpus).unwrap();
            for (cpu, program) in programs.into_iter().enumerate() {
                sim.program(cpu, program);
            }
            sim
        }

        /// Latency in 1..=max_latency: a host timer never expires exactly at
        /// its deadline in ns.
        fn program(&mut self, cpu: usize, deadline: Option<u64>) {
            self.armed[cpu] = deadline.map(|d| {
                self.expiries += 1;
                let latency = if self.stall_every != 0 && self.expiries % self.stall_every == 0 {
                    self.stall
                } else {
                    1 + xorshift(&mut self.rng) % self.max_latency
                };
                (d, d.max(self.now) + latency)
            });
        }

        /// Runs every expiry up to `until`.
        fn run_until(&mut self, until: u64) {
            while let Some((cpu, at)) = self
                .armed
                .iter()
                .enumerate()
                .filter_map(|(cpu, a)| a.map(|(_, at)| (cpu, at)))
                .min_by_key(|&(_, at)| at)
            {
                if at > until {
                    break;
                }
                self.now = at;
                let (fires, next) = handled(self.kperf.expire(cpu, at));
                for fire in fires {
                    self.seen.push(Seen { now: at, cpu, fire });
                }
                self.program(cpu, next);
            }
            self.now = until;
        }

        fn idle(&mut self, cpu: usize) {
            self.kperf.cpu_idle(cpu);
            self.armed[cpu] = None;
        }

        fn wake(&mut self, cpu: usize) -> Option<u64> {
            let deadline = self.kperf.cpu_wake(cpu, self.now);
            self.program(cpu, deadline);
            deadline
        }

        fn leaders(&self) -> Vec<Seen> {
            self.seen
                .iter()
                .copied()
                .filter(|s| s.fire.leader)
                .collect()
        }

        fn samples_of(&self, cpu: usize) -> usize {
            self.seen
                .iter()
                .filter(|s| s.cpu == cpu && s.fire.sample.is_some())
                .count()
        }
    }

    // --- Constants and encoding (CFG-A-5, TR-E-*, KperfError) -------------

    #[test]
    fn test_cfg_a5_sampler_and_flag_bits() {
        let samplers = [
            sampler::TH_INFO,
            sampler::TH_SNAPSHOT,
            sampler::KSTACK,
            sampler::USTACK,
            sampler::PMC_THREAD,
            sampler::PMC_CPU,
            sampler::PMC_CONFIG,
            sampler::MEMINFO,
            sampler::TH_SCHEDULING,
            sampler::TH_DISPATCH,
            sampler::TK_SNAPSHOT,
            sampler::SYS_MEM,
            sampler::TH_INSCYC,
            sampler::TK_INFO,
        ];
        for (bit, value) in samplers.into_iter().enumerate() {
            assert_eq!(value, 1 << bit);
        }
        let flags = [
            sample_flags::PEND_USER,
            sample_flags::IDLE_THREADS,
            sample_flags::EMPTY_CALLSTACK,
            sample_flags::CONTINUATION,
            sample_flags::NON_INTERRUPT,
            sample_flags::SYSTEM,
            sample_flags::ONLY_SYSTEM,
            sample_flags::TASK_ONLY,
            sample_flags::THREAD_ONLY,
        ];
        for (bit, value) in flags.into_iter().enumerate() {
            assert_eq!(value, 1 << bit);
        }
        assert_eq!(sampler::TASK_MASK, 0x2480);
        assert_eq!(sampler::THREAD_MASK, 0x131f);
        assert_eq!(sampler::SYSTEM_MASK, 0x800);
        // The three masks are disjoint and leave out only the PMC CPU and
        // config samplers.
        assert_eq!(sampler::TASK_MASK & sampler::THREAD_MASK, 0);
        assert_eq!(
            sampler::TASK_MASK | sampler::THREAD_MASK | sampler::SYSTEM_MASK,
            0x3fff & !(sampler::PMC_CPU | sampler::PMC_CONFIG)
        );
    }

    #[test]
    fn test_tr_e1_kdebug_id_encoding() {
        use trace::*;
        assert_eq!(kdebug_id(DBG_PERF, 0, 0, DBG_FUNC_NONE), 0x2500_0000);
        assert_eq!(kdebug_id(DBG_PERF, 1, 5, DBG_FUNC_NONE), 0x2501_0014);
        assert_eq!(kdebug_id(DBG_PERF, 3, 0, DBG_FUNC_START), 0x2503_0001);
        assert_eq!(kdebug_id(DBG_PERF, 3, 0, DBG_FUNC_END), 0x2503_0002);
        assert_eq!(kdebug_id(DBG_PERF, 10, 4, DBG_FUNC_NONE), 0x250a_0010);
        // Fields are truncated to their width.
        assert_eq!(kdebug_id(0xff, 0xff, 0xffff, 0xff), 0xffff_ffff);
        assert_eq!(kdebug_id(0, 0, 0x4000, 4), 0);
    }

    #[test]
    fn test_tr_e2_kptimer_event_ids() {
        use trace::*;
        assert_eq!(TM_FIRE, 0x2503_0000);
        assert_eq!(TM_HNDLR, 0x2503_0008);
        assert_eq!(PET_SCHED, 0x2504_0018);
        assert_eq!(TM_HNDLR | DBG_FUNC_START, 0x2503_0009);
        assert_eq!(TM_FIRE | DBG_FUNC_END, 0x2503_0002);
    }

    #[test]
    fn test_cfg_api1_errno_values_and_messages() {
        let table = [
            (KperfError::Inval, 22),
            (KperfError::Busy, 16),
            (KperfError::Canceled, 125),
            (KperfError::Perm, 1),
            (KperfError::Fault, 14),
            (KperfError::NoEnt, 2),
            (KperfError::NoMem, 12),
        ];
        for (error, errno) in table {
            assert_eq!(error.errno(), errno);
            assert!(!error.to_string().is_empty());
        }
        assert_eq!(
            KperfError::Inval.to_string(),
            "Invalid kperf argument (EINVAL)"
        );
    }

    // --- Dead reckoning and leader election (KT-F-*) ------------------------

    #[test]
    fn test_kt_f2_dead_reckoning_examples() {
        assert_eq!(dead_reckon(100, 10, 125), 130);
        assert_eq!(dead_reckon(100, 10, 130), 140);
        assert_eq!(dead_reckon(100, 10, 95), 100);
        // A deadline equal to now is kept; just after it moves one period.
        assert_eq!(dead_reckon(100, 10, 100), 100);
        assert_eq!(dead_reckon(100, 10, 101), 110);
        // Period 0 has no grid; the end of time saturates.
        assert_eq!(dead_reckon(100, 0, 500), 100);
        assert_eq!(dead_reckon(0, 10, u64::MAX - 3), u64::MAX);
    }

    #[test]
    fn test_kt_f2_result_is_on_grid_and_after_now() {
        let mut rng = 7u64;
        for _ in 0..100_000 {
            let deadline = xorshift(&mut rng) % 1_000_000;
            let period = 1 + xorshift(&mut rng) % 10_000;
            let now = deadline + xorshift(&mut rng) % 1_000_000;
            let next = dead_reckon(deadline, period, now);
            if now == deadline {
                assert_eq!(next, deadline);
            } else {
                assert!(next > now && next - now <= period);
                assert_eq!((next - deadline) % period, 0);
            }
        }
    }

    #[test]
    fn test_kt_f3_equality_does_not_fire() {
        let mut k = one_timer(sampler::TH_INFO, MS);
        assert_eq!(k.set_sampling(true, 0, 1).unwrap(), vec![Some(MS)]);
        let (fires, next) = handled(k.expire(0, MS));
        assert!(fires.is_empty());
        // The deadline is kept, so the VMM expires again just after it.
        assert_eq!(next, Some(MS));
        let (fires, next) = handled(k.expire(0, MS + 1));
        assert_eq!(fires.len(), 1);
        assert_eq!(next, Some(2 * MS));
    }

    #[test]
    fn test_kt_f4_leader_then_follower_under_elect() {
        let mut timer = Timer {
            period_ns: 10,
            action: 1,
            deadline: 100,
        };
        // First vCPU past 100 leads; the global deadline moves to 110.
        assert_eq!(
            timer.elect(100, 103),
            Election::Leader { next_deadline: 110 }
        );
        assert_eq!(timer.deadline, 110);
        // Second vCPU, same fire: follows.
        assert_eq!(
            timer.elect(100, 105),
            Election::Follower { next_deadline: 110 }
        );
        // A vCPU that missed fires (deadline 60) adopts the global deadline.
        assert_eq!(
            timer.elect(60, 107),
            Election::Follower { next_deadline: 110 }
        );
        // A late leader dead-reckons: 110 + 10 = 120 < 135 -> 140.
        assert_eq!(
            timer.elect(110, 135),
            Election::Leader { next_deadline: 140 }
        );
    }

    #[test]
    fn test_kt_f7_stopped_timer_does_not_fire() {
        let mut timer = Timer {
            period_ns: 10,
            action: 1,
            deadline: 0,
        };
        assert_eq!(timer.elect(100, 105), Election::Stopped);
        assert_eq!(timer.deadline, 0);
        let mut disabled = Timer {
            period_ns: 0,
            action: 1,
            deadline: 50,
        };
        assert_eq!(disabled.elect(40, 45), Election::Stopped);
    }

    #[test]
    fn test_kt_f4_one_leader_per_period_not_n() {
        let start = 3 * MS;
        let periods = 5000;
        let mut sim = Sim::new(one_timer(sampler::TH_INFO, MS), 4, start, 200 * US);
        sim.run_until(start + periods * MS);
        let leaders = sim.leaders().len() as u64;
        // Within 5 % of the periods elapsed, not 4 times that.
        assert!(leaders.abs_diff(periods) <= periods / 20, "{leaders}");
        assert!(sim.seen.len() as u64 >= 4 * leaders - 4);
    }

    #[test]
    fn test_kt_f5_leader_fires_keep_the_cadence() {
        let start = 0;
        let mut sim = Sim::new(one_timer(sampler::TH_INFO, MS), 4, start, 200 * US);
        sim.run_until(5000 * MS);
        let leaders = sim.leaders();
        for pair in leaders.windows(2) {
            // Latency-adjusted (the deadline each leader answered): >= 95 %.
            let nominal = pair[1].fire.deadline - pair[0].fire.deadline;
            assert!(nominal * 100 >= 95 * MS, "{nominal}");
            // Raw: at least the period minus the worst latency.
            assert!(pair[1].now - pair[0].now >= MS - 200 * US);
        }
        // The cadence never drifts off the start grid.
        assert!(leaders.iter().all(|s| s.fire.deadline % MS == 0));
    }

    #[test]
    fn test_kt_f4_missed_fires_resynchronize_without_oversampling() {
        let start = 0;
        let mut sim = Sim::new(one_timer(sampler::TH_INFO, MS), 4, start, 200 * US);
        // Every 37th host timer is 3.5 periods late.
        sim.stall_every = 37;
        sim.stall = 3 * MS + MS / 2;
        sim.run_until(2000 * MS);
        let leaders = sim.leaders();
        assert!(leaders.len() <= 2000);
        assert!(leaders.len() >= 1900, "{}", leaders.len());
        for pair in leaders.windows(2) {
            assert!(pair[1].fire.deadline >= pair[0].fire.deadline + MS);
        }
        assert!(sim.seen.iter().all(|s| s.fire.next_deadline % MS == 0));
    }

    #[test]
    fn test_kt_f6_single_timer_rearms_to_the_global_deadline() {
        let mut k = one_timer(sampler::TH_INFO, MS);
        k.set_sampling(true, 0, 2).unwrap();
        for now in [MS + 10, MS + 20] {
            for cpu in 0..2 {
                let (_, next) = handled(k.expire(cpu, now));
                assert_eq!(next, Some(k.timer(0).unwrap().deadline));
            }
        }
    }

    #[test]
    fn test_amb12_rearm_over_all_timers_or_fired_only() {
        let mut k = Kperf::new();
        k.set_action_count(1).unwrap();
        k.set_action_samplers(1, sampler::TH_INFO).unwrap();
        k.set_timer_count(2).unwrap();
        for (id, period) in [(0, MS), (1, 3 * MS / 2)] {
            k.set_timer_period(id, period).unwrap();
            k.set_timer_action(id, 1).unwrap();
        }
        let mut compat = k.clone();
        compat.set_compat_fired_only(true);
        assert!(!k.compat_fired_only());

        assert_eq!(k.set_sampling(true, 0, 1).unwrap(), vec![Some(MS)]);
        let (fires, next) = handled(k.expire(0, MS + 100));
        assert_eq!(fires.len(), 1);
        // Timer 1 is due at 1.5 ms and is not missed.
        assert_eq!(next, Some(3 * MS / 2));

        compat.set_sampling(true, 0, 1).unwrap();
        let (fires, next) = handled(compat.expire(0, MS + 100));
        assert_eq!(fires.len(), 1);
        // XNU: only timer 0's new deadline, so timer 1 fires late.
        assert_eq!(next, Some(2 * MS));
        // And an expiry where nothing fires disarms the vCPU.
        let (fires, next) = handled(compat.expire(0, MS + 200));
        assert!(fires.is_empty());
        assert_eq!(next, None);
    }

    // --- Sampling decisions (KT-SM-*) ---------------------------------------

    #[test]
    fn test_kt_sm1_system_only_action_samples_once_per_fire() {
        let start = 0;
        let mut sim = Sim::new(one_timer(sampler::SYS_MEM, MS), 4, start, 200 * US);
        sim.run_until(500 * MS);
        let leaders = sim.leaders().len();
        let samples: Vec<&Seen> = sim
            .seen
            .iter()
            .filter(|s| s.fire.sample.is_some())
            .collect();
        assert_eq!(samples.len(), leaders);
        for seen in samples {
            assert!(seen.fire.leader);
            let sample = seen.fire.sample.unwrap();
            assert_eq!(sample.flags, sample_flags::PEND_USER | sample_flags::SYSTEM);
            assert_eq!((sample.action, sample.timer), (1, 0));
        }
    }

    #[test]
    fn test_kt_sm1_non_system_action_samples_every_busy_cpu() {
        let start = 0;
        let mut sim = Sim::new(
            one_timer(sampler::SYS_MEM | sampler::TH_INFO, MS),
            4,
            start,
            200 * US,
        );
        sim.run_until(500 * MS);
        let leaders = sim.leaders().len();
        for seen in &sim.seen {
            let sample = seen.fire.sample.expect("every vCPU samples");
            let system = if seen.fire.leader {
                sample_flags::SYSTEM
            } else {
                0
            };
            assert_eq!(sample.flags, sample_flags::PEND_USER | system);
        }
        assert!(sim.seen.len() >= 4 * leaders - 4);
    }

    #[test]
    fn test_kt_sm1_has_non_system_is_false_beyond_the_count() {
        let mut k = Kperf::new();
        k.set_action_count(2).unwrap();
        k.set_action_samplers(1, sampler::SYS_MEM).unwrap();
        k.set_action_samplers(2, sampler::KSTACK).unwrap();
        assert!(!k.action_has_non_system(0));
        assert!(!k.action_has_non_system(1));
        assert!(k.action_has_non_system(2));
        assert!(!k.action_has_non_system(3));
        assert!(k.action_has_thread(2) && !k.action_has_task(2));
        k.set_action_samplers(1, sampler::MEMINFO).unwrap();
        assert!(k.action_has_task(1) && !k.action_has_thread(1));
        assert!(!k.action_has_task(99) && !k.action_has_thread(99));
    }

    #[test]
    fn test_kt_sm3_every_busy_cpu_samples_once_per_fire() {
        let start = 0;
        let mut sim = Sim::new(one_timer(sampler::TH_INFO, MS), 4, start, 200 * US);
        sim.run_until(5000 * MS);
        let leaders = sim.leaders().len();
        for cpu in 0..4 {
            let samples = sim.samples_of(cpu);
            // Saturation above 95 %, and never more than once per fire.
            assert!(samples * 100 > leaders * 95, "cpu {cpu}: {samples}");
            assert!(samples <= leaders + 1);
        }
        // Per fire (the deadline answered), each vCPU at most once.
        let mut per_fire = std::collections::HashMap::new();
        for seen in &sim.seen {
            *per_fire
                .entry((seen.fire.deadline, seen.cpu))
                .or_insert(0u32) += 1;
        }
        assert!(per_fire.values().all(|&n| n == 1));
    }

    // --- Idle vCPUs (KT-I-*) ----------------------------------------------------

    #[test]
    fn test_kt_i1_idle_cpu_gets_no_fires_and_realigns_on_wake() {
        let start = 0;
        let mut sim = Sim::new(one_timer(sampler::TH_INFO, MS), 4, start, 200 * US);
        sim.run_until(10 * MS + MS / 2);
        sim.idle(3);
        let idle_from = sim.now;
        sim.run_until(110 * MS + MS / 3);
        let idle_to = sim.now;
        assert!(sim
            .seen
            .iter()
            .all(|s| s.cpu != 3 || s.now < idle_from || s.now > idle_to));
        // The others kept firing meanwhile.
        assert!(sim
            .seen
            .iter()
            .any(|s| s.cpu == 0 && s.now > idle_from + 90 * MS));

        // On wake: one deadline on the global grid, after now; no burst.
        let deadline = sim.wake(3).unwrap();
        assert!(deadline > idle_to && deadline - idle_to <= MS);
        assert_eq!(deadline % MS, 0);
        let before = sim.seen.len();
        sim.run_until(idle_to + 5 * MS);
        let from_cpu3: Vec<&Seen> = sim.seen[before..].iter().filter(|s| s.cpu == 3).collect();
        assert!((4..=6).contains(&from_cpu3.len()), "{}", from_cpu3.len());
        assert_eq!(from_cpu3[0].fire.deadline, deadline);
    }

    #[test]
    fn test_kt_i1_wake_with_every_cpu_idle_skips_missed_fires() {
        let mut k = one_timer(sampler::TH_INFO, MS);
        k.set_sampling(true, 0, 2).unwrap();
        k.cpu_idle(0);
        k.cpu_idle(1);
        // A deadline that raced the idle transition is ignored.
        assert_eq!(handled(k.expire(0, MS + 5)), (vec![], None));
        // 50 ms later the global deadline (1 ms) is stale; wake reckons.
        assert_eq!(k.cpu_wake(1, 50 * MS + 300), Some(51 * MS));
        let (fires, next) = handled(k.expire(1, 51 * MS + 10));
        assert!(fires[0].leader);
        assert_eq!(next, Some(52 * MS));
        assert!(k.is_cpu_idle(0) && !k.is_cpu_idle(1));
    }

    #[test]
    fn test_kt_st2_idle_cpus_are_not_programmed_at_start() {
        let mut k = one_timer(sampler::TH_INFO, MS);
        k.cpu_idle(1);
        assert_eq!(
            k.set_sampling(true, 0, 3).unwrap(),
            vec![Some(MS), None, Some(MS)]
        );
        assert_eq!(k.cpu_wake(1, 10), Some(MS));
    }

    #[test]
    fn test_kt_i2_hot_added_cpu_joins_the_grid() {
        let mut k = one_timer(sampler::TH_INFO, MS);
        k.set_sampling(true, 0, 2).unwrap();
        assert_eq!(k.expire(2, MS + 1), Expiry::NoSuchCpu);
        assert_eq!(k.cpu_wake(2, 2 * MS + 500), Some(3 * MS));
        assert!(matches!(k.expire(2, 3 * MS + 1), Expiry::Handled { .. }));
        // Online while off: cleared, nothing to program.
        k.set_sampling(false, 4 * MS, 3).unwrap();
        assert_eq!(k.cpu_wake(1, 5 * MS), None);
    }

    // --- Minimum periods (KT-MIN-*) --------------------------------------

    #[test]
    fn test_kt_min1_short_periods_are_raised() {
        let mut k = Kperf::new();
        k.set_timer_count(2).unwrap();
        k.set_timer_period(0, US).unwrap();
        assert_eq!(k.timer_period(0), Ok(20_000));
        k.set_pet_timer(1).unwrap();
        k.set_timer_period(1, US).unwrap();
        assert_eq!(k.timer_period(1), Ok(2_000_000));
        // 0 stays 0 (disabled) on an on-CPU timer.
        k.set_timer_period(0, 0).unwrap();
        assert_eq!(k.timer_period(0), Ok(0));
        // Background minima.
        k.set_background(true);
        k.set_timer_period(0, US).unwrap();
        assert_eq!(k.timer_period(0), Ok(1_000_000));
        k.set_timer_period(1, US).unwrap();
        assert_eq!(k.timer_period(1), Ok(5_000_000));
        // At or above the minimum: unchanged.
        k.set_timer_period(0, 1_000_001).unwrap();
        assert_eq!(k.timer_period(0), Ok(1_000_001));
    }

    #[test]
    fn test_kt_min2_limits() {
        let k = Kperf::new();
        assert_eq!(
            k.limits(),
            Limits {
                timer_min_period_ns: 20_000,
                timer_min_bg_period_ns: 1_000_000,
                timer_min_pet_period_ns: 2_000_000,
                timer_min_bg_pet_period_ns: 5_000_000,
            }
        );
        assert_eq!(k.min_period_ns(false), 20_000);
        assert_eq!(min_period_ns(true, true), 5_000_000);
    }

    #[test]
    fn test_kt_min3_mode_switch_does_not_reclamp() {
        let mut k = Kperf::new();
        k.set_timer_count(1).unwrap();
        k.set_timer_period(0, 30 * US).unwrap();
        k.set_background(true);
        assert!(k.background());
        assert_eq!(k.timer_period(0), Ok(30 * US));
        k.set_timer_period(0, 30 * US).unwrap();
        assert_eq!(k.timer_period(0), Ok(MS));
        k.set_background(false);
        assert_eq!(k.timer_period(0), Ok(MS));
    }

    // --- Start and stop (KT-ST-*, KT-SP-*) ----------------------------------

    #[test]
    fn test_kt_st1_period_zero_timer_never_fires() {
        let mut k = Kperf::new();
        k.set_action_count(1).unwrap();
        k.set_action_samplers(1, sampler::TH_INFO).unwrap();
        k.set_timer_count(3).unwrap();
        k.set_timer_period(0, MS).unwrap();
        k.set_timer_action(0, 1).unwrap();
        k.set_timer_action(1, 1).unwrap(); // period 0
        k.set_timer_period(2, MS / 2).unwrap(); // action 0
        k.set_sampling(true, 0, 1).unwrap();
        assert_eq!(k.timer(1).unwrap().deadline, 0);
        assert_eq!(k.timer(2).unwrap().deadline, 0);
        assert_eq!(k.cpu_deadline(0, 1), None);
        assert_eq!(k.cpu_deadline(0, 2), None);
        let mut now = 0;
        let mut next = Some(MS);
        for _ in 0..100 {
            now = next.unwrap() + 10;
            let (fires, n) = handled(k.expire(0, now));
            assert!(fires.iter().all(|f| f.timer == 0));
            next = n;
        }
        assert!(now > 99 * MS);
    }

    #[test]
    fn test_kt_st2_every_running_cpu_is_programmed() {
        let mut k = one_timer(sampler::TH_INFO, MS);
        let programs = k.set_sampling(true, 5 * MS, 4).unwrap();
        assert_eq!(programs, vec![Some(6 * MS); 4]);
        assert_eq!(k.timer(0).unwrap().deadline, 6 * MS);
        assert!(k.started());
        // A second start changes nothing.
        assert_eq!(k.start(7 * MS, 4), programs);
        assert_eq!(k.set_sampling(true, 8 * MS, 4).unwrap(), programs);
    }

    #[test]
    fn test_kt_st3_start_with_all_periods_zero_is_started() {
        let mut k = Kperf::new();
        k.set_action_count(1).unwrap();
        k.set_timer_count(2).unwrap();
        assert_eq!(k.set_sampling(true, 0, 2).unwrap(), vec![None, None]);
        assert!(k.started());
        assert_eq!(k.set_timer_period(0, MS), Err(KperfError::Busy));
        assert_eq!(k.set_timer_action(0, 1), Err(KperfError::Busy));
        assert_eq!(k.set_timer_count(1), Err(KperfError::Busy));
        assert_eq!(k.set_pet_timer(0), Err(KperfError::Busy));
        assert_eq!(k.set_lightweight_pet(true), Err(KperfError::Busy));
        // The id is checked before busy (CFG-T-2).
        assert_eq!(k.set_timer_period(2, MS), Err(KperfError::Inval));
        assert_eq!(k.set_timer_action(5, 1), Err(KperfError::Inval));
    }

    #[test]
    fn test_kt_sp1_after_stop_no_fires() {
        let mut k = one_timer(sampler::TH_INFO, MS);
        k.set_sampling(true, 0, 2).unwrap();
        handled(k.expire(0, MS + 1));
        assert_eq!(k.set_sampling(false, MS + 2, 2).unwrap(), vec![None, None]);
        assert!(!k.started());
        assert_eq!(k.timer(0).unwrap().deadline, 0);
        assert_eq!(k.cpu_deadline(0, 0), None);
        assert_eq!(k.cpu_deadline(1, 0), None);
        // A host deadline that outlived the stop.
        assert_eq!(k.expire(1, MS + 3), Expiry::NotRunning);
        // Stop on stopped timers is a no-op; setters work again.
        k.stop();
        k.set_timer_period(0, 2 * MS).unwrap();
    }

    #[test]
    fn test_kt_sp1_start_stop_stress() {
        let mut k = one_timer(sampler::TH_INFO, MS);
        let mut now = 0;
        for _ in 0..500 {
            let programs = k.set_sampling(true, now, 2).unwrap();
            assert_eq!(programs, vec![Some(now + MS); 2]);
            now += MS + 7;
            assert_eq!(handled(k.expire(0, now)).0.len(), 1);
            k.set_sampling(false, now, 2).unwrap();
            assert_eq!(k.expire(1, now + 1), Expiry::NotRunning);
        }
    }

    #[test]
    fn test_kt_f1_shutdown_clears_the_cpu_and_samples_nothing() {
        let mut k = one_timer(sampler::TH_INFO, MS);
        k.set_sampling(true, 0, 2).unwrap();
        assert_eq!(k.begin_shutdown(), Ok(true));
        assert_eq!(k.sampling_state(), SamplingState::Shutdown);
        assert!(!k.sampling());
        assert_eq!(handled(k.expire(0, MS + 1)), (vec![], None));
        assert_eq!(k.cpu_deadline(0, 0), None);
        // Neither transition is allowed mid-shutdown (XNU would panic).
        assert_eq!(k.set_sampling(true, MS, 2), Err(KperfError::Busy));
        assert_eq!(k.set_sampling(false, MS, 2), Err(KperfError::Busy));
        assert_eq!(k.begin_shutdown(), Err(KperfError::Busy));
        k.finish_shutdown();
        assert_eq!(k.sampling_state(), SamplingState::Off);
        assert_eq!(k.expire(0, MS + 2), Expiry::NotRunning);
        assert_eq!(k.begin_shutdown(), Ok(false));
    }

    #[test]
    fn test_kt_sp2_reset_keeps_counts_and_clears_the_rest() {
        let mut k = Kperf::new();
        k.set_action_count(2).unwrap();
        k.set_action_samplers(1, sampler::KSTACK).unwrap();
        k.set_action_userdata(2, 7).unwrap();
        k.set_action_filter(2, 42).unwrap();
        k.set_action_ucallstack_depth(1, 16).unwrap();
        k.set_action_kcallstack_depth(1, 8).unwrap();
        k.set_timer_count(3).unwrap();
        for id in 0..3 {
            k.set_timer_period(id, MS).unwrap();
            k.set_timer_action(id, 1).unwrap();
        }
        k.set_pet_timer(2).unwrap();
        k.set_pet_idle_rate(3).unwrap();
        k.set_background(true);
        k.set_sampling(true, 0, 2).unwrap();

        k.reset();
        assert_eq!(k.sampling_state(), SamplingState::Off);
        assert!(!k.started());
        assert_eq!(k.timer_count(), 3);
        assert_eq!(k.action_count(), 2);
        for id in 0..3 {
            assert_eq!(k.timer_period(id), Ok(0));
            assert_eq!(k.timer_action(id), Ok(0));
            assert_eq!(k.cpu_deadline(0, id), None);
        }
        assert_eq!(k.pet_timer(), PET_TIMER_NONE);
        assert_eq!(k.pet_action(), 0);
        assert_eq!(k.pet_deadline(), None);
        assert_eq!(k.pet_idle_rate(), 15);
        assert!(!k.lightweight_pet());
        for id in 1..=2 {
            assert_eq!(k.action_samplers(id), Ok(0));
            assert_eq!(k.action_userdata(id), Ok(0));
            assert_eq!(k.action_filter(id), Ok(-1));
            assert_eq!(k.action_ucallstack_depth(id), Ok(256));
            assert_eq!(k.action_kcallstack_depth(id), Ok(128));
        }
        // The background profile belongs to the tool, not to kperf.
        assert!(k.background());
        // Reset while off is fine too.
        k.reset();
    }

    // --- Sampling state machine (CFG-S-*) ---------------------------------

    #[test]
    fn test_cfg_s1_transitions() {
        let mut k = Kperf::new();
        assert_eq!(k.set_sampling(true, 0, 1), Err(KperfError::Canceled));
        assert_eq!(k.sampling_state(), SamplingState::Off);
        k.set_action_count(1).unwrap();
        assert!(k.set_sampling(true, 0, 1).is_ok());
        assert!(k.set_sampling(true, 0, 1).is_ok());
        assert!(k.sampling());
        assert!(k.set_sampling(false, 0, 1).is_ok());
        assert!(k.set_sampling(false, 0, 1).is_ok());
        assert!(!k.sampling());
        assert_eq!(k.sampling_state(), SamplingState::Off);
        // Disabling something never enabled is fine.
        assert_eq!(Kperf::new().set_sampling(false, 0, 2), Ok(vec![None, None]));
    }

    #[test]
    fn test_cfg_s1_lightweight_pet_activity_follows_sampling() {
        let mut k = one_timer(sampler::TH_INFO, 2 * MS);
        k.set_lightweight_pet(true).unwrap();
        assert!(!k.lightweight_pet_active());
        k.set_sampling(true, 0, 1).unwrap();
        assert!(k.lightweight_pet_active());
        k.set_sampling(false, 0, 1).unwrap();
        assert!(!k.lightweight_pet_active());
    }

    // --- Actions (CFG-A-*) ----------------------------------------------

    #[test]
    fn test_cfg_a1_count_only_grows() {
        let mut k = Kperf::new();
        assert_eq!(k.set_action_count(4), Ok(()));
        assert_eq!(k.set_action_count(2), Err(KperfError::Inval));
        assert_eq!(k.set_action_count(4), Ok(()));
        assert_eq!(k.set_action_count(33), Err(KperfError::Inval));
        assert_eq!(k.set_action_count(32), Ok(()));
        assert_eq!(k.action_count(), 32);
        for id in 1..=32 {
            assert_eq!(k.action_samplers(id), Ok(0));
            assert_eq!(k.action_userdata(id), Ok(0));
            assert_eq!(k.action_filter(id), Ok(-1));
            assert_eq!(k.action_ucallstack_depth(id), Ok(256));
            assert_eq!(k.action_kcallstack_depth(id), Ok(128));
        }
    }

    #[test]
    fn test_cfg_a1_count_grows_while_sampling() {
        let mut k = one_timer(sampler::TH_INFO, MS);
        k.set_sampling(true, 0, 1).unwrap();
        assert_eq!(k.set_action_count(3), Ok(()));
        assert_eq!(k.set_action_samplers(3, sampler::KSTACK), Ok(()));
    }

    #[test]
    fn test_cfg_a2_id_matrix() {
        let mut k = Kperf::new();
        k.set_action_count(3).unwrap();
        let count = k.action_count();
        let inval = Err(KperfError::Inval);
        for id in [0, 1, count, count + 1] {
            let set_ok = id != 0 && id <= count;
            let get_ok = id <= count;
            let expect = |ok: bool| if ok { Ok(()) } else { inval };
            assert_eq!(k.set_action_samplers(id, sampler::TH_INFO), expect(set_ok));
            assert_eq!(k.set_action_userdata(id, 9), expect(set_ok));
            assert_eq!(k.set_action_filter(id, 5), expect(set_ok));
            assert_eq!(k.set_action_ucallstack_depth(id, 64), expect(set_ok));
            assert_eq!(k.set_action_kcallstack_depth(id, 32), expect(set_ok));
            if !get_ok {
                assert_eq!(k.action_samplers(id), inval.map(|()| 0));
                assert_eq!(k.action_userdata(id), inval.map(|()| 0));
                assert_eq!(k.action_filter(id), inval.map(|()| 0));
                assert_eq!(k.action_ucallstack_depth(id), inval.map(|()| 0));
                assert_eq!(k.action_kcallstack_depth(id), inval.map(|()| 0));
            } else if id == 0 {
                // The null action reads as the defaults.
                assert_eq!(k.action_samplers(0), Ok(0));
                assert_eq!(k.action_userdata(0), Ok(0));
                assert_eq!(k.action_filter(0), Ok(-1));
                assert_eq!(k.action_ucallstack_depth(0), Ok(256));
                assert_eq!(k.action_kcallstack_depth(0), Ok(128));
            } else {
                assert_eq!(k.action_samplers(id), Ok(sampler::TH_INFO));
                assert_eq!(k.action_userdata(id), Ok(9));
                assert_eq!(k.action_filter(id), Ok(5));
                assert_eq!(k.action_ucallstack_depth(id), Ok(64));
                assert_eq!(k.action_kcallstack_depth(id), Ok(32));
            }
        }
    }

    #[test]
    fn test_cfg_a3_depth_boundaries() {
        let mut k = Kperf::new();
        k.set_action_count(1).unwrap();
        let inval = Err(KperfError::Inval);
        for (depth, expect) in [(1, inval), (2, Ok(())), (256, Ok(())), (257, inval)] {
            assert_eq!(k.set_action_ucallstack_depth(1, depth), expect, "{depth}");
        }
        assert_eq!(k.action_ucallstack_depth(1), Ok(256));
        for (depth, expect) in [(0, inval), (1, Ok(())), (128, Ok(())), (129, inval)] {
            assert_eq!(k.set_action_kcallstack_depth(1, depth), expect, "{depth}");
        }
        assert_eq!(k.action_kcallstack_depth(1), Ok(128));
        // The id is checked before the depth.
        assert_eq!(k.set_action_ucallstack_depth(2, 1), inval);
    }

    #[test]
    fn test_cfg_a3_amb14_pmc_bits_accepted_but_not_both() {
        let mut k = Kperf::new();
        k.set_action_count(1).unwrap();
        k.set_action_samplers(1, sampler::TH_INFO).unwrap();
        assert_eq!(
            k.set_action_samplers(1, sampler::PMC_THREAD | sampler::PMC_CPU),
            Err(KperfError::Inval)
        );
        assert_eq!(k.action_samplers(1), Ok(sampler::TH_INFO));
        for bits in [sampler::PMC_THREAD, sampler::PMC_CPU | sampler::PMC_CONFIG] {
            assert_eq!(k.set_action_samplers(1, bits), Ok(()));
            assert_eq!(k.action_samplers(1), Ok(bits));
        }
    }

    // --- Timers (CFG-T-*) -----------------------------------------------

    #[test]
    fn test_cfg_t1_hidden_timers_reappear() {
        let mut k = Kperf::new();
        assert_eq!(k.set_timer_count(9), Err(KperfError::Inval));
        k.set_timer_count(2).unwrap();
        k.set_timer_period(1, 5 * MS).unwrap();
        k.set_timer_action(1, 3).unwrap();
        k.set_timer_count(1).unwrap();
        assert_eq!(k.timer_period(1), Err(KperfError::Inval));
        assert_eq!(k.timer(1), None);
        k.set_timer_count(2).unwrap();
        assert_eq!(k.timer_period(1), Ok(5 * MS));
        assert_eq!(k.timer_action(1), Ok(3));
        assert_eq!(k.set_timer_count(8), Ok(()));
    }

    #[test]
    fn test_cfg_t2_action_not_checked_against_count() {
        let mut k = Kperf::new();
        k.set_action_count(1).unwrap();
        k.set_timer_count(1).unwrap();
        k.set_timer_period(0, MS).unwrap();
        assert_eq!(k.set_timer_action(0, 99), Ok(()));
        assert_eq!(k.timer_action(0), Ok(99));
        k.set_sampling(true, 0, 2).unwrap();
        // It fires; the leader still gets a request (which the sampler
        // drops, KT-SM-4), a follower none.
        let (fires, _) = handled(k.expire(0, MS + 1));
        assert_eq!(fires[0].sample.map(|s| s.action), Some(99));
        let (fires, _) = handled(k.expire(1, MS + 2));
        assert_eq!(fires[0].sample, None);
        assert!(!k.action_has_non_system(99));
    }

    #[test]
    fn test_cfg_t2_getters_check_the_id() {
        let mut k = Kperf::new();
        k.set_timer_count(2).unwrap();
        for id in [0, 1] {
            assert_eq!(k.timer_period(id), Ok(0));
            assert_eq!(k.timer_action(id), Ok(0));
        }
        for id in [2, 8, PET_TIMER_NONE] {
            assert_eq!(k.timer_period(id), Err(KperfError::Inval));
            assert_eq!(k.timer_action(id), Err(KperfError::Inval));
            assert_eq!(k.set_timer_period(id, MS), Err(KperfError::Inval));
            assert_eq!(k.set_timer_action(id, 1), Err(KperfError::Inval));
        }
    }

    #[test]
    fn test_cfg_t3_pet_timer_clamp_and_out_of_range_id() {
        let mut k = Kperf::new();
        assert_eq!(k.pet_timer(), PET_TIMER_NONE);
        k.set_timer_count(1).unwrap();
        k.set_timer_action(0, 4).unwrap();
        k.set_pet_timer(0).unwrap();
        assert_eq!(k.timer_period(0), Ok(2 * MS));
        assert_eq!(k.pet_action(), 4);
        k.set_pet_timer(5).unwrap();
        assert_eq!(k.pet_timer(), 5);
        assert_eq!(k.pet_action(), 0);
        // The old PET timer keeps its raised period.
        assert_eq!(k.timer_period(0), Ok(2 * MS));
    }

    #[test]
    fn test_cfg_t2_pet_timer_settings_reconfigure_pet() {
        let mut k = Kperf::new();
        k.set_timer_count(1).unwrap();
        k.set_pet_timer(0).unwrap();
        k.set_timer_action(0, 2).unwrap();
        assert_eq!(k.pet_action(), 2);
        // PET-L-4: in lightweight mode only set_pet_timer captures it.
        k.set_lightweight_pet(true).unwrap();
        k.set_timer_action(0, 3).unwrap();
        assert_eq!(k.pet_action(), 2);
        k.set_pet_timer(0).unwrap();
        assert_eq!(k.pet_action(), 3);
    }

    // --- PET (CFG-P-1, PET-*) -------------------------------------------

    #[test]
    fn test_cfg_p1_amb13_idle_rate() {
        let mut k = Kperf::new();
        assert_eq!(k.pet_idle_rate(), 15);
        assert_eq!(k.set_pet_idle_rate(0), Err(KperfError::Inval));
        assert_eq!(k.set_pet_idle_rate(1), Ok(()));
        assert_eq!(k.pet_idle_rate(), 1);
        k.set_action_count(1).unwrap();
        k.set_sampling(true, 0, 1).unwrap();
        assert_eq!(k.set_pet_idle_rate(40), Ok(()));
        assert_eq!(k.pet_idle_rate(), 40);
    }

    /// Traditional PET on timer 0 (10 ms) plus an on-CPU timer 1 (1 ms).
    fn traditional_pet() -> Kperf {
        let mut k = Kperf::new();
        k.set_action_count(2).unwrap();
        k.set_action_samplers(1, sampler::TH_INFO | sampler::USTACK)
            .unwrap();
        k.set_action_samplers(2, sampler::KSTACK).unwrap();
        k.set_timer_count(2).unwrap();
        k.set_pet_timer(0).unwrap();
        k.set_timer_period(0, 10 * MS).unwrap();
        k.set_timer_action(0, 1).unwrap();
        k.set_timer_period(1, MS).unwrap();
        k.set_timer_action(1, 2).unwrap();
        k
    }

    #[test]
    fn test_pet_h1_traditional_pet_is_not_an_on_cpu_timer() {
        let mut k = traditional_pet();
        k.set_timer_period(1, 0).unwrap();
        assert_eq!(k.set_sampling(true, 0, 3).unwrap(), vec![None; 3]);
        assert_eq!(k.pet_deadline(), Some(10 * MS));
        assert_eq!(k.timer(0).unwrap().deadline, 0);
        assert_eq!(k.pet_action(), 1);
    }

    #[test]
    fn test_pet_h2_handler_kicks_and_samples() {
        let mut k = traditional_pet();
        assert_eq!(k.set_sampling(true, 0, 3).unwrap(), vec![Some(MS); 3]);
        assert_eq!(k.pet_fired(10 * MS - 1), None);
        let fire = k.pet_fired(10 * MS + 5).unwrap();
        assert_eq!((fire.timer, fire.action, fire.period_ns), (0, 1, 10 * MS));
        assert_eq!(fire.tm_fire_args(), [0, 1, 10 * MS, 1]);
        assert_eq!(fire.handler_cpu, 0);
        assert_eq!(fire.remote_cpus, vec![1, 2]);
        assert_eq!(fire.remote_sample.flags, sample_flags::PEND_USER);
        assert_eq!(
            fire.handler_sample.flags,
            sample_flags::PEND_USER | sample_flags::SYSTEM
        );
        assert_eq!(k.pet_broadcasts(), 1);
        // Disarmed until the sampler re-arms it.
        assert_eq!(k.pet_deadline(), None);
        assert_eq!(k.pet_fired(20 * MS), None);
        assert_eq!(k.pet_broadcasts(), 1);
        // The on-CPU timer 1 never reports the PET timer.
        let (fires, _) = handled(k.expire(1, MS + 1));
        assert_eq!(fires.len(), 1);
        assert_eq!((fires[0].timer, fires[0].pet), (1, false));
    }

    #[test]
    fn test_pet_r1_rearm_examples() {
        let mut k = traditional_pet();
        k.set_sampling(true, 0, 1).unwrap();
        let schedule = k.pet_rearm(100 * MS, 3 * MS).unwrap();
        assert_eq!(
            schedule,
            PetSchedule {
                period_ns: 10 * MS,
                adjusted_period_ns: 7 * MS,
                sample_duration_ns: 3 * MS,
                deadline: 107 * MS,
            }
        );
        assert_eq!(k.pet_deadline(), Some(107 * MS));
        assert_eq!(k.pet_rearm(100 * MS, 12 * MS).unwrap().deadline, 110 * MS);
        k.set_sampling(false, 0, 1).unwrap();
        // Not sampling: no re-arm.
        assert_eq!(k.pet_rearm(100 * MS, 0), None);
        assert_eq!(k.pet_deadline(), None);

        k.set_timer_period(0, 2 * MS).unwrap();
        k.set_sampling(true, 0, 1).unwrap();
        let schedule = k.pet_rearm(50 * MS, 3 * MS / 2).unwrap();
        assert_eq!(schedule.adjusted_period_ns, 2 * MS);
        assert_eq!(schedule.deadline, 52 * MS);
    }

    #[test]
    fn test_pet_c1_broadcast_counter_survives_reset() {
        let mut k = traditional_pet();
        let mut now = 0;
        k.set_sampling(true, now, 2).unwrap();
        for _ in 0..100 {
            now = k.pet_deadline().unwrap() + 50;
            k.pet_fired(now).unwrap();
            k.pet_rearm(now + MS, MS).unwrap();
        }
        assert_eq!(k.pet_broadcasts(), 100);
        k.reset();
        assert_eq!(k.pet_broadcasts(), 100);
        assert_eq!(k.pet_deadline(), None);
    }

    #[test]
    fn test_pet_l1_lightweight_pet_is_on_cpu_and_counts_generations() {
        let mut k = one_timer(sampler::TH_INFO, 2 * MS);
        k.set_pet_timer(0).unwrap();
        k.set_lightweight_pet(true).unwrap();
        let mut sim = Sim::new(k, 3, 0, 100 * US);
        assert_eq!(sim.kperf.pet_deadline(), None);
        assert!((0..3).all(|cpu| sim.kperf.cpu_next_deadline(cpu) == Some(2 * MS)));
        sim.run_until(200 * MS);
        let leaders = sim.leaders();
        assert_eq!(sim.kperf.pet_generation(), leaders.len() as u64);
        assert!(leaders
            .iter()
            .all(|s| s.fire.pet && s.fire.tm_fire_args() == [0, 1, 2 * MS, 1]));
        assert_eq!(sim.kperf.pet_broadcasts(), 0);
    }
}
