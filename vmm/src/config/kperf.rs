//! The kperf configuration: every action, timer and PET knob of the engine
//! (spec section 5), as plain data. The command line reads it from a JSON
//! file (`--kperf FILE`) or builds it from its shorthands
//! ([`KperfShorthand`]); [`KperfConfig::engine`] applies it to a
//! [`kperf::Kperf`], and [`KperfConfig::from_engine`] reads back the values in
//! force (periods after the minimum, KT-MIN-1).
//!
//! ```
//! use vmm::config::KperfConfig;
//!
//! let config: KperfConfig = serde_json::from_str(r#"{
//!     "action_count": 1, "timer_count": 1,
//!     "actions": [{"id": 1, "samplers": ["th_info", "kstack"]}],
//!     "timers": [{"id": 0, "period_ns": 5000, "action_id": 1}]
//! }"#).unwrap();
//! let engine = config.engine().unwrap();
//! // 5 us is below the on-CPU minimum: raised to 20 us (KT-MIN-1).
//! assert_eq!(KperfConfig::from_engine(&engine).timers[0].period_ns, 20_000);
//! ```

use std::path::Path;

use kperf::{
    sampler, Kperf, KCALLSTACK_DEPTH_MAX, KCALLSTACK_DEPTH_MIN, PET_DEFAULT_IDLE_RATE,
    PID_FILTER_ALL, UCALLSTACK_DEPTH_MAX, UCALLSTACK_DEPTH_MIN,
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::ConfigError;
use crate::pmu::NoGuestPmu;

pub use super::kperf_error::KperfConfigError;
pub use super::samplers::{sampler_refusal, Samplers};

/// The longest timer period accepted, in ns (10 s; a VMM rule, not kperf's).
pub const MAX_PERIOD_NS: u64 = 10_000_000_000;
/// The hybrid tier's kick interval when none is given: a kick with stacks
/// every 10th period.
pub const KICK_EVERY_DEFAULT: u32 = 10;
/// The smallest hybrid kick interval (1 would be the kick tier).
pub const KICK_EVERY_MIN: u32 = 2;
/// The largest hybrid kick interval.
pub const KICK_EVERY_MAX: u32 = 1000;

/// How an action's timer samples a vCPU (not in XNU: the VMM's choice).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum SampleTier {
    /// Each period kicks the vCPU out of `KVM_RUN`, which samples itself:
    /// registers, thread, user and kernel stacks, every sampler.
    #[default]
    Kick,
    /// No vCPU exit: a `perf_event_open` cpu-clock event on each vCPU thread
    /// samples the guest instruction pointer in the host kernel; the guest
    /// thread comes from the guest's context-switch log. Instruction pointer
    /// and thread only.
    NoExit,
    /// No-exit samples every period, plus a kick with stacks every
    /// `kick_every`th period.
    Hybrid,
}

impl SampleTier {
    /// Its name in the configuration.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Kick => "kick",
            Self::NoExit => "no-exit",
            Self::Hybrid => "hybrid",
        }
    }

    fn is_kick(&self) -> bool {
        *self == Self::Kick
    }

    /// The engine's [`kperf::Action::kick_every`] for this tier.
    fn kick_every(self, hybrid_every: Option<u32>) -> u32 {
        match self {
            Self::Kick => 1,
            Self::NoExit => 0,
            Self::Hybrid => hybrid_every.unwrap_or(KICK_EVERY_DEFAULT),
        }
    }

    /// The tier and the hybrid interval an engine's `kick_every` stands for.
    fn from_kick_every(every: u32) -> (Self, Option<u32>) {
        match every {
            0 => (Self::NoExit, None),
            1 => (Self::Kick, None),
            n => (Self::Hybrid, Some(n)),
        }
    }
}

impl std::str::FromStr for SampleTier {
    type Err = String;

    /// `kick`, `no-exit` or `hybrid`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Self::Kick, Self::NoExit, Self::Hybrid]
            .into_iter()
            .find(|tier| tier.name() == s)
            .ok_or_else(|| format!("unknown sampling tier '{s}': kick, no-exit or hybrid"))
    }
}

/// The timer the no-exit sampling runs for ([`perf_timer`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PerfTimer {
    /// The timer id.
    pub timer: u32,
    /// Its period: the perf event's sample period, ns.
    pub period_ns: u64,
    /// Its action.
    pub action: u32,
    /// The action's tier (no-exit or hybrid).
    pub tier: SampleTier,
}

/// The kperf configuration: the `--kperf` JSON document.
///
/// Actions not listed keep kperf's defaults (no samplers), timers not listed
/// have period 0 (inactive); without `pet` there is no PET timer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KperfConfig {
    /// Actions 1..=`action_count`, 1 to [`kperf::ACTION_MAX`] (CFG-A-1).
    pub action_count: u32,
    /// Timers 0..`timer_count`, 0 to [`kperf::KPTIMER_MAX`] (CFG-T-1).
    pub timer_count: u32,
    /// The actions configured, each id at most once.
    #[serde(default)]
    pub actions: Vec<ActionConfig>,
    /// The timers configured, each id at most once.
    #[serde(default)]
    pub timers: Vec<TimerConfig>,
    /// The PET timer and its knobs; `None`: no PET.
    #[serde(default)]
    pub pet: Option<PetConfig>,
    /// The background minimum periods apply (CFG-R-4, KT-MIN-1).
    #[serde(default)]
    pub background: bool,
}

/// One action: what a sample takes (CFG-A-*).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ActionConfig {
    /// The action id, 1 to the action count.
    pub id: u32,
    /// What each sample takes.
    pub samplers: Samplers,
    /// User call-stack depth in frames, 2 to 256 (CFG-A-3).
    #[serde(default = "default_user_stack_depth")]
    pub user_stack_depth: u32,
    /// Kernel call-stack depth in frames, 1 to 128 (CFG-A-3).
    #[serde(default = "default_kernel_stack_depth")]
    pub kernel_stack_depth: u32,
    /// Sample only this guest thread id (kperf's pid filter); `None`: every
    /// thread.
    #[serde(default)]
    pub filter_tid: Option<i32>,
    /// Opaque value kperf records with each sample.
    #[serde(default)]
    pub userdata: u32,
    /// How its timer samples: `kick` (the default), `no-exit` or `hybrid`.
    #[serde(default, skip_serializing_if = "SampleTier::is_kick")]
    pub tier: SampleTier,
    /// Hybrid only: a kick with stacks every this many periods, 2 to 1000
    /// (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kick_every: Option<u32>,
}

