//! The guest/VMM interface of Metronome, defined once for both sides.
//!
//! Everything the guest kernel and the VMM must agree on lives here: the guest
//! physical memory layout, the paravirtual MMIO registers (virtual interrupt
//! controller, per-vCPU timer, control page), the legacy I/O ports, interrupt
//! vectors, the boot-information block the VMM writes before the first
//! instruction, the per-vCPU shared page the guest keeps current, the fault
//! report, and the exit codes.
//!
//! The crate is `no_std` and has no dependencies; all structures are `#[repr(C)]`
//! plain data so that both sides can read them from raw guest memory.
//!
//! Guest memory is identity mapped: a guest virtual address below the end of
//! RAM equals its guest physical address.

#![no_std]
#![deny(missing_docs)]

// The OpenAPI schema derive (`utoipa` feature, VMM only) builds its schema
// with the std prelude's names.
#[cfg(feature = "utoipa")]
extern crate std;
#[cfg(feature = "utoipa")]
use std::{string::String, vec, vec::Vec};

pub mod events;
mod frame;

pub use frame::InterruptFrame;

/// Magic value at the start of [`BootInfo`]: "METRONOM" in ASCII.
pub const BOOT_MAGIC: u64 = 0x4d4f_4e4f_5254_454d;
/// Version of the [`BootInfo`] layout.
pub const BOOT_VERSION: u32 = 1;

/// Largest number of vCPUs a VM may have (bounded by the per-vCPU regions of the layout).
pub const MAX_VCPUS: u32 = 64;
/// Largest number of guest threads the guest kernel supports, idle threads excluded.
pub const MAX_THREADS: usize = 64;

/// Guest physical memory layout.
pub mod layout {
    /// The boot-information block ([`crate::BootInfo`]), one page.
    pub const BOOT_INFO: u64 = 0x1000;
    /// The global descriptor table the VMM prepares (see [`crate::gdt`]), one page.
    pub const GDT: u64 = 0x2000;
    /// One 128-byte task-state segment per vCPU, two pages.
    pub const TSS: u64 = 0x3000;
    /// Size of one TSS slot.
    pub const TSS_STRIDE: u64 = 128;
    /// The guest-wide report page ([`crate::GuestReport`]), written by the guest, read by the VMM.
    pub const GUEST_REPORT: u64 = 0x5000;
    /// The guest thread table ([`crate::ThreadInfo`] x [`crate::MAX_THREADS`]), written by the guest.
    pub const THREAD_TABLE: u64 = 0x6000;
    /// Top-level page table (PML4).
    pub const PML4: u64 = 0x8000;
    /// The one page-directory-pointer table.
    pub const PDPT: u64 = 0x9000;
    /// Four page directories mapping 0..4 GiB with 2 MiB pages.
    pub const PD: u64 = 0xa000;
    /// Page table for the first 2 MiB (4 KiB pages, page 0 left unmapped to catch null pointers).
    pub const PT0: u64 = 0xe000;
    /// Lightweight PET's page ([`crate::PetPage`]), written by the VMM, read by the guest.
    pub const PET_PAGE: u64 = 0xf000;
    /// The bench page ([`crate::BenchPage`]): the bench workloads' CPL3
    /// threads write their progress there, the VMM reads it while they run.
    pub const BENCH_PAGE: u64 = 0x1_0000;
    /// Where the kernel image is linked and loaded (2 MiB).
    pub const KERNEL_BASE: u64 = 0x20_0000;
    /// The kernel image must end below this address.
    pub const KERNEL_LIMIT: u64 = 0x100_0000;
    /// Start of the per-vCPU regions (stacks, shared page).
    pub const PERCPU_BASE: u64 = 0x100_0000;
    /// Size of one per-vCPU region.
    pub const PERCPU_STRIDE: u64 = 0x4_0000;
    /// Offset in a per-vCPU region of the top of the boot/idle stack.
    pub const PERCPU_BOOT_STACK_TOP: u64 = 0x1_0000;
    /// Offset in a per-vCPU region of the top of IST1 (interrupts, system calls).
    pub const PERCPU_IST1_TOP: u64 = 0x2_0000;
    /// Offset in a per-vCPU region of the top of IST2 (exceptions).
    pub const PERCPU_IST2_TOP: u64 = 0x3_0000;
    /// Offset in a per-vCPU region of the [`crate::VcpuShared`] page.
    pub const PERCPU_SHARED: u64 = 0x3_0000;
    /// Offset in a per-vCPU region of the guest kernel's private per-vCPU data.
    pub const PERCPU_PRIVATE: u64 = 0x3_2000;
    /// Offset in a per-vCPU region of the guest event ring
    /// ([`crate::events::EventRing`]); the private data ends below it.
    pub const PERCPU_EVENTS: u64 = 0x3_8000;
    /// Start of the guest heap (thread stacks and other run-time allocations).
    pub const HEAP_BASE: u64 = 0x200_0000;
    /// Base of the paravirtual MMIO window (see [`crate::mmio`]); never backed by RAM.
    pub const MMIO_BASE: u64 = 0xd000_0000;
    /// Size of the MMIO window.
    pub const MMIO_SIZE: u64 = 0x1_0000;
    /// Smallest guest memory size the VMM accepts, in MiB.
    pub const MIN_MEM_MIB: u64 = 64;
    /// Largest guest memory size the VMM accepts, in MiB (RAM must stay below the MMIO window).
    pub const MAX_MEM_MIB: u64 = 3072;

