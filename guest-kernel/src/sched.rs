//! A small preemptive round-robin scheduler with per-vCPU run queues.
//!
//! Threads run at CPL3 and never migrate: a thread belongs to the vCPU that
//! created it, and only that vCPU (in its kernel, with interrupts disabled)
//! touches the thread's slot in the table. A context switch rewrites the
//! interrupt frame on the IST stack: the outgoing context is copied out, the
//! incoming one copied in, and the common exit path `iretq`s into it. The
//! x87/SSE state is saved and restored with `fxsave64`/`fxrstor64`, because
//! user code (and `core`) uses SSE registers.
//!
//! When nothing is runnable the vCPU switches to its idle context, a CPL0 loop
//! of `sti; hlt` on the vCPU's boot stack; the VMM parks the vCPU thread on HLT
//! until an interrupt is pending for it.
//!
//! The scheduler knows nothing of workloads or of the clock: the dispatcher
//! passes it the vCPU's data (see `percpu::with`), the clock's verdicts
//! (`need_resched`, the uptime) and the workload's tick hook.

use core::sync::atomic::{AtomicUsize, Ordering};

use metronome_abi::gdt::{KERNEL_CS, KERNEL_DS, USER_CS, USER_DS};
use metronome_abi::{layout, thread_state, ThreadInfo, VcpuShared, MAX_THREADS};

use crate::arch::{self, Frame, FxArea};
use crate::boot;
use crate::percpu::{self, PerCpu};

/// cp_time indices (OpenBSD CP_USER, CP_SYS, CP_INTR, CP_IDLE; no CP_NICE/CP_SPIN).
const CP_USER: usize = 0;
const CP_INTR: usize = 2;
const CP_IDLE: usize = 3;
/// Base user priority and limits of OpenBSD's resetpriority().
const PUSER: u64 = 50;
const MAXPRI: u64 = 127;
const ESTCPULIM: u64 = 255;

/// Bytes of user stack per thread.
const STACK_SIZE: u64 = 64 * 1024;
/// RFLAGS of a new context: IF set, reserved bit 1 set.
const RFLAGS_IF: u64 = 0x202;

/// A guest thread.
pub struct Thread {
    /// Thread id (slot index + 1; 0 means idle).
    pub tid: u32,
    /// Owning vCPU.
    pub vcpu: u32,
    /// One of `metronome_abi::thread_state`.
    pub state: u32,
    /// Whether it has run at least once.
    pub has_run: bool,
    /// Name, NUL padded.
    pub name: [u8; 16],
    /// Uptime at which a sleeping thread becomes runnable (u64::MAX while
    /// blocked on a wait channel).
    pub wake_at: u64,
    /// The address it waits on (0 = none).
    pub wait_channel: u64,
    /// Saved registers while not running.
    pub frame: Frame,
    /// Saved x87/SSE state while not running.
    pub fx: FxArea,
}

/// The thread table. Slot `i` belongs to the vCPU that allocated it (see module docs).
static mut THREADS: [Thread; MAX_THREADS] = [const {
    Thread {
        tid: 0,
        vcpu: 0,
        state: 0,
        has_run: false,
        name: [0; 16],
        wake_at: 0,
        wait_channel: 0,
        frame: Frame::ZERO,
        fx: FxArea::initial(),
    }
}; MAX_THREADS];
static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);
static NEXT_STACK: AtomicUsize = AtomicUsize::new(0);

// The thread table and the VMM's copy of it.
//
// The rule: slots are handed out once by NEXT_SLOT to the vCPU that spawns
// the thread; after that only that vCPU touches the slot, always in the
// kernel with interrupts disabled (so never concurrently), and a reference to
// a slot's `Thread` or `ThreadInfo` is used only until the next call to
// `thread`, `info` or `set_state` for the same slot (references are taken
// afresh, never kept across such a call). `thread` and `info` are `unsafe fn`
// so that every caller states why it keeps that rule.

/// The thread table entry the VMM reads for `slot`.
///
/// # Safety
/// `slot` is below `MAX_THREADS` and owned by the calling vCPU, and no other
/// reference to its `ThreadInfo` is used while the returned one is (see the
/// rule above).
unsafe fn info(slot: usize) -> &'static mut ThreadInfo {
    // SAFETY: the table is a fixed, identity-mapped page array of MAX_THREADS
    // entries; the caller guarantees ownership and no other live reference.
    unsafe { &mut *((layout::THREAD_TABLE as *mut ThreadInfo).add(slot)) }
}

