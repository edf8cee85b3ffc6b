//! OpenBSD 7.3's clock interrupt scheduler, `clockintr`, as a `no_std` library.
//!
//! Semantics follow `kern_clockintr.c` revision 1.5 (2023-03-14) and
//! `clockintr(9)` revision 1.3, the versions that shipped with OpenBSD 7.3
//! (spec section 2 and AMB-1): a sorted per-CPU queue of events; hardclock,
//! statclock and (when `schedhz` > 0) schedclock established per CPU;
//! catch-up by repetition; a randomized statclock; per-callback `run`
//! counting; a `spurious` statistic.
//!
//! The library has no clock and no hardware of its own. The caller provides:
//! - a [`Machine`]: `nsecuptime()` and the kernel's `hardclock`, `statclock`
//!   and `schedclock`, called with the interrupt frame in scope;
//! - an [`IntrClock`] per CPU: the one-shot interrupt clock (`rearm`, `trigger`).
//!
//! The guest kernel implements both on the VMM's timer device; the unit tests
//! implement them with a fake clock and a recording intrclock.
//!
//! Where 7.3 panics or asserts, this library returns an error ([`Error`]) and
//! the guest kernel turns it into a panic with the same message.
//!
//! Deliberate deviations, all documented where they apply:
//! - the per-CPU statistics sum includes `spurious`, as OpenBSD 7.4 does
//!   (7.3 reports 0 there; spec TR-C-3, AMB-5);
//! - `CL_RNDSTAT` is rejected for frequencies whose random mask would be 0 or
//!   wrap (above 250 MHz; AMB-4);
//! - the statclock pseudo-random generator is Park-Miller per CPU, seeded from
//!   a configurable seed and the CPU number, so that a fixed seed reproduces
//!   each CPU's sequence regardless of how CPUs interleave (CI-RND-4 allows any
//!   uniform 31-bit generator; OpenBSD shares one generator, seed 1).

#![no_std]
#![deny(missing_docs)]

#[cfg(test)]
extern crate std;

mod rng;
#[cfg(test)]
mod tests;

use core::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

pub use rng::ParkMiller;

/// Randomize the statclock (`clockintr_init` flag).
pub const CL_RNDSTAT: u32 = 0x8000_0000;
/// Every flag `clockintr_init` accepts.
pub const CL_FLAG_MASK: u32 = CL_RNDSTAT;
/// One second in ns.
const NSEC_PER_SEC: u64 = 1_000_000_000;

/// A broken precondition or a misuse; each is fatal in OpenBSD.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// hz outside 1..=10^9.
    Hz(u32),
    /// stathz outside 1..=10^9.
    Stathz(u32),
    /// profhz below stathz or above 10^9.
    ProfhzRange {
        /// The value.
        profhz: u32,
        /// stathz.
        stathz: u32,
    },
    /// profhz not a multiple of stathz.
    ProfhzMultiple {
        /// The value.
        profhz: u32,
        /// stathz.
        stathz: u32,
    },
    /// schedhz outside 0..=10^9.
    Schedhz(i64),
    /// Flags other than `CL_RNDSTAT`.
    Flags(u32),
    /// `CL_RNDSTAT` with a frequency whose random mask would be degenerate (AMB-4).
    RndstatTooFast(u32),
    /// `clockintr_init` on a CPU other than the primary.
    InitNotPrimary,
    /// `clockintr_init` called twice.
    InitTwice,
    /// `clockintr_cpu_init` before `clockintr_init`.
    CpuInitBeforeInit,
    /// dispatch or trigger before this CPU's `clockintr_cpu_init`.
    CpuNotInitialized,
    /// dispatch entered while already dispatching on this CPU.
    RecursiveDispatch,
    /// dispatch called below clock interrupt priority.
    NotAtClockIpl,
    /// `clockintr_setstatclockrate` with a frequency that is neither stathz nor profhz.
    StatclockRate {
        /// The frequency asked for.
        freq: u32,
        /// stathz.
        stathz: u32,
        /// profhz.
        profhz: u32,
    },
    /// `clockintr_setstatclockrate` before `clockintr_init`.
    RateBeforeInit,
}

