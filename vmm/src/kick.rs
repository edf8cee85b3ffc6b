//! Kicks: making a vCPU thread leave `KVM_RUN` promptly, without losing a
//! kick, and without running a signal handler.
//!
//! Two real-time signals are aimed at vCPU threads:
//! - [`sig_kick`], sent by another thread (`pthread_kill`) after it published
//!   work for the vCPU (an interrupt to inject, a stop request, a PET sample);
//! - [`sig_timer`], sent by the kernel when one of the vCPU's own POSIX timers
//!   ([`crate::host_time::PosixTimer`], `SIGEV_THREAD_ID`) expires: the timer
//!   signals the vCPU thread directly, with no helper-thread hop.
//!
//! Both are blocked in a vCPU thread ([`block_in_current_thread`]) except
//! inside `KVM_RUN`: the thread gives KVM its signal mask without them
//! ([`set_kvm_signal_mask`], `KVM_SET_SIGNAL_MASK`), so a pending one makes
//! `KVM_RUN` return `EINTR`, and KVM restores the blocking mask before it
//! returns, so the signal stays pending: no handler, no signal frame, no
//! `rt_sigreturn`. The thread then consumes it with a zero-timeout
//! `sigtimedwait` ([`drain_pending`]), which also tells it which timer fired and
//! how many expirations a periodic one missed.
//!
//! The race-free pattern (the pending signal is the flag that
//! `kvm_run.immediate_exit` was when a handler set it):
//! 1. a kicker publishes its work, then sends the signal;
//! 2. after `KVM_RUN` returned `EINTR` the vCPU thread consumes the pending
//!    signals, then checks for work at its loop top, then calls `KVM_RUN`;
//! 3. a signal that arrives while the guest runs makes `KVM_RUN` return `EINTR`;
//! 4. a signal that arrives after the consumption (between the check and
//!    `KVM_RUN`, or while the thread handles another exit) stays pending, and
//!    `KVM_RUN`, which unblocks it, returns `EINTR` before entering the guest.
//!
//! A kicker always publishes its work before it sends the signal, so whichever
//! of these cases happens, the vCPU thread sees the work before it next enters
//! the guest. SIGINT and SIGTERM stay blocked inside `KVM_RUN` too: they are
//! waited for by their own thread ([`crate::stop_signals`]).

use std::io;

use kvm_bindings::kvm_signal_mask;
use kvm_ioctls::VcpuFd;
use vmm_sys_util::errno;
use vmm_sys_util::ioctl::ioctl_with_ptr;
use vmm_sys_util::ioctl_iow_nr;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::host_time::TimerTag;

/// kvm-ioctls has no wrapper for KVM_SET_SIGNAL_MASK.
mod ioctls {
    #![allow(missing_docs)]
    use super::*;
    const KVMIO: u32 = 0xAE;
    ioctl_iow_nr!(KVM_SET_SIGNAL_MASK, KVMIO, 0x8b, kvm_signal_mask);
}

/// The signal other threads send to kick a vCPU thread.
pub fn sig_kick() -> libc::c_int {
    SIGRTMIN()
}

/// The signal a vCPU's host timers deliver to its own thread.
pub fn sig_timer() -> libc::c_int {
    SIGRTMIN() + 1
}

/// Never runs on a vCPU thread (the signals are blocked there outside
/// `KVM_RUN`, and KVM returns `EINTR` instead of delivering them). It exists
/// so that the signals' default action (terminate) can never apply, and so
/// that they are not ignored: an ignored signal is discarded when sent and
/// would never interrupt `KVM_RUN`.
extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) handler for both signals, process-wide.
pub fn install_handlers() -> io::Result<()> {
    for signal in [sig_kick(), sig_timer()] {
        register_signal_handler(signal, handle_kick)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    }
    Ok(())
}

/// A signal set holding `signals` (valid signal numbers).
pub(crate) fn signal_set(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: an all-zero set is valid storage; sigemptyset initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::sigemptyset(&mut set) };
    for &signo in signals {
        // SAFETY: an initialised set and a valid signal number.
        unsafe { libc::sigaddset(&mut set, signo) };
    }
    set
}

/// Blocks `signals` in the calling thread (and the threads it spawns).
pub(crate) fn block_signals(signals: &[libc::c_int]) -> io::Result<()> {
    let set = signal_set(signals);
    // SAFETY: a valid set; the old mask is not asked for.
    let ret = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if ret != 0 {
        return Err(io::Error::from_raw_os_error(ret));
    }
    Ok(())
}

