//! DP-SGD's public API: per-example norms and clipping against explicitly materialized
//! per-example gradients, the noise's distribution, Poisson sampling, whole training runs, and
//! the rejection of bad settings and shapes.
//!
//! Statistical tests use fixed seeds; each states its tolerance in standard errors of the
//! quantity it checks, computed from the sample size.

use std::path::Path;
use std::process::Command;

use athanor_core::dpsgd::{
    self, DpSgdParams, Trainer, TrainingPlan, clipped_gradient_sum, per_example_gradient_norms,
    poisson_sample, private_gradient_sum, steps_for_epochs,
};
use athanor_core::model::{self, Architecture, ModelError, ModelSpec};
use athanor_core::noise::add_gaussian_noise;
use ndarray::{Array2, ArrayView2, Axis, Slice};
use proptest::prelude::*;
use proptest::test_runner::RngSeed;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

fn logistic(features: usize, classes: usize) -> ModelSpec {
    ModelSpec {
        architecture: Architecture::LogisticRegression,
        features,
        classes,
    }
}

fn mlp(features: usize, hidden: usize, classes: usize) -> ModelSpec {
    ModelSpec {
        architecture: Architecture::Mlp { hidden },
        features,
        classes,
    }
}

fn unit(rng: &mut ChaCha20Rng) -> f32 {
    (rng.next_u32() >> 8) as f32 / 16_777_216.0
}

fn random_data(seed: u64, rows: usize, spec: &ModelSpec) -> (Array2<f32>, Vec<u32>) {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let x = Array2::from_shape_simple_fn((rows, spec.features), || unit(&mut rng));
    let y = (0..rows)
        .map(|_| rng.next_u32() % spec.classes as u32)
        .collect();
    (x, y)
}

fn random_params(seed: u64, spec: &ModelSpec, scale: f32) -> Vec<f32> {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    (0..spec.num_params())
        .map(|_| (2.0 * unit(&mut rng) - 1.0) * scale)
        .collect()
}

fn norm(v: &[f32]) -> f64 {
    v.iter()
        .map(|&a| f64::from(a) * f64::from(a))
        .sum::<f64>()
        .sqrt()
}

/// The slow reference: example `i`'s gradient, materialized as the mean gradient of the batch
/// made of row `i` alone.
fn per_example_gradients(
    spec: &ModelSpec,
    params: &[f32],
    x: ArrayView2<'_, f32>,
    y: &[u32],
) -> Vec<Vec<f32>> {
    (0..y.len())
        .map(|i| {
            let row = x.slice_axis(Axis(0), Slice::from(i..=i));
            model::gradient(spec, params, row, &y[i..=i]).expect("valid inputs")
        })
        .collect()
}

fn mean_and_std(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let variance = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / (n - 1.0);
    (mean, variance.sqrt())
}

/// Three classes in `[0, 1]^4`: background noise up to 0.3, plus 0.7 on the feature of the
/// example's class. Linearly separable with a wide margin.
fn separable_data(seed: u64, rows: usize) -> (Array2<f32>, Vec<u32>) {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let y: Vec<u32> = (0..rows).map(|_| rng.next_u32() % 3).collect();
    let mut x = Array2::from_shape_simple_fn((rows, 4), || 0.3 * unit(&mut rng));
    for (mut row, &label) in x.rows_mut().into_iter().zip(&y) {
        row[label as usize] += 0.7;
    }
    (x, y)
}

fn private(clip_norm: f64, noise_multiplier: f64) -> Option<DpSgdParams> {
    Some(DpSgdParams {
        clip_norm,
        noise_multiplier,
    })
}

#[test]
fn fast_per_example_norms_equal_norms_of_materialized_gradients() {
    for (spec, seed) in [(logistic(12, 5), 1), (mlp(12, 9, 5), 2)] {
        let params = random_params(seed, &spec, 0.7);
        let (x, y) = random_data(seed + 10, 40, &spec);

        let fast = per_example_gradient_norms(&spec, &params, x.view(), &y).expect("valid");
        let slow = per_example_gradients(&spec, &params, x.view(), &y);
        assert_eq!(fast.len(), slow.len());
        // Both are f32 computations of the same quantity by different routes; their relative
        // rounding error is of order 1e-6, so 1e-4 relative is a wide margin.
        for (i, (&fast, slow)) in fast.iter().zip(&slow).enumerate() {
            let slow = norm(slow);
            assert!(
                (f64::from(fast) - slow).abs() <= 1e-4 * slow.max(1e-3),
                "{spec:?}, example {i}: fast {fast}, materialized {slow}"
            );
        }
    }
}