    /// Offset in a per-vCPU region of the [`crate::InterruptFrame`] of the
    /// interrupt or system call being handled: the top of IST1 minus the frame
    /// (every interrupt and system call enters on IST1, which never nests).
    pub const INTERRUPT_FRAME_OFFSET_IN_PERCPU: u64 =
        PERCPU_IST1_TOP - core::mem::size_of::<crate::InterruptFrame>() as u64;

    /// Guest physical address of vCPU `id`'s region.
    pub const fn percpu_region(id: u32) -> u64 {
        PERCPU_BASE + id as u64 * PERCPU_STRIDE
    }

    /// Guest physical address of vCPU `id`'s event ring ([`crate::events`]).
    pub const fn event_ring(id: u32) -> u64 {
        percpu_region(id) + PERCPU_EVENTS
    }

    /// Guest physical address of vCPU `id`'s [`crate::InterruptFrame`] while it
    /// handles an interrupt or system call (see [`INTERRUPT_FRAME_OFFSET_IN_PERCPU`]).
    pub const fn interrupt_frame(id: u32) -> u64 {
        percpu_region(id) + INTERRUPT_FRAME_OFFSET_IN_PERCPU
    }
}

/// The flat GDT the VMM prepares; selectors the guest uses.
pub mod gdt {
    /// Kernel code segment selector (64-bit, DPL 0).
    pub const KERNEL_CS: u16 = 0x08;
    /// Kernel data segment selector.
    pub const KERNEL_DS: u16 = 0x10;
    /// User data segment selector with RPL 3 (placed before user code, as `sysret` expects).
    pub const USER_DS: u16 = 0x18 | 3;
    /// User code segment selector with RPL 3 (64-bit, DPL 3).
    pub const USER_CS: u16 = 0x20 | 3;
    /// Selector of the first TSS descriptor; vCPU `n` uses `TSS_FIRST + 16 * n`.
    pub const TSS_FIRST: u16 = 0x28;

    /// TSS selector of vCPU `id`.
    pub const fn tss_selector(id: u32) -> u16 {
        TSS_FIRST + 16 * id as u16
    }
}

/// Legacy I/O ports.
pub mod port {
    /// COM1, a 16550 UART (8 registers): the guest console.
    pub const COM1: u16 = 0x3f8;
    /// Debug-exit port: a 32-bit write ends the VM with that guest exit status.
    pub const DEBUG_EXIT: u16 = 0xf4;
}

/// Paravirtual MMIO registers. All are 64 bits wide and naturally aligned; each
/// access is one `mov`. The interrupt-controller and timer pages are *banked*:
/// every vCPU reaches its own instance at the same address.
pub mod mmio {
    use crate::layout::MMIO_BASE;

