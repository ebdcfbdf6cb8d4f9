//! One-run privacy audit of DP-SGD (Steinke, Nasr, Jagielski 2023): the measured lower bound
//! on epsilon must stay below the accountant's upper bound, and the same audit without noise
//! must find a large lower bound, showing that it can fail.
//!
//! Canaries are the easiest records to detect: each owns one input feature that no other
//! record uses, so its influence on the model lands in one row of the weight matrix where
//! only the noise can hide it. The auditor sees the final weights (white box) and scores each
//! canary by how far training moved its row towards the canary's label.

use athanor_core::accountant::{Accountant, Step};
use athanor_core::audit::epsilon_lower_bound;
use athanor_core::dpsgd::{self, DpSgdParams, TrainingPlan};
use athanor_core::model::{Architecture, ModelSpec};
use ndarray::Array2;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

const BASE_FEATURES: usize = 8;
const BASE_ROWS: usize = 1_000;
const CANARIES: usize = 1_000;
/// Guesses on each side: "in" for the top, "out" for the bottom of the ranking.
const GUESSES_PER_SIDE: usize = 100;
const SAMPLING_RATE: f64 = 0.1;
const STEPS: u64 = 100;
const DELTA: f64 = 1e-5;

/// Uniform on [0, 1) from the top 24 bits of a word.
fn unit(rng: &mut ChaCha20Rng) -> f32 {
    (rng.next_u32() >> 8) as f32 / 16_777_216.0
}

struct Audit {
    lower_bound: f64,
    correct: u64,
    guesses: u64,
}

/// Trains once with half the canaries inserted at random and audits the result.
fn run_audit(privacy: Option<DpSgdParams>, seed: u64) -> Audit {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let spec = ModelSpec {
        architecture: Architecture::LogisticRegression,
        features: BASE_FEATURES + CANARIES,
        classes: 2,
    };

    // Ordinary records: a noisy linear rule over the base features.
    let mut rows: Vec<(Vec<(usize, f32)>, u32)> = (0..BASE_ROWS)
        .map(|_| {
            let x: Vec<(usize, f32)> = (0..BASE_FEATURES).map(|j| (j, unit(&mut rng))).collect();
            let score: f32 = x.iter().map(|&(_, v)| v).sum::<f32>() - BASE_FEATURES as f32 / 2.0;
            let label = u32::from(score + 0.3 * (unit(&mut rng) - 0.5) > 0.0);
            (x, label)
        })
        .collect();

    // Canaries: one private feature each, a random label, inserted with probability 1/2.
    let labels: Vec<u32> = (0..CANARIES).map(|_| rng.next_u32() & 1).collect();
    let inserted: Vec<bool> = (0..CANARIES).map(|_| rng.next_u32() & 1 == 1).collect();
    for i in (0..CANARIES).filter(|&i| inserted[i]) {
        rows.push((vec![(BASE_FEATURES + i, 1.0)], labels[i]));
    }

    let mut x = Array2::<f32>::zeros((rows.len(), spec.features));
    let mut y = Vec::with_capacity(rows.len());
    for (r, (features, label)) in rows.iter().enumerate() {
        for &(j, v) in features {
            x[[r, j]] = v;
        }
        y.push(*label);
    }

    let initial = spec.init(seed);
    let mut params = initial.clone();
    let plan = TrainingPlan {
        learning_rate: 0.5,
        steps: STEPS,
        sampling_rate: SAMPLING_RATE,
        privacy,
    };
    dpsgd::train(&spec, &mut params, x.view(), &y, &plan, &mut rng).unwrap();

    // Score: movement of the canary's weight row towards its own label.
    let w = &spec.tensors()[0];
    let (before, after) = (w.slice(&initial), w.slice(&params));
    let moved = |row: usize, class: u32| {
        let at = row * spec.classes + class as usize;
        after[at] - before[at]
    };
    let mut ranked: Vec<(f32, usize)> = (0..CANARIES)
        .map(|i| {
            let row = BASE_FEATURES + i;
            (moved(row, labels[i]) - moved(row, 1 - labels[i]), i)
        })
        .collect();
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0));

    let top = &ranked[..GUESSES_PER_SIDE];
    let bottom = &ranked[CANARIES - GUESSES_PER_SIDE..];
    let correct = top.iter().filter(|&&(_, i)| inserted[i]).count()
        + bottom.iter().filter(|&&(_, i)| !inserted[i]).count();
    let guesses = 2 * GUESSES_PER_SIDE as u64;
    Audit {
        lower_bound: epsilon_lower_bound(correct as u64, guesses, 0.95).unwrap(),
        correct: correct as u64,
        guesses,
    }
}

fn accountant_epsilon(noise_multiplier: f64) -> f64 {
    let steps = [Step {
        q: SAMPLING_RATE,
        sigma: noise_multiplier,
        count: STEPS,
    }];
    Accountant::Rdp.epsilon(&steps, DELTA).unwrap().epsilon
}

#[test]
fn audit_lower_bound_stays_below_the_accountant() {
    let noise_multiplier = 2.0;
    let upper = accountant_epsilon(noise_multiplier);
    let privacy = Some(DpSgdParams {
        clip_norm: 1.0,
        noise_multiplier,
    });

    for seed in [11, 12, 13] {
        let audit = run_audit(privacy, seed);
        eprintln!(
            "seed {seed}: {}/{} correct, lower bound {:.3}, accountant {upper:.3}",
            audit.correct, audit.guesses, audit.lower_bound
        );
        assert!(
            audit.lower_bound <= upper,
            "audit found epsilon >= {:.3} but the accountant claims {upper:.3}",
            audit.lower_bound
        );
    }
}

#[test]
fn audit_without_noise_finds_a_large_lower_bound() {
    // Same clipping and sampling, the noise switched off (a multiplier of 1e-9 leaves it far
    // below the f32 resolution of the weights): the canaries' rows give them away.
    let privacy = Some(DpSgdParams {
        clip_norm: 1.0,
        noise_multiplier: 1e-9,
    });
    let audit = run_audit(privacy, 11);
    eprintln!(
        "no noise: {}/{} correct, lower bound {:.3}",
        audit.correct, audit.guesses, audit.lower_bound
    );
    assert!(
        audit.lower_bound > accountant_epsilon(2.0),
        "the audit cannot tell training without noise apart: lower bound {:.3}",
        audit.lower_bound
    );
}
