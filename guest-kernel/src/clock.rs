//! The clock: OpenBSD 7.3's clockintr on the VMM's per-vCPU timer device.
//!
//! Each vCPU's timer (`drivers::timer`) is its `intrclock`. The device clock
//! counts nanoseconds since the VM was created and is also the guest's uptime
//! clock (`nsecuptime`): one time base for the clock and the timer (spec
//! AMB-2), so a rearmed timer never fires before the deadline clockintr
//! computed. Early dispatches still happen, exactly in these cases:
//! - the dispatch that the `clockintr_trigger` right after `clockintr_cpu_init`
//!   causes, on every vCPU except the bootstrap vCPU at boot: there
//!   `cpu_init` has placed every event strictly after the current uptime (the
//!   bootstrap vCPU's first `cpu_init` leaves hardclock at 0, CI-CPU-3, so its
//!   first dispatch is prompt). So each secondary vCPU counts one early
//!   dispatch at boot, and every vCPU one more after each resume with
//!   re-initialisation (which re-runs `cpu_init` and the trigger);
//! - a dispatch after a rearm the device clamped to `TIMER_MAX_NS` (only with
//!   periods above about 4.3 s, i.e. hz or stathz below 1);
//! - a dispatch cut short by a host stop (below), when its first reading of
//!   the clock already came after the stop.
//!
//! A host stop (the VMM process stopped with SIGSTOP and continued): the
//! clock ran on meanwhile, and a dispatch would run every missed hardclock at
//! once. The VMM raises a resume with re-initialisation on each vCPU the
//! first time that vCPU's thread reads the clock after the continue, before it
//! answers the read (`vmm/src/vm/continued.rs`). When the vCPU is inside its
//! timer interrupt then (interrupts off, so the TimerResume vector waits), the
//! dispatch must not use the jump: a reading more than [`STOP_SUSPECT_NS`]
//! after the previous one makes it read `TIMER_RESUMES`, and if that changed
//! since the last TimerResume handled, the dispatch sees the clock where it
//! stood from then on ([`StopGuard`]); the pending TimerResume re-places the
//! events right after. A vCPU merely held or descheduled finds no resume and
//! catches up by repetition (CI-EV-1).
//!
//! The kernel side of clockintr lives here too: `hardclock` (tick count,
//! round-robin preemption every hz/10 ticks), `statclock` (charges the current
//! thread's user or interrupt time, or the vCPU's idle time; profclock while
//! profiling; the statclock-driven schedclock when schedhz is 0), `schedclock`
//! (estcpu and priority). What follows a hardclock (sleep wake-ups,
//! preemption) is the scheduler's, which the dispatcher runs after
//! [`interrupt`].

use core::sync::atomic::{compiler_fence, AtomicBool, AtomicU32, Ordering};

use clockintr::{ClockIntr, ClockQueue, Config, IntervalSink, Machine, Outcome};
use metronome_abi::{event_kind, hist, VcpuShared, STAT_INTERVALS};

use crate::arch::{self, Frame};
use crate::boot;
use crate::drivers::control;
use crate::drivers::timer::{self, Intrclock};
use crate::events;
use crate::percpu::{PerCpu, SchedTicks};
use crate::sched;

/// The global clockintr state (`clockintr_init` runs once, on vCPU 0).
pub static CLOCKINTR: ClockIntr = ClockIntr::new();

/// Panics with clockintr's message for `error` (fatal in OpenBSD too).
#[track_caller]
fn fatal(error: clockintr::Error) -> ! {
    let location = core::panic::Location::caller();
    control::report_panic(error.message(), Some((location.file(), location.line())))
}

