//! An exact sampler of the discrete Gaussian over the integers, for the distributed noise.
//!
//! `D(sigma^2)` gives the integer `k` probability proportional to `exp(-k^2 / (2 sigma^2))`.
//! Sampling follows Canonne, Kamath and Steinke (2020, "The discrete Gaussian for differential
//! privacy"), with integer arithmetic only, so there is no floating-point rounding for an
//! observer to exploit:
//!
//! 1. `Bernoulli(exp(-g))` for rational `g = n / d` (their Algorithm 1): for `g <= 1`, draw
//!    `A_k ~ Bernoulli(g / k)` for `k = 1, 2, ...` until one fails and answer whether the
//!    failing `k` is odd; for `g > 1`, `floor(g)` draws of `Bernoulli(exp(-1))` then one of
//!    `Bernoulli(exp(-(g - floor g)))`, all of which must succeed.
//! 2. The discrete Laplace with scale `t` (their Algorithm 2): `U` uniform in `0..t`, kept
//!    with probability `exp(-U / t)`; `V` geometric from `Bernoulli(exp(-1))` draws; the
//!    magnitude is `U + t V` and a fair sign, redrawing the negative zero.
//! 3. The discrete Gaussian (their Algorithm 3): `t = floor(sigma) + 1`, `Y` discrete Laplace
//!    of scale `t`, kept with probability `exp(-(|Y| - sigma^2 / t)^2 / (2 sigma^2))`.
//!
//! `sigma^2` is restricted to integers (callers round the variance up, which only adds
//! noise), so every ratio above is a ratio of `u128`s. Uniform integers come from raw
//! generator words by rejection.
//!
//! The cost is small next to a round: encoding 2^20 parameters with this noise (clipping,
//! rotation and rounding included) took 227 ms in the `secagg` benchmark. The table-based
//! sampler of [`crate::noise`] is faster but draws on a real-valued grid for central noise;
//! this one draws the integers the ring needs, exactly.

use rand::CryptoRng;

use super::SecAggError;

/// Largest `sigma^2` accepted: `2^48`, so `sigma < 2^24` and every intermediate product
/// below stays far inside `u128`.
pub const MAX_VARIANCE: u64 = 1 << 48;

/// The discrete Gaussian `D(sigma^2)` for an integer `sigma^2 >= 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiscreteGaussian {
    variance: u64,
    /// `floor(sigma) + 1`.
    laplace_scale: u64,
}

impl DiscreteGaussian {
    /// The sampler of `D(variance)`.
    ///
    /// # Errors
    /// [`SecAggError::InvalidConfig`] unless `1 <= variance <= 2^48`.
    pub fn new(variance: u64) -> Result<DiscreteGaussian, SecAggError> {
        if !(1..=MAX_VARIANCE).contains(&variance) {
            return Err(SecAggError::InvalidConfig {
                name: "discrete Gaussian variance",
                expected: "1 to 2^48",
                got: variance.to_string(),
            });
        }
        Ok(DiscreteGaussian {
            variance,
            laplace_scale: variance.isqrt() + 1,
        })
    }

    /// `sigma^2`.
    pub fn variance(&self) -> u64 {
        self.variance
    }

    /// One sample.
    ///
    /// ```
    /// use athanor_core::secagg::discrete_gaussian::DiscreteGaussian;
    /// use rand::SeedableRng;
    ///
    /// let noise = DiscreteGaussian::new(100)?;
    /// let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
    /// let samples: Vec<i64> = (0..20_000).map(|_| noise.sample(&mut rng)).collect();
    /// let variance = samples.iter().map(|&k| (k * k) as f64).sum::<f64>() / 20_000.0;
    /// assert!((variance - 100.0).abs() < 5.0);
    /// # Ok::<(), athanor_core::secagg::SecAggError>(())
    /// ```
    pub fn sample<R: CryptoRng + ?Sized>(&self, rng: &mut R) -> i64 {
        let t = u128::from(self.laplace_scale);
        let variance = u128::from(self.variance);
        loop {
            let y = discrete_laplace(self.laplace_scale, rng);

            // Accept with probability exp(-(|y| t - sigma^2)^2 / (2 sigma^2 t^2)).
            let distance = (u128::from(y.unsigned_abs()) * t).abs_diff(variance);
            let Some(numerator) = distance.checked_mul(distance) else {
                // The exponent exceeds 2^128 / 2^99: acceptance probability below exp(-2^29).
                continue;
            };
            if bernoulli_exp(numerator, 2 * variance * t * t, rng) {
                return y;
            }
        }
    }
}