impl Error {
    /// A fixed message for the error, without its values: for kernels that
    /// must not run `core::fmt` number formatting (the guest's CPL0 code).
    pub const fn message(&self) -> &'static str {
        match self {
            Self::Hz(_) => "clockintr_init: hz out of range (CI-INIT-3)",
            Self::Stathz(_) => "clockintr_init: stathz out of range (CI-INIT-3)",
            Self::ProfhzRange { .. } => "clockintr_init: profhz out of range (CI-INIT-3)",
            Self::ProfhzMultiple { .. } => {
                "clockintr_init: profhz not a multiple of stathz (CI-INIT-3)"
            }
            Self::Schedhz(_) => "clockintr_init: schedhz out of range (CI-INIT-3)",
            Self::Flags(_) => "clockintr_init: unknown flags (CI-INIT-3)",
            Self::RndstatTooFast(_) => "clockintr_init: statclock too fast to randomize (AMB-4)",
            Self::InitNotPrimary => "clockintr_init: not called on the primary CPU (CI-INIT-3)",
            Self::InitTwice => "clockintr_init: already initialized (CI-INIT-3)",
            Self::CpuInitBeforeInit => "clockintr_cpu_init: clockintr_init has not run (CI-CPU-7)",
            Self::CpuNotInitialized => {
                "clockintr: this CPU has not run clockintr_cpu_init (CI-CPU-7)"
            }
            Self::RecursiveDispatch => "clockintr_dispatch: recursive dispatch (CI-D-1)",
            Self::NotAtClockIpl => "clockintr_dispatch: not at clock interrupt priority (CI-D-2)",
            Self::StatclockRate { .. } => {
                "clockintr_setstatclockrate: frequency is not stathz or profhz (CI-RATE-1)"
            }
            Self::RateBeforeInit => {
                "clockintr_setstatclockrate: clockintr_init has not run (CI-RATE-1)"
            }
        }
    }
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            Self::Hz(v) => write!(f, "clockintr_init: hz {v} is out of range: 1 to 1000000000 (CI-INIT-3)"),
            Self::Stathz(v) => {
                write!(f, "clockintr_init: stathz {v} is out of range: 1 to 1000000000 (CI-INIT-3)")
            }
            Self::ProfhzRange { profhz, stathz } => write!(
                f,
                "clockintr_init: profhz {profhz} is out of range: stathz ({stathz}) to 1000000000 (CI-INIT-3)"
            ),
            Self::ProfhzMultiple { profhz, stathz } => write!(
                f,
                "clockintr_init: profhz {profhz} is not a multiple of stathz {stathz} (CI-INIT-3)"
            ),
            Self::Schedhz(v) => {
                write!(f, "clockintr_init: schedhz {v} is out of range: 0 to 1000000000 (CI-INIT-3)")
            }
            Self::Flags(v) => write!(
                f,
                "clockintr_init: unknown flags {v:#x}: only CL_RNDSTAT ({CL_RNDSTAT:#x}) is defined (CI-INIT-3)"
            ),
            Self::RndstatTooFast(v) => write!(
                f,
                "clockintr_init: a randomized statclock needs a frequency of at most 250000000 Hz, not {v} (AMB-4)"
            ),
            Self::InitNotPrimary => f.write_str("clockintr_init: not called on the primary CPU (CI-INIT-3)"),
            Self::InitTwice => f.write_str("clockintr_init: already initialized (CI-INIT-3)"),
            Self::CpuInitBeforeInit => {
                f.write_str("clockintr_cpu_init: clockintr_init has not run (CI-CPU-7)")
            }
            Self::CpuNotInitialized => {
                f.write_str("clockintr: this CPU has not run clockintr_cpu_init (CI-CPU-7)")
            }
            Self::RecursiveDispatch => f.write_str("clockintr_dispatch: recursive dispatch (CI-D-1)"),
            Self::NotAtClockIpl => {
                f.write_str("clockintr_dispatch: not at clock interrupt priority (CI-D-2)")
            }
            Self::StatclockRate { freq, stathz, profhz } => write!(
                f,
                "clockintr_setstatclockrate: frequency is not stathz ({stathz}) or profhz ({profhz}): {freq} (CI-RATE-1)"
            ),
            Self::RateBeforeInit => {
                f.write_str("clockintr_setstatclockrate: clockintr_init has not run (CI-RATE-1)")
            }
        }
    }
}

/// The frequencies `clockintr_init` reads (OpenBSD's globals hz, stathz, profhz, schedhz).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// hardclock frequency.
    pub hz: u32,
    /// statclock frequency.
    pub stathz: u32,
    /// statclock frequency while profiling.
    pub profhz: u32,
    /// schedclock frequency; 0 = no schedclock.
    pub schedhz: i64,
    /// `CL_RNDSTAT` or 0.
    pub flags: u32,
}

