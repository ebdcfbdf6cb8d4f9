//! Privacy loss distribution (PLD) accountant for the Poisson-subsampled Gaussian mechanism:
//! connect-the-dots discretization, composition by FFT, and `ε(δ)` from the hockey-stick
//! divergence.
//!
//! The method and its sources are described in the parent module. In short, for each order of
//! the neighbouring pair (`Remove`: `P = μ, Q = μ0`; `Add`: `P = μ0, Q = μ`), the loss
//! `L(x) = ln(P(x)/Q(x))` is monotone in `x`, so the probability of each loss interval
//! `[kΔ, (k+1)Δ]` is a difference of normal distribution functions. That probability is split
//! between `kΔ` and `(k+1)Δ` preserving both its `P` and its `Q` mass, which can only raise
//! `δ(ε)`; the composed distribution is `Π_j FFT(p_j)^{n_j}` transformed back.

use serde::{Deserialize, Serialize};

use super::fft::{Complex, Fft};
use super::special::{ln_1p_exp, ln_add_exp, ln_exp_m1, normal_sf};
use super::{
    AccountantError, EpsilonReport, Step, check_delta, check_epsilon, check_q, check_sigma,
};

/// The value discretization interval used by [`crate::accountant::Accountant::Pld`], the same
/// as in the reference values from dp-accounting.
pub const DEFAULT_INTERVAL: f64 = 1e-4;

/// Noise beyond this many standard deviations is not discretized: the loss beyond the
/// high-loss end counts as infinite, beyond the low-loss end as the lowest grid value kept.
/// Each tail holds `P(Z > 10) ≈ 7.6e-24` of the mass.
const TAIL_SIGMAS: f64 = 10.0;

/// The largest grid, for one step or for the composed window (2^21 points, 32 MiB of complex
/// values). A finer interval than fits is doubled until it fits.
const MAX_GRID: usize = 1 << 21;

/// Mass allowed outside the composition window on each side. The upper side's bound is added
/// to `δ`; mass below the window wraps to its top, which can only raise `δ`.
const WINDOW_TAIL: f64 = 1e-18;

/// A PLD accountant: the steps taken so far and the discretization interval.
///
/// Composing is cheap (steps with the same `q` and `sigma` are merged); the distribution is
/// discretized and convolved when [`PldAccountant::epsilon`] or [`PldAccountant::delta`] is
/// called, in time roughly linear in the width of the composed loss distribution divided by
/// the interval. Intervals that would need more than 2^21 grid points are doubled until they
/// fit, which keeps the result an upper bound but makes it coarser.
///
/// ```
/// use athanor_core::accountant::PldAccountant;
///
/// let mut acct = PldAccountant::new();
/// acct.compose(0.01, 1.0, 1)?;
/// // dp-accounting reports 0.19945 for one step; RDP would say 0.9555.
/// let eps = acct.epsilon(1e-5)?.epsilon;
/// assert!(eps >= 0.19945 * 0.99 && eps < 0.19945 * 1.01);
/// # Ok::<(), athanor_core::accountant::AccountantError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "PldState")]
pub struct PldAccountant {
    interval: f64,
    steps: Vec<Step>,
}

/// The serialized form of [`PldAccountant`], checked before it becomes one.
#[derive(Deserialize)]
struct PldState {
    interval: f64,
    steps: Vec<Step>,
}

impl TryFrom<PldState> for PldAccountant {
    type Error = AccountantError;

    fn try_from(state: PldState) -> Result<Self, AccountantError> {
        let mut acct = Self::with_interval(state.interval)?;
        for step in state.steps {
            acct.compose(step.q, step.sigma, step.count)?;
        }
        Ok(acct)
    }
}

impl Default for PldAccountant {
    fn default() -> Self {
        Self::new()
    }
}

impl PldAccountant {
    /// An empty accountant with interval [`DEFAULT_INTERVAL`].
    pub fn new() -> Self {
        Self {
            interval: DEFAULT_INTERVAL,
            steps: Vec::new(),
        }
    }

