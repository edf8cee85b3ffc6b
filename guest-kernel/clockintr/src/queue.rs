//! One CPU's queue of clock interrupt events (`struct clockintr_queue`):
//! establishment, `clockintr_cpu_init`, the sorted pending list, trigger and
//! inspection. Dispatch is in the child module `dispatch`.

mod dispatch;

use crate::{nsec_advance, ClockIntr, Error, IntrClock, Machine, ParkMiller, Stats};

/// The built-in periodic events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// `clockintr_hardclock`.
    Hardclock,
    /// `clockintr_statclock`.
    Statclock,
    /// `clockintr_schedclock`.
    Schedclock,
}

impl EventKind {
    /// The callback's name, as ddb prints it.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Hardclock => "clockintr_hardclock",
            Self::Statclock => "clockintr_statclock",
            Self::Schedclock => "clockintr_schedclock",
        }
    }
}

/// An event slot: established at first `cpu_init`, pending or idle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// Which callback.
    pub kind: EventKind,
    /// Absolute expiration, ns of uptime.
    pub expiration: u64,
}

/// Largest number of events a queue holds.
pub const MAX_EVENTS: usize = 3;

/// One CPU's queue (`struct clockintr_queue`).
#[derive(Debug)]
pub struct ClockQueue<I> {
    initialized: bool,
    intrclock: Option<I>,
    unit: u32,
    ncpus: u32,
    primary: bool,
    uptime: u64,
    events: [Option<Event>; MAX_EVENTS],
    pending: [bool; MAX_EVENTS],
    /// Indices into `events`, sorted by expiration (FIFO among equals).
    pend: [usize; MAX_EVENTS],
    npend: usize,
    running: Option<EventKind>,
    dispatching: bool,
    stats: Stats,
    /// Generation of `stats` (0 while being written; tests force its wrap).
    pub(crate) gen: u32,
    rng: ParkMiller,
}

pub(crate) const HARDCLOCK: usize = 0;
pub(crate) const STATCLOCK: usize = 1;
pub(crate) const SCHEDCLOCK: usize = 2;

impl<I: IntrClock> ClockQueue<I> {
    /// A queue for CPU `unit` of `ncpus` (`primary` is the boot CPU); the
    /// statclock generator is seeded from `seed` and `unit`.
    pub const fn new(unit: u32, ncpus: u32, primary: bool, seed: u64) -> Self {
        Self {
            initialized: false,
            intrclock: None,
            unit,
            ncpus,
            primary,
            uptime: 0,
            events: [None; MAX_EVENTS],
            pending: [false; MAX_EVENTS],
            pend: [0; MAX_EVENTS],
            npend: 0,
            running: None,
            dispatching: false,
            stats: Stats {
                dispatched: 0,
                early: 0,
                earliness: 0,
                lateness: 0,
                prompt: 0,
                run: 0,
                spurious: 0,
            },
            gen: 1,
            rng: ParkMiller::for_cpu(seed, unit),
        }
    }

    /// `clockintr_cpu_init(ic)` (CI-CPU-1..8). The first call establishes the
    /// events and keeps `ic`; later calls ignore `ic` and re-place every event
    /// on its grid strictly after the current uptime without running
    /// callbacks (the resume rule). Never touches the intrclock.
    pub fn cpu_init<M: Machine>(
        &mut self,
        global: &ClockIntr,
        machine: &mut M,
        ic: Option<I>,
    ) -> Result<(), Error> {
        if !global.initialized() {
            return Err(Error::CpuInitBeforeInit);
        }
        let first = !self.initialized;
        if first {
            self.events[HARDCLOCK] = Some(Event {
                kind: EventKind::Hardclock,
                expiration: 0,
            });
            self.events[STATCLOCK] = Some(Event {
                kind: EventKind::Statclock,
                expiration: 0,
            });
            if global.schedclock_period() != 0 {
                self.events[SCHEDCLOCK] = Some(Event {
                    kind: EventKind::Schedclock,
                    expiration: 0,
                });
            }
            self.intrclock = ic;
        }
        // Stagger: secondary CPUs with an intrclock use their unit number (CI-CPU-4).
        let multiplier = if !self.primary && self.intrclock.is_some() {
            u64::from(self.unit)
        } else {
            0
        };
        let ncpus = u64::from(self.ncpus.max(1));
        self.uptime = machine.nsecuptime();

        let period = global.hardclock_period();
        self.schedule(HARDCLOCK, period / ncpus * multiplier);
        // The primary CPU's first call does not skip hardclocks (CI-CPU-3).
        if !self.primary || !first {
            self.advance(HARDCLOCK, period);
        }
        let avg = u64::from(global.active_statvar().avg);
        self.schedule(STATCLOCK, avg / ncpus * multiplier);
        self.advance(STATCLOCK, avg);
        let sched = global.schedclock_period();
        if sched != 0 {
            self.schedule(SCHEDCLOCK, sched / ncpus * multiplier);
            self.advance(SCHEDCLOCK, sched);
        }
        self.initialized = true;
        Ok(())
    }

