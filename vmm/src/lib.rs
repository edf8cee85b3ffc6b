//! The Metronome virtual machine monitor.
//!
//! A minimal KVM VMM on the rust-vmm crates. It boots the project's own guest
//! kernel directly in 64-bit long mode on N vCPUs, without an in-kernel
//! irqchip: interrupt delivery is the VMM's own (a per-vCPU virtual interrupt
//! controller and timer from `metronome-devices`, injected with
//! `KVM_INTERRUPT`), and vCPU threads are kicked out of `KVM_RUN` with a
//! signal they block everywhere but inside `KVM_RUN`. Host-side sampling runs kperf's kptimer
//! (the `kperf` crate) on the vCPU threads themselves.
//!
//! - [`config`]: typed configuration, validated at the edge.
//! - [`boot`]: the kernel image and the long-mode environment it starts in.
//! - [`vm`]: builds a VM, runs it to a [`Summary`], drives it while it runs.
//! - [`vcpu`]: the vCPU thread: exits, interrupt injection, parking.
//! - [`bus`] and [`devices`]: one bus per address space and the device adapters.
//! - [`host_time`] and [`kick`]: the device clock, per-thread POSIX timers,
//!   and the signals that make a vCPU leave `KVM_RUN`; [`stop_signals`]:
//!   SIGINT and SIGTERM on their own thread.
//! - [`sampling`]: kptimer expiries, samples, the trace; [`profile`]: what
//!   samples become (symbolized folded stacks, flame graph, pprof).
//! - [`summary`]: the run summary and the clockintr dump.
//! - [`metrics`]: run-time counters and histograms (`GET /metrics`), JSON
//!   and the Prometheus text format.
//! - [`guestmem`]: the guest ABI's plain-data structures in guest memory.
//! - [`pmu`]: the host PMU for the PMC samplers (probe, guest-only counters).
//! - [`bench`](mod@bench): `metronome bench`: timer lateness, sampling overhead
//!   against perf, boot time and memory, as JSON, Markdown and SVG.
//! - [`api`]: the API socket: HTTP/1.1 with JSON bodies over a Unix domain
//!   socket that configures, starts and drives one VM.

#![deny(missing_docs)]

pub mod api;
pub mod bench;
pub mod boot;
pub mod bus;
pub mod config;
pub mod devices;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzz;
pub mod guestmem;
pub mod host_time;
pub mod kick;
pub mod metrics;
pub mod outfile;
pub mod pmu;
pub mod profile;
pub mod sampling;
pub mod seccomp;
pub mod stop_signals;
pub mod summary;
pub mod vcpu;
pub mod vm;

pub use config::{ConsoleSink, KernelSource, KperfConfig, SamplingConfig, VmConfig};
pub use summary::Summary;
pub use vm::{BuildVmError, ControlError, ResumeMode, RunningVm, SignalWatch, Vm, VmController};