    /// An empty accountant with the given value discretization interval. Smaller is tighter
    /// and slower; the result is an upper bound whatever the interval.
    ///
    /// # Errors
    /// [`AccountantError::InvalidInterval`] unless `interval` is positive and finite.
    pub fn with_interval(interval: f64) -> Result<Self, AccountantError> {
        if !(interval > 0.0 && interval.is_finite()) {
            return Err(AccountantError::InvalidInterval { interval });
        }
        Ok(Self {
            interval,
            steps: Vec::new(),
        })
    }

    /// An accountant with interval [`DEFAULT_INTERVAL`] that has composed `steps`.
    ///
    /// # Errors
    /// As [`PldAccountant::compose`], for the first bad step.
    pub fn from_steps(steps: &[Step]) -> Result<Self, AccountantError> {
        let mut acct = Self::new();
        for step in steps {
            acct.compose(step.q, step.sigma, step.count)?;
        }
        Ok(acct)
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
        match self.steps.iter_mut().find(|s| s.q == q && s.sigma == sigma) {
            Some(step) => step.count = step.count.saturating_add(steps),
            None => self.steps.push(Step {
                q,
                sigma,
                count: steps,
            }),
        }
        Ok(())
    }

    /// The steps composed so far, one entry per distinct `(q, sigma)`.
    pub fn steps(&self) -> &[Step] {
        &self.steps
    }

    /// The value discretization interval asked for.
    pub fn interval(&self) -> f64 {
        self.interval
    }

    /// The smallest `ε` such that the composition is `(ε, delta)`-DP for both the add and the
    /// remove direction, up to the (pessimistic) discretization. It is 0 with no step taken,
    /// and `+∞` if no finite epsilon holds at this delta.
    ///
    /// # Errors
    /// [`AccountantError::InvalidDelta`] unless `0 < delta < 1`.
    pub fn epsilon(&self, delta: f64) -> Result<EpsilonReport, AccountantError> {
        check_delta(delta)?;
        let epsilon = self
            .composed()
            .iter()
            .map(|c| c.epsilon(delta))
            .fold(0.0, f64::max);
        Ok(EpsilonReport {
            epsilon,
            delta,
            order: None,
        })
    }

    /// The smallest `δ` such that the composition is `(epsilon, δ)`-DP in both directions,
    /// the inverse of [`PldAccountant::epsilon`].
    ///
    /// # Errors
    /// [`AccountantError::InvalidEpsilon`] unless `epsilon` is finite and non-negative.
    pub fn delta(&self, epsilon: f64) -> Result<f64, AccountantError> {
        check_epsilon(epsilon)?;
        let delta = self
            .composed()
            .iter()
            .map(|c| c.delta(epsilon))
            .fold(0.0, f64::max);
        Ok(delta.min(1.0))
    }

    /// The composed loss distributions of both directions; none without steps, and only one
    /// when every step has `q = 1`, where the two directions coincide.
    fn composed(&self) -> Vec<Composed> {
        if self.steps.is_empty() {
            return Vec::new();
        }
        let mut directions = vec![Direction::Remove];
        if self.steps.iter().any(|s| s.q < 1.0) {
            directions.push(Direction::Add);
        }
        directions
            .into_iter()
            .map(|d| compose_direction(&self.steps, d, self.interval))
            .collect()
    }
}

/// Which of the two neighbouring datasets holds the extra record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    /// `P = (1-q) N(0,σ²) + q N(1,σ²)`, `Q = N(0,σ²)`.
    Remove,
    /// `P = N(0,σ²)`, `Q = (1-q) N(0,σ²) + q N(1,σ²)`.
    Add,
}

/// One pair `(P, Q)` of one step.
#[derive(Clone, Copy, Debug)]
struct Pair {
    q: f64,
    sigma: f64,
    direction: Direction,
}

impl Pair {
    /// `u = (2x - 1) / (2σ²)`, so that `N(1,σ²)/N(0,σ²) = e^u` at `x`.
    fn u(self, x: f64) -> f64 {
        (2.0 * x - 1.0) / (2.0 * self.sigma * self.sigma)
    }

    /// `ln(1 - q + q e^u)`, the remove direction's loss.
    fn ln_mixture_ratio(self, u: f64) -> f64 {
        let q = self.q;
        if q == 1.0 {
            u
        } else if u > 0.0 {
            ln_1p_exp(q.ln() + ln_exp_m1(u))
        } else if u > -1.0 {
            (q * u.exp_m1()).ln_1p()
        } else {
            ln_add_exp((-q).ln_1p(), q.ln() + u)
        }
    }

