//! The Metronome virtual machine monitor.
//!
//! A minimal KVM VMM on the rust-vmm crates. It boots the project's own guest
//! kernel directly in 64-bit long mode on N vCPUs, without an in-kernel
//! irqchip: interrupt delivery is the VMM's own (a per-vCPU virtual interrupt
//! controller and timer from `metronome-devices`, injected with
//! `KVM_INTERRUPT`), and vCPU threads are kicked out of `KVM_RUN` with
//! `immediate_exit` plus a signal.
//!
//! - [`config`]: typed configuration, validated at the edge.
//! - [`vm`]: builds a VM from a config and runs it to a [`summary::Summary`].
//! - [`vcpu`]: the vCPU thread loop.
//! - [`bus`] and [`devices`]: one bus per address space and the device adapters.
//! - [`kick`]: kicks, the vCPU's own host timer, and the signals behind both.

#![deny(missing_docs)]

pub mod arch;
pub mod bus;
pub mod config;
pub mod devices;
pub mod dump;
pub mod guest_state;
pub mod guestmem;
pub mod kick;
pub mod loader;
pub mod profile;
pub mod profiling;
pub mod sampler;
pub mod sampling;
pub mod shared;
pub mod summary;
pub mod vcpu;
pub mod vm;

pub use config::{ConsoleSink, KernelSource, VmConfig};
pub use summary::Summary;
pub use vm::{BuildVmError, ControlError, ResumeMode, RunningVm, Vm, VmController};
