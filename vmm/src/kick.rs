//! Kicks: making a vCPU thread leave `KVM_RUN` promptly, without losing a kick.
//!
//! Two real-time signals are aimed at vCPU threads:
//! - [`sig_kick`], sent by another thread (`pthread_kill`) after it published
//!   work for the vCPU (an interrupt to inject, a stop request, later a sample);
//! - [`sig_timer`], sent by the kernel when the vCPU's own POSIX timer
//!   ([`crate::host_time::PosixTimer`], `SIGEV_THREAD_ID`) expires: the timer
//!   signals the vCPU thread directly, with no helper-thread hop.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host_time::{monotonic_ns, PosixTimer};

    #[test]
    fn test_timer_signal_sets_immediate_exit_of_its_own_thread() {
        install_handlers().unwrap();
        std::thread::spawn(|| {
            let flag = Box::new(std::sync::atomic::AtomicU8::new(0));
            // SAFETY: the flag outlives the binding (unbound below).
            unsafe { bind_current_thread(flag.as_ptr()) };
            let mut timer = PosixTimer::for_current_thread(sig_timer()).unwrap();
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
