//! The global state `clockintr_init` sets up, shared by all CPUs.

use core::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

use crate::config::NSEC_PER_SEC;
use crate::{Config, Error, StatVar, CL_RNDSTAT};

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
    pub(crate) active_gen: AtomicU32,
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