    /// The privacy loss at `x`: increasing in `x` for `Remove`, decreasing for `Add`.
    fn loss(self, x: f64) -> f64 {
        let l = self.ln_mixture_ratio(self.u(x));
        match self.direction {
            Direction::Remove => l,
            Direction::Add => -l,
        }
    }

    /// The `x` where the loss equals `loss`; `-∞` beyond the loss's bound `±ln(1-q)`, which
    /// both directions approach as `x → -∞`.
    fn x_at_loss(self, loss: f64) -> f64 {
        let v = match self.direction {
            Direction::Remove => loss,
            Direction::Add => -loss,
        };
        let s2 = self.sigma * self.sigma;
        if self.q == 1.0 {
            return s2 * v + 0.5;
        }
        // ln(e^v - (1 - q)), then u = that - ln q.
        let ln_excess = if v < 0.5 {
            let excess = v.exp_m1() + self.q;
            if excess <= 0.0 {
                return f64::NEG_INFINITY;
            }
            excess.ln()
        } else {
            v + (-(1.0 - self.q) * (-v).exp()).ln_1p()
        };
        s2 * (ln_excess - self.q.ln()) + 0.5
    }

    /// Mixture weights of `N(0,σ²)` and `N(1,σ²)` in `P` and in `Q`.
    fn weights(self) -> ([f64; 2], [f64; 2]) {
        let mixture = [1.0 - self.q, self.q];
        match self.direction {
            Direction::Remove => (mixture, [1.0, 0.0]),
            Direction::Add => ([1.0, 0.0], mixture),
        }
    }
}

/// A sub-probability distribution on the grid `kΔ`, `k = offset, offset + 1, ...`, plus the
/// mass at `+∞`.
#[derive(Debug)]
struct Discrete {
    offset: i64,
    masses: Vec<f64>,
    infinity: f64,
}

/// Normal tail values at one boundary point, stored on the side that keeps precision.
#[derive(Clone, Copy)]
struct Tail {
    /// `P(Z > z)` when `z >= 0`, `P(Z < z)` otherwise.
    value: f64,
    upper: bool,
}

impl Tail {
    fn at(z: f64) -> Self {
        if z >= 0.0 {
            Self {
                value: normal_sf(z),
                upper: true,
            }
        } else {
            Self {
                value: normal_sf(-z),
                upper: false,
            }
        }
    }

    /// `P(a < Z <= b)` for tails at `a <= b`.
    fn mass(a: Self, b: Self) -> f64 {
        match (a.upper, b.upper) {
            (true, true) => a.value - b.value,
            (false, false) => b.value - a.value,
            (false, true) => 1.0 - a.value - b.value,
            (true, false) => 0.0,
        }
        .max(0.0)
    }
}

/// Number of grid points [`discretize`] would use, without computing them.
fn grid_len(pair: Pair, interval: f64) -> f64 {
    let (lo, hi) = loss_range(pair);
    ((hi - lo) / interval).ceil() + 2.0
}

/// The `x` range discretized and the losses at its low-loss and high-loss ends.
fn loss_range(pair: Pair) -> (f64, f64) {
    let (x_lo, x_hi) = x_range(pair);
    let (a, b) = (pair.loss(x_lo), pair.loss(x_hi));
    (a.min(b), a.max(b))
}

fn x_range(pair: Pair) -> (f64, f64) {
    (-TAIL_SIGMAS * pair.sigma, 1.0 + TAIL_SIGMAS * pair.sigma)
}

