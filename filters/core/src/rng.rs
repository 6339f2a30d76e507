//! Randomness, passed in: a one-method trait, a tiny seeded generator, and a test double.
//!
//! The core never reads a global RNG (DEVELOPERS.md: algorithms are pure). The filter owns one
//! [`SplitMix64`] per worker, seeded once; tests pass a [`Sequence`] to fix every draw.
//! SplitMix64 is Steele, Lea and Flood's generator ("Fast splittable pseudorandom number
//! generators", OOPSLA 2014), the seeder of xoshiro: 64 bits of state, full period, good
//! enough for load balancing, not for secrets.

/// A source of uniformly distributed 64-bit values.
pub trait Rng {
    /// The next value.
    fn next_u64(&mut self) -> u64;

    /// A value in `0..bound` (0 when `bound` is 0), by Lemire's multiply-shift reduction.
    ///
    /// The bias is below `bound / 2^64`, negligible for endpoint counts.
    fn below(&mut self, bound: usize) -> usize {
        let wide = u128::from(self.next_u64()) * bound as u128;
        (wide >> 64) as usize
    }

    /// A value in `[0, 1)` with 53 bits of precision.
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

impl<R: Rng + ?Sized> Rng for &mut R {
    fn next_u64(&mut self) -> u64 {
        (**self).next_u64()
    }
}

/// SplitMix64: a seeded, full-period 64-bit generator.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator whose sequence is fully determined by `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }
}

impl Rng for SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.state)
    }
}

/// The seed of a filter VM's generator: the host clock when the VM is configured
/// (nanoseconds since the Unix epoch, low 64 bits) mixed with the VM's root context id, so
/// the VMs of one proxy do not pick in lockstep even when configured within the same
/// nanosecond.
///
/// One home for the derivation: the wasm filter seeds every worker with it, and a test that
/// drives the filter under a controlled clock (the cross-data-plane golden test) derives the
/// same seed for the native adapter, which takes its seed from its caller.
pub fn vm_seed(now: std::time::Duration, root_context_id: u32) -> u64 {
    (now.as_nanos() as u64) ^ (u64::from(root_context_id) << 32)
}

/// SplitMix64's output function: a bijective 64-bit finalizer, also used to hash.
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Test double: replays a fixed list of values, cycling; yields 0 forever when empty.
///
/// Use [`Sequence::units`] to script [`Rng::below`] and [`Rng::unit`] draws by fraction.
#[derive(Debug, Clone, Default)]
pub struct Sequence {
    values: Vec<u64>,
    next: usize,
}

impl Sequence {
    /// Replays `values` in order, then again from the start.
    pub fn new(values: impl Into<Vec<u64>>) -> Self {
        Self {
            values: values.into(),
            next: 0,
        }
    }

    /// Replays draws that [`Rng::unit`] returns as the given fractions (each clamped to
    /// `[0, 1)`), so `below(n)` returns `floor(fraction * n)`.
    pub fn units(fractions: &[f64]) -> Self {
        let values: Vec<u64> = fractions
            .iter()
            .map(|f| (f.clamp(0.0, 0.999_999_999) * 18_446_744_073_709_551_616.0) as u64)
            .collect();
        Self::new(values)
    }
}

impl Rng for Sequence {
    fn next_u64(&mut self) -> u64 {
        let Some(&value) = self.values.get(self.next) else {
            return 0;
        };
        self.next = (self.next + 1) % self.values.len();
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_matches_the_reference_sequence_for_seed_zero() {
        // First outputs of the reference C implementation with state 0.
        let mut rng = SplitMix64::new(0);
        assert_eq!(rng.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(rng.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn sequence_scripts_below_by_fraction_and_cycles() {
        let mut rng = Sequence::units(&[0.0, 0.5, 0.99]);
        assert_eq!(rng.below(10), 0);
        assert_eq!(rng.below(10), 5);
        assert_eq!(rng.below(10), 9);
        assert_eq!(rng.below(10), 0);
    }

    #[test]
    fn a_vm_seed_is_the_clock_in_nanoseconds_with_the_root_context_id_in_the_high_bits() {
        let now = std::time::Duration::new(1_735_689_600, 7);
        assert_eq!(vm_seed(now, 0), 1_735_689_600_000_000_007);
        assert_eq!(vm_seed(now, 1), 1_735_689_600_000_000_007 ^ (1 << 32));
    }

    #[test]
    fn below_zero_is_zero_and_empty_sequence_yields_zero() {
        let mut rng = Sequence::default();
        assert_eq!(rng.next_u64(), 0);
        assert_eq!(SplitMix64::new(7).below(0), 0);
    }
}