/// The kernel's record of `slot`.
///
/// # Safety
/// `slot` is below `MAX_THREADS` and owned by the calling vCPU, and no other
/// reference to its `Thread` is used while the returned one is (see the rule
/// above).
unsafe fn thread(slot: usize) -> &'static mut Thread {
    // SAFETY: the caller guarantees ownership and no other live reference.
    unsafe { &mut *core::ptr::addr_of_mut!(THREADS[slot]) }
}

/// Sets the state of a slot the calling vCPU owns, in both records.
fn set_state(slot: usize, state: u32) {
    // SAFETY: callers pass a slot of their own vCPU (from its run queue, its
    // `owned` list or `current`); both references end within this function.
    unsafe {
        thread(slot).state = state;
        info(slot).state = u64::from(state);
    }
}

/// A user thread's entry point.
pub type Entry = extern "C" fn(arg: u64) -> !;

/// Creates a runnable CPL3 thread on vCPU `cpu` running `entry(arg)`.
///
/// Returns the thread id, or `None` when the table or the heap is full.
pub fn spawn(cpu: &mut PerCpu, name: &[u8], entry: Entry, arg: u64) -> Option<u32> {
    let slot = NEXT_SLOT.fetch_add(1, Ordering::Relaxed);
    if slot >= MAX_THREADS {
        return None;
    }
    let stack_index = NEXT_STACK.fetch_add(1, Ordering::Relaxed) as u64;
    let stack_top = layout::HEAP_BASE + (stack_index + 1) * STACK_SIZE;
    if stack_top > boot::info().heap_end {
        return None;
    }
    // SAFETY: the slot was just handed to this vCPU by NEXT_SLOT; `t` is the
    // only reference to it until the end of this function.
    let t = unsafe { thread(slot) };
    t.tid = slot as u32 + 1;
    t.vcpu = cpu.id;
    t.state = thread_state::RUNNABLE;
    t.has_run = false;
    let n = name.len().min(t.name.len());
    t.name = [0; 16];
    t.name[..n].copy_from_slice(&name[..n]);
    t.frame = Frame {
        rip: entry as *const () as u64,
        cs: u64::from(USER_CS),
        rflags: RFLAGS_IF,
        // Entry is called as if by `call`: rsp + 8 is 16-byte aligned.
        rsp: stack_top - 8,
        ss: u64::from(USER_DS),
        rdi: arg,
        ..Frame::ZERO
    };
    t.fx = FxArea::initial();
    // SAFETY: as above, for the slot's table entry.
    *unsafe { info(slot) } = ThreadInfo {
        tid: u64::from(t.tid),
        vcpu: u64::from(cpu.id),
        state: u64::from(thread_state::RUNNABLE),
        name: t.name,
        priority: PUSER,
        saved_rip: t.frame.rip,
        saved_rbp: t.frame.rbp,
        stack_lo: stack_top - STACK_SIZE,
        stack_hi: stack_top,
        ..ThreadInfo::default()
    };
    cpu.owned[cpu.owned_len] = slot as u16;
    cpu.owned_len += 1;
    cpu.runq.push(slot);
    Some(t.tid)
}

/// Leaves kernel initialisation for the idle context of vCPU `id`.
pub fn enter_idle(id: u32) -> ! {
    let stack_top = layout::percpu_region(id) + layout::PERCPU_BOOT_STACK_TOP;
    percpu::with(id, |cpu, _| {
        cpu.idle_frame = Frame {
            rip: arch::idle_loop as *const () as u64,
            cs: u64::from(KERNEL_CS),
            rflags: 0x2,
            rsp: stack_top,
            ss: u64::from(KERNEL_DS),
            ..Frame::ZERO
        };
    });
    // SAFETY: the boot stack is no longer needed by kmain (it never returns) and
    // becomes the idle context's stack; idle_loop only runs `sti; hlt`.
    unsafe {
        core::arch::asm!("mov rsp, {0}", "jmp {1}", in(reg) stack_top, sym arch::idle_loop,
                         options(noreturn));
    }
}

