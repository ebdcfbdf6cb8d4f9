//! Gaussian noise for DP-SGD, on a fixed-point grid with integer sampling.
//!
//! [`GaussianNoise`] (and [`add_gaussian_noise`], which DP-SGD calls once per step) is the only
//! place where the training code draws differential-privacy noise.
//!
//! # Why not floating point
//!
//! Mironov (2012, "On significance of the least significant bits for differential privacy")
//! showed that noise sampled and added in floating point can leak the value it protects: the
//! set of floats that `value + noise` can take, and their probabilities, depend on `value`, so
//! someone who sees the exact bits of a release can tell neighbouring inputs apart whatever the
//! noise scale. Any sampler that turns random bits into floats (a ziggurat, Box-Muller) and adds
//! them in floating point is open to attacks of that kind.
//!
//! # The mechanism
//!
//! For a standard deviation `sigma C` and a slice `v` of `d` values:
//!
//! 1. Grid: `gamma = sigma C / S`, with `S` the width of [`DiscreteGaussian::standard`], about
//!    835,780 (2^19.67): the noise spans that many grid steps per standard deviation.
//! 2. Quantize: `q_i = round(v_i / gamma)`, an integer (clamped to `±2^50`; a NaN counts as 0).
//! 3. Noise: `k_i ~ D(S)`, the discrete Gaussian over the integers (Canonne, Kamath and Steinke
//!    2020, "The discrete Gaussian for differential privacy"), drawn with integer arithmetic
//!    from the generator's raw 64-bit words; see [`DiscreteGaussian`].
//! 4. Release `(q_i + k_i) gamma`, rounded to `f32`.
//!
//! Everything that depends on the data before the release is exact integer arithmetic (`q_i`
//! and `q_i + k_i` are integers below 2^51, held exactly in `f64`); step 4 is a fixed function
//! of the integers `q_i + k_i`, so it is post-processing and leaks nothing about `v` beyond
//! them, whatever its rounding does. Values that quantize to the same grid points release
//! identically.
//!
//! # Choice of the grid
//!
//! A finer grid (larger `S`) makes the rounding's effect on the sensitivity smaller (next
//! section) but needs wider tables or more of them per sample. The sampler combines one sample
//! of each of two tables, of 64 KiB and 256 KiB, from a 48-bit piece of the generator's output:
//! the widest `S` for which the tables stay in cache and the cost stays close to that of the
//! floating-point ziggurat this module used before (`benches/noise.rs` measures both: about 7
//! ns per value on one core, 3 of them for the ChaCha20 keystream, against 6 ns). A grid of
//! 2^19.67 steps per standard deviation is also far finer than anything `f32` training
//! resolves.
//!
//! # Privacy, precisely
//!
//! - **Sensitivity.** If `|v - v'|_2 <= C`, then `|q - q'|_2 <= S / sigma + (1 + 2^-52 M) sqrt(d)`
//!   with `M` the largest `|v_i| / gamma` (at most the clamp, 2^50): each coordinate's
//!   quantization error is at most half a step plus the `f64` rounding of `v_i / gamma`. For a
//!   clipped sum over a batch `B`, `M <= |B| S / sigma`, so the `2^-52 M` term is below
//!   `2e-10 |B| / sigma`. Rounding thus inflates the sensitivity by a relative
//!   `sigma sqrt(d) / S`: `3.8e-4 sigma` for a hundred thousand parameters, `1.2e-3 sigma` for a
//!   million, `3.8e-3 sigma` for ten million. The accountant does not include this factor.
//! - **Discrete versus continuous.** The discrete Gaussian with integer shifts of L2 norm
//!   `Delta` satisfies the same concentrated DP bound `Delta^2 / (2 S^2)` as the continuous one
//!   (Canonne, Kamath and Steinke 2020). More precisely, sums of `exp(-(k - c)^2 / (2 S^2))`
//!   over the integers do not depend on an integer shift `c`, so the moments
//!   `E_{D_0}[(D_Delta / D_0)^i]` are exactly `exp(i (i - 1) Delta^2 / (2 S^2))`, as in the
//!   continuous case. The integer-order Rényi bound of the sampled Gaussian (Mironov, Talwar and
//!   Zhang 2019), a sum of these moments, is therefore the same for the discrete noise with noise
//!   multiplier `S / Delta` (previous point).
//! - **Sampler error.** Each `k_i` is within statistical distance
//!   [`DiscreteGaussian::distance_bound`] (below 2^-111) of `D(S)`: table truncation at 12.5
//!   base widths (mass below 2^-116 dropped), probabilities rounded to 2^-127, and the
//!   convolution's smoothing error. Over all `N` coordinates a node ever noises, an
//!   `(epsilon, delta)` guarantee of the exact mechanism holds for the sampled one with
//!   `delta + (1 + e^epsilon) N 2^-111`: for `N = 2^50` (a billion parameters for a million
//!   steps) and `epsilon <= 10` that adds less than `10^-14`.
//!
//! # Known limits
//!
//! - Not constant time: a table lookup's address and a rare slow path depend on the noise, so an
//!   attacker who can time the node's own CPU or watch its caches could learn about the noise.
//!   The threat model only lets others see what the node sends.
//! - The Rényi analysis of the sampled Gaussian also bounds the divergence in the other
//!   direction by the one above, which Mironov, Talwar and Zhang prove for the continuous
//!   Gaussian; for the discrete one this is assumed, not proved here. Likewise the
//!   privacy-loss-distribution accountant models the continuous Gaussian, and how far the
//!   discrete one's loss distribution is from it at `S` near 2^20 is not bounded here.
//! - The randomness comes from the caller's generator: ChaCha20 seeded from the operating system
//!   in production ([`crate::dpsgd::os_seeded_rng`]), a seeded one in tests and reproducible
//!   simulations.

