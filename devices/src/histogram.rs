//! A fixed-size log-linear histogram of nanosecond values.
//!
//! Values 0 to 7 each have a bucket of their own. Above, every power of two
//! `[2^e, 2^(e+1))` is split into [`SUB_BUCKETS`] equal buckets of width
//! `2^(e-3)`, so a bucket is at most 1/8 (12.5 %) as wide as its lower bound
//! (the `HdrHistogram` idea with one significant octal digit). The 496 buckets
//! cover all of `u64` in a fixed array: recording is O(1) and never allocates.

/// Sub-buckets per power of two: the histogram's relative resolution is
/// `1 / SUB_BUCKETS`.
pub const SUB_BUCKETS: usize = 8;
/// `log2(SUB_BUCKETS)`.
const SUB_BITS: u32 = SUB_BUCKETS.trailing_zeros();
/// Exact buckets for 0..8, then 8 sub-buckets for each exponent 3..=63.
const BUCKETS: usize = SUB_BUCKETS + (64 - SUB_BITS as usize) * SUB_BUCKETS;

/// The bucket holding `value`.
fn bucket_of(value: u64) -> usize {
    if value < SUB_BUCKETS as u64 {
        // Lossless: value < 8.
        return value as usize;
    }
    let exp = value.ilog2(); // >= SUB_BITS
                             // The top SUB_BITS + 1 bits are 1xxx: keep the xxx.
    let sub = (value >> (exp - SUB_BITS)) as usize & (SUB_BUCKETS - 1);
    SUB_BUCKETS + (exp - SUB_BITS) as usize * SUB_BUCKETS + sub
}

/// The largest value that falls in bucket `index`.
fn upper_bound(index: usize) -> u64 {
    if index < SUB_BUCKETS {
        return index as u64;
    }
    let shift = (index - SUB_BUCKETS) / SUB_BUCKETS; // exp - SUB_BITS
    let mantissa = (SUB_BUCKETS + index % SUB_BUCKETS) as u64; // 8..=15
                                                               // For the last bucket, (15 << 60) + (1 << 60) - 1 == u64::MAX: no overflow.
    (mantissa << shift) + ((1u64 << shift) - 1)
}

/// A histogram of latencies in ns, with 12.5 % resolution.
///
/// # Example
///
/// ```
/// use metronome_devices::LatencyHistogram;
///
/// let mut lateness = LatencyHistogram::new();
/// for ns in [1_000, 2_000, 3_000, 40_000] {
///     lateness.record(ns);
/// }
/// assert_eq!(lateness.count(), 4);
/// assert_eq!(lateness.max(), 40_000);
/// // The median lies in the bucket [1792, 2047].
/// assert_eq!(lateness.percentile(50.0), 2_047);
/// assert_eq!(lateness.percentile(100.0), 40_000);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LatencyHistogram {
    counts: [u64; BUCKETS],
    count: u64,
    max: u64,
    /// Sum of the values, saturating at `u64::MAX` (about 584 years of ns).
    sum: u64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self {
            counts: [0; BUCKETS],
            count: 0,
            max: 0,
            sum: 0,
        }
    }
}

impl LatencyHistogram {
    /// An empty histogram.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records one value in ns.
    pub fn record(&mut self, ns: u64) {
        self.counts[bucket_of(ns)] += 1;
        self.count += 1;
        self.max = self.max.max(ns);
        self.sum = self.sum.saturating_add(ns);
    }

    /// The number of values recorded.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The largest value recorded, exactly; 0 when empty.
    pub fn max(&self) -> u64 {
        self.max
    }

    /// The sum of the values recorded, exactly (saturating at `u64::MAX`).
    pub fn sum(&self) -> u64 {
        self.sum
    }

    /// The non-empty buckets in increasing order: each bucket's largest
    /// value and how many values it holds (for exporting the histogram with
    /// other bucket bounds).
    pub fn buckets(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.counts
            .iter()
            .enumerate()
            .filter(|(_, &n)| n > 0)
            .map(|(index, &n)| (upper_bound(index), n))
    }

    /// The `p`-th percentile (`p` in 0..=100, clamped; NaN counts as 0): the
    /// upper bound of the bucket holding the value of rank `ceil(p% * count)`,
    /// capped at [`max`](Self::max). It is at most 12.5 % above the true value
    /// and never below it. 0 when empty.
    pub fn percentile(&self, p: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let fraction = if p.is_nan() {
            0.0
        } else {
            p.clamp(0.0, 100.0) / 100.0
        };
        // Float-to-int `as` saturates; the clamp keeps the rank in 1..=count.
        let rank = ((fraction * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0u64;
        for (index, &n) in self.counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return upper_bound(index).min(self.max);
            }
        }
        // Unreachable while the bucket counts sum to `count`.
        self.max
    }