/// Saves the running context of `cpu` from `frame`.
fn save_current(cpu: &mut PerCpu, frame: &Frame) {
    match cpu.current {
        Some(slot) => {
            // SAFETY: `current` is a slot of this vCPU; `t` is the only reference.
            let t = unsafe { thread(slot) };
            t.frame = *frame;
            // SAFETY: we are at CPL0 with OSFXSR set; the area belongs to this thread.
            unsafe { arch::fxsave(&mut t.fx) };
            // What the host's PET reads of a thread that is not running.
            // SAFETY: as above, for the slot's table entry; `t` is not used after.
            let i = unsafe { info(slot) };
            i.saved_rip = frame.rip;
            i.saved_rbp = frame.rbp;
            i.saved_vector = frame.vector;
        }
        None => cpu.idle_frame = *frame,
    }
}

/// Loads `next` (a slot, or idle) into `frame` and publishes it in the shared page.
fn load(cpu: &mut PerCpu, shared: &mut VcpuShared, frame: &mut Frame, next: Option<usize>) {
    let out = shared.current_tid;
    let traced = crate::events::switch_time(cpu.id);
    shared.context_switches += 1;
    cpu.current = next;
    match next {
        Some(slot) => {
            set_state(slot, thread_state::RUNNING);
            // SAFETY: `next` came from this vCPU's run queue; each reference
            // is the only one while it is used.
            unsafe { info(slot).switches += 1 };
            // SAFETY: as above.
            let t = unsafe { thread(slot) };
            if !t.has_run {
                t.has_run = true;
                shared.user_threads_run += 1;
            }
            *frame = t.frame;
            // SAFETY: the area holds a valid image saved by fxsave or FxArea::initial.
            unsafe { arch::fxrstor(&t.fx) };
            shared.current_tid = t.tid;
            shared.current_state = thread_state::RUNNING;
            shared.current_name = t.name;
            // Last, with the thread's context in place: PET-L-2.
            crate::drivers::control::pet_on_cpu(slot, t.tid);
        }
        None => {
            *frame = cpu.idle_frame;
            shared.current_tid = 0;
            shared.current_state = thread_state::IDLE;
            shared.current_name = *b"idle\0\0\0\0\0\0\0\0\0\0\0\0";
        }
    }
    crate::events::switch(cpu.id, traced, out, shared.current_tid);
}

/// Switches away from the current context (whose state the caller has set) to
/// the next runnable thread, or to idle.
fn reschedule(cpu: &mut PerCpu, shared: &mut VcpuShared, frame: &mut Frame) {
    let next = cpu.runq.pop();
    if next.is_none() && cpu.current.is_none() {
        return;
    }
    if let (Some(cur), Some(n)) = (cpu.current, next) {
        if cur == n {
            // The current thread was the only runnable one: it keeps running.
            set_state(cur, thread_state::RUNNING);
            return;
        }
    }
    save_current(cpu, frame);
    load(cpu, shared, frame, next);
}

/// After a dispatch that ran hardclock: run the workload's tick hook
/// `on_tick(cpu, now)`, wake sleepers, and preempt when round-robin asked for
/// it (`need_resched`) or when idle and a thread became runnable. Once the
/// workload has decided to exit (`cpu.exiting`), park in idle instead.
pub fn hardclock_tick(
    cpu: &mut PerCpu,
    shared: &mut VcpuShared,
    frame: &mut Frame,
    now: u64,
    need_resched: bool,
    on_tick: impl FnOnce(&mut PerCpu, u64),
) {
    if cpu.exiting {
        return;
    }
    on_tick(cpu, now);
    if cpu.exiting {
        // The workload decided to end the VM: park in idle until the VMM stops us.
        if let Some(slot) = cpu.current {
            set_state(slot, thread_state::RUNNABLE);
        }
        save_current(cpu, frame);
        load(cpu, shared, frame, None);
        return;
    }
    for i in 0..cpu.owned_len {
        let slot = cpu.owned[i] as usize;
        // SAFETY: `owned` lists this vCPU's slots; `t` is not used after
        // `set_state` takes its own reference.
        let t = unsafe { thread(slot) };
        if t.state == thread_state::WAITING && t.wake_at <= now {
            set_state(slot, thread_state::RUNNABLE);
            cpu.runq.push(slot);
        }
    }
    if cpu.current.is_some() && !need_resched {
        return;
    }
    // Preempt as a yield would (nothing to do with an empty queue).
    yield_now(cpu, shared, frame);
}