impl Config {
    /// OpenBSD 7.3 on amd64: hz 100, stathz = hz, profhz = 10 * stathz,
    /// schedhz 0, randomized statclock (CI-RND-6).
    pub const fn openbsd_amd64() -> Self {
        Self {
            hz: 100,
            stathz: 100,
            profhz: 1000,
            schedhz: 0,
            flags: CL_RNDSTAT,
        }
    }

    /// Checks every frequency and flag precondition of `clockintr_init`
    /// (CI-INIT-3, AMB-4), in the order 7.3 asserts them.
    pub fn validate(&self) -> Result<(), Error> {
        const MAX: u32 = 1_000_000_000;
        if self.flags & !CL_FLAG_MASK != 0 {
            return Err(Error::Flags(self.flags & !CL_FLAG_MASK));
        }
        if !(1..=MAX).contains(&self.hz) {
            return Err(Error::Hz(self.hz));
        }
        if !(1..=MAX).contains(&self.stathz) {
            return Err(Error::Stathz(self.stathz));
        }
        if self.profhz < self.stathz || self.profhz > MAX {
            return Err(Error::ProfhzRange {
                profhz: self.profhz,
                stathz: self.stathz,
            });
        }
        if !self.profhz.is_multiple_of(self.stathz) {
            return Err(Error::ProfhzMultiple {
                profhz: self.profhz,
                stathz: self.stathz,
            });
        }
        if !(0..=i64::from(MAX)).contains(&self.schedhz) {
            return Err(Error::Schedhz(self.schedhz));
        }
        if self.flags & CL_RNDSTAT != 0 {
            // floor(avg / 2) < 2 makes the mask 0 (endless redraw) or wrap to
            // all ones (AMB-4): reject stathz or profhz above 250 MHz.
            for freq in [self.stathz, self.profhz] {
                if StatVar::new(freq).avg < 4 {
                    return Err(Error::RndstatTooFast(freq));
                }
            }
        }
        Ok(())
    }
}

/// Statclock parameters for one frequency (CI-RND-1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatVar {
    /// Average period, ns: floor(10^9 / freq).
    pub avg: u32,
    /// Lower bound of a random period: avg - var / 2.
    pub min: u32,
    /// Random offset mask: var - 1, where var is the largest power of two <= avg / 2.
    pub mask: u32,
}

impl StatVar {
    /// `clockintr_statvar_init`. `freq` must be in 1..=10^9.
    pub const fn new(freq: u32) -> Self {
        let avg = (NSEC_PER_SEC / freq as u64) as u32;
        let half_avg = avg / 2;
        let mut var: u32 = 1 << 31;
        while var > half_avg {
            var /= 2;
        }
        // For avg < 2, var reaches 0 and the mask wraps: AMB-4 rejects such rates.
        Self {
            avg,
            min: avg - var / 2,
            mask: var.wrapping_sub(1),
        }
    }
}

/// `nsec_advance`: moves `next` past `now` in whole periods; returns how many.
pub fn nsec_advance(next: &mut u64, period: u64, now: u64) -> u64 {
    if *next > now {
        return 0;
    }
    let elapsed = (now - *next) / period + 1;
    *next += period * elapsed;
    elapsed
}

const FLAG_INIT: u32 = 1 << 0;

/// The global state `clockintr_init` sets up, shared by all CPUs.
///
/// Fields are atomics so that one static instance can be shared by every vCPU
/// of the guest: the primary CPU writes the configuration once before the
/// others start, and `setstatclockrate` publishes the active statclock triple
/// under a generation number (0 while writing), as 7.3 does (CI-RATE-2).
#[derive(Debug, Default)]
pub struct ClockIntr {
    flags: AtomicU32,
    user_flags: AtomicU32,
    hz: AtomicU32,
    stathz: AtomicU32,
    profhz: AtomicU32,
    schedhz: AtomicU64,
    hardclock_period: AtomicU64,
    schedclock_period: AtomicU64,
    stat: [AtomicU32; 3],
    prof: [AtomicU32; 3],
    active: [AtomicU32; 3],
    active_gen: AtomicU32,
}

