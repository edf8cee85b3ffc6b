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

use kvm_bindings::{kvm_regs, kvm_sregs};
use metronome_abi::Vector;
use metronome_devices::{Expiry, Raise, VirtualInterruptController, VirtualTimer};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::continued::ContinueWatch;
use super::pet_thread::PetSlot;
use super::VmExit;
use crate::host_time::DeviceClock;
use crate::kick;
use crate::metrics::ExitCounters;
use crate::sampling::SamplingShared;
use crate::stop_signals;
use crate::vcpu::advance::TimerAdvance;

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
    /// Timer advance: how early the vCPU thread arms its host timer, learned
    /// and used by that thread only (`crate::vcpu::advance`).
    pub advance: TimerAdvance,
    /// Injections by kind.
    pub injected: Injected,
    /// The stress generator's counts.
    pub stress: StressCounts,
    /// The vCPU thread waits on [`VcpuSlot::wake`] (halted or held), so it is
    /// woken by the condition variable, not by a kick.
    pub parked: bool,
    /// The vCPU thread has left its loop: it must not be signalled any more.
    pub exited: bool,
}

impl IrqState {
    /// Polls the timer device at `now`; an expiry raises the timer vector (an
    /// expiry while one is still waiting merges into it, VT-5).
    pub fn poll_timer(&mut self, now: u64) {
        if let Expiry::Fired { .. } = self.timer.poll(now) {
            self.vic.raise(Vector::Timer as u8);
        }
    }

    /// A resume with re-initialisation: counted in `TIMER_RESUMES`, and the
    /// TimerResume vector raised, which makes the guest re-run
    /// `clockintr_cpu_init` (CI-CPU-6).
    pub fn raise_resume(&mut self) {
        self.timer.note_resume();
        self.vic.raise(Vector::TimerResume as u8);
    }
}

/// Per-vCPU shared handle.
#[derive(Debug, Default)]
pub struct VcpuSlot {
    /// Device time until which the vCPU thread stays out of the guest (0 = no hold).
    pub hold_until: AtomicU64,
    /// Interrupt state.
    pub irq: Mutex<IrqState>,
    /// Wakes the vCPU thread parked on HLT or held by the host.
    pub wake: Condvar,
    /// The vCPU thread, once started.
    pub thread: OnceLock<libc::pthread_t>,
    /// Kicks sent to this vCPU.
    pub kicks_sent: AtomicU64,
    /// Exits from `KVM_RUN` by reason, counted by this vCPU's thread.
    pub exits: ExitCounters,
    /// The vCPU's registers while its thread is parked for a pause, so that a
    /// PET pass can sample the thread it was running (`None` otherwise).
    pub parked_regs: Mutex<Option<(kvm_regs, kvm_sregs)>>,
    /// The vCPU thread's counters as of its last copy (every
    /// [`crate::vcpu::PUBLISH_PERIOD_NS`], and before it parks for a pause),
    /// for a summary while the VM runs; `None` before the first.
    pub published: Mutex<Option<crate::vcpu::VcpuRunStats>>,
    /// The vCPU thread's last reading of the device clock, to find a host
    /// stop and continue ([`VmShared::vcpu_now`]); that thread's only.
    pub continued: ContinueWatch,
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

/// The pause protocol: the controller (or the end of a run) sets `user`, a
/// PET pass takes a hold; while either is in force every vCPU thread parks at
/// its loop top and counts itself in `parked`.
#[derive(Debug, Default)]
pub struct PauseState {
    /// Paused by [`crate::VmController::pause`] or the end of the run.
    pub user: bool,
    /// PET passes holding the guest still (PET-T-4: the task is suspended
    /// while its threads are sampled).
    pub holds: u32,
    /// vCPU threads parked because of the pause.
    pub parked: u32,
    /// Device time when the current pause began.
    pub since_ns: u64,
}

impl PauseState {
    /// Whether vCPUs must stay out of the guest.
    pub fn in_force(&self) -> bool {
        self.user || self.holds > 0
    }
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
    /// The device clock: device time 0 is the VM's creation.
    pub clock: DeviceClock,
    /// Set by the main thread to make every vCPU thread return.
    stop: AtomicBool,
    exit: Mutex<Option<VmExit>>,
    /// Written when an exit is requested.
    pub exit_evt: EventFd,
    /// Host-side sampling, when configured.
    pub sampling: Option<SamplingShared>,
    /// The PET sampler thread, once created.
    pub(crate) pet_thread: Mutex<PetSlot>,
    /// `metronome bench`'s tap on the deadlines the vCPUs arm their host
    /// timers for (set once, read by every vCPU thread at each entry).
    pub deadline_tap: OnceLock<super::probe::DeadlineTap>,
}

impl VmShared {
    /// Shared state for `vcpus` vCPUs; the device clock starts now.
    pub fn new(
        mem: GuestMemoryMmap,
        vcpus: u32,
        sampling: Option<SamplingShared>,
    ) -> std::io::Result<Self> {
        Ok(Self {
            pause: Mutex::new(PauseState::default()),
            pause_cv: Condvar::new(),
            paused_flag: AtomicBool::new(false),
            mem,
            vcpus: (0..vcpus)
                .map(|_| VcpuSlot {
                    continued: ContinueWatch::new(stop_signals::continues()),
                    ..VcpuSlot::default()
                })
                .collect(),
            clock: DeviceClock::start(),
            stop: AtomicBool::new(false),
            exit: Mutex::new(None),
            exit_evt: EventFd::new(libc::EFD_NONBLOCK)?,
            sampling,
            pet_thread: Mutex::new(PetSlot::default()),
            deadline_tap: OnceLock::new(),
        })
    }

