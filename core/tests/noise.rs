//! The DP-SGD noise sampler against the exact discrete Gaussian, and its public API.
//!
//! Every generator is seeded, so each statistic below is a fixed number; the tolerances are
//! derived from the sample size and stated where they are used. Goodness of fit is Pearson's
//! chi-square against a discrete Gaussian pmf computed here from `f64` exponentials, with bins
//! merged until each expects at least `MIN_EXPECTED` samples, and compared with the upper 0.001
//! critical value for its degrees of freedom. Run with `--nocapture` to see the statistics.

use athanor_core::model::ModelError;
use athanor_core::noise::{DiscreteGaussian, GaussianNoise, NoiseError, add_gaussian_noise};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

/// Least expected count of a chi-square bin, well above the usual 5 so that the statistic's
/// chi-square approximation holds.
const MIN_EXPECTED: f64 = 20.0;

/// Upper 0.001 quantile of the standard normal distribution.
const Z_999: f64 = 3.090_232_306_167_813;

/// Upper 0.001 critical value of the chi-square distribution with `df` degrees of freedom, by the
/// Wilson-Hilferty cube-root approximation: within 1% of the exact value from 9 degrees of
/// freedom up, 3% above it at 1 (11.15 against 10.83).
fn chi_square_critical(df: usize) -> f64 {
    let k = df as f64;
    let h = 2.0 / (9.0 * k);
    k * (1.0 - h + Z_999 * h.sqrt()).powi(3)
}

/// `exp(-x^2 / (2 sigma^2))`, the unnormalized discrete Gaussian.
fn rho(sigma: f64, x: i64) -> f64 {
    let x = x as f64;
    (-x * x / (2.0 * sigma * sigma)).exp()
}

/// The normalizing sum `Z = sum_x rho(x)` over `|x| <= 40 sigma` (the rest is below e^-800).
fn normalizer(sigma: f64) -> f64 {
    let limit = (40.0 * sigma).ceil() as i64;
    rho(sigma, 0) + 2.0 * (1..=limit).map(|x| rho(sigma, x)).sum::<f64>()
}

/// Bins of consecutive integers, each expecting at least `MIN_EXPECTED` of `n` samples of the
/// discrete Gaussian of width `sigma`: the lower edges (the first bin reaching down to minus
/// infinity, the last up to infinity) and each bin's exact probability.
fn integer_bins(sigma: f64, n: usize) -> (Vec<i64>, Vec<f64>) {
    let z = normalizer(sigma);
    let limit = (40.0 * sigma).ceil() as i64;
    let min_mass = MIN_EXPECTED / n as f64;
    let (mut edges, mut probs) = (vec![i64::MIN], vec![0.0]);
    for x in -limit..=limit {
        let last = probs.len() - 1;
        if probs[last] >= min_mass {
            edges.push(x);
            probs.push(0.0);
        }
        let last = probs.len() - 1;
        probs[last] += rho(sigma, x) / z;
    }
    // The last bin may be short of the minimum: merge it into its neighbour.
    if probs[probs.len() - 1] < min_mass {
        let tail = probs.pop().expect("at least two bins");
        edges.pop();
        let last = probs.len() - 1;
        probs[last] += tail;
    }
    (edges, probs)
}

/// Pearson's statistic of `samples` against bins with lower `edges` and probabilities `probs`.
fn chi_square(samples: &[i64], edges: &[i64], probs: &[f64]) -> f64 {
    let mut counts = vec![0_u64; probs.len()];
    for &k in samples {
        let bin = edges.partition_point(|&edge| edge <= k) - 1;
        counts[bin] += 1;
    }
    let n = samples.len() as f64;
    counts
        .iter()
        .zip(probs)
        .map(|(&observed, &p)| {
            let expected = n * p;
            (observed as f64 - expected).powi(2) / expected
        })
        .sum()
}

