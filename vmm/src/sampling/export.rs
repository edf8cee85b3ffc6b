//! The profiles and the trace as readers outside the VM see them: copies of
//! the stack counts and trace records, taken while the VM runs without
//! draining anything ([`snapshot_profile`], [`TraceCopy::of`]), or kept by
//! the end of the run ([`RunRecords`]), and turned into the end-of-run
//! files' formats by the same code ([`ProfileStacks::profile`],
//! [`TraceCopy::write_chrome`]).
//!
//! Copying holds each vCPU's stack-count lock only for its copy and the
//! trace lock only per chunk; symbolizing and encoding happen on the
//! caller's thread afterwards, under no lock a vCPU takes.

use std::io::Write;
use std::sync::Arc;

use vm_memory::GuestMemoryMmap;

use super::buffer::StackSample;
use super::{chrome, samplers, SamplingShared, TraceRecord};
use crate::config::KperfConfig;
use crate::profile::{Profile, ProfileError, Sample, Symbolizer};

/// Which profile: the on-CPU timers' samples, or PET's thread samples.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProfileKind {
    /// The on-CPU timers' samples (`profile.*`).
    OnCpu,
    /// Traditional or lightweight PET's thread samples (`pet.*`).
    Pet,
}

/// A profile's stack counts, ready to be symbolized.
#[derive(Clone, Debug)]
pub struct ProfileStacks {
    /// Each distinct stack and its count, vCPU by vCPU.
    pub stacks: Vec<(StackSample, u64)>,
    /// The pprof period, ns (0: none; PET's samples are not periodic).
    pub period_ns: u64,
    /// The guest kernel ELF the addresses are symbolized against.
    pub kernel_image: Arc<[u8]>,
}

impl ProfileStacks {
    /// Samples counted (the sum of the counts).
    pub fn samples(&self) -> u64 {
        self.stacks.iter().map(|(_, n)| n).sum()
    }

    /// The symbolizing [`Profile`] of these stacks, as the end-of-run
    /// files are written from.
    ///
    /// # Errors
    ///
    /// The guest kernel image cannot be read.
    pub fn profile(&self) -> Result<Profile, ProfileError> {
        let mut profile = Profile::new(Symbolizer::new(&self.kernel_image)?);
        if self.period_ns > 0 {
            profile.set_period_ns(self.period_ns);
        }
        for (stack, count) in &self.stacks {
            profile.add(&Sample {
                vcpu: stack.vcpu,
                tid: stack.tid,
                thread_name: if stack.tid == 0 {
                    "idle".to_string()
                } else {
                    stack.thread_name.clone()
                },
                user_stack: stack.user_stack.clone(),
                kernel_stack: stack.kernel_stack.clone(),
                user_leaf_after_trap: stack.user_leaf_after_trap,
                weight: *count,
            });
        }
        Ok(profile)
    }
}

/// A copy of the trace with what its Chrome form needs.
#[derive(Clone, Debug)]
pub struct TraceCopy {
    /// The records, in recording order.
    pub records: Vec<TraceRecord>,
    /// The vCPUs and the guest's threads.
    pub tracks: chrome::Tracks,
    /// Device time that closes the slices still open.
    pub end_ns: u64,
}

impl TraceCopy {
    /// The trace and its tracks as of now: the records are copied, not taken.
    pub fn of(sampling: &SamplingShared, mem: &GuestMemoryMmap, end_ns: u64) -> Option<Self> {
        let records = sampling.trace()?.snapshot();
        Some(Self {
            records,
            tracks: tracks(sampling, mem),
            end_ns,
        })
    }

    /// Writes it as Chrome trace-event JSON (`trace.json`).
    ///
    /// # Errors
    ///
    /// Writing to `out` failed.
    pub fn write_chrome(&self, out: impl Write) -> std::io::Result<()> {
        chrome::write_chrome(&self.records, &self.tracks, self.end_ns, out)
    }
}

/// The Chrome trace's tracks: the vCPUs, and the guest threads named in
/// its thread table.
pub fn tracks(sampling: &SamplingShared, mem: &GuestMemoryMmap) -> chrome::Tracks {
    chrome::Tracks {
        vcpus: sampling.guest_events().vcpus(),
        threads: samplers::thread_table(mem)
            .iter()
            .filter(|t| t.tid != 0)
            .map(|t| (t.tid, thread_name(&t.name)))
            .collect(),
    }
}

/// A NUL-padded guest thread name.
fn thread_name(name: &[u8; 16]) -> String {
    let len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    String::from_utf8_lossy(&name[..len]).into_owned()
}

/// The on-CPU profile's pprof period: the shortest on-CPU timer's (a
/// profile mixing timers of several periods has no single period; pprof
/// takes one); 0 without an on-CPU timer.
pub fn on_cpu_period_ns(kperf: &KperfConfig) -> u64 {
    kperf.shortest_on_cpu_timer().map_or(0, |t| t.period_ns)
}

/// Whether PET is configured now (a PET timer is set).
pub fn pet_configured(sampling: &SamplingShared) -> bool {
    let engine = sampling.engine();
    engine.pet_timer() < engine.timer_count()
}

/// A copy of profile `kind`'s stack counts as of now, left counted.
pub fn snapshot_profile(
    sampling: &SamplingShared,
    kind: ProfileKind,
    kernel_image: &Arc<[u8]>,
) -> ProfileStacks {
    let (stacks, period_ns) = match kind {
        ProfileKind::OnCpu => {
            let kperf = KperfConfig::from_engine(&sampling.engine());
            (sampling.samples.snapshot(), on_cpu_period_ns(&kperf))
        }
        ProfileKind::Pet => (sampling.pet.samples.snapshot(), 0),
    };
    ProfileStacks {
        stacks,
        period_ns,
        kernel_image: kernel_image.clone(),
    }
}

/// What the end of a sampled run keeps for readers once the VM is gone:
/// the stack counts both profiles were written from, and the trace.
#[derive(Clone, Debug)]
pub struct RunRecords {
    /// The on-CPU profile.
    pub on_cpu: ProfileStacks,
    /// PET's profile.
    pub pet: ProfileStacks,
    /// PET was configured when the run ended.
    pub pet_configured: bool,
    /// The trace, when the run kept one.
    pub trace: Option<TraceCopy>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stack(tid: u64, name: &str, leaf: u64) -> StackSample {
        StackSample {
            tid,
            thread_name: name.into(),
            user_stack: vec![leaf],
            ..Default::default()
        }
    }

    #[test]
    fn test_profile_stacks_name_idle_and_carry_counts_and_period() {
        let stacks = ProfileStacks {
            stacks: vec![(stack(0, "", 0x10), 2), (stack(3, "t", 0x10), 5)],
            period_ns: 1000,
            kernel_image: Arc::from(metronome_resources::GUEST_KERNEL),
        };
        assert_eq!(stacks.samples(), 7);
        let profile = stacks.profile().unwrap();
        assert_eq!(profile.total_weight(), 7);
        assert_eq!(profile.period_ns(), Some(1000));
        assert_eq!(profile.folded(), "idle;0x10 2\nt;0x10 5\n");
        let no_period = ProfileStacks {
            period_ns: 0,
            ..stacks
        };
        assert_eq!(no_period.profile().unwrap().period_ns(), None);
    }

    #[test]
    fn test_thread_names_stop_at_the_first_nul() {
        assert_eq!(thread_name(b"spinner/0\0\0\0\0\0\0\0"), "spinner/0");
        assert_eq!(thread_name(b"0123456789abcdef"), "0123456789abcdef");
    }
}