/// Statclock accounting (kern_clock.c `statclock`): a tick of user time or of
/// interrupt time for the `current` thread, or of idle time, in `cp_time`.
pub fn charge_stat_tick(current: Option<usize>, cp_time: &mut [u64; 4], user: bool) {
    match current {
        Some(slot) => {
            // SAFETY: `current` is a slot of this vCPU; `i` is the only reference.
            let i = unsafe { info(slot) };
            if user {
                cp_time[CP_USER] += 1;
                i.user_ticks += 1;
            } else {
                // Threads only enter the kernel with interrupts off, so a tick
                // that finds a thread in kernel mode is interrupt time.
                cp_time[CP_INTR] += 1;
                i.intr_ticks += 1;
            }
        }
        None => cp_time[CP_IDLE] += 1,
    }
}

/// schedclock(p): raise the `current` thread's estcpu and recompute its priority.
pub fn schedclock(current: Option<usize>) {
    if let Some(slot) = current {
        // SAFETY: `current` is a slot of this vCPU; `i` is the only reference.
        let i = unsafe { info(slot) };
        i.estcpu = (i.estcpu + 1).min(ESTCPULIM);
        i.priority = (PUSER + i.estcpu / 4).min(MAXPRI);
    }
}

/// System call: give up the CPU to the next runnable thread.
pub fn yield_now(cpu: &mut PerCpu, shared: &mut VcpuShared, frame: &mut Frame) {
    if cpu.runq.is_empty() {
        return;
    }
    if let Some(slot) = cpu.current {
        set_state(slot, thread_state::RUNNABLE);
        cpu.runq.push(slot);
    }
    reschedule(cpu, shared, frame);
}

/// System call: sleep until `wake_at` (uptime ns); woken by a later tick.
pub fn sleep_until(cpu: &mut PerCpu, shared: &mut VcpuShared, frame: &mut Frame, wake_at: u64) {
    if let Some(slot) = cpu.current {
        set_state(slot, thread_state::WAITING);
        // SAFETY: `current` is a slot of this vCPU; the reference ends here.
        unsafe { thread(slot).wake_at = wake_at };
    }
    reschedule_or_idle(cpu, shared, frame);
}

/// System call: block the current thread on `channel` until a wake on it.
pub fn wait_on(cpu: &mut PerCpu, shared: &mut VcpuShared, frame: &mut Frame, channel: u64) {
    if let Some(slot) = cpu.current {
        set_state(slot, thread_state::WAITING);
        // SAFETY: `current` is a slot of this vCPU; `t` is the only reference.
        let t = unsafe { thread(slot) };
        t.wake_at = u64::MAX;
        t.wait_channel = channel;
    }
    reschedule_or_idle(cpu, shared, frame);
}

/// System call: make every thread of this vCPU waiting on `channel` runnable.
pub fn wake_all(cpu: &mut PerCpu, channel: u64) -> u64 {
    let mut woken = 0;
    for i in 0..cpu.owned_len {
        let slot = cpu.owned[i] as usize;
        // SAFETY: `owned` lists this vCPU's slots; `t` is not used after
        // `set_state` takes its own reference.
        let t = unsafe { thread(slot) };
        if t.state == thread_state::WAITING && t.wait_channel == channel && channel != 0 {
            t.wait_channel = 0;
            set_state(slot, thread_state::RUNNABLE);
            cpu.runq.push(slot);
            woken += 1;
        }
    }
    woken
}

/// System call: end the current thread.
pub fn exit_current(cpu: &mut PerCpu, shared: &mut VcpuShared, frame: &mut Frame) {
    if let Some(slot) = cpu.current {
        set_state(slot, thread_state::EXITED);
    }
    reschedule_or_idle(cpu, shared, frame);
}

/// Like `reschedule`, but the current thread cannot continue: go idle if the queue is empty.
fn reschedule_or_idle(cpu: &mut PerCpu, shared: &mut VcpuShared, frame: &mut Frame) {
    let next = cpu.runq.pop();
    save_current(cpu, frame);
    load(cpu, shared, frame, next);
}
