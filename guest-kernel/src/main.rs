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

#![no_std]
#![no_main]

mod arch;
mod clock;
mod console;
mod mem;
mod percpu;
mod sched;
mod syscall;
mod trap;
mod workloads;

use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use metronome_abi::{BootInfo, BOOT_MAGIC, BOOT_VERSION};

/// Set by the bootstrap vCPU once the IDT is built and the boot block checked.
static BOOT_READY: AtomicBool = AtomicBool::new(false);
/// vCPUs that finished their own initialisation.
pub static ONLINE: AtomicU32 = AtomicU32::new(0);

/// The boot-information block (written by the VMM before any vCPU ran).
pub fn boot_info() -> &'static BootInfo {
    // SAFETY: the VMM writes a BootInfo at this fixed, identity-mapped address
    // before the first instruction and never changes it afterwards.
    unsafe { &*(metronome_abi::layout::BOOT_INFO as *const BootInfo) }
}

/// Kernel entry, called by `_start` on every vCPU with its id.
#[no_mangle]
extern "C" fn kmain(vcpu_id: u64, _boot: u64) -> ! {
    let id = vcpu_id as u32;
    if id == 0 {
        let boot = boot_info();
        if boot.magic != BOOT_MAGIC || boot.version != BOOT_VERSION {
            panic!("bad boot-information block");
        }
        // SAFETY: only the bootstrap vCPU runs this, before BOOT_READY releases the others.
        unsafe { arch::build_idt() };
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
    ONLINE.fetch_add(1, Ordering::AcqRel);
    workloads::start(id);
    clock::start(id);
    sched::enter_idle(id)
}

/// The precompiled `core` for the host target is built with unwinding and
/// references this symbol; with `panic = "abort"` it is never called.
#[no_mangle]
extern "C" fn rust_eh_personality() {}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    trap::report_panic(info)
}
