//! The Park-Miller "minimal standard" generator of OpenBSD's libkern `random()`
//! (CI-RND-4): x' = 16807 x mod (2^31 - 1), computed with Schrage's method.

/// A Park-Miller generator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParkMiller {
    state: u32,
}

const MODULUS: i64 = 0x7fff_ffff;

impl ParkMiller {
    /// A generator with OpenBSD's seed semantics (its kernel starts at 1).
    pub const fn new(seed: u32) -> Self {
        Self { state: seed }
    }

    /// The generator for CPU `unit`: CPU 0 with seed 1 reproduces OpenBSD's
    /// sequence; other CPUs start at a seed derived from `seed` and `unit`.
    pub const fn for_cpu(seed: u64, unit: u32) -> Self {
        let mixed = seed.wrapping_add((unit as u64).wrapping_mul(0x9e37_79b9)) % (MODULUS as u64);
        Self::new(if mixed == 0 { 1 } else { mixed as u32 })
    }

    /// The next value, in 1..=2^31 - 1 (as OpenBSD's `random()`). Named like
    /// `Iterator::next` on purpose; the generator is not an iterator.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u32 {
        let x = i64::from(self.state);
        let hi = x / 127_773;
        let lo = x % 127_773;
        let mut t = 16_807 * lo - 2_836 * hi;
        if t <= 0 {
            t += MODULUS;
        }
        self.state = t as u32;
        self.state
    }
}
