//! The PET knobs (CFG-T-3, CFG-P-1, PET-L-3) and the hooks of traditional
//! PET: its one-shot, its handler's kicks and its re-arm (PET-H-*, PET-R-1,
//! PET-C-1, PET-L-1). The PET sampler itself is not here.

use crate::{sample_flags, Kperf, KperfError, SampleRequest, PET_HANDLER_CPU};

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

impl Kperf {
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
        self.ensure_stopped()?;
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
    /// lightweight mode only [`Kperf::set_pet_timer`] captures it (PET-L-4),
    /// and, deviating from XNU (AMB-11), turning sampling on.
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
            settings: self.action(timer.action),
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
