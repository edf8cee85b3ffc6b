//! Per-vCPU data, reached only through [`with`].
//!
//! Each vCPU owns a region of guest memory (see `metronome_abi::layout`): its
//! boot/idle stack, its two IST stacks, the shared page the VMM reads
//! ([`VcpuShared`]) and this kernel's private per-vCPU data ([`PerCpu`]).
//! Only the owning vCPU writes either, always with interrupts disabled, so no
//! lock protects them. A handler finds its vCPU from its own stack address:
//! every interrupt runs on one of the vCPU's IST stacks.
//!
//! # The borrowing rule
//!
//! [`with`] lends both halves of one vCPU's data for the duration of a
//! closure, and it is the only way to reach them (apart from [`init`], which
//! writes them once, and [`fault_tid`], which reads one field on the way to
//! halting). The kernel calls it once per entry (boot step, interrupt, system
//! call) on its own vCPU and passes the references down; code below never calls
//! it again. Interrupts are off inside the kernel and IST1 never nests, so two
//! calls can only overlap if kernel code calls `with` inside `with`: a flag in
//! the private area catches that and panics instead of handing out a second
//! `&mut` (one load and two stores per kernel entry).

use core::sync::atomic::{AtomicU32, Ordering};

use metronome_abi::layout::{self, PERCPU_BASE, PERCPU_STRIDE};
use metronome_abi::{VcpuShared, SHARED_MAGIC};

use crate::arch::{Frame, FxArea};
use crate::boot;
use crate::drivers::timer::Intrclock;
use crate::runq::RunQueue;

/// vCPUs that finished their own initialisation.
static ONLINE: AtomicU32 = AtomicU32::new(0);

/// The scheduler's clock-driven counters (OpenBSD's `spc_rrticks`,
/// `spc_pscnt`, `spc_schedticks`), updated by the clock callbacks.
pub struct SchedTicks {
    /// hardclocks left until the next round-robin preemption.
    pub rr_ticks: u32,
    /// statclock calls left before the next accounting tick while profiling (spc_pscnt).
    pub pscnt: u32,
    /// statclock ticks, for the statclock-driven schedclock when schedhz is 0.
    pub schedticks: u32,
}

/// This kernel's private per-vCPU state.
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
    /// This vCPU's clockintr queue, on this vCPU's timer.
    pub queue: clockintr::ClockQueue<Intrclock>,
    /// Counters of the clock callbacks.
    pub ticks: SchedTicks,
    /// The deadline this vCPU last programmed (None after a trigger).
    pub programmed_deadline: Option<u64>,
    /// The next prompt dispatch is the first since clockintr_cpu_init.
    pub first_since_init: bool,
    /// The guest asked to exit: stop scheduling, idle until the VMM stops us.
    pub exiting: bool,
}

/// The private area: the nesting flag of [`with`], then the data.
#[repr(C)]
struct Area {
    lent: bool,
    cpu: PerCpu,
}

const _: () = assert!(
    layout::PERCPU_PRIVATE + core::mem::size_of::<Area>() as u64 <= layout::PERCPU_EVENTS,
    "the private per-vCPU data must end below the vCPU's event ring"
);

fn area(id: u32) -> *mut Area {
    (layout::percpu_region(id) + layout::PERCPU_PRIVATE) as *mut Area
}

fn shared_page(id: u32) -> *mut VcpuShared {
    (layout::percpu_region(id) + layout::PERCPU_SHARED) as *mut VcpuShared
}

