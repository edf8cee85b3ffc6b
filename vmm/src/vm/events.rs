//! The main thread's event-loop subscribers: the guest's exit request and
//! the host-side `--timeout`. SIGINT and SIGTERM reach the loop through the
//! exit request too ([`crate::stop_signals`] hands them to
//! [`VmShared::request_exit`]): no signalfd, which every kick would wake.

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
