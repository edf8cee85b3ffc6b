//! The virtual interrupt controller (`metronome_abi::mmio::VIC_*`): banked, so
//! every vCPU reaches its own controller at the same address.

use metronome_abi::mmio::{VIC_BASE, VIC_EOI, VIC_ID, VIC_IPI};
use metronome_abi::Vector;

use crate::arch;

/// Signals end of interrupt to this vCPU's controller.
pub fn eoi() {
    // SAFETY: VIC_EOI is the EOI register of this vCPU's interrupt-controller bank.
    unsafe { arch::mmio_write(VIC_BASE + VIC_EOI, 0) };
}

/// The id of the vCPU that runs this code.
pub fn vcpu_id() -> u64 {
    // SAFETY: VIC_ID is a read-only register returning the reader's vCPU id.
    unsafe { arch::mmio_read(VIC_BASE + VIC_ID) }
}

/// Sends [`Vector::Ipi`] to vCPU `target`.
pub fn send_ipi(target: u32) {
    let value = (u64::from(target) << 32) | Vector::Ipi as u64;
    // SAFETY: VIC_IPI only sends an IPI; the VMM ignores (and counts) a bad target.
    unsafe { arch::mmio_write(VIC_BASE + VIC_IPI, value) };
}
