//! Gaussian noise for DP-SGD.
//!
//! [`add_gaussian_noise`] is the only place where the training code draws differential-privacy
//! noise, so the sampler can be replaced without touching its callers.
//!
//! # Sampler
//!
//! Every value `v` becomes `v + std_dev * z` with `z ~ N(0, 1)` drawn independently by the
//! ziggurat method (Marsaglia and Tsang 2000, "The ziggurat method for generating random
//! variables"), as implemented by `rand_distr::StandardNormal`, from the caller's generator:
//! ChaCha20 seeded from the operating system in production
//! ([`crate::dpsgd::os_seeded_rng`]), a seeded generator in tests and reproducible simulations.
//! `std_dev * z` is computed in `f64` and rounded once to `f32` when added. The ziggurat takes
//! one 64-bit word for almost every sample, so the cost is close to that of the keystream.
//!
//! # Known weakness: floating-point sampling
//!
//! Mironov (2012, "On significance of the least significant bits for differential privacy")
//! showed that noise sampled and added in floating point can leak the value it protects: the
//! set of floats that `value + noise` can take, and their probabilities, depend on `value`, so
//! someone who sees the exact bits of the result can tell neighbouring inputs apart whatever
//! the noise scale. His attack targets the Laplace mechanism, but a Gaussian sampler built on
//! floating-point arithmetic, like this one, is open to the same kind of attack. The remedy is
//! to quantize the clipped sum to a fixed-point grid and add a discrete Gaussian sampled with
//! exact integer arithmetic (Canonne, Kamath and Steinke 2020, "The discrete Gaussian for
//! differential privacy"), then account for the rounding in the sensitivity.

use rand::CryptoRng;
use rand_distr::{Distribution, StandardNormal};

use crate::model::ModelError;

/// Adds i.i.d. `N(0, std_dev^2)` noise to every element of `values`.
///
/// DP-SGD calls it once per step with `std_dev = sigma * C` over the whole clipped gradient
/// sum (Abadi et al. 2016). The sampler works in floating point: see the module docs for the
/// precision attacks it is open to.
///
/// # Errors
/// [`ModelError::InvalidSetting`] unless `std_dev` is positive and finite: a zero standard
/// deviation would silently release the noiseless value.
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
    if !(std_dev.is_finite() && std_dev > 0.0) {
        return Err(ModelError::InvalidSetting {
            name: "noise standard deviation",
            expected: "a positive finite number",
            got: std_dev,
        });
    }

    // TODO: floating-point sampling is open to precision attacks (Mironov 2012, see the module
    // docs); a discrete Gaussian on integer arithmetic over a fixed-point grid would close
    // them, at the price of quantizing the clipped sum first. Only this function has to change.
    for value in values {
        let z: f64 = StandardNormal.sample(rng);
        *value += (std_dev * z) as f32;
    }
    Ok(())
}
