//! The clock: OpenBSD 7.3's clockintr on the VMM's per-vCPU timer device.
//!
//! The device (`metronome_abi::mmio::TIMER_*`) is banked: every vCPU reaches its
//! own one-shot timer at the same address; it is this vCPU's `intrclock`
//! ([`TimerDevice`]). The device clock counts nanoseconds since the VM was
//! created and is also the guest's uptime clock (`nsecuptime`): one time base
//! for the clock and the timer (spec AMB-2), so a dispatch is never early.
//!
//! The kernel side of clockintr lives here too: `hardclock` (tick count,
//! round-robin preemption every hz/10 ticks, sleep wake-ups), `statclock`
//! (charges the current thread's user, system or interrupt time, or the vCPU's
//! idle time; profclock while profiling), `schedclock` (estcpu and priority).

use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use clockintr::{ClockIntr, Config, IntervalSink, IntrClock, Machine, Outcome};
use metronome_abi::mmio::{TIMER_BASE, TIMER_NOW, TIMER_REARM_NS, TIMER_TRIGGER};
use metronome_abi::{event_kind, hist, VcpuShared, STAT_INTERVALS};

use crate::arch::{self, Frame};
use crate::{percpu, sched};

/// The global clockintr state (`clockintr_init` runs once, on vCPU 0).
pub static CLOCKINTR: ClockIntr = ClockIntr::new();

/// Guest uptime in ns: the device clock.
pub fn uptime_ns() -> u64 {
    // SAFETY: TIMER_NOW is a read-only register of this vCPU's timer bank.
    unsafe { arch::mmio_read(TIMER_BASE + TIMER_NOW) }
}

/// This vCPU's timer device as clockintr's `intrclock`.
#[derive(Debug)]
pub struct TimerDevice;

impl IntrClock for TimerDevice {
    fn rearm(&mut self, nsecs: u64) {
        // SAFETY: TIMER_REARM_NS is the rearm register of this vCPU's timer bank.
        unsafe { arch::mmio_write(TIMER_BASE + TIMER_REARM_NS, nsecs) };
    }

    fn trigger(&mut self) {
        // SAFETY: TIMER_TRIGGER is the trigger register of this vCPU's timer bank.
        unsafe { arch::mmio_write(TIMER_BASE + TIMER_TRIGGER, 0) };
    }
}

/// Panics with clockintr's message for `error` (fatal in OpenBSD too).
#[track_caller]
fn fatal(error: clockintr::Error) -> ! {
    let location = core::panic::Location::caller();
    crate::trap::kernel_panic(error.message(), Some((location.file(), location.line())))
}

/// `clockintr_init` with the boot block's frequencies (vCPU 0, before the others start).
pub fn init_global() {
    let boot = crate::boot_info();
    let config = Config {
        hz: boot.hz,
        stathz: boot.stathz,
        profhz: boot.profhz,
        schedhz: i64::from(boot.schedhz),
        flags: boot.clock_flags,
    };
    if let Err(e) = CLOCKINTR.init(&config, true) {
        fatal(e);
    }
}

/// Per-vCPU start: `clockintr_cpu_init` with the timer device, then
/// `clockintr_trigger`, as OpenBSD 7.3's drivers do.
pub fn start(id: u32) {
    let boot = crate::boot_info();
    let cpu = percpu::get(id);
    cpu.queue = clockintr::ClockQueue::new(id, boot.vcpu_count, id == 0, boot.stat_seed);
    cpu_init(id);
}

fn cpu_init(id: u32) {
    let cpu = percpu::get(id);
    let mut machine = GuestMachine {
        id,
        frame: None,
        need_resched: false,
    };
    if let Err(e) = cpu
        .queue
        .cpu_init(&CLOCKINTR, &mut machine, Some(TimerDevice))
    {
        fatal(e);
    }
    cpu.first_since_init = true;
    cpu.programmed_deadline = None;
    percpu::shared(id).cpu_inits += 1;
    publish(id);
    if let Err(e) = cpu.queue.trigger() {
        fatal(e);
    }
}

/// The resume interrupt: the VM was paused and the clock jumped; re-place the
/// events on their grid past now (the resume rule, CI-CPU-6).
pub fn resume(id: u32) {
    cpu_init(id);
}