mod discrete;
mod fixed;
mod table;

use rand::CryptoRng;
use thiserror::Error;

use crate::model::ModelError;

pub use discrete::DiscreteGaussian;
pub use table::{MAX_BASE_SIGMA, MIN_BASE_SIGMA};

/// The smallest noise standard deviation accepted, 2^-64: its grid, about 2^-84, stays a normal
/// `f32`.
pub const MIN_STD_DEV: f64 = 5.421_010_862_427_522e-20;

/// The largest noise standard deviation accepted, 2^64: noise and clamped values stay finite in
/// `f32`.
pub const MAX_STD_DEV: f64 = 18_446_744_073_709_551_616.0;

/// The clamp of the quantized values, in grid steps (2^50): about 1.3e9 noise standard
/// deviations, far beyond any clipped sum, and small enough for the rounding in [`quantize`].
const GRID_LIMIT: f64 = 1_125_899_906_842_624.0;

/// `1.5 * 2^52`: adding and subtracting it rounds any `|y| <= 2^51` to the nearest integer
/// (ties to even) in `f64`, since the sum lies in `[2^52, 2^53)` where `f64` values are exactly
/// the integers.
const ROUNDING_BIAS: f64 = 6_755_399_441_055_744.0;

/// Why noise cannot be set up with the given parameters.
#[derive(Debug, Clone, PartialEq, Error)]
#[non_exhaustive]
pub enum NoiseError {
    /// The standard deviation is zero, negative or not a number: zero noise would release the
    /// value as it is.
    #[error("noise standard deviation must be positive and finite, got {got}")]
    StdDev {
        /// The rejected value.
        got: f64,
    },
    /// The standard deviation is positive but outside what the grid can represent in `f32`.
    #[error("noise standard deviation {got} is outside [{min:e}, {max:e}]")]
    StdDevRange {
        /// The rejected value.
        got: f64,
        /// [`MIN_STD_DEV`].
        min: f64,
        /// [`MAX_STD_DEV`].
        max: f64,
    },
    /// A base width outside the range the base tables are built for.
    #[error("base discrete gaussian width must lie in [{min}, {max}], got {got}")]
    BaseSigma {
        /// The rejected width.
        got: f64,
        /// [`MIN_BASE_SIGMA`].
        min: f64,
        /// [`MAX_BASE_SIGMA`].
        max: f64,
    },
    /// A fine width too narrow to smooth any multiple of the coarse samples.
    #[error(
        "fine width {fine_sigma} cannot smooth the coarse samples (width {coarse_sigma}): \
         expected fine_sigma^2 (1/4 - 1/coarse_sigma^2) >= 1"
    )]
    Smoothing {
        /// The fine width.
        fine_sigma: f64,
        /// The coarse width.
        coarse_sigma: f64,
    },
}

