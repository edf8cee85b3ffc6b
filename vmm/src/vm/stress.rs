//! The kick-stress generator (`--kick-stress-hz`): a stress interrupt to every
//! vCPU at a fixed rate, each one kicked, so that exactly-once delivery under
//! load can be checked (sent == injected == counted by the guest).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use metronome_abi::Vector;
use metronome_devices::Raise;

use super::VmShared;
use crate::host_time;

/// How long the stress drain may take before the VM is stopped anyway.
const STRESS_DRAIN_LIMIT: Duration = Duration::from_secs(2);

/// Waits until no stress interrupt is pending or in service on any vCPU, for
/// at most [`STRESS_DRAIN_LIMIT`]: the guest keeps running (the exiting vCPU
/// idles with interrupts on) so that every interrupt sent is also delivered.
pub(crate) fn drain_stress(shared: &VmShared) {
    let vector = Vector::Stress as u8;
    let start = Instant::now();
    while start.elapsed() < STRESS_DRAIN_LIMIT {
        let busy = shared.vcpus.iter().any(|slot| {
            let irq = slot.lock();
            irq.vic.is_pending(vector) || irq.vic.in_service() == Some(vector)
        });
        if !busy {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    log::warn!("stress interrupts still in flight after {STRESS_DRAIN_LIMIT:?}");
}

/// Sends a stress interrupt to every vCPU at a fixed rate, and kicks each one
/// every period: a new interrupt is only sent when the previous one has been
/// injected, so each one sent must be delivered exactly once.
pub(crate) struct StressGenerator {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl StressGenerator {
    pub(crate) fn start(shared: Arc<VmShared>, hz: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        // Cannot panic: a spawn fails only without memory or threads left,
        // as `thread::spawn` (used here before) panicked then too.
        let thread = std::thread::Builder::new()
            .name("kick-stress".into())
            .spawn(move || {
                host_time::set_min_timer_slack();
                crate::seccomp::install_or_exit(crate::seccomp::ThreadKind::Stress);
                let period = 1_000_000_000 / u64::from(hz);
                let mut next = host_time::monotonic_ns();
                while !flag.load(Ordering::Acquire) {
                    next += period;
                    for (id, slot) in shared.vcpus.iter().enumerate() {
                        let mut irq = slot.lock();
                        let vector = Vector::Stress as u8;
                        if irq.vic.is_pending(vector) {
                            irq.stress.skipped += 1;
                        } else if irq.vic.raise(vector) == Raise::Queued {
                            irq.stress.sent += 1;
                        }
                        drop(irq);
                        shared.wake(id as u32);
                    }
                    host_time::sleep_until_monotonic(next);
                }
            })
            .expect("spawning the stress thread");
        Self { stop, thread }
    }

    pub(crate) fn stop(self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.thread.join();
    }
}