    /// Base of the banked virtual interrupt controller page.
    pub const VIC_BASE: u64 = MMIO_BASE;
    /// Write: end of interrupt for the highest-priority in-service vector.
    pub const VIC_EOI: u64 = 0x00;
    /// Write: send an inter-processor interrupt, value = `(target << 32) | vector`.
    pub const VIC_IPI: u64 = 0x08;
    /// Read: the vCPU id of the reader.
    pub const VIC_ID: u64 = 0x10;

    /// Base of the banked per-vCPU timer page.
    pub const TIMER_BASE: u64 = MMIO_BASE + 0x1000;
    /// Write: one-shot rearm, "interrupt me no earlier than N ns from now"; 0 behaves as trigger.
    pub const TIMER_REARM_NS: u64 = 0x00;
    /// Write (any value): interrupt as soon as possible; replaces a pending deadline.
    pub const TIMER_TRIGGER: u64 = 0x08;
    /// Write (any value): cancel the pending deadline.
    pub const TIMER_CANCEL: u64 = 0x10;
    /// Read: the device time in ticks (nanoseconds since the VM was created).
    pub const TIMER_NOW: u64 = 0x18;
    /// Read: the tick frequency of [`TIMER_NOW`] in Hz.
    pub const TIMER_FREQ_HZ: u64 = 0x20;
    /// Read: the pending deadline in device ticks, or `u64::MAX` when none.
    pub const TIMER_DEADLINE: u64 = 0x28;
    /// Read: how many times the VM was resumed with re-initialisation. Each such
    /// resume also raises [`crate::Vector::TimerResume`] on every vCPU.
    pub const TIMER_RESUMES: u64 = 0x30;

    /// Base of the control page (not banked).
    pub const CTL_BASE: u64 = MMIO_BASE + 0x2000;
    /// Write: guest physical address of a [`crate::FaultReport`]; ends the VM with a fault.
    pub const CTL_FAULT: u64 = 0x00;
    /// Write: guest physical address of a [`crate::PanicReport`]; ends the VM with a guest panic.
    pub const CTL_PANIC: u64 = 0x08;
    /// Write: lightweight PET self-sample request (PET-L-2), value = the id of
    /// the thread the vCPU has just switched on, whose
    /// [`crate::PetPage::sampled`] generation differs from
    /// [`crate::PetPage::generation`]. The VMM samples the vCPU before it
    /// re-enters the guest, with the PET action.
    pub const CTL_PET_SELF_SAMPLE: u64 = 0x10;

    /// Frequency of the device clock: it counts nanoseconds.
    pub const TIMER_HZ: u64 = 1_000_000_000;
    /// Largest rearm the device takes in one step; larger values are clamped (and counted).
    pub const TIMER_MAX_NS: u64 = u32::MAX as u64;
}

/// Interrupt vectors. A higher vector has a higher priority (priority class = vector >> 4).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vector {
    /// The per-vCPU timer.
    Timer = 0xf0,
    /// The timer device says the clock jumped (the VM was paused and resumed
    /// with re-initialisation): re-run `clockintr_cpu_init`.
    TimerResume = 0xf8,
    /// Inter-processor interrupt.
    Ipi = 0xe0,
    /// Interrupts the VMM's kick stress test sends.
    Stress = 0x80,
}

/// Exception vectors used by name.
pub mod exception {
    /// Breakpoint: from CPL3 this is the system-call door (see the guest's syscall module).
    pub const BREAKPOINT: u8 = 3;
    /// Double fault.
    pub const DOUBLE_FAULT: u8 = 8;
    /// General protection.
    pub const GENERAL_PROTECTION: u8 = 13;
    /// Page fault.
    pub const PAGE_FAULT: u8 = 14;
    /// The name of an architectural exception vector.
    pub const fn name(vector: u64) -> &'static str {
        match vector {
            0 => "#DE divide error",
            1 => "#DB debug",
            2 => "NMI",
            3 => "#BP breakpoint",
            4 => "#OF overflow",
            5 => "#BR bound range",
            6 => "#UD invalid opcode",
            7 => "#NM device not available",
            8 => "#DF double fault",
            10 => "#TS invalid TSS",
            11 => "#NP segment not present",
            12 => "#SS stack fault",
            13 => "#GP general protection",
            14 => "#PF page fault",
            16 => "#MF x87 floating point",
            17 => "#AC alignment check",
            18 => "#MC machine check",
            19 => "#XM SIMD floating point",
            20 => "#VE virtualization",
            21 => "#CP control protection",
            22..=31 | 9 | 15 => "reserved exception",
            _ => "unexpected interrupt",
        }
    }
}

