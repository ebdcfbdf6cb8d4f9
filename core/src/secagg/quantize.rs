//! From a float update to ring elements and back: clipping, rotation, scaling, stochastic
//! rounding, distributed discrete Gaussian noise.
//!
//! This is the distributed discrete Gaussian mechanism of Kairouz, Liu and Steinke (2021,
//! "The distributed discrete Gaussian mechanism for federated learning with secure
//! aggregation"). Each node, for its update `x` of dimension `d`:
//!
//! 1. clips: `x <- x min(1, S / |x|_2)`, explicitly, so nothing later saturates;
//! 2. optionally rotates: zero-pads to `n = 2^ceil(log2 d)` and applies the randomized
//!    Hadamard rotation of [`super::hadamard`] with the round's public seed;
//! 3. scales by `1 / gamma` and rounds each coordinate stochastically: `v` becomes
//!    `floor(v) + 1` with probability `v - floor(v)`, else `floor(v)` (unbiased, with
//!    randomness from the caller's cryptographic generator);
//! 4. adds its share of the noise: `D(sigma_node^2)` with
//!    `sigma_node^2 = ceil((sigma / gamma)^2 / n_min)` per coordinate
//!    ([`super::discrete_gaussian`]), so that any `n_min` survivors together add at least
//!    variance `(sigma / gamma)^2`: standard deviation `sigma` in update units;
//! 5. maps each integer into `Z_{2^b}` by two's complement.
//!
//! The coordinator decodes the unmasked sum by centring (residues `>= 2^(b-1)` are negative),
//! multiplying by `gamma` and undoing the rotation.
//!
//! # No wrap-around
//!
//! A coordinate of a clipped (and rotated: rotations keep norms) vector is at most `S` in
//! magnitude, so a rounded coordinate is at most `M = floor(S / gamma (1 + 1e-9)) + 1` (the
//! margin absorbs floating-point error; [`Quantizer::encode`] checks it). The noise is
//! sub-Gaussian (Canonne, Kamath and Steinke 2020, section 4): a sum of the noise of `N`
//! nodes exceeds `z sqrt(N sigma_node^2)` with probability at most `2 exp(-z^2 / 2)`.
//! Choosing `z = sqrt(2 ln(2 n / p))` bounds the probability that any of the `n` coordinates
//! exceeds it by `p`. [`Quantizer::new`] refuses a configuration unless
//! `N M + z sqrt(N sigma_node^2) <= 2^(b-1) - 1` for the whole cohort `N`, naming the numbers
//! that do not fit.
//!
//! # Error and sensitivity
//!
//! Without noise, each node's rounding moves each coordinate by less than 1 unit, so the
//! decoded mean of any number of nodes is within `gamma sqrt(n)` (L2) of the mean of the
//! clipped updates ([`Quantizer::rounding_error_bound`]). For accounting, a node's quantized
//! vector has L2 norm at most `S / gamma + sqrt(n)`
//! ([`Quantizer::quantized_norm_bound`]); the conditional rounding of Kairouz et al., which
//! tightens this, is not implemented.

use rand::CryptoRng;
use serde::{Deserialize, Serialize};

use super::SecAggError;
use super::config::SecAggConfig;
use super::discrete_gaussian::DiscreteGaussian;
use super::hadamard;
use super::ring::Ring;

/// Relative slack on `S / gamma` for floating-point error in clipping and rotation.
const FLOAT_MARGIN: f64 = 1e-9;

/// The noise nodes add before masking.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum DistributedNoise {
    /// Each node adds discrete Gaussian noise so that the sum of any `min_survivors` nodes'
    /// noise has standard deviation at least `sum_std` (in update units).
    Gaussian {
        /// `sigma`: the target standard deviation of the summed noise.
        sum_std: f64,
        /// `n_min`: survivors guaranteed, or the round is abandoned.
        min_survivors: usize,
    },
    /// No noise: the coordinator learns the exact sum. Only for tests and measurements.
    InsecureNone,
}

