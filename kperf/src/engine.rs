//! The [`Kperf`] engine: its state, the sampling state machine (CFG-S-*),
//! reset (CFG-R-1), and the on-CPU timers' start, stop, expiry, idle and wake
//! (KT-ST-*, KT-SP-*, KT-F-*, KT-I-*).

use crate::{
    dead_reckon, sample_flags, Action, Election, KpTimer, KperfError, ACTION_MAX, KPTIMER_MAX,
    NO_DEADLINE, PET_DEFAULT_IDLE_RATE, PET_TIMER_NONE,
};

/// The sampling state machine of CFG-S-1: `Off -> On -> Shutdown -> Off`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SamplingState {
    /// Not sampling; a timer expiry is a VMM bug ([`CpuExpiry::NotRunning`]).
    #[default]
    Off,
    /// Sampling.
    On,
    /// Being disabled: an expiry clears its vCPU's deadlines and samples
    /// nothing (KT-F-1).
    Shutdown,
}

/// A sample a vCPU must take of its current guest thread (KT-SM-2): trigger
/// type timer, trigger id `timer`. The VMM applies the action's samplers and
/// pid filter (KT-SM-4); an action that is 0 or beyond the count samples
/// nothing, but the `PERF_TM_HNDLR` bracket is still recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SampleRequest {
    /// The action id.
    pub action: u32,
    /// That action's settings at the fire (samplers, stack depths, filter),
    /// so that the sampler needs no further look-up under the engine lock.
    pub settings: Action,
    /// [`sample_flags`]: `PEND_USER`, plus `SYSTEM` for the leader.
    pub flags: u32,
    /// The timer id (the trigger id).
    pub timer: u32,
}

impl SampleRequest {
    /// The action's settings with its samplers reduced to what this sample
    /// takes ([`sample_flags::sampled`]: system memory only for the leader,
    /// KT-SM-1).
    pub fn sampled(&self) -> Action {
        Action {
            samplers: sample_flags::sampled(self.settings.samplers, self.flags),
            ..self.settings
        }
    }
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
pub enum CpuExpiry {
    /// The expiry was handled: the timers that fired, and the vCPU's next
    /// kperf host deadline (`None`: cancel it). On an idle vCPU nothing fires
    /// and the deadline is `None`.
    Handled {
        /// The timers that fired on this vCPU, by timer id.
        fires: Vec<Fire>,
        /// The next host deadline to program for this vCPU.
        next_deadline: Option<u64>,
    },
    /// Sampling is stopping (`Shutdown`, KT-F-1): a kick that raced
    /// [`Kperf::begin_shutdown`]. This vCPU's deadlines are cleared; nothing is
    /// sampled and no deadline is to be programmed.
    ShuttingDown,
    /// Sampling is off: a kperf host deadline outlived the stop. XNU panics;
    /// the VMM counts it and cancels the deadline.
    NotRunning,
    /// The vCPU number is beyond the vCPUs the timers were started on.
    NoSuchCpu,
}

/// kperf's configuration and kptimer's runtime state.
///
/// See the [crate documentation](crate) for the contract and the wiring.
///
/// The fields are `pub(crate)`: the methods are split by concern over the
/// `action`, `timer`, `pet` and `engine` modules. The VMM keeps the whole
/// value behind one lock (see the crate documentation).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kperf {
    /// The sampling state (CFG-S-1).
    pub(crate) state: SamplingState,
    /// Actions 1..=`action_count` live at index `id - 1`.
    pub(crate) actions: [Action; ACTION_MAX as usize],
    pub(crate) action_count: u32,
    /// Timers at or above `timer_count` keep their settings (CFG-T-1).
    pub(crate) timers: [KpTimer; KPTIMER_MAX],
    pub(crate) timer_count: u32,
    pub(crate) pet_timer: u32,
    /// The PET sampler's action (`kppet.g_actionid`); 0 when PET is off.
    pub(crate) pet_action: u32,
    pub(crate) lightweight_pet: bool,
    pub(crate) pet_idle_rate: u32,
    pub(crate) background: bool,
    pub(crate) started: bool,
    /// The traditional PET one-shot is in use (`g_pet_active`).
    pub(crate) pet_active: bool,
    /// When the traditional PET one-shot fires; `None` when disarmed.
    pub(crate) pet_deadline: Option<u64>,
    /// PET handler passes (`mycounter`, PET-C-1); never reset.
    pub(crate) pet_broadcasts: u64,
    /// Lightweight PET generation (`kppet_gencount`); never reset.
    pub(crate) pet_generation: u64,
    pub(crate) compat_fired_only: bool,
    /// Per vCPU, per timer deadline; `u64::MAX` when none. Sized at start.
    pub(crate) cpu_deadlines: Vec<[u64; KPTIMER_MAX]>,
    /// Per vCPU: halted or guest-reported idle (KT-I-1).
    pub(crate) cpu_idle: Vec<bool>,
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
            timers: [KpTimer::default(); KPTIMER_MAX],
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
                    self.recapture_lightweight_pet_action();
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

