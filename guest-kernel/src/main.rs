//! The Metronome guest kernel.
//!
//! A small preemptive kernel that runs on every vCPU the VMM starts. Its CPL0
//! paths are kept short on purpose: on the KVM this project is developed on
//! (kvm_pvm), guest CPL0 code is interpreted at about two million instructions a
//! second, while CPL3 code runs natively. Workloads therefore run as CPL3
//! threads; the kernel only schedules them, takes interrupts and system calls,
//! and reports.
//!
//! Bring-up order (`kmain`): the bootstrap vCPU checks the boot-information
//! block and builds the IDT; every vCPU loads the IDT, initialises its per-vCPU
//! data and shared page, creates its workload threads, arms its timer and
//! drops into its idle context, from which the first timer tick schedules.
//!
//! # Module dependencies
//!
//! Dependencies point one way, from the top of this list down; a module uses
//! only modules listed below it (modules on one line do not use each other):
//!
//! ```text
//! main       wiring: _start, kmain, the panic handler
//! trap       interrupt entry path and dispatch: the only caller of percpu::with
//!            at run time; drives clock, sched, syscall and the workload hooks
//! workloads  built-in workloads: CPL3 thread bodies and kernel hooks
//! syscall    the system-call door: kernel dispatch and user-side wrappers
//! clock      clockintr on the timer: dispatch callbacks, statistics, profiling
//! sched      threads, run queues, context switches (no workload or clock knowledge)
//! events     the trace's event ring: dispatches and switches for the VMM
//! percpu     per-vCPU data, lent by percpu::with
//! drivers    vic, timer, console, control: one module per emulated device
//! runq       the run-queue ring
//! arch       CPU primitives, the IDT, the frame type
//! boot, text, mem   boot block, text buffer, memcpy and friends
//! ```

#![no_std]
#![no_main]

mod arch;
mod boot;
mod clock;
mod drivers;
mod events;
mod mem;
mod percpu;
mod runq;
mod sched;
mod syscall;
mod text;
mod trap;
mod workloads;

use core::arch::global_asm;
use core::sync::atomic::{AtomicBool, Ordering};

use metronome_abi::{BOOT_MAGIC, BOOT_VERSION};

/// Set by the bootstrap vCPU once the IDT is built and the boot block checked.
static BOOT_READY: AtomicBool = AtomicBool::new(false);

// The boot entry: clear the frame-pointer chain and call
// `kmain(vcpu_id, boot_info)` with the registers the VMM set.
global_asm!(
    r#"
    .section .text.boot, "ax"
    .global _start
    .type _start, @function
_start:
    xor ebp, ebp
    call {kmain}
    ud2
    .size _start, . - _start
    .text
    "#,
    kmain = sym kmain,
);

/// Kernel entry, called by `_start` on every vCPU with its id.
#[no_mangle]
extern "C" fn kmain(vcpu_id: u64, _boot: u64) -> ! {
    let id = vcpu_id as u32;
    if id == 0 {
        let boot = boot::info();
        if boot.magic != BOOT_MAGIC || boot.version != BOOT_VERSION {
            panic!("bad boot-information block");
        }
        // SAFETY: only the bootstrap vCPU runs this, before BOOT_READY releases
        // the others; the table holds the interrupt entry stubs.
        unsafe { arch::build_idt(trap::entry_stubs()) };
        clock::init_global();
        BOOT_READY.store(true, Ordering::Release);
    } else {
        while !BOOT_READY.load(Ordering::Acquire) {
            arch::pause();
        }
    }
    // SAFETY: BOOT_READY guarantees the IDT is complete.
    unsafe { arch::load_idt() };
    percpu::init(id);
    percpu::with(id, |cpu, shared| {
        workloads::start(cpu);
        clock::start(cpu, shared);
    });
    sched::enter_idle(id)
}

/// The precompiled `core` for the host target is built with unwinding and
/// references this symbol; with `panic = "abort"` it is never called.
#[no_mangle]
extern "C" fn rust_eh_personality() {}

/// Reports the panic to the VMM and stops this vCPU.
///
/// Messages are never formatted here: `core`'s number formatting uses SSE,
/// which CPL0 code cannot run on kvm_pvm. A literal message is copied; any
/// other (a compiler-inserted bounds check, say) is replaced by a fixed text,
/// and the location tells where it happened.
#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let message = info
        .message()
        .as_str()
        .unwrap_or("panic with a formatted message (not formatted at CPL0)");
    let location = info.location().map(|l| (l.file(), l.line()));
    drivers::control::report_panic(message, location)
}
