//! x86_64 primitives: the idle and halt loops, the IDT, port and MMIO access,
//! and a few privileged instructions. The bottom layer: it uses no other
//! module of the kernel.
//!
//! The VMM enters `_start` (in `main.rs`) in 64-bit long mode with paging, the
//! GDT, the TSS and a per-vCPU stack already set up (see `vmm::builder`),
//! `rdi` = vCPU id and `rsi` = guest address of the boot-information block.
//! Interrupts are off.
//!
//! Every IDT gate uses an IST stack, so every interrupt and exception switches to
//! a known stack: the precompiled `core` uses the red zone, and an interrupt
//! taken on the interrupted stack would clobber it. IST1 serves interrupts and
//! the system-call door, IST2 the exceptions that end the VM. All gates are
//! interrupt gates (IF cleared on entry), so IST1 never nests. The entry stubs
//! the gates point at belong to the dispatcher (`trap`), which hands their
//! addresses to [`build_idt`].

use core::arch::{asm, global_asm};

use metronome_abi::gdt::KERNEL_CS;

/// The register state saved by the interrupt entry path: the ABI's frame,
/// which the VMM reads too.
pub use metronome_abi::InterruptFrame as Frame;

// `idle_loop`: the idle context. `halt_forever`: stop this vCPU for good.
global_asm!(
    r#"
    .text
    .global idle_loop
    .type idle_loop, @function
idle_loop:
    sti
    hlt
    cli
    jmp idle_loop
    .size idle_loop, . - idle_loop

    .global halt_forever
    .type halt_forever, @function
halt_forever:
    cli
    hlt
    jmp halt_forever
    .size halt_forever, . - halt_forever
    "#
);

extern "C" {
    /// The idle context: `sti; hlt` forever at CPL0.
    pub fn idle_loop() -> !;
    /// Stops this vCPU for good: `cli; hlt` forever.
    pub fn halt_forever() -> !;
}

/// One IDT gate descriptor.
#[repr(C)]
#[derive(Clone, Copy)]
struct Gate {
    offset_low: u16,
    selector: u16,
    ist: u8,
    type_attr: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

/// Present, 64-bit interrupt gate.
const GATE_INTERRUPT: u8 = 0x8e;
/// Descriptor privilege level 3: the gate can be used by `int3` from user mode.
const GATE_DPL3: u8 = 0x60;

#[repr(C, align(16))]
struct Idt([Gate; 256]);

static mut IDT: Idt = Idt([Gate {
    offset_low: 0,
    selector: 0,
    ist: 0,
    type_attr: 0,
    offset_mid: 0,
    offset_high: 0,
    reserved: 0,
}; 256]);

/// Fills the shared IDT with the entry stubs `stubs` (in vector order):
/// exceptions on IST2, everything else on IST1, the breakpoint gate (the
/// system-call door) callable from CPL3.
///
/// # Safety
/// Must run once, on the bootstrap vCPU, before any vCPU loads the IDT; every
/// address in `stubs` must be an interrupt entry point.
pub unsafe fn build_idt(table: &[u64; 256]) {
    // SAFETY: the caller guarantees no other vCPU reads the IDT yet.
    let idt = unsafe { &mut *core::ptr::addr_of_mut!(IDT) };
    for (vector, gate) in idt.0.iter_mut().enumerate() {
        let addr = table[vector];
        let (ist, dpl) = match vector {
            3 => (1, GATE_DPL3),
            0..=31 => (2, 0),
            _ => (1, 0),
        };
        *gate = Gate {
            offset_low: addr as u16,
            selector: KERNEL_CS,
            ist,
            type_attr: GATE_INTERRUPT | dpl,
            offset_mid: (addr >> 16) as u16,
            offset_high: (addr >> 32) as u32,
            reserved: 0,
        };
    }
}

/// Loads the shared IDT on this vCPU.
///
/// # Safety
/// [`build_idt`] must have completed.
pub unsafe fn load_idt() {
    #[repr(C, packed)]
    struct Pointer {
        limit: u16,
        base: u64,
    }
    let pointer = Pointer {
        limit: (core::mem::size_of::<Idt>() - 1) as u16,
        base: core::ptr::addr_of!(IDT) as u64,
    };
    // SAFETY: the IDT is static, fully built, and its gates point at our stubs.
    unsafe { asm!("lidt [{}]", in(reg) &pointer, options(readonly, nostack, preserves_flags)) };
}

/// Writes a 32-bit value to an I/O port.
///
/// # Safety
/// The port must belong to a device whose side effects the caller intends.
pub unsafe fn outl(port: u16, value: u32) {
    // SAFETY: the caller vouches for the port.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
    };
}

