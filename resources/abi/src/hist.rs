//! A small log-linear histogram the guest fills and the VMM reads: buckets
//! 0..16 hold one value each; above, each power of two up to 2^36 ns has 8
//! buckets (12.5 % resolution); larger values land in the last bucket.

/// Number of buckets.
pub const BUCKETS: usize = 16 + 32 * 8;

/// Bucket counts.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counts(pub [u64; BUCKETS]);

impl Default for Counts {
    fn default() -> Self {
        Self([0; BUCKETS])
    }
}

/// The bucket of `value`.
pub const fn bucket(value: u64) -> usize {
    if value < 16 {
        return value as usize;
    }
    let exp = 63 - value.leading_zeros() as usize;
    if exp >= 36 {
        return BUCKETS - 1;
    }
    16 + (exp - 4) * 8 + ((value >> (exp - 3)) & 7) as usize
}

/// The largest value in bucket `index`.
pub const fn upper(index: usize) -> u64 {
    if index < 16 {
        return index as u64;
    }
    let exp = (index - 16) / 8 + 4;
    let sub = ((index - 16) % 8) as u64;
    let width = 1u64 << (exp - 3);
    (1u64 << exp) + sub * width + width - 1
}

/// The value at percentile `p` (0..=100) of `counts`, capped at `max`.
pub fn percentile(counts: &Counts, max: u64, p: u64) -> u64 {
    // The counts are guest-written: saturate rather than overflow.
    let total: u64 = counts.0.iter().fold(0u64, |a, &n| a.saturating_add(n));
    if total == 0 {
        return 0;
    }
    let rank = ((u128::from(total) * u128::from(p)).div_ceil(100) as u64).max(1);
    let mut seen = 0;
    for (i, n) in counts.0.iter().enumerate() {
        seen = n.saturating_add(seen);
        if seen >= rank {
            let v = upper(i);
            return if v < max { v } else { max };
        }
    }
    max
}
