//! The errors: every precondition 7.3 panics or asserts on.

use crate::CL_RNDSTAT;

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