/// Guest exit statuses (written to [`port::DEBUG_EXIT`]) and the VMM's process exit codes.
pub mod exit {
    /// The guest finished its workload.
    pub const GUEST_OK: u32 = 0;
    /// The guest's workload reported a failed check.
    pub const GUEST_CHECK_FAILED: u32 = 1;
    /// Process exit code: success.
    pub const VMM_OK: i32 = 0;
    /// Process exit code: the guest exited with a non-zero status.
    pub const VMM_GUEST_FAILED: i32 = 1;
    /// Process exit code: invalid command line or configuration.
    pub const VMM_BAD_INPUT: i32 = 2;
    /// Process exit code: the guest faulted or panicked.
    pub const VMM_GUEST_FAULT: i32 = 3;
    /// Process exit code: the host-side `--timeout` ended the VM.
    pub const VMM_TIMEOUT: i32 = 4;
    /// Process exit code: ended by SIGINT or SIGTERM.
    pub const VMM_SIGNALLED: i32 = 5;
    /// Process exit code: a host-side error (KVM, memory, threads).
    pub const VMM_HOST_ERROR: i32 = 6;
    /// Process exit code: a thread made a system call its seccomp filter
    /// forbids (the VMM's `seccomp` module; the message names both).
    pub const VMM_SECCOMP: i32 = 7;
}

/// The workload the guest runs, chosen by the VMM in [`BootInfo::workload`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// CPL3 threads that compute, yield and sleep on every vCPU until the duration elapses.
    Demo = 0,
    /// vCPU 0 and every other vCPU exchange IPIs for `workload_arg` round trips each.
    PingPong = 1,
    /// A CPL3 thread dereferences an unmapped address.
    Fault = 2,
    /// vCPU 0 spins at CPL0 with interrupts disabled, forever.
    SpinCpl0 = 3,
    /// Exit at once after boot (measures boot time).
    ExitNow = 4,
    /// The demo threads, while the VMM sends stress interrupts; the guest counts them.
    KickStress = 5,
    /// Threads with a designed profile: fixed call chains splitting their time
    /// 60/30/10 across three leaf functions, a thread that mostly sleeps, and a
    /// thread that blocks on another.
    Profile = 6,
    /// `metronome bench`: no thread at all, so every vCPU waits in HLT between
    /// its clock interrupts (the halted-vCPU timer figures).
    BenchIdle = 7,
    /// `metronome bench`: one CPL3 compute thread per vCPU that adds its
    /// operations to [`BenchPage::ops`] as it goes (the busy-vCPU timer
    /// figures and the sampling overhead).
    BenchCompute = 8,
    /// The hostile guest: vCPU 0 runs the demo threads (the well-behaved
    /// vCPU); every other vCPU runs one CPL3 chaos thread that misuses
    /// every device register, unmapped MMIO, IPIs, the timer, interrupt
    /// masking, its frame pointers and the thread table, driven by a
    /// pseudo-random generator seeded from [`BootInfo::stat_seed`] and the
    /// vCPU id (guest-kernel `workloads/chaos.rs`).
    Chaos = 9,
}

impl Workload {
    /// Decodes a raw workload number.
    pub const fn from_u32(raw: u32) -> Option<Self> {
        Some(match raw {
            0 => Self::Demo,
            1 => Self::PingPong,
            2 => Self::Fault,
            3 => Self::SpinCpl0,
            4 => Self::ExitNow,
            5 => Self::KickStress,
            6 => Self::Profile,
            7 => Self::BenchIdle,
            8 => Self::BenchCompute,
            9 => Self::Chaos,
            _ => return None,
        })
    }
}

