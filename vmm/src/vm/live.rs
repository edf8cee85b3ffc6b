//! Reading a running VM without stopping it: the summary so far, and copies
//! of the profiles and the trace ([`VmController::live_summary`],
//! [`VmController::profile_snapshot`], [`VmController::trace_snapshot`]).
//!
//! Nothing here drains what the end of the run reports, kicks a vCPU or
//! waits for one: the per-vCPU counters are the copies the vCPU threads
//! publish ([`crate::vcpu::PUBLISH_PERIOD_NS`]), the stack counts and trace
//! records are copied under their locks, chunk by chunk. The callers run
//! these on a thread of their own (the API's blocking pool): symbolizing a
//! profile takes a while.

use std::sync::Arc;
use std::time::Instant;

use super::{SamplingError, VmController};
use crate::config::VmConfig;
use crate::devices::DeviceErrors;
use crate::sampling::export::{self, ProfileKind, ProfileStacks, TraceCopy};
use crate::sampling::SamplingShared;
use crate::summary::{Summary, SummarySource};
use crate::vcpu::VcpuRunStats;

/// What readers of a running VM need besides its shared state.
pub(crate) struct RunView {
    /// The configuration it was built with.
    pub(crate) config: VmConfig,
    /// The devices' refused accesses.
    pub(crate) device_errors: Arc<DeviceErrors>,
    /// The guest kernel ELF, for symbolizing.
    pub(crate) kernel_image: Arc<[u8]>,
    /// When the process started (the summary's wall-clock figures).
    pub(crate) process_start: Instant,
}

impl std::fmt::Debug for RunView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunView")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl VmController {
    /// The summary so far, in the end-of-run summary's shape: every
    /// figure as of now (the per-vCPU VMM counters as their threads last
    /// published them, at most 20 ms of guest time old), the sampling
    /// figures from copies of the buffers (no files). The fields that only
    /// the end knows are placeholders: `outcome`, `message`, `exit_code`,
    /// `guest_exit_code` and `host_wall_to_exit_ns` (see
    /// [`Summary`]); `host_wall_ns` is the wall time so far.
    pub fn live_summary(&self) -> Summary {
        let shared = &self.shared;
        let view = &self.view;
        let stats: Vec<VcpuRunStats> = (0..shared.vcpus.len() as u32)
            .map(|id| {
                shared.vcpus[id as usize]
                    .published
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone()
                    .unwrap_or(VcpuRunStats {
                        id,
                        ..Default::default()
                    })
            })
            .collect();
        let source = SummarySource {
            config: &view.config,
            shared,
            device_errors: &view.device_errors,
        };
        let wall = view.process_start.elapsed();
        let mut summary = crate::summary::collect_from(source, &stats, wall, wall);
        if let Some(sampling) = &shared.sampling {
            summary.sampling = Some(crate::sampling::report::live(
                sampling,
                &stats,
                (&view.kernel_image, &shared.mem),
                summary.guest_uptime_ns,
            ));
        }
        summary
    }

    fn sampling_state(&self) -> Result<&SamplingShared, SamplingError> {
        self.shared
            .sampling
            .as_ref()
            .ok_or(SamplingError::NotConfigured)
    }

    /// A copy of profile `kind`'s stack counts so far (nothing drained: the
    /// end of the run still writes every sample).
    pub fn profile_snapshot(&self, kind: ProfileKind) -> Result<ProfileStacks, SamplingError> {
        let sampling = self.sampling_state()?;
        Ok(export::snapshot_profile(
            sampling,
            kind,
            &self.view.kernel_image,
        ))
    }

    /// Whether PET is configured now, or its profile holds samples.
    pub fn pet_available(&self) -> bool {
        self.sampling_state().is_ok_and(|sampling| {
            export::pet_configured(sampling) || !sampling.pet.samples.is_empty()
        })
    }

    /// A copy of the trace so far, or `None` when the run keeps no trace
    /// (it needs a trace file or a profile directory).
    pub fn trace_snapshot(&self) -> Result<Option<TraceCopy>, SamplingError> {
        let sampling = self.sampling_state()?;
        Ok(TraceCopy::of(sampling, &self.shared.mem, self.shared.now()))
    }
}