impl From<NoiseError> for ModelError {
    fn from(error: NoiseError) -> ModelError {
        let (name, expected, got) = match error {
            NoiseError::StdDev { got } => {
                ("noise standard deviation", "a positive finite number", got)
            }
            NoiseError::StdDevRange { got, .. } => (
                "noise standard deviation",
                "a number between 2^-64 and 2^64",
                got,
            ),
            NoiseError::BaseSigma { got, .. } => (
                "base discrete gaussian width",
                "a number between 1 and 5240",
                got,
            ),
            NoiseError::Smoothing { fine_sigma, .. } => (
                "fine discrete gaussian width",
                "wide enough to smooth the coarse samples",
                fine_sigma,
            ),
        };
        ModelError::InvalidSetting {
            name,
            expected,
            got,
        }
    }
}

/// Gaussian noise of a given standard deviation, on its fixed-point grid; see the module docs
/// for the mechanism and its guarantees.
///
/// ```
/// use athanor_core::noise::GaussianNoise;
/// use rand::SeedableRng;
///
/// let noise = GaussianNoise::new(2.0)?;
/// let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
/// let mut values = vec![0.0_f32; 10_000];
/// noise.add_to(&mut values, &mut rng);
/// let variance = values.iter().map(|v| f64::from(v * v)).sum::<f64>() / 10_000.0;
/// assert!((variance.sqrt() - 2.0).abs() < 0.1);
/// # Ok::<(), athanor_core::noise::NoiseError>(())
/// ```
#[derive(Debug, Clone, Copy)]
pub struct GaussianNoise {
    std_dev: f64,
    /// `gamma = std_dev / S`.
    grid: f64,
    /// `S / std_dev`.
    inverse_grid: f64,
    sampler: &'static DiscreteGaussian,
}

impl GaussianNoise {
    /// Noise of standard deviation `std_dev` (for DP-SGD, `sigma * C`), on the grid
    /// `std_dev / S` of [`DiscreteGaussian::standard`].
    ///
    /// # Errors
    /// [`NoiseError::StdDev`] unless `std_dev` is positive and finite: zero noise would release
    /// the value as it is. [`NoiseError::StdDevRange`] outside
    /// `[MIN_STD_DEV, MAX_STD_DEV]` (2^-64 to 2^64).
    pub fn new(std_dev: f64) -> Result<GaussianNoise, NoiseError> {
        if !(std_dev.is_finite() && std_dev > 0.0) {
            return Err(NoiseError::StdDev { got: std_dev });
        }
        if !(MIN_STD_DEV..=MAX_STD_DEV).contains(&std_dev) {
            return Err(NoiseError::StdDevRange {
                got: std_dev,
                min: MIN_STD_DEV,
                max: MAX_STD_DEV,
            });
        }

        let sampler = DiscreteGaussian::standard();
        Ok(GaussianNoise {
            std_dev,
            grid: std_dev / sampler.sigma(),
            inverse_grid: sampler.sigma() / std_dev,
            sampler,
        })
    }

    /// The standard deviation.
    pub fn std_dev(&self) -> f64 {
        self.std_dev
    }

    /// The grid step `gamma`: every released value is an integer multiple of it, up to the
    /// final rounding to `f32`.
    pub fn grid(&self) -> f64 {
        self.grid
    }

    /// Replaces every `v` in `values` by `(round(v / gamma) + k) gamma`, rounded to `f32`, with
    /// `k` drawn independently from the discrete Gaussian for each value. Takes three 64-bit
    /// words of `rng` per four values (rarely a few more).
    pub fn add_to<R: CryptoRng + ?Sized>(&self, values: &mut [f32], rng: &mut R) {
        let (grid, inverse_grid) = (self.grid, self.inverse_grid);
        self.sampler.map_each(values, rng, |value, steps| {
            // Both terms are integers below 2^51 in magnitude, so the sum is exact; what follows
            // is post-processing.
            let released = quantize(value, inverse_grid) + steps as f64;
            (released * grid) as f32
        });
    }
}