/// The boot-information block, written by the VMM at [`layout::BOOT_INFO`] before any vCPU runs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BootInfo {
    /// [`BOOT_MAGIC`].
    pub magic: u64,
    /// [`BOOT_VERSION`].
    pub version: u32,
    /// Number of vCPUs.
    pub vcpu_count: u32,
    /// Bytes of guest RAM, starting at guest physical 0.
    pub mem_bytes: u64,
    /// First free byte after the kernel image (page aligned).
    pub kernel_end: u64,
    /// Start of the guest heap.
    pub heap_base: u64,
    /// End of the guest heap (exclusive).
    pub heap_end: u64,
    /// Host TSC frequency in kHz (0 when unknown); informational.
    pub tsc_khz: u64,
    /// Workload time in ns of guest uptime, after which the guest exits 0; 0 = run until stopped.
    pub duration_ns: u64,
    /// The [`Workload`] to run.
    pub workload: u32,
    /// Test and feature flags ([`boot_flags`]).
    pub flags: u32,
    /// Workload parameter (ping-pong round trips).
    pub workload_arg: u64,
    /// hardclock frequency.
    pub hz: u32,
    /// statclock frequency.
    pub stathz: u32,
    /// profiling statclock frequency.
    pub profhz: u32,
    /// schedclock frequency (0 = no schedclock).
    pub schedhz: u32,
    /// clockintr_init flags.
    pub clock_flags: u32,
    /// Reserved, zero.
    pub reserved1: u32,
    /// Seed of the statclock pseudo-random generator.
    pub stat_seed: u64,
}

/// Bits of [`BootInfo::flags`].
pub mod boot_flags {
    /// A thread switches statclock profiling on for the middle third of the duration.
    pub const PROFILE_MIDDLE_THIRD: u32 = 1 << 0;
}

pub mod hist;

/// The clockintr statistics of one CPU (`struct clockintr_stat`). With the
/// `serde` feature it serializes with these field names (the VMM's summary).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
pub struct ClockintrStat {
    /// ns spent in dispatch.
    pub dispatched_ns: u64,
    /// Early dispatches.
    pub early: u64,
    /// ns of earliness.
    pub earliness_ns: u64,
    /// ns of lateness.
    pub lateness_ns: u64,
    /// Prompt dispatches.
    pub prompt: u64,
    /// Callbacks run.
    pub run: u64,
    /// Spurious dispatches.
    pub spurious: u64,
}

impl ClockintrStat {
    /// Field-wise sum, spurious included (as `sysctl_clockintr` in
    /// kern_clockintr.c 1.5 does); guest-written values saturate rather than
    /// overflow.
    pub fn add(&mut self, o: &Self) {
        self.dispatched_ns = self.dispatched_ns.saturating_add(o.dispatched_ns);
        self.early = self.early.saturating_add(o.early);
        self.earliness_ns = self.earliness_ns.saturating_add(o.earliness_ns);
        self.lateness_ns = self.lateness_ns.saturating_add(o.lateness_ns);
        self.prompt = self.prompt.saturating_add(o.prompt);
        self.run = self.run.saturating_add(o.run);
        self.spurious = self.spurious.saturating_add(o.spurious);
    }
}

/// Event kinds in [`PendingEvent::kind`].
pub mod event_kind {
    /// No event.
    pub const NONE: u64 = 0;
    /// clockintr_hardclock.
    pub const HARDCLOCK: u64 = 1;
    /// clockintr_statclock.
    pub const STATCLOCK: u64 = 2;
    /// clockintr_schedclock.
    pub const SCHEDCLOCK: u64 = 3;
}

/// One clockintr event as the guest publishes it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingEvent {
    /// [`event_kind`].
    pub kind: u64,
    /// Absolute expiration, ns of uptime.
    pub expiration: u64,
}

/// Number of statclock intervals the guest records verbatim per vCPU.
pub const STAT_INTERVALS: usize = 32;

/// Magic value at the start of a valid [`VcpuShared`] page ("VCPUSHRD").
pub const SHARED_MAGIC: u64 = 0x4452_4853_5550_4356;