/// Draws `n` samples and checks them bin by bin against the exact pmf of width `S`.
fn assert_fits_discrete_gaussian(name: &str, sampler: &DiscreteGaussian, n: usize, seed: u64) {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let samples: Vec<i64> = (0..n).map(|_| sampler.sample(&mut rng)).collect();
    let (edges, probs) = integer_bins(sampler.sigma(), n);

    let statistic = chi_square(&samples, &edges, &probs);
    let df = probs.len() - 1;
    let critical = chi_square_critical(df);
    println!(
        "{name}: S = {:.3}, n = {n}, chi-square {statistic:.1} on {df} degrees of freedom \
         (critical value at p = 0.001: {critical:.1}), seed {seed}",
        sampler.sigma()
    );
    assert!(statistic < critical, "{name}: {statistic} >= {critical}");
    assert!(
        samples.iter().all(|k| k.abs() <= sampler.max_magnitude()),
        "{name}: a sample beyond the table's reach"
    );
}

#[test]
fn a_narrow_single_table_fits_the_discrete_gaussian() {
    let sampler = DiscreteGaussian::new(3.0).expect("valid width");
    assert_fits_discrete_gaussian("single table, width 3", &sampler, 1_000_000, 101);
}

#[test]
fn the_standard_fine_table_alone_fits_the_discrete_gaussian() {
    let standard = DiscreteGaussian::standard();
    let sampler = DiscreteGaussian::new(standard.fine_sigma()).expect("valid width");
    assert_fits_discrete_gaussian(
        "single table, standard fine width",
        &sampler,
        2_000_000,
        102,
    );
}

#[test]
fn the_standard_coarse_table_alone_fits_the_discrete_gaussian() {
    let standard = DiscreteGaussian::standard();
    let coarse = standard
        .coarse_sigma()
        .expect("the standard sampler convolves");
    let sampler = DiscreteGaussian::new(coarse).expect("valid width");
    assert_fits_discrete_gaussian(
        "single table, standard coarse width",
        &sampler,
        2_000_000,
        103,
    );
}

#[test]
fn small_convolutions_fit_the_discrete_gaussian_of_their_combined_width() {
    // K = 1 at the narrowest fine width that smooths anything, then K = 3; small enough that
    // every integer with any mass gets its own bin.
    for (fine, coarse, seed) in [(3.0, 3.0, 104), (8.0, 20.0, 105)] {
        let sampler = DiscreteGaussian::convolved(fine, coarse).expect("valid widths");
        let name = format!("convolution {fine} + {} x {coarse}", sampler.multiplier());
        assert_fits_discrete_gaussian(&name, &sampler, 1_000_000, seed);
    }
}

#[test]
fn the_standard_sampler_fits_the_discrete_gaussian_in_coarse_bins() {
    // Bins of S / 8 over +-4 S plus the two tails, each probability summed exactly over its
    // integers (about ten million terms in all).
    const N: usize = 2_000_000;
    let sampler = DiscreteGaussian::standard();
    let sigma = sampler.sigma();
    let step = (sigma / 8.0).round() as i64;
    let mut edges = vec![i64::MIN];
    edges.extend((-32..=32).map(|i| i * step));
    let bin_mass = |lo: i64, hi: i64| (lo..hi).map(|x| rho(sigma, x)).sum::<f64>();
    let inner: Vec<f64> = edges[1..]
        .windows(2)
        .map(|w| bin_mass(w[0], w[1]))
        .collect();
    let tail = bin_mass(32 * step, (12.0 * sigma) as i64);
    let total = inner.iter().sum::<f64>() + 2.0 * tail;
    let mut probs = vec![tail / total];
    probs.extend(inner.iter().map(|mass| mass / total));
    probs.push(tail / total);
    assert!(N as f64 * tail / total >= MIN_EXPECTED);

    let mut rng = ChaCha20Rng::seed_from_u64(106);
    let samples: Vec<i64> = (0..N).map(|_| sampler.sample(&mut rng)).collect();
    let statistic = chi_square(&samples, &edges, &probs);
    let df = probs.len() - 1;
    let critical = chi_square_critical(df);
    println!(
        "standard sampler: S = {sigma:.1}, n = {N}, chi-square {statistic:.1} on {df} degrees \
         of freedom (critical value at p = 0.001: {critical:.1}), seed 106"
    );
    assert!(statistic < critical, "{statistic} >= {critical}");
}