/// Connect-the-dots discretization of one step's loss distribution on the grid `kΔ`.
fn discretize(pair: Pair, interval: f64) -> Discrete {
    let (x_lo, x_hi) = x_range(pair);
    let (low_end, high_end) = match pair.direction {
        Direction::Remove => (x_lo, x_hi),
        Direction::Add => (x_hi, x_lo),
    };
    let (loss_lo, loss_hi) = (pair.loss(low_end), pair.loss(high_end));
    let k_lo = (loss_lo / interval).floor() as i64;
    let k_hi = (loss_hi / interval).ceil() as i64;
    let n = (k_hi - k_lo + 1) as usize;

    // Boundary points in x of the loss intervals, from the low-loss end to the high-loss end,
    // with the normal tails of both components there.
    let sigma = pair.sigma;
    let xs: Vec<f64> = (0..n)
        .map(|i| match i {
            0 => low_end,
            _ if i == n - 1 => high_end,
            _ => pair
                .x_at_loss((k_lo + i as i64) as f64 * interval)
                .clamp(x_lo, x_hi),
        })
        .collect();
    let tails: Vec<[Tail; 2]> = xs
        .iter()
        .map(|&x| [Tail::at(x / sigma), Tail::at((x - 1.0) / sigma)])
        .collect();

    let (p_weights, q_weights) = pair.weights();
    let decay = (-interval).exp();
    let spread = -(-interval).exp_m1();
    let mut masses = vec![0.0; n];
    for i in 0..n - 1 {
        // The x interval between boundaries i and i + 1, lower end first.
        let (a, b) = match pair.direction {
            Direction::Remove => (i, i + 1),
            Direction::Add => (i + 1, i),
        };
        let component = [
            Tail::mass(tails[a][0], tails[b][0]),
            Tail::mass(tails[a][1], tails[b][1]),
        ];
        let p = p_weights[0] * component[0] + p_weights[1] * component[1];
        let q = q_weights[0] * component[0] + q_weights[1] * component[1];
        if p <= 0.0 {
            continue;
        }

        // Split p between kΔ and (k+1)Δ so that the Q mass q = Σ p e^{-L} is preserved:
        // r = (q / p) e^{kΔ} lies in [e^{-Δ}, 1] up to rounding, and a rounding error of r
        // is clamped towards the upper point, the pessimistic side.
        let k = (k_lo + i as i64) as f64 * interval;
        let r = if q > 0.0 {
            ((q / p).ln() + k).exp().clamp(decay, 1.0)
        } else {
            decay
        };
        masses[i] += p * (r - decay) / spread;
        masses[i + 1] += p * (1.0 - r) / spread;
    }

    // Tails beyond the discretized range: P mass past the low-loss end is raised to the first
    // grid value above its largest loss; past the high-loss end it counts as infinite loss.
    let tail_mass = |x: f64, above: bool| {
        let side = |z: f64| if above { normal_sf(z) } else { normal_sf(-z) };
        p_weights[0] * side(x / sigma) + p_weights[1] * side((x - 1.0) / sigma)
    };
    let above_low_end = pair.direction == Direction::Add;
    let raised = ((loss_lo / interval).ceil() as i64 - k_lo) as usize;
    masses[raised.min(n - 1)] += tail_mass(low_end, above_low_end);
    let infinity = tail_mass(high_end, !above_low_end);

    Discrete {
        offset: k_lo,
        masses,
        infinity,
    }
}

/// A composed loss distribution, ready for hockey-stick queries.
#[derive(Debug)]
struct Composed {
    interval: f64,
    offset: i64,
    masses: Vec<f64>,
    infinity: f64,
}

/// Composes every step in one direction, coarsening the interval if the grid would not fit.
fn compose_direction(steps: &[Step], direction: Direction, interval: f64) -> Composed {
    let pairs: Vec<(Pair, u64)> = steps
        .iter()
        .map(|s| {
            let pair = Pair {
                q: s.q,
                sigma: s.sigma,
                direction,
            };
            (pair, s.count)
        })
        .collect();

    let mut interval = interval;
    loop {
        let widest = pairs
            .iter()
            .map(|&(p, _)| grid_len(p, interval))
            .fold(0.0, f64::max);
        if widest > MAX_GRID as f64 {
            interval *= coarsening(widest);
            continue;
        }
        let parts: Vec<(Discrete, u64)> = pairs
            .iter()
            .map(|&(p, count)| (discretize(p, interval), count))
            .collect();
        match convolve(&parts, interval) {
            Ok(composed) => return composed,
            Err(width) => interval *= coarsening(width),
        }
    }
}

/// The power of two by which an interval must grow for `points` grid points to fit.
fn coarsening(points: f64) -> f64 {
    (points / MAX_GRID as f64).log2().ceil().max(1.0).exp2()
}