    /// Device time: ns since the VM was created. The guest's uptime clock.
    pub fn now(&self) -> u64 {
        self.clock.now()
    }

    /// Device time as vCPU `id`'s own thread reads it (at its loop top, and
    /// for its guest's timer page). A host stop and continue since that
    /// thread's previous reading raises a resume with re-initialisation on
    /// the vCPU first, so the guest is told before it can see the time or
    /// take a timer interrupt after the stop ([`super::continued`]).
    pub fn vcpu_now(&self, id: u32) -> u64 {
        let slot = &self.vcpus[id as usize];
        let before = stop_signals::continues();
        let now = self.now();
        if slot
            .continued
            .note(now, before, stop_signals::take_continue)
        {
            log::debug!(
                "vCPU {id}: continued after a host stop; the guest resumes with re-initialisation"
            );
            slot.lock().raise_resume();
        }
        now
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
        self.notify_pause_waiters();
        self.wake_all();
    }

    /// Wakes every thread waiting on the pause condition variable. The pause
    /// lock is taken first: a waiter checks its condition under that lock, so a
    /// notification cannot fall between its check and its wait and be lost.
    pub fn notify_pause_waiters(&self) {
        drop(self.pause_state());
        self.pause_cv.notify_all();
    }

    /// Wakes or kicks every vCPU.
    pub fn wake_all(&self) {
        for id in 0..self.vcpus.len() as u32 {
            self.wake(id);
        }
    }

    /// With the pause flag set: kicks every vCPU until each is parked at a
    /// pause point or its thread has exited, the VM stops, or `give_up()`.
    /// A vCPU that keeps interrupts disabled parks after at most 50 ms.
    pub fn wait_parked(&self, give_up: impl Fn() -> bool) {
        self.wake_all();
        let mut state = self.pause_state();
        loop {
            let exited = self.vcpus.iter().filter(|slot| slot.lock().exited).count();
            if !state.in_force()
                || state.parked as usize + exited >= self.vcpus.len()
                || self.stopping()
                || give_up()
            {
                return;
            }
            state = self
                .pause_cv
                .wait_timeout(state, std::time::Duration::from_millis(10))
                .unwrap_or_else(|p| p.into_inner())
                .0;
            // Kick again: a vCPU may have re-entered the guest before seeing the flag.
            self.wake_all();
        }
    }

    /// Parks every vCPU at a point where its guest is interruptible, for at
    /// most `limit`, before the VM is stopped: no vCPU is then stopped in the
    /// middle of a clock interrupt, so the guest's clockintr statistics and
    /// its interrupt counts agree (TR-C-2).
    pub fn quiesce(&self, limit: std::time::Duration) {
        let start = std::time::Instant::now();
        let mut state = self.pause_state();
        state.user = true;
        self.update_pause(&mut state);
        drop(state);
        self.wait_parked(|| start.elapsed() > limit);
    }

    /// Whether a pause is in force (read at every vCPU loop top).
    pub fn pausing(&self) -> bool {
        self.paused_flag.load(Ordering::Acquire)
    }

    /// Locks the pause state.
    pub fn pause_state(&self) -> MutexGuard<'_, PauseState> {
        self.pause.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publishes a change of `state` (locked by the caller) to the vCPU loops
    /// and the waiters; a pause that begins records when.
    pub fn update_pause(&self, state: &mut PauseState) {
        let paused = state.in_force();
        if paused && !self.pausing() {
            state.since_ns = self.now();
        }
        self.paused_flag.store(paused, Ordering::Release);
        self.pause_cv.notify_all();
    }

    /// Holds every vCPU out of the guest at a pause point (for a PET pass)
    /// until the returned guard is dropped; returns once all are parked or
    /// gone, or the VM stops. Nests with a user pause and other holds.
    pub fn hold_all(&self) -> PauseHold<'_> {
        let mut state = self.pause_state();
        state.holds += 1;
        self.update_pause(&mut state);
        drop(state);
        self.wait_parked(|| false);
        PauseHold { shared: self }
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

/// A PET pass's hold on the guest ([`VmShared::hold_all`]); dropping it lets
/// the vCPUs run again unless something else still pauses them.
#[derive(Debug)]
pub struct PauseHold<'a> {
    shared: &'a VmShared,
}

impl Drop for PauseHold<'_> {
    fn drop(&mut self) {
        let mut state = self.shared.pause_state();
        state.holds = state.holds.saturating_sub(1);
        self.shared.update_pause(&mut state);
    }
}
