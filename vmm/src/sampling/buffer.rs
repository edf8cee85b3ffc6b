//! Where samples go when they leave the vCPU thread: one bounded buffer per
//! vCPU, drained by whoever reads the profile (the end of the run today; any
//! thread may drain while the VM runs). Each vCPU thread pushes only into its
//! own buffer, so the lock it takes is uncontended except during a drain.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::capture::RawSample;

/// Samples kept per vCPU at most between two drains.
pub const SAMPLE_LIMIT: usize = 2_000_000;

/// The per-vCPU sample buffers.
#[derive(Debug)]
pub struct SampleBuffer {
    per_vcpu: Vec<Mutex<Vec<RawSample>>>,
    limit: usize,
    dropped: Vec<AtomicU64>,
}

impl SampleBuffer {
    /// Buffers for `vcpus` vCPUs of at most `limit` samples each.
    pub fn new(vcpus: usize, limit: usize) -> Self {
        Self {
            per_vcpu: (0..vcpus).map(|_| Mutex::new(Vec::new())).collect(),
            limit,
            dropped: (0..vcpus).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Keeps `sample` in its vCPU's buffer; `false` (and counted as dropped)
    /// when that buffer is full or the vCPU does not exist.
    pub fn push(&self, sample: RawSample) -> bool {
        let id = sample.vcpu as usize;
        let Some(buffer) = self.per_vcpu.get(id) else {
            return false;
        };
        let mut buffer = buffer.lock().unwrap_or_else(|p| p.into_inner());
        if buffer.len() < self.limit {
            buffer.push(sample);
            true
        } else {
            self.dropped[id].fetch_add(1, Ordering::Relaxed);
            false
        }
    }

    /// Samples of vCPU `id` not kept because its buffer was full.
    pub fn dropped(&self, id: u32) -> u64 {
        self.dropped
            .get(id as usize)
            .map_or(0, |d| d.load(Ordering::Relaxed))
    }

    /// Takes every sample kept so far, vCPU by vCPU.
    pub fn drain(&self) -> Vec<RawSample> {
        let mut all = Vec::new();
        for buffer in &self.per_vcpu {
            all.append(&mut buffer.lock().unwrap_or_else(|p| p.into_inner()));
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(vcpu: u32, time_ns: u64) -> RawSample {
        RawSample {
            vcpu,
            time_ns,
            ..Default::default()
        }
    }

    #[test]
    fn test_buffer_is_bounded_per_vcpu_and_counts_what_it_drops() {
        let buffer = SampleBuffer::new(2, 2);
        assert!(buffer.push(sample(0, 1)));
        assert!(buffer.push(sample(0, 2)));
        assert!(!buffer.push(sample(0, 3)));
        assert!(buffer.push(sample(1, 4)));
        assert!(!buffer.push(sample(7, 5)));
        assert_eq!((buffer.dropped(0), buffer.dropped(1)), (1, 0));
        let times: Vec<u64> = buffer.drain().iter().map(|s| s.time_ns).collect();
        assert_eq!(times, [1, 2, 4]);
        // Drained: room again.
        assert!(buffer.push(sample(0, 6)));
        assert_eq!(buffer.drain().len(), 1);
    }
}