#[test]
fn clipped_sum_equals_the_sum_of_explicitly_clipped_gradients() {
    for (spec, seed) in [(logistic(10, 4), 3), (mlp(10, 8, 4), 4)] {
        let params = random_params(seed, &spec, 1.0);
        let (x, y) = random_data(seed + 10, 60, &spec);
        let gradients = per_example_gradients(&spec, &params, x.view(), &y);

        // The median norm as the bound: about half the examples are clipped.
        let mut norms: Vec<f64> = gradients.iter().map(|g| norm(g)).collect();
        norms.sort_by(f64::total_cmp);
        let clip_norm = norms[norms.len() / 2];

        let mut expected = vec![0.0_f64; spec.num_params()];
        let mut expected_clipped = 0;
        for gradient in &gradients {
            let factor = (clip_norm / norm(gradient)).min(1.0);
            expected_clipped += usize::from(factor < 1.0);
            for (e, &g) in expected.iter_mut().zip(gradient) {
                *e += factor * f64::from(g);
            }
        }

        let got = clipped_gradient_sum(&spec, &params, x.view(), &y, clip_norm).expect("valid");
        // The example at the median may fall either side after f32 rounding.
        assert!(got.clipped.abs_diff(expected_clipped) <= 1, "{spec:?}");
        // Sums of 60 terms of norm at most the clip norm (~1): 1e-4 absolute.
        for (k, (&got, &want)) in got.sum.iter().zip(&expected).enumerate() {
            assert!(
                (f64::from(got) - want).abs() < 1e-4,
                "{spec:?}, parameter {k}"
            );
        }
    }
}

#[test]
fn a_single_example_with_a_huge_input_contributes_exactly_the_clip_norm() {
    for spec in [logistic(5, 3), mlp(5, 6, 3)] {
        let params = random_params(5, &spec, 1.0);
        let x = Array2::from_elem((1, 5), 1e6_f32);
        let raw = per_example_gradient_norms(&spec, &params, x.view(), &[1]).expect("valid");
        assert!(
            raw[0] > 1e3,
            "{spec:?}: the gradient should be huge, got norm {}",
            raw[0]
        );

        let clipped = clipped_gradient_sum(&spec, &params, x.view(), &[1], 0.5).expect("valid");
        assert_eq!(clipped.clipped, 1);
        // f32 rounding of the scaled gradient: a relative error of order 1e-6.
        assert!(
            (norm(&clipped.sum) - 0.5).abs() < 0.5 * 1e-5,
            "{}",
            norm(&clipped.sum)
        );
    }
}

#[test]
fn an_example_whose_logits_overflow_is_dropped_from_the_clipped_sum() {
    let spec = logistic(2, 2);
    // w = [[3e38, 0], [0, 0]], b = 0: the first row's logit overflows to infinity, its softmax
    // is NaN, and so is its gradient norm.
    let params = [3e38, 0.0, 0.0, 0.0, 0.0, 0.0];
    let x = Array2::from_shape_vec((2, 2), vec![1e3_f32, 0.0, 0.0, 1.0]).unwrap();
    let y = [1, 0];

    let both = clipped_gradient_sum(&spec, &params, x.view(), &y, 1.0).unwrap();
    let second = x.slice_axis(Axis(0), Slice::from(1..2));
    let alone = clipped_gradient_sum(&spec, &params, second, &y[1..], 1.0).unwrap();
    assert_eq!(both.clipped, 1 + alone.clipped);
    assert_eq!(both.sum, alone.sum);
    assert!(both.sum.iter().all(|g| g.is_finite()));
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        rng_seed: RngSeed::Fixed(0x0c11_9000),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn no_examples_contribution_exceeds_the_clip_norm(
        features in proptest::collection::vec(-1e4_f32..1e4, 4),
        label in 0_u32..3,
        param_seed in any::<u64>(),
        param_scale in 1e-3_f32..1e3,
        clip_norm in 1e-3_f64..1e3,
        use_mlp in any::<bool>(),
    ) {
        let spec = if use_mlp { mlp(4, 5, 3) } else { logistic(4, 3) };
        let params = random_params(param_seed, &spec, param_scale);
        let x = Array2::from_shape_vec((1, 4), features).expect("four features");
        let clipped = clipped_gradient_sum(&spec, &params, x.view(), &[label], clip_norm)
            .expect("valid inputs");
        // Clipping is exact up to f32 rounding, a relative error of order 1e-6.
        prop_assert!(norm(&clipped.sum) <= clip_norm * (1.0 + 1e-5));
    }
}