impl ClockIntr {
    /// A not yet initialised instance (usable in a `static`).
    pub const fn new() -> Self {
        Self {
            flags: AtomicU32::new(0),
            user_flags: AtomicU32::new(0),
            hz: AtomicU32::new(0),
            stathz: AtomicU32::new(0),
            profhz: AtomicU32::new(0),
            schedhz: AtomicU64::new(0),
            hardclock_period: AtomicU64::new(0),
            schedclock_period: AtomicU64::new(0),
            stat: [AtomicU32::new(0), AtomicU32::new(0), AtomicU32::new(0)],
            prof: [AtomicU32::new(0), AtomicU32::new(0), AtomicU32::new(0)],
            active: [AtomicU32::new(0), AtomicU32::new(0), AtomicU32::new(0)],
            active_gen: AtomicU32::new(0),
        }
    }

    /// `clockintr_init(flags)` with the given frequencies, on the primary CPU
    /// (CI-INIT-1..6).
    pub fn init(&self, config: &Config, is_primary: bool) -> Result<(), Error> {
        if !is_primary {
            return Err(Error::InitNotPrimary);
        }
        if self.flags.load(Ordering::Acquire) & FLAG_INIT != 0 {
            return Err(Error::InitTwice);
        }
        config.validate()?;
        self.hz.store(config.hz, Ordering::Relaxed);
        self.stathz.store(config.stathz, Ordering::Relaxed);
        self.profhz.store(config.profhz, Ordering::Relaxed);
        self.schedhz.store(config.schedhz as u64, Ordering::Relaxed);
        self.hardclock_period
            .store(NSEC_PER_SEC / u64::from(config.hz), Ordering::Relaxed);
        let sched_period = if config.schedhz == 0 {
            0
        } else {
            NSEC_PER_SEC / config.schedhz as u64
        };
        self.schedclock_period
            .store(sched_period, Ordering::Relaxed);
        store3(&self.stat, StatVar::new(config.stathz));
        store3(&self.prof, StatVar::new(config.profhz));
        store3(&self.active, StatVar::new(config.stathz));
        self.active_gen.store(1, Ordering::Release);
        self.user_flags.store(config.flags, Ordering::Relaxed);
        self.flags.store(FLAG_INIT, Ordering::Release);
        Ok(())
    }

    /// Whether `init` has run.
    pub fn initialized(&self) -> bool {
        self.flags.load(Ordering::Acquire) & FLAG_INIT != 0
    }

    /// Whether the statclock is randomized.
    pub fn randomized(&self) -> bool {
        self.user_flags.load(Ordering::Relaxed) & CL_RNDSTAT != 0
    }

    /// hardclock period in ns (CI-INIT-1).
    pub fn hardclock_period(&self) -> u64 {
        self.hardclock_period.load(Ordering::Relaxed)
    }

    /// schedclock period in ns; 0 when there is no schedclock (CI-INIT-4).
    pub fn schedclock_period(&self) -> u64 {
        self.schedclock_period.load(Ordering::Relaxed)
    }

    /// The precomputed stathz and profhz parameter sets (CI-INIT-5).
    pub fn statvars(&self) -> (StatVar, StatVar) {
        (load3(&self.stat), load3(&self.prof))
    }

    /// The active statclock parameters, read consistently (retry while the
    /// generation is 0 or changed), as statclock does.
    pub fn active_statvar(&self) -> StatVar {
        loop {
            let gen = self.active_gen.load(Ordering::Acquire);
            let value = load3(&self.active);
            // membar_consumer(): the values are read before the generation is re-read.
            fence(Ordering::Acquire);
            if gen != 0 && gen == self.active_gen.load(Ordering::Relaxed) {
                return value;
            }
            core::hint::spin_loop();
        }
    }

    /// `clockintr_setstatclockrate(freq)`: switch the statclock between stathz
    /// and profhz (CI-RATE-1..3). Callers must serialise writers (OpenBSD holds
    /// a mutex; the guest kernel calls it with a lock held).
    pub fn setstatclockrate(&self, freq: u32) -> Result<(), Error> {
        if !self.initialized() {
            return Err(Error::RateBeforeInit);
        }
        let stathz = self.stathz.load(Ordering::Relaxed);
        let profhz = self.profhz.load(Ordering::Relaxed);
        let source = if freq == stathz {
            &self.stat
        } else if freq == profhz {
            &self.prof
        } else {
            return Err(Error::StatclockRate {
                freq,
                stathz,
                profhz,
            });
        };
        let ogen = self.active_gen.load(Ordering::Relaxed);
        self.active_gen.store(0, Ordering::Relaxed);
        // membar_producer(): a reader that sees a new value also sees gen 0 or the new gen.
        fence(Ordering::Release);
        store3(&self.active, load3(source));
        self.active_gen
            .store(ogen.wrapping_add(1).max(1), Ordering::Release);
        Ok(())
    }