/// What a quantizer needs; shared by every node and the coordinator of a round.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct QuantizationConfig {
    /// `d`: parameters of an update.
    pub dimension: usize,
    /// `S`: L2 clipping bound of an update.
    pub clip_norm: f64,
    /// `gamma`: the quantization step, in update units.
    pub granularity: f64,
    /// Seed of the random rotation (public), or `None` not to rotate.
    pub rotation_seed: Option<[u8; 32]>,
    /// The distributed noise.
    pub noise: DistributedNoise,
    /// `N`: most nodes whose vectors may be summed (the cohort size).
    pub max_contributors: usize,
    /// `b`: bits of the ring.
    pub ring_bits: u32,
    /// The sum may wrap with probability at most `2^-tail_bits`.
    pub tail_bits: u32,
}

/// Encodes updates into ring vectors and decodes their sum.
#[derive(Debug, Clone)]
pub struct Quantizer {
    config: QuantizationConfig,
    ring: Ring,
    encoded_len: usize,
    max_value: u64,
    noise: Option<DiscreteGaussian>,
}

impl Quantizer {
    /// A quantizer, after checking that a full cohort's sum cannot wrap around the ring.
    ///
    /// # Errors
    /// [`SecAggError::InvalidConfig`] for a value out of range (non-positive or non-finite `S`,
    /// `gamma` or `sigma`, zero dimension or cohort, `n_min` outside `1..=N`, a per-node
    /// variance beyond the sampler's range); [`SecAggError::RingTooSmall`] if the sum needs
    /// more bits than the ring has.
    ///
    /// ```
    /// use athanor_core::secagg::quantize::{DistributedNoise, QuantizationConfig, Quantizer};
    ///
    /// let config = QuantizationConfig {
    ///     dimension: 1000,
    ///     clip_norm: 1.0,
    ///     granularity: 1.0 / 1024.0,
    ///     rotation_seed: None,
    ///     noise: DistributedNoise::Gaussian { sum_std: 0.5, min_survivors: 50 },
    ///     max_contributors: 100,
    ///     ring_bits: 17,
    ///     tail_bits: 40,
    /// };
    /// // 100 x 1025 + noise tail 6089 = 108589 needs 17 magnitude bits and a sign bit.
    /// let err = Quantizer::new(config).unwrap_err();
    /// assert!(err.to_string().ends_with("needs 18 bits, ring has 17"), "{err}");
    /// assert!(Quantizer::new(QuantizationConfig { ring_bits: 18, ..config }).is_ok());
    /// ```
    pub fn new(config: QuantizationConfig) -> Result<Quantizer, SecAggError> {
        let invalid = |name, expected, got: String| SecAggError::InvalidConfig {
            name,
            expected,
            got,
        };
        let positive = |v: f64| v.is_finite() && v > 0.0;
        if config.dimension == 0 || config.dimension > super::config::MAX_VECTOR_LEN {
            return Err(invalid(
                "dimension",
                "1 to 2^30",
                config.dimension.to_string(),
            ));
        }
        if !positive(config.clip_norm) {
            return Err(invalid(
                "clip_norm",
                "positive and finite",
                config.clip_norm.to_string(),
            ));
        }
        if !positive(config.granularity) {
            return Err(invalid(
                "granularity",
                "positive and finite",
                config.granularity.to_string(),
            ));
        }
        if config.max_contributors == 0 {
            return Err(invalid("max_contributors", "at least 1", "0".into()));
        }
        if config.tail_bits == 0 || config.tail_bits > 128 {
            return Err(invalid(
                "tail_bits",
                "1 to 128",
                config.tail_bits.to_string(),
            ));
        }
        let ring = Ring::new(config.ring_bits)?;
        let encoded_len = match config.rotation_seed {
            Some(_) => hadamard::padded_len(config.dimension),
            None => config.dimension,
        };

        let max_value =
            (config.clip_norm / config.granularity * (1.0 + FLOAT_MARGIN)).floor() + 1.0;
        if max_value >= 2_f64.powi(62) {
            return Err(invalid(
                "clip_norm / granularity",
                "below 2^62",
                max_value.to_string(),
            ));
        }
        let max_value = max_value as u64;
        let noise = node_noise(&config, invalid)?;
        check_capacity(&config, encoded_len, max_value, noise.map(|n| n.variance()))?;

        Ok(Quantizer {
            config,
            ring,
            encoded_len,
            max_value,
            noise,
        })
    }