/// One timer (CFG-T-*).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TimerConfig {
    /// The timer id, 0 to the timer count - 1.
    pub id: u32,
    /// Period in ns; 0 = inactive; a period below the minimum is raised to
    /// it (KT-MIN-1).
    pub period_ns: u64,
    /// The action its samples take; 0 = inactive.
    pub action_id: u32,
}

/// The PET timer and its knobs (CFG-T-3, PET-L-3, CFG-P-1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PetConfig {
    /// The PET timer: one of the timers. Its period is raised to the PET
    /// minimum (CFG-T-3).
    pub timer_id: u32,
    /// Lightweight PET: the PET timer runs on the vCPUs (PET-L-1).
    #[serde(default)]
    pub lightweight: bool,
    /// PET passes an idle thread skips its call stacks for, at least 1
    /// (CFG-P-1, AMB-13).
    #[serde(default = "default_idle_rate")]
    pub idle_rate: u32,
}

fn default_user_stack_depth() -> u32 {
    UCALLSTACK_DEPTH_MAX
}

fn default_kernel_stack_depth() -> u32 {
    KCALLSTACK_DEPTH_MAX
}

fn default_idle_rate() -> u32 {
    PET_DEFAULT_IDLE_RATE
}

impl KperfConfig {
    /// Reads a `--kperf` JSON file.
    ///
    /// # Errors
    ///
    /// [`KperfConfigError::Read`] or [`KperfConfigError::Parse`]; the values
    /// themselves are checked by [`KperfConfig::engine`].
    pub fn from_file(path: &Path) -> Result<Self, KperfConfigError> {
        super::read_json_file(
            path,
            |path, source| KperfConfigError::Read { path, source },
            |path, source| KperfConfigError::Parse { path, source },
        )
    }

    /// One action and one on-CPU timer: action 1 with `samplers` and the
    /// thread filter, timer 0 with `period_ns` and action 1 (the command
    /// line's `--sample-period-us` shorthand).
    pub fn on_cpu(period_ns: u64, samplers: u32, filter_tid: Option<i32>) -> Self {
        Self {
            action_count: 1,
            timer_count: 1,
            actions: vec![ActionConfig::new(1, samplers, filter_tid)],
            timers: vec![TimerConfig {
                id: 0,
                period_ns,
                action_id: 1,
            }],
            pet: None,
            background: false,
        }
    }

    /// This configuration with every action's tier set to `tier` (and the
    /// hybrid interval `kick_every`): the command line's `--sample-tier`.
    pub fn with_tier(mut self, tier: SampleTier, kick_every: Option<u32>) -> Self {
        for action in &mut self.actions {
            action.tier = tier;
            action.kick_every = kick_every;
        }
        self
    }

    /// The engine this configuration sets up (pure: no threads, no
    /// timers), not yet sampling. In kperf's order: the counts, the
    /// background mode, the actions, the timers (periods clamped,
    /// KT-MIN-1), then the PET timer (its period raised to the PET minimum,
    /// CFG-T-3), lightweight PET and the idle rate.
    ///
    /// # Errors
    ///
    /// The first rule broken, as a [`KperfConfigError`].
    pub fn engine(&self) -> Result<Kperf, KperfConfigError> {
        if self.action_count == 0 {
            return Err(KperfConfigError::ActionCount(0));
        }
        self.engine_on_request()
    }

    /// [`KperfConfig::engine`] without the rule that there is an action:
    /// the API's configuration, where sampling starts on request and kperf
    /// itself refuses to start without an action (ECANCELED, CFG-S-1).
    ///
    /// # Errors
    ///
    /// The first rule broken, as a [`KperfConfigError`].
    pub fn engine_on_request(&self) -> Result<Kperf, KperfConfigError> {
        use KperfConfigError as E;
        let mut kperf = Kperf::new();
        kperf
            .set_action_count(self.action_count)
            .map_err(|_| E::ActionCount(self.action_count))?;
        kperf
            .set_timer_count(self.timer_count)
            .map_err(|_| E::TimerCount(self.timer_count))?;
        kperf.set_background(self.background);

        let mut seen = 0u64;
        for action in &self.actions {
            if action.id < 64 && !first_listing(&mut seen, action.id) {
                return Err(E::DuplicateAction(action.id));
            }
            action.apply(&mut kperf)?;
        }
        let mut seen = 0u64;
        for timer in &self.timers {
            if timer.id < 64 && !first_listing(&mut seen, timer.id) {
                return Err(E::DuplicateTimer(timer.id));
            }
            timer.apply(&mut kperf)?;
        }
        if let Some(pet) = &self.pet {
            pet.apply(&mut kperf)?;
        }
        perf_timer(&kperf)?;
        Ok(kperf)
    }

    /// Refuses the first sampler of a listed action that cannot capture
    /// anything meaningful here ([`sampler_refusal`]); `pmu` is whether the
    /// host counts guest events ([`crate::pmu::probe`]).
    ///
    /// # Errors
    ///
    /// [`KperfConfigError::SamplerRefused`], naming the action, the sampler
    /// and why.
    pub fn check_samplers(&self, pmu: Result<(), NoGuestPmu>) -> Result<(), KperfConfigError> {
        for action in &self.actions {
            for &(name, bit) in &sampler::NAMES {
                if action.samplers.0 & bit == 0 {
                    continue;
                }
                if let Some(reason) = sampler_refusal(bit, pmu) {
                    return Err(KperfConfigError::SamplerRefused {
                        action: action.id,
                        sampler: name,
                        reason,
                    });
                }
            }
        }
        Ok(())
    }

    /// The configuration `kperf` holds: every action and timer up to the
    /// counts, periods as stored (after the minimum, KT-MIN-1), and the PET
    /// timer when it is one of the timers.
    pub fn from_engine(kperf: &Kperf) -> Self {
        let actions = (1..=kperf.action_count())
            .map(|id| ActionConfig::from_engine(kperf, id))
            .collect();
        let timers = (0..kperf.timer_count())
            .filter_map(|id| TimerConfig::from_engine(kperf, id))
            .collect();
        let pet = (kperf.pet_timer() < kperf.timer_count()).then(|| PetConfig {
            timer_id: kperf.pet_timer(),
            lightweight: kperf.lightweight_pet(),
            idle_rate: kperf.pet_idle_rate(),
        });
        Self {
            action_count: kperf.action_count(),
            timer_count: kperf.timer_count(),
            actions,
            timers,
            pet,
            background: kperf.background(),
        }
    }

