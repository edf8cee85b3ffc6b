//! The interrupt entry path and dispatch of interrupts, exceptions and system
//! calls.
//!
//! Every vector enters [`trap`] with interrupts disabled on one of the vCPU's
//! IST stacks (see `arch`), through its stub below and `isr_common`, which
//! save a `metronome_abi::InterruptFrame`. Interrupts from the VMM's virtual
//! interrupt controller are acknowledged with an EOI write first, then handled.
//! An exception other than the system-call door is fatal: the kernel reports
//! vector, error code, RIP, CR2 and vCPU to the VMM, which ends the VM with
//! that report.
//!
//! This is the top of the kernel's call graph: each arm borrows the vCPU's data
//! once (`percpu::with`) and drives the clock, the scheduler, system calls and
//! the workload hooks with it.

use core::arch::global_asm;

use metronome_abi::mmio::{TIMER_BASE, TIMER_NOW};
use metronome_abi::{exception, FaultReport, Vector};

use crate::arch::{self, Frame};
use crate::drivers::{control, vic};
use crate::{clock, percpu, sched, syscall, workloads};

const TIMER: u64 = Vector::Timer as u64;
const TIMER_RESUME: u64 = Vector::TimerResume as u64;
const IPI: u64 = Vector::Ipi as u64;
const STRESS: u64 = Vector::Stress as u64;

// The interrupt entry path.
//
// `isr_N` (one per vector): push a zero error code unless the CPU pushed one,
// push the vector, jump to `isr_common`. `ISR_TABLE`: their addresses, for the IDT.
// Every label here is a typed and sized function symbol, so that the VMM's
// profiles name a sample taken in the entry path.
//
// `isr_common`: save the general-purpose registers, call `trap(frame)`, restore
// (possibly another context's) registers, drop vector and error code, `iretq`.
// The pushes build exactly an `InterruptFrame` (22 words, checked in the ABI);
// the IST tops are 16-byte aligned and 22 is even, so `rsp` is 16-byte aligned
// at the call.
//
// `isr_240`, the timer vector's stub, reads the clock before anything else:
// its second instruction loads `TIMER_NOW` (the first frees `rax`), and the
// reading takes the error-code slot, which the timer vector has no use for.
// Every instruction at CPL0 is interpreted on some hosts (about 0.5 us each),
// so the guest's lateness (`clock::interrupt`) measures the delivery, not the
// entry path, the EOI exit and the dispatcher's prologue after it. The stub
// runs on IST1 like every other (the precompiled `core` uses the red zone, so
// no interrupt may push onto the interrupted stack), and `xchg` restores
// `rax` before `isr_common` saves it. `movabs` because the MMIO window lies
// above 2 GiB, out of reach of a 32-bit absolute or RIP-relative address.
global_asm!(
    r#"
    .text
    .global isr_common
    .type isr_common, @function
isr_common:
    push rax
    push rbx
    push rcx
    push rdx
    push rbp
    push rsi
    push rdi
    push r8
    push r9
    push r10
    push r11
    push r12
    push r13
    push r14
    push r15
    mov rdi, rsp
    cld
    // End the kernel's frame-pointer chain here: the interrupted context's
    // frames are reached through the saved frame, not through RBP.
    xor ebp, ebp
    call {trap}
    pop r15
    pop r14
    pop r13
    pop r12
    pop r11
    pop r10
    pop r9
    pop r8
    pop rdi
    pop rsi
    pop rbp
    pop rdx
    pop rcx
    pop rbx
    pop rax
    add rsp, 16
    iretq
    .size isr_common, . - isr_common

    .macro isr_noerr n
    .type isr_\n, @function
isr_\n:
    push 0
    push \n
    jmp isr_common
    .size isr_\n, . - isr_\n
    .endm

    .macro isr_clock n
    .type isr_\n, @function
isr_\n:
    push rax
    movabs rax, [{timer_now}]
    xchg [rsp], rax
    push \n
    jmp isr_common
    .size isr_\n, . - isr_\n
    .endm

    .macro isr_err n
    .type isr_\n, @function
isr_\n:
    push \n
    jmp isr_common
    .size isr_\n, . - isr_\n
    .endm

    .altmacro
    .macro isr_for n
    .if \n == {timer}
    isr_clock %n
    .elseif (\n == 8) || (\n == 10) || (\n == 11) || (\n == 12) || (\n == 13) || (\n == 14) || (\n == 17) || (\n == 21) || (\n == 29) || (\n == 30)
    isr_err %n
    .else
    isr_noerr %n
    .endif
    .endm

    .set i, 0
    .rept 256
    isr_for %i
    .set i, i + 1
    .endr

    .macro isr_addr n
    .quad isr_\n
    .endm

    .section .rodata
    .balign 8
    .global ISR_TABLE
ISR_TABLE:
    .set i, 0
    .rept 256
    isr_addr %i
    .set i, i + 1
    .endr
    .noaltmacro
    .text
    "#,
    trap = sym trap,
    timer = const Vector::Timer as u8,
    timer_now = const TIMER_BASE + TIMER_NOW,
);

extern "C" {
    /// Addresses of the 256 entry stubs, in vector order.
    static ISR_TABLE: [u64; 256];
}

/// The entry stubs, in vector order, for `arch::build_idt`.
pub fn entry_stubs() -> &'static [u64; 256] {
    // SAFETY: ISR_TABLE is an immutable table emitted by the assembler above.
    unsafe { &*core::ptr::addr_of!(ISR_TABLE) }
}

/// The common handler, called from `isr_common` with the saved frame.
extern "C" fn trap(frame: &mut Frame) {
    let id = percpu::id_of_frame(frame);
    match frame.vector {
        v if v == u64::from(exception::BREAKPOINT) && frame.cpl() == 3 => {
            percpu::with(id, |cpu, shared| syscall::dispatch(cpu, shared, frame));
        }
        0..=31 => report_fault(id, frame),
        TIMER => {
            // The timer stub put the clock's reading at entry in the error-code slot.
            let entry_ns = frame.error_code;
            vic::eoi();
            percpu::with(id, |cpu, shared| {
                if let Some(tick) = clock::interrupt(cpu, shared, frame, entry_ns) {
                    let (now, resched) = (tick.now, tick.need_resched);
                    sched::hardclock_tick(cpu, shared, frame, now, resched, workloads::on_tick);
                }
            });
        }
        TIMER_RESUME => {
            vic::eoi();
            percpu::with(id, clock::resume);
        }
        IPI => {
            vic::eoi();
            percpu::with(id, |cpu, shared| {
                shared.ipis_received += 1;
                workloads::on_ipi(cpu, shared);
            });
        }
        STRESS => {
            percpu::with(id, |_, shared| shared.stress_received += 1);
            vic::eoi();
        }
        _ => {
            // Not a vector we use: acknowledge it and carry on (counted by the VMM).
            vic::eoi();
        }
    }
}

/// Reports a fatal exception taken by vCPU `id` and stops the vCPU. It may
/// interrupt kernel code that holds the vCPU's data, so it does not borrow it.
fn report_fault(id: u32, frame: &Frame) -> ! {
    control::report_fault(FaultReport {
        frame: *frame,
        cr2: arch::read_cr2(),
        vcpu: u64::from(id),
        tid: percpu::fault_tid(id),
    })
}
