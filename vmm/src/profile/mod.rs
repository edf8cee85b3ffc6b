//! Guest profiles: symbolizing sampled guest call stacks against the guest
//! kernel ELF, aggregating them, and writing them out in three formats.
//!
//! - [`Symbolizer`] maps a guest instruction pointer to its function(s)
//!   (inlined frames included), source file and line, from the ELF symbol
//!   table and the DWARF line tables.
//! - [`Profile`] aggregates [`Sample`]s and writes:
//!   - [`Profile::folded`]: Brendan Gregg's folded stacks (`profile.folded`),
//!   - [`Profile::write_svg`]: an SVG flame graph drawn by `inferno`
//!     (`profile.svg`),
//!   - [`Profile::write_pprof`]: a gzipped `perftools.profiles.Profile`
//!     protocol buffer (`profile.pb.gz`), for `go tool pprof`.
//!
//! Stacks are leaf first: the first element is the sampled instruction
//! pointer, the rest are return addresses. A return address is symbolized at
//! `addr - 1`, inside the call instruction, so that it names the calling line
//! and not the line after the call.
//!
//! ```no_run
//! use vmm::profile::{Profile, Sample, Symbolizer};
//!
//! # fn main() -> Result<(), vmm::profile::ProfileError> {
//! let symbolizer = Symbolizer::new(metronome_resources::GUEST_KERNEL)?;
//! let mut profile = Profile::new(symbolizer);
//! profile.set_period_ns(1_000_000);
//! profile.add(&Sample {
//!     vcpu: 0,
//!     tid: 1,
//!     thread_name: "spinner/0".into(),
//!     user_stack: vec![0x20_3775, 0x20_1234],
//!     kernel_stack: vec![],
//!     user_leaf_after_trap: false,
//!     weight: 1,
//! });
//! profile.write_all(std::path::Path::new("/tmp/metronome-profile"))?;
//! # Ok(())
//! # }
//! ```

mod pprof;
mod symbolize;
mod write;

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;

pub use symbolize::{Frame, Symbolizer, FOLDED_FRAME, FOLDED_STACK};
pub use write::{FOLDED_FILE, PPROF_FILE, SVG_FILE, SVG_TITLE};

