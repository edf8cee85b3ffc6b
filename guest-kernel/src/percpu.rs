//! Per-vCPU data.
//!
//! Each vCPU owns a region of guest memory (see `metronome_abi::layout`): its
//! boot/idle stack, its two IST stacks, the shared page the VMM reads
//! ([`VcpuShared`]) and this kernel's private per-vCPU data ([`PerCpu`]).
//! Only the owning vCPU writes either, always with interrupts disabled, so no
//! lock protects them. A handler finds its vCPU from its own stack address:
//! every interrupt runs on one of the vCPU's IST stacks.

use metronome_abi::layout::{self, PERCPU_BASE, PERCPU_STRIDE};
use metronome_abi::{VcpuShared, SHARED_MAGIC};

use crate::arch::{Frame, FxArea};
use crate::clock::TimerDevice;
use crate::sched::RunQueue;

/// The scheduler's per-vCPU state.
pub struct PerCpu {
    /// This vCPU's id.
    pub id: u32,
    /// Index into the thread table of the running thread, or `None` for idle.
    pub current: Option<usize>,
    /// Runnable threads of this vCPU.
    pub runq: RunQueue,
    /// Thread-table indices of every thread this vCPU owns.
    pub owned: [u16; metronome_abi::MAX_THREADS],
    /// Number of valid entries in `owned`.
    pub owned_len: usize,
    /// The saved idle context.
    pub idle_frame: Frame,
    /// The saved idle floating-point state (unused by idle code, kept valid).
    pub idle_fx: FxArea,
    /// This vCPU's clockintr queue.
    pub queue: clockintr::ClockQueue<TimerDevice>,
    /// hardclocks left until the next round-robin preemption.
    pub rr_ticks: u32,
    /// The deadline this vCPU last programmed (None after a trigger).
    pub programmed_deadline: Option<u64>,
    /// statclock calls left before the next accounting tick while profiling (spc_pscnt).
    pub pscnt: u32,
    /// statclock ticks, for the statclock-driven schedclock when schedhz is 0.
    pub schedticks: u32,
    /// The next prompt dispatch is the first since clockintr_cpu_init.
    pub first_since_init: bool,
    /// The guest asked to exit: stop scheduling, idle until the VMM stops us.
    pub exiting: bool,
}

fn region(id: u32) -> u64 {
    layout::percpu_region(id)
}

/// This vCPU's private data, found by id.
pub fn get(id: u32) -> &'static mut PerCpu {
    // SAFETY: the private area lies inside the vCPU's own region, which the VMM
    // maps and zeroes, and only the owning vCPU (with interrupts disabled) ever
    // touches it; `init` writes it before any other use.
    unsafe { &mut *((region(id) + layout::PERCPU_PRIVATE) as *mut PerCpu) }
}

/// This vCPU's shared page.
pub fn shared(id: u32) -> &'static mut VcpuShared {
    // SAFETY: as `get`; the VMM only reads this page.
    unsafe { &mut *((region(id) + layout::PERCPU_SHARED) as *mut VcpuShared) }
}

/// The id of the vCPU whose IST stack holds `frame`.
pub fn id_of_frame(frame: &Frame) -> u32 {
    ((frame as *const Frame as u64 - PERCPU_BASE) / PERCPU_STRIDE) as u32
}

/// Initialises this vCPU's private data and shared page.
pub fn init(id: u32) {
    let cpu = get(id);
    cpu.id = id;
    cpu.current = None;
    cpu.runq = RunQueue::new();
    cpu.owned_len = 0;
    cpu.idle_fx = FxArea::initial();
    cpu.exiting = false;
    cpu.rr_ticks = 1;
    cpu.pscnt = 1;
    cpu.programmed_deadline = None;
    cpu.first_since_init = false;
    let shared = shared(id);
    shared.vcpu_id = id;
    shared.current_state = metronome_abi::thread_state::IDLE;
    shared.magic = SHARED_MAGIC;
}
