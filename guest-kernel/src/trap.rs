//! Interrupt, exception and system-call dispatch.
//!
//! Every vector enters `trap` with interrupts disabled on one of the vCPU's IST
//! stacks (see `arch`). Interrupts from the VMM's virtual interrupt controller
//! are acknowledged with an EOI write first, then handled. An exception other
//! than the system-call door is fatal: the kernel reports vector, error code,
//! RIP, CR2 and vCPU to the VMM, which ends the VM with that report.

use metronome_abi::mmio::{CTL_BASE, CTL_FAULT, CTL_PANIC, VIC_BASE, VIC_EOI};
use metronome_abi::{exception, FaultReport, PanicReport, Vector};

use crate::arch::{self, Frame};
use crate::{clock, percpu, sched, syscall, workloads};

const TIMER: u64 = Vector::Timer as u64;
const TIMER_RESUME: u64 = Vector::TimerResume as u64;
const IPI: u64 = Vector::Ipi as u64;
const STRESS: u64 = Vector::Stress as u64;

/// Signals end of interrupt to this vCPU's virtual interrupt controller.
pub fn eoi() {
    // SAFETY: VIC_EOI is the EOI register of this vCPU's interrupt-controller bank.
    unsafe { arch::mmio_write(VIC_BASE + VIC_EOI, 0) };
}

/// The common handler, called from `isr_common` with the saved frame.
pub extern "C" fn trap(frame: &mut Frame) {
    let id = percpu::id_of_frame(frame);
    match frame.vector {
        v if v == u64::from(exception::BREAKPOINT) && frame.cpl() == 3 => {
            syscall::dispatch(id, frame)
        }
        0..=31 => report_fault(id, frame),
        TIMER => {
            eoi();
            clock::interrupt(id, frame);
        }
        TIMER_RESUME => {
            eoi();
            clock::resume(id);
        }
        IPI => {
            eoi();
            percpu::shared(id).ipis_received += 1;
            workloads::on_ipi(id);
        }
        STRESS => {
            percpu::shared(id).stress_received += 1;
            eoi();
        }
        _ => {
            // Not a vector we use: acknowledge it and carry on (counted by the VMM).
            eoi();
        }
    }
}

/// Per-vCPU fault records, so that a fault on one vCPU cannot race another's.
static mut FAULTS: [FaultReport; metronome_abi::MAX_VCPUS as usize] = [FaultReport {
    vector: 0,
    error_code: 0,
    rip: 0,
    cs: 0,
    rflags: 0,
    rsp: 0,
    cr2: 0,
    vcpu: 0,
    tid: 0,
};
    metronome_abi::MAX_VCPUS as usize];

fn report_fault(id: u32, frame: &Frame) -> ! {
    // SAFETY: each vCPU only writes its own slot, once, right before stopping.
    let report = unsafe { &mut *core::ptr::addr_of_mut!(FAULTS[id as usize]) };
    *report = FaultReport {
        vector: frame.vector,
        error_code: frame.error_code,
        rip: frame.rip,
        cs: frame.cs,
        rflags: frame.rflags,
        rsp: frame.rsp,
        cr2: arch::read_cr2(),
        vcpu: u64::from(id),
        tid: sched::current_tid(id),
    };
    // SAFETY: CTL_FAULT takes the address of a FaultReport; the VMM ends the VM.
    unsafe { arch::mmio_write(CTL_BASE + CTL_FAULT, report as *const FaultReport as u64) };
    // SAFETY: nothing more to do on this vCPU.
    unsafe { arch::halt_forever() }
}

static mut PANICS: [PanicReport; metronome_abi::MAX_VCPUS as usize] = [PanicReport {
    message_addr: 0,
    message_len: 0,
    vcpu: 0,
};
    metronome_abi::MAX_VCPUS as usize];
static mut PANIC_TEXT: [crate::console::Buf<256>; metronome_abi::MAX_VCPUS as usize] =
    [const { crate::console::Buf::new() }; metronome_abi::MAX_VCPUS as usize];

/// Reports a kernel panic to the VMM and stops this vCPU.
///
/// Messages are never formatted here: `core`'s number formatting uses SSE,
/// which CPL0 code cannot run on kvm_pvm. A literal message is copied; any
/// other (a compiler-inserted bounds check, say) is replaced by a fixed text,
/// and the location tells where it happened.
pub fn report_panic(info: &core::panic::PanicInfo) -> ! {
    let message = info
        .message()
        .as_str()
        .unwrap_or("panic with a formatted message (not formatted at CPL0)");
    let location = info.location().map(|l| (l.file(), l.line()));
    kernel_panic(message, location)
}

/// Reports `message` (and where) to the VMM as a kernel panic and stops this vCPU.
pub fn kernel_panic(message: &str, location: Option<(&str, u32)>) -> ! {
    arch::cli();
    // SAFETY: VIC_ID is a read-only register returning the reader's vCPU id.
    let id = unsafe { arch::mmio_read(VIC_BASE + metronome_abi::mmio::VIC_ID) } as usize;
    let id = id.min(metronome_abi::MAX_VCPUS as usize - 1);
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
    *report = PanicReport {
        message_addr: text.as_bytes().as_ptr() as u64,
        message_len: text.as_bytes().len() as u64,
        vcpu: id as u64,
    };
    // SAFETY: CTL_PANIC takes the address of a PanicReport; the VMM ends the VM.
    unsafe { arch::mmio_write(CTL_BASE + CTL_PANIC, report as *const PanicReport as u64) };
    // SAFETY: nothing more to do on this vCPU.
    unsafe { arch::halt_forever() }
}
