//! The errors of kperf requests.

/// A refused kperf request, with the errno XNU returns for it (CFG-API-1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KperfError {
    /// `EINVAL`: an id or value out of range.
    #[error("Invalid kperf argument (EINVAL)")]
    Inval,
    /// `EBUSY`: the timers are started or sampling is on.
    #[error("kperf is busy: timers are started or sampling is on (EBUSY)")]
    Busy,
    /// `ECANCELED`: sampling cannot start without an action.
    #[error("kperf sampling cannot start without actions (ECANCELED)")]
    Canceled,
    /// `EPERM`: the caller may not configure kperf.
    #[error("Not permitted to configure kperf (EPERM)")]
    Perm,
    /// `EFAULT`: a request without its value.
    #[error("kperf request without a value (EFAULT)")]
    Fault,
    /// `ENOENT`: an unknown request.
    #[error("Unknown kperf request (ENOENT)")]
    NoEnt,
    /// `ENOMEM`: an allocation failed.
    #[error("Out of memory for kperf (ENOMEM)")]
    NoMem,
}

impl KperfError {
    /// The errno value (Linux and Darwin agree on these seven).
    pub const fn errno(self) -> i32 {
        match self {
            Self::Inval => 22,
            Self::Busy => 16,
            Self::Canceled => 125,
            Self::Perm => 1,
            Self::Fault => 14,
            Self::NoEnt => 2,
            Self::NoMem => 12,
        }
    }
}
