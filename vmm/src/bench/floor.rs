//! The host floor: a host thread on a timerfd (timer slack 1 ns) armed at
//! the deadlines the vCPUs arm their own host timers for, in the same run,
//! recording how late each wake-up is. It is what any host thread waiting
//! for those deadlines gets, the floor under the VMM's own delivery.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::host_time::{monotonic_ns, set_min_timer_slack};

/// Deadlines a floor thread is offered before it drops them.
pub const FLOOR_QUEUE: usize = 1024;

/// What a floor thread measured.
#[derive(Clone, Debug, Default)]
pub struct FloorRecord {
    /// Wake lateness per deadline slept to, ns.
    pub lateness_ns: Vec<u64>,
    /// Deadlines already past when the thread got them (not slept to).
    pub skipped: u64,
}

/// A running floor thread.
#[derive(Debug)]
pub struct FloorThread {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<std::io::Result<FloorRecord>>,
}

impl FloorThread {
    /// Starts a thread that sleeps on a timerfd to every deadline (absolute
    /// `CLOCK_MONOTONIC` ns) it receives from `deadlines`.
    pub fn spawn(deadlines: Receiver<(u32, u64)>) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::Builder::new()
            .name("bench-floor".into())
            .spawn(move || floor_loop(&deadlines, &flag))?;
        Ok(Self { stop, handle })
    }

    /// Stops the thread and returns what it measured.
    pub fn finish(self) -> std::io::Result<FloorRecord> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the floor thread panicked")))
    }
}

fn floor_loop(deadlines: &Receiver<(u32, u64)>, stop: &AtomicBool) -> std::io::Result<FloorRecord> {
    set_min_timer_slack();
    // SAFETY: timerfd_create with a valid clock and flags; the fd is checked
    // and then owned.
    let raw = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_CLOEXEC) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a new fd nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut record = FloorRecord::default();
    while !stop.load(Ordering::Relaxed) {
        let deadline = match deadlines.recv_timeout(Duration::from_millis(50)) {
            Ok((_, deadline)) => deadline,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        if deadline <= monotonic_ns() {
            record.skipped += 1;
            continue;
        }
        sleep_until(&fd, deadline)?;
        record
            .lateness_ns
            .push(monotonic_ns().saturating_sub(deadline));
    }
    Ok(record)
}

/// Arms `fd` for the absolute time `deadline` and blocks until it expires.
fn sleep_until(fd: &OwnedFd, deadline: u64) -> std::io::Result<()> {
    let spec = libc::itimerspec {
        it_interval: libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        },
        it_value: libc::timespec {
            tv_sec: (deadline / 1_000_000_000) as libc::time_t,
            tv_nsec: (deadline % 1_000_000_000) as libc::c_long,
        },
    };
    // SAFETY: our timerfd and a valid itimerspec; no old value is asked for.
    let ret = unsafe {
        libc::timerfd_settime(
            fd.as_raw_fd(),
            libc::TFD_TIMER_ABSTIME,
            &spec,
            std::ptr::null_mut(),
        )
    };
    if ret != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut expirations = 0u64;
    loop {
        // SAFETY: reads 8 bytes into a u64 we own from our own fd.
        let n = unsafe {
            libc::read(
                fd.as_raw_fd(),
                std::ptr::addr_of_mut!(expirations).cast(),
                8,
            )
        };
        if n == 8 {
            return Ok(());
        }
        let error = std::io::Error::last_os_error();
        if error.kind() != std::io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_floor_sleeps_to_future_deadlines_and_skips_past_ones() {
        let (sender, receiver) = std::sync::mpsc::sync_channel(FLOOR_QUEUE);
        let floor = FloorThread::spawn(receiver).unwrap();
        let now = monotonic_ns();
        sender.send((0, now.saturating_sub(1_000_000))).unwrap();
        let future = monotonic_ns() + 2_000_000;
        sender.send((0, future)).unwrap();
        drop(sender);
        // The thread ends on the closed channel after the last deadline.
        let record = floor.handle.join().unwrap().unwrap();
        assert_eq!(record.skipped, 1);
        assert_eq!(record.lateness_ns.len(), 1);
        assert!(monotonic_ns() >= future, "it slept to the deadline");
    }
}