/// `Π_j p_j^{*n_j}` by FFT over the window of [`window`], or `Err(width)` when that window
/// would exceed [`MAX_GRID`] points.
///
/// TODO: the inputs and outputs are real, so the add and remove directions could share one
/// complex transform (one in the real part, one in the imaginary part), halving the FFT time.
fn convolve(parts: &[(Discrete, u64)], interval: f64) -> Result<Composed, f64> {
    if let [(single, 1)] = parts {
        return Ok(Composed {
            interval,
            offset: single.offset,
            masses: single.masses.clone(),
            infinity: single.infinity,
        });
    }
    let (k_lo, len, outside) = window(parts, interval)?;
    let wrap = |k: i64| k.rem_euclid(len as i64) as usize;

    let fft = Fft::new(len);
    let mut spectrum = vec![Complex::new(1.0, 0.0); len];
    let mut buffer = vec![Complex::default(); len];
    for (d, n) in parts {
        buffer.fill(Complex::default());
        for (i, &m) in d.masses.iter().enumerate() {
            buffer[wrap(d.offset + i as i64)].re += m;
        }
        fft.forward(&mut buffer);
        let count = *n as f64;
        for (s, b) in spectrum.iter_mut().zip(&buffer) {
            // A frequency whose power falls below e^{-80} moves no output by more than that;
            // skipping it saves the transcendental functions of the power.
            if count * b.re.hypot(b.im).ln() < -80.0 {
                *s = Complex::default();
            } else if *s != Complex::default() {
                *s = *s * b.powu(*n);
            }
        }
    }
    fft.inverse(&mut spectrum);

    // Rounding leaves values of order 1e-17 where the mass is zero; negative ones are dropped.
    let masses = (0..len as i64)
        .map(|w| spectrum[wrap(k_lo + w)].re.max(0.0))
        .collect();
    let finite_ln: f64 = parts
        .iter()
        .map(|(d, n)| *n as f64 * (-d.infinity).ln_1p())
        .sum();
    Ok(Composed {
        interval,
        offset: k_lo,
        masses,
        infinity: -finite_ln.exp_m1() + outside,
    })
}

/// The composition window `[k_lo, k_lo + len)` in grid units (`len` a power of two) and the
/// bound on the mass above it, from Chernoff bounds on both tails: `P(S >= s) <=
/// exp(Σ_j n_j K_j(λ) - λ s)` with `K_j` the log moment generating function of part `j`.
/// `Err(width)` when the window would exceed [`MAX_GRID`] points.
fn window(parts: &[(Discrete, u64)], interval: f64) -> Result<(i64, usize, f64), f64> {
    let ln_tail = WINDOW_TAIL.ln();

    // Exact support of the composition, in grid units.
    let support_lo: f64 = parts.iter().map(|(d, n)| *n as f64 * d.offset as f64).sum();
    let support_hi: f64 = parts
        .iter()
        .map(|(d, n)| *n as f64 * (d.offset + d.masses.len() as i64 - 1) as f64)
        .sum();

    let ln_parts: Vec<Vec<f64>> = parts
        .iter()
        .map(|(d, _)| d.masses.iter().map(|m| m.ln()).collect())
        .collect();
    let cumulant = |lambda: f64| -> f64 {
        parts
            .iter()
            .zip(&ln_parts)
            .map(|((d, n), ln_m)| *n as f64 * ln_mgf(ln_m, d.offset, interval, lambda))
            .sum()
    };
    // Both bounds are quasi-convex in λ > 0 (a convex function over λ, positive at 0), so a
    // golden-section search over ln λ finds a near-optimal λ; any λ gives a valid bound.
    let hi = min_quasiconvex(|lambda| (cumulant(lambda) - ln_tail) / lambda);
    let lo = -min_quasiconvex(|lambda| (cumulant(-lambda) - ln_tail) / lambda);

    let upper_clamped = hi / interval >= support_hi;
    let k_hi = (hi / interval).ceil().min(support_hi);
    let k_lo = (lo / interval).floor().max(support_lo);
    let width = k_hi - k_lo + 1.0;
    if width > MAX_GRID as f64 {
        return Err(width);
    }
    let outside = if upper_clamped { 0.0 } else { WINDOW_TAIL };
    Ok((k_lo as i64, (width as usize).next_power_of_two(), outside))
}