#[test]
fn noise_has_standard_deviation_sigma_times_clip_norm() {
    // 10 x 1000 + 1000 + 1000 x 10 + 10 = 21,010 coordinates.
    let spec = mlp(10, 1000, 10);
    let params = spec.init(6);
    let (x, y) = random_data(7, 32, &spec);
    let privacy = DpSgdParams {
        clip_norm: 0.8,
        noise_multiplier: 1.3,
    };

    let clean = clipped_gradient_sum(&spec, &params, x.view(), &y, privacy.clip_norm).unwrap();
    let mut rng = ChaCha20Rng::seed_from_u64(8);
    let noisy = private_gradient_sum(&spec, &params, x.view(), &y, &privacy, &mut rng).unwrap();
    assert_eq!(noisy.clipped, clean.clipped);

    let noise: Vec<f64> = noisy
        .sum
        .iter()
        .zip(&clean.sum)
        .map(|(&n, &c)| f64::from(n) - f64::from(c))
        .collect();
    assert!(noise.len() > 20_000);
    assert!(
        noisy.sum.iter().zip(&clean.sum).all(|(n, c)| n != c),
        "a coordinate kept no noise"
    );

    // With N coordinates the sample mean has standard error s / sqrt(N) and the sample
    // standard deviation s / sqrt(2N) (Gaussian); five standard errors each.
    let expected = privacy.noise_std();
    let n = noise.len() as f64;
    let (mean, std) = mean_and_std(&noise);
    assert!(mean.abs() < 5.0 * expected / n.sqrt(), "mean {mean}");
    assert!(
        (std - expected).abs() < 5.0 * expected / (2.0 * n).sqrt(),
        "std {std}"
    );
}

#[test]
fn the_same_clipped_sum_noised_a_thousand_times_spreads_as_expected() {
    let spec = logistic(6, 3);
    let params = random_params(9, &spec, 1.0);
    let (x, y) = random_data(10, 20, &spec);
    let privacy = DpSgdParams {
        clip_norm: 2.0,
        noise_multiplier: 0.7,
    };
    let clean = clipped_gradient_sum(&spec, &params, x.view(), &y, privacy.clip_norm).unwrap();

    const REPEATS: usize = 1000;
    let mut rng = ChaCha20Rng::seed_from_u64(11);
    let releases: Vec<Vec<f32>> = (0..REPEATS)
        .map(|_| {
            private_gradient_sum(&spec, &params, x.view(), &y, &privacy, &mut rng)
                .unwrap()
                .sum
        })
        .collect();

    // Per coordinate, over 1000 releases: the mean has standard error sigma C / sqrt(1000) and
    // the standard deviation sigma C / sqrt(2000). Five standard errors each; 21 coordinates.
    let expected = privacy.noise_std();
    let mut pooled = Vec::new();
    for k in 0..spec.num_params() {
        let values: Vec<f64> = releases
            .iter()
            .map(|release| f64::from(release[k]))
            .collect();
        let (mean, std) = mean_and_std(&values);
        let centre = f64::from(clean.sum[k]);
        assert!(
            (mean - centre).abs() < 5.0 * expected / (REPEATS as f64).sqrt(),
            "k {k}"
        );
        assert!(
            (std - expected).abs() < 5.0 * expected / (2.0 * REPEATS as f64).sqrt(),
            "k {k}"
        );
        pooled.extend(values.iter().map(|v| v - centre));
    }

    // Successive releases are independent: the lag-one correlation of coordinate 0 has
    // standard error 1 / sqrt(999).
    let first: Vec<f64> = releases
        .iter()
        .map(|r| f64::from(r[0] - clean.sum[0]))
        .collect();
    let lag: f64 = first.windows(2).map(|w| w[0] * w[1]).sum::<f64>() / (REPEATS - 1) as f64;
    assert!(
        (lag / (expected * expected)).abs() < 5.0 / 999_f64.sqrt(),
        "lag {lag}"
    );
    assert_eq!(pooled.len(), REPEATS * spec.num_params());
}