    /// The action with this id, if listed.
    pub fn action(&self, id: u32) -> Option<&ActionConfig> {
        self.actions.iter().find(|action| action.id == id)
    }

    /// Whether `timer` is the traditional PET timer, which runs as the PET
    /// one-shot rather than on the vCPUs (KT-ST-1).
    pub fn is_traditional_pet(&self, timer: &TimerConfig) -> bool {
        self.pet
            .is_some_and(|pet| !pet.lightweight && pet.timer_id == timer.id)
    }

    /// The on-CPU timer with the shortest period: the one a profile's
    /// period is taken from. Active timers only (period and action not 0,
    /// KT-ST-1); the traditional PET timer is not on-CPU.
    pub fn shortest_on_cpu_timer(&self) -> Option<&TimerConfig> {
        self.timers
            .iter()
            .filter(|t| t.period_ns != 0 && t.action_id != 0 && !self.is_traditional_pet(t))
            .min_by_key(|t| t.period_ns)
    }
}

/// The one active on-CPU timer whose action uses the no-exit or hybrid
/// tier, if any: the perf events sample at its period.
///
/// # Errors
///
/// [`KperfConfigError::TierTimer`] when a second timer uses such an action,
/// or the traditional or lightweight PET timer does.
pub fn perf_timer(kperf: &Kperf) -> Result<Option<PerfTimer>, KperfConfigError> {
    let mut found: Option<PerfTimer> = None;
    for id in 0..kperf.timer_count() {
        let Some(timer) = kperf.timer(id) else {
            continue;
        };
        if timer.period_ns == 0 || timer.action == 0 || timer.action > kperf.action_count() {
            continue;
        }
        let (tier, _) = SampleTier::from_kick_every(kperf.action(timer.action).kick_every);
        if tier == SampleTier::Kick {
            continue;
        }
        let refuse = |why| KperfConfigError::TierTimer {
            timer: id,
            action: timer.action,
            tier: tier.name(),
            why,
        };
        if id == kperf.pet_timer() {
            return Err(refuse("it is the PET timer"));
        }
        if found.is_some() {
            return Err(refuse("another timer uses one already"));
        }
        found = Some(PerfTimer {
            timer: id,
            period_ns: timer.period_ns,
            action: timer.action,
            tier,
        });
    }
    Ok(found)
}

/// Marks `id` (below 64) in `seen`; `false` if it was marked already.
fn first_listing(seen: &mut u64, id: u32) -> bool {
    let bit = 1u64 << id;
    let first = *seen & bit == 0;
    *seen |= bit;
    first
}

impl ActionConfig {
    /// Action `id` as `kperf` holds it: the null action's defaults for id 0
    /// or an id above the count (CFG-A-2).
    pub fn from_engine(kperf: &Kperf, id: u32) -> Self {
        let action = kperf.action(id);
        let (tier, kick_every) = SampleTier::from_kick_every(action.kick_every);
        Self {
            id,
            samplers: Samplers(action.samplers),
            user_stack_depth: action.ucallstack_depth,
            kernel_stack_depth: action.kcallstack_depth,
            filter_tid: (action.pid_filter != PID_FILTER_ALL).then_some(action.pid_filter),
            userdata: action.userdata,
            tier,
            kick_every,
        }
    }

    /// Sets this action in `kperf` (CFG-A-2, CFG-A-3); allowed while
    /// sampling (CFG-A-4).
    ///
    /// # Errors
    ///
    /// [`KperfConfigError::ActionId`] for id 0 or an id above kperf's action
    /// count (checked first), then the first other rule broken.
    pub fn apply(&self, kperf: &mut Kperf) -> Result<(), KperfConfigError> {
        use KperfConfigError as E;
        let id = self.id;
        let count = kperf.action_count();
        if id == 0 || id > count {
            return Err(E::ActionId { id, count });
        }
        kperf
            .set_action_samplers(id, self.samplers.0)
            .map_err(|_| E::PmcThreadAndCpu(id))?;
        let depth = |field, depth, min, max| E::StackDepth {
            action: id,
            field,
            depth,
            min,
            max,
        };
        kperf
            .set_action_ucallstack_depth(id, self.user_stack_depth)
            .map_err(|_| {
                depth(
                    "user_stack_depth",
                    self.user_stack_depth,
                    UCALLSTACK_DEPTH_MIN,
                    UCALLSTACK_DEPTH_MAX,
                )
            })?;
        kperf
            .set_action_kcallstack_depth(id, self.kernel_stack_depth)
            .map_err(|_| {
                depth(
                    "kernel_stack_depth",
                    self.kernel_stack_depth,
                    KCALLSTACK_DEPTH_MIN,
                    KCALLSTACK_DEPTH_MAX,
                )
            })?;
        kperf
            .set_action_filter(id, self.filter_tid.unwrap_or(PID_FILTER_ALL))
            .map_err(E::Engine)?;
        kperf
            .set_action_userdata(id, self.userdata)
            .map_err(E::Engine)?;
        self.check_tier()?;
        let every = self.tier.kick_every(self.kick_every);
        if kperf.action_kick_every(id).map_err(E::Engine)? != every {
            // Refused while sampling (Busy): the tier picks how the timers run.
            kperf.set_action_kick_every(id, every).map_err(E::Engine)?;
        }
        Ok(())
    }

    /// `kick_every` only with the hybrid tier, and in range.
    fn check_tier(&self) -> Result<(), KperfConfigError> {
        match (self.tier, self.kick_every) {
            (_, None) => Ok(()),
            (SampleTier::Hybrid, Some(n)) if (KICK_EVERY_MIN..=KICK_EVERY_MAX).contains(&n) => {
                Ok(())
            }
            (_, Some(kick_every)) => Err(KperfConfigError::KickEvery {
                action: self.id,
                kick_every,
            }),
        }
    }

    /// Action `id` with `samplers` and the thread filter, kperf's default
    /// stack depths and no user data.
    pub fn new(id: u32, samplers: u32, filter_tid: Option<i32>) -> Self {
        Self {
            id,
            samplers: Samplers(samplers),
            user_stack_depth: UCALLSTACK_DEPTH_MAX,
            kernel_stack_depth: KCALLSTACK_DEPTH_MAX,
            filter_tid,
            userdata: 0,
            tier: SampleTier::Kick,
            kick_every: None,
        }
    }
}

