//! Rényi DP of the Poisson-subsampled Gaussian mechanism, its composition over heterogeneous
//! steps, and its conversion to `(ε, δ)`.
//!
//! The formulas, their sources and the numerical choices are stated in the parent module.

use std::f64::consts::PI;

use serde::{Deserialize, Serialize};

use super::special::{ln_1p_exp, ln_exp_m1};
use super::{
    AccountantError, EpsilonReport, check_delta, check_epsilon, check_order, check_q, check_sigma,
};

/// Above this many quadrature nodes a fractional order falls back to log-convex interpolation
/// between its integer neighbours. The count grows like `α / σ²`: only noise multipliers below
/// about 0.05 reach it at the default orders.
const MAX_QUADRATURE_NODES: f64 = 20_000.0;

/// The orders dp-accounting uses by default: `1.1, 1.2, ..., 10.9`, then `11, ..., 63`, then
/// `128, 256, 512, 1024` (156 orders).
///
/// Each fractional order is computed as `1 + k / 10` so that `2.0`, `3.0`, ... are exact
/// integers and take the exact binomial formula.
pub fn default_orders() -> Vec<f64> {
    let fractional = (1..100).map(|k| 1.0 + f64::from(k) / 10.0);
    let integer = (11..64).map(f64::from);
    let large = [128.0, 256.0, 512.0, 1024.0];
    fractional.chain(integer).chain(large).collect()
}

/// Rényi DP at `order` of one step of the Poisson-subsampled Gaussian mechanism with sampling
/// rate `q` and noise multiplier `sigma`, for add-or-remove-one neighbours:
/// `ε(α) = ln(A_α) / (α - 1)` (Mironov, Talwar and Zhang 2019).
///
/// # Errors
/// [`AccountantError::InvalidSamplingRate`], [`AccountantError::InvalidSigma`] or
/// [`AccountantError::InvalidOrder`] for a value outside its domain.
///
/// ```
/// use athanor_core::accountant::sampled_gaussian_rdp;
///
/// // Without subsampling it is the Gaussian mechanism's α / (2σ²).
/// let full = sampled_gaussian_rdp(1.0, 2.0, 8.0).unwrap();
/// assert!((full - 1.0).abs() < 1e-12);
///
/// // Subsampling at 1% makes it far smaller, at fractional orders too.
/// let sampled = sampled_gaussian_rdp(0.01, 2.0, 8.5).unwrap();
/// assert!(sampled > 0.0 && sampled < 1e-2);
/// ```
pub fn sampled_gaussian_rdp(q: f64, sigma: f64, order: f64) -> Result<f64, AccountantError> {
    check_q(q)?;
    check_sigma(sigma)?;
    check_order(order)?;
    Ok(rdp_unchecked(q, sigma, order))
}

/// [`sampled_gaussian_rdp`] for values already checked.
pub(crate) fn rdp_unchecked(q: f64, sigma: f64, order: f64) -> f64 {
    if q == 1.0 {
        return order / (2.0 * sigma * sigma);
    }
    ln_a(q, sigma, order) / (order - 1.0)
}

/// `ln A_α` for `0 < q < 1`.
fn ln_a(q: f64, sigma: f64, order: f64) -> f64 {
    if order.fract() == 0.0 {
        // `order` is a checked integer of at most 1e5, so the cast is exact.
        return ln_1p_exp(ln_excess_integer(q, sigma, order as u64));
    }
    if let Some(ln_excess) = ln_excess_quadrature(q, sigma, order) {
        return ln_1p_exp(ln_excess);
    }

    // TODO: for sigma below about 0.05 the quadrature would need more than
    // MAX_QUADRATURE_NODES nodes, so fractional orders take the log-convex upper bound between
    // their integer neighbours (ln A_α is convex in α) instead of the exact value. It is a valid,
    // pessimistic bound, and such noise gives epsilons in the hundreds; an exact value there
    // would need the two-series expansion, which converges fast exactly when sigma is small.
    let lower = order.floor();
    let theta = order - lower;
    let ln_lower = if lower == 1.0 {
        0.0
    } else {
        ln_1p_exp(ln_excess_integer(q, sigma, lower as u64))
    };
    let ln_upper = ln_1p_exp(ln_excess_integer(q, sigma, lower as u64 + 1));
    (1.0 - theta) * ln_lower + theta * ln_upper
}