/// Thread states as the guest reports them.
pub mod thread_state {
    /// Running on its vCPU.
    pub const RUNNING: u32 = 1;
    /// Runnable, waiting in a run queue.
    pub const RUNNABLE: u32 = 2;
    /// Sleeping or blocked.
    pub const WAITING: u32 = 4;
    /// Exited.
    pub const EXITED: u32 = 32;
    /// The vCPU's idle context.
    pub const IDLE: u32 = 64;
}

/// The per-vCPU shared page, at [`layout::PERCPU_SHARED`] of the vCPU's region. The guest
/// kernel keeps it current (thread identity at every context switch, counters as they
/// change); the VMM only reads it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VcpuShared {
    /// [`SHARED_MAGIC`] once the vCPU has initialised the page.
    pub magic: u64,
    /// vCPU id.
    pub vcpu_id: u32,
    /// Thread id of the current thread (0 = idle).
    pub current_tid: u32,
    /// State of the current thread ([`thread_state`]).
    pub current_state: u32,
    /// Reserved, zero.
    pub reserved0: u32,
    /// Name of the current thread, NUL padded.
    pub current_name: [u8; 16],
    /// Context switches done on this vCPU.
    pub context_switches: u64,
    /// Distinct user threads that have run on this vCPU.
    pub user_threads_run: u64,
    /// Timer interrupts taken.
    pub timer_interrupts: u64,
    /// Scheduler ticks (hardclock calls).
    pub ticks: u64,
    /// IPIs taken by the guest.
    pub ipis_received: u64,
    /// Stress-test interrupts taken by the guest.
    pub stress_received: u64,
    /// System calls taken.
    pub syscalls: u64,
    /// Times the idle context halted.
    pub idle_halts: u64,
    /// Ping-pong round trips completed (vCPU 0 counts replies; others count pings).
    pub pingpong: u64,
    /// hardclock() calls.
    pub hardclock: u64,
    /// statclock() calls.
    pub statclock: u64,
    /// schedclock() calls.
    pub schedclock: u64,
    /// profclock() calls (statclock calls while profiling is on).
    pub profclock: u64,
    /// clockintr statistics of this vCPU.
    pub clockintr: ClockintrStat,
    /// Generation of `clockintr` and `pending`: 0 while the guest writes them.
    pub clockintr_gen: u64,
    /// clockintr_cpu_init calls.
    pub cpu_inits: u64,
    /// Most hardclock() calls made by one dispatch.
    pub max_hardclock_batch: u64,
    /// hardclock() calls of the first prompt dispatch after the last re-initialisation.
    pub resume_first_batch: u64,
    /// hardclock() calls of the first prompt dispatch after boot.
    pub first_dispatch_hardclocks: u64,
    /// Uptime at the end of the last dispatch.
    pub last_dispatch_ns: u64,
    /// Number of valid entries in `pending`.
    pub pending_count: u64,
    /// The pending events in queue order, then established idle ones (`kind` | 0x100).
    pub pending: [PendingEvent; 3],
    /// The running event kind (0 = none).
    pub running: u64,
    /// Statclock ticks charged to user, system, interrupt and idle time.
    pub cp_time: [u64; 4],
    /// Randomized statclock intervals: count, sum, min, max.
    pub stat_interval_count: u64,
    /// Sum of intervals, ns.
    pub stat_interval_sum: u64,
    /// Smallest interval, ns.
    pub stat_interval_min: u64,
    /// Largest interval, ns.
    pub stat_interval_max: u64,
    /// The first [`STAT_INTERVALS`] intervals drawn on this vCPU.
    pub stat_intervals: [u64; STAT_INTERVALS],
    /// Guest-measured timer lateness: uptime at the timer interrupt's entry (the
    /// entry stub reads the clock first) minus the deadline it programmed.
    pub lateness_hist: hist::Counts,
    /// Largest guest-measured lateness.
    pub lateness_max: u64,
    /// The [`mmio::TIMER_RESUMES`] value the guest read in its last
    /// [`Vector::TimerResume`] handler (0 before the first such interrupt).
    pub timer_resumes_seen: u64,
    /// Uptime at the start of the last dispatch: that dispatch ran every event
    /// due by then (`last_dispatch_ns` is its end).
    pub last_dispatch_start_ns: u64,
    /// Uptime at the last `clockintr_cpu_init` (a secondary vCPU's first
    /// hardclock is the first grid point after it, CI-CPU-3).
    pub last_cpu_init_ns: u64,
    /// Sum of the guest-measured lateness values in `lateness_hist`, ns
    /// (saturating): the histogram's sum for `GET /metrics`.
    pub lateness_sum: u64,
    /// Uptime at the start of this vCPU's first clock dispatch (0 before it):
    /// `metronome bench`'s boot figure.
    pub first_dispatch_ns: u64,
}