impl TimerConfig {
    /// Timer `id` as `kperf` holds it (the period after the minimum,
    /// KT-MIN-1); `None` at or above the count.
    pub fn from_engine(kperf: &Kperf, id: u32) -> Option<Self> {
        kperf.timer(id).map(|timer| Self {
            id,
            period_ns: timer.period_ns,
            action_id: timer.action,
        })
    }

    /// Sets this timer in `kperf` (CFG-T-2; the period raised to the minimum,
    /// KT-MIN-1).
    ///
    /// # Errors
    ///
    /// [`KperfConfigError::TimerId`] for an id at or above kperf's timer
    /// count (checked first), then the period and action rules, then
    /// [`KperfConfigError::Engine`] with [`kperf::KperfError::Busy`] while
    /// the timers are started.
    pub fn apply(&self, kperf: &mut Kperf) -> Result<(), KperfConfigError> {
        use KperfConfigError as E;
        let id = self.id;
        let count = kperf.timer_count();
        if id >= count {
            return Err(E::TimerId { id, count });
        }
        if self.period_ns > MAX_PERIOD_NS {
            return Err(E::TimerPeriod {
                timer: id,
                period_ns: self.period_ns,
            });
        }
        if self.action_id > kperf.action_count() {
            return Err(E::TimerAction {
                timer: id,
                action: self.action_id,
                count: kperf.action_count(),
            });
        }
        kperf
            .set_timer_period(id, self.period_ns)
            .map_err(E::Engine)?;
        kperf
            .set_timer_action(id, self.action_id)
            .map_err(E::Engine)
    }
}

impl PetConfig {
    /// Sets the PET timer (CFG-T-3), lightweight PET (PET-L-3) and the idle
    /// rate (CFG-P-1) in `kperf`. When the PET timer and mode are the ones
    /// in force, only the idle rate is set, which is allowed while sampling.
    ///
    /// # Errors
    ///
    /// [`KperfConfigError::PetTimer`] for an id at or above kperf's timer
    /// count, [`KperfConfigError::PetIdleRate`] for 0, and
    /// [`KperfConfigError::Engine`] with [`kperf::KperfError::Busy`] for a
    /// change of timer or mode while sampling.
    pub fn apply(&self, kperf: &mut Kperf) -> Result<(), KperfConfigError> {
        use KperfConfigError as E;
        let count = kperf.timer_count();
        if self.timer_id >= count {
            return Err(E::PetTimer {
                id: self.timer_id,
                count,
            });
        }
        if self.idle_rate == 0 {
            return Err(E::PetIdleRate);
        }
        let unchanged =
            kperf.pet_timer() == self.timer_id && kperf.lightweight_pet() == self.lightweight;
        if !unchanged {
            kperf.set_pet_timer(self.timer_id).map_err(E::Engine)?;
            kperf
                .set_lightweight_pet(self.lightweight)
                .map_err(E::Engine)?;
        }
        kperf
            .set_pet_idle_rate(self.idle_rate)
            .map_err(|_| E::PetIdleRate)
    }
}

/// The command line's sampling shorthands: `--sample-period-us` (one
/// on-CPU timer), `--pet-period-ms` (a PET timer), `--samplers` and
/// `--sample-tid` (their one action), `--lightweight-pet`, `--pet-idle-rate`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KperfShorthand {
    /// The on-CPU timer's period in us, 1 to 10^7.
    pub sample_period_us: Option<u64>,
    /// The PET timer's period in ms, 1 to 10^4.
    pub pet_period_ms: Option<u64>,
    /// Sampler bits of the action.
    pub samplers: u32,
    /// Thread filter of the action ([`PID_FILTER_ALL`]: every thread).
    pub filter_tid: i32,
    /// Lightweight PET.
    pub lightweight_pet: bool,
    /// PET idle rate.
    pub pet_idle_rate: u32,
}

impl KperfShorthand {
    /// The configuration: action 1 with the samplers and filter; timer 0
    /// on-CPU with `sample_period_us` if given, then the PET timer on the
    /// next id with `pet_period_ms` and the same action. `None` when neither
    /// period is given. With `sample_period_us` alone this is
    /// [`KperfConfig::on_cpu`], the engine of the one-timer shorthand.
    ///
    /// # Errors
    ///
    /// [`ConfigError::SamplePeriod`] or [`ConfigError::PetPeriod`] for a
    /// period out of range; the rest is checked by [`KperfConfig::engine`].
    pub fn to_config(&self) -> Result<Option<KperfConfig>, ConfigError> {
        let filter_tid = (self.filter_tid != PID_FILTER_ALL).then_some(self.filter_tid);
        let mut config = KperfConfig::on_cpu(0, self.samplers, filter_tid);
        config.timers.clear();
        if let Some(us) = self.sample_period_us {
            if !(1..=MAX_PERIOD_NS / 1_000).contains(&us) {
                return Err(ConfigError::SamplePeriod(us));
            }
            config.timers.push(TimerConfig {
                id: 0,
                period_ns: us * 1_000,
                action_id: 1,
            });
        }
        if let Some(ms) = self.pet_period_ms {
            if !(1..=MAX_PERIOD_NS / 1_000_000).contains(&ms) {
                return Err(ConfigError::PetPeriod(ms));
            }
            // Cannot truncate: at most 2 timers.
            let id = config.timers.len() as u32;
            config.timers.push(TimerConfig {
                id,
                period_ns: ms * 1_000_000,
                action_id: 1,
            });
            config.pet = Some(PetConfig {
                timer_id: id,
                lightweight: self.lightweight_pet,
                idle_rate: self.pet_idle_rate,
            });
        }
        if config.timers.is_empty() {
            return Ok(None);
        }
        // Cannot truncate: at most 2 timers.
        config.timer_count = config.timers.len() as u32;
        Ok(Some(config))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kperf::sampler::{KSTACK, PMC_CPU, PMC_THREAD, SYS_MEM, TH_INFO, USTACK};
    use std::path::PathBuf;

    /// The example of the brief and of README.
    const EXAMPLE: &str = r#"{"action_count": 2, "timer_count": 2,
        "actions": [{"id": 1, "samplers": ["th_info", "ustack", "kstack"],
                     "user_stack_depth": 128, "kernel_stack_depth": 64, "filter_tid": null}],
        "timers": [{"id": 0, "period_ns": 1000000, "action_id": 1}],
        "pet": {"timer_id": 1, "lightweight": false, "idle_rate": 15}}"#;

