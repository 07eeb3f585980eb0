//! Counter-based random numbers: every draw is a pure function of `(seed, stream, counter)`, so a
//! run resumed from a checkpoint at step `s` draws exactly what the uninterrupted run drew.

/// SplitMix64's finaliser: a bijective mix of 64 bits.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Named streams keep unrelated uses of randomness independent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Split = 1,
    Shuffle = 2,
    Init = 3,
    Probe = 4,
    SampledLabels = 5,
    /// Noise of preconditioner estimators that draw their own (PSGD's probe vectors); the key is
    /// `step * 65_536 + parameter index`.
    Preconditioner = 6,
}

/// A sequence of random numbers identified by `(seed, stream, key)`.
#[derive(Debug, Clone)]
pub struct Random {
    state: u64,
}

impl Random {
    pub fn new(seed: u64, stream: Stream, key: u64) -> Random {
        let state =
            mix(mix(seed ^ 0x6A09_E667_F3BC_C909).wrapping_add(stream as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ mix(key));
        Random { state }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.state)
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `[low, high)`.
    pub fn uniform_in(&mut self, low: f64, high: f64) -> f64 {
        low + (high - low) * self.uniform()
    }

    /// A standard normal draw (Box-Muller, one value per call).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// +1 or -1 with equal probability.
    pub fn rademacher(&mut self) -> f64 {
        if self.next_u64() >> 63 == 0 {
            1.0
        } else {
            -1.0
        }
    }

    /// An index below `bound`, without modulo bias.
    pub fn below(&mut self, bound: usize) -> usize {
        let bound = bound as u64;
        let zone = u64::MAX - u64::MAX % bound;
        loop {
            let value = self.next_u64();
            if value < zone {
                return (value % bound) as usize;
            }
        }
    }

    /// A uniformly random permutation of `0..count` (Fisher-Yates).
    pub fn permutation(&mut self, count: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..count).collect();
        for index in (1..count).rev() {
            let other = self.below(index + 1);
            order.swap(index, other);
        }
        order
    }

    /// An index drawn with the given (unnormalised, non-negative) weights.
    pub fn categorical(&mut self, weights: &[f64]) -> usize {
        let total: f64 = weights.iter().sum();
        let mut target = self.uniform() * total;
        for (index, weight) in weights.iter().enumerate() {
            if target < *weight {
                return index;
            }
            target -= weight;
        }
        weights.len().saturating_sub(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_depend_only_on_seed_stream_and_key() {
        let first: Vec<u64> =
            (0..4).map(|_| 0).scan(Random::new(7, Stream::Probe, 3), |random, _| Some(random.next_u64())).collect();
        let again: Vec<u64> =
            (0..4).map(|_| 0).scan(Random::new(7, Stream::Probe, 3), |random, _| Some(random.next_u64())).collect();
        let other_key: Vec<u64> =
            (0..4).map(|_| 0).scan(Random::new(7, Stream::Probe, 4), |random, _| Some(random.next_u64())).collect();
        let other_stream: Vec<u64> =
            (0..4).map(|_| 0).scan(Random::new(7, Stream::Init, 3), |random, _| Some(random.next_u64())).collect();
        assert_eq!(first, again);
        assert_ne!(first, other_key);
        assert_ne!(first, other_stream);
    }

    #[test]
    fn normal_draws_have_unit_variance_and_permutations_are_complete() {
        let mut random = Random::new(1, Stream::Init, 0);
        let samples: Vec<f64> = (0..20000).map(|_| random.normal()).collect();
        let mean = samples.iter().sum::<f64>() / samples.len() as f64;
        let variance = samples.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / samples.len() as f64;
        assert!(mean.abs() < 0.03 && (variance - 1.0).abs() < 0.05, "mean {mean}, variance {variance}");
        let mut order = random.permutation(100);
        order.sort_unstable();
        assert_eq!(order, (0..100).collect::<Vec<_>>());
    }
}
