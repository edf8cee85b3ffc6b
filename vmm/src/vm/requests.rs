//! Requests to the VMM thread: a channel plus an eventfd that the VMM's
//! event loop watches (`RequestSubscriber`), so that a front end (the API
//! thread) reaches the VM without calling into it from its own thread.
//!
//! ```text
//! API thread                         VMM thread (event loop, RunningVm::wait)
//! ----------                         ----------------------------------------
//! VmmLink::send(request) -- channel -->
//!         eventfd.write(1) --------->  RequestSubscriber::process:
//!                                        eventfd.read(); drain the channel;
//!                                        request(&VmController) for each
//! ```
//!
//! A request runs on the VMM thread and must not wait: it only starts
//! operations that wait (a pause's parking, a sampling stop's
//! acknowledgements), and the sender waits for them elsewhere, so the loop
//! always sees the guest's exit, a signal or the `--timeout` at once. The
//! VMM thread is never on a vCPU's or timer's path, and a request holds a
//! lock the vCPUs take only for as long as the operation itself does,
//! however slow the client that asked.

use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::VmController;

/// One request: runs once on the VMM thread with the VM's controller. It
/// carries its own way to answer (a oneshot sender, say).
pub type VmRequest = Box<dyn FnOnce(&VmController) + Send>;

/// The VMM thread no longer takes requests: its event loop has ended (the
/// VM has exited or is ending).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the VMM event loop has ended: the VM has exited or is exiting")]
pub struct LinkClosed;

/// The sending end: cheap to clone, usable from any thread.
#[derive(Clone, Debug)]
pub struct VmmLink {
    requests: Sender<VmRequest>,
    ready: Arc<EventFd>,
}

impl VmmLink {
    /// Queues `request` for the VMM thread and wakes its event loop.
    ///
    /// # Errors
    ///
    /// [`LinkClosed`] once the event loop has ended; `request` is dropped
    /// without running.
    pub fn send(&self, request: VmRequest) -> Result<(), LinkClosed> {
        self.requests.send(request).map_err(|_| LinkClosed)?;
        // Cannot fail short of the counter overflowing: every write is one,
        // and the loop reads (resets) it before each drain.
        self.ready.write(1).map_err(|_| LinkClosed)
    }
}

/// The VMM event loop's end: drains the channel when the eventfd fires.
pub(crate) struct RequestSubscriber {
    requests: Receiver<VmRequest>,
    ready: Arc<EventFd>,
    controller: VmController,
}

impl std::fmt::Debug for RequestSubscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestSubscriber").finish_non_exhaustive()
    }
}

/// A new channel to the VM `controller` drives: the link for senders and
/// the subscriber for the VMM thread's event loop.
pub(crate) fn channel(controller: VmController) -> std::io::Result<(VmmLink, RequestSubscriber)> {
    let ready = Arc::new(EventFd::new(EFD_NONBLOCK)?);
    let (tx, rx) = mpsc::channel();
    Ok((
        VmmLink {
            requests: tx,
            ready: ready.clone(),
        },
        RequestSubscriber {
            requests: rx,
            ready,
            controller,
        },
    ))
}

impl RequestSubscriber {
    /// Runs every queued request, in order. The eventfd is read first, so
    /// a request queued after the drain has written it again.
    pub(crate) fn drain(&mut self) {
        let _ = self.ready.read();
        while let Ok(request) = self.requests.try_recv() {
            request(&self.controller);
        }
    }
}

impl MutEventSubscriber for RequestSubscriber {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        self.drain();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.ready.as_ref(), EventSet::IN)) {
            // Requests then fail with LinkClosed once the subscriber is gone;
            // the VM itself runs on.
            log::error!("cannot watch the VMM request eventfd: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn controller() -> VmController {
        let mem =
            vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 0x1000)])
                .unwrap();
        let shared = Arc::new(crate::vm::VmShared::new(mem, 1, None).unwrap());
        let devices =
            crate::devices::DeviceManager::new(&shared, Box::new(std::io::sink())).unwrap();
        let view = Arc::new(crate::vm::live::RunView {
            config: crate::VmConfig::default(),
            device_errors: devices.errors,
            kernel_image: Arc::from(&[][..]),
            process_start: std::time::Instant::now(),
        });
        VmController::new(shared, view)
    }

    #[test]
    fn test_requests_run_in_order_on_drain_and_fail_once_closed() {
        let (link, mut subscriber) = channel(controller()).unwrap();
        let ran = Arc::new(AtomicU32::new(0));
        for i in 1..=3 {
            let ran = ran.clone();
            link.send(Box::new(move |_| {
                // Each runs after the ones before it.
                assert_eq!(ran.fetch_add(1, Ordering::SeqCst), i - 1);
            }))
            .unwrap();
        }
        // The eventfd counts the wake-ups; nothing ran yet.
        assert_eq!(ran.load(Ordering::SeqCst), 0);
        subscriber.drain();
        assert_eq!(ran.load(Ordering::SeqCst), 3);
        // Drained: the eventfd was reset.
        assert!(subscriber.ready.read().is_err());
        drop(subscriber);
        assert_eq!(link.send(Box::new(|_| {})), Err(LinkClosed));
    }
}
