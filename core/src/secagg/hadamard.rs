//! The randomized Hadamard rotation applied before quantization.
//!
//! `R x = H D x / sqrt(n)`, with `D` a diagonal of random signs and `H` the `n x n`
//! Walsh-Hadamard matrix (`n` a power of two, the input zero-padded). `H / sqrt(n)` is
//! orthogonal and its own inverse, so `R^-1 y = D H y / sqrt(n)` and L2 norms are preserved.
//! Rotating spreads a vector's energy over all coordinates, so the largest coordinate is
//! typically about `|x| sqrt(2 ln(2n) / n)` rather than up to `|x|`, which lets a coarser
//! quantization step lose less (Suresh et al. 2017, "Distributed mean estimation with limited
//! communication"; Kairouz, Liu and Steinke 2021, "The distributed discrete Gaussian mechanism
//! for federated learning with secure aggregation").
//!
//! The signs come from a seed every node and the coordinator share (it is public: the
//! rotation protects accuracy, not privacy). Sign `k` is bit `k mod 64` of raw ChaCha20
//! keystream word `k / 64`.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

/// The smallest power of two at least `len` (and at least 1).
pub fn padded_len(len: usize) -> usize {
    len.max(1).next_power_of_two()
}

/// `x <- H D x / sqrt(n)`.
///
/// # Panics
/// If `x.len()` is not a power of two.
pub fn rotate(x: &mut [f64], seed: &[u8; 32]) {
    apply_signs(x, seed);
    normalized_walsh_hadamard(x);
}

/// `y <- D H y / sqrt(n)`, the inverse of [`rotate`].
///
/// # Panics
/// If `y.len()` is not a power of two.
pub fn unrotate(y: &mut [f64], seed: &[u8; 32]) {
    normalized_walsh_hadamard(y);
    apply_signs(y, seed);
}

fn apply_signs(x: &mut [f64], seed: &[u8; 32]) {
    let mut rng = ChaCha20Rng::from_seed(*seed);
    for block in x.chunks_mut(64) {
        let bits = rng.next_u64();
        for (k, value) in block.iter_mut().enumerate() {
            if bits >> k & 1 == 1 {
                *value = -*value;
            }
        }
    }
}

/// In-place fast Walsh-Hadamard transform, scaled by `1 / sqrt(n)`: `n log n` additions.
fn normalized_walsh_hadamard(x: &mut [f64]) {
    let n = x.len();
    assert!(
        n.is_power_of_two(),
        "Hadamard transform of length {n}, not a power of two"
    );
    let mut half = 1;
    while half < n {
        for block in x.chunks_mut(2 * half) {
            let (left, right) = block.split_at_mut(half);
            for (a, b) in left.iter_mut().zip(right) {
                let (sum, difference) = (*a + *b, *a - *b);
                *a = sum;
                *b = difference;
            }
        }
        half *= 2;
    }
    let scale = 1.0 / (n as f64).sqrt();
    x.iter_mut().for_each(|v| *v *= scale);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_is_inverted_and_keeps_the_norm() {
        let seed = [5; 32];
        let original: Vec<f64> = (0..64).map(|i| f64::from(i) - 20.0).collect();
        let mut x = original.clone();
        rotate(&mut x, &seed);
        let norm = |v: &[f64]| v.iter().map(|a| a * a).sum::<f64>().sqrt();
        assert!((norm(&x) - norm(&original)).abs() < 1e-9);
        unrotate(&mut x, &seed);
        for (a, b) in x.iter().zip(&original) {
            assert!((a - b).abs() < 1e-9);
        }
    }

    #[test]
    fn rotation_spreads_a_spike() {
        let mut x = vec![0.0; 1024];
        x[3] = 32.0;
        rotate(&mut x, &[1; 32]);
        assert!(x.iter().all(|v| (v.abs() - 1.0).abs() < 1e-12));
    }
}