/// Errors from building a [`Symbolizer`] or writing a [`Profile`].
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// The guest kernel image is not an ELF file this crate can read.
    #[error("cannot parse the guest kernel ELF: {0}")]
    Elf(#[source] object::read::Error),
    /// The guest kernel's DWARF debug information is malformed.
    #[error("cannot read the guest kernel's DWARF debug information: {0}")]
    Dwarf(#[source] gimli::Error),
    /// The profile has no samples with a non-zero weight, so there is no flame
    /// graph to draw.
    #[error("the profile has no samples")]
    Empty,
    /// Writing an output stream failed.
    #[error("cannot write the profile: {0}")]
    Io(#[from] io::Error),
    /// Creating or writing an output file failed.
    #[error("cannot write {}: {source}", path.display())]
    File {
        /// The file (or directory) that could not be written.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// One sample of one vCPU, as the sampler hands it to a [`Profile`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sample {
    /// The vCPU that was sampled.
    pub vcpu: u32,
    /// The guest thread id running on it.
    pub tid: u64,
    /// The guest thread's name: the root frame of the folded stacks.
    pub thread_name: String,
    /// The thread's user stack, leaf first: the interrupted instruction
    /// pointer, then return addresses. Empty if there is none.
    pub user_stack: Vec<u64>,
    /// The guest kernel stack, leaf first, when the vCPU was sampled in the
    /// guest kernel: the sampled instruction pointer, then return addresses.
    /// Empty when it was sampled in user mode.
    pub kernel_stack: Vec<u64>,
    /// The user stack's leaf is the address after a trap (the `int3` system
    /// call door), like a return address: symbolized as the instruction
    /// before it, so a thread blocked in a system call shows the call.
    pub user_leaf_after_trap: bool,
    /// How many samples this one stands for (normally 1).
    pub weight: u64,
}

/// The identity of an aggregated sample: everything in a [`Sample`] except
/// its weight.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct StackKey {
    thread_name: String,
    tid: u64,
    vcpu: u32,
    user_stack: Vec<u64>,
    kernel_stack: Vec<u64>,
    user_leaf_after_trap: bool,
}

impl StackKey {
    /// Whether frame `i` of the user (`user`) or kernel stack is looked up as
    /// a return address (the instruction before it).
    fn is_return_address(&self, user: bool, i: usize) -> bool {
        i > 0 || (user && self.user_leaf_after_trap)
    }
}

/// An aggregated guest profile: the summed weight of every distinct
/// (thread, vCPU, user stack, kernel stack), symbolized when written.
#[derive(Debug)]
pub struct Profile {
    symbolizer: Symbolizer,
    stacks: BTreeMap<StackKey, u64>,
    samples: u64,
    total_weight: u64,
    period_ns: Option<u64>,
}

impl Profile {
    /// An empty profile whose addresses `symbolizer` resolves.
    pub fn new(symbolizer: Symbolizer) -> Self {
        Profile {
            symbolizer,
            stacks: BTreeMap::new(),
            samples: 0,
            total_weight: 0,
            period_ns: None,
        }
    }

    /// Adds one sample (its weight is added to any identical stack's).
    pub fn add(&mut self, sample: &Sample) {
        let key = StackKey {
            thread_name: sample.thread_name.clone(),
            tid: sample.tid,
            vcpu: sample.vcpu,
            user_stack: sample.user_stack.clone(),
            kernel_stack: sample.kernel_stack.clone(),
            user_leaf_after_trap: sample.user_leaf_after_trap,
        };
        let weight = self.stacks.entry(key).or_insert(0);
        *weight = weight.saturating_add(sample.weight);
        self.samples = self.samples.saturating_add(1);
        self.total_weight = self.total_weight.saturating_add(sample.weight);
    }

    /// How many samples were added (calls to [`Profile::add`]).
    pub fn sample_count(&self) -> u64 {
        self.samples
    }

    /// The sum of the added samples' weights: the total count in the outputs.
    pub fn total_weight(&self) -> u64 {
        self.total_weight
    }

    /// Sets the sampling period, in nanoseconds of guest time, recorded in the
    /// pprof output as `period_type` cpu/nanoseconds.
    pub fn set_period_ns(&mut self, period_ns: u64) {
        self.period_ns = Some(period_ns);
    }

    /// The sampling period set with [`Profile::set_period_ns`].
    pub fn period_ns(&self) -> Option<u64> {
        self.period_ns
    }

    /// The symbolizer this profile resolves addresses with.
    pub fn symbolizer(&self) -> &Symbolizer {
        &self.symbolizer
    }

    /// The aggregated stacks with a non-zero weight, in a stable order.
    fn weighted_stacks(&self) -> impl Iterator<Item = (&StackKey, u64)> {
        self.stacks
            .iter()
            .filter(|(_, &weight)| weight > 0)
            .map(|(key, &weight)| (key, weight))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile() -> Profile {
        Profile::new(Symbolizer::new(metronome_resources::GUEST_KERNEL).expect("parses"))
    }

    #[test]
    fn test_profile_is_send() {
        fn send<T: Send>() {}
        send::<Profile>();
        send::<Symbolizer>();
    }

    #[test]
    fn test_add_aggregates_identical_samples() {
        let mut p = profile();
        let s = Sample {
            vcpu: 0,
            tid: 1,
            thread_name: "t".into(),
            user_stack: vec![0x10],
            kernel_stack: vec![],
            user_leaf_after_trap: false,
            weight: 2,
        };
        p.add(&s);
        p.add(&s);
        p.add(&Sample {
            tid: 2,
            ..s.clone()
        });
        p.add(&Sample {
            weight: 0,
            ..s.clone()
        });
        assert_eq!(p.sample_count(), 4);
        assert_eq!(p.total_weight(), 6);
        let stacks: Vec<_> = p.weighted_stacks().map(|(k, w)| (k.tid, w)).collect();
        assert_eq!(stacks, vec![(1, 4), (2, 2)]);
        assert_eq!(p.period_ns(), None);
        p.set_period_ns(10);
        assert_eq!(p.period_ns(), Some(10));
    }

    #[test]
    fn test_zero_weight_samples_are_not_written() {
        let mut p = profile();
        p.add(&Sample {
            thread_name: "t".into(),
            user_stack: vec![0x10],
            ..Sample::default()
        });
        assert_eq!(p.sample_count(), 1);
        assert_eq!(p.folded(), "");
        assert!(matches!(p.write_svg(Vec::new()), Err(ProfileError::Empty)));
    }

    #[test]
    fn test_errors_name_the_path() {
        let e = ProfileError::File {
            path: PathBuf::from("/x/profile.svg"),
            source: io::Error::from(io::ErrorKind::PermissionDenied),
        };
        assert!(
            e.to_string().starts_with("cannot write /x/profile.svg: "),
            "{e}"
        );
        assert_eq!(
            ProfileError::Empty.to_string(),
            "the profile has no samples"
        );
    }
}
