//! Where samples go when they leave the vCPU thread: one aggregate per vCPU
//! that counts each distinct stack as samples arrive, so memory grows with
//! the number of distinct stacks, not with the length of the run. The end of
//! the run drains it; while the VM runs a reader takes a snapshot, which
//! copies each vCPU's counts under that vCPU's lock and leaves them in place.
//! Each vCPU thread adds only to its own aggregate, so the lock it takes is
//! uncontended except during a drain or the copy of a snapshot.
//!
//! Each aggregate has a memory budget ([`STACK_BUDGET_BYTES`], shared out
//! among the vCPUs). A stack is kept compactly: its thread name interned,
//! both stacks in one boxed slice. Once the budget is spent, a sample with a
//! new stack is *folded*: counted in its thread under the one pseudo frame
//! [`FOLDED_STACK`] (`[stack table full]` in every output), so each thread's
//! share of the profile stays true and memory stays flat however long the
//! run. A folded entry is one per (thread id, privilege level), named by the
//! first name seen for it, so a guest thread renaming itself cannot open
//! more; they are bounded too ([`FOLDED_LIMIT`]), and a sample that fits
//! neither is counted as dropped. A sampled stack that holds the
//! [`FOLDED_STACK`] address itself (only garbage could) ends before it.

use std::collections::{HashMap, HashSet};
use std::mem::size_of;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::capture::RawSample;
use super::samplers::Totals;
use crate::profile::FOLDED_STACK;

/// The memory all vCPUs' aggregates of one kind (on-CPU or PET) may use for
/// their stacks, shared out equally among the vCPUs; each vCPU gets at least
/// [`MIN_VCPU_BUDGET_BYTES`].
pub const STACK_BUDGET_BYTES: usize = 32 << 20;
/// The least budget one vCPU's aggregate gets.
pub const MIN_VCPU_BUDGET_BYTES: usize = 1 << 20;
/// The hidden, test-only variable that sets each vCPU's budget in bytes
/// directly (no floor), so that a short run can show folding. Not meant for
/// use otherwise.
pub const TEST_VCPU_BUDGET_ENV: &str = "METRONOME_TEST_STACK_BUDGET_BYTES";
/// Folded entries (one per thread) kept per vCPU at most, beyond the budget.
pub const FOLDED_LIMIT: usize = 1024;

/// What a profile keeps of a sample: its identity and its stacks (not its
/// time, which the trace keeps).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StackSample {
    /// The vCPU.
    pub vcpu: u32,
    /// Guest thread id (0 = idle).
    pub tid: u64,
    /// Guest thread name.
    pub thread_name: String,
    /// Privilege level at the sample.
    pub cpl: u8,
    /// The user stack, leaf first.
    pub user_stack: Vec<u64>,
    /// The kernel stack, leaf first.
    pub kernel_stack: Vec<u64>,
    /// The user leaf is the address after the `int3` system-call trap.
    pub user_leaf_after_trap: bool,
}

/// A stack as one vCPU's aggregate keeps it: the vCPU is the aggregate's,
/// the name shared with every other stack of that name, the user stack
/// followed by the kernel stack in one allocation.
#[derive(Debug, PartialEq, Eq, Hash)]
struct Key {
    tid: u64,
    name: Arc<str>,
    frames: Box<[u64]>,
    user_len: u32,
    cpl: u8,
    user_leaf_after_trap: bool,
}

impl Key {
    fn to_sample(&self, vcpu: u32) -> StackSample {
        let (user, kernel) = self.frames.split_at(self.user_len as usize);
        StackSample {
            vcpu,
            tid: self.tid,
            thread_name: self.name.to_string(),
            cpl: self.cpl,
            user_stack: user.to_vec(),
            kernel_stack: kernel.to_vec(),
            user_leaf_after_trap: self.user_leaf_after_trap,
        }
    }

    /// The bytes a new entry of this key costs: its slot (16/7 of it, the
    /// table's spare capacity at its fullest after growing) and its frames'
    /// allocation.
    fn cost(&self) -> usize {
        (size_of::<(Key, u64)>() * 16).div_ceil(7)
            + self.frames.len() * size_of::<u64>()
            + ALLOC_OVERHEAD
    }
}