/// `ln(A_n - 1)` for an integer order `n >= 2`, from the binomial expansion
/// `A_n = Σ_{k=0}^{n} C(n,k) (1-q)^{n-k} q^k e^{(k²-k)/(2σ²)}`.
///
/// The `k = 0` and `k = 1` terms add up to `1 - O(q²)`; they are combined with the `-1`
/// analytically, `(1-q)^{n-1} (1 + (n-1) q) - 1 = expm1(s)`, so that `A_n - 1` keeps its
/// relative precision when `q` is tiny.
fn ln_excess_integer(q: f64, sigma: f64, n: u64) -> f64 {
    let m = (n - 1) as f64;
    let ln_q = q.ln();
    let ln_1mq = (-q).ln_1p();
    let inv_2s2 = 1.0 / (2.0 * sigma * sigma);

    // ln of Σ_{k>=2} of the terms, accumulated in log space.
    let mut ln_coef = 0.0; // ln C(n, k), built by C(n, k+1) = C(n, k) (n - k) / (k + 1)
    let mut ln_rest = f64::NEG_INFINITY;
    for k in 1..=n {
        ln_coef += ((n - k + 1) as f64 / k as f64).ln();
        if k < 2 {
            continue;
        }
        let kf = k as f64;
        let term = ln_coef + (n - k) as f64 * ln_1mq + kf * ln_q + (kf * kf - kf) * inv_2s2;
        ln_rest = super::special::ln_add_exp(ln_rest, term);
    }

    // s = (n-1) ln(1-q) + ln(1 + (n-1) q), through its series when it is a small difference.
    let s = if m * q < 0.1 {
        let mut s = 0.0;
        let (mut qj, mut mj) = (q, m);
        for j in 2..80 {
            qj *= q;
            mj *= m;
            let sign = if j % 2 == 1 { 1.0 } else { -1.0 };
            s += qj / f64::from(j) * (sign * mj - m);
            // Odd terms vanish when m = 1, so stop on a bound rather than on the term.
            if qj * (mj + m) <= s.abs() * 1e-18 {
                break;
            }
        }
        s
    } else {
        m * ln_1mq + (m * q).ln_1p()
    };
    let low_terms = s.exp_m1();

    if ln_rest > 0.0 {
        ln_rest + (low_terms * (-ln_rest).exp()).ln_1p()
    } else {
        // A_n > 1 for every q > 0; rounding can only erase a difference below 1e-300 or so.
        (ln_rest.exp() + low_terms).max(f64::MIN_POSITIVE).ln()
    }
}

/// `ln(A_α - 1)` for a fractional order by trapezoidal quadrature of the defining integral, or
/// `None` when that would take more than [`MAX_QUADRATURE_NODES`] nodes.
///
/// With `Z ~ N(0, 1)`, `u = Z/σ - 1/(2σ²)` and `x = q (e^u - 1)`,
/// `A_α - 1 = E[(1 + x)^α - 1 - αx]` because `E[x] = 0`; the integrand is non-negative
/// (`(1+x)^α` is convex and `1 + αx` its tangent at 0), so the sum suffers no cancellation.
/// It is analytic in the strip `|Im Z| < πσ` (its only singularities are where `1 + x = 0`),
/// so the trapezoidal rule with step `h` converges like `exp(-2π d / h)` for any `d` below
/// `πσ` (Trefethen and Weideman 2014); `h = d / 8` puts that factor near `e^{-50}`.
fn ln_excess_quadrature(q: f64, sigma: f64, alpha: f64) -> Option<f64> {
    let d = (0.9 * PI * sigma).min(3.0);
    let h = d / 8.0;
    // The integrand is a standard normal density times a factor growing at most like
    // e^{max(α, 2) Z / σ}: its mass lies within 14 of the interval [0, max(α, 2) / σ].
    let lo = -14.0;
    let hi = alpha.max(2.0) / sigma + 14.0;
    let nodes = ((hi - lo) / h).ceil();
    if nodes > MAX_QUADRATURE_NODES {
        return None;
    }

    let shift = 1.0 / (2.0 * sigma * sigma);
    let ln_norm = -0.5 * (2.0 * PI).ln();
    let nodes = nodes as usize;
    let ln_values: Vec<f64> = (0..=nodes)
        .map(|j| {
            let z = lo + j as f64 * h;
            ln_norm - 0.5 * z * z + ln_binomial_excess(alpha, q, z / sigma - shift)
        })
        .collect();

    let max = ln_values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = ln_values.iter().map(|&v| (v - max).exp()).sum();
    Some(max + (h * sum).ln())
}

