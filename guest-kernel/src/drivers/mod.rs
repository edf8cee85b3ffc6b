//! One module per device the VMM emulates for the guest. Register addresses
//! come from `metronome_abi::mmio` and `metronome_abi::port`; each driver is
//! the only code that touches its device's registers.

pub mod console;
pub mod control;
pub mod timer;
pub mod vic;