/// The smallest value of `f` found by golden-section search over `λ` in `[2^-8, 2^8]`,
/// evaluated on a logarithmic scale down to a factor of about 1.2 in `λ`.
fn min_quasiconvex(mut f: impl FnMut(f64) -> f64) -> f64 {
    const RATIO: f64 = 0.618_033_988_749_895;
    let (mut a, mut b) = (-8.0f64, 8.0f64);
    let mut c = b - RATIO * (b - a);
    let mut d = a + RATIO * (b - a);
    let (mut fc, mut fd) = (f(c.exp2()), f(d.exp2()));
    let mut best = fc.min(fd);
    while b - a > 0.25 {
        if fc <= fd {
            b = d;
            d = c;
            fd = fc;
            c = b - RATIO * (b - a);
            fc = f(c.exp2());
            best = best.min(fc);
        } else {
            a = c;
            c = d;
            fc = fd;
            d = a + RATIO * (b - a);
            fd = f(d.exp2());
            best = best.min(fd);
        }
    }
    best
}

/// `ln Σ_i m_i e^{λ (offset + i) Δ}` from the logarithms of the masses.
fn ln_mgf(ln_masses: &[f64], offset: i64, interval: f64, lambda: f64) -> f64 {
    let step = lambda * interval;
    let base = lambda * offset as f64 * interval;
    let exponent = |i: usize, ln_m: f64| ln_m + step * i as f64;
    let max = ln_masses
        .iter()
        .enumerate()
        .map(|(i, &l)| exponent(i, l))
        .fold(f64::NEG_INFINITY, f64::max);
    if max == f64::NEG_INFINITY {
        return f64::NEG_INFINITY;
    }
    // Terms below e^{-50} of the largest cannot change the sum.
    let sum: f64 = ln_masses
        .iter()
        .enumerate()
        .map(|(i, &l)| exponent(i, l) - max)
        .filter(|&e| e > -50.0)
        .map(f64::exp)
        .sum();
    base + max + sum.ln()
}

impl Composed {
    /// `δ(ε) = P(L = ∞) + Σ_k p_k (1 - e^{ε - kΔ})₊`.
    fn delta(&self, epsilon: f64) -> f64 {
        let finite: f64 = self
            .masses
            .iter()
            .enumerate()
            .map(|(i, &p)| {
                let loss = (self.offset + i as i64) as f64 * self.interval;
                if loss > epsilon {
                    p * -(epsilon - loss).exp_m1()
                } else {
                    0.0
                }
            })
            .sum();
        self.infinity + finite
    }

