//! System calls: the door and the user-side wrappers.
//!
//! # The door: `int3` through a DPL3 gate
//!
//! A user thread enters the kernel with `int3` (vector 3, the breakpoint trap),
//! whose IDT gate has DPL 3. The number goes in `rax`, up to three arguments in
//! `rdi`, `rsi`, `rdx`; the result comes back in `rax` (`u64::MAX` for an
//! invalid call). `int3` from CPL3 is always a system call in this kernel.
//!
//! Why not `syscall` or `int 0x80`: on kvm_pvm, where this project is developed,
//! `syscall` jumps to LSTAR without loading the kernel CS, and `int n` for any
//! n other than 3 ends in a triple fault; exceptions and `int3` through a DPL3
//! gate work, and work on hardware KVM too. `int3` is a trap, so the saved RIP
//! already points past it: returning resumes the caller.

use core::arch::asm;

use metronome_abi::{layout, GuestReport, VcpuShared, MAX_REPORTS};

use crate::arch::Frame;
use crate::drivers::{console, timer};
use crate::percpu::PerCpu;
use crate::{arch, boot, clock, sched};

/// Give up the CPU.
pub const SYS_YIELD: u64 = 0;
/// Sleep for `rdi` ns.
pub const SYS_SLEEP: u64 = 1;
/// End the calling thread.
pub const SYS_EXIT: u64 = 2;
/// Write `rsi` bytes at `rdi` to the console (at most 4 KiB).
pub const SYS_WRITE: u64 = 3;
/// Report value `rsi` under key `rdi` to the VMM.
pub const SYS_REPORT: u64 = 4;
/// Return the uptime in ns.
pub const SYS_UPTIME: u64 = 5;
/// Switch statclock profiling on (`rdi` = 1) or off (0) for the caller (startprofclock/stopprofclock).
pub const SYS_PROFIL: u64 = 6;
/// Block while the u64 at `rdi` equals `rsi` (threads of the same vCPU only).
pub const SYS_WAIT: u64 = 7;
/// Wake the threads of this vCPU waiting on the u64 at `rdi`.
pub const SYS_WAKE: u64 = 8;

/// The chaos workload's port write: port `rdi & 0xffff`, width `rdi >> 16`
/// (1, 2 or 4 bytes), value `rsi`. Port I/O faults at CPL3 (IOPL 0), so the
/// kernel does it for the workload; it passes any port, the debug-exit port
/// included, for this kernel trusts its built-in workloads.
pub const SYS_CHAOS_OUT: u64 = 9;
/// The chaos workload's interrupt mask: spin at CPL0 with interrupts
/// disabled for `rdi` ns (at most `workloads::chaos::MAX_MASK_NS`, 20 ms).
pub const SYS_CHAOS_MASK: u64 = 10;
/// The longest [`SYS_CHAOS_MASK`], ns.
const MAX_MASK_NS: u64 = 20_000_000;

/// Result of an invalid system call.
pub const EINVAL: u64 = u64::MAX;
/// Largest console write.
const MAX_WRITE: u64 = 4096;

