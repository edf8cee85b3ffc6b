//! The boot-information block the VMM writes before the first instruction.

use metronome_abi::BootInfo;

/// The boot-information block (written by the VMM before any vCPU ran).
pub fn info() -> &'static BootInfo {
    // SAFETY: the VMM writes a BootInfo at this fixed, identity-mapped address
    // before the first instruction and never changes it afterwards; the guest
    // never writes it, so a shared reference is never aliased by a mutable one.
    unsafe { &*(metronome_abi::layout::BOOT_INFO as *const BootInfo) }
}
