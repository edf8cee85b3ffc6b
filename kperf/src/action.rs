//! Actions: what a sample records (CFG-A-*).

use crate::{
    sampler, Kperf, KperfError, ACTION_MAX, KCALLSTACK_DEPTH_MAX, KCALLSTACK_DEPTH_MIN,
    PID_FILTER_ALL, UCALLSTACK_DEPTH_MAX, UCALLSTACK_DEPTH_MIN,
};

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
    /// How many of its timer's periods separate two kicks of a vCPU (not in
    /// XNU: a VMM's sampling tier): 1, every period (the default); N > 1,
    /// every Nth; 0, never. The periods without a kick are sampled by the
    /// VMM without stopping the vCPU; the engine only schedules the kicks.
    pub kick_every: u32,
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
            kick_every: 1,
        }
    }
}

impl Kperf {
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

    /// The settings of action `id`, as a sample needs them: the null action's
    /// (no samplers) for id 0 or an id above the count.
    pub fn action(&self, id: u32) -> Action {
        self.action_get(id)
            .ok()
            .flatten()
            .copied()
            .unwrap_or_default()
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

    /// The action's [`Action::kick_every`]; 1 for action 0.
    ///
    /// # Errors
    ///
    /// [`KperfError::Inval`] for an id above the count.
    pub fn action_kick_every(&self, id: u32) -> Result<u32, KperfError> {
        Ok(self.action_get(id)?.map_or(1, |a| a.kick_every))
    }

    /// Sets the action's [`Action::kick_every`]. Refused while the timers
    /// are started: the deadlines already scheduled follow the old value.
    ///
    /// # Errors
    ///
    /// [`KperfError::Busy`] while started, then [`KperfError::Inval`] for
    /// id 0 or an id above the count.
    pub fn set_action_kick_every(&mut self, id: u32, every: u32) -> Result<(), KperfError> {
        if self.started {
            return Err(KperfError::Busy);
        }
        self.action_mut(id)?.kick_every = every;
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
        action.ucallstack_depth = checked_depth(depth, UCALLSTACK_DEPTH_MIN, UCALLSTACK_DEPTH_MAX)?;
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
        action.kcallstack_depth = checked_depth(depth, KCALLSTACK_DEPTH_MIN, KCALLSTACK_DEPTH_MAX)?;
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
}

/// `depth` if it lies in `min..=max` frames (CFG-A-3).
fn checked_depth(depth: u32, min: u32, max: u32) -> Result<u32, KperfError> {
    if (min..=max).contains(&depth) {
        Ok(depth)
    } else {
        Err(KperfError::Inval)
    }
}
