//! The VMM's control page (`metronome_abi::mmio::CTL_*`: fault and panic
//! reports, each of which ends the VM, and lightweight PET's self-sample
//! request) and the debug-exit port (`metronome_abi::port::DEBUG_EXIT`: a
//! normal guest exit with a status).
//!
//! Reports are written to per-vCPU static records, so that vCPUs failing at
//! the same time cannot race; the VMM reads the record at the address the
//! guest writes to the register.

use core::mem::MaybeUninit;

use metronome_abi::mmio::{CTL_BASE, CTL_FAULT, CTL_PANIC, CTL_PET_SELF_SAMPLE};
use metronome_abi::{layout, port, FaultReport, PanicReport, PetPage, MAX_VCPUS};

use crate::arch;
use crate::drivers::vic;
use crate::text::Buf;

/// Per-vCPU fault records, written once each, right before the vCPU stops.
static mut FAULTS: [MaybeUninit<FaultReport>; MAX_VCPUS as usize] =
    [const { MaybeUninit::uninit() }; MAX_VCPUS as usize];
/// Per-vCPU panic records and their message text, likewise.
static mut PANICS: [MaybeUninit<PanicReport>; MAX_VCPUS as usize] =
    [const { MaybeUninit::uninit() }; MAX_VCPUS as usize];
static mut PANIC_TEXT: [Buf<256>; MAX_VCPUS as usize] = [const { Buf::new() }; MAX_VCPUS as usize];

/// Reports a fatal exception to the VMM, which ends the VM, and stops this vCPU.
pub fn report_fault(report: FaultReport) -> ! {
    let id = (report.vcpu as usize).min(MAX_VCPUS as usize - 1);
    // SAFETY: each vCPU only writes its own slot, once, right before stopping.
    let slot: &FaultReport = unsafe { (*core::ptr::addr_of_mut!(FAULTS[id])).write(report) };
    // SAFETY: CTL_FAULT takes the address of a FaultReport; the VMM ends the VM.
    unsafe { arch::mmio_write(CTL_BASE + CTL_FAULT, slot as *const FaultReport as u64) };
    // SAFETY: nothing more to do on this vCPU.
    unsafe { arch::halt_forever() }
}

/// Reports `message` (and where) to the VMM as a kernel panic, which ends the
/// VM, and stops this vCPU.
///
/// The message is copied, never formatted: `core`'s number formatting uses
/// SSE, which CPL0 code cannot run on kvm_pvm.
pub fn report_panic(message: &str, location: Option<(&str, u32)>) -> ! {
    arch::cli();
    let id = (vic::vcpu_id() as usize).min(MAX_VCPUS as usize - 1);
    // SAFETY: each vCPU only uses its own slots, once, right before stopping.
    let (report, text) = unsafe {
        (
            &mut *core::ptr::addr_of_mut!(PANICS[id]),
            &mut *core::ptr::addr_of_mut!(PANIC_TEXT[id]),
        )
    };
    text.push(message.as_bytes());
    if let Some((file, line)) = location {
        text.push(b" at ")
            .push(file.as_bytes())
            .push(b":")
            .num(u64::from(line));
    }
    let report: &PanicReport = report.write(PanicReport {
        message_addr: text.as_bytes().as_ptr() as u64,
        message_len: text.as_bytes().len() as u64,
        vcpu: id as u64,
    });
    // SAFETY: CTL_PANIC takes the address of a PanicReport; the VMM ends the VM.
    unsafe { arch::mmio_write(CTL_BASE + CTL_PANIC, report as *const PanicReport as u64) };
    // SAFETY: nothing more to do on this vCPU.
    unsafe { arch::halt_forever() }
}

/// Asks the VMM to end the VM with guest exit status `code`. The VMM stops
/// the vCPUs asynchronously: this returns, and the caller keeps the vCPU idle.
pub fn debug_exit(code: u32) {
    // SAFETY: DEBUG_EXIT is the VMM's exit port; writing it has no other effect.
    unsafe { arch::outl(port::DEBUG_EXIT, code) };
}

/// Lightweight PET (PET-L-2), called when thread `tid` (in table slot `slot`)
/// has just been switched on: if the VMM publishes a generation and the
/// thread was last sampled at another one, ask the VMM for a sample of this
/// vCPU, which now holds the thread's context (one exit). The VMM records
/// the generation in the page when it samples, so a thread asks once per
/// generation. Two loads and a compare otherwise: this runs at CPL0 on every
/// context switch.
#[inline(always)]
pub fn pet_on_cpu(slot: usize, tid: u32) {
    let page = layout::PET_PAGE as *const PetPage;
    // SAFETY: the PET page is identity mapped and only the VMM writes it, with
    // aligned 64-bit stores; these are plain aligned loads of its fields, and
    // `slot` is a thread-table slot, below MAX_THREADS (an index beyond it
    // would panic, not read out of bounds).
    let (generation, sampled) = unsafe {
        (
            core::ptr::read_volatile(core::ptr::addr_of!((*page).generation)),
            core::ptr::read_volatile(core::ptr::addr_of!((*page).sampled[slot])),
        )
    };
    if generation != 0 && generation != sampled {
        // SAFETY: CTL_PET_SELF_SAMPLE takes a thread id; the VMM samples this
        // vCPU before it runs on.
        unsafe { arch::mmio_write(CTL_BASE + CTL_PET_SELF_SAMPLE, u64::from(tid)) };
    }
}