    /// Adds all of `other`'s values to this histogram.
    pub fn merge(&mut self, other: &Self) {
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine += theirs;
        }
        self.count += other.count;
        self.max = self.max.max(other.max);
        self.sum = self.sum.saturating_add(other.sum);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Asserts that `reported` is within the histogram's resolution above `exact`.
    fn assert_close(reported: u64, exact: u64) {
        assert!(reported >= exact, "{reported} below {exact}");
        let error = (reported - exact) as f64 / exact as f64;
        assert!(error <= 0.125, "{reported} is {error:.3} above {exact}");
    }

    #[test]
    fn test_sum_and_buckets_account_for_every_value() {
        let mut h = LatencyHistogram::new();
        for ns in [3, 3, 1_000, 1_001, 5_000_000] {
            h.record(ns);
        }
        assert_eq!(h.sum(), 5_002_007);
        let buckets: Vec<(u64, u64)> = h.buckets().collect();
        assert_eq!(buckets.iter().map(|(_, n)| n).sum::<u64>(), h.count());
        assert_eq!(buckets[0], (3, 2));
        // 1000 and 1001 share the bucket [960, 1023].
        assert_eq!(buckets[1], (1_023, 2));
        assert!(buckets[2].0 >= 5_000_000 && buckets[2].1 == 1);
        let mut merged = h.clone();
        merged.merge(&h);
        assert_eq!(merged.sum(), 2 * h.sum());
    }

    #[test]
    fn test_bucket_count_covers_u64() {
        assert_eq!(BUCKETS, 496);
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
        assert_eq!(upper_bound(BUCKETS - 1), u64::MAX);
    }

    #[test]
    fn test_buckets_are_contiguous_and_cover_their_values() {
        let edges = (0..64).flat_map(|e| {
            let p = 1u64 << e;
            [p - 1, p, p + 1]
        });
        for value in (0..100_000u64).chain(edges).chain([u64::MAX, u64::MAX / 3]) {
            let b = bucket_of(value);
            assert!(upper_bound(b) >= value, "{value} above its bucket {b}");
            if b > 0 {
                assert!(
                    upper_bound(b - 1) < value,
                    "{value} belongs below bucket {b}"
                );
            }
        }
    }

    #[test]
    fn test_bucket_width_within_resolution() {
        for b in SUB_BUCKETS..BUCKETS {
            let lower = upper_bound(b - 1) + 1;
            let width = upper_bound(b) - lower + 1;
            assert!(
                width <= lower / 8,
                "bucket {b}: width {width}, lower {lower}"
            );
        }
    }

    #[test]
    fn test_small_values_exact() {
        let mut h = LatencyHistogram::new();
        for v in 0..8 {
            h.record(v);
        }
        assert_eq!(h.percentile(0.0), 0);
        assert_eq!(h.percentile(50.0), 3);
        assert_eq!(h.percentile(100.0), 7);
    }

    #[test]
    fn test_percentiles_of_uniform_distribution() {
        let mut h = LatencyHistogram::new();
        for v in 1..=10_000u64 {
            h.record(v * 100);
        }
        assert_eq!(h.count(), 10_000);
        assert_eq!(h.max(), 1_000_000);
        assert_close(h.percentile(50.0), 500_000);
        assert_close(h.percentile(90.0), 900_000);
        assert_close(h.percentile(99.0), 990_000);
        assert_close(h.percentile(0.0), 100);
        assert_eq!(h.percentile(100.0), 1_000_000);
    }

    #[test]
    fn test_percentiles_of_skewed_distribution() {
        // 99 % fast deliveries (about 2 us), 1 % slow ones (about 5 ms).
        let mut h = LatencyHistogram::new();
        for i in 0..99_000u64 {
            h.record(2_000 + i % 100);
        }
        for i in 0..1_000u64 {
            h.record(5_000_000 + i);
        }
        assert_close(h.percentile(50.0), 2_049);
        assert_close(h.percentile(98.9), 2_099);
        assert_close(h.percentile(99.5), 5_000_499);
        assert_eq!(h.percentile(100.0), 5_000_999);
    }

    #[test]
    fn test_percentile_argument_clamped() {
        let mut h = LatencyHistogram::new();
        h.record(10);
        h.record(1_000);
        assert_eq!(h.percentile(-5.0), h.percentile(0.0));
        assert_eq!(h.percentile(f64::NAN), h.percentile(0.0));
        assert_eq!(h.percentile(500.0), 1_000);
    }

    #[test]
    fn test_empty_histogram() {
        let h = LatencyHistogram::new();
        assert_eq!((h.count(), h.max(), h.percentile(50.0)), (0, 0, 0));
    }

    #[test]
    fn test_merge_equals_recording_both() {
        let mut a = LatencyHistogram::new();
        let mut b = LatencyHistogram::new();
        let mut both = LatencyHistogram::new();
        for v in [1, 7, 9, 1_000, 77_777] {
            a.record(v);
            both.record(v);
        }
        for v in [3, 12_345, 1 << 40] {
            b.record(v);
            both.record(v);
        }
        a.merge(&b);
        assert_eq!(a, both);
        assert_eq!(a.max(), 1 << 40);
    }
}