/// `ln((1 + x)^α - 1 - αx)` with `x = q (e^u - 1)`, accurate for tiny, moderate and huge `x`.
fn ln_binomial_excess(alpha: f64, q: f64, u: f64) -> f64 {
    // ln|x| and the sign of x; x is only ever formed when it cannot overflow.
    let (ln_abs_x, negative) = if u > 0.0 {
        (q.ln() + ln_exp_m1(u), false)
    } else {
        ((q * -u.exp_m1()).ln(), true)
    };

    if ln_abs_x <= (0.5 / alpha).ln() {
        // Small αx: Σ_{k>=2} C(α,k) x^k, each term at most a sixth of the one before.
        let x = if negative {
            -ln_abs_x.exp()
        } else {
            ln_abs_x.exp()
        };
        let mut coef = alpha * (alpha - 1.0) / 2.0;
        let mut power = x * x;
        let mut sum = coef * power;
        for k in 2..60 {
            let k = f64::from(k);
            coef *= (alpha - k) / (k + 1.0);
            power *= x;
            let term = coef * power;
            sum += term;
            if term.abs() <= sum.abs() * 1e-17 {
                break;
            }
        }
        return sum.ln();
    }

    let x = if negative {
        -ln_abs_x.exp()
    } else {
        ln_abs_x.exp()
    };
    let ln_power = alpha * x.ln_1p();
    if negative || ln_power <= 50.0 {
        return (ln_power.exp_m1() - alpha * x).ln();
    }

    // Huge x: (1+x)^α dominates; subtract (1 + αx) in log space.
    let ln_power = alpha * ln_1p_exp(ln_abs_x);
    let ratio = (ln_1p_exp(alpha.ln() + ln_abs_x) - ln_power).exp();
    ln_power + (-ratio).ln_1p()
}

/// A Rényi DP curve over a fixed set of orders, composed over steps of the Poisson-subsampled
/// Gaussian mechanism.
///
/// Composition adds the curves order by order, so steps with different `q` and `sigma` mix
/// freely. It is plain data: a node persists it (serde) and resumes composing after a restart.
/// Deserializing checks the orders and values again.
///
/// ```
/// use athanor_core::accountant::RdpAccountant;
///
/// let mut acct = RdpAccountant::new();
/// acct.compose(256.0 / 60_000.0, 1.1, 14_063)?;
/// let report = acct.epsilon(1e-5)?;
/// assert!((report.epsilon - 2.5967).abs() < 1e-3);
/// assert_eq!(report.order, Some(8.1));
/// # Ok::<(), athanor_core::accountant::AccountantError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RdpCurve")]
pub struct RdpAccountant {
    orders: Vec<f64>,
    rdp: Vec<f64>,
}

/// The serialized form of [`RdpAccountant`], checked before it becomes one.
#[derive(Deserialize)]
struct RdpCurve {
    orders: Vec<f64>,
    rdp: Vec<f64>,
}

impl TryFrom<RdpCurve> for RdpAccountant {
    type Error = AccountantError;

    fn try_from(curve: RdpCurve) -> Result<Self, AccountantError> {
        let mut acct = Self::with_orders(&curve.orders)?;
        if curve.rdp.len() != curve.orders.len() {
            return Err(AccountantError::CurveLength {
                orders: curve.orders.len(),
                values: curve.rdp.len(),
            });
        }
        for (&order, &value) in curve.orders.iter().zip(&curve.rdp) {
            if value.is_nan() || value < 0.0 {
                return Err(AccountantError::InvalidRdpValue { order, value });
            }
        }
        acct.rdp = curve.rdp;
        Ok(acct)
    }
}

impl Default for RdpAccountant {
    fn default() -> Self {
        Self::new()
    }
}

impl RdpAccountant {
    /// An empty accountant over [`default_orders`].
    pub fn new() -> Self {
        let orders = default_orders();
        let rdp = vec![0.0; orders.len()];
        Self { orders, rdp }
    }

