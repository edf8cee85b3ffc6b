//! A VM: built from a [`VmConfig`], run to the end, driven meanwhile.
//!
//! - [`builder`]: KVM → VM → guest memory → (no irqchip: the VMM owns interrupt
//!   delivery) → kernel load → page tables, GDT, TSSs, boot information →
//!   vCPUs and their registers → devices on the buses ([`Vm::build`]).
//! - [`run`]: one thread per vCPU; the calling thread runs an event-manager
//!   loop ([`events`]) that waits for the guest's exit, SIGINT/SIGTERM or the
//!   `--timeout`, then parks every vCPU at an interruptible point, stops them
//!   (stop flag + kick), joins them, and builds the [`crate::Summary`]
//!   ([`RunningVm::wait`]).
//! - [`requests`]: the channel plus eventfd through which another thread
//!   (the API's) has the event loop run operations on the VM ([`VmmLink`]).
//! - [`controller`]: pause, resume, hold a vCPU, stop, sampling on and off,
//!   from any thread ([`VmController`]).
//! - [`shared`]: the state every thread of a running VM shares ([`VmShared`]).
//! - [`continued`]: a host stop and continue, found by each vCPU thread and
//!   told to the guest as a resume with re-initialisation.
//! - [`stress`]: the kick-stress interrupt generator.
//! - [`no_exit_thread`]: the no-exit tier's perf reader thread.
//! - [`pet_thread`]: traditional PET's sampler thread (holds the guest still
//!   for each pass over its threads).
//! - [`exit`]: why a VM ended ([`VmExit`]).
//! - [`live`]: a running VM's summary, profiles and trace so far, without
//!   stopping it or draining anything.
//! - [`probe`]: what `metronome bench` reads from a running VM (fine
//!   lateness histograms, the bench page, a tap on the host timer deadlines).

pub mod builder;
pub mod continued;
pub mod controller;
pub mod events;
pub mod exit;
pub mod live;
pub mod no_exit_thread;
pub mod pet_thread;
pub mod probe;
pub mod requests;
pub mod run;
pub mod shared;
pub mod stress;

use std::sync::Arc;

use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use crate::config::VmConfig;
use crate::devices::DeviceManager;

pub use builder::BuildVmError;
pub use controller::{ControlError, ResumeMode, SamplingError, VmController};
pub use exit::VmExit;
pub use requests::{LinkClosed, VmRequest, VmmLink};
pub use run::{RunningVm, SignalWatch};
pub use shared::VmShared;

/// A built VM, ready to run.
pub struct Vm {
    pub(crate) config: VmConfig,
    // Kept alive for the VM's lifetime: dropping it would tear the VM down.
    _kvm: Kvm,
    _vm: VmFd,
    vcpus: Vec<VcpuFd>,
    pub(crate) shared: Arc<VmShared>,
    pub(crate) devices: DeviceManager,
    /// The kernel ELF, for symbolizing profiles (shared with the readers of
    /// a running VM's profile, [`VmController`]).
    pub(crate) kernel_image: Arc<[u8]>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}