    /// The configured frequencies.
    pub fn config(&self) -> Config {
        Config {
            hz: self.hz.load(Ordering::Relaxed),
            stathz: self.stathz.load(Ordering::Relaxed),
            profhz: self.profhz.load(Ordering::Relaxed),
            schedhz: self.schedhz.load(Ordering::Relaxed) as i64,
            flags: self.user_flags.load(Ordering::Relaxed),
        }
    }
}

fn store3(to: &[AtomicU32; 3], v: StatVar) {
    to[0].store(v.avg, Ordering::Relaxed);
    to[1].store(v.min, Ordering::Relaxed);
    to[2].store(v.mask, Ordering::Relaxed);
}

fn load3(from: &[AtomicU32; 3]) -> StatVar {
    StatVar {
        avg: from[0].load(Ordering::Relaxed),
        min: from[1].load(Ordering::Relaxed),
        mask: from[2].load(Ordering::Relaxed),
    }
}

/// The one-shot interrupt clock of a CPU (`struct intrclock`).
pub trait IntrClock {
    /// Interrupt no earlier than `nsecs` (>= 1) ns from now; replaces a pending request.
    fn rearm(&mut self, nsecs: u64);
    /// Interrupt as soon as possible.
    fn trigger(&mut self);
}

/// The kernel around the scheduler: its clock and its periodic work.
pub trait Machine {
    /// `nsecuptime()`: the uptime clock, ns.
    fn nsecuptime(&mut self) -> u64;
    /// Whether the CPU runs at clock interrupt priority (asserted by dispatch).
    fn at_clock_ipl(&self) -> bool;
    /// `hardclock(frame)`.
    fn hardclock(&mut self);
    /// `statclock(frame)`.
    fn statclock(&mut self);
    /// Whether a process is current on this CPU (`curproc != NULL`).
    fn has_curproc(&self) -> bool;
    /// `schedclock(curproc)`.
    fn schedclock(&mut self);
}

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

/// The per-CPU statistics (`struct clockintr_stat`, TR-C-1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Total ns spent dispatching.
    pub dispatched: u64,
    /// Dispatches that arrived before the first expiration.
    pub early: u64,
    /// Total ns by which they were early.
    pub earliness: u64,
    /// Total ns by which prompt dispatches were late.
    pub lateness: u64,
    /// Dispatches that ran at least one event.
    pub prompt: u64,
    /// Event callbacks run (not hardclock() calls; 7.3).
    pub run: u64,
    /// Dispatches with nothing scheduled.
    pub spurious: u64,
}

impl Stats {
    /// Field-wise sum, spurious included (as OpenBSD 7.4; 7.3 reports 0 there: AMB-5).
    pub fn add(&mut self, other: &Self) {
        self.dispatched += other.dispatched;
        self.early += other.early;
        self.earliness += other.earliness;
        self.lateness += other.lateness;
        self.prompt += other.prompt;
        self.run += other.run;
        self.spurious += other.spurious;
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

/// Calls per dispatch, per callback kind, for instrumentation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Calls {
    /// hardclock() calls.
    pub hardclock: u64,
    /// statclock() calls.
    pub statclock: u64,
    /// schedclock() calls.
    pub schedclock: u64,
}

/// What one dispatch did, beyond its return value (instrumentation).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DispatchReport {
    /// The dispatch's outcome.
    pub outcome: Outcome,
    /// Calls made.
    pub calls: Calls,
    /// The cached uptime at entry.
    pub start: u64,
    /// The last cached uptime.
    pub end: u64,
    /// The rearm requested, if any.
    pub rearm: Option<u64>,
}

/// Which of the three statistics a dispatch counted in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Outcome {
    /// At least one callback ran.
    Prompt,
    /// Too early: nothing ran, rearmed for the remaining time.
    Early,
    /// Nothing scheduled.
    #[default]
    Spurious,
}

/// A statclock interval observer (instrumentation: CI-RND tests on the real guest).
pub trait IntervalSink {
    /// A random statclock interval was drawn.
    fn interval(&mut self, ns: u64);
}

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
    gen: u32,
    rng: ParkMiller,
}

