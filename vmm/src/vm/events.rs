//! The main thread's event-loop subscribers: the guest's exit request,
//! SIGINT/SIGTERM (read from a signalfd), and the host-side `--timeout`.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

use super::{VmExit, VmShared};

/// Watches the exit eventfd; marks the loop done.
pub(crate) struct ExitSubscriber {
    shared: Arc<VmShared>,
    /// The exit was requested: the event loop ends.
    pub(crate) fired: bool,
}

impl ExitSubscriber {
    pub(crate) fn new(shared: Arc<VmShared>) -> Self {
        Self {
            shared,
            fired: false,
        }
    }
}

impl MutEventSubscriber for ExitSubscriber {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.shared.exit_evt.read();
        self.fired = true;
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.shared.exit_evt, EventSet::IN)) {
            self.shared
                .request_exit(VmExit::Host(format!("watching exit eventfd: {e}")));
            self.fired = true;
        }
    }
}

/// SIGINT and SIGTERM, blocked in every thread and read from a signalfd.
pub(crate) struct SignalSubscriber {
    shared: Arc<VmShared>,
    fd: OwnedFd,
}

impl SignalSubscriber {
    /// Blocks SIGINT/SIGTERM in the calling thread (and so in threads it spawns
    /// afterwards) and opens a signalfd for them.
    pub(crate) fn new(shared: Arc<VmShared>) -> std::io::Result<Self> {
        Ok(Self {
            shared,
            fd: block_stop_signals()?,
        })
    }
}

/// Blocks SIGINT and SIGTERM in the calling thread (and so in the threads it
/// spawns afterwards) and returns a non-blocking signalfd that reads them.
pub fn block_stop_signals() -> std::io::Result<OwnedFd> {
    // SAFETY: sigset manipulation on a local set; pthread_sigmask and
    // signalfd with valid arguments; the fd is owned right away.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// Reads one signal from a signalfd made by [`block_stop_signals`]: its
/// number, or `None` when none is pending (or the read failed).
pub fn read_stop_signal(fd: &OwnedFd) -> Option<i32> {
    // SAFETY: an all-zero signalfd_siginfo is valid; read fills it.
    let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::signalfd_siginfo>();
    // SAFETY: reading into a buffer of exactly one record from a signalfd the
    // caller owns.
    let n = unsafe {
        libc::read(
            fd.as_raw_fd(),
            (&mut info as *mut libc::signalfd_siginfo).cast(),
            size,
        )
    };
    (n == size as isize).then_some(info.ssi_signo as i32)
}

impl MutEventSubscriber for SignalSubscriber {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        if let Some(signo) = read_stop_signal(&self.fd) {
            self.shared.request_exit(VmExit::Signal(signo));
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.fd, EventSet::IN)) {
            self.shared
                .request_exit(VmExit::Host(format!("watching signalfd: {e}")));
        }
    }
}

/// Unblocks SIGINT and SIGTERM in the calling thread.
pub(crate) fn unblock_stop_signals() {
    // SAFETY: sigset manipulation on a local set and pthread_sigmask with valid arguments.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
}

/// The host-side wall-clock limit.
pub(crate) struct TimeoutSubscriber {
    shared: Arc<VmShared>,
    fd: TimerFd,
    limit: Duration,
}

impl TimeoutSubscriber {
    pub(crate) fn new(shared: Arc<VmShared>, limit: Duration) -> std::io::Result<Self> {
        let mut fd = TimerFd::new().map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        fd.reset(limit, None)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        Ok(Self { shared, fd, limit })
    }
}

impl MutEventSubscriber for TimeoutSubscriber {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.fd.wait();
        self.shared.request_exit(VmExit::Timeout {
            limit_ms: self.limit.as_millis() as u64,
        });
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.fd, EventSet::IN)) {
            self.shared
                .request_exit(VmExit::Host(format!("watching timerfd: {e}")));
        }
    }
}
