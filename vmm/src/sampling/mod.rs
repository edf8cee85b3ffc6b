//! Host-side sampling: XNU's kptimer on the host, with kicks that sample.
//!
//! - [`state`]: the engine behind one mutex, per-vCPU deadlines, the
//!   synchronous stop through SHUTDOWN ([`SamplingShared`]).
//! - [`expiry`]: the vCPU thread's side: its POSIX timer, the expiry, the
//!   sample ([`VcpuSampler`]; the module docs walk one expiry hop by hop).
//! - [`capture`]: one sample from sync regs and guest memory, filter first.
//! - [`pet`]: traditional PET's pass over every guest thread (PET-T-*).
//! - [`lightweight`]: lightweight PET's page and self-sample requests (PET-L-*).
//! - [`samplers`]: what every sampler but the call stacks captures, its
//!   trace records and the run's totals.
//! - [`walk`]: guest page-table translation and frame-pointer stack walks.
//! - [`buffer`]: samples leaving the vCPU threads, counted per distinct
//!   stack as they arrive ([`SampleBuffer`]): memory stays flat however long
//!   sampling runs.
//! - [`trace`]: the trace's kdebug-style records and their JSON lines.
//! - [`guest_events`]: draining the guest's per-vCPU event rings (clock
//!   dispatches, context switches) into the trace.
//! - [`chrome`]: the trace as Chrome trace-event JSON (`trace.json`).
//! - [`no_exit`]: the no-exit tier: perf_event cpu-clock samples of the
//!   guest IP read by a host thread, attributed through the guest's
//!   context-switch log ([`attribution`]) and read from the ring
//!   ([`perf_ring`]).
//! - [`report`]: the end of a sampled run: figures, profile files, trace file.
//! - [`export`]: the profiles and the trace for readers outside the VM:
//!   copies taken while it runs, or what the end of the run kept.

pub mod attribution;
pub mod buffer;
pub mod capture;
pub mod chrome;
pub mod expiry;
pub mod export;
pub mod guest_events;
pub mod lightweight;
pub mod no_exit;
pub mod perf_ring;
pub mod pet;
pub mod report;
pub mod samplers;
pub mod state;
pub mod trace;
pub mod walk;

pub use buffer::SampleBuffer;
pub use capture::RawSample;
pub use expiry::{VcpuSampler, VcpuSampling};
pub use state::{PendingStop, SamplingShared};
pub use trace::TraceRecord;