const HARDCLOCK: usize = 0;
const STATCLOCK: usize = 1;
const SCHEDCLOCK: usize = 2;

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
    fn schedule(&mut self, slot: usize, expiration: u64) {
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

    fn unlink(&mut self, slot: usize) {
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

    /// `clockintr_dispatch(frame)` (CI-D-1..7, CI-EV-1..4). Returns whether any
    /// callback ran, and a report of what happened.
    pub fn dispatch<M: Machine>(
        &mut self,
        global: &ClockIntr,
        machine: &mut M,
        sink: &mut dyn IntervalSink,
    ) -> Result<DispatchReport, Error> {
        if self.dispatching {
            return Err(Error::RecursiveDispatch);
        }
        self.dispatching = true;
        let result = self.dispatch_locked(global, machine, sink);
        self.dispatching = false;
        result
    }

    fn dispatch_locked<M: Machine>(
        &mut self,
        global: &ClockIntr,
        machine: &mut M,
        sink: &mut dyn IntervalSink,
    ) -> Result<DispatchReport, Error> {
        if !machine.at_clock_ipl() {
            return Err(Error::NotAtClockIpl);
        }
        if !self.initialized {
            return Err(Error::CpuNotInitialized);
        }
        let start = machine.nsecuptime();
        self.uptime = start;
        let mut report = DispatchReport {
            start,
            ..Default::default()
        };
        let mut run = 0u64;
        let mut lateness = 0;
        if let Some(head) = self.head() {
            if self.uptime >= head.expiration {
                lateness = start - head.expiration;
                while let Some(head) = self.head() {
                    if self.uptime < head.expiration {
                        // Double-check the time before giving up.
                        self.uptime = machine.nsecuptime();
                        if self.uptime < head.expiration {
                            break;
                        }
                    }
                    let slot = self.pend[0];
                    self.unlink(slot);
                    self.running = Some(head.kind);
                    self.run_event(slot, global, machine, sink, &mut report.calls);
                    self.running = None;
                    run += 1;
                }
            }
            // Rearm once if the CPU has an intrclock and events remain (CI-D-5).
            if let (Some(head), Some(ic)) = (self.head(), self.intrclock.as_mut()) {
                let nsecs = head.expiration - self.uptime;
                ic.rearm(nsecs);
                report.rearm = Some(nsecs);
            }
        }
        // Statistics, published under a generation number (CI-D-7).
        let ogen = self.gen;
        self.gen = 0;
        self.stats.dispatched += self.uptime - start;
        if run > 0 {
            self.stats.lateness += lateness;
            self.stats.prompt += 1;
            self.stats.run += run;
            report.outcome = Outcome::Prompt;
        } else if let Some(head) = self.head() {
            self.stats.early += 1;
            self.stats.earliness += head.expiration - self.uptime;
            report.outcome = Outcome::Early;
        } else {
            self.stats.spurious += 1;
            report.outcome = Outcome::Spurious;
        }
        self.gen = ogen.wrapping_add(1).max(1);
        report.end = self.uptime;
        Ok(report)
    }

    fn run_event<M: Machine>(
        &mut self,
        slot: usize,
        global: &ClockIntr,
        machine: &mut M,
        sink: &mut dyn IntervalSink,
        calls: &mut Calls,
    ) {
        let Some(event) = self.events[slot] else {
            return;
        };
        match event.kind {
            EventKind::Hardclock => {
                let count = self.advance(slot, global.hardclock_period());
                for _ in 0..count {
                    machine.hardclock();
                }
                calls.hardclock += count;
            }
            EventKind::Statclock => {
                let count = if global.randomized() {
                    let var = global.active_statvar();
                    let mut expiration = event.expiration;
                    let mut count = 0;
                    while expiration <= self.uptime {
                        let off = loop {
                            let off = self.rng.next() & var.mask;
                            if off != 0 {
                                break off;
                            }
                        };
                        let interval = u64::from(var.min) + u64::from(off);
                        sink.interval(interval);
                        expiration += interval;
                        count += 1;
                    }
                    self.schedule(slot, expiration);
                    count
                } else {
                    self.advance(slot, u64::from(global.active_statvar().avg))
                };
                for _ in 0..count {
                    machine.statclock();
                }
                calls.statclock += count;
            }
            EventKind::Schedclock => {
                let count = self.advance(slot, global.schedclock_period());
                if machine.has_curproc() {
                    for _ in 0..count {
                        machine.schedclock();
                    }
                    calls.schedclock += count;
                }
            }
        }
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