/// The kick and timer signals as a set.
fn kick_set() -> libc::sigset_t {
    signal_set(&[sig_kick(), sig_timer()])
}

/// Blocks the kick and timer signals in the calling thread (a vCPU thread,
/// before it publishes its thread id, so no kick can reach it unblocked).
pub fn block_in_current_thread() -> io::Result<()> {
    block_signals(&[sig_kick(), sig_timer()])
}

/// The kernel's signal set (64 bits on x86_64) for `set`: bit `n - 1` for
/// signal `n`.
fn kernel_sigset(set: &libc::sigset_t) -> u64 {
    (1..=64).fold(0u64, |bits, signo| {
        // SAFETY: sigismember reads a valid set; 1..=64 are valid numbers.
        if unsafe { libc::sigismember(set, signo) } == 1 {
            bits | 1 << (signo - 1)
        } else {
            bits
        }
    })
}

/// `KVM_SET_SIGNAL_MASK` for `fd`: inside `KVM_RUN` the calling thread's
/// current mask applies without the kick and timer signals. Call it on the
/// vCPU thread after [`block_in_current_thread`].
pub fn set_kvm_signal_mask(fd: &VcpuFd) -> Result<(), errno::Error> {
    // SAFETY: an all-zero sigset is valid; pthread_sigmask fills it.
    let mut current: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: reading the calling thread's mask into a set we own.
    let ret = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut current) };
    if ret != 0 {
        return Err(errno::Error::new(ret));
    }
    let inside = kernel_sigset(&current) & !kernel_sigset(&kick_set());
    /// `struct kvm_signal_mask` with its 8-byte set in place.
    #[repr(C)]
    struct SignalMask {
        len: u32,
        sigset: [u8; 8],
    }
    let mask = SignalMask {
        len: 8,
        sigset: inside.to_ne_bytes(),
    };
    // SAFETY: KVM_SET_SIGNAL_MASK on our vCPU fd with a kvm_signal_mask whose
    // `len` (8, the kernel's sigset size on x86_64) bytes follow it; KVM
    // copies them during the call.
    let ret = unsafe { ioctl_with_ptr(fd, ioctls::KVM_SET_SIGNAL_MASK(), &mask) };
    if ret != 0 {
        return Err(errno::Error::last());
    }
    Ok(())
}

/// What [`drain_pending`] consumed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Consumed {
    /// Kick signals.
    pub kicks: u32,
    /// Signals of the timer device's POSIX timer ([`TimerTag::Device`]).
    pub device_timer: u32,
    /// Signals of the sampling timer ([`TimerTag::Sampling`]).
    pub sampling_timer: u32,
    /// Expirations of the sampling timer its signals could not carry (the
    /// periodic timer's overrun counts: missed while a signal was pending).
    pub sampling_overruns: u64,
}

impl Consumed {
    /// Adds what another call consumed.
    pub fn add(&mut self, other: Consumed) {
        self.kicks += other.kicks;
        self.device_timer += other.device_timer;
        self.sampling_timer += other.sampling_timer;
        self.sampling_overruns += other.sampling_overruns;
    }
}

/// How many pending signals one [`drain_pending`] consumes at most: more
/// stay pending and make the next `KVM_RUN` return at once (a flood cannot
/// keep the thread here).
const DRAIN_LIMIT: u32 = 64;