    fn parse(json: &str) -> KperfConfig {
        serde_json::from_str(json).unwrap_or_else(|e| panic!("{json}: {e}"))
    }

    /// The message of the JSON error for `json`.
    fn parse_error(json: &str) -> String {
        serde_json::from_str::<KperfConfig>(json)
            .expect_err(json)
            .to_string()
    }

    /// The rule `config` breaks; its message must contain `needle`.
    fn refused_by(config: &KperfConfig, needle: &str) -> KperfConfigError {
        let error = config.engine().expect_err(needle);
        assert!(error.to_string().contains(needle), "{needle}: {error}");
        error
    }

    /// The rule `json` breaks; its message must contain `needle`.
    fn refused(json: &str, needle: &str) -> KperfConfigError {
        refused_by(&parse(json), needle)
    }

    /// A file in a per-process scratch directory with `text` in it.
    fn file_with(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("metronome-kperf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn test_the_example_parses_into_the_typed_config() {
        let config = parse(EXAMPLE);
        assert_eq!(
            config,
            KperfConfig {
                action_count: 2,
                timer_count: 2,
                actions: vec![ActionConfig {
                    user_stack_depth: 128,
                    kernel_stack_depth: 64,
                    ..ActionConfig::new(1, TH_INFO | USTACK | KSTACK, None)
                }],
                timers: vec![TimerConfig {
                    id: 0,
                    period_ns: 1_000_000,
                    action_id: 1,
                }],
                pet: Some(PetConfig {
                    timer_id: 1,
                    lightweight: false,
                    idle_rate: 15,
                }),
                background: false,
            }
        );
        config.engine().unwrap();
        // The file says the same.
        let path = file_with("example.json", EXAMPLE);
        assert_eq!(KperfConfig::from_file(&path).unwrap(), config);
    }

    #[test]
    fn test_samplers_are_names_a_comma_list_or_a_number() {
        for samplers in [
            r#"["th_info", "KSTACK"]"#,
            r#""th_info,kstack""#,
            "5",
            r#""0x5""#,
            r#"["0x1", "kstack"]"#,
        ] {
            let json = format!(r#"{{"id": 1, "samplers": {samplers}}}"#);
            let action: ActionConfig = serde_json::from_str(&json).unwrap();
            assert_eq!(action.samplers, Samplers(TH_INFO | KSTACK), "{samplers}");
        }
        // Written back as names.
        let json = serde_json::to_string(&Samplers(TH_INFO | KSTACK)).unwrap();
        assert_eq!(json, r#"["th_info","kstack"]"#);
    }

    #[test]
    fn test_omitted_fields_take_kperfs_defaults() {
        let config = parse(
            r#"{"action_count": 1, "timer_count": 0,
                "actions": [{"id": 1, "samplers": ["th_info"]}]}"#,
        );
        assert_eq!(config.actions[0], ActionConfig::new(1, TH_INFO, None));
        assert_eq!(config.actions[0].user_stack_depth, 256);
        assert_eq!(config.actions[0].kernel_stack_depth, 128);
        assert_eq!((config.timers.len(), config.pet), (0, None));
        let pet: PetConfig = serde_json::from_str(r#"{"timer_id": 0}"#).unwrap();
        assert_eq!((pet.lightweight, pet.idle_rate), (false, 15));
        // filter_tid: a tid, or null for every thread.
        let action: ActionConfig =
            serde_json::from_str(r#"{"id": 1, "samplers": 1, "filter_tid": 7}"#).unwrap();
        assert_eq!(action.filter_tid, Some(7));
        let engine = KperfConfig {
            actions: vec![action],
            ..config
        }
        .engine()
        .unwrap();
        assert_eq!(engine.action_filter(1), Ok(7));
    }

    #[test]
    fn test_cfg_a_5_unknown_sampler_is_refused_with_the_names_allowed() {
        for samplers in [r#"["th_info", "bogus"]"#, r#""bogus""#] {
            let json = format!(
                r#"{{"action_count": 1, "timer_count": 0, "actions": [{{"id": 1, "samplers": {samplers}}}]}}"#
            );
            let message = parse_error(&json);
            assert!(
                message.contains("unknown sampler 'bogus': allowed are th_info,")
                    && message.contains("CFG-A-5"),
                "{message}"
            );
        }
        for samplers in ["0", "16384", "true"] {
            let json = format!(r#"{{"id": 1, "samplers": {samplers}}}"#);
            assert!(
                serde_json::from_str::<ActionConfig>(&json).is_err(),
                "{json}"
            );
        }
        // An empty list is an action left at kperf's default, as the
        // configuration in force writes it.
        let empty: ActionConfig = serde_json::from_str(r#"{"id": 2, "samplers": []}"#).unwrap();
        assert_eq!(empty, ActionConfig::new(2, 0, None));
    }

    #[test]
    fn test_unknown_field_is_refused_at_every_level() {
        for json in [
            r#"{"action_count": 1, "timer_count": 0, "bogus": 1}"#,
            r#"{"action_count": 1, "timer_count": 0, "actions": [{"id": 1, "samplers": 1, "bogus": 1}]}"#,
            r#"{"action_count": 1, "timer_count": 1, "timers": [{"id": 0, "period_ns": 1, "action_id": 1, "bogus": 1}]}"#,
            r#"{"action_count": 1, "timer_count": 1, "pet": {"timer_id": 0, "bogus": 1}}"#,
        ] {
            let message = parse_error(json);
            assert!(
                message.contains("unknown field `bogus`, expected"),
                "{message}"
            );
        }
        let message = parse_error(r#"{"timer_count": 0}"#);
        assert!(
            message.contains("missing field `action_count`"),
            "{message}"
        );
    }

    #[test]
    fn test_malformed_json_and_unreadable_files_are_refused() {
        let path = file_with("malformed.json", r#"{"action_count": 1,"#);
        let error = KperfConfig::from_file(&path).expect_err("malformed");
        assert!(matches!(error, KperfConfigError::Parse { .. }), "{error}");
        assert!(error
            .to_string()
            .contains("does not follow the kperf configuration schema"));

        let missing = path.with_file_name("missing.json");
        let error = KperfConfig::from_file(&missing).expect_err("missing");
        assert!(matches!(error, KperfConfigError::Read { .. }), "{error}");
        assert!(error.to_string().contains("cannot read the --kperf file"));
    }

    #[test]
    fn test_cfg_a_1_action_count_is_1_to_32() {
        for count in [0, 33] {
            let json = format!(r#"{{"action_count": {count}, "timer_count": 0}}"#);
            let error = refused(&json, "1 to 32 actions (CFG-A-1");
            assert!(matches!(error, KperfConfigError::ActionCount(c) if c == count));
        }
        parse(r#"{"action_count": 32, "timer_count": 0}"#)
            .engine()
            .unwrap();
    }

    #[test]
    fn test_cfg_t_1_timer_count_is_at_most_8() {
        let json = r#"{"action_count": 1, "timer_count": 9}"#;
        let error = refused(json, "0 to 8 timers (CFG-T-1");
        assert!(matches!(error, KperfConfigError::TimerCount(9)));
        parse(r#"{"action_count": 1, "timer_count": 8}"#)
            .engine()
            .unwrap();
    }

    #[test]
    fn test_cfg_a_2_action_ids_are_1_to_the_count_each_once() {
        for id in [0, 3] {
            let json = format!(
                r#"{{"action_count": 2, "timer_count": 0, "actions": [{{"id": {id}, "samplers": 1}}]}}"#
            );
            let error = refused(&json, "action ids are 1 to action_count (2) (CFG-A-2)");
            assert!(matches!(error, KperfConfigError::ActionId { id: i, count: 2 } if i == id));
        }
        let twice = r#"{"action_count": 2, "timer_count": 0,
                        "actions": [{"id": 2, "samplers": 1}, {"id": 2, "samplers": 4}]}"#;
        let error = refused(twice, "action id 2 is listed twice");
        assert!(matches!(error, KperfConfigError::DuplicateAction(2)));
    }

    #[test]
    fn test_cfg_t_2_timer_ids_are_below_the_count_each_once() {
        let beyond = r#"{"action_count": 1, "timer_count": 2,
                         "timers": [{"id": 2, "period_ns": 1000000, "action_id": 1}]}"#;
        let error = refused(beyond, "(timer_count is 2) (CFG-T-2)");
        assert!(matches!(
            error,
            KperfConfigError::TimerId { id: 2, count: 2 }
        ));
        let twice = r#"{"action_count": 1, "timer_count": 2,
                        "timers": [{"id": 1, "period_ns": 1, "action_id": 1},
                                   {"id": 1, "period_ns": 2, "action_id": 1}]}"#;
        let error = refused(twice, "timer id 1 is listed twice");
        assert!(matches!(error, KperfConfigError::DuplicateTimer(1)));
    }

    #[test]
    fn test_timer_action_beyond_the_action_count_is_refused() {
        let timer = |action: u32| {
            format!(
                r#"{{"action_count": 1, "timer_count": 1,
                     "timers": [{{"id": 0, "period_ns": 1000000, "action_id": {action}}}]}}"#
            )
        };
        let error = refused(&timer(2), "action_id 2 is beyond action_count (1)");
        assert!(error.to_string().contains("CFG-T-2"), "{error}");
        // Action 0: an inactive timer, as in kperf (KT-ST-1).
        parse(&timer(0)).engine().unwrap();
    }

    #[test]
    fn test_cfg_a_3_pmc_thread_with_pmc_cpu_is_refused() {
        let both = KperfConfig::on_cpu(1_000_000, PMC_THREAD | PMC_CPU, None);
        let error = refused_by(&both, "exclude each other (CFG-A-3)");
        assert!(matches!(error, KperfConfigError::PmcThreadAndCpu(1)));
        KperfConfig::on_cpu(1_000_000, PMC_THREAD, None)
            .engine()
            .unwrap();
    }

    #[test]
    fn test_cfg_a_3_stack_depth_boundaries() {
        let with = |user: u32, kernel: u32| {
            let mut config = KperfConfig::on_cpu(1_000_000, TH_INFO, None);
            config.actions[0].user_stack_depth = user;
            config.actions[0].kernel_stack_depth = kernel;
            config
        };
        for (user, kernel) in [(2, 1), (256, 128)] {
            with(user, kernel).engine().unwrap();
        }
        for user in [1, 257] {
            let error = refused_by(&with(user, 1), "2 to 256 frames (CFG-A-3)");
            assert!(matches!(error, KperfConfigError::StackDepth { depth, .. } if depth == user));
        }
        for kernel in [0, 129] {
            let error = refused_by(&with(2, kernel), "1 to 128 frames (CFG-A-3)");
            assert!(matches!(error, KperfConfigError::StackDepth { depth, .. } if depth == kernel));
        }
    }

    #[test]
    fn test_amb_13_pet_idle_rate_0_is_refused() {
        let json =
            r#"{"action_count": 1, "timer_count": 1, "pet": {"timer_id": 0, "idle_rate": 0}}"#;
        let error = refused(json, "at least 1 (AMB-13");
        assert!(matches!(error, KperfConfigError::PetIdleRate));
    }

    #[test]
    fn test_cfg_t_3_pet_timer_beyond_the_count_is_refused() {
        let json = r#"{"action_count": 1, "timer_count": 1, "pet": {"timer_id": 1}}"#;
        let error = refused(json, "pet.timer_id 1 is not a timer");
        assert!(error.to_string().contains("CFG-T-3"), "{error}");
    }

    #[test]
    fn test_period_above_10_s_is_refused() {
        let too_long = KperfConfig::on_cpu(MAX_PERIOD_NS + 1, TH_INFO, None);
        let error = refused_by(&too_long, "0 (inactive) to 10000000000 ns");
        assert!(matches!(
            error,
            KperfConfigError::TimerPeriod { timer: 0, .. }
        ));
        KperfConfig::on_cpu(MAX_PERIOD_NS, TH_INFO, None)
            .engine()
            .unwrap();
    }

    #[test]
    fn test_kt_min_1_effective_periods_come_back_raised() {
        let config = parse(
            r#"{"action_count": 1, "timer_count": 3,
                "actions": [{"id": 1, "samplers": ["th_info"]}],
                "timers": [{"id": 0, "period_ns": 1000, "action_id": 1},
                           {"id": 1, "period_ns": 0, "action_id": 1},
                           {"id": 2, "period_ns": 1000, "action_id": 1}],
                "pet": {"timer_id": 2, "lightweight": true, "idle_rate": 3}}"#,
        );
        let effective = KperfConfig::from_engine(&config.engine().unwrap());
        let periods: Vec<u64> = effective.timers.iter().map(|t| t.period_ns).collect();
        // On-CPU: 20 us; 0 stays 0 (inactive); the PET timer: 2 ms.
        assert_eq!(periods, [20_000, 0, 2_000_000]);
        assert_eq!(effective.pet, config.pet);
        // Background minimums (CFG-R-4): 1 ms on-CPU, 5 ms PET.
        let background = KperfConfig {
            background: true,
            ..config
        };
        let effective = KperfConfig::from_engine(&background.engine().unwrap());
        let periods: Vec<u64> = effective.timers.iter().map(|t| t.period_ns).collect();
        assert_eq!(periods, [1_000_000, 0, 5_000_000]);
        assert!(effective.background);
    }

    #[test]
    fn test_effective_config_lists_every_action_and_timer_and_reads_back() {
        let effective = KperfConfig::from_engine(&parse(EXAMPLE).engine().unwrap());
        assert_eq!(effective.actions.len(), 2);
        assert_eq!(effective.actions[1], ActionConfig::new(2, 0, None));
        // The PET timer, not listed, gets the PET minimum (CFG-T-3).
        assert_eq!(
            effective.timers[1],
            TimerConfig {
                id: 1,
                period_ns: 2_000_000,
                action_id: 0
            }
        );
        // A configuration in force applies to the same engine.
        let mut listed = effective.clone();
        listed.actions.truncate(1);
        assert_eq!(
            KperfConfig::from_engine(&listed.engine().unwrap()),
            effective
        );
        // And its JSON is the --kperf schema, the action left at its
        // defaults (`"samplers": []`) included (found by the kperf_json
        // fuzz target: it was refused).
        for config in [&listed, &effective] {
            let json = serde_json::to_string(config).unwrap();
            assert_eq!(&parse(&json), config);
        }
    }

    #[test]
    fn test_the_one_timer_shorthand_builds_the_engine_it_built_before() {
        let shorthand = KperfShorthand {
            sample_period_us: Some(250),
            pet_period_ms: None,
            samplers: TH_INFO | USTACK,
            filter_tid: 7,
            lightweight_pet: false,
            pet_idle_rate: 15,
        };
        let config = shorthand.to_config().unwrap().unwrap();
        assert_eq!(
            config,
            KperfConfig::on_cpu(250_000, TH_INFO | USTACK, Some(7))
        );
        // The engine the one-timer SamplingConfig::engine() built.
        let mut before = Kperf::new();
        before.set_action_count(1).unwrap();
        before.set_action_samplers(1, TH_INFO | USTACK).unwrap();
        before.set_action_filter(1, 7).unwrap();
        before.set_timer_count(1).unwrap();
        before.set_timer_period(0, 250_000).unwrap();
        before.set_timer_action(0, 1).unwrap();
        assert_eq!(config.engine().unwrap(), before);
        // No period: no sampling.
        let none = KperfShorthand {
            sample_period_us: None,
            ..shorthand
        };
        assert_eq!(none.to_config().unwrap(), None);
    }

    #[test]
    fn test_the_pet_shorthand_adds_a_pet_timer_with_the_same_action() {
        let shorthand = KperfShorthand {
            sample_period_us: Some(1_000),
            pet_period_ms: Some(10),
            samplers: TH_INFO | KSTACK,
            filter_tid: PID_FILTER_ALL,
            lightweight_pet: true,
            pet_idle_rate: 4,
        };
        let config = shorthand.to_config().unwrap().unwrap();
        assert_eq!((config.action_count, config.timer_count), (1, 2));
        assert_eq!(
            config.timers[1],
            TimerConfig {
                id: 1,
                period_ns: 10_000_000,
                action_id: 1
            }
        );
        assert_eq!(
            config.pet,
            Some(PetConfig {
                timer_id: 1,
                lightweight: true,
                idle_rate: 4
            })
        );
        let engine = config.engine().unwrap();
        assert_eq!(
            (
                engine.pet_timer(),
                engine.pet_action(),
                engine.pet_idle_rate()
            ),
            (1, 1, 4)
        );
        assert!(engine.lightweight_pet());
        // PET alone: timer 0, the action's samplers as given (by default
        // th_info, ustack, kstack).
        let pet_only = KperfShorthand {
            sample_period_us: None,
            samplers: TH_INFO | USTACK | KSTACK,
            ..shorthand
        };
        let config = pet_only.to_config().unwrap().unwrap();
        assert_eq!(config.timer_count, 1);
        assert_eq!(config.pet.map(|p| p.timer_id), Some(0));
        assert_eq!(config.actions[0].samplers.0, TH_INFO | USTACK | KSTACK);
    }

    #[test]
    fn test_shorthand_periods_out_of_range_name_their_flag() {
        let base = KperfShorthand {
            sample_period_us: None,
            pet_period_ms: None,
            samplers: TH_INFO,
            filter_tid: PID_FILTER_ALL,
            lightweight_pet: false,
            pet_idle_rate: 15,
        };
        for us in [0, 10_000_001] {
            let error = KperfShorthand {
                sample_period_us: Some(us),
                ..base
            }
            .to_config()
            .expect_err("sample period");
            assert!(
                matches!(error, ConfigError::SamplePeriod(u) if u == us),
                "{error}"
            );
        }
        for ms in [0, 10_001] {
            let error = KperfShorthand {
                pet_period_ms: Some(ms),
                ..base
            }
            .to_config()
            .expect_err("pet period");
            assert!(error
                .to_string()
                .starts_with(&format!("--pet-period-ms {ms} is out of range")));
        }
    }

    #[test]
    fn test_shortest_on_cpu_timer_skips_inactive_timers_and_traditional_pet() {
        let mut config = parse(
            r#"{"action_count": 1, "timer_count": 4,
                "actions": [{"id": 1, "samplers": ["sys_mem"]}],
                "timers": [{"id": 0, "period_ns": 5000000, "action_id": 1},
                           {"id": 1, "period_ns": 0, "action_id": 1},
                           {"id": 2, "period_ns": 1000000, "action_id": 0},
                           {"id": 3, "period_ns": 2000000, "action_id": 1}],
                "pet": {"timer_id": 3}}"#,
        );
        assert_eq!(config.shortest_on_cpu_timer().map(|t| t.id), Some(0));
        // Lightweight PET runs on the vCPUs.
        config.pet = config.pet.map(|pet| PetConfig {
            lightweight: true,
            ..pet
        });
        assert_eq!(config.shortest_on_cpu_timer().map(|t| t.id), Some(3));
        assert_eq!(
            config.action(1).map(|a| a.samplers),
            Some(Samplers(SYS_MEM))
        );
    }
    #[test]
    fn test_amb_14_pmc_samplers_are_refused_without_a_guest_pmu() {
        let none = Err(NoGuestPmu {
            errno: libc::ENOENT,
        });
        for (bits, name) in [
            (PMC_THREAD, "pmc_thread"),
            (PMC_CPU, "pmc_cpu"),
            (sampler::PMC_CONFIG, "pmc_config"),
            (sampler::TH_INSCYC, "th_inscyc"),
        ] {
            let config = KperfConfig::on_cpu(1_000_000, TH_INFO | bits, None);
            // kperf's own rules accept it; the host cannot count guest events.
            config.engine().unwrap();
            let error = config.check_samplers(none).expect_err(name);
            assert_eq!(
                error.to_string(),
                format!(
                    "action 1: sampler {name} is refused: it needs a host PMU that counts guest \
                     events; this host has none (perf_event_open: ENOENT, No such file or \
                     directory) (AMB-14: refused rather than logging zero counters)"
                )
            );
            // Where the host counts guest events, it is accepted.
            config.check_samplers(Ok(())).unwrap();
        }
    }

    #[test]
    fn test_th_dispatch_is_refused_everywhere_and_the_rest_accepted() {
        let config = KperfConfig::on_cpu(1_000_000, TH_INFO | sampler::TH_DISPATCH, None);
        let error = config.check_samplers(Ok(())).expect_err("th_dispatch");
        assert!(matches!(
            error,
            KperfConfigError::SamplerRefused {
                action: 1,
                sampler: "th_dispatch",
                ..
            }
        ));
        assert!(error.to_string().contains("no dispatch queues"), "{error}");
        // Every other sampler that reads the guest or the VMM is accepted,
        // PMU or not.
        let real = sampler::ALL
            & !(sampler::TH_DISPATCH
                | PMC_THREAD
                | PMC_CPU
                | sampler::PMC_CONFIG
                | sampler::TH_INSCYC);
        let none = Err(NoGuestPmu { errno: 2 });
        KperfConfig::on_cpu(1_000_000, real, None)
            .check_samplers(none)
            .unwrap();
    }

    #[test]
    fn test_the_tier_parses_maps_to_kick_every_and_reads_back() {
        let config = parse(
            r#"{"action_count": 2, "timer_count": 1,
                "actions": [{"id": 1, "samplers": "th_info", "tier": "hybrid", "kick_every": 5},
                            {"id": 2, "samplers": "th_info", "tier": "no-exit"}],
                "timers": [{"id": 0, "period_ns": 100000, "action_id": 1}]}"#,
        );
        let engine = config.engine().unwrap();
        assert_eq!(
            (engine.action(1).kick_every, engine.action(2).kick_every),
            (5, 0)
        );
        let back = KperfConfig::from_engine(&engine);
        assert_eq!(back.actions, config.actions);
        assert_eq!(
            perf_timer(&engine).unwrap(),
            Some(PerfTimer {
                timer: 0,
                period_ns: 100_000,
                action: 1,
                tier: SampleTier::Hybrid
            })
        );
        // The kick tier is the default and is not written out.
        let kick = serde_json::to_value(ActionConfig::new(1, 1, None)).unwrap();
        assert!(kick.get("tier").is_none() && kick.get("kick_every").is_none());
        let hybrid = parse(
            r#"{"action_count": 1, "timer_count": 0,
                "actions": [{"id": 1, "samplers": "th_info", "tier": "hybrid"}]}"#,
        );
        let engine = hybrid.engine().unwrap();
        assert_eq!(engine.action(1).kick_every, KICK_EVERY_DEFAULT);
        assert_eq!("no-exit".parse::<SampleTier>(), Ok(SampleTier::NoExit));
    }

    #[test]
    fn test_a_bad_tier_or_kick_every_is_refused_with_what_is_allowed() {
        let e = parse_error(
            r#"{"action_count": 1, "timer_count": 0,
            "actions": [{"id": 1, "samplers": "th_info", "tier": "fast"}]}"#,
        );
        assert!(
            e.contains("unknown variant `fast`, expected one of `kick`, `no-exit`, `hybrid`"),
            "{e}"
        );
        for (tier, every) in [
            ("hybrid", 1),
            ("hybrid", 1001),
            ("kick", 10),
            ("no-exit", 2),
        ] {
            let e = refused(
                &format!(
                    r#"{{"action_count": 1, "timer_count": 0,
                "actions": [{{"id": 1, "samplers": "th_info", "tier": "{tier}", "kick_every": {every}}}]}}"#
                ),
                "kick_every",
            );
            assert!(
                matches!(e, KperfConfigError::KickEvery { action: 1, .. }),
                "{e}"
            );
            assert!(e.to_string().contains("2 to 1000"), "{e}");
        }
        assert!("fast"
            .parse::<SampleTier>()
            .unwrap_err()
            .contains("kick, no-exit or hybrid"));
    }

    #[test]
    fn test_one_timer_at_most_uses_the_no_exit_tier_and_not_the_pet_timer() {
        let two = r#"{"action_count": 1, "timer_count": 2,
            "actions": [{"id": 1, "samplers": "th_info", "tier": "no-exit"}],
            "timers": [{"id": 0, "period_ns": 100000, "action_id": 1},
                       {"id": 1, "period_ns": 200000, "action_id": 1}]}"#;
        let e = refused(two, "another timer uses one");
        assert!(
            matches!(e, KperfConfigError::TierTimer { timer: 1, .. }),
            "{e}"
        );
        let pet = r#"{"action_count": 1, "timer_count": 1,
            "actions": [{"id": 1, "samplers": "th_info", "tier": "no-exit"}],
            "timers": [{"id": 0, "period_ns": 10000000, "action_id": 1}],
            "pet": {"timer_id": 0}}"#;
        assert!(refused(pet, "it is the PET timer")
            .to_string()
            .contains("(no-exit tier)"));
    }
}
