//! Why a kperf configuration cannot be used ([`KperfConfigError`]).

use std::path::PathBuf;

use kperf::{ACTION_MAX, KPTIMER_MAX};

use super::kperf::MAX_PERIOD_NS;

/// A kperf configuration that cannot be used. Each message says what was
/// wrong and what is allowed, with the spec statement where there is one.
#[derive(Debug, thiserror::Error)]
pub enum KperfConfigError {
    /// The `--kperf` file could not be read.
    #[error("cannot read the --kperf file '{}'", path.display())]
    Read {
        /// The path given.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The `--kperf` file is not JSON of the schema (malformed, an unknown
    /// field, a missing one, an unknown sampler).
    #[error(
        "the --kperf file '{}' does not follow the kperf configuration schema (README, \"The \
         --kperf file\")",
        path.display()
    )]
    Parse {
        /// The path given.
        path: PathBuf,
        /// What serde_json found.
        #[source]
        source: serde_json::Error,
    },
    /// An action count kperf refuses, or 0.
    #[error(
        "action_count {0} is out of range: 1 to {ACTION_MAX} actions (CFG-A-1; without an action \
         sampling cannot start, CFG-S-1)"
    )]
    ActionCount(u32),
    /// A timer count above [`KPTIMER_MAX`].
    #[error("timer_count {0} is out of range: 0 to {KPTIMER_MAX} timers (CFG-T-1, KT-S-1)")]
    TimerCount(u32),
    /// An action id that is 0 or above the action count.
    #[error(
        "action id {id} is out of range: action ids are 1 to action_count ({count}) (CFG-A-2)"
    )]
    ActionId {
        /// The id given.
        id: u32,
        /// The action count.
        count: u32,
    },
    /// The same action twice.
    #[error("action id {0} is listed twice: each action is listed at most once")]
    DuplicateAction(u32),
    /// An action with both PMC samplers.
    #[error("action {0} has both pmc_thread and pmc_cpu: they exclude each other (CFG-A-3)")]
    PmcThreadAndCpu(u32),
    /// A call-stack depth out of range.
    #[error("action {action}: {field} {depth} is out of range: {min} to {max} frames (CFG-A-3)")]
    StackDepth {
        /// The action id.
        action: u32,
        /// `user_stack_depth` or `kernel_stack_depth`.
        field: &'static str,
        /// The depth given.
        depth: u32,
        /// The shallowest depth allowed.
        min: u32,
        /// The deepest depth allowed.
        max: u32,
    },
    /// A timer id at or above the timer count.
    #[error(
        "timer id {id} is out of range: timer ids are 0 to timer_count - 1 \
         (timer_count is {count}) (CFG-T-2)"
    )]
    TimerId {
        /// The id given.
        id: u32,
        /// The timer count.
        count: u32,
    },
    /// The same timer twice.
    #[error("timer id {0} is listed twice: each timer is listed at most once")]
    DuplicateTimer(u32),
    /// A timer period above [`MAX_PERIOD_NS`].
    #[error(
        "timer {timer}: period_ns {period_ns} is out of range: 0 (inactive) to {MAX_PERIOD_NS} ns \
         (periods below the minimum are raised to it, KT-MIN-1)"
    )]
    TimerPeriod {
        /// The timer id.
        timer: u32,
        /// The period given.
        period_ns: u64,
    },
    /// A timer whose action is beyond the action count.
    #[error(
        "timer {timer}: action_id {action} is beyond action_count ({count}): a timer's action is \
         1 to action_count, or 0 for an inactive timer (XNU accepts it and samples nothing, \
         CFG-T-2; Metronome refuses it)"
    )]
    TimerAction {
        /// The timer id.
        timer: u32,
        /// The action id given.
        action: u32,
        /// The action count.
        count: u32,
    },
    /// A PET timer that is not one of the timers.
    #[error(
        "pet.timer_id {id} is not a timer: the PET timer is one of 0 to timer_count - 1 \
         (timer_count is {count}) (XNU would silently disable PET, CFG-T-3; Metronome refuses it)"
    )]
    PetTimer {
        /// The id given.
        id: u32,
        /// The timer count.
        count: u32,
    },
    /// A PET idle rate of 0.
    #[error("the PET idle rate 0 is refused: it is at least 1 (AMB-13: XNU would divide by 0)")]
    PetIdleRate,
    /// `kick_every` on an action whose tier is not `hybrid`, or out of range.
    #[error(
        "action {action}: kick_every {kick_every} is refused: it is given with \"tier\": \"hybrid\" \
         only, {min} to {max} (a kick with stacks every Nth period; default {default})",
        min = super::kperf::KICK_EVERY_MIN,
        max = super::kperf::KICK_EVERY_MAX,
        default = super::kperf::KICK_EVERY_DEFAULT
    )]
    KickEvery {
        /// The action.
        action: u32,
        /// The value given.
        kick_every: u32,
    },
    /// More than one active timer uses a no-exit or hybrid action, or the
    /// PET timer does.
    #[error(
        "timer {timer} cannot use action {action} ({tier} tier): {why}; one on-CPU timer at most \
         may use a no-exit or hybrid action (one perf event per vCPU), and not the PET timer"
    )]
    TierTimer {
        /// The timer refused.
        timer: u32,
        /// Its action.
        action: u32,
        /// The action's tier.
        tier: &'static str,
        /// What conflicts.
        why: &'static str,
    },
    /// The engine refused a value the rules above let through (a bug).
    #[error("kperf refused the configuration: {0}")]
    Engine(kperf::KperfError),
    /// A sampler that would capture nothing meaningful in this VM on this
    /// host ([`super::KperfConfig::check_samplers`]).
    #[error("action {action}: sampler {sampler} is refused: {reason}")]
    SamplerRefused {
        /// The action id.
        action: u32,
        /// The sampler's name ([`kperf::sampler::NAMES`]).
        sampler: &'static str,
        /// Why.
        reason: String,
    },
}
