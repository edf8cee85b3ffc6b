//! The frequencies `clockintr_init` takes and the statclock parameters derived
//! from them.

use crate::Error;

/// Randomize the statclock (`clockintr_init` flag).
pub const CL_RNDSTAT: u32 = 0x8000_0000;
/// Every flag `clockintr_init` accepts.
pub const CL_FLAG_MASK: u32 = CL_RNDSTAT;
/// One second in ns.
pub(crate) const NSEC_PER_SEC: u64 = 1_000_000_000;

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