    /// AMB-11 (a deliberate deviation from PET-L-4): when sampling starts in
    /// lightweight mode, PET's action is taken afresh from the PET timer, so
    /// a `set_timer_action` after `set_pet_timer` is not silently ignored.
    fn recapture_lightweight_pet_action(&mut self) {
        if self.lightweight_pet {
            if let Ok(index) = self.timer_index(self.pet_timer) {
                self.pet_action = self.timers[index].action;
            }
        }
    }

    /// The first half of a disable: `On -> Shutdown`, then stop the timers
    /// (KT-SP-1). Returns whether sampling was on; `Ok(false)` when already
    /// off. Until [`Kperf::finish_shutdown`], an expiry samples nothing and
    /// clears its vCPU's deadlines, and a wake programs nothing (KT-F-1).
    /// Step 1 of the stop sequence of the
    /// [crate documentation](crate#stopping-sampling-kt-f-1-kt-sp-1-amb-17):
    /// the VMM then cancels every vCPU's kperf host deadline and waits for
    /// every vCPU before [`Kperf::finish_shutdown`].
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
    /// acknowledged the stop (it cancelled its kperf host deadline and takes
    /// no sample). Does nothing in other states. Sampling can then start
    /// again.
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
                let kick_period = kick_period(timer, &self.actions, self.action_count);
                if kick_period == 0 {
                    // Never kicks (`Action::kick_every` 0): no deadline.
                    continue;
                }
                timer.deadline = now.saturating_add(kick_period);
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
    /// - Sampling off: [`CpuExpiry::NotRunning`].
    /// - `Shutdown` (a kick that raced [`Kperf::begin_shutdown`], KT-F-1):
    ///   clears this vCPU's deadlines and returns [`CpuExpiry::ShuttingDown`]:
    ///   nothing is sampled and the host deadline stays cancelled.
    /// - An idle vCPU (a deadline that raced [`Kperf::cpu_idle`]): nothing
    ///   fires and the deadline is cancelled.
    /// - Otherwise every timer whose deadline on this vCPU lies strictly
    ///   before `now` fires ([`KpTimer::elect`]). The leader of a fire samples
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
    pub fn expire(&mut self, cpu: usize, now: u64) -> CpuExpiry {
        if self.state == SamplingState::Off {
            return CpuExpiry::NotRunning;
        }
        if cpu >= self.cpu_deadlines.len() {
            return CpuExpiry::NoSuchCpu;
        }
        let ntimers = self.timer_count as usize;
        if self.state == SamplingState::Shutdown {
            self.cpu_deadlines[cpu][..ntimers].fill(NO_DEADLINE);
            return CpuExpiry::ShuttingDown;
        }
        if self.cpu_idle[cpu] {
            return CpuExpiry::Handled {
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
            let period = kick_period(&self.timers[index], &self.actions, self.action_count);
            let (leader, next_deadline) =
                match self.timers[index].elect_every(cpu_deadline, now, period) {
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
                    settings: self.action(timer.action),
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
        CpuExpiry::Handled {
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
            let period = kick_period(timer, &self.actions, self.action_count);
            let deadline = dead_reckon(timer.deadline, period, now);
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

    /// The step of every vCPU's deadlines while the timers run, when it is
    /// fixed: `Some(period)` when exactly one on-CPU timer is active, whose
    /// deadlines on every vCPU lie on one grid (its first global deadline
    /// plus multiples of the period: KT-ST-1, and dead reckoning, leader and
    /// follower all keep to it, KT-F-2, KT-F-4); `None` when stopped, or
    /// with no on-CPU timer or several (the earliest of several is not
    /// periodic). The VMM arms a periodic host timer for it.
    pub fn fixed_on_cpu_period(&self) -> Option<u64> {
        if !self.started {
            return None;
        }
        let mut active = self.timers[..self.timer_count as usize]
            .iter()
            .filter(|timer| timer.deadline != 0 && timer.period_ns != 0);
        let first = active.next()?;
        active.next().is_none().then_some(first.period_ns)
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
}

/// The period between two kicks of `timer`: its period times its action's
/// [`Action::kick_every`] (saturating), 0 when the action never kicks. An
/// action beyond `action_count` (the null action) kicks every period.
fn kick_period(timer: &KpTimer, actions: &[Action], action_count: u32) -> u64 {
    let every = match timer.action {
        id @ 1.. if id <= action_count => actions[id as usize - 1].kick_every,
        _ => 1,
    };
    timer.period_ns.saturating_mul(u64::from(every))
}
