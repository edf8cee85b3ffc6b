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

/// A POSIX timer on `CLOCK_MONOTONIC` that signals the thread that created it
/// (`SIGEV_THREAD_ID`): its expiry reaches a vCPU thread with no helper-thread hop.
#[derive(Debug)]
pub struct PosixTimer {
    id: libc::timer_t,
    armed_for: Option<u64>,
}

// SAFETY: the timer handle is an opaque kernel id; the timer is only used by the
// thread that owns the PosixTimer.
unsafe impl Send for PosixTimer {}

impl PosixTimer {
    /// Creates a timer whose expiry sends `signal` to the calling thread.
    pub fn for_current_thread(signal: libc::c_int) -> io::Result<Self> {
        // SAFETY: an all-zero sigevent is valid; we fill in the fields we use.
        let mut event: libc::sigevent = unsafe { std::mem::zeroed() };
        event.sigev_notify = libc::SIGEV_THREAD_ID;
        event.sigev_signo = signal;
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
            armed_for: None,
        })
    }

    /// Arms the timer for the absolute `CLOCK_MONOTONIC` time `deadline_ns`, or
    /// disarms it for `None`. Does nothing when already armed for that time.
    pub fn program(&mut self, deadline_ns: Option<u64>) -> io::Result<()> {
        if self.armed_for == deadline_ns {
            return Ok(());
        }
        // A zero it_value disarms; an absolute time in the past fires at once.
        let spec = libc::itimerspec {
            it_interval: timespec(0),
            it_value: timespec(deadline_ns.map_or(0, |d| d.max(1))),
        };
        // SAFETY: the timer id is ours; the spec is valid.
        let ret = unsafe {
            libc::timer_settime(self.id, libc::TIMER_ABSTIME, &spec, std::ptr::null_mut())
        };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
        self.armed_for = deadline_ns;
        Ok(())
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
}