#[test]
fn the_standard_sampler_is_uniform_modulo_small_numbers() {
    // The coarse bins above cannot see the fine structure. A discrete Gaussian of width S is
    // uniform modulo any m much smaller than S (up to exp(-2 pi^2 S^2 / m^2)), whereas a
    // convolution the fine table failed to smooth would not be uniform modulo K.
    const N: usize = 2_000_000;
    let sampler = DiscreteGaussian::standard();
    let mut rng = ChaCha20Rng::seed_from_u64(107);
    let samples: Vec<i64> = (0..N).map(|_| sampler.sample(&mut rng)).collect();

    for modulus in [2, 10, sampler.multiplier(), 1000] {
        let residues: Vec<i64> = samples.iter().map(|k| k.rem_euclid(modulus)).collect();
        let edges: Vec<i64> = std::iter::once(i64::MIN).chain(1..modulus).collect();
        let probs = vec![1.0 / modulus as f64; modulus as usize];
        let statistic = chi_square(&residues, &edges, &probs);
        let df = modulus as usize - 1;
        let critical = chi_square_critical(df);
        println!(
            "standard sampler modulo {modulus}: chi-square {statistic:.1} on {df} degrees of \
             freedom (critical value at p = 0.001: {critical:.1}), seed 107"
        );
        assert!(
            statistic < critical,
            "modulo {modulus}: {statistic} >= {critical}"
        );
    }
}

/// Mean, standard deviation and standardized third moment of `values`.
fn moments(values: &[f64]) -> (f64, f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let variance = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    let std = variance.sqrt();
    let skew = values
        .iter()
        .map(|v| ((v - mean) / std).powi(3))
        .sum::<f64>()
        / n;
    (mean, std, skew)
}

#[test]
fn released_noise_has_the_requested_standard_deviation() {
    // The sample standard deviation of n Gaussian values has standard error std / sqrt(2 n):
    // 5 standard errors of slack.
    const N: usize = 1_000_000;
    for (std_dev, seed) in [(0.1, 201), (1.0, 202), (10.0, 203), (1e-6, 204)] {
        let noise = GaussianNoise::new(std_dev).expect("valid standard deviation");
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let mut values = vec![0.0_f32; N];
        noise.add_to(&mut values, &mut rng);

        let released: Vec<f64> = values.iter().map(|&v| f64::from(v)).collect();
        let (_, std, _) = moments(&released);
        let tolerance = 5.0 * std_dev / (2.0 * N as f64).sqrt();
        println!("std_dev {std_dev}: sample std {std:.6e}, tolerance {tolerance:.2e}");
        assert!((std - std_dev).abs() < tolerance, "{std} vs {std_dev}");
    }
}

#[test]
fn released_noise_is_centred_and_symmetric() {
    // Around a non-zero value, so that quantization is exercised too. Tolerances are 5 standard
    // errors: std / sqrt(n) for the mean, sqrt(n) for the excess of positive over negative
    // signs, sqrt(6 / n) for the skewness.
    const N: usize = 1_000_000;
    const CENTRE: f32 = 0.37;
    const STD: f64 = 1.3;
    let noise = GaussianNoise::new(STD).expect("valid standard deviation");
    let mut rng = ChaCha20Rng::seed_from_u64(301);
    let mut values = vec![CENTRE; N];
    noise.add_to(&mut values, &mut rng);

    let offsets: Vec<f64> = values.iter().map(|&v| f64::from(v - CENTRE)).collect();
    let (mean, _, skew) = moments(&offsets);
    let positive = offsets.iter().filter(|&&d| d > 0.0).count() as f64;
    let negative = offsets.iter().filter(|&&d| d < 0.0).count() as f64;
    println!("mean {mean:.2e}, signs +{positive} -{negative}, skewness {skew:.2e}");
    assert!(mean.abs() < 5.0 * STD / (N as f64).sqrt(), "mean {mean}");
    assert!((positive - negative).abs() < 5.0 * (N as f64).sqrt());
    assert!(
        skew.abs() < 5.0 * (6.0 / N as f64).sqrt(),
        "skewness {skew}"
    );
}