/// `clockintr_init` with the boot block's frequencies (vCPU 0, before the others start).
pub fn init_global() {
    let boot = boot::info();
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

/// Per-vCPU start: `clockintr_cpu_init` with the timer, then
/// `clockintr_trigger`, as OpenBSD 7.3's drivers do.
pub fn start(cpu: &mut PerCpu, shared: &mut VcpuShared) {
    cpu_init(cpu, shared);
}

fn cpu_init(cpu: &mut PerCpu, shared: &mut VcpuShared) {
    let (mut machine, _) = GuestMachine::new(&mut cpu.ticks, cpu.current, shared, None);
    if let Err(e) = cpu
        .queue
        .cpu_init(&CLOCKINTR, &mut machine, Some(Intrclock))
    {
        fatal(e);
    }
    cpu.first_since_init = true;
    cpu.programmed_deadline = None;
    shared.cpu_inits += 1;
    shared.last_cpu_init_ns = cpu.queue.uptime();
    publish(&cpu.queue, shared);
    if let Err(e) = cpu.queue.trigger() {
        fatal(e);
    }
}

/// The resume interrupt: the VM was paused and the clock jumped; record the
/// device's resume count and re-place the events on their grid past now (the
/// resume rule, CI-CPU-6).
pub fn resume(cpu: &mut PerCpu, shared: &mut VcpuShared) {
    shared.timer_resumes_seen = timer::resumes();
    cpu_init(cpu, shared);
}

/// A clock reading more than this after the previous one used by a dispatch
/// makes the dispatch check `TIMER_RESUMES` for a host stop (one more MMIO
/// read, on such readings only). Five hardclock periods at hz 100.
const STOP_SUSPECT_NS: u64 = 50_000_000;

/// What keeps one dispatch from running the hardclocks a host stop skipped
/// (see the module documentation).
#[derive(Clone, Copy, Debug)]
struct StopGuard {
    /// The last clock reading the dispatch uses: the queue's uptime before it.
    uptime: u64,
    /// `TIMER_RESUMES` as of the last TimerResume handled.
    resumes_seen: u64,
    /// A resume is pending: the clock stays at `uptime` for this dispatch.
    stopped: bool,
}

impl StopGuard {
    /// The reading the dispatch uses for the clock's reading `now`.
    fn reading(&mut self, now: u64) -> u64 {
        if !self.stopped
            && now.saturating_sub(self.uptime) > STOP_SUSPECT_NS
            && timer::resumes() != self.resumes_seen
        {
            self.stopped = true;
        }
        if !self.stopped {
            self.uptime = now;
        }
        self.uptime
    }
}

/// What a dispatch that ran hardclock asks of the scheduler.
#[derive(Clone, Copy, Debug)]
pub struct Hardclock {
    /// The uptime at the end of the dispatch.
    pub now: u64,
    /// Round-robin asked for a preemption.
    pub need_resched: bool,
}

/// The timer interrupt: `clockintr_dispatch`. `entry_ns` is the uptime the
/// entry stub read first thing (`trap`): the lateness is measured from it, so
/// it shows the interrupt's delivery, not the entry path. Returns what the
/// scheduler must do when hardclock ran.
pub fn interrupt(
    cpu: &mut PerCpu,
    shared: &mut VcpuShared,
    frame: &Frame,
    entry_ns: u64,
) -> Option<Hardclock> {
    shared.timer_interrupts += 1;
    let guard = StopGuard {
        uptime: cpu.queue.uptime(),
        resumes_seen: shared.timer_resumes_seen,
        stopped: false,
    };
    let (mut machine, mut sink) =
        GuestMachine::new(&mut cpu.ticks, cpu.current, shared, Some(frame));
    machine.stop_guard = Some(guard);
    let report = match cpu.queue.dispatch(&CLOCKINTR, &mut machine, &mut sink) {
        Ok(report) => report,
        Err(e) => fatal(e),
    };
    let need_resched = machine.need_resched;
    if let Some(deadline) = cpu.programmed_deadline {
        if entry_ns >= deadline {
            let late = entry_ns - deadline;
            shared.lateness_hist.0[hist::bucket(late)] += 1;
            shared.lateness_max = shared.lateness_max.max(late);
            shared.lateness_sum = shared.lateness_sum.saturating_add(late);
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
    if shared.first_dispatch_ns == 0 {
        shared.first_dispatch_ns = report.start.max(1);
    }
    shared.last_dispatch_start_ns = report.start;
    shared.last_dispatch_ns = report.end;
    publish(&cpu.queue, shared);
    events::dispatch(cpu.id, shared.current_tid, &report);
    (report.calls.hardclock > 0).then_some(Hardclock {
        now: report.end,
        need_resched,
    })
}

/// Copies the queue's statistics and pending events to the shared page.
///
/// The generation protocol (`sysctl_clockintr`, TR-C-2): `clockintr_gen` is 0
/// while the record is written and a new non-zero value after, so the VMM,
/// which reads the page concurrently, can tell a whole copy from a torn one.
/// The generation stores are volatile and fenced so that the compiler neither
/// drops the 0 nor moves record stores across either store (x86 keeps the
/// stores themselves in order).
fn publish(queue: &ClockQueue<Intrclock>, shared: &mut VcpuShared) {
    let gen_field = core::ptr::addr_of_mut!(shared.clockintr_gen);
    // SAFETY: an aligned field of the page `shared` uniquely borrows.
    let gen = unsafe { gen_field.read_volatile() };
    // SAFETY: as above.
    unsafe { gen_field.write_volatile(0) };
    compiler_fence(Ordering::SeqCst);
    let (stats, _) = queue.stats();
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
    for event in queue.pending() {
        shared.pending[n] = metronome_abi::PendingEvent {
            kind: kind_code(event.kind),
            expiration: event.expiration,
        };
        n += 1;
    }
    shared.pending_count = n as u64;
    for event in queue.idle_events() {
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
    shared.running = queue.running().map_or(event_kind::NONE, kind_code);
    compiler_fence(Ordering::SeqCst);
    // SAFETY: as above; the record stores are complete.
    unsafe { gen_field.write_volatile(gen.wrapping_add(1).max(1)) };
}

fn kind_code(kind: clockintr::EventKind) -> u64 {
    match kind {
        clockintr::EventKind::Hardclock => event_kind::HARDCLOCK,
        clockintr::EventKind::Statclock => event_kind::STATCLOCK,
        clockintr::EventKind::Schedclock => event_kind::SCHEDCLOCK,
    }
}

/// Records randomized statclock intervals in the shared page's
/// `stat_interval*` fields.
struct Sink<'a> {
    count: &'a mut u64,
    sum: &'a mut u64,
    min: &'a mut u64,
    max: &'a mut u64,
    first: &'a mut [u64; STAT_INTERVALS],
}

impl IntervalSink for Sink<'_> {
    fn interval(&mut self, ns: u64) {
        if (*self.count as usize) < STAT_INTERVALS {
            self.first[*self.count as usize] = ns;
        }
        if *self.count == 0 || ns < *self.min {
            *self.min = ns;
        }
        *self.max = (*self.max).max(ns);
        *self.count += 1;
        *self.sum += ns;
    }
}

/// The kernel around clockintr on one vCPU, with the interrupted frame. It
/// borrows the shared page's callback counters and the [`SchedTicks`]; the
/// queue it runs in is borrowed separately, so no part of the vCPU's data is
/// reachable twice during a dispatch.
struct GuestMachine<'a> {
    frame: Option<&'a Frame>,
    /// The current thread's slot; callbacks never switch threads.
    current: Option<usize>,
    ticks: &'a mut SchedTicks,
    hardclock: &'a mut u64,
    ticks_count: &'a mut u64,
    statclock: &'a mut u64,
    profclock: &'a mut u64,
    schedclock: &'a mut u64,
    cp_time: &'a mut [u64; 4],
    need_resched: bool,
    /// In a timer interrupt's dispatch: the guard against a host stop.
    stop_guard: Option<StopGuard>,
}

impl<'a> GuestMachine<'a> {
    /// Splits `shared` between the machine and the interval sink.
    fn new(
        ticks: &'a mut SchedTicks,
        current: Option<usize>,
        shared: &'a mut VcpuShared,
        frame: Option<&'a Frame>,
    ) -> (Self, Sink<'a>) {
        let VcpuShared {
            hardclock,
            ticks: ticks_count,
            statclock,
            profclock,
            schedclock,
            cp_time,
            stat_interval_count,
            stat_interval_sum,
            stat_interval_min,
            stat_interval_max,
            stat_intervals,
            ..
        } = shared;
        let machine = Self {
            frame,
            current,
            ticks,
            hardclock,
            ticks_count,
            statclock,
            profclock,
            schedclock,
            cp_time,
            need_resched: false,
            stop_guard: None,
        };
        let sink = Sink {
            count: stat_interval_count,
            sum: stat_interval_sum,
            min: stat_interval_min,
            max: stat_interval_max,
            first: stat_intervals,
        };
        (machine, sink)
    }
}

impl Machine for GuestMachine<'_> {
    fn nsecuptime(&mut self) -> u64 {
        match &mut self.stop_guard {
            Some(guard) if guard.stopped => guard.uptime,
            Some(guard) => guard.reading(timer::uptime_ns()),
            None => timer::uptime_ns(),
        }
    }

    fn at_clock_ipl(&self) -> bool {
        // Clock interrupt priority here means: interrupts disabled.
        !arch::interrupts_enabled()
    }

    fn hardclock(&mut self) {
        *self.hardclock += 1;
        *self.ticks_count += 1;
        let ticks = &mut *self.ticks;
        ticks.rr_ticks = ticks.rr_ticks.saturating_sub(1);
        if ticks.rr_ticks == 0 {
            // roundrobin(): every hz/10 ticks (100 ms), as OpenBSD's rrticks_init.
            ticks.rr_ticks = (CLOCKINTR.config().hz / 10).max(1);
            self.need_resched = true;
        }
    }

    fn statclock(&mut self) {
        *self.statclock += 1;
        let ticks = &mut *self.ticks;
        if PROFILING.load(Ordering::Relaxed) {
            // profclock runs at profhz; accounting divides down to stathz.
            *self.profclock += 1;
            ticks.pscnt = ticks.pscnt.saturating_sub(1);
            if ticks.pscnt > 0 {
                return;
            }
            ticks.pscnt = PSDIV.load(Ordering::Relaxed).max(1);
        } else {
            ticks.pscnt = 1;
        }
        let user = self.frame.is_some_and(|f| f.cpl() == 3);
        sched::charge_stat_tick(self.current, self.cp_time, user);
        // With schedhz == 0, statclock drives schedclock every 4th tick of a
        // thread, as OpenBSD does (not counted as schedclock events).
        if self.current.is_some() && CLOCKINTR.schedclock_period() == 0 {
            ticks.schedticks = ticks.schedticks.wrapping_add(1);
            if ticks.schedticks & 3 == 0 {
                sched::schedclock(self.current);
            }
        }
    }

    fn has_curproc(&self) -> bool {
        self.current.is_some()
    }

    fn schedclock(&mut self) {
        *self.schedclock += 1;
        sched::schedclock(self.current);
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