    /// The smallest `ε >= 0` with `δ(ε) <= delta`. On `[(k-1)Δ, kΔ)` only losses `>= kΔ`
    /// count and `δ(ε) = P(∞) + A_k - e^{ε - kΔ} B_k` with `A_k = Σ_{j>=k} p_j` and
    /// `B_k = Σ_{j>=k} p_j e^{-(j-k)Δ}`, so scanning `k` downwards finds the segment where
    /// `δ` crosses `delta` and solves there in closed form.
    fn epsilon(&self, delta: f64) -> f64 {
        if self.infinity >= delta {
            return f64::INFINITY;
        }
        let decay = (-self.interval).exp();
        let top = self.offset + self.masses.len() as i64 - 1;
        let bottom = self.offset.max(1);
        let (mut above, mut weighted) = (0.0, 0.0);
        let solve = |k: i64, above: f64, weighted: f64| -> f64 {
            let eps = k as f64 * self.interval + ((self.infinity + above - delta) / weighted).ln();
            eps.max(0.0)
        };
        for k in (bottom..=top).rev() {
            let p = self.masses[(k - self.offset) as usize];
            above += p;
            weighted = p + decay * weighted;
            if self.infinity + above - decay * weighted > delta {
                return solve(k, above, weighted);
            }
        }
        if self.infinity + above > delta && weighted > 0.0 {
            // Every loss lies at or above `bottom`: δ(ε) keeps this form below it.
            return solve(bottom, above, weighted);
        }
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gaussian_delta(mu: f64, epsilon: f64) -> f64 {
        // The Gaussian mechanism with sensitivity/σ = mu (Balle and Wang 2018, Thm 8).
        let z = |t: f64| normal_sf(-t);
        z(mu / 2.0 - epsilon / mu) - epsilon.exp() * z(-mu / 2.0 - epsilon / mu)
    }

    #[test]
    fn discretization_keeps_both_masses() {
        for direction in [Direction::Remove, Direction::Add] {
            let pair = Pair {
                q: 0.02,
                sigma: 0.9,
                direction,
            };
            let d = discretize(pair, 1e-3);
            let total: f64 = d.masses.iter().sum::<f64>() + d.infinity;
            assert!((total - 1.0).abs() < 1e-12, "{direction:?}: {total}");
            let q_mass: f64 = d
                .masses
                .iter()
                .enumerate()
                .map(|(i, m)| m * (-((d.offset + i as i64) as f64 * 1e-3)).exp())
                .sum();
            assert!((q_mass - 1.0).abs() < 1e-9, "{direction:?}: {q_mass}");
        }
    }

    #[test]
    fn loss_and_its_inverse_agree() {
        for direction in [Direction::Remove, Direction::Add] {
            for q in [1e-4, 0.3, 1.0] {
                let pair = Pair {
                    q,
                    sigma: 1.3,
                    direction,
                };
                for x in [-5.0, -0.2, 0.4, 1.7, 9.0] {
                    let back = pair.x_at_loss(pair.loss(x));
                    assert!((back - x).abs() < 1e-8, "{direction:?} q {q} x {x}: {back}");
                }
            }
        }
    }

    /// Exact `δ(ε)` of one subsampled Gaussian step in one direction, from the point `x*`
    /// where the loss crosses `ε`.
    fn exact_single_step_delta(q: f64, sigma: f64, direction: Direction, eps: f64) -> f64 {
        let pair = Pair {
            q,
            sigma,
            direction,
        };
        let x = pair.x_at_loss(eps);
        // Mass of N(0,σ²) and N(1,σ²) on the side of x* where the loss exceeds ε.
        let (m0, m1) = match direction {
            Direction::Remove => (normal_sf(x / sigma), normal_sf((x - 1.0) / sigma)),
            Direction::Add => (normal_sf(-x / sigma), normal_sf((1.0 - x) / sigma)),
        };
        let mixture = (1.0 - q) * m0 + q * m1;
        match direction {
            Direction::Remove => mixture - eps.exp() * m0,
            Direction::Add => m0 - eps.exp() * mixture,
        }
    }

    #[test]
    fn one_step_is_never_below_the_exact_hockey_stick() {
        for (q, sigma) in [(0.01, 1.0), (0.2, 0.8), (0.003, 2.0)] {
            let mut acct = PldAccountant::new();
            acct.compose(q, sigma, 1).unwrap();
            for eps in [0.01, 0.1, 0.5, 1.5] {
                let exact = [Direction::Remove, Direction::Add]
                    .map(|d| exact_single_step_delta(q, sigma, d, eps))
                    .into_iter()
                    .fold(0.0, f64::max);
                let got = acct.delta(eps).unwrap();
                assert!(
                    got >= exact * (1.0 - 1e-9),
                    "q {q} eps {eps}: {got} < {exact}"
                );
                assert!(
                    got <= exact * 1.001 + 1e-15,
                    "q {q} eps {eps}: {got} vs {exact}"
                );
            }
        }
    }

    #[test]
    fn full_sampling_matches_the_analytic_gaussian() {
        // n steps of q = 1 are one Gaussian mechanism with sigma / sqrt(n).
        for (sigma, n) in [(1.0, 1), (2.0, 30), (0.8, 5)] {
            let mut acct = PldAccountant::with_interval(1e-3).unwrap();
            acct.compose(1.0, sigma, n).unwrap();
            let mu = (n as f64).sqrt() / sigma;
            for eps in [0.0, 0.5, 2.0] {
                let exact = gaussian_delta(mu, eps);
                let got = acct.delta(eps).unwrap();
                assert!(got >= exact * (1.0 - 1e-9), "sigma {sigma} n {n} eps {eps}");
                assert!(got <= exact * 1.001 + 1e-15, "{got} vs {exact}");
            }
        }
    }
}
