//! Where samples go when they leave the vCPU thread: one aggregate per vCPU
//! that counts each distinct stack as samples arrive, so memory grows with
//! the number of distinct stacks, not with the length of the run. The end of
//! the run drains it; while the VM runs a reader takes a snapshot, which
//! copies each vCPU's counts under that vCPU's lock and leaves them in place.
//! Each vCPU thread adds only to its own aggregate, so the lock it takes is
//! uncontended except during a drain or the copy of a snapshot.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::capture::RawSample;
use super::samplers::Totals;

/// Distinct stacks kept per vCPU at most between two drains; a sample with a
/// new stack beyond that is counted as dropped.
pub const STACK_LIMIT: usize = 200_000;

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

impl From<RawSample> for StackSample {
    fn from(raw: RawSample) -> Self {
        Self {
            vcpu: raw.vcpu,
            tid: raw.tid,
            thread_name: raw.thread_name,
            cpl: raw.cpl,
            user_stack: raw.user_stack.frames,
            kernel_stack: raw.kernel_stack.frames,
            user_leaf_after_trap: raw.user_leaf_after_trap,
        }
    }
}

/// One vCPU's stack counts and sampler totals.
#[derive(Debug, Default)]
struct Counts {
    stacks: HashMap<StackSample, u64>,
    totals: Totals,
}

/// The per-vCPU stack counts, and what the samplers captured.
#[derive(Debug)]
pub struct SampleBuffer {
    per_vcpu: Vec<Mutex<Counts>>,
    limit: usize,
    dropped: Vec<AtomicU64>,
}

impl SampleBuffer {
    /// Aggregates for `vcpus` vCPUs of at most `limit` distinct stacks each.
    pub fn new(vcpus: usize, limit: usize) -> Self {
        Self {
            per_vcpu: (0..vcpus).map(|_| Mutex::new(Counts::default())).collect(),
            limit,
            dropped: (0..vcpus).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Counts `sample` in its vCPU's totals and, if it describes a place in
    /// the code ([`RawSample::in_profile`]), its stack in its vCPU's
    /// aggregate; `false` (and counted as dropped) when its stack is new and
    /// the aggregate is full, or the vCPU does not exist.
    pub fn push(&self, sample: RawSample) -> bool {
        let id = sample.vcpu as usize;
        let Some(counts) = self.per_vcpu.get(id) else {
            return false;
        };
        let mut counts = counts.lock().unwrap_or_else(|p| p.into_inner());
        counts.totals.add_one(&sample);
        if !sample.in_profile() {
            return true;
        }
        let key = StackSample::from(sample);
        let counts = &mut counts.stacks;
        if let Some(count) = counts.get_mut(&key) {
            *count += 1;
            return true;
        }
        if counts.len() < self.limit {
            counts.insert(key, 1);
            true
        } else {
            self.dropped[id].fetch_add(1, Ordering::Relaxed);
            false
        }
    }

    /// Samples of vCPU `id` not kept because its aggregate was full.
    pub fn dropped(&self, id: u32) -> u64 {
        self.dropped
            .get(id as usize)
            .map_or(0, |d| d.load(Ordering::Relaxed))
    }

    /// Takes every stack counted so far with its count, vCPU by vCPU, in a
    /// stable order.
    pub fn drain(&self) -> Vec<(StackSample, u64)> {
        let mut all = Vec::new();
        for counts in &self.per_vcpu {
            let stacks =
                std::mem::take(&mut counts.lock().unwrap_or_else(|p| p.into_inner()).stacks);
            let mut counts: Vec<(StackSample, u64)> = stacks.into_iter().collect();
            counts.sort();
            all.append(&mut counts);
        }
        all
    }

    /// Copies every stack counted so far with its count, vCPU by vCPU, in the
    /// order of [`SampleBuffer::drain`], and leaves them counted: each vCPU's
    /// lock is held only while its counts are copied (sorted after).
    pub fn snapshot(&self) -> Vec<(StackSample, u64)> {
        let mut all = Vec::new();
        for counts in &self.per_vcpu {
            let mut copy: Vec<(StackSample, u64)> = {
                let counts = counts.lock().unwrap_or_else(|p| p.into_inner());
                counts.stacks.iter().map(|(s, n)| (s.clone(), *n)).collect()
            };
            copy.sort();
            all.append(&mut copy);
        }
        all
    }

    /// Whether no stack is counted (each vCPU's lock held only to look).
    pub fn is_empty(&self) -> bool {
        self.per_vcpu.iter().all(|c| {
            c.lock()
                .unwrap_or_else(|p| p.into_inner())
                .stacks
                .is_empty()
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
        let buffer = SampleBuffer::new(1, 10);
        let mut task_only = sample(0, 1, 0xaa);
        task_only.samplers = Box::new(SamplerData {
            sampled: sampler::TK_INFO,
            tk_info: Some(TaskInfoRecord::default()),
            ..Default::default()
        });
        assert!(buffer.push(task_only));
        assert!(buffer.push(sample(0, 2, 0xaa)));
        let stacks = buffer.drain();
        assert_eq!(stacks.len(), 1);
        assert_eq!(stacks[0].1, 1);
        let totals = buffer.take_totals();
        assert_eq!(totals.captured.get("tk_info"), Some(&1));
    }

    #[test]
    fn test_identical_stacks_are_counted_not_kept() {
        let buffer = SampleBuffer::new(2, 10);
        // The time differs, the stack does not: one entry, three samples.
        for t in 0..3 {
            assert!(buffer.push(sample(0, t, 0xaa)));
        }
        assert!(buffer.push(sample(0, 9, 0xbb)));
        assert!(buffer.push(sample(1, 9, 0xaa)));
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
        let buffer = SampleBuffer::new(2, 10);
        assert!(buffer.snapshot().is_empty());
        assert!(buffer.is_empty());
        assert!(buffer.push(sample(1, 1, 0xaa)));
        assert!(!buffer.is_empty());
        assert!(buffer.push(sample(0, 2, 0xbb)));
        assert!(buffer.push(sample(0, 3, 0xbb)));
        let first = buffer.snapshot();
        // Each vCPU's counts in the drain's order, and still there.
        assert_eq!(buffer.snapshot(), first);
        assert!(buffer.push(sample(0, 4, 0xbb)));
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

    #[test]
    fn test_distinct_stacks_are_bounded_per_vcpu_and_drops_counted() {
        let buffer = SampleBuffer::new(2, 2);
        assert!(buffer.push(sample(0, 1, 0x1)));
        assert!(buffer.push(sample(0, 2, 0x2)));
        // A third distinct stack does not fit; a known one still counts.
        assert!(!buffer.push(sample(0, 3, 0x3)));
        assert!(buffer.push(sample(0, 4, 0x1)));
        assert!(!buffer.push(sample(7, 5, 0x1)));
        assert_eq!((buffer.dropped(0), buffer.dropped(1)), (1, 0));
        let total: u64 = buffer.drain().iter().map(|(_, n)| n).sum();
        assert_eq!(total, 3);
        // Drained: room again.
        assert!(buffer.push(sample(0, 6, 0x3)));
    }
}