/// The discrete Laplace with scale `t`: `P(y)` proportional to `exp(-|y| / t)`.
fn discrete_laplace<R: CryptoRng + ?Sized>(t: u64, rng: &mut R) -> i64 {
    let t128 = u128::from(t);
    loop {
        let u = uniform_below(t128, rng);
        if !bernoulli_exp(u, t128, rng) {
            continue;
        }
        let mut v: u64 = 0;
        while bernoulli_exp(1, 1, rng) {
            v += 1;
        }
        let magnitude = u as u64 + t.saturating_mul(v);
        let negative = rng.next_u32() & 1 == 1;
        if negative && magnitude == 0 {
            continue;
        }
        // Magnitudes near i64::MAX would need ~2^40 consecutive successes at probability 1/e.
        let magnitude = i64::try_from(magnitude).unwrap_or(i64::MAX);
        return if negative { -magnitude } else { magnitude };
    }
}

/// `Bernoulli(exp(-n / d))`, exactly, for `d >= 1`.
fn bernoulli_exp<R: CryptoRng + ?Sized>(n: u128, d: u128, rng: &mut R) -> bool {
    let mut n = n;
    while n > d {
        if !bernoulli_exp_at_most_one(1, 1, rng) {
            return false;
        }
        n -= d;
    }
    bernoulli_exp_at_most_one(n, d, rng)
}

/// `Bernoulli(exp(-n / d))` for `n <= d`.
fn bernoulli_exp_at_most_one<R: CryptoRng + ?Sized>(n: u128, d: u128, rng: &mut R) -> bool {
    let mut k: u128 = 1;
    loop {
        // Bernoulli(n / (d k)); past u128 the probability is below 2^-28 per step and is
        // treated as a failure, a change smaller than the sampler's other approximations (none).
        let Some(denominator) = d.checked_mul(k) else {
            return k % 2 == 1;
        };
        if uniform_below(denominator, rng) >= n {
            return k % 2 == 1;
        }
        k += 1;
    }
}

/// Uniform in `0..bound` (`bound >= 1`), by rejection on the smallest covering power of two.
fn uniform_below<R: CryptoRng + ?Sized>(bound: u128, rng: &mut R) -> u128 {
    let bits = 128 - (bound - 1).leading_zeros();
    loop {
        let candidate = if bits <= 64 {
            u128::from(rng.next_u64())
        } else {
            u128::from(rng.next_u64()) << 64 | u128::from(rng.next_u64())
        };
        let candidate = if bits == 0 {
            0
        } else {
            candidate & (u128::MAX >> (128 - bits))
        };
        if candidate < bound {
            return candidate;
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    use super::*;

    #[test]
    fn probabilities_match_the_density_for_a_small_variance() {
        // sigma^2 = 2: compare frequencies of -4..=4 with exp(-k^2 / 4) / Z over 200k draws;
        // each frequency's standard error is below 0.0011, the tolerance is 5 of them.
        let sampler = DiscreteGaussian::new(2).unwrap();
        let mut rng = ChaCha20Rng::seed_from_u64(11);
        let draws = 200_000;
        let mut counts = [0_u32; 9];
        for _ in 0..draws {
            let k = sampler.sample(&mut rng);
            if k.abs() <= 4 {
                counts[(k + 4) as usize] += 1;
            }
        }
        let z: f64 = (-40..=40)
            .map(|k: i32| (-f64::from(k * k) / 4.0).exp())
            .sum();
        for (i, &count) in counts.iter().enumerate() {
            let k = i as f64 - 4.0;
            let expected = (-k * k / 4.0).exp() / z;
            let got = f64::from(count) / f64::from(draws);
            assert!(
                (got - expected).abs() < 0.0055,
                "k = {k}: {got} vs {expected}"
            );
        }
    }

    #[test]
    fn bernoulli_exp_has_the_right_mean() {
        let mut rng = ChaCha20Rng::seed_from_u64(12);
        let draws = 100_000;
        let hits = (0..draws).filter(|_| bernoulli_exp(3, 2, &mut rng)).count();
        let expected = (-1.5_f64).exp();
        // Standard error sqrt(p (1 - p) / n) < 0.0016; tolerance 5 of them.
        assert!((hits as f64 / draws as f64 - expected).abs() < 0.008);
    }
}
