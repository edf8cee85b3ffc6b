//! The guest kernel image, built freestanding by this crate's build script and
//! embedded here, so that the `metronome` binary carries its default kernel.

/// The default guest kernel: an x86_64 ELF executable (see `guest-kernel/`).
pub static GUEST_KERNEL: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/metronome-guest.elf"));
