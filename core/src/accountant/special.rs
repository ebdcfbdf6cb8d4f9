//! Special functions and log-space arithmetic the accountants need.
//!
//! `std` has neither `erfc` nor a log-gamma function on stable Rust, so the complementary
//! error function is computed here: a positive power series for small arguments and Legendre's
//! continued fraction for the upper incomplete gamma function `Γ(1/2, x²)` (evaluated with the
//! modified Lentz algorithm) for large ones. Both keep about 15 significant digits, also deep
//! in the tail, which the privacy-loss discretization relies on.

use std::f64::consts::PI;

/// Below this argument `erfc` comes from the series for `erf`, above it from the continued
/// fraction; `x² = 1.5` is where the continued fraction starts to converge quickly.
const SERIES_LIMIT: f64 = 1.224_744_871_391_589;

/// `ln(e^a + e^b)`, exact when either side is `-inf`.
pub(crate) fn ln_add_exp(a: f64, b: f64) -> f64 {
    let (hi, lo) = if a >= b { (a, b) } else { (b, a) };
    if lo == f64::NEG_INFINITY {
        return hi;
    }
    hi + (lo - hi).exp().ln_1p()
}

/// `ln(1 + e^x)` without overflow for large `x` and without losing tiny results.
pub(crate) fn ln_1p_exp(x: f64) -> f64 {
    if x > 36.0 {
        x + (-x).exp()
    } else {
        x.exp().ln_1p()
    }
}

/// `ln(e^u - 1)` for `u > 0`, without overflow.
pub(crate) fn ln_exp_m1(u: f64) -> f64 {
    if u > 36.0 {
        u + (-(-u).exp()).ln_1p()
    } else {
        u.exp_m1().ln()
    }
}

/// The complementary error function `erfc(x) = 2/√π ∫_x^∞ e^{-t²} dt`.
pub(crate) fn erfc(x: f64) -> f64 {
    if x.is_nan() {
        return f64::NAN;
    }
    if x < 0.0 {
        return 2.0 - erfc(-x);
    }
    if x < SERIES_LIMIT {
        return 1.0 - erf_series(x);
    }
    if x > 27.3 {
        // erfc(27.3) is below the smallest subnormal.
        return 0.0;
    }
    (-x * x).exp() * x / PI.sqrt() * gamma_half_fraction(x * x)
}

/// `ln(erfc(x))`, finite for every finite `x`.
#[cfg(test)]
pub(crate) fn ln_erfc(x: f64) -> f64 {
    if x < SERIES_LIMIT {
        return erfc(x).ln();
    }
    -x * x + (x / PI.sqrt() * gamma_half_fraction(x * x)).ln()
}

/// Upper tail of the standard normal distribution, `P(Z > z)`, accurate in both tails.
pub(crate) fn normal_sf(z: f64) -> f64 {
    0.5 * erfc(z / std::f64::consts::SQRT_2)
}

/// `erf(x) = 2/√π e^{-x²} Σ_n 2^n x^{2n+1} / (1·3···(2n+1))`: every term is positive, so
/// nothing cancels.
fn erf_series(x: f64) -> f64 {
    let y = x * x;
    let mut term = x;
    let mut sum = x;
    let mut n = 0.0;
    while term > sum * 1e-17 {
        n += 1.0;
        term *= 2.0 * y / (2.0 * n + 1.0);
        sum += term;
    }
    2.0 / PI.sqrt() * (-y).exp() * sum
}

/// The continued fraction `1 / (y + 1/2 - (1·1/2) / (y + 5/2 - (2·3/2) / (y + 9/2 - ...)))`,
/// so that `Γ(1/2, y) = e^{-y} √y` times it (Legendre's fraction for `Γ(a, y)` at `a = 1/2`),
/// evaluated with the modified Lentz algorithm.
fn gamma_half_fraction(y: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let a = 0.5;
    let mut b = y + 1.0 - a;
    let mut c = 1.0 / TINY;
    let mut d = 1.0 / b;
    let mut value = d;
    for n in 1..500 {
        let n = f64::from(n);
        let an = -n * (n - a);
        b += 2.0;
        d = an * d + b;
        if d.abs() < TINY {
            d = TINY;
        }
        c = b + an / c;
        if c.abs() < TINY {
            c = TINY;
        }
        d = 1.0 / d;
        let step = d * c;
        value *= step;
        if (step - 1.0).abs() < 1e-16 {
            break;
        }
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_close(got: f64, want: f64, rel: f64) {
        assert!(
            ((got - want) / want).abs() <= rel,
            "got {got:e}, want {want:e}"
        );
    }

    #[test]
    fn erfc_matches_tabulated_values() {
        // Checked against a 30-digit evaluation.
        assert_close(erfc(0.0), 1.0, 1e-16);
        assert_close(erfc(0.5), 0.479_500_122_186_953_5, 2e-15);
        assert_close(erfc(1.0), 0.157_299_207_050_285_13, 2e-15);
        assert_close(erfc(2.0), 4.677_734_981_047_266e-3, 2e-15);
        assert_close(erfc(3.0), 2.209_049_699_858_544e-5, 2e-15);
        assert_close(erfc(5.0), 1.537_459_794_428_034_8e-12, 2e-15);
        assert_close(erfc(10.0), 2.088_487_583_762_545e-45, 2e-15);
        assert_close(erfc(-1.0), 1.842_700_792_949_715, 2e-16);
    }

    #[test]
    fn erfc_is_continuous_where_the_method_changes() {
        let below = erfc(SERIES_LIMIT * (1.0 - 1e-15));
        let above = erfc(SERIES_LIMIT * (1.0 + 1e-15));
        assert_close(below, above, 1e-14);
    }

    #[test]
    fn log_tail_stays_finite_far_out() {
        // ln erfc(40) = -1600 - ln(40 √π) + ln(1 - 1/3200 + ...).
        let want = -1600.0 - (40.0 * PI.sqrt()).ln() - 1.0 / 3200.0;
        assert!((ln_erfc(40.0) - want).abs() < 1e-6);
        assert_close(ln_erfc(3.0), erfc(3.0).ln(), 1e-14);
    }
}