/// What the guest publishes about each thread, at [`layout::THREAD_TABLE`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadInfo {
    /// Thread id (0 = unused slot).
    pub tid: u64,
    /// Owning vCPU.
    pub vcpu: u64,
    /// [`thread_state`].
    pub state: u64,
    /// Name, NUL padded.
    pub name: [u8; 16],
    /// Statclock ticks in user mode.
    pub user_ticks: u64,
    /// Statclock ticks in the kernel on its behalf.
    pub sys_ticks: u64,
    /// Statclock ticks in interrupt context while it was current.
    pub intr_ticks: u64,
    /// Estimated CPU use, decayed by schedclock.
    pub estcpu: u64,
    /// Priority recomputed by schedclock.
    pub priority: u64,
    /// Context switches onto this thread.
    pub switches: u64,
    /// RIP of the thread's saved user context while it is not running (for
    /// PET, which samples every thread: AMB-9). Valid once it has run or been
    /// created; a running thread's registers are its vCPU's.
    pub saved_rip: u64,
    /// RBP (frame pointer) of the saved user context.
    pub saved_rbp: u64,
    /// The vector through which the thread last entered the kernel before it
    /// was switched out: [`exception::BREAKPOINT`] for the `int3` system-call
    /// door (then `saved_rip` is where the call returns to), the timer's for a
    /// preemption (then `saved_rip` is the next instruction to run); 0 for a
    /// thread that has not run.
    pub saved_vector: u64,
    /// Lowest address of the thread's user stack.
    pub stack_lo: u64,
    /// One past the highest address of the thread's user stack.
    pub stack_hi: u64,
}

/// Bytes of one [`ThreadInfo`] slot: the table of [`MAX_THREADS`] slots must
/// fit between [`layout::THREAD_TABLE`] and [`layout::PML4`].
const _: () = {
    assert!(core::mem::size_of::<ThreadInfo>() == 16 * 8);
    assert!(
        layout::THREAD_TABLE + (MAX_THREADS * core::mem::size_of::<ThreadInfo>()) as u64
            <= layout::PML4
    );
};

/// Lightweight PET's page at [`layout::PET_PAGE`] (spec PET-L-1, PET-L-2,
/// KT-SM-6). Only the VMM writes it, with aligned 64-bit stores; the guest's
/// scheduler reads it when it switches a thread on: if `generation` is not 0
/// and differs from `sampled[slot]`, it writes the thread id to
/// [`mmio::CTL_PET_SELF_SAMPLE`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PetPage {
    /// The lightweight PET generation (bumped by the leader of each PET timer
    /// fire) while lightweight PET is active; 0 otherwise.
    pub generation: u64,
    /// Reserved, zero.
    pub reserved: u64,
    /// Per thread-table slot (thread id - 1): the generation at which the
    /// VMM last sampled the thread (any thread sample, KT-SM-6).
    pub sampled: [u64; MAX_THREADS],
}

impl Default for PetPage {
    fn default() -> Self {
        Self {
            generation: 0,
            reserved: 0,
            sampled: [0; MAX_THREADS],
        }
    }
}

/// Operations one bench compute thread counts per [`BenchPage::ops`] update.
pub const BENCH_OPS_PER_UPDATE: u64 = 100_000;