    /// An empty accountant over the given orders.
    ///
    /// # Errors
    /// [`AccountantError::InvalidOrder`] for an order that is not finite, at most 1 or above
    /// 100 000, or [`AccountantError::CurveLength`] when `orders` is empty.
    pub fn with_orders(orders: &[f64]) -> Result<Self, AccountantError> {
        if orders.is_empty() {
            return Err(AccountantError::CurveLength {
                orders: 0,
                values: 0,
            });
        }
        for &order in orders {
            check_order(order)?;
        }
        Ok(Self {
            orders: orders.to_vec(),
            rdp: vec![0.0; orders.len()],
        })
    }

    /// Adds `steps` steps with sampling rate `q` and noise multiplier `sigma`. Zero steps
    /// change nothing.
    ///
    /// # Errors
    /// [`AccountantError::InvalidSamplingRate`] or [`AccountantError::InvalidSigma`]; the
    /// accountant is unchanged then.
    pub fn compose(&mut self, q: f64, sigma: f64, steps: u64) -> Result<(), AccountantError> {
        check_q(q)?;
        check_sigma(sigma)?;
        if steps == 0 {
            return Ok(());
        }
        let steps = steps as f64;
        for (value, &order) in self.rdp.iter_mut().zip(&self.orders) {
            *value += steps * rdp_unchecked(q, sigma, order);
        }
        Ok(())
    }

    /// `self + times × other`, for two curves over the same orders.
    pub(crate) fn plus_scaled(&self, other: &Self, times: f64) -> Self {
        debug_assert_eq!(self.orders, other.orders);
        let rdp = self
            .rdp
            .iter()
            .zip(&other.rdp)
            .map(|(a, b)| a + times * b)
            .collect();
        Self {
            orders: self.orders.clone(),
            rdp,
        }
    }

    /// The orders of the curve.
    pub fn orders(&self) -> &[f64] {
        &self.orders
    }

    /// The composed Rényi DP at each order, in the order of [`RdpAccountant::orders`].
    pub fn rdp(&self) -> &[f64] {
        &self.rdp
    }

    /// The smallest `ε` over the orders such that the composition is `(ε, delta)`-DP:
    /// `ε = min_α [R(α) + ln(1 - 1/α) - (ln δ + ln α) / (α - 1)]`, at least 0.
    ///
    /// An accountant that has composed nothing reports `ε = 0` and no order.
    ///
    /// # Errors
    /// [`AccountantError::InvalidDelta`] unless `0 < delta < 1`.
    pub fn epsilon(&self, delta: f64) -> Result<EpsilonReport, AccountantError> {
        check_delta(delta)?;
        if self.rdp.iter().all(|&r| r == 0.0) {
            return Ok(EpsilonReport {
                epsilon: 0.0,
                delta,
                order: None,
            });
        }

        let ln_delta = delta.ln();
        let mut best = (f64::INFINITY, self.orders[0]);
        for (&order, &rdp) in self.orders.iter().zip(&self.rdp) {
            let eps = rdp + (-1.0 / order).ln_1p() - (ln_delta + order.ln()) / (order - 1.0);
            if eps < best.0 {
                best = (eps, order);
            }
        }
        Ok(EpsilonReport {
            epsilon: best.0.max(0.0),
            delta,
            order: Some(best.1),
        })
    }