#[test]
fn noise_sampler_refuses_a_zero_negative_or_infinite_scale() {
    let mut rng = ChaCha20Rng::seed_from_u64(12);
    let mut values = vec![1.0_f32; 4];
    for std in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        let result = add_gaussian_noise(&mut values, std, &mut rng);
        assert!(
            matches!(result, Err(ModelError::InvalidSetting { .. })),
            "{std}"
        );
    }
    assert_eq!(values, vec![1.0; 4]);
}

#[test]
fn poisson_batch_sizes_have_binomial_mean_and_variance() {
    const N: usize = 1000;
    const Q: f64 = 0.05;
    const DRAWS: usize = 20_000;
    let mut rng = ChaCha20Rng::seed_from_u64(13);
    let mut batch = Vec::new();
    let mut sizes = Vec::with_capacity(DRAWS);
    let mut inclusions = vec![0_u32; N];
    for _ in 0..DRAWS {
        poisson_sample(N, Q, &mut rng, &mut batch).expect("valid rate");
        assert!(
            batch.windows(2).all(|pair| pair[0] < pair[1]),
            "sorted and distinct"
        );
        assert!(batch.iter().all(|&i| i < N));
        sizes.push(batch.len() as f64);
        batch.iter().for_each(|&i| inclusions[i] += 1);
    }

    // Binomial(1000, 0.05): mean 50, variance 47.5. Over 20,000 draws the sample mean has
    // standard error sqrt(47.5 / 20000) = 0.049 and the sample variance about
    // 47.5 * sqrt(2 / 20000) = 0.48; five standard errors each.
    let (mean, std) = mean_and_std(&sizes);
    let variance = std * std;
    let (expected_mean, expected_variance) = (N as f64 * Q, N as f64 * Q * (1.0 - Q));
    assert!((mean - expected_mean).abs() < 5.0 * (expected_variance / DRAWS as f64).sqrt());
    assert!(
        (variance - expected_variance).abs() < 5.0 * 0.48,
        "variance {variance}"
    );

    // Every example is included with frequency q: standard error sqrt(q (1 - q) / 20000) =
    // 0.0015. Six standard errors, so that none of the 1000 examples fails by chance.
    let tolerance = 6.0 * (Q * (1.0 - Q) / DRAWS as f64).sqrt();
    for (i, &count) in inclusions.iter().enumerate() {
        let frequency = f64::from(count) / DRAWS as f64;
        assert!(
            (frequency - Q).abs() < tolerance,
            "example {i}: {frequency}"
        );
    }
}

#[test]
fn poisson_sampling_at_rate_one_takes_everything_and_rejects_bad_rates() {
    let mut rng = ChaCha20Rng::seed_from_u64(14);
    let mut batch = vec![7, 7];
    poisson_sample(5, 1.0, &mut rng, &mut batch).expect("valid rate");
    assert_eq!(batch, vec![0, 1, 2, 3, 4]);
    poisson_sample(0, 0.5, &mut rng, &mut batch).expect("valid rate");
    assert!(batch.is_empty());
    for q in [0.0, -0.1, 1.5, f64::NAN] {
        assert!(poisson_sample(5, q, &mut rng, &mut batch).is_err(), "{q}");
    }
}