/// Runs `f` with vCPU `id`'s private data and shared page (see the module docs).
///
/// Must be called by vCPU `id` itself, after [`init`], with interrupts disabled.
///
/// # Panics
/// When called again inside `f` (which would alias the `&mut` it holds).
pub fn with<R>(id: u32, f: impl FnOnce(&mut PerCpu, &mut VcpuShared) -> R) -> R {
    let area = area(id);
    // SAFETY: the flag lies in this vCPU's own region, which the VMM maps; only
    // this vCPU touches it, with interrupts disabled, through raw places (no
    // reference to the area is formed here).
    unsafe {
        if (*area).lent {
            panic!("percpu::with called while this vCPU's data is already lent");
        }
        (*area).lent = true;
    }
    // SAFETY: `init` made the private data a valid PerCpu and the shared page
    // is plain integers; both lie in this vCPU's region, only this vCPU
    // writes them, and the flag just set proves no other reference from
    // `with` is live (and nothing else forms one), so these two `&mut` are
    // unique in the guest. The VMM reads the shared page concurrently from
    // outside the guest: counters it may see slightly stale, and what it must
    // see whole (clockintr statistics, pending events) is published under the
    // generation protocol of `clock::publish`.
    let (cpu, shared) = unsafe { (&mut (*area).cpu, &mut *shared_page(id)) };
    let result = f(cpu, shared);
    // SAFETY: as above; `cpu` and `shared` are dead.
    unsafe { (*area).lent = false };
    result
}

/// The id of the vCPU whose IST stack holds `frame`.
pub fn id_of_frame(frame: &Frame) -> u32 {
    ((frame as *const Frame as u64 - PERCPU_BASE) / PERCPU_STRIDE) as u32
}

/// The number of vCPUs that have run [`init`].
pub fn online() -> u32 {
    ONLINE.load(Ordering::Acquire)
}

/// Thread id of the current thread of vCPU `id` as published in its shared
/// page (0 for idle), for a fault report: readable even when the fault hit
/// kernel code inside [`with`], because the caller halts right after.
pub fn fault_tid(id: u32) -> u64 {
    // SAFETY: a plain read of an integer in this vCPU's shared page through a
    // raw place. A `&mut` from `with` may be live (a fault inside kernel code),
    // but this vCPU never resumes that code: the caller reports and halts.
    u64::from(unsafe { core::ptr::addr_of!((*shared_page(id)).current_tid).read_volatile() })
}

/// Initialises vCPU `id`'s private data and shared page; called once by vCPU
/// `id` before any [`with`].
pub fn init(id: u32) {
    let boot = boot::info();
    let area = area(id);
    // SAFETY: the private area lies in this vCPU's region, which the VMM maps
    // and zeroes, and no other code uses it yet. Every field that is not a
    // plain integer (or integer array, for which the VMM's zero bytes are a
    // valid value) is written here through raw places, so afterwards the area
    // holds a valid PerCpu.
    unsafe {
        let cpu = core::ptr::addr_of_mut!((*area).cpu);
        core::ptr::addr_of_mut!((*area).lent).write(false);
        core::ptr::addr_of_mut!((*cpu).id).write(id);
        core::ptr::addr_of_mut!((*cpu).current).write(None);
        core::ptr::addr_of_mut!((*cpu).runq).write(RunQueue::new());
        core::ptr::addr_of_mut!((*cpu).owned_len).write(0);
        core::ptr::addr_of_mut!((*cpu).idle_fx).write(FxArea::initial());
        core::ptr::addr_of_mut!((*cpu).queue).write(clockintr::ClockQueue::new(
            id,
            boot.vcpu_count,
            id == 0,
            boot.stat_seed,
        ));
        core::ptr::addr_of_mut!((*cpu).ticks).write(SchedTicks {
            rr_ticks: 1,
            pscnt: 1,
            schedticks: 0,
        });
        core::ptr::addr_of_mut!((*cpu).programmed_deadline).write(None);
        core::ptr::addr_of_mut!((*cpu).first_since_init).write(false);
        core::ptr::addr_of_mut!((*cpu).exiting).write(false);
    }
    with(id, |_, shared| {
        shared.vcpu_id = id;
        shared.current_state = metronome_abi::thread_state::IDLE;
        shared.magic = SHARED_MAGIC;
    });
    ONLINE.fetch_add(1, Ordering::AcqRel);
}