    /// The quantizer with the finest power-of-two step `gamma = 2^-k` that `config` allows:
    /// the smallest rounding error for which a full cohort's sum cannot wrap and each node's
    /// noise stays within the sampler's range. `config.granularity` is ignored.
    ///
    /// A power of two keeps the scaling exact in floating point.
    ///
    /// # Errors
    /// As [`Quantizer::new`] for the coarsest step tried (`2^64`), when no step fits.
    pub fn finest(config: QuantizationConfig) -> Result<Quantizer, SecAggError> {
        let mut last = None;
        for k in (-64..=64).rev() {
            let granularity = 2_f64.powi(-k);
            match Quantizer::new(QuantizationConfig {
                granularity,
                ..config
            }) {
                Ok(quantizer) => return Ok(quantizer),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(SecAggError::InvalidConfig {
            name: "granularity",
            expected: "a step that fits the ring",
            got: "none".into(),
        }))
    }

    /// Checks that a round's secure aggregation carries this quantizer's vectors safely: the
    /// same ring and length, a cohort no larger than the one the ring was sized for, and a
    /// survivor minimum at least the one the noise was sized for (else a round could finish
    /// with less noise than promised).
    ///
    /// # Errors
    /// [`SecAggError::InvalidConfig`] naming the first mismatch.
    pub fn check_round(&self, round: &SecAggConfig) -> Result<(), SecAggError> {
        let mismatch = |name, expected, got: String| {
            Err(SecAggError::InvalidConfig {
                name,
                expected,
                got,
            })
        };
        if round.ring_bits != self.config.ring_bits {
            return mismatch(
                "ring_bits",
                "the quantizer's ring",
                round.ring_bits.to_string(),
            );
        }
        if round.vector_len != self.encoded_len {
            return mismatch(
                "vector_len",
                "the quantizer's encoded length",
                round.vector_len.to_string(),
            );
        }
        if round.cohort.len() > self.config.max_contributors {
            return mismatch(
                "cohort",
                "no larger than the quantizer's max_contributors",
                round.cohort.len().to_string(),
            );
        }
        if let DistributedNoise::Gaussian { min_survivors, .. } = self.config.noise
            && round.min_survivors < min_survivors
        {
            return mismatch(
                "min_survivors",
                "at least the noise's min_survivors",
                round.min_survivors.to_string(),
            );
        }
        Ok(())
    }

    /// The configuration this quantizer was built from.
    pub fn config(&self) -> &QuantizationConfig {
        &self.config
    }

    /// Elements of an encoded vector: the dimension, padded to a power of two when rotating.
    pub fn encoded_len(&self) -> usize {
        self.encoded_len
    }

    /// `M`: the largest magnitude of a rounded coordinate before noise.
    pub fn max_value(&self) -> u64 {
        self.max_value
    }

    /// `sigma_node^2`, the integer variance of each node's noise per coordinate (in
    /// quantization units), or `None` without noise.
    pub fn node_noise_variance(&self) -> Option<u64> {
        self.noise.map(|n| n.variance())
    }

    /// Bound on the L2 distance between the decoded mean of noiseless encodings and the mean
    /// of the clipped updates: `gamma sqrt(n)`.
    pub fn rounding_error_bound(&self) -> f64 {
        self.config.granularity * (self.encoded_len as f64).sqrt()
    }

    /// Bound on the L2 norm of one node's rounded vector before noise, in quantization units:
    /// `S / gamma + sqrt(n)`. The sensitivity to use when accounting.
    pub fn quantized_norm_bound(&self) -> f64 {
        self.config.clip_norm / self.config.granularity + (self.encoded_len as f64).sqrt()
    }

    /// The update scaled to L2 norm at most `S`, in `f64`.
    ///
    /// # Errors
    /// [`SecAggError::BadLength`] if the length is not the dimension,
    /// [`SecAggError::NonFinite`] for a NaN or infinite value.
    pub fn clip(&self, update: &[f32]) -> Result<Vec<f64>, SecAggError> {
        if update.len() != self.config.dimension {
            return Err(SecAggError::BadLength {
                what: "update",
                expected: self.config.dimension,
                got: update.len(),
            });
        }
        if let Some(index) = update.iter().position(|v| !v.is_finite()) {
            return Err(SecAggError::NonFinite { index });
        }

        let mut clipped: Vec<f64> = update.iter().map(|&v| f64::from(v)).collect();
        let norm = clipped.iter().map(|v| v * v).sum::<f64>().sqrt();
        if norm > self.config.clip_norm {
            let scale = self.config.clip_norm / norm;
            clipped.iter_mut().for_each(|v| *v *= scale);
        }
        Ok(clipped)
    }

    /// Clips, rotates, scales, rounds and noises `update`, and maps it into the ring.
    ///
    /// # Errors
    /// As [`Quantizer::clip`]; [`SecAggError::ValueTooLarge`] if a rounded coordinate exceeds
    /// [`Quantizer::max_value`], which the clipping makes impossible short of a bug.
    pub fn encode<R: CryptoRng + ?Sized>(
        &self,
        update: &[f32],
        rng: &mut R,
    ) -> Result<Vec<u32>, SecAggError> {
        let mut values = self.clip(update)?;
        if let Some(seed) = &self.config.rotation_seed {
            values.resize(self.encoded_len, 0.0);
            hadamard::rotate(&mut values, seed);
        }

        let scale = 1.0 / self.config.granularity;
        let mask = self.ring.mask();
        let mut encoded = Vec::with_capacity(self.encoded_len);
        for (index, value) in values.iter().enumerate() {
            let rounded = stochastic_round(value * scale, rng);
            if rounded.unsigned_abs() > self.max_value {
                return Err(SecAggError::ValueTooLarge {
                    index,
                    max: self.max_value,
                });
            }
            let noise = self.noise.map_or(0, |n| n.sample(rng));
            // Two's complement modulo 2^32, then modulo 2^b (which divides it).
            encoded.push((rounded.wrapping_add(noise) as u32) & mask);
        }
        Ok(encoded)
    }

    /// Decodes a sum of encoded vectors: centres each residue, rescales by `gamma`, undoes the
    /// rotation and drops the padding. The result is the sum, not the mean.
    ///
    /// # Errors
    /// [`SecAggError::BadLength`] if `sum` is not [`Quantizer::encoded_len`] long;
    /// [`SecAggError::OutsideRing`] for an element at or above `2^b`.
    pub fn decode_sum(&self, sum: &[u32]) -> Result<Vec<f64>, SecAggError> {
        if sum.len() != self.encoded_len {
            return Err(SecAggError::BadLength {
                what: "sum vector",
                expected: self.encoded_len,
                got: sum.len(),
            });
        }
        self.ring.check(sum)?;

        let bits = self.ring.bits();
        let half = 1_i64 << (bits - 1);
        let mut decoded: Vec<f64> = sum
            .iter()
            .map(|&v| {
                let v = i64::from(v);
                let centred = if v >= half { v - (1_i64 << bits) } else { v };
                centred as f64 * self.config.granularity
            })
            .collect();
        if let Some(seed) = &self.config.rotation_seed {
            hadamard::unrotate(&mut decoded, seed);
            decoded.truncate(self.config.dimension);
        }
        Ok(decoded)
    }
}

/// `floor(v) + Bernoulli(v - floor(v))`, with a 53-bit uniform from the generator.
fn stochastic_round<R: CryptoRng + ?Sized>(v: f64, rng: &mut R) -> i64 {
    let floor = v.floor();
    let uniform = (rng.next_u64() >> 11) as f64 * (1.0 / (1_u64 << 53) as f64);
    let up = uniform < v - floor;
    floor as i64 + i64::from(up)
}

/// The sampler of one node's noise: `D(ceil((sigma / gamma)^2 / n_min))`.
fn node_noise(
    config: &QuantizationConfig,
    invalid: impl Fn(&'static str, &'static str, String) -> SecAggError,
) -> Result<Option<DiscreteGaussian>, SecAggError> {
    let DistributedNoise::Gaussian {
        sum_std,
        min_survivors,
    } = config.noise
    else {
        return Ok(None);
    };
    if !(sum_std.is_finite() && sum_std > 0.0) {
        return Err(invalid(
            "noise sum_std",
            "positive and finite",
            sum_std.to_string(),
        ));
    }
    if !(1..=config.max_contributors).contains(&min_survivors) {
        return Err(invalid(
            "noise min_survivors",
            "between 1 and max_contributors",
            min_survivors.to_string(),
        ));
    }
    let units = sum_std / config.granularity;
    let variance = (units * units / min_survivors as f64).ceil().max(1.0);
    if variance > super::discrete_gaussian::MAX_VARIANCE as f64 {
        return Err(invalid(
            "per-node noise variance",
            "at most 2^48 units",
            variance.to_string(),
        ));
    }
    DiscreteGaussian::new(variance as u64).map(Some)
}

/// Refuses a ring in which the centred sum of `N` contributions could wrap.
fn check_capacity(
    config: &QuantizationConfig,
    encoded_len: usize,
    max_value: u64,
    node_variance: Option<u64>,
) -> Result<(), SecAggError> {
    let cohort = config.max_contributors;
    let noise_tail = match node_variance {
        None => 0,
        Some(variance) => {
            // P(any of n coordinates beyond z sigma_sum) <= n 2 exp(-z^2 / 2) = 2^-tail_bits.
            let log_terms = std::f64::consts::LN_2 * f64::from(config.tail_bits + 1)
                + (encoded_len as f64).ln();
            let z = (2.0 * log_terms).sqrt();
            (z * (cohort as f64 * variance as f64).sqrt()).ceil() as u64
        }
    };

    let values = u128::from(max_value) * cohort as u128;
    let total = values + u128::from(noise_tail);
    // Magnitude bits plus a sign bit.
    let needed_bits = (128 - total.leading_zeros()) + 1;
    if needed_bits > config.ring_bits {
        return Err(SecAggError::RingTooSmall {
            cohort,
            max_value,
            noise_tail,
            needed_bits,
            ring_bits: config.ring_bits,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    use super::*;

    #[test]
    fn the_finest_step_fits_and_half_of_it_does_not() {
        let config = QuantizationConfig {
            dimension: 1000,
            clip_norm: 3.0,
            granularity: 1.0,
            rotation_seed: Some([4; 32]),
            noise: DistributedNoise::Gaussian {
                sum_std: 2.0,
                min_survivors: 6,
            },
            max_contributors: 10,
            ring_bits: 32,
            tail_bits: 40,
        };
        let finest = Quantizer::finest(config).unwrap();
        let gamma = finest.config.granularity;
        assert_eq!(gamma.log2().fract(), 0.0, "{gamma} is not a power of two");
        let finer = QuantizationConfig {
            granularity: gamma / 2.0,
            ..config
        };
        assert!(Quantizer::new(finer).is_err());
        // 10 nodes of at most 3 / gamma each, plus the noise tail, in 31 magnitude bits.
        assert!(10.0 * 3.0 / gamma < 2_f64.powi(31));
        assert!(10.0 * 3.0 / gamma > 2_f64.powi(28));

        let hopeless = QuantizationConfig {
            ring_bits: 2,
            max_contributors: 10,
            ..config
        };
        assert!(Quantizer::finest(hopeless).is_err());
    }

    #[test]
    fn stochastic_rounding_is_unbiased() {
        let mut rng = ChaCha20Rng::seed_from_u64(21);
        let draws = 100_000;
        let total: i64 = (0..draws).map(|_| stochastic_round(2.3, &mut rng)).sum();
        // Each draw has variance 0.21: the mean's standard error is 0.0015; tolerance 5 of them.
        assert!((total as f64 / f64::from(draws) - 2.3).abs() < 0.0075);
        assert_eq!(stochastic_round(-4.0, &mut rng), -4);
    }
}