#[test]
fn a_private_step_divides_the_noised_clipped_sum_by_the_expected_batch_size() {
    // Every example identical, so the clipped sum of any batch is |B| times one clipped
    // gradient, and the step reports |B|.
    let spec = logistic(3, 2);
    let params = random_params(15, &spec, 1.0);
    let n = 200;
    let x = Array2::from_shape_fn((n, 3), |(_, j)| [0.2_f32, 0.9, 0.4][j]);
    let y = vec![1; n];
    let one = clipped_gradient_sum(
        &spec,
        &params,
        x.slice_axis(Axis(0), Slice::from(0..1)),
        &y[..1],
        0.05,
    )
    .unwrap();
    assert_eq!(one.clipped, 1, "the test needs a clipped example");

    let plan = TrainingPlan {
        learning_rate: 0.3,
        steps: 1,
        sampling_rate: 0.25,
        privacy: private(0.05, 1e-3),
    };
    let mut trainer = Trainer::new(spec, x.view(), &y).unwrap();
    let mut rng = ChaCha20Rng::seed_from_u64(16);
    let mut updated = params.clone();
    let report = trainer.step(&mut updated, &plan, &mut rng).unwrap();
    assert_eq!(report.clipped, report.batch_size);
    assert_ne!(
        report.batch_size as f64,
        0.25 * n as f64,
        "pick a seed where |B| != q n"
    );

    // theta - theta' = lr (|B| c + noise) / (q n), noise ~ N(0, (1e-3 * 0.05)^2) per coordinate:
    // recover |B| c + noise and compare with |B| c at six noise standard deviations, plus f32
    // rounding of the update (1e-6 relative on parameters of magnitude 1, magnified by
    // q n / lr = 167).
    let expected_batch = plan.sampling_rate * n as f64;
    for k in 0..params.len() {
        let released = f64::from(params[k] - updated[k]) * expected_batch / 0.3;
        let want = report.batch_size as f64 * f64::from(one.sum[k]);
        assert!(
            (released - want).abs() < 6.0 * 5e-5 + 167.0 * 2e-7,
            "parameter {k}"
        );
    }
}

#[test]
fn an_empty_batch_is_a_step_of_pure_noise_and_plain_sgd_skips_it() {
    let spec = mlp(3, 300, 3);
    let (x, y) = random_data(17, 50, &spec);
    let params = spec.init(18);
    let privacy = DpSgdParams {
        clip_norm: 1.0,
        noise_multiplier: 2.0,
    };
    let plan = TrainingPlan {
        learning_rate: 0.1,
        steps: 1,
        sampling_rate: 0.002,
        privacy: Some(privacy),
    };
    let mut trainer = Trainer::new(spec, x.view(), &y).unwrap();
    let mut rng = ChaCha20Rng::seed_from_u64(19);

    // With q n = 0.1 a batch is empty with probability 0.9: find the first empty one.
    let (before, after) = (0..20)
        .find_map(|_| {
            let mut updated = params.clone();
            let report = trainer.step(&mut updated, &plan, &mut rng).unwrap();
            (report.batch_size == 0).then_some((params.clone(), updated))
        })
        .expect("an empty batch within 20 steps");

    // The update is lr * noise / (q n), noise ~ N(0, (sigma C)^2): over 2103 coordinates the
    // sample standard deviation has standard error 1/sqrt(2 * 2103) relative; five of them.
    let scale = 0.1 / (0.002 * 50.0);
    let noise: Vec<f64> = before
        .iter()
        .zip(&after)
        .map(|(&b, &a)| f64::from(b - a) / scale)
        .collect();
    let (_, std) = mean_and_std(&noise);
    let tolerance = 5.0 / (2.0 * noise.len() as f64).sqrt();
    assert!(
        (std / privacy.noise_std() - 1.0).abs() < tolerance,
        "std {std}"
    );

    let plain = TrainingPlan {
        privacy: None,
        ..plan
    };
    let skipped = (0..20).any(|_| {
        let mut stepped = params.clone();
        let report = trainer.step(&mut stepped, &plain, &mut rng).unwrap();
        if report.batch_size > 0 {
            return false;
        }
        assert_eq!(stepped, params);
        true
    });
    assert!(skipped, "an empty batch within 20 steps");
}