/// A sample's stacks as a key keeps them: the user stack then the kernel
/// stack in one allocation, each ended before a [`FOLDED_STACK`] frame.
fn joined_frames(user: &[u64], kernel: &[u64]) -> (Box<[u64]>, u32) {
    let (user, kernel) = (before_folded(user), before_folded(kernel));
    // One allocation, of the exact size: the boxed slice keeps it.
    let mut frames = Vec::with_capacity(user.len() + kernel.len());
    frames.extend_from_slice(user);
    frames.extend_from_slice(kernel);
    // Cannot truncate: walks are at most a few hundred frames deep.
    let user_len = u32::try_from(user.len()).unwrap_or(u32::MAX);
    (frames.into_boxed_slice(), user_len)
}

/// `stack` up to its first [`FOLDED_STACK`] frame.
fn before_folded(stack: &[u64]) -> &[u64] {
    let end = stack
        .iter()
        .position(|&f| f == FOLDED_STACK)
        .unwrap_or(stack.len());
    &stack[..end]
}

/// The allocator's overhead per allocation, as counted against the budget.
const ALLOC_OVERHEAD: usize = 16;

/// One vCPU's stack counts and sampler totals.
#[derive(Debug, Default)]
struct Counts {
    stacks: HashMap<Key, u64>,
    names: HashSet<Arc<str>>,
    /// Bytes of the budget spent.
    used: usize,
    /// The folded entries: (tid, privilege level) to the name they are
    /// shown under and their count.
    folded: HashMap<(u64, u8), (Arc<str>, u64)>,
    totals: Totals,
}

impl Counts {
    /// Every entry as a [`StackSample`] of vCPU `vcpu` with its count,
    /// folded ones included, unsorted.
    fn samples(&self, vcpu: u32) -> Vec<(StackSample, u64)> {
        self.stacks
            .iter()
            .map(|(k, n)| (k.to_sample(vcpu), *n))
            .chain(self.folded.iter().map(|(&(tid, cpl), (name, n))| {
                let sample = StackSample {
                    vcpu,
                    tid,
                    thread_name: name.to_string(),
                    cpl,
                    user_stack: vec![FOLDED_STACK],
                    kernel_stack: Vec::new(),
                    user_leaf_after_trap: false,
                };
                (sample, *n)
            }))
            .collect()
    }

    /// `name`, shared with the aggregate's other stacks of that name; `None`
    /// when it is new and `budget` cannot pay for it.
    fn intern(&mut self, name: &str, budget: usize) -> Option<Arc<str>> {
        if let Some(known) = self.names.get(name) {
            return Some(known.clone());
        }
        let cost = 2 * size_of::<Arc<str>>() + name.len() + 2 * size_of::<usize>() + ALLOC_OVERHEAD;
        if self.used + cost > budget {
            return None;
        }
        self.used += cost;
        let name: Arc<str> = Arc::from(name);
        self.names.insert(name.clone());
        Some(name)
    }
}

/// What [`SampleBuffer::push`] did with a sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pushed {
    /// Counted under its own stack.
    Kept,
    /// Counted in its thread under [`FOLDED_STACK`]: the budget was spent.
    Folded,
    /// Not counted in the profile: no budget and no folded entry left, or no
    /// such vCPU.
    Dropped,
}

/// The per-vCPU stack counts, and what the samplers captured.
#[derive(Debug)]
pub struct SampleBuffer {
    per_vcpu: Vec<Mutex<Counts>>,
    budget: usize,
    dropped: Vec<AtomicU64>,
    folded: Vec<AtomicU64>,
}

impl SampleBuffer {
    /// Aggregates for `vcpus` vCPUs sharing `budget` bytes of stacks (at least
    /// [`MIN_VCPU_BUDGET_BYTES`] each).
    pub fn new(vcpus: usize, budget: usize) -> Self {
        Self::with_vcpu_budget(vcpus, (budget / vcpus.max(1)).max(MIN_VCPU_BUDGET_BYTES))
    }

