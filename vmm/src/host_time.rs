//! Host time: the host's monotonic clock, the VM's device clock derived from
//! it, and the per-thread POSIX timer a vCPU arms for its next deadline.
//!
//! Device time is what the guest sees as uptime (`TIMER_NOW`, spec AMB-2): ns of
//! `CLOCK_MONOTONIC` since the VM was created. Deadlines of the timer device and
//! of kperf are kept in device time and converted to absolute `CLOCK_MONOTONIC`
//! only when a [`PosixTimer`] is armed.

use std::io;

/// Reads `CLOCK_MONOTONIC` in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn timespec(ns: u64) -> libc::timespec {
    libc::timespec {
        tv_sec: (ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    }
}

/// Sleeps until the absolute `CLOCK_MONOTONIC` time `deadline_ns` (a signal may
/// cut the sleep short; callers re-check their condition).
pub fn sleep_until_monotonic(deadline_ns: u64) {
    let ts = timespec(deadline_ns);
    // SAFETY: valid clock id and timespec; no remainder is requested.
    unsafe {
        libc::clock_nanosleep(
            libc::CLOCK_MONOTONIC,
            libc::TIMER_ABSTIME,
            &ts,
            std::ptr::null_mut(),
        )
    };
}

/// Sets this thread's timer slack to 1 ns, so that its timers and timed waits
/// are not deferred by the default 50 us slack.
pub fn set_min_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes a plain integer.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0) };
}

/// The VM's device clock: device time 0 is the moment the VM was created.
#[derive(Clone, Copy, Debug)]
pub struct DeviceClock {
    epoch_ns: u64,
}

impl DeviceClock {
    /// A clock whose zero is now.
    pub fn start() -> Self {
        Self {
            epoch_ns: monotonic_ns(),
        }
    }

    /// Device time: ns since the VM was created. The guest's uptime clock.
    pub fn now(&self) -> u64 {
        monotonic_ns().saturating_sub(self.epoch_ns)
    }

    /// Converts a device-time deadline to absolute `CLOCK_MONOTONIC`.
    pub fn to_monotonic(&self, device_ns: u64) -> u64 {
        self.epoch_ns.saturating_add(device_ns)
    }
}

/// Which of a vCPU thread's POSIX timers a timer signal comes from (its
/// `sigev_value`, read back by [`crate::kick::drain_pending`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimerTag {
    /// The timer device's deadline (one-shot).
    Device = 0,
    /// kperf's sampling deadline (periodic while the period is fixed).
    Sampling = 1,
}

/// What a [`PosixTimer`] is armed for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Armed {
    /// The first expiry, absolute `CLOCK_MONOTONIC` ns.
    first_ns: u64,
    /// The period, ns; 0 for a one-shot.
    period_ns: u64,
}

/// A POSIX timer on `CLOCK_MONOTONIC` that signals the thread that created it
/// (`SIGEV_THREAD_ID`): its expiry reaches a vCPU thread with no helper-thread hop.
///
/// One-shot ([`PosixTimer::program`]) or periodic
/// ([`PosixTimer::program_periodic`]); either is re-armed (`timer_settime`)
/// only when the deadline it is asked for is not the one it already has. A
/// periodic timer re-arms itself in the kernel each time its signal is
/// consumed, and counts the expirations it missed meanwhile as the signal's
/// overrun.
#[derive(Debug)]
pub struct PosixTimer {
    id: libc::timer_t,
    armed: Option<Armed>,
    settime_calls: u64,
}

// SAFETY: the timer handle is an opaque kernel id; the timer is only used by the
// thread that owns the PosixTimer.
unsafe impl Send for PosixTimer {}