fn train_separable(spec: ModelSpec, privacy: Option<DpSgdParams>, seed: u64) {
    let (x, y) = separable_data(seed, 600);
    let mut params = spec.init(seed);
    let before = model::evaluate(&spec, &params, x.view(), &y).unwrap();
    let plan = TrainingPlan {
        learning_rate: 0.5,
        steps: steps_for_epochs(20.0, 0.1),
        sampling_rate: 0.1,
        privacy,
    };
    let mut rng = ChaCha20Rng::seed_from_u64(seed + 1);
    let outcome = dpsgd::train(&spec, &mut params, x.view(), &y, &plan, &mut rng).unwrap();
    let after = model::evaluate(&spec, &params, x.view(), &y).unwrap();

    assert_eq!(outcome.steps, 200);
    // Batch sizes are Binomial(600, 0.1): the mean over 200 steps has standard error
    // sqrt(54 / 200) = 0.52; five standard errors.
    assert!((outcome.mean_batch_size - 60.0).abs() < 2.6, "{outcome:?}");
    assert!(
        after.loss < 0.5 * before.loss,
        "seed {seed}: {before:?} -> {after:?}"
    );
    assert!(
        after.accuracy >= 0.95,
        "seed {seed}: {before:?} -> {after:?}"
    );
    let mean_loss = outcome.mean_loss.expect("examples were sampled");
    assert!(mean_loss < before.loss, "{outcome:?}");
    if privacy.is_none() {
        assert_eq!(outcome.examples_clipped, 0);
    }
}

#[test]
fn logistic_regression_learns_a_separable_problem_without_dp() {
    train_separable(logistic(4, 3), None, 21);
}

#[test]
fn logistic_regression_learns_a_separable_problem_with_modest_dp() {
    train_separable(logistic(4, 3), private(1.0, 1.0), 22);
}

#[test]
fn mlp_learns_a_separable_problem_without_dp() {
    train_separable(mlp(4, 16, 3), None, 23);
}

#[test]
fn mlp_learns_a_separable_problem_with_modest_dp() {
    train_separable(mlp(4, 16, 3), private(1.0, 1.0), 24);
}

#[test]
fn training_reports_clipping_and_is_reproducible_with_a_seeded_rng() {
    let spec = mlp(4, 8, 3);
    let (x, y) = separable_data(25, 300);
    let plan = TrainingPlan {
        learning_rate: 0.1,
        steps: 30,
        sampling_rate: 0.2,
        // A bound far below any gradient norm: every sampled example is clipped.
        privacy: private(1e-6, 1.0),
    };
    let run = |seed| {
        let mut params = spec.init(1);
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let outcome = dpsgd::train(&spec, &mut params, x.view(), &y, &plan, &mut rng).unwrap();
        (params, outcome)
    };

    let (params, outcome) = run(26);
    assert_eq!(outcome.clipped_fraction, 1.0);
    assert_eq!(outcome.examples_clipped, outcome.examples_sampled);
    assert_eq!(run(26), (params.clone(), outcome));
    assert_ne!(run(27).0, params);
}

#[test]
fn zero_steps_change_nothing_and_report_no_loss() {
    let spec = logistic(4, 3);
    let (x, y) = separable_data(28, 50);
    let mut params = spec.init(0);
    let plan = TrainingPlan {
        learning_rate: 0.1,
        steps: 0,
        sampling_rate: 0.5,
        privacy: private(1.0, 1.0),
    };
    let mut rng = ChaCha20Rng::seed_from_u64(29);
    let outcome = dpsgd::train(&spec, &mut params, x.view(), &y, &plan, &mut rng).unwrap();
    assert_eq!(outcome.steps, 0);
    assert_eq!(outcome.mean_batch_size, 0.0);
    assert_eq!(outcome.mean_loss, None);
    assert_eq!(params, spec.init(0));
}

