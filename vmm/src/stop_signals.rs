//! SIGINT and SIGTERM without a signalfd: one thread, `metronome-sig`,
//! waits for them with `sigwaitinfo` and hands each to whoever watches them.
//!
//! Why not a signalfd: the kernel wakes every signalfd waiter of a process
//! for any signal sent to any of its threads, so a thread waiting on one for
//! SIGINT/SIGTERM would be woken by every kick and sampling-timer signal sent
//! to a vCPU thread. A thread in `sigwaitinfo` is woken only by a signal it
//! waits for (thread-directed signals to other threads never reach it).
//!
//! The rules:
//! - every thread blocks SIGINT (unless ignored on entry, below) and
//!   SIGTERM: [`block`] in the thread that spawns the others, before it
//!   spawns them (so that the kernel can only hand them to the waiting
//!   thread);
//! - [`watch`] registers the one sink a signal is handed to, on the signal
//!   thread, for as long as its [`StopSignalWatch`] lives;
//! - a signal that comes while nobody watches takes its default action (the
//!   process ends, killed by it), as an unblocked signal would: a stuck
//!   shutdown can still be interrupted;
//! - a process started with SIGINT ignored (a background job of a
//!   non-interactive shell) keeps ignoring it, at every moment of its run:
//!   SIGINT is then neither blocked nor waited for ([`note_inherited`]).
//!
//! SIGCONT is blocked in every thread too, for another purpose: it tells the
//! vCPU threads that the process was stopped (SIGSTOP, SIGTSTP) and
//! continued. A blocked SIGCONT still continues the process (the kernel acts
//! on it when it is sent) and then stays pending, so that it can be taken,
//! exactly once, by [`take_continue`]: the kernel makes it pending before any
//! stopped thread returns to user space (it is queued under the signal lock
//! that each woken thread takes again before it leaves the kernel), so a
//! thread that was stopped finds it pending, or already taken and counted.
//! See `crate::vm::continued` for what the vCPUs make of it.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// What a signal is handed to: its number.
type Sink = Arc<dyn Fn(i32) + Send + Sync>;

/// The current watcher: its registration number and sink.
static WATCHER: Mutex<Option<(u64, Sink)>> = Mutex::new(None);

/// The signal thread, started once per process (or why it could not start).
static THREAD: OnceLock<Result<(), i32>> = OnceLock::new();

/// SIGINT and SIGTERM.
const STOP_SIGNALS: [libc::c_int; 2] = [libc::SIGINT, libc::SIGTERM];

/// Whether SIGINT was ignored when the process started ([`note_inherited`]).
static SIGINT_INHERITED_IGNORED: OnceLock<bool> = OnceLock::new();

/// Notes whether SIGINT is ignored as the process starts, as it is in a
/// background job of a non-interactive shell (`metronome run ... &` in a
/// script), which is shielded that way from the terminal's Ctrl-C. Such a
/// process keeps ignoring SIGINT, as Unix programs that catch it do; SIGTERM
/// still stops it. Call it first thing in `main`, before anything changes
/// a disposition; without the call SIGINT is a stop signal.
pub fn note_inherited() {
    // SAFETY: an all-zero sigaction is valid; a null new action only reads
    // the current one into it.
    let ignored = unsafe {
        let mut current: libc::sigaction = std::mem::zeroed();
        libc::sigaction(libc::SIGINT, std::ptr::null(), &mut current) == 0
            && current.sa_sigaction == libc::SIG_IGN
    };
    let _ = SIGINT_INHERITED_IGNORED.set(ignored);
}

/// The signals that stop the VMM: SIGINT and SIGTERM, or SIGTERM alone when
/// SIGINT was ignored on entry ([`note_inherited`]). An ignored SIGINT is
/// never blocked, so the kernel discards it whenever it comes.
fn stop_signals() -> &'static [libc::c_int] {
    if SIGINT_INHERITED_IGNORED.get().copied().unwrap_or(false) {
        &STOP_SIGNALS[1..]
    } else {
        &STOP_SIGNALS
    }
}

/// Continues taken so far ([`take_continue`]); written under [`CONTINUE_LOCK`].
static CONTINUES: AtomicU64 = AtomicU64::new(0);

/// Serialises taking a pending SIGCONT with counting it in [`CONTINUES`], so
/// that whoever finds none pending also finds the count that includes it.
static CONTINUE_LOCK: Mutex<()> = Mutex::new(());

/// How long the signal thread waits before it next takes a stray SIGCONT
/// (one sent to a process that was not stopped): a SIGCONT left pending
/// would be taken for a stop by the next vCPU that was merely descheduled.
const STRAY_CONTINUE_SWEEP: libc::timespec = libc::timespec {
    tv_sec: 1,
    tv_nsec: 0,
};

/// Blocks the stop signals (SIGTERM, and SIGINT unless ignored on entry)
/// and SIGCONT in the calling thread (and so in the threads it spawns
/// afterwards).
pub fn block() -> io::Result<()> {
    let mut signals = stop_signals().to_vec();
    signals.push(libc::SIGCONT);
    crate::kick::block_signals(&signals)
}

/// How many times the process was continued (SIGCONT) so far, as far as the
/// continues were taken: one atomic load, no system call.
pub fn continues() -> u64 {
    CONTINUES.load(Ordering::Acquire)
}