/// The timer interrupt: `clockintr_dispatch`, then preemption if hardclock asked.
pub fn interrupt(id: u32, frame: &mut Frame) {
    let shared = percpu::shared(id);
    shared.timer_interrupts += 1;
    let cpu = percpu::get(id);
    let mut machine = GuestMachine {
        id,
        frame: Some(frame),
        need_resched: false,
    };
    let mut sink = Sink(id);
    let report = match cpu.queue.dispatch(&CLOCKINTR, &mut machine, &mut sink) {
        Ok(report) => report,
        Err(e) => fatal(e),
    };
    let need_resched = machine.need_resched;
    let shared = percpu::shared(id);
    if let Some(deadline) = cpu.programmed_deadline {
        if report.start >= deadline {
            let late = report.start - deadline;
            shared.lateness_hist.0[hist::bucket(late)] += 1;
            shared.lateness_max = shared.lateness_max.max(late);
        }
    }
    cpu.programmed_deadline = report.rearm.map(|n| report.end + n);
    if report.outcome == Outcome::Prompt {
        let batch = report.calls.hardclock;
        shared.max_hardclock_batch = shared.max_hardclock_batch.max(batch);
        if cpu.first_since_init {
            cpu.first_since_init = false;
            shared.resume_first_batch = batch;
            if shared.cpu_inits == 1 {
                shared.first_dispatch_hardclocks = batch;
            }
        }
    }
    shared.last_dispatch_ns = report.end;
    publish(id);
    if report.calls.hardclock > 0 {
        sched::hardclock_tick(id, frame, report.end, need_resched);
    }
}

/// Copies the queue's statistics and pending events to the shared page.
fn publish(id: u32) {
    let cpu = percpu::get(id);
    let shared = percpu::shared(id);
    let gen = shared.clockintr_gen;
    shared.clockintr_gen = 0;
    let (stats, _) = cpu.queue.stats();
    shared.clockintr = metronome_abi::ClockintrStat {
        dispatched_ns: stats.dispatched,
        early: stats.early,
        earliness_ns: stats.earliness,
        lateness_ns: stats.lateness,
        prompt: stats.prompt,
        run: stats.run,
        spurious: stats.spurious,
    };
    let mut n = 0;
    for event in cpu.queue.pending() {
        shared.pending[n] = metronome_abi::PendingEvent {
            kind: kind_code(event.kind),
            expiration: event.expiration,
        };
        n += 1;
    }
    shared.pending_count = n as u64;
    for event in cpu.queue.idle_events() {
        if n < shared.pending.len() {
            shared.pending[n] = metronome_abi::PendingEvent {
                kind: kind_code(event.kind) | 0x100,
                expiration: event.expiration,
            };
            n += 1;
        }
    }
    for slot in &mut shared.pending[n..] {
        *slot = metronome_abi::PendingEvent::default();
    }
    shared.running = cpu.queue.running().map_or(event_kind::NONE, kind_code);
    shared.clockintr_gen = gen.wrapping_add(1).max(1);
}

fn kind_code(kind: clockintr::EventKind) -> u64 {
    match kind {
        clockintr::EventKind::Hardclock => event_kind::HARDCLOCK,
        clockintr::EventKind::Statclock => event_kind::STATCLOCK,
        clockintr::EventKind::Schedclock => event_kind::SCHEDCLOCK,
    }
}

/// Records randomized statclock intervals in vCPU `.0`'s shared page.
struct Sink(u32);

impl IntervalSink for Sink {
    fn interval(&mut self, ns: u64) {
        let s: &mut VcpuShared = percpu::shared(self.0);
        if (s.stat_interval_count as usize) < STAT_INTERVALS {
            s.stat_intervals[s.stat_interval_count as usize] = ns;
        }
        if s.stat_interval_count == 0 || ns < s.stat_interval_min {
            s.stat_interval_min = ns;
        }
        s.stat_interval_max = s.stat_interval_max.max(ns);
        s.stat_interval_count += 1;
        s.stat_interval_sum += ns;
    }
}

/// The kernel around clockintr on one vCPU, with the interrupted frame.
struct GuestMachine<'a> {
    id: u32,
    frame: Option<&'a Frame>,
    need_resched: bool,
}