#[test]
fn no_coordinate_is_released_unchanged() {
    // A nonzero draw moves a value by at least half a grid step (it may also round to its grid
    // point), far more than half an f32 rounding step for values of order one. Only a zero draw,
    // of probability about 1 / (S sqrt(2 pi)) (below 1e-6), could leave a value as it was.
    const N: usize = 10_000;
    let mut rng = ChaCha20Rng::seed_from_u64(401);
    let clean: Vec<f32> = (0..N)
        .map(|i| match i % 4 {
            0 => 0.0,
            _ => (rng.next_u32() >> 8) as f32 / 8_388_608.0 - 1.0,
        })
        .collect();
    let mut noised = clean.clone();
    let noise = GaussianNoise::new(1.1).expect("valid standard deviation");
    noise.add_to(&mut noised, &mut rng);

    let unchanged = clean.iter().zip(&noised).filter(|(a, b)| a == b).count();
    assert_eq!(unchanged, 0);
}

#[test]
fn values_on_the_same_grid_point_release_identically() {
    // The release depends on a value only through its grid point: nudging values by a quarter
    // step, with the same generator state, changes nothing.
    let noise = GaussianNoise::new(1.0).expect("valid standard deviation");
    let grid = noise.grid();
    let base: Vec<f32> = (0..1000).map(|i| (i as f64 * 37.0 * grid) as f32).collect();
    let nudged: Vec<f32> = base
        .iter()
        .map(|&v| (f64::from(v) + 0.25 * grid) as f32)
        .collect();
    assert!(base.iter().zip(&nudged).filter(|(a, b)| a != b).count() > 900);

    let (mut a, mut b) = (base.clone(), nudged);
    noise.add_to(&mut a, &mut ChaCha20Rng::seed_from_u64(501));
    noise.add_to(&mut b, &mut ChaCha20Rng::seed_from_u64(501));
    assert_eq!(a, b);
}

#[test]
fn the_same_seed_gives_the_same_noise() {
    let noise = GaussianNoise::new(0.5).expect("valid standard deviation");
    let release = |seed| {
        let mut values = vec![0.0_f32; 1003];
        noise.add_to(&mut values, &mut ChaCha20Rng::seed_from_u64(seed));
        values
    };
    assert_eq!(release(601), release(601));
    assert_ne!(release(601), release(602));
}

#[test]
fn invalid_standard_deviations_are_rejected() {
    for std_dev in [0.0, -1.0, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let error = GaussianNoise::new(std_dev).expect_err("invalid standard deviation");
        assert!(
            matches!(error, NoiseError::StdDev { .. }),
            "{std_dev}: {error}"
        );
    }
    for std_dev in [1e-30, 1e30] {
        let error = GaussianNoise::new(std_dev).expect_err("out of range");
        assert!(
            matches!(error, NoiseError::StdDevRange { .. }),
            "{std_dev}: {error}"
        );
    }

    let mut values = vec![1.0_f32; 4];
    let mut rng = ChaCha20Rng::seed_from_u64(701);
    let result = add_gaussian_noise(&mut values, 0.0, &mut rng);
    assert!(matches!(result, Err(ModelError::InvalidSetting { .. })));
    assert_eq!(values, vec![1.0; 4]);
}

#[test]
fn invalid_sampler_widths_are_rejected() {
    for sigma in [0.5, 6000.0, f64::NAN, -3.0] {
        let error = DiscreteGaussian::new(sigma).expect_err("invalid width");
        assert!(
            matches!(error, NoiseError::BaseSigma { .. }),
            "{sigma}: {error}"
        );
    }
    let error = DiscreteGaussian::convolved(640.0, 1e5).expect_err("invalid coarse width");
    assert!(matches!(error, NoiseError::BaseSigma { .. }), "{error}");
    let error = DiscreteGaussian::convolved(2.0, 100.0).expect_err("cannot smooth K = 1");
    assert!(matches!(error, NoiseError::Smoothing { .. }), "{error}");
}