/// Takes a pending SIGCONT, if there is one (a zero-timeout `sigtimedwait`),
/// and returns [`continues`], which then counts it. Call it from a thread that
/// blocks SIGCONT ([`block`]). Several continues in a row while nobody took
/// one count once (SIGCONT does not queue).
pub fn take_continue() -> u64 {
    let _taking = CONTINUE_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let set = crate::kick::signal_set(&[libc::SIGCONT]);
    let zero = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid set and timeout; the siginfo is not asked for.
    if unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &zero) } == libc::SIGCONT {
        CONTINUES.fetch_add(1, Ordering::AcqRel);
    }
    continues()
}

/// A registration made by [`watch`]: dropping it stops handing signals to
/// its sink.
#[must_use = "signals are handed to the sink only while the watch lives"]
pub struct StopSignalWatch {
    number: u64,
}

impl std::fmt::Debug for StopSignalWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StopSignalWatch")
            .field("number", &self.number)
            .finish()
    }
}

impl Drop for StopSignalWatch {
    fn drop(&mut self) {
        let mut watcher = WATCHER.lock().unwrap_or_else(|p| p.into_inner());
        if watcher.as_ref().is_some_and(|(n, _)| *n == self.number) {
            *watcher = None;
        }
    }
}

/// Blocks the stop signals in the calling thread, starts the signal thread
/// if it is not running, and hands every SIGINT or SIGTERM to `sink` (on
/// the signal thread) until the returned watch is dropped. A later watch
/// replaces an earlier one.
///
/// # Errors
///
/// The signals cannot be blocked, or the signal thread cannot be spawned.
pub fn watch(sink: impl Fn(i32) + Send + Sync + 'static) -> io::Result<StopSignalWatch> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    block()?;
    let number = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    *WATCHER.lock().unwrap_or_else(|p| p.into_inner()) = Some((number, Arc::new(sink)));
    let watch = StopSignalWatch { number };
    let started = *THREAD.get_or_init(|| {
        std::thread::Builder::new()
            .name("metronome-sig".into())
            .spawn(wait_forever)
            .map(drop)
            .map_err(|e| e.raw_os_error().unwrap_or(libc::EAGAIN))
    });
    started.map_err(io::Error::from_raw_os_error)?;
    Ok(watch)
}

/// The signal thread's body: waits for SIGINT and SIGTERM (blocked here as
/// everywhere) and hands each to the watcher, or dies of it. Every second it
/// also takes a stray SIGCONT ([`STRAY_CONTINUE_SWEEP`]); it never waits for
/// SIGCONT itself, which would take one outside [`take_continue`]'s lock.
fn wait_forever() {
    let set = crate::kick::signal_set(stop_signals());
    // Blocked here too, whoever spawned the thread: sigtimedwait takes them
    // from the pending set; unblocked they would be delivered instead.
    let _ = block();
    crate::seccomp::install_or_exit(crate::seccomp::ThreadKind::Signal);
    loop {
        // SAFETY: a valid set and timeout; the siginfo is not asked for.
        let signo =
            unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &STRAY_CONTINUE_SWEEP) };
        if signo < 0 {
            // EAGAIN (the sweep's timeout) or EINTR (a stopped-and-continued
            // process, say): take a SIGCONT nobody took, and wait again.
            take_continue();
            continue;
        }
        let sink = WATCHER
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|(_, sink)| sink.clone());
        match sink {
            Some(sink) => sink(signo),
            None => die_of(signo),
        }
    }
}

/// Takes `signo`'s default action (for SIGINT and SIGTERM: the process ends,
/// killed by the signal), as if it had never been blocked.
fn die_of(signo: i32) -> ! {
    // SAFETY: restoring the default disposition, unblocking the signal in
    // this thread and sending it to this thread: plain calls with valid
    // arguments. The default action ends the process before raise returns.
    unsafe {
        libc::signal(signo, libc::SIG_DFL);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, signo);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        libc::raise(signo);
        libc::_exit(128 + signo)
    }
}

/// The signal thread's kernel thread id (for tests that aim a signal at it
/// alone), once it runs.
#[cfg(test)]
fn signal_thread_tid() -> Option<libc::pid_t> {
    let task = std::fs::read_dir("/proc/self/task").ok()?;
    task.filter_map(Result::ok).find_map(|entry| {
        let comm = std::fs::read_to_string(entry.path().join("comm")).ok()?;
        (comm.trim() == "metronome-sig").then(|| entry.file_name().to_str()?.parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    /// Sends `signo` to the signal thread alone (a process-directed signal
    /// would kill the test harness, whose threads do not block it).
    fn send_to_signal_thread(signo: i32) {
        // The thread names itself once it runs.
        let start = std::time::Instant::now();
        let tid = loop {
            if let Some(tid) = signal_thread_tid() {
                break tid;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "no signal thread"
            );
            std::thread::yield_now();
        };
        // SAFETY: tgkill with our own pid, a live thread of ours and a valid signal.
        let ret = unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, signo) };
        assert_eq!(ret, 0);
    }

    #[test]
    fn test_signals_reach_the_current_watcher_only() {
        let (tx, rx) = mpsc::channel();
        let first_tx = tx.clone();
        let first = watch(move |signo| first_tx.send((1, signo)).unwrap()).unwrap();
        send_to_signal_thread(libc::SIGTERM);
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(10)).unwrap(),
            (1, libc::SIGTERM)
        );
        let second = watch(move |signo| tx.send((2, signo)).unwrap()).unwrap();
        // The first watch's drop does not unregister its successor.
        drop(first);
        send_to_signal_thread(libc::SIGINT);
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(10)).unwrap(),
            (2, libc::SIGINT)
        );
        drop(second);
        assert!(WATCHER.lock().unwrap().is_none());
    }
}
