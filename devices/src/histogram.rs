//! A fixed-size log-linear histogram of nanosecond values.
//!
//! Values below 16 ns have a bucket each; above, every power of two is split
//! into [`SUB_BUCKETS`] equal buckets, so a bucket's width is at most 1/8 of
//! its lower bound (12.5 % resolution). No allocation; recording is O(1).

/// Sub-buckets per power of two.
pub const SUB_BUCKETS: usize = 8;
const SUB_BITS: u32 = 3;
const LINEAR: u64 = 16;
const BUCKETS: usize = LINEAR as usize + (64 - 4) * SUB_BUCKETS;

/// A latency histogram.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LatencyHistogram {
    counts: [u64; BUCKETS],
    count: u64,
    max: u64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self {
            counts: [0; BUCKETS],
            count: 0,
            max: 0,
        }
    }
}

fn bucket_of(value: u64) -> usize {
    if value < LINEAR {
        return value as usize;
    }
    let exp = 63 - value.leading_zeros(); // >= 4
    let sub = (value >> (exp - SUB_BITS)) as usize & (SUB_BUCKETS - 1);
    LINEAR as usize + (exp as usize - 4) * SUB_BUCKETS + sub
}

/// The largest value that falls in bucket `index`.
fn upper_bound(index: usize) -> u64 {
    if index < LINEAR as usize {
        return index as u64;
    }
    let exp = (index - LINEAR as usize) / SUB_BUCKETS + 4;
    let sub = ((index - LINEAR as usize) % SUB_BUCKETS) as u64;
    let width = 1u64 << (exp - SUB_BITS as usize);
    (1u64 << exp) + sub * width + (width - 1)
}

impl LatencyHistogram {
    /// An empty histogram.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records one value.
    pub fn record(&mut self, value: u64) {
        self.counts[bucket_of(value)] += 1;
        self.count += 1;
        self.max = self.max.max(value);
    }

    /// Number of values recorded.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The largest value recorded (0 when empty).
    pub fn max(&self) -> u64 {
        self.max
    }

    /// The value at percentile `p` (0..=100): the upper bound of the bucket that
    /// holds it, capped at the maximum. 0 when empty.
    pub fn percentile(&self, p: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((p.clamp(0.0, 100.0) / 100.0) * self.count as f64)
            .ceil()
            .max(1.0) as u64;
        let mut seen = 0;
        for (index, &n) in self.counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return upper_bound(index).min(self.max);
            }
        }
        self.max
    }

    /// Adds another histogram's values.
    pub fn merge(&mut self, other: &Self) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += b;
        }
        self.count += other.count;
        self.max = self.max.max(other.max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_buckets_cover_their_values() {
        for value in (0..100_000u64).chain([u64::MAX, u64::MAX / 3, 1 << 40]) {
            let b = bucket_of(value);
            assert!(upper_bound(b) >= value, "{value} above its bucket {b}");
            if b > 0 {
                assert!(
                    upper_bound(b - 1) < value,
                    "{value} belongs to an earlier bucket"
                );
            }
        }
    }

    #[test]
    fn test_percentiles_of_a_uniform_distribution() {
        let mut h = LatencyHistogram::new();
        for v in 1..=10_000u64 {
            h.record(v * 100);
        }
        let p50 = h.percentile(50.0) as f64;
        let p99 = h.percentile(99.0) as f64;
        assert!((p50 - 500_000.0).abs() / 500_000.0 <= 0.125, "p50 {p50}");
        assert!((p99 - 990_000.0).abs() / 990_000.0 <= 0.125, "p99 {p99}");
        assert_eq!(h.max(), 1_000_000);
        assert_eq!(h.percentile(100.0), 1_000_000);
        assert_eq!(h.count(), 10_000);
    }

    #[test]
    fn test_empty_and_merge() {
        let mut a = LatencyHistogram::new();
        assert_eq!(a.percentile(50.0), 0);
        let mut b = LatencyHistogram::new();
        b.record(7);
        b.record(9);
        a.record(1_000);
        a.merge(&b);
        assert_eq!(a.count(), 3);
        assert_eq!(a.max(), 1_000);
        assert_eq!(a.percentile(50.0), 9);
    }
}
