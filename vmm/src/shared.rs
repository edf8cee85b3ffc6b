//! State shared between the vCPU threads, the devices and the main thread.
//!
//! Per vCPU, one mutex protects that vCPU's virtual interrupt controller and
//! timer ([`IrqState`]); the owning vCPU thread takes it once per guest entry,
//! other threads only to raise an interrupt (IPIs, the stress generator). A
//! condition variable on the same mutex parks a halted vCPU thread.
//!
//! The VM ends through [`VmShared::request_exit`]: the first reason wins, and
//! the main thread's event loop is woken through an eventfd. Only the main
//! thread sets the stop flag and kicks the vCPUs out.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};

use metronome_abi::FaultReport;
use metronome_devices::{LatencyHistogram, Raise, VirtualInterruptController, VirtualTimer};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::kick;

/// Interrupts injected into one vCPU, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Injected {
    /// Timer vector.
    pub timer: u64,
    /// IPI vector.
    pub ipi: u64,
    /// Stress-test vector.
    pub stress: u64,
    /// Any other vector.
    pub other: u64,
}

impl Injected {
    /// All injections.
    pub fn total(&self) -> u64 {
        self.timer + self.ipi + self.stress + self.other
    }
}

/// The stress generator's record for one vCPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StressCounts {
    /// Stress interrupts raised (each one new, never coalesced).
    pub sent: u64,
    /// Rounds skipped because the previous stress interrupt was still pending.
    pub skipped: u64,
}

/// One vCPU's interrupt state. Protected by [`VcpuSlot::irq`].
#[derive(Debug, Default)]
pub struct IrqState {
    /// The virtual interrupt controller.
    pub vic: VirtualInterruptController,
    /// The per-vCPU timer device.
    pub timer: VirtualTimer,
    /// Deadline of a timer expiry raised in the controller but not yet injected.
    pub fired_deadline: Option<u64>,
    /// Host-side lateness of every timer delivery: deadline to injection, ns.
    pub host_lateness: LatencyHistogram,
    /// Injections by kind.
    pub injected: Injected,
    /// The stress generator's counts.
    pub stress: StressCounts,
    /// The vCPU thread is parked on HLT (woken by the condition variable, not by a kick).
    pub parked: bool,
    /// The vCPU thread has left its loop: it must not be signalled any more.
    pub exited: bool,
}

/// Per-vCPU shared handle.
#[derive(Debug, Default)]
pub struct VcpuSlot {
    /// Device time until which the vCPU thread stays out of the guest (0 = no hold).
    pub hold_until: AtomicU64,
    /// Interrupt state.
    pub irq: Mutex<IrqState>,
    /// Wakes the vCPU thread parked on HLT.
    pub wake: Condvar,
    /// The vCPU thread, once started.
    pub thread: OnceLock<libc::pthread_t>,
    /// Kicks sent to this vCPU.
    pub kicks_sent: AtomicU64,
}

impl VcpuSlot {
    /// Locks the interrupt state. A poisoned lock (a panicking vCPU thread) is
    /// taken over: the state is plain counters and bitmaps, valid at any point.
    pub fn lock(&self) -> MutexGuard<'_, IrqState> {
        self.irq
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Why the VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest wrote its exit status to the debug-exit port.
    Guest {
        /// The status.
        code: u32,
    },
    /// The guest took an exception it could not handle.
    Fault(FaultReport),
    /// The guest kernel panicked.
    Panic {
        /// The vCPU that panicked.
        vcpu: u32,
        /// The guest's message.
        message: String,
    },
    /// A vCPU triple-faulted (KVM_EXIT_SHUTDOWN).
    TripleFault {
        /// The vCPU.
        vcpu: u32,
        /// Its RIP at the last exit.
        rip: u64,
    },
    /// KVM could not run or emulate guest code.
    Emulation {
        /// The vCPU.
        vcpu: u32,
        /// What KVM reported.
        detail: String,
    },
    /// The host-side `--timeout` passed.
    Timeout {
        /// The limit.
        limit_ms: u64,
    },
    /// SIGINT or SIGTERM.
    Signal(i32),
    /// Stopped through the VMM's own API.
    Stopped,
    /// A host-side failure.
    Host(String),
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Guest { code } => write!(f, "guest exited with status {code}"),
            Self::Fault(r) => {
                write!(
                    f,
                    "guest fault on vCPU {}: {} (vector {}), error code {:#x}, RIP {:#x} at CPL{}",
                    r.vcpu,
                    metronome_abi::exception::name(r.vector),
                    r.vector,
                    r.error_code,
                    r.rip,
                    r.cs & 3
                )?;
                if r.vector == u64::from(metronome_abi::exception::PAGE_FAULT) {
                    write!(f, ", CR2 {:#x}", r.cr2)?;
                }
                if r.tid != 0 {
                    write!(f, ", thread {}", r.tid)?;
                }
                Ok(())
            }
            Self::Panic { vcpu, message } => {
                write!(f, "guest kernel panic on vCPU {vcpu}: {message}")
            }
            Self::TripleFault { vcpu, rip } => {
                write!(
                    f,
                    "vCPU {vcpu} triple-faulted (KVM shutdown exit) at RIP {rip:#x}"
                )
            }
            Self::Emulation { vcpu, detail } => {
                write!(f, "KVM could not run vCPU {vcpu}: {detail}")
            }
            Self::Timeout { limit_ms } => write!(
                f,
                "timeout: the guest did not exit within {}.{:03} s (--timeout); the VM was stopped",
                limit_ms / 1000,
                limit_ms % 1000
            ),
            Self::Signal(signal) => write!(f, "stopped by signal {signal}"),
            Self::Stopped => f.write_str("stopped by the host"),
            Self::Host(message) => write!(f, "host error: {message}"),
        }
    }
}