    /// The smallest `δ` over the orders such that the composition is `(epsilon, δ)`-DP, the
    /// inverse of [`RdpAccountant::epsilon`]:
    /// `δ = min_α exp[(α - 1)(R(α) - ε + ln(1 - 1/α)) - ln α]`, at most 1.
    ///
    /// # Errors
    /// [`AccountantError::InvalidEpsilon`] unless `epsilon` is finite and at least 0.
    pub fn delta(&self, epsilon: f64) -> Result<f64, AccountantError> {
        check_epsilon(epsilon)?;
        if self.rdp.iter().all(|&r| r == 0.0) {
            return Ok(0.0);
        }
        let ln_delta = self
            .orders
            .iter()
            .zip(&self.rdp)
            .map(|(&a, &r)| (a - 1.0) * (r - epsilon + (-1.0 / a).ln_1p()) - a.ln())
            .fold(f64::INFINITY, f64::min);
        Ok(ln_delta.exp().min(1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::super::special::{ln_add_exp, ln_erfc};
    use super::*;

    /// `ln(A_α)` from the two-series expansion of Mironov, Talwar and Zhang (2019, Sec. 3.3),
    /// summed term by term with the alternating tails averaged; slow, used only to check the
    /// quadrature.
    fn ln_a_two_series(q: f64, sigma: f64, alpha: f64, terms: usize) -> f64 {
        let z0 = sigma * sigma * (1.0 / q - 1.0).ln() + 0.5;
        let s2 = std::f64::consts::SQRT_2 * sigma;
        let (mut pos, mut neg) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
        let mut partial = Vec::new();
        let mut coef: f64 = 1.0;
        for i in 0..terms {
            let fi = i as f64;
            if i > 0 {
                coef *= (alpha - fi + 1.0) / fi;
            }
            let j = alpha - fi;
            let ln_coef = coef.abs().ln();
            let t0 = ln_coef
                + fi * q.ln()
                + j * (1.0 - q).ln()
                + (fi * fi - fi) / (2.0 * sigma * sigma)
                + (0.5f64).ln()
                + ln_erfc((fi - z0) / s2);
            let t1 = ln_coef
                + j * q.ln()
                + fi * (1.0 - q).ln()
                + (j * j - j) / (2.0 * sigma * sigma)
                + (0.5f64).ln()
                + ln_erfc((z0 - j) / s2);
            let both = ln_add_exp(t0, t1);
            if coef > 0.0 {
                pos = ln_add_exp(pos, both);
            } else {
                neg = ln_add_exp(neg, both);
            }
            partial.push(pos.exp() - neg.exp());
        }
        let n = partial.len();
        ((partial[n - 1] + partial[n - 2]) / 2.0).ln()
    }

    #[test]
    fn quadrature_matches_the_binomial_sum_at_integer_orders() {
        for &(q, sigma) in &[
            (0.01, 1.0),
            (0.3, 0.5),
            (1e-4, 3.0),
            (0.9, 2.0),
            (0.05, 0.3),
        ] {
            for n in [2u64, 3, 5, 8, 10] {
                let exact = ln_excess_integer(q, sigma, n);
                let quad = ln_excess_quadrature(q, sigma, n as f64).unwrap();
                assert!(
                    (exact - quad).abs() < 1e-11,
                    "q {q} sigma {sigma} order {n}: {exact} vs {quad}"
                );
            }
        }
    }

    #[test]
    fn quadrature_matches_the_two_series_expansion_at_fractional_orders() {
        for &(q, sigma) in &[(0.01, 1.0), (0.00427, 1.1), (0.1, 0.7), (0.02, 2.0)] {
            for alpha in [1.1, 1.5, 2.7, 4.3, 8.1, 10.9] {
                let series = ln_a_two_series(q, sigma, alpha, 4000);
                let quad = ln_a(q, sigma, alpha);
                assert!(
                    ((series - quad) / quad).abs() < 1e-8,
                    "q {q} sigma {sigma} order {alpha}: {series} vs {quad}"
                );
            }
        }
    }

    #[test]
    fn tiny_sampling_rates_keep_the_quadratic_scaling() {
        // A_α - 1 ≈ C(α,2) q² (e^{1/σ²} - 1) as q → 0, at integer and fractional orders.
        for alpha in [2.0, 7.5, 32.0] {
            let q = 1e-9;
            let leading = alpha * (alpha - 1.0) / 2.0 * q * q * (1.0f64).exp_m1();
            let rdp = rdp_unchecked(q, 1.0, alpha) * (alpha - 1.0);
            assert!(((rdp - leading) / leading).abs() < 1e-6, "order {alpha}");
        }
    }

    #[test]
    fn tiny_noise_falls_back_to_a_bound_above_the_integer_neighbours_chord() {
        let (q, sigma) = (0.01, 0.005);
        let at = |a: f64| rdp_unchecked(q, sigma, a) * (a - 1.0);
        let mid = at(2.5);
        assert!(mid >= at(2.0) && mid <= at(3.0));
        assert!((mid - 0.5 * (at(2.0) + at(3.0))).abs() <= 1e-9 * mid);
    }
}