#[test]
fn train_rejects_invalid_settings_before_touching_parameters() {
    let spec = logistic(4, 3);
    let (x, y) = separable_data(30, 50);
    let valid = TrainingPlan {
        learning_rate: 0.1,
        steps: 5,
        sampling_rate: 0.5,
        privacy: private(1.0, 1.0),
    };
    let invalid = [
        (
            "learning_rate",
            TrainingPlan {
                learning_rate: 0.0,
                ..valid
            },
        ),
        (
            "learning_rate",
            TrainingPlan {
                learning_rate: f32::NAN,
                ..valid
            },
        ),
        (
            "sampling_rate",
            TrainingPlan {
                sampling_rate: 0.0,
                ..valid
            },
        ),
        (
            "sampling_rate",
            TrainingPlan {
                sampling_rate: 1.01,
                ..valid
            },
        ),
        (
            "sampling_rate",
            TrainingPlan {
                sampling_rate: f64::NAN,
                ..valid
            },
        ),
        (
            "clip_norm",
            TrainingPlan {
                privacy: private(0.0, 1.0),
                ..valid
            },
        ),
        (
            "clip_norm",
            TrainingPlan {
                privacy: private(f64::INFINITY, 1.0),
                ..valid
            },
        ),
        (
            "noise_multiplier",
            TrainingPlan {
                privacy: private(1.0, 0.0),
                ..valid
            },
        ),
        (
            "noise_multiplier",
            TrainingPlan {
                privacy: private(1.0, -2.0),
                ..valid
            },
        ),
        (
            "noise_multiplier",
            TrainingPlan {
                privacy: private(1.0, f64::NAN),
                ..valid
            },
        ),
    ];
    let mut rng = ChaCha20Rng::seed_from_u64(31);
    for (setting, plan) in invalid {
        let mut params = spec.init(0);
        let error = dpsgd::train(&spec, &mut params, x.view(), &y, &plan, &mut rng).unwrap_err();
        assert!(
            matches!(error, ModelError::InvalidSetting { name, .. } if name == setting),
            "{plan:?}: {error}"
        );
        assert_eq!(params, spec.init(0));
    }
    assert!(valid.validate().is_ok());
    let message = TrainingPlan {
        sampling_rate: 2.0,
        ..valid
    }
    .validate()
    .unwrap_err();
    assert_eq!(
        message.to_string(),
        "invalid sampling_rate: expected a number in (0, 1], got 2"
    );
}

#[test]
fn training_rejects_wrong_shapes_instead_of_panicking() {
    let spec = mlp(4, 5, 3);
    let (x, y) = separable_data(32, 20);
    let plan = TrainingPlan {
        learning_rate: 0.1,
        steps: 3,
        sampling_rate: 0.5,
        privacy: private(1.0, 1.0),
    };
    let mut rng = ChaCha20Rng::seed_from_u64(33);
    let mut params = spec.init(0);

    let mut short = vec![0.0; 3];
    assert_eq!(
        dpsgd::train(&spec, &mut short, x.view(), &y, &plan, &mut rng),
        Err(ModelError::ParamCount {
            expected: spec.num_params(),
            got: 3
        })
    );
    let narrow = x.slice_axis(Axis(1), Slice::from(0..3));
    assert!(matches!(
        dpsgd::train(&spec, &mut params, narrow, &y, &plan, &mut rng),
        Err(ModelError::FeatureCount {
            expected: 4,
            got: 3
        })
    ));
    assert!(matches!(
        dpsgd::train(&spec, &mut params, x.view(), &y[1..], &plan, &mut rng),
        Err(ModelError::LabelCount { .. })
    ));
    let mut bad_values = x.clone();
    bad_values[[4, 2]] = f32::NAN;
    assert!(matches!(
        dpsgd::train(&spec, &mut params, bad_values.view(), &y, &plan, &mut rng),
        Err(ModelError::NonFiniteInput { row: 4, column: 2 })
    ));
    let mut bad_labels = y.clone();
    bad_labels[7] = 3;
    assert!(matches!(
        dpsgd::train(&spec, &mut params, x.view(), &bad_labels, &plan, &mut rng),
        Err(ModelError::LabelOutOfRange {
            row: 7,
            label: 3,
            classes: 3
        })
    ));
    let empty = x.slice_axis(Axis(0), Slice::from(0..0));
    assert_eq!(
        dpsgd::train(&spec, &mut params, empty, &[], &plan, &mut rng),
        Err(ModelError::NoExamples)
    );
    assert!(clipped_gradient_sum(&spec, &params, x.view(), &y, -1.0).is_err());
    assert!(per_example_gradient_norms(&spec, &short, x.view(), &y).is_err());

    let mut trainer = Trainer::new(spec, x.view(), &y).unwrap();
    assert!(trainer.step(&mut short, &plan, &mut rng).is_err());
    assert_eq!(params, spec.init(0));
}