    /// [`SampleBuffer::new`] with [`STACK_BUDGET_BYTES`], unless the hidden
    /// [`TEST_VCPU_BUDGET_ENV`] sets each vCPU's budget.
    pub fn with_default_budget(vcpus: usize) -> Self {
        match std::env::var(TEST_VCPU_BUDGET_ENV)
            .ok()
            .and_then(|v| v.parse().ok())
        {
            Some(per_vcpu) => Self::with_vcpu_budget(vcpus, per_vcpu),
            None => Self::new(vcpus, STACK_BUDGET_BYTES),
        }
    }

    /// Aggregates for `vcpus` vCPUs of `budget` bytes of stacks each.
    fn with_vcpu_budget(vcpus: usize, budget: usize) -> Self {
        Self {
            per_vcpu: (0..vcpus).map(|_| Mutex::new(Counts::default())).collect(),
            budget,
            dropped: (0..vcpus).map(|_| AtomicU64::new(0)).collect(),
            folded: (0..vcpus).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Counts `sample` in its vCPU's totals and, if it describes a place in
    /// the code ([`RawSample::in_profile`]), its stack in its vCPU's
    /// aggregate: under its own stack while the budget lasts, then folded.
    pub fn push(&self, sample: RawSample) -> Pushed {
        let id = sample.vcpu as usize;
        let Some(counts) = self.per_vcpu.get(id) else {
            return Pushed::Dropped;
        };
        // Built before the lock is taken.
        let frames = sample
            .in_profile()
            .then(|| joined_frames(&sample.user_stack.frames, &sample.kernel_stack.frames));
        let mut counts = counts.lock().unwrap_or_else(|p| p.into_inner());
        counts.totals.add_one(&sample);
        let Some((frames, user_len)) = frames else {
            return Pushed::Kept;
        };
        let outcome = self.count(&mut counts, &sample, frames, user_len);
        match outcome {
            Pushed::Kept => {}
            Pushed::Folded => {
                self.folded[id].fetch_add(1, Ordering::Relaxed);
            }
            Pushed::Dropped => {
                self.dropped[id].fetch_add(1, Ordering::Relaxed);
            }
        }
        outcome
    }

    fn count(
        &self,
        counts: &mut Counts,
        sample: &RawSample,
        frames: Box<[u64]>,
        user_len: u32,
    ) -> Pushed {
        // A known name costs nothing; a new one is paid from the budget.
        // (A name that does not fit means no stack fits either: a name costs
        // far less than the smallest entry.)
        let Some(name) = counts.intern(&sample.thread_name, self.budget) else {
            return Self::fold(counts, sample);
        };
        let key = Key {
            tid: sample.tid,
            name,
            frames,
            user_len,
            cpl: sample.cpl,
            user_leaf_after_trap: sample.user_leaf_after_trap,
        };
        if let Some(count) = counts.stacks.get_mut(&key) {
            *count += 1;
            return Pushed::Kept;
        }
        let cost = key.cost();
        if counts.used + cost <= self.budget {
            counts.used += cost;
            counts.stacks.insert(key, 1);
            return Pushed::Kept;
        }
        Self::fold(counts, sample)
    }

    /// Counts `sample` in its thread's folded entry, made (under the name
    /// the sample gives) if there is room for one.
    fn fold(counts: &mut Counts, sample: &RawSample) -> Pushed {
        let id = (sample.tid, sample.cpl);
        if let Some((_, count)) = counts.folded.get_mut(&id) {
            *count += 1;
            return Pushed::Folded;
        }
        if counts.folded.len() >= FOLDED_LIMIT {
            return Pushed::Dropped;
        }
        let name = counts
            .names
            .get(sample.thread_name.as_str())
            .cloned()
            .unwrap_or_else(|| Arc::from(sample.thread_name.as_str()));
        counts.folded.insert(id, (name, 1));
        Pushed::Folded
    }

    /// Samples of vCPU `id` not in the profile: no budget and no folded
    /// entry left for their thread.
    pub fn dropped(&self, id: u32) -> u64 {
        self.dropped
            .get(id as usize)
            .map_or(0, |d| d.load(Ordering::Relaxed))
    }

    /// Samples of vCPU `id` counted under [`FOLDED_STACK`] because the
    /// budget was spent.
    pub fn folded(&self, id: u32) -> u64 {
        self.folded
            .get(id as usize)
            .map_or(0, |d| d.load(Ordering::Relaxed))
    }

    /// Takes every stack counted so far with its count, vCPU by vCPU, in a
    /// stable order, and gives the budget back.
    pub fn drain(&self) -> Vec<(StackSample, u64)> {
        let mut all = Vec::new();
        for (id, counts) in self.per_vcpu.iter().enumerate() {
            let taken = {
                let mut counts = counts.lock().unwrap_or_else(|p| p.into_inner());
                let totals = std::mem::take(&mut counts.totals);
                std::mem::replace(
                    &mut *counts,
                    Counts {
                        totals,
                        ..Counts::default()
                    },
                )
            };
            // Cannot truncate: fewer vCPUs than u32::MAX.
            let mut samples = taken.samples(id as u32);
            samples.sort();
            all.append(&mut samples);
        }
        all
    }

    /// Copies every stack counted so far with its count, vCPU by vCPU, in the
    /// order of [`SampleBuffer::drain`], and leaves them counted: each
    /// vCPU's lock is held only while its counts are copied (sorted after).
    pub fn snapshot(&self) -> Vec<(StackSample, u64)> {
        let mut all = Vec::new();
        for (id, counts) in self.per_vcpu.iter().enumerate() {
            // Cannot truncate: fewer vCPUs than u32::MAX.
            let mut samples = counts
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .samples(id as u32);
            samples.sort();
            all.append(&mut samples);
        }
        all
    }

    /// Whether no stack is counted (each vCPU's lock held only to look).
    pub fn is_empty(&self) -> bool {
        self.per_vcpu.iter().all(|c| {
            let counts = c.lock().unwrap_or_else(|p| p.into_inner());
            counts.stacks.is_empty() && counts.folded.is_empty()
        })
    }

    /// Copies the sampler totals so far, all vCPUs merged, and leaves them.
    pub fn snapshot_totals(&self) -> Totals {
        let mut all = Totals::default();
        for counts in &self.per_vcpu {
            let totals = counts
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .totals
                .clone();
            all.merge(&totals);
        }
        all
    }

    /// Takes the sampler totals so far, all vCPUs merged.
    pub fn take_totals(&self) -> Totals {
        let mut all = Totals::default();
        for counts in &self.per_vcpu {
            let totals =
                std::mem::take(&mut counts.lock().unwrap_or_else(|p| p.into_inner()).totals);
            all.merge(&totals);
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::samplers::{SamplerData, TaskInfoRecord};
    use crate::sampling::walk::Stack;
    use kperf::sampler;

    fn sample(vcpu: u32, time_ns: u64, leaf: u64) -> RawSample {
        RawSample {
            vcpu,
            time_ns,
            user_stack: Stack {
                frames: vec![leaf, 0x1000],
                ..Default::default()
            },
            samplers: Box::new(SamplerData {
                sampled: sampler::USTACK,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn test_a_sample_without_thread_or_stack_samplers_counts_only_in_the_totals() {
        let buffer = SampleBuffer::new(1, STACK_BUDGET_BYTES);
        let mut task_only = sample(0, 1, 0xaa);
        task_only.samplers = Box::new(SamplerData {
            sampled: sampler::TK_INFO,
            tk_info: Some(TaskInfoRecord::default()),
            ..Default::default()
        });
        assert_eq!(Pushed::Kept, buffer.push(task_only));
        assert_eq!(Pushed::Kept, buffer.push(sample(0, 2, 0xaa)));
        let stacks = buffer.drain();
        assert_eq!(stacks.len(), 1);
        assert_eq!(stacks[0].1, 1);
        let totals = buffer.take_totals();
        assert_eq!(totals.captured.get("tk_info"), Some(&1));
    }

    #[test]
    fn test_identical_stacks_are_counted_not_kept() {
        let buffer = SampleBuffer::new(2, STACK_BUDGET_BYTES);
        // The time differs, the stack does not: one entry, three samples.
        for t in 0..3 {
            assert_eq!(Pushed::Kept, buffer.push(sample(0, t, 0xaa)));
        }
        assert_eq!(Pushed::Kept, buffer.push(sample(0, 9, 0xbb)));
        assert_eq!(Pushed::Kept, buffer.push(sample(1, 9, 0xaa)));
        let drained = buffer.drain();
        let counts: Vec<(u32, u64, u64)> = drained
            .iter()
            .map(|(s, n)| (s.vcpu, s.user_stack[0], *n))
            .collect();
        assert_eq!(counts, [(0, 0xaa, 3), (0, 0xbb, 1), (1, 0xaa, 1)]);
        assert!(buffer.drain().is_empty());
    }

    #[test]
    fn test_a_snapshot_copies_and_does_not_drain() {
        let buffer = SampleBuffer::new(2, STACK_BUDGET_BYTES);
        assert!(buffer.snapshot().is_empty());
        assert!(buffer.is_empty());
        assert_eq!(Pushed::Kept, buffer.push(sample(1, 1, 0xaa)));
        assert!(!buffer.is_empty());
        assert_eq!(Pushed::Kept, buffer.push(sample(0, 2, 0xbb)));
        assert_eq!(Pushed::Kept, buffer.push(sample(0, 3, 0xbb)));
        let first = buffer.snapshot();
        // Each vCPU's counts in the drain's order, and still there.
        assert_eq!(buffer.snapshot(), first);
        assert_eq!(Pushed::Kept, buffer.push(sample(0, 4, 0xbb)));
        let second = buffer.snapshot();
        let total = |v: &[(StackSample, u64)]| v.iter().map(|(_, n)| n).sum::<u64>();
        assert_eq!((total(&first), total(&second)), (3, 4));
        assert_eq!(
            buffer.snapshot_totals().captured.get("ustack"),
            Some(&4),
            "{:?}",
            buffer.snapshot_totals()
        );
        assert_eq!(buffer.snapshot_totals(), buffer.snapshot_totals());
        assert_eq!(buffer.drain(), second);
        assert_eq!(buffer.take_totals().captured.get("ustack"), Some(&4));
    }

    /// A buffer whose vCPUs each have room for `n` stacks like [`sample`]'s
    /// (two frames, and the name).
    fn room_for(vcpus: usize, n: usize) -> SampleBuffer {
        let mut counts = Counts::default();
        let name = counts.intern("", usize::MAX).expect("no budget");
        let key = Key {
            tid: 0,
            name,
            frames: Box::new([0, 0]),
            user_len: 2,
            cpl: 0,
            user_leaf_after_trap: false,
        };
        SampleBuffer::with_vcpu_budget(vcpus, counts.used + n * key.cost())
    }

    #[test]
    fn test_a_full_stack_table_folds_new_stacks_into_their_thread() {
        let buffer = room_for(2, 2);
        assert_eq!(buffer.push(sample(0, 1, 0x1)), Pushed::Kept);
        assert_eq!(buffer.push(sample(0, 2, 0x2)), Pushed::Kept);
        // A third distinct stack does not fit: counted in its thread under
        // the folded frame; a known stack still counts as itself.
        assert_eq!(buffer.push(sample(0, 3, 0x3)), Pushed::Folded);
        assert_eq!(buffer.push(sample(0, 4, 0x4)), Pushed::Folded);
        assert_eq!(buffer.push(sample(0, 5, 0x1)), Pushed::Kept);
        // Another thread gets its own folded entry.
        let mut other = sample(0, 6, 0x5);
        other.tid = 9;
        assert_eq!(buffer.push(other), Pushed::Folded);
        // vCPU 1 has its own budget; vCPU 7 does not exist.
        assert_eq!(buffer.push(sample(1, 7, 0x3)), Pushed::Kept);
        assert_eq!(buffer.push(sample(7, 8, 0x1)), Pushed::Dropped);
        assert_eq!((buffer.folded(0), buffer.folded(1)), (3, 0));
        assert_eq!((buffer.dropped(0), buffer.dropped(1)), (0, 0));
        let drained = buffer.drain();
        let got: Vec<(u32, u64, Vec<u64>, u64)> = drained
            .iter()
            .map(|(s, n)| (s.vcpu, s.tid, s.user_stack.clone(), *n))
            .collect();
        assert_eq!(
            got,
            [
                (0, 0, vec![0x1, 0x1000], 2),
                (0, 0, vec![0x2, 0x1000], 1),
                (0, 0, vec![FOLDED_STACK], 2),
                (0, 9, vec![FOLDED_STACK], 1),
                (1, 0, vec![0x3, 0x1000], 1),
            ]
        );
        // Every sample of vCPU 0 is in the profile, folded or not.
        let total: u64 = got.iter().filter(|g| g.0 == 0).map(|g| g.3).sum();
        assert_eq!(total, 6);
        // Drained: the budget is back.
        assert_eq!(buffer.push(sample(0, 9, 0x3)), Pushed::Kept);
    }

    #[test]
    fn test_folded_entries_are_bounded_and_what_fits_nowhere_is_dropped() {
        let buffer = room_for(1, 0);
        for tid in 0..FOLDED_LIMIT as u64 {
            let mut s = sample(0, tid, 0x1);
            s.tid = tid;
            s.thread_name = format!("t{tid}");
            assert_eq!(buffer.push(s), Pushed::Folded, "{tid}");
        }
        let mut s = sample(0, 0, 0x1);
        s.tid = FOLDED_LIMIT as u64;
        assert_eq!(buffer.push(s), Pushed::Dropped);
        // A thread already folded still counts.
        let mut s = sample(0, 0, 0x2);
        s.thread_name = "t0".into();
        assert_eq!(buffer.push(s), Pushed::Folded);
        assert_eq!(
            (buffer.folded(0), buffer.dropped(0)),
            (FOLDED_LIMIT as u64 + 1, 1)
        );
        assert_eq!(buffer.drain().len(), FOLDED_LIMIT);
    }

    #[test]
    fn test_a_thread_renaming_itself_keeps_one_folded_entry_under_its_first_name() {
        let buffer = room_for(1, 0);
        for i in 0..3 * FOLDED_LIMIT as u64 {
            let mut s = sample(0, i, 0x1);
            s.tid = 4;
            s.thread_name = format!("name{i}");
            assert_eq!(buffer.push(s), Pushed::Folded, "{i}");
        }
        let drained = buffer.drain();
        assert_eq!(drained.len(), 1);
        let (folded, n) = &drained[0];
        assert_eq!(
            (folded.tid, folded.thread_name.as_str(), *n),
            (4, "name0", 3 * FOLDED_LIMIT as u64)
        );
        assert_eq!(folded.user_stack, [FOLDED_STACK]);
    }

    #[test]
    fn test_a_sampled_stack_holding_the_folded_address_ends_before_it() {
        let buffer = room_for(1, 4);
        let mut s = sample(0, 1, 0x1);
        s.user_stack.frames = vec![0x10, FOLDED_STACK, 0x20];
        s.kernel_stack.frames = vec![FOLDED_STACK, 0x30];
        assert_eq!(buffer.push(s), Pushed::Kept);
        let drained = buffer.drain();
        assert_eq!(drained[0].0.user_stack, [0x10]);
        assert!(drained[0].0.kernel_stack.is_empty());
    }

    #[test]
    fn test_the_budget_is_shared_out_among_vcpus_with_a_floor() {
        assert_eq!(SampleBuffer::new(2, 8 << 20).budget, 4 << 20);
        assert_eq!(SampleBuffer::new(64, 8 << 20).budget, MIN_VCPU_BUDGET_BYTES);
        assert_eq!(SampleBuffer::new(0, 8 << 20).budget, 8 << 20);
    }
}