/// The bench page at [`layout::BENCH_PAGE`]. Only the
/// [`Workload::BenchCompute`] threads write it, each its own vCPU's slot with
/// aligned 64-bit stores from CPL3 (no system call, no exit); the VMM reads
/// it at any time without stopping the guest.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BenchPage {
    /// Per vCPU: compute-loop operations done so far (a multiple of
    /// [`BENCH_OPS_PER_UPDATE`]).
    pub ops: [u64; MAX_VCPUS as usize],
}

impl Default for BenchPage {
    fn default() -> Self {
        Self {
            ops: [0; MAX_VCPUS as usize],
        }
    }
}

mod report;
pub use report::{report_key, FaultReport, GuestReport, PanicReport, MAX_REPORTS};

// The layout is checked when this crate compiles, for both the guest and the VMM.
const _: () = {
    assert!(layout::PT0 + 0x1000 <= layout::KERNEL_BASE);
    assert!(layout::TSS + layout::TSS_STRIDE * MAX_VCPUS as u64 <= layout::GUEST_REPORT);
    assert!(core::mem::size_of::<GuestReport>() as u64 <= layout::PML4 - layout::GUEST_REPORT);
    assert!(layout::KERNEL_LIMIT <= layout::PERCPU_BASE);
    assert!(layout::PT0 + 0x1000 <= layout::PET_PAGE);
    assert!(layout::PET_PAGE + core::mem::size_of::<PetPage>() as u64 <= layout::PET_PAGE + 0x1000);
    assert!(layout::PET_PAGE + 0x1000 <= layout::BENCH_PAGE);
    assert!(core::mem::size_of::<BenchPage>() <= 0x1000);
    assert!(layout::BENCH_PAGE + 0x1000 <= layout::KERNEL_BASE);
    assert!(layout::percpu_region(MAX_VCPUS) <= layout::HEAP_BASE);
    assert!(layout::MAX_MEM_MIB << 20 <= layout::MMIO_BASE);
    assert!(
        layout::PERCPU_SHARED + core::mem::size_of::<VcpuShared>() as u64 <= layout::PERCPU_PRIVATE
    );
    assert!(
        layout::THREAD_TABLE + (core::mem::size_of::<ThreadInfo>() * MAX_THREADS) as u64
            <= layout::PML4
    );
    assert!(gdt::tss_selector(MAX_VCPUS) as u64 <= 0x1000);
    // The event ring fits in the rest of the per-vCPU region.
    assert!(layout::PERCPU_PRIVATE < layout::PERCPU_EVENTS);
    assert!(
        layout::PERCPU_EVENTS + core::mem::size_of::<events::EventRing>() as u64
            <= layout::PERCPU_STRIDE
    );
    // VcpuShared is integer-only and padding-free (the VMM copies it as plain
    // data): every field is a u64, a u64 array, a pair of u32 or 16 bytes, so
    // the last field ends the struct exactly.
    assert!(
        core::mem::offset_of!(VcpuShared, timer_resumes_seen)
            == core::mem::offset_of!(VcpuShared, lateness_max) + 8
    );
    assert!(
        core::mem::offset_of!(VcpuShared, last_dispatch_start_ns)
            == core::mem::offset_of!(VcpuShared, timer_resumes_seen) + 8
    );
    assert!(
        core::mem::offset_of!(VcpuShared, last_cpu_init_ns)
            == core::mem::offset_of!(VcpuShared, last_dispatch_start_ns) + 8
    );
    assert!(
        core::mem::offset_of!(VcpuShared, lateness_sum)
            == core::mem::offset_of!(VcpuShared, last_cpu_init_ns) + 8
    );
    assert!(
        core::mem::offset_of!(VcpuShared, first_dispatch_ns)
            == core::mem::offset_of!(VcpuShared, lateness_sum) + 8
    );
    assert!(
        core::mem::offset_of!(VcpuShared, first_dispatch_ns) + 8
            == core::mem::size_of::<VcpuShared>()
    );
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_workload_round_trip() {
        for raw in 0..10 {
            if let Some(w) = Workload::from_u32(raw) {
                assert_eq!(w as u32, raw);
            }
        }
        assert_eq!(Workload::from_u32(99), None);
    }
}