#[test]
fn steps_for_epochs_rounds_to_the_nearest_step() {
    assert_eq!(steps_for_epochs(1.0, 0.01), 100);
    assert_eq!(steps_for_epochs(3.0, 0.03), 100);
    assert_eq!(steps_for_epochs(0.5, 0.3), 2);
    assert_eq!(steps_for_epochs(0.0, 0.3), 0);
    assert_eq!(steps_for_epochs(1.0, 1.0), 1);
    for (epochs, q) in [
        (-1.0, 0.1),
        (f64::NAN, 0.1),
        (1.0, 0.0),
        (1.0, 1.5),
        (1.0, f64::NAN),
    ] {
        assert_eq!(steps_for_epochs(epochs, q), 0, "{epochs}, {q}");
    }
}

#[test]
fn os_seeded_generators_differ() {
    let mut first = dpsgd::os_seeded_rng();
    let mut second = dpsgd::try_os_seeded_rng().expect("the test machine has an OS generator");
    // Two 256-bit seeds from the OS agree with probability 2^-256.
    assert_ne!(first.next_u64(), second.next_u64());
}

/// Reads a gzip CSV with a header and the label first, by piping it through `gzip -dc`.
fn read_gzip_csv(path: &Path) -> Option<(Array2<f32>, Vec<u32>)> {
    let output = Command::new("gzip").arg("-dc").arg(path).output().ok()?;
    if !output.status.success() {
        return None;
    }
    let text = String::from_utf8(output.stdout).ok()?;
    let mut lines = text.lines();
    let columns = lines.next()?.split(',').count();

    let (mut values, mut labels) = (Vec::new(), Vec::new());
    for line in lines.filter(|line| !line.is_empty()) {
        let mut fields = line.split(',');
        labels.push(fields.next()?.parse().ok()?);
        for field in fields {
            values.push(field.parse::<f32>().ok()?);
        }
    }
    let x = Array2::from_shape_vec((labels.len(), columns - 1), values).ok()?;
    Some((x, labels))
}

#[test]
fn logistic_regression_learns_breast_cancer_data_with_and_without_dp() {
    let path = Path::new("/work/shared/data/sklearn_breast_cancer.csv.gz");
    let Some((mut x, y)) = path.exists().then(|| read_gzip_csv(path)).flatten() else {
        println!(
            "skipped: {} is missing or unreadable (needs gzip)",
            path.display()
        );
        return;
    };

    // Min-max scale every column to [0, 1], as the node's loader does.
    for mut column in x.columns_mut() {
        let low = column.fold(f32::INFINITY, |a, &b| a.min(b));
        let high = column.fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        column.mapv_inplace(|v| {
            if high > low {
                (v - low) / (high - low)
            } else {
                0.0
            }
        });
    }
    // A seeded 80/20 split.
    let mut order: Vec<usize> = (0..y.len()).collect();
    let mut rng = ChaCha20Rng::seed_from_u64(34);
    for i in (1..order.len()).rev() {
        order.swap(i, rng.next_u64() as usize % (i + 1));
    }
    let cut = y.len() * 4 / 5;
    let take = |rows: &[usize]| {
        let x = x.select(Axis(0), rows);
        let y: Vec<u32> = rows.iter().map(|&i| y[i]).collect();
        (x, y)
    };
    let ((x_train, y_train), (x_test, y_test)) = (take(&order[..cut]), take(&order[cut..]));

    let spec = logistic(x.ncols(), 2);
    for (privacy, floor) in [(None, 0.93), (private(1.0, 1.0), 0.9)] {
        let mut params = spec.init(0);
        let plan = TrainingPlan {
            learning_rate: 2.0,
            steps: steps_for_epochs(60.0, 0.1),
            sampling_rate: 0.1,
            privacy,
        };
        let outcome = dpsgd::train(
            &spec,
            &mut params,
            x_train.view(),
            &y_train,
            &plan,
            &mut rng,
        )
        .unwrap();
        let test = model::evaluate(&spec, &params, x_test.view(), &y_test).unwrap();
        println!("breast cancer, privacy {privacy:?}: test {test:?}, training {outcome:?}");
        // scikit-learn's non-private reference on standardized features reaches 0.965.
        assert!(test.accuracy >= floor, "{privacy:?}: {test:?}");
    }
}