    /// Places event `slot` at `expiration`, moving it behind equal peers (CI-Q-1, CI-Q-2).
    pub(crate) fn schedule(&mut self, slot: usize, expiration: u64) {
        let Some(event) = self.events[slot].as_mut() else {
            return;
        };
        event.expiration = expiration;
        self.unlink(slot);
        let at = self.pend[..self.npend]
            .iter()
            .position(|&i| self.events[i].is_some_and(|e| e.expiration > expiration))
            .unwrap_or(self.npend);
        self.pend.copy_within(at..self.npend, at + 1);
        self.pend[at] = slot;
        self.npend += 1;
        self.pending[slot] = true;
    }

    pub(crate) fn unlink(&mut self, slot: usize) {
        if !self.pending[slot] {
            return;
        }
        if let Some(at) = self.pend[..self.npend].iter().position(|&i| i == slot) {
            self.pend.copy_within(at + 1..self.npend, at);
            self.npend -= 1;
        }
        self.pending[slot] = false;
    }

    /// `clockintr_advance`: reschedule `slot` a whole number of periods past the
    /// cached uptime; returns how many periods.
    fn advance(&mut self, slot: usize, period: u64) -> u64 {
        let Some(event) = self.events[slot] else {
            return 0;
        };
        let mut expiration = event.expiration;
        let count = nsec_advance(&mut expiration, period, self.uptime);
        self.schedule(slot, expiration);
        count
    }

    fn head(&self) -> Option<Event> {
        (self.npend > 0)
            .then(|| self.events[self.pend[0]])
            .flatten()
    }

    /// `clockintr_trigger()` (CI-TRG-1): ask the intrclock for a dispatch as
    /// soon as possible; nothing without an intrclock.
    pub fn trigger(&mut self) -> Result<(), Error> {
        if !self.initialized {
            return Err(Error::CpuNotInitialized);
        }
        if let Some(ic) = self.intrclock.as_mut() {
            ic.trigger();
        }
        Ok(())
    }

    /// This CPU's statistics and their generation (0 while being written).
    pub fn stats(&self) -> (Stats, u32) {
        (self.stats, self.gen)
    }

    /// Whether `cpu_init` has run.
    pub fn initialized(&self) -> bool {
        self.initialized
    }

    /// Marks this CPU as dispatching, as a nested interrupt inside a callback
    /// would find it (tests of CI-D-1 cannot re-enter through `&mut self`).
    #[cfg(test)]
    pub(crate) fn set_dispatching_for_test(&mut self) {
        self.dispatching = true;
    }

    /// The pending events in queue order (TR-C-4).
    pub fn pending(&self) -> impl Iterator<Item = Event> + '_ {
        self.pend[..self.npend]
            .iter()
            .filter_map(|&i| self.events[i])
    }

    /// Established events that are not pending (ddb's "est").
    pub fn idle_events(&self) -> impl Iterator<Item = Event> + '_ {
        (0..MAX_EVENTS)
            .filter(|&i| !self.pending[i])
            .filter_map(|i| self.events[i])
    }

    /// The event whose callback is running, if any.
    pub fn running(&self) -> Option<EventKind> {
        self.running
    }

    /// The intrclock this CPU registered, if any.
    pub fn intrclock(&self) -> Option<&I> {
        self.intrclock.as_ref()
    }

    /// The cached uptime of the last dispatch or cpu_init.
    pub fn uptime(&self) -> u64 {
        self.uptime
    }
}