/// Kernel side: decode and run the system call in `frame`.
pub fn dispatch(cpu: &mut PerCpu, shared: &mut VcpuShared, frame: &mut Frame) {
    shared.syscalls += 1;
    let (a, b) = (frame.rdi, frame.rsi);
    match frame.rax {
        SYS_YIELD => {
            frame.rax = 0;
            sched::yield_now(cpu, shared, frame);
        }
        SYS_SLEEP => {
            frame.rax = 0;
            let wake_at = timer::uptime_ns().saturating_add(a);
            sched::sleep_until(cpu, shared, frame, wake_at);
        }
        SYS_EXIT => sched::exit_current(cpu, shared, frame),
        SYS_WRITE => {
            let ok = b <= MAX_WRITE
                && a >= 0x1000
                && a.checked_add(b)
                    .is_some_and(|end| end <= boot::info().mem_bytes);
            if ok {
                // SAFETY: the range was checked to lie inside guest RAM, which is
                // identity mapped; the bytes are only copied out to the UART.
                let bytes = unsafe { core::slice::from_raw_parts(a as *const u8, b as usize) };
                console::write(bytes);
                frame.rax = b;
            } else {
                frame.rax = EINVAL;
            }
        }
        SYS_REPORT => frame.rax = if report(a, b) { 0 } else { EINVAL },
        SYS_UPTIME => frame.rax = timer::uptime_ns(),
        SYS_PROFIL => {
            clock::set_profiling(a != 0);
            frame.rax = 0;
        }
        SYS_WAIT => {
            let ok = a >= 0x1000
                && a % 8 == 0
                && a.checked_add(8)
                    .is_some_and(|end| end <= boot::info().mem_bytes);
            if !ok {
                frame.rax = EINVAL;
            } else {
                frame.rax = 0;
                // SAFETY: the address was checked to be an aligned u64 inside guest RAM.
                let current = unsafe { core::ptr::read_volatile(a as *const u64) };
                if current == b {
                    sched::wait_on(cpu, shared, frame, a);
                }
            }
        }
        SYS_WAKE => frame.rax = sched::wake_all(cpu, a),
        SYS_CHAOS_OUT => {
            let (port, width) = (a as u16, a >> 16);
            frame.rax = if matches!(width, 1 | 2 | 4) {
                // SAFETY: the chaos workload asks for this write on purpose;
                // a port write has no effect on guest memory.
                unsafe { arch::out(port, width, b as u32) };
                0
            } else {
                EINVAL
            };
        }
        SYS_CHAOS_MASK => {
            // The door is an interrupt gate: interrupts are already off, and
            // `iretq` turns them back on (cli ... sti).
            arch::cli();
            let start = timer::uptime_ns();
            while timer::uptime_ns().wrapping_sub(start) < a.min(MAX_MASK_NS) {
                arch::pause();
            }
            frame.rax = 0;
        }
        _ => frame.rax = EINVAL,
    }
}

/// Records `(key, value)` in the guest report page.
pub fn report(key: u64, value: u64) -> bool {
    use core::sync::atomic::{AtomicU64, Ordering};
    // SAFETY: the report page is a fixed, identity-mapped page that only this
    // module writes; `report_count` is only accessed atomically, and each slot is
    // claimed by exactly one caller through the fetch_add below.
    unsafe {
        let page = layout::GUEST_REPORT as *mut GuestReport;
        let count = &*(core::ptr::addr_of_mut!((*page).report_count) as *const AtomicU64);
        let index = count.fetch_add(1, Ordering::AcqRel) as usize;
        if index >= MAX_REPORTS {
            count.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        (*page).reports[index] = [key, value];
    }
    true
}

/// User side: the raw door.
#[inline(always)]
pub fn call(nr: u64, a: u64, b: u64) -> u64 {
    let ret: u64;
    // SAFETY: int3 from CPL3 is the system-call door; the kernel preserves every
    // register except rax.
    unsafe { asm!("int3", inlateout("rax") nr => ret, in("rdi") a, in("rsi") b, options(nostack)) };
    ret
}

/// User side: yield.
pub fn yield_now() {
    call(SYS_YIELD, 0, 0);
}

/// User side: sleep for `ns`.
pub fn sleep_ns(ns: u64) {
    call(SYS_SLEEP, ns, 0);
}

/// User side: end the thread.
pub fn exit() -> ! {
    call(SYS_EXIT, 0, 0);
    unreachable!("SYS_EXIT returned")
}

/// User side: write to the console.
pub fn write(bytes: &[u8]) {
    call(SYS_WRITE, bytes.as_ptr() as u64, bytes.len() as u64);
}

/// User side: report a value to the VMM.
pub fn report_value(key: u64, value: u64) {
    call(SYS_REPORT, key, value);
}

/// User side: switch statclock profiling on or off.
pub fn profil(on: bool) {
    call(SYS_PROFIL, u64::from(on), 0);
}

/// User side: block while `*word == expected` (same-vCPU threads only).
pub fn wait(word: &core::sync::atomic::AtomicU64, expected: u64) {
    call(SYS_WAIT, word.as_ptr() as u64, expected);
}

/// User side: wake this vCPU's threads waiting on `word`.
pub fn wake(word: &core::sync::atomic::AtomicU64) {
    call(SYS_WAKE, word.as_ptr() as u64, 0);
}

/// User side: the chaos workload's port write ([`SYS_CHAOS_OUT`]).
pub fn chaos_out(port: u16, width: u64, value: u32) {
    call(
        SYS_CHAOS_OUT,
        u64::from(port) | width << 16,
        u64::from(value),
    );
}

/// User side: interrupts masked for `ns` at CPL0 ([`SYS_CHAOS_MASK`]).
pub fn chaos_mask(ns: u64) {
    call(SYS_CHAOS_MASK, ns, 0);
}

/// User side: uptime in ns.
pub fn uptime_ns() -> u64 {
    call(SYS_UPTIME, 0, 0)
}
