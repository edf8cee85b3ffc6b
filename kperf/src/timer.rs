//! The timers (`struct kptimer`): configuration, minimum periods, dead
//! reckoning and leader election (CFG-T-*, KT-MIN-*, KT-F-2/4).

use crate::{
    Kperf, KperfError, KPTIMER_MAX, MIN_BG_PERIOD_NS, MIN_BG_PET_PERIOD_NS, MIN_PERIOD_NS,
    MIN_PET_PERIOD_NS,
};

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
pub struct KpTimer {
    /// Period in ns; 0 disables the timer.
    pub period_ns: u64,
    /// The action its samples use; 0 disables the timer at start. Not
    /// checked against the action count (CFG-T-2).
    pub action: u32,
    /// The global "current deadline" shared by all vCPUs: when the timer
    /// should next fire. 0 while the timers are stopped, and for a timer
    /// that is inactive or runs as the traditional PET one-shot.
    ///
    /// Protected by the timer's lock (XNU `kt_lock`): see [`KpTimer::elect`].
    pub deadline: u64,
}

/// The outcome of [`KpTimer::elect`] for one vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Election {
    /// This vCPU is the first to see this fire (KT-F-4): it moved the global
    /// deadline to `next_deadline`, records `PERF_TM_FIRE` and samples with
    /// [`sample_flags::SYSTEM`](crate::sample_flags::SYSTEM).
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

impl KpTimer {
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
        self.elect_every(cpu_deadline, now, self.period_ns)
    }

    /// [`KpTimer::elect`] for a timer whose fires are `period` apart rather
    /// than its own period (its action kicks every Nth period,
    /// [`crate::Action::kick_every`]; 0: never, [`Election::Stopped`]).
    pub fn elect_every(&mut self, cpu_deadline: u64, now: u64, period: u64) -> Election {
        if self.deadline == 0 || self.period_ns == 0 || period == 0 {
            return Election::Stopped;
        }
        let next = cpu_deadline.saturating_add(period);
        if self.deadline < next {
            let next_deadline = dead_reckon(next, period, now);
            self.deadline = next_deadline;
            Election::Leader { next_deadline }
        } else {
            Election::Follower {
                next_deadline: self.deadline,
            }
        }
    }
}

impl Kperf {
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
        self.ensure_stopped()?;
        if count as usize > KPTIMER_MAX {
            return Err(KperfError::Inval);
        }
        self.timer_count = count;
        Ok(())
    }

    /// Refuses a change of the timer configuration while the timers are
    /// started (XNU's `EBUSY` on `g_started`).
    pub(crate) fn ensure_stopped(&self) -> Result<(), KperfError> {
        if self.started {
            return Err(KperfError::Busy);
        }
        Ok(())
    }

    /// Index of a configured timer id (CFG-T-2: ids below the count).
    pub(crate) fn timer_index(&self, id: u32) -> Result<usize, KperfError> {
        if id >= self.timer_count {
            return Err(KperfError::Inval);
        }
        Ok(id as usize)
    }

    /// A copy of a configured timer, global deadline included; `None` for an
    /// id at or above the count.
    pub fn timer(&self, id: u32) -> Option<KpTimer> {
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
        self.ensure_stopped()?;
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
        self.ensure_stopped()?;
        self.timers[index].action = action;
        if self.pet_timer == id && !self.lightweight_pet {
            self.pet_action = action;
        }
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
}