impl PosixTimer {
    /// Creates a timer whose expiry sends `signal` to the calling thread,
    /// with `tag` as the signal's value.
    pub fn for_current_thread(signal: libc::c_int, tag: TimerTag) -> io::Result<Self> {
        // SAFETY: an all-zero sigevent is valid; we fill in the fields we use.
        let mut event: libc::sigevent = unsafe { std::mem::zeroed() };
        event.sigev_notify = libc::SIGEV_THREAD_ID;
        event.sigev_signo = signal;
        event.sigev_value.sival_ptr = tag as usize as *mut libc::c_void;
        // SAFETY: gettid has no preconditions.
        event.sigev_notify_thread_id = unsafe { libc::gettid() };
        let mut id: libc::timer_t = std::ptr::null_mut();
        // SAFETY: valid clock id, event and output pointer.
        let ret = unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut event, &mut id) };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            id,
            armed: None,
            settime_calls: 0,
        })
    }

    /// Arms the timer once for the absolute `CLOCK_MONOTONIC` time
    /// `deadline_ns`, or disarms it for `None`. Does nothing when already
    /// armed for that time.
    pub fn program(&mut self, deadline_ns: Option<u64>) -> io::Result<()> {
        let want = deadline_ns.map(|first_ns| Armed {
            first_ns,
            period_ns: 0,
        });
        if self.armed == want {
            return Ok(());
        }
        self.settime(want)
    }

    /// Arms the timer to expire at the absolute `CLOCK_MONOTONIC` time
    /// `deadline_ns` and every `period_ns` after it. Does nothing when it is
    /// already periodic with that period and `deadline_ns` lies on its grid,
    /// at or after its first expiry: the kernel's next expiry is then the
    /// first grid point after the signal was last consumed, never later than
    /// `deadline_ns` as long as `deadline_ns` lies after that moment (a
    /// deadline computed after the consumption does).
    pub fn program_periodic(&mut self, deadline_ns: u64, period_ns: u64) -> io::Result<()> {
        if period_ns == 0 {
            return self.program(Some(deadline_ns));
        }
        if let Some(armed) = self.armed {
            if armed.period_ns == period_ns
                && deadline_ns >= armed.first_ns
                && (deadline_ns - armed.first_ns).is_multiple_of(period_ns)
            {
                return Ok(());
            }
        }
        self.settime(Some(Armed {
            first_ns: deadline_ns,
            period_ns,
        }))
    }

    fn settime(&mut self, want: Option<Armed>) -> io::Result<()> {
        // A zero it_value disarms; an absolute time in the past fires at once.
        let spec = libc::itimerspec {
            it_interval: timespec(want.map_or(0, |a| a.period_ns)),
            it_value: timespec(want.map_or(0, |a| a.first_ns.max(1))),
        };
        // SAFETY: the timer id is ours; the spec is valid.
        let ret = unsafe {
            libc::timer_settime(self.id, libc::TIMER_ABSTIME, &spec, std::ptr::null_mut())
        };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
        self.armed = want;
        self.settime_calls += 1;
        Ok(())
    }

    /// The `timer_settime` calls made so far (arming, re-arming, disarming).
    pub fn settime_calls(&self) -> u64 {
        self.settime_calls
    }
}

impl Drop for PosixTimer {
    fn drop(&mut self) {
        // SAFETY: the timer id is ours and deleted once.
        unsafe { libc::timer_delete(self.id) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_device_clock_starts_at_zero_and_converts_both_ways() {
        let clock = DeviceClock::start();
        let a = clock.now();
        let b = clock.now();
        assert!(a <= b);
        // Well under a second has passed since the clock started.
        assert!(b < 1_000_000_000, "{b}");
        // Device time b is b ns after the clock's zero, which lies in the past.
        let zero = clock.to_monotonic(0);
        assert!(zero <= monotonic_ns() - b);
        assert_eq!(clock.to_monotonic(b), zero + b);
        assert_eq!(clock.to_monotonic(u64::MAX), u64::MAX, "saturates");
    }

    #[test]
    fn test_timers_are_rearmed_only_when_the_deadline_changes() {
        let mut timer = PosixTimer::for_current_thread(libc::SIGRTMAX(), TimerTag::Device).unwrap();
        // Far in the future: nothing fires during the test.
        let base = monotonic_ns() + 3_600_000_000_000;
        timer.program(Some(base)).unwrap();
        timer.program(Some(base)).unwrap();
        assert_eq!(timer.settime_calls(), 1, "same one-shot deadline");
        timer.program_periodic(base, 100).unwrap();
        assert_eq!(timer.settime_calls(), 2, "one-shot to periodic");
        for k in 1..10 {
            timer.program_periodic(base + k * 100, 100).unwrap();
        }
        assert_eq!(timer.settime_calls(), 2, "on the grid: no re-arm");
        timer.program_periodic(base + 150, 100).unwrap();
        assert_eq!(timer.settime_calls(), 3, "off the grid");
        timer.program_periodic(base + 50, 100).unwrap();
        assert_eq!(timer.settime_calls(), 4, "before the first expiry");
        timer.program_periodic(base + 250, 50).unwrap();
        assert_eq!(timer.settime_calls(), 5, "another period");
        timer.program(None).unwrap();
        timer.program(None).unwrap();
        assert_eq!(timer.settime_calls(), 6, "disarmed once");
    }
}