/// Writes the low `width` bytes (1, 2 or 4; anything else means 4) of
/// `value` to an I/O port with one `out`.
///
/// # Safety
/// As [`outl`].
pub unsafe fn out(port: u16, width: u64, value: u32) {
    // SAFETY: the caller vouches for the port.
    unsafe {
        match width {
            1 => {
                asm!("out dx, al", in("dx") port, in("al") value as u8, options(nomem, nostack, preserves_flags))
            }
            2 => {
                asm!("out dx, ax", in("dx") port, in("ax") value as u16, options(nomem, nostack, preserves_flags))
            }
            _ => outl(port, value),
        }
    }
}

/// Writes a byte string to an I/O port with one `rep outsb` (one VM exit).
///
/// # Safety
/// As [`outl`].
pub unsafe fn outsb(port: u16, bytes: &[u8]) {
    // SAFETY: the caller vouches for the port; rsi/rcx describe a valid slice.
    unsafe {
        asm!("rep outsb", in("dx") port, inout("rsi") bytes.as_ptr() => _,
             inout("rcx") bytes.len() => _, options(readonly, nostack, preserves_flags))
    };
}

/// Reads a 64-bit paravirtual MMIO register.
///
/// # Safety
/// `addr` must be one of the registers in `metronome_abi::mmio`.
pub unsafe fn mmio_read(addr: u64) -> u64 {
    // SAFETY: the caller vouches for the register; the MMIO window is mapped.
    unsafe { core::ptr::read_volatile(addr as *const u64) }
}

/// Writes a 64-bit paravirtual MMIO register (one `mov`, one VM exit).
///
/// # Safety
/// `addr` must be one of the registers in `metronome_abi::mmio`.
pub unsafe fn mmio_write(addr: u64, value: u64) {
    // SAFETY: the caller vouches for the register; the MMIO window is mapped.
    unsafe { core::ptr::write_volatile(addr as *mut u64, value) }
}

/// Reads CR2, the faulting address of the last page fault.
pub fn read_cr2() -> u64 {
    let value: u64;
    // SAFETY: reading CR2 has no side effects; we run at CPL0.
    unsafe { asm!("mov {}, cr2", out(reg) value, options(nomem, nostack, preserves_flags)) };
    value
}

/// Saves the x87/SSE state into `area`.
///
/// # Safety
/// Must run at CPL0 with CR4.OSFXSR set (the VMM sets it).
pub unsafe fn fxsave(area: &mut FxArea) {
    // SAFETY: the area is 512 bytes and 16-byte aligned.
    unsafe {
        asm!("fxsave64 [{}]", in(reg) area.0.as_mut_ptr(), options(nostack, preserves_flags))
    };
}

/// Restores the x87/SSE state from `area`.
///
/// # Safety
/// `area` must hold a state saved by [`fxsave`] or [`FxArea::initial`].
pub unsafe fn fxrstor(area: &FxArea) {
    // SAFETY: the area is 512 bytes, 16-byte aligned and holds a valid image.
    unsafe {
        asm!("fxrstor64 [{}]", in(reg) area.0.as_ptr(), options(readonly, nostack, preserves_flags))
    };
}

/// An FXSAVE image.
#[repr(C, align(16))]
#[derive(Clone, Copy)]
pub struct FxArea(pub [u8; 512]);

impl FxArea {
    /// A valid image of the reset state: default FCW (0x37f) and MXCSR (0x1f80).
    pub const fn initial() -> Self {
        let mut bytes = [0u8; 512];
        bytes[0] = 0x7f;
        bytes[1] = 0x03;
        bytes[24] = 0x80;
        bytes[25] = 0x1f;
        Self(bytes)
    }
}

/// Spin-loop hint.
pub fn pause() {
    core::hint::spin_loop();
}

/// Whether interrupts are enabled (RFLAGS.IF).
pub fn interrupts_enabled() -> bool {
    let flags: u64;
    // SAFETY: pushfq/pop only reads RFLAGS through the stack.
    unsafe { asm!("pushfq", "pop {}", out(reg) flags, options(nomem, preserves_flags)) };
    flags & 0x200 != 0
}

/// Disables interrupts.
pub fn cli() {
    // SAFETY: masking interrupts is always sound at CPL0.
    unsafe { asm!("cli", options(nomem, nostack)) };
}