/// The pause protocol: the controller sets `paused`; every vCPU thread parks
/// at its loop top and counts itself in `parked`.
#[derive(Debug, Default)]
pub struct PauseState {
    /// vCPUs must stay out of the guest.
    pub paused: bool,
    /// vCPU threads parked because of the pause.
    pub parked: u32,
    /// Resumes with re-initialisation so far (the timer device's TIMER_RESUMES).
    pub reinit_resumes: u64,
    /// Device time when the current pause began.
    pub since_ns: u64,
}

/// State shared by every thread of a running VM.
#[derive(Debug)]
pub struct VmShared {
    /// Pause state (see [`PauseState`]).
    pub pause: Mutex<PauseState>,
    /// Signalled when `pause` changes.
    pub pause_cv: Condvar,
    /// Mirrors `pause.paused` for the vCPU loop's lock-free check.
    paused_flag: AtomicBool,
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// One slot per vCPU.
    pub vcpus: Vec<VcpuSlot>,
    /// CLOCK_MONOTONIC at VM creation: device time 0.
    epoch_ns: u64,
    /// Set by the main thread to make every vCPU thread return.
    stop: AtomicBool,
    exit: Mutex<Option<VmExit>>,
    /// Written when an exit is requested.
    pub exit_evt: EventFd,
    /// Host-side sampling, when configured.
    pub sampling: Option<crate::sampling::SamplingShared>,
}

impl VmShared {
    /// Shared state for `vcpus` vCPUs; the device clock starts now.
    pub fn new(
        mem: GuestMemoryMmap,
        vcpus: u32,
        sampling: Option<crate::sampling::SamplingShared>,
    ) -> std::io::Result<Self> {
        Ok(Self {
            pause: Mutex::new(PauseState::default()),
            pause_cv: Condvar::new(),
            paused_flag: AtomicBool::new(false),
            mem,
            vcpus: (0..vcpus).map(|_| VcpuSlot::default()).collect(),
            epoch_ns: kick::monotonic_ns(),
            stop: AtomicBool::new(false),
            exit: Mutex::new(None),
            exit_evt: EventFd::new(libc::EFD_NONBLOCK)?,
            sampling,
        })
    }

    /// Device time: ns since the VM was created. The guest's uptime clock.
    pub fn now(&self) -> u64 {
        kick::monotonic_ns().saturating_sub(self.epoch_ns)
    }

    /// Converts a device-time deadline to absolute CLOCK_MONOTONIC.
    pub fn to_monotonic(&self, device_ns: u64) -> u64 {
        self.epoch_ns.saturating_add(device_ns)
    }

    /// Records why the VM ends (the first reason wins) and wakes the main thread.
    pub fn request_exit(&self, reason: VmExit) {
        let mut exit = self.exit.lock().unwrap_or_else(|p| p.into_inner());
        if exit.is_none() {
            log::debug!("exit requested: {reason}");
            *exit = Some(reason);
        }
        drop(exit);
        // Cannot fail short of the counter overflowing, which one write per exit cannot do.
        let _ = self.exit_evt.write(1);
    }

    /// The exit reason, if one was requested.
    pub fn exit_reason(&self) -> Option<VmExit> {
        self.exit.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether vCPU threads must return.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Makes every vCPU thread return: sets the stop flag, wakes and kicks them.
    pub fn stop_all(&self) {
        self.stop.store(true, Ordering::Release);
        self.pause_cv.notify_all();
        for id in 0..self.vcpus.len() as u32 {
            self.wake(id);
        }
    }

    /// Whether a pause is in force (read at every vCPU loop top).
    pub fn pausing(&self) -> bool {
        self.paused_flag.load(Ordering::Acquire)
    }

    /// Locks the pause state.
    pub fn pause_state(&self) -> MutexGuard<'_, PauseState> {
        self.pause.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the pause flag (with the pause state locked by the caller).
    pub fn set_paused(&self, state: &mut PauseState, paused: bool) {
        state.paused = paused;
        state.since_ns = self.now();
        self.paused_flag.store(paused, Ordering::Release);
        self.pause_cv.notify_all();
    }

    /// Raises `vector` on vCPU `target` and makes sure it notices: a parked
    /// vCPU is woken, a running one kicked.
    pub fn raise(&self, target: u32, vector: u8) -> Option<Raise> {
        let slot = self.vcpus.get(target as usize)?;
        let outcome = slot.lock().vic.raise(vector);
        self.wake(target);
        Some(outcome)
    }

    /// Wakes vCPU `id` whether it is parked or running.
    pub fn wake(&self, id: u32) {
        let Some(slot) = self.vcpus.get(id as usize) else {
            return;
        };
        // The signal is sent with the lock held: a thread that has not set
        // `exited` under this lock is still alive, so it cannot be joined yet.
        let irq = slot.lock();
        if irq.exited {
            return;
        }
        if irq.parked {
            slot.wake.notify_one();
        } else if let Some(thread) = slot.thread.get() {
            slot.kicks_sent.fetch_add(1, Ordering::Relaxed);
            kick::kick_thread(*thread);
        }
    }
}
