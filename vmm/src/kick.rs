//! Kicks: making a vCPU thread leave `KVM_RUN` promptly, without losing a kick.
//!
//! Two real-time signals are aimed at vCPU threads:
//! - [`sig_kick`], sent by another thread (`pthread_kill`) after it published
//!   work for the vCPU (an interrupt to inject, a stop request, later a sample);
//! - [`sig_timer`], sent by the kernel when the vCPU's own POSIX timer
//!   ([`HostTimer`], `SIGEV_THREAD_ID`) expires: the timer signals the vCPU
//!   thread directly, with no helper-thread hop.
//!
//! Both run the same handler, which sets `kvm_run.immediate_exit` of the vCPU
//! running on the signalled thread. The race-free pattern:
//! 1. the vCPU thread checks for pending work, then calls `KVM_RUN`;
//! 2. a signal that arrives while the guest runs makes `KVM_RUN` return `EINTR`;
//! 3. a signal that arrives between the check and `KVM_RUN` has already set
//!    `immediate_exit`, so `KVM_RUN` returns `EINTR` at once;
//! 4. after every return the thread clears `immediate_exit` and checks again.
//!
//! A kicker always publishes its work before it sends the signal, so whichever
//! of these cases happens, the vCPU thread sees the work before it next enters
//! the guest.

use std::cell::Cell;
use std::io;

use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

thread_local! {
    /// The `immediate_exit` byte of the vCPU run by this thread (null elsewhere).
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal other threads send to kick a vCPU thread.
pub fn sig_kick() -> libc::c_int {
    SIGRTMIN()
}

/// The signal a vCPU's host timer delivers to its own thread.
pub fn sig_timer() -> libc::c_int {
    SIGRTMIN() + 1
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only async-signal-safe work: a const-initialised thread-local read and a
    // volatile byte store.
    let ptr = IMMEDIATE_EXIT.with(Cell::get);
    if !ptr.is_null() {
        // SAFETY: the pointer was set by `bind_current_thread` to the
        // immediate_exit field of this thread's mmap'd kvm_run, which outlives
        // the binding (cleared by `unbind_current_thread` before the vCPU fd
        // is dropped).
        unsafe { std::ptr::write_volatile(ptr, 1) };
    }
}

/// Installs the handler for both signals (process-wide, once).
pub fn install_handlers() -> io::Result<()> {
    for signal in [sig_kick(), sig_timer()] {
        register_signal_handler(signal, handle_kick)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    }
    Ok(())
}

/// Tells the handler which `immediate_exit` byte belongs to this thread.
///
/// # Safety
/// `immediate_exit` must stay valid until [`unbind_current_thread`] is called
/// on this thread.
pub unsafe fn bind_current_thread(immediate_exit: *mut u8) {
    IMMEDIATE_EXIT.with(|cell| cell.set(immediate_exit));
}

/// Forgets this thread's `immediate_exit` byte.
pub fn unbind_current_thread() {
    IMMEDIATE_EXIT.with(|cell| cell.set(std::ptr::null_mut()));
}

/// Sends the kick signal to `thread`.
pub fn kick_thread(thread: libc::pthread_t) {
    // SAFETY: pthread_kill with a valid signal number; callers only kick a vCPU
    // thread that has not marked itself exited, under the lock it marks it with
    // (`VmShared::wake`), so the thread has not been joined.
    unsafe { libc::pthread_kill(thread, sig_kick()) };
}

/// Reads CLOCK_MONOTONIC in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Sleeps until the absolute CLOCK_MONOTONIC time `deadline_ns` (a signal may
/// cut the sleep short; callers re-check their condition).
pub fn sleep_until_monotonic(deadline_ns: u64) {
    let ts = libc::timespec {
        tv_sec: (deadline_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (deadline_ns % 1_000_000_000) as libc::c_long,
    };
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

/// A POSIX timer on CLOCK_MONOTONIC that signals the thread that created it.
#[derive(Debug)]
pub struct HostTimer {
    id: libc::timer_t,
    armed_for: Option<u64>,
}

// SAFETY: the timer handle is an opaque kernel id; the timer is only used by the
// thread that owns the HostTimer.
unsafe impl Send for HostTimer {}

impl HostTimer {
    /// Creates a timer whose expiry sends [`sig_timer`] to the calling thread.
    pub fn for_current_thread() -> io::Result<Self> {
        // SAFETY: an all-zero sigevent is valid; we fill in the fields we use.
        let mut event: libc::sigevent = unsafe { std::mem::zeroed() };
        event.sigev_notify = libc::SIGEV_THREAD_ID;
        event.sigev_signo = sig_timer();
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

    /// Arms the timer for the absolute CLOCK_MONOTONIC time `deadline_ns`, or
    /// disarms it for `None`. Does nothing when already armed for that time.
    pub fn program(&mut self, deadline_ns: Option<u64>) -> io::Result<()> {
        if self.armed_for == deadline_ns {
            return Ok(());
        }
        // A zero it_value disarms; an absolute time in the past fires at once.
        let value = deadline_ns.map_or(0, |d| d.max(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: (value / 1_000_000_000) as libc::time_t,
                tv_nsec: (value % 1_000_000_000) as libc::c_long,
            },
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

impl Drop for HostTimer {
    fn drop(&mut self) {
        // SAFETY: the timer id is ours and deleted once.
        unsafe { libc::timer_delete(self.id) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_timer_signal_sets_immediate_exit_of_its_own_thread() {
        install_handlers().unwrap();
        std::thread::spawn(|| {
            let flag = Box::new(std::sync::atomic::AtomicU8::new(0));
            // SAFETY: the flag outlives the binding (unbound below).
            unsafe { bind_current_thread(flag.as_ptr()) };
            let mut timer = HostTimer::for_current_thread().unwrap();
            timer.program(Some(monotonic_ns() + 1_000_000)).unwrap();
            // Wait for the signal; each sleep is cut short by it (EINTR) or ends.
            let start = monotonic_ns();
            while flag.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                assert!(
                    monotonic_ns() - start < 5_000_000_000,
                    "timer signal never arrived"
                );
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            unbind_current_thread();
        })
        .join()
        .unwrap();
    }

    #[test]
    fn test_kick_reaches_the_bound_thread() {
        install_handlers().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let flag = std::sync::Arc::new(std::sync::atomic::AtomicU8::new(0));
        let f2 = flag.clone();
        let handle = std::thread::spawn(move || {
            // SAFETY: the Arc keeps the flag alive past the unbind below.
            unsafe { bind_current_thread(f2.as_ptr()) };
            // SAFETY: pthread_self has no preconditions.
            tx.send(unsafe { libc::pthread_self() }).unwrap();
            while f2.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                std::hint::spin_loop();
            }
            unbind_current_thread();
        });
        kick_thread(rx.recv().unwrap());
        handle.join().unwrap();
        assert_eq!(flag.load(std::sync::atomic::Ordering::SeqCst), 1);
    }
}
