//! A radix-2 fast Fourier transform, just enough for convolving privacy-loss distributions.
//!
//! Iterative Cooley-Tukey on a power-of-two length, with every twiddle factor computed
//! directly from `sin`/`cos` (no recurrence), so the rounding error stays near
//! `ε log2(n)` relative to the largest coefficient.

use std::f64::consts::PI;
use std::ops::{Add, Mul, Sub};

/// A complex number; only what the transform and the pointwise power need.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Complex {
    pub(crate) re: f64,
    pub(crate) im: f64,
}

impl Complex {
    pub(crate) fn new(re: f64, im: f64) -> Self {
        Self { re, im }
    }

    /// `self^n` through polar form: one `ln`, one `exp` and one `sin_cos` whatever `n` is.
    pub(crate) fn powu(self, n: u64) -> Self {
        let modulus = self.re.hypot(self.im);
        if modulus == 0.0 {
            return Self::default();
        }
        let n = n as f64;
        let scale = (n * modulus.ln()).exp();
        let (sin, cos) = (n * self.im.atan2(self.re)).sin_cos();
        Self::new(scale * cos, scale * sin)
    }
}

impl Add for Complex {
    type Output = Self;
    fn add(self, rhs: Self) -> Self {
        Self::new(self.re + rhs.re, self.im + rhs.im)
    }
}

impl Sub for Complex {
    type Output = Self;
    fn sub(self, rhs: Self) -> Self {
        Self::new(self.re - rhs.re, self.im - rhs.im)
    }
}

impl Mul for Complex {
    type Output = Self;
    fn mul(self, rhs: Self) -> Self {
        Self::new(
            self.re * rhs.re - self.im * rhs.im,
            self.re * rhs.im + self.im * rhs.re,
        )
    }
}

/// Twiddle factors for one transform length, reusable across transforms of that length.
#[derive(Debug)]
pub(crate) struct Fft {
    len: usize,
    /// For each pass with half-block size `h = 1, 2, 4, ...`, the factors `e^{-iπk/h}` for
    /// `k < h`, stored contiguously from offset `h - 1` so that each pass reads them in order.
    twiddles: Vec<Complex>,
}

impl Fft {
    /// Prepares transforms of length `len`.
    ///
    /// # Panics
    /// If `len` is not a power of two; callers size their buffers with `next_power_of_two`.
    pub(crate) fn new(len: usize) -> Self {
        assert!(
            len.is_power_of_two(),
            "fft length {len} is not a power of two"
        );
        let mut twiddles = Vec::with_capacity(len);
        let mut half = 1;
        while half < len {
            twiddles.extend((0..half).map(|k| {
                let (sin, cos) = (-PI * k as f64 / half as f64).sin_cos();
                Complex::new(cos, sin)
            }));
            half *= 2;
        }
        Self { len, twiddles }
    }

    /// In place, `X_f = Σ_k x_k e^{-2πifk/n}`.
    pub(crate) fn forward(&self, data: &mut [Complex]) {
        self.transform(data);
    }

    /// In place, `x_k = (1/n) Σ_f X_f e^{2πifk/n}`, computed as the conjugate of the forward
    /// transform of the conjugate.
    pub(crate) fn inverse(&self, data: &mut [Complex]) {
        for value in data.iter_mut() {
            value.im = -value.im;
        }
        self.transform(data);
        let scale = 1.0 / self.len as f64;
        for value in data.iter_mut() {
            value.re *= scale;
            value.im *= -scale;
        }
    }

    fn transform(&self, data: &mut [Complex]) {
        assert_eq!(
            data.len(),
            self.len,
            "buffer length differs from the fft length"
        );
        let n = self.len;
        if n < 2 {
            return;
        }

        // Bit-reversal permutation.
        let bits = n.trailing_zeros();
        for i in 0..n {
            let j = i.reverse_bits() >> (usize::BITS - bits);
            if j > i {
                data.swap(i, j);
            }
        }

        // Butterflies, doubling the block size each pass.
        let mut half = 1;
        while half < n {
            let twiddles = &self.twiddles[half - 1..2 * half - 1];
            for block in data.chunks_exact_mut(2 * half) {
                let (lower, upper) = block.split_at_mut(half);
                for ((a, b), &w) in lower.iter_mut().zip(upper.iter_mut()).zip(twiddles) {
                    let t = *b * w;
                    *b = *a - t;
                    *a = *a + t;
                }
            }
            half *= 2;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn circular_convolution_matches_the_direct_sum() {
        let n = 16;
        let x: Vec<f64> = (0..n).map(|i| ((i * 7 + 3) % 11) as f64 / 11.0).collect();
        let y: Vec<f64> = (0..n).map(|i| ((i * 5 + 1) % 13) as f64 / 13.0).collect();
        let fft = Fft::new(n);
        let mut fx: Vec<Complex> = x.iter().map(|&v| Complex::new(v, 0.0)).collect();
        let mut fy: Vec<Complex> = y.iter().map(|&v| Complex::new(v, 0.0)).collect();
        fft.forward(&mut fx);
        fft.forward(&mut fy);
        let mut prod: Vec<Complex> = fx.iter().zip(&fy).map(|(&a, &b)| a * b).collect();
        fft.inverse(&mut prod);
        for k in 0..n {
            let direct: f64 = (0..n).map(|i| x[i] * y[(k + n - i) % n]).sum();
            assert!((prod[k].re - direct).abs() < 1e-13, "index {k}");
            assert!(prod[k].im.abs() < 1e-13);
        }
    }

    #[test]
    fn power_agrees_with_repeated_multiplication() {
        let z = Complex::new(0.6, -0.7);
        let mut direct = Complex::new(1.0, 0.0);
        for _ in 0..9 {
            direct = direct * z;
        }
        let polar = z.powu(9);
        assert!((polar.re - direct.re).abs() < 1e-14);
        assert!((polar.im - direct.im).abs() < 1e-14);
    }
}