impl Machine for GuestMachine<'_> {
    fn nsecuptime(&mut self) -> u64 {
        uptime_ns()
    }

    fn at_clock_ipl(&self) -> bool {
        // Clock interrupt priority here means: interrupts disabled.
        !arch::interrupts_enabled()
    }

    fn hardclock(&mut self) {
        let shared = percpu::shared(self.id);
        shared.hardclock += 1;
        shared.ticks += 1;
        let cpu = percpu::get(self.id);
        cpu.rr_ticks = cpu.rr_ticks.saturating_sub(1);
        if cpu.rr_ticks == 0 {
            // roundrobin(): every hz/10 ticks (100 ms), as OpenBSD's rrticks_init.
            cpu.rr_ticks = (CLOCKINTR.config().hz / 10).max(1);
            self.need_resched = true;
        }
    }

    fn statclock(&mut self) {
        let shared = percpu::shared(self.id);
        shared.statclock += 1;
        let cpu = percpu::get(self.id);
        if PROFILING.load(Ordering::Relaxed) {
            // profclock runs at profhz; accounting divides down to stathz.
            shared.profclock += 1;
            cpu.pscnt = cpu.pscnt.saturating_sub(1);
            if cpu.pscnt > 0 {
                return;
            }
            cpu.pscnt = PSDIV.load(Ordering::Relaxed).max(1);
        } else {
            cpu.pscnt = 1;
        }
        let user = self.frame.is_some_and(|f| f.cpl() == 3);
        sched::charge_stat_tick(self.id, user);
    }

    fn has_curproc(&self) -> bool {
        percpu::get(self.id).current.is_some()
    }

    fn schedclock(&mut self) {
        percpu::shared(self.id).schedclock += 1;
        sched::schedclock(self.id);
    }
}

/// Statclock profiling is on (some thread asked for it).
static PROFILING: AtomicBool = AtomicBool::new(false);
/// profhz / stathz while profiling, else 1 (OpenBSD's psdiv).
static PSDIV: AtomicU32 = AtomicU32::new(1);
/// Threads that switched profiling on (OpenBSD's profprocs); serialises setstatclockrate.
static PROFPROCS: spin::Lock<u32> = spin::Lock::new(0);

/// startprofclock/stopprofclock: the first thread to start profiling switches
/// the statclock to profhz, the last to stop switches it back (CI-RATE-4).
pub fn set_profiling(on: bool) {
    let mut procs = PROFPROCS.lock();
    let config = CLOCKINTR.config();
    if on {
        *procs += 1;
        if *procs == 1 {
            if let Err(e) = CLOCKINTR.setstatclockrate(config.profhz) {
                fatal(e);
            }
            PSDIV.store(config.profhz / config.stathz, Ordering::Relaxed);
            PROFILING.store(true, Ordering::Relaxed);
        }
    } else if *procs > 0 {
        *procs -= 1;
        if *procs == 0 {
            if let Err(e) = CLOCKINTR.setstatclockrate(config.stathz) {
                fatal(e);
            }
            PSDIV.store(1, Ordering::Relaxed);
            PROFILING.store(false, Ordering::Relaxed);
        }
    }
}

/// A minimal spin lock for kernel code that runs with interrupts disabled.
mod spin {
    use core::cell::UnsafeCell;
    use core::sync::atomic::{AtomicBool, Ordering};

    pub struct Lock<T> {
        held: AtomicBool,
        value: UnsafeCell<T>,
    }

    // SAFETY: the value is only reached through a guard, which exists for one
    // holder at a time (acquire/release on `held`).
    unsafe impl<T: Send> Sync for Lock<T> {}

    impl<T> Lock<T> {
        pub const fn new(value: T) -> Self {
            Self {
                held: AtomicBool::new(false),
                value: UnsafeCell::new(value),
            }
        }

        pub fn lock(&self) -> Guard<'_, T> {
            while self
                .held
                .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
            {
                core::hint::spin_loop();
            }
            Guard { lock: self }
        }
    }

    pub struct Guard<'a, T> {
        lock: &'a Lock<T>,
    }

    impl<T> core::ops::Deref for Guard<'_, T> {
        type Target = T;
        fn deref(&self) -> &T {
            // SAFETY: the guard holds the lock.
            unsafe { &*self.lock.value.get() }
        }
    }

    impl<T> core::ops::DerefMut for Guard<'_, T> {
        fn deref_mut(&mut self) -> &mut T {
            // SAFETY: the guard holds the lock exclusively.
            unsafe { &mut *self.lock.value.get() }
        }
    }

    impl<T> Drop for Guard<'_, T> {
        fn drop(&mut self) {
            self.lock.held.store(false, Ordering::Release);
        }
    }
}