/// Consumes every kick and timer signal pending for the calling thread
/// (up to a bound), without waiting: one `sigtimedwait` per signal, plus
/// one that finds none. All of them, not just the one that ended `KVM_RUN`:
/// kicks are real-time signals, which queue, and a backlog left pending
/// would end each later `KVM_RUN` at once, one exit per kick, starving the
/// guest when the thread was kept off its core for a while.
pub fn drain_pending() -> Consumed {
    let set = kick_set();
    let zero = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    let mut consumed = Consumed::default();
    for _ in 0..DRAIN_LIMIT {
        // SAFETY: an all-zero siginfo is valid; sigtimedwait fills it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: a valid set, siginfo and timeout, all ours.
        let signo = unsafe { libc::sigtimedwait(&set, &mut info, &zero) };
        if signo < 0 {
            break;
        }
        if signo == sig_kick() {
            consumed.kicks += 1;
            continue;
        }
        let timer = (info.si_code == libc::SI_TIMER).then(|| {
            // SAFETY: SI_TIMER says the timer fields of the union are valid.
            unsafe { (info.si_value().sival_ptr as usize, info.si_overrun()) }
        });
        match timer {
            Some((tag, overrun)) if tag == TimerTag::Sampling as usize => {
                consumed.sampling_timer += 1;
                consumed.sampling_overruns += u64::try_from(overrun).unwrap_or(0);
            }
            // The device's timer, or a timer signal sent by hand.
            _ => consumed.device_timer += 1,
        }
    }
    consumed
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

    /// Polls `drain_pending` on this thread until `done` holds for what it
    /// consumed in all, for up to 5 s.
    fn take_until(done: impl Fn(&Consumed) -> bool) -> Consumed {
        let start = monotonic_ns();
        let mut all = Consumed::default();
        while !done(&all) {
            assert!(
                monotonic_ns() - start < 5_000_000_000,
                "signal never arrived: {all:?}"
            );
            all.add(drain_pending());
            std::thread::yield_now();
        }
        all
    }

    #[test]
    fn test_timer_signal_stays_pending_and_is_consumed_with_its_tag() {
        install_handlers().unwrap();
        std::thread::spawn(|| {
            block_in_current_thread().unwrap();
            let mut timer =
                PosixTimer::for_current_thread(sig_timer(), TimerTag::Sampling).unwrap();
            timer.program(Some(monotonic_ns() + 1_000_000)).unwrap();
            let got = take_until(|c| c.sampling_timer == 1);
            assert_eq!((got.kicks, got.device_timer), (0, 0));
            assert_eq!(drain_pending(), Consumed::default(), "consumed once");
        })
        .join()
        .unwrap();
    }

    #[test]
    fn test_periodic_timer_overruns_are_counted_not_queued() {
        install_handlers().unwrap();
        std::thread::spawn(|| {
            block_in_current_thread().unwrap();
            let mut timer =
                PosixTimer::for_current_thread(sig_timer(), TimerTag::Sampling).unwrap();
            let period = 100_000;
            timer
                .program_periodic(monotonic_ns() + period, period)
                .unwrap();
            // Not consumed for 20 ms (200 periods): one signal pending, the
            // rest overruns. The drain itself may take a period or two (the
            // thread can be preempted in it), and each of those adds a
            // signal, never one per period.
            std::thread::sleep(std::time::Duration::from_millis(20));
            let got = drain_pending();
            assert_eq!(got.device_timer, 0, "{got:?}");
            assert!(
                (1..=10).contains(&got.sampling_timer)
                    && got.sampling_overruns >= 10 * u64::from(got.sampling_timer),
                "{got:?}"
            );
            assert!(got.sampling_overruns >= 50, "{got:?}");
            // Still periodic: it fires again without being re-armed.
            take_until(|c| c.sampling_timer >= 3);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn test_kick_reaches_the_blocked_thread_as_a_pending_signal() {
        install_handlers().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = std::thread::spawn(move || {
            block_in_current_thread().unwrap();
            // SAFETY: pthread_self has no preconditions.
            tx.send(unsafe { libc::pthread_self() }).unwrap();
            take_until(|c| c.kicks == 1)
        });
        kick_thread(rx.recv().unwrap());
        let got = handle.join().unwrap();
        assert_eq!((got.device_timer, got.sampling_timer), (0, 0));
    }

    #[test]
    fn test_drain_pending_consumes_every_queued_kick() {
        install_handlers().unwrap();
        std::thread::spawn(|| {
            block_in_current_thread().unwrap();
            // SAFETY: pthread_self has no preconditions.
            let me = unsafe { libc::pthread_self() };
            for _ in 0..3 {
                kick_thread(me);
            }
            // Real-time signals queue: three kicks pending, all consumed.
            assert_eq!(drain_pending().kicks, 3);
            assert_eq!(drain_pending(), Consumed::default());
        })
        .join()
        .unwrap();
    }

    #[test]
    fn test_kernel_sigset_maps_signal_n_to_bit_n_minus_1() {
        let bits = kernel_sigset(&kick_set());
        assert_eq!(
            bits,
            1 << (sig_kick() - 1) | 1 << (sig_timer() - 1),
            "{bits:#x}"
        );
    }
}
