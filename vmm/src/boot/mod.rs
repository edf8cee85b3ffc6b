//! Preparing guest memory and vCPUs before the first guest instruction: the
//! kernel image ([`loader`]) and the 64-bit long-mode environment the VMM sets
//! up for it ([`long_mode`]: identity page tables, GDT, per-vCPU TSS, registers).
//! Guest CPL0 code is slow on some hosts (interpreted by KVM), so everything
//! that can be prepared here is.

pub mod loader;
pub mod long_mode;