/// `round(value * inverse_grid)` (ties to even) as an integer-valued `f64`, clamped to `±2^50`,
/// NaN to 0: a fixed function of `value` whose error is at most half a step plus the `f64`
/// rounding of the product.
#[inline(always)]
fn quantize(value: f32, inverse_grid: f64) -> f64 {
    let scaled = f64::from(value) * inverse_grid;
    let scaled = if scaled.is_nan() {
        0.0
    } else {
        scaled.clamp(-GRID_LIMIT, GRID_LIMIT)
    };
    (scaled + ROUNDING_BIAS) - ROUNDING_BIAS
}

/// Adds Gaussian noise of standard deviation `std_dev` to every element of `values`, as
/// [`GaussianNoise::add_to`] does.
///
/// DP-SGD calls it once per step with `std_dev = sigma * C` over the whole clipped gradient sum
/// (Abadi et al. 2016).
///
/// # Errors
/// [`ModelError::InvalidSetting`] unless `std_dev` is positive, finite and within
/// `[MIN_STD_DEV, MAX_STD_DEV]`; `values` is then unchanged.
///
/// ```
/// use athanor_core::noise::add_gaussian_noise;
/// use rand::SeedableRng;
/// use rand_chacha::ChaCha20Rng;
///
/// let mut rng = ChaCha20Rng::seed_from_u64(1);
/// let mut values = vec![0.0_f32; 10_000];
/// add_gaussian_noise(&mut values, 2.0, &mut rng)?;
/// let variance = values.iter().map(|v| f64::from(v * v)).sum::<f64>() / 10_000.0;
/// assert!((variance.sqrt() - 2.0).abs() < 0.1);
/// # Ok::<(), athanor_core::model::ModelError>(())
/// ```
pub fn add_gaussian_noise<R: CryptoRng + ?Sized>(
    values: &mut [f32],
    std_dev: f64,
    rng: &mut R,
) -> Result<(), ModelError> {
    GaussianNoise::new(std_dev)?.add_to(values, rng);
    Ok(())
}

/// The noise multiplier that DP-SGD with multiplier `noise_multiplier` on a model of
/// `dimension` parameters must be accounted with.
///
/// [`GaussianNoise::add_to`] rounds the clipped sum to the grid `gamma = sigma C / S` before
/// adding noise. Rounding moves each of the `dimension` coordinates by at most `gamma / 2`, so
/// two clipped sums at distance at most `C` are at most `C + gamma sqrt(dimension)` apart once
/// rounded: the noise `sigma C` then protects a sensitivity `C (1 + sigma sqrt(dimension) / S)`,
/// which is the multiplier `sigma / (1 + sigma sqrt(dimension) / S)`. For 10^6 parameters at
/// sigma = 1 the difference is about 0.1%.
///
/// ```
/// use athanor_core::noise::accounted_noise_multiplier;
///
/// let charged = accounted_noise_multiplier(1.0, 1_000_000);
/// assert!(charged < 1.0 && charged > 0.998);
/// ```
pub fn accounted_noise_multiplier(noise_multiplier: f64, dimension: usize) -> f64 {
    let width = DiscreteGaussian::standard().sigma();
    noise_multiplier / (1.0 + noise_multiplier * (dimension as f64).sqrt() / width)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantization_rounds_to_nearest_and_saturates() {
        assert_eq!(quantize(2.4, 1.0), 2.0);
        assert_eq!(quantize(2.6, 1.0), 3.0);
        assert_eq!(quantize(-2.6, 1.0), -3.0);
        assert_eq!(quantize(2.5, 1.0), 2.0, "ties to even");
        assert_eq!(quantize(3.5, 1.0), 4.0, "ties to even");
        assert_eq!(quantize(0.75, 4.0), 3.0);
        assert_eq!(quantize(1e30, 1.0), GRID_LIMIT);
        assert_eq!(quantize(f32::NEG_INFINITY, 1.0), -GRID_LIMIT);
        assert_eq!(quantize(f32::NAN, 1.0), 0.0);
    }

    #[test]
    fn limits_are_the_stated_powers_of_two() {
        assert_eq!(MIN_STD_DEV, 2_f64.powi(-64));
        assert_eq!(MAX_STD_DEV, 2_f64.powi(64));
        assert_eq!(GRID_LIMIT, 2_f64.powi(50));
        assert_eq!(ROUNDING_BIAS, 1.5 * 2_f64.powi(52));
    }
}
