//! Throughput of the DP-SGD noise sampler, against the floating-point ziggurat it replaced and
//! the raw ChaCha20 keystream both draw from.
//!
//! Each measurement noises a vector of 2^18 coordinates (1 MiB, about the gradient of a model
//! of a quarter million parameters), draws as many integer samples, or draws one 64-bit word per
//! coordinate; they alternate for many short rounds, so that they see the same machine state,
//! and the fastest round of each is reported, the least disturbed by other processes. Run with
//! `cargo bench -p athanor-core --bench noise`; other invocations (`cargo test --all-targets`
//! builds and runs bench binaries without `--bench`) return at once.

use std::hint::black_box;
use std::time::{Duration, Instant};

use athanor_core::noise::{DiscreteGaussian, GaussianNoise};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, StandardNormal};

const COORDINATES: usize = 1 << 18;
const ROUNDS: usize = 60;
const STD_DEV: f64 = 1.0;

fn main() {
    if !std::env::args().any(|arg| arg == "--bench") {
        return;
    }

    let start = Instant::now();
    let sampler = DiscreteGaussian::standard();
    let setup = start.elapsed();
    let mut rng = ChaCha20Rng::seed_from_u64(0x0015_e5a3);
    let noise = GaussianNoise::new(STD_DEV).expect("a valid standard deviation");
    let mut values = vec![0.0_f32; COORDINATES];

    let mut times: [Vec<Duration>; 4] = Default::default();
    for _ in 0..ROUNDS {
        let start = Instant::now();
        noise.add_to(black_box(&mut values), &mut rng);
        times[0].push(start.elapsed());

        let start = Instant::now();
        let mut sum = 0_i64;
        for _ in 0..COORDINATES {
            sum = sum.wrapping_add(sampler.sample(&mut rng));
        }
        black_box(sum);
        times[1].push(start.elapsed());

        let start = Instant::now();
        insecure_float_gaussian(black_box(&mut values), STD_DEV, &mut rng);
        times[2].push(start.elapsed());

        let start = Instant::now();
        let mut fold = 0_u64;
        for _ in 0..COORDINATES {
            fold ^= rng.next_u64();
        }
        black_box(fold);
        times[3].push(start.elapsed());
    }

    let rates = times.map(|t| COORDINATES as f64 / fastest(&t).as_secs_f64());
    println!(
        "{COORDINATES} coordinates, std {STD_DEV}, fastest of {ROUNDS} rounds, one core; discrete \
         Gaussian width S = {:.0} grid steps, tables built in {:.1} ms",
        sampler.sigma(),
        setup.as_secs_f64() * 1e3
    );
    let names = [
        "discrete gaussian, added to f32 (GaussianNoise::add_to)",
        "discrete gaussian, integers, a word each (DiscreteGaussian::sample)",
        "float ziggurat, added to f32 (old sampler)",
        "chacha20 keystream, one u64 per coordinate",
    ];
    for (name, rate) in names.iter().zip(rates) {
        println!("{name:<68} {:>8.1} M coordinates/s", rate / 1e6);
    }
    println!(
        "ratio new / old float sampler: {:.3}; new / keystream: {:.3}",
        rates[0] / rates[2],
        rates[0] / rates[3]
    );
}

/// The sampler this crate used before the discrete Gaussian: `v += std_dev * z`, `z` from
/// `rand_distr`'s ziggurat, all in floating point. Open to the precision attacks the
/// [`athanor_core::noise`] module docs describe; kept here only as the speed reference.
fn insecure_float_gaussian(values: &mut [f32], std_dev: f64, rng: &mut ChaCha20Rng) {
    for value in values {
        let z: f64 = StandardNormal.sample(rng);
        *value += (std_dev * z) as f32;
    }
}

fn fastest(times: &[Duration]) -> Duration {
    times.iter().copied().min().expect("at least one round")
}
