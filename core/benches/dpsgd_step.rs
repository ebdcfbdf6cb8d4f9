//! Cost of a DP-SGD step relative to a plain SGD step on the same Poisson-sampled batches.
//!
//! Data are MNIST-shaped (784 features in `[0, 1)`, 10 classes) but random, which does not
//! change the cost of a step. For each model and expected batch size the plain and the private
//! step alternate, so both see the same machine state, and the medians of their timings are
//! compared. Run with `cargo bench -p athanor-core --bench dpsgd_step`.

use std::time::{Duration, Instant};

use athanor_core::dpsgd::{DpSgdParams, Trainer, TrainingPlan};
use athanor_core::model::{Architecture, ModelSpec};
use athanor_core::noise::add_gaussian_noise;
use ndarray::Array2;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

const EXAMPLES: usize = 20_000;
const FEATURES: usize = 784;
const CLASSES: usize = 10;
const WARMUP_STEPS: usize = 10;

fn main() {
    let mut rng = ChaCha20Rng::seed_from_u64(0x00be_0c4a);
    let x = Array2::from_shape_simple_fn((EXAMPLES, FEATURES), || unit(&mut rng));
    let y: Vec<u32> = (0..EXAMPLES)
        .map(|_| rng.next_u32() % CLASSES as u32)
        .collect();

    println!(
        "{EXAMPLES} examples x {FEATURES} features, {CLASSES} classes; median over the \
         repetitions"
    );
    println!(
        "{:<22} {:>6} {:>6} {:>11} {:>11} {:>7} {:>11}",
        "model", "batch", "reps", "sgd (ms)", "dp-sgd (ms)", "ratio", "noise (ms)"
    );
    let models = [
        ("logistic regression", Architecture::LogisticRegression, 400),
        ("mlp (hidden 128)", Architecture::Mlp { hidden: 128 }, 60),
    ];
    for (name, architecture, reps) in models {
        let spec = ModelSpec {
            architecture,
            features: FEATURES,
            classes: CLASSES,
        };
        for batch in [256, 1024] {
            let reps = if batch == 256 { reps } else { reps / 2 };
            let timing = measure(spec, &x, &y, batch, reps, &mut rng);
            println!(
                "{name:<22} {batch:>6} {reps:>6} {:>11.3} {:>11.3} {:>7.3} {:>11.3}",
                millis(timing.plain),
                millis(timing.private),
                timing.private.as_secs_f64() / timing.plain.as_secs_f64(),
                millis(timing.noise),
            );
        }
    }
}

struct Timing {
    plain: Duration,
    private: Duration,
    /// Noising a vector of the model's size alone.
    noise: Duration,
}

fn measure(
    spec: ModelSpec,
    x: &Array2<f32>,
    y: &[u32],
    batch: usize,
    reps: usize,
    rng: &mut ChaCha20Rng,
) -> Timing {
    let mut trainer = Trainer::new(spec, x.view(), y).expect("the data match the spec");
    let mut params = spec.init(1);
    let plain = TrainingPlan {
        learning_rate: 0.01,
        steps: 1,
        sampling_rate: batch as f64 / EXAMPLES as f64,
        privacy: None,
    };
    let private = TrainingPlan {
        privacy: Some(DpSgdParams {
            clip_norm: 1.0,
            noise_multiplier: 1.0,
        }),
        ..plain
    };

    for _ in 0..WARMUP_STEPS {
        trainer.step(&mut params, &plain, rng).expect("valid plan");
        trainer
            .step(&mut params, &private, rng)
            .expect("valid plan");
    }
    let (mut plain_times, mut private_times, mut noise_times) = (vec![], vec![], vec![]);
    let mut noise = vec![0.0; spec.num_params()];
    for _ in 0..reps {
        let start = Instant::now();
        trainer.step(&mut params, &plain, rng).expect("valid plan");
        plain_times.push(start.elapsed());

        let start = Instant::now();
        trainer
            .step(&mut params, &private, rng)
            .expect("valid plan");
        private_times.push(start.elapsed());

        let start = Instant::now();
        add_gaussian_noise(&mut noise, 1.0, rng).expect("positive standard deviation");
        noise_times.push(start.elapsed());
    }
    Timing {
        plain: median(plain_times),
        private: median(private_times),
        noise: median(noise_times),
    }
}

fn unit(rng: &mut ChaCha20Rng) -> f32 {
    (rng.next_u32() >> 8) as f32 / 16_777_216.0
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort_unstable();
    times[times.len() / 2]
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}
