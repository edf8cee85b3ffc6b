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
//!   [`KpTimer::elect`], a function of one timer's global state and one vCPU's
//!   deadline, so one mutex held across [`Kperf::expire`] (at most 8 short
//!   elections) subsumes every `kt_lock`. A VMM that ever splits the lock
//!   needs, per expiry, only the fired timer's lock around [`KpTimer::elect`]
//!   and the `PERF_TM_FIRE` record: a vCPU's deadline row is only touched by
//!   that vCPU's own expiry, wake and idle calls. Configuration, start, stop
//!   and reset still need exclusive access to everything (XNU's ktrace lock
//!   plus its synchronous broadcasts).
//! - **Trace order (TR-P-5).** For each [`Fire`] with `leader == true`, append
//!   `PERF_TM_FIRE` ([`Fire::tm_fire_args`]) *before releasing the lock*, and
//!   each request's `PERF_TM_HNDLR` start there too; take the samples (and
//!   record `PERF_TM_HNDLR` end) after releasing it. Any vCPU answering the
//!   same fire takes the lock first, so its handler events follow the
//!   `PERF_TM_FIRE`, and no later fire's `PERF_TM_FIRE` can precede a
//!   handler start even if the sampling thread is preempted.
//! - **Per-vCPU host deadline.** Each vCPU has one kperf host deadline (the
//!   XNU "running timer"). Program it with what [`Kperf::set_sampling`],
//!   [`Kperf::expire`] and [`Kperf::cpu_wake`] return (`None` = cancel). When
//!   it expires, kick the vCPU; with the guest stopped, its thread calls
//!   `expire(cpu, now)`, programs `next_deadline` and takes the samples.
//!   [`CpuExpiry::NotRunning`] and [`CpuExpiry::NoSuchCpu`] are counted, not fatal.
//! - **Idle (KT-I-1, AMB-15).** When a vCPU halts (or the guest reports it
//!   idle), call [`Kperf::cpu_idle`] and cancel its kperf host deadline; do not
//!   kick it for on-CPU timers. When it resumes, program [`Kperf::cpu_wake`].
//! - **Start and stop.** [`Kperf::set_sampling`]`(true, ..)` returns one
//!   deadline per vCPU: kick each vCPU to program it (KT-ST-2), and arm the PET
//!   one-shot at [`Kperf::pet_deadline`] if it is `Some`. Stop as described
//!   in [Stopping sampling](#stopping-sampling-kt-f-1-kt-sp-1-amb-17).
//! - **Traditional PET.** When the PET one-shot expires, call
//!   [`Kperf::pet_fired`]: kick the other vCPUs without waiting (each samples
//!   itself only if [`Kperf::sampling`] is still true when it runs), wake the
//!   PET sampler, then sample the handler vCPU. When the sampler is done, arm
//!   the one-shot at the deadline of [`Kperf::pet_rearm`].
//! - **Lightweight PET.** Under the lock, after each [`Kperf::expire`] and
//!   after start and stop, tell the guest [`Kperf::pet_generation`] while
//!   [`Kperf::lightweight_pet_active`] (0 otherwise); when a thread is
//!   switched on with a stale generation, sample it with
//!   [`Kperf::pet_action`] and `NON_INTERRUPT | PEND_USER` (PET-L-2), and
//!   stamp every thread sampled with the generation (KT-SM-6).
//!
//! # Stopping sampling (KT-F-1, KT-SP-1, AMB-17)
//!
//! A stop must not return while a vCPU may still take a sample, and a kick
//! already in flight must find nothing to sample. XNU's `SHUTDOWN` state does
//! both; the VMM stops in three steps:
//!
//! 1. **Begin**, with the engine locked: [`Kperf::begin_shutdown`] moves
//!    `On -> Shutdown` and stops the timers (every global and per-vCPU
//!    deadline cleared, the PET one-shot disarmed). Cancel every vCPU's kperf
//!    host deadline and the PET one-shot, then release the lock. `Ok(false)`
//!    means sampling was already off: there is nothing to wait for.
//! 2. **Wait**, without the lock: kick every vCPU and wait until each one
//!    acknowledged the stop, i.e. went through a point where it holds no
//!    sample in progress (a vCPU whose thread exited counts as acknowledged).
//!    Meanwhile, in `Shutdown`:
//!    - [`Kperf::expire`] (a kick that was in flight) clears that vCPU's
//!      deadlines and returns [`CpuExpiry::ShuttingDown`]: nothing to sample,
//!      the host deadline stays cancelled;
//!    - [`Kperf::cpu_wake`] and [`Kperf::cpu_next_deadline`] return `None`;
//!    - [`Kperf::pet_fired`] and [`Kperf::pet_rearm`] return `None`;
//!    - [`Kperf::set_sampling`] (either way) and [`Kperf::begin_shutdown`]
//!      return [`KperfError::Busy`].
//! 3. **Finish**, with the engine locked: [`Kperf::finish_shutdown`] moves
//!    `Shutdown -> Off`. From then on an expiry is
//!    [`CpuExpiry::NotRunning`], and [`Kperf::set_sampling`]`(true, ..)`
//!    starts again from fresh deadlines.
//!
//! [`Kperf::set_sampling`]`(false, ..)` does steps 1 and 3 at once, for a
//! caller with no vCPU to wait for (all of them stopped); an expiry that
//! raced it sees `Off` and gets [`CpuExpiry::NotRunning`], which the VMM
//! counts.
//!
//! ```
//! use kperf::{sampler, CpuExpiry, Kperf, SamplingState};
//!
//! let mut kperf = Kperf::new();
//! kperf.set_action_count(1).unwrap();
//! kperf.set_action_samplers(1, sampler::TH_INFO).unwrap();
//! kperf.set_timer_count(1).unwrap();
//! kperf.set_timer_period(0, 1_000_000).unwrap();
//! kperf.set_timer_action(0, 1).unwrap();
//! kperf.set_sampling(true, 0, 2).unwrap();
//!
//! // 1. Begin: every host deadline is cancelled.
//! assert_eq!(kperf.begin_shutdown(), Ok(true));
//! assert_eq!(kperf.cpu_next_deadline(0), None);
//! // 2. vCPU 1's kick was in flight: it samples nothing and stays cancelled.
//! let expiry = kperf.expire(1, 1_000_050);
//! assert_eq!(expiry, CpuExpiry::ShuttingDown);
//! // 3. Finish, once every vCPU acknowledged.
//! kperf.finish_shutdown();
//! assert_eq!(kperf.sampling_state(), SamplingState::Off);
//! assert_eq!(kperf.set_sampling(true, 2_000_000, 2), Ok(vec![Some(3_000_000); 2]));
//! ```
//!
//! # Deviations from xnu-8019.41.5, all deliberate
//!
//! | XNU | Here |
//! |---|---|
//! | A timer fires while sampling is off: panic (KT-F-1) | [`CpuExpiry::NotRunning`] |
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
//! use kperf::{sample_flags, sampler, CpuExpiry, Kperf};
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
//! let CpuExpiry::Handled { fires, next_deadline } = kperf.expire(0, 1_000_050) else { panic!() };
//! assert!(fires[0].leader);
//! let sample = fires[0].sample.unwrap();
//! assert_eq!(sample.flags, sample_flags::PEND_USER | sample_flags::SYSTEM);
//! assert_eq!(next_deadline, Some(2_000_000));
//!
//! let CpuExpiry::Handled { fires, next_deadline } = kperf.expire(1, 1_000_090) else { panic!() };
//! assert!(!fires[0].leader);
//! assert_eq!(fires[0].sample.unwrap().flags, sample_flags::PEND_USER);
//! assert_eq!(next_deadline, Some(2_000_000));
//!
//! assert_eq!(kperf.set_sampling(false, 1_500_000, 2).unwrap(), vec![None, None]);
//! ```

#![deny(missing_docs)]

mod action;
mod engine;
mod error;
mod pet;
pub mod sample_flags;
pub mod sampler;
mod timer;
pub mod trace;

#[cfg(test)]
mod tests;

pub use action::Action;
pub use engine::{CpuExpiry, Fire, Kperf, SampleRequest, SamplingState};
pub use error::KperfError;
pub use pet::{PetFire, PetSchedule};
pub use sampler::SamplerListError;
pub use timer::{dead_reckon, min_period_ns, Election, KpTimer, Limits};

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
pub(crate) const NO_DEADLINE: u64 = u64::MAX;
