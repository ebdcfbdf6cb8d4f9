//! Empirical lower bounds on epsilon from one training run.
//!
//! An accountant gives an upper bound on the privacy loss, proven on paper. An audit gives a
//! lower bound, measured: if an attacker can tell which of many inserted "canary" records
//! were used for training better than some epsilon allows, the mechanism is not that private,
//! whatever the proof says. A bug in clipping, noise or accounting shows up as a lower bound
//! above the accountant's epsilon.
//!
//! This follows the one-run audit of Steinke, Nasr and Jagielski (2023), "Privacy Auditing
//! with One (1) Training Run": each of `m` canaries is included independently with
//! probability 1/2; after training, the auditor guesses "in" for the `k` highest-scoring
//! canaries and "out" for the `k` lowest, and abstains on the rest. Under epsilon-DP the
//! number of correct guesses among the `r = 2k` made is stochastically dominated by
//! `Binomial(r, e^eps / (1 + e^eps))` (their Theorem 3.1), so a count that would be too
//! unlikely under that binomial rules out the epsilon at the chosen confidence.
//!
//! The bound computed here is the pure-epsilon one: it ignores delta. For an
//! `(epsilon, delta)` mechanism that makes it, if anything, larger than the paper's
//! delta-aware bound, so "lower bound below the accountant's epsilon" remains a check the
//! implementation can fail.

use thiserror::Error;

/// An audit that cannot be evaluated.
#[derive(Debug, Clone, PartialEq, Error)]
#[non_exhaustive]
pub enum AuditError {
    /// More correct guesses than guesses.
    #[error("{correct} correct guesses out of {guesses}")]
    Counts {
        /// Correct guesses.
        correct: u64,
        /// Guesses made.
        guesses: u64,
    },
    /// A confidence level outside `(0, 1)`.
    #[error("confidence must be in (0, 1), got {0}")]
    Confidence(f64),
}

/// The largest epsilon that `correct` right guesses out of `guesses` rule out with the given
/// confidence (e.g. 0.95): every epsilon below the returned value would make so many correct
/// guesses happen with probability below `1 - confidence`. Zero when nothing is ruled out.
///
/// # Errors
/// [`AuditError`] for inconsistent counts or a confidence outside `(0, 1)`.
///
/// ```
/// use athanor_core::audit::epsilon_lower_bound;
///
/// // Guessing 100 of 100 right rules out every epsilon below about 3.49 at 95%.
/// let lb = epsilon_lower_bound(100, 100, 0.95)?;
/// assert!((lb - 3.49).abs() < 0.01);
/// // Coin flipping rules out nothing.
/// assert_eq!(epsilon_lower_bound(50, 100, 0.95)?, 0.0);
/// # Ok::<(), athanor_core::audit::AuditError>(())
/// ```
pub fn epsilon_lower_bound(correct: u64, guesses: u64, confidence: f64) -> Result<f64, AuditError> {
    if correct > guesses {
        return Err(AuditError::Counts { correct, guesses });
    }
    if !(confidence > 0.0 && confidence < 1.0) {
        return Err(AuditError::Confidence(confidence));
    }
    let alpha = 1.0 - confidence;
    let rejected = |eps: f64| binomial_upper_tail(guesses, correct, success_rate(eps)) < alpha;

    if guesses == 0 || !rejected(0.0) {
        return Ok(0.0);
    }
    // The tail grows with epsilon; find where it reaches alpha by bisection.
    let (mut low, mut high) = (0.0_f64, 1.0_f64);
    while rejected(high) {
        low = high;
        high *= 2.0;
        if high > 64.0 {
            return Ok(high);
        }
    }
    for _ in 0..60 {
        let mid = 0.5 * (low + high);
        if rejected(mid) {
            low = mid;
        } else {
            high = mid;
        }
    }
    Ok(low)
}

/// `e^eps / (1 + e^eps)`: the best guessing accuracy epsilon-DP allows.
fn success_rate(eps: f64) -> f64 {
    1.0 / (1.0 + (-eps).exp())
}

/// `P[Binomial(n, p) >= k]`, summed in log space so that tiny tails stay accurate.
pub fn binomial_upper_tail(n: u64, k: u64, p: f64) -> f64 {
    if k == 0 {
        return 1.0;
    }
    if k > n || p <= 0.0 {
        return 0.0;
    }
    if p >= 1.0 {
        return 1.0;
    }
    let (ln_p, ln_q) = (p.ln(), (1.0 - p).ln());
    let terms: Vec<f64> = (k..=n)
        .map(|i| ln_choose(n, i) + i as f64 * ln_p + (n - i) as f64 * ln_q)
        .collect();
    let max = terms.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = terms.iter().map(|t| (t - max).exp()).sum();
    (max + sum.ln()).exp().min(1.0)
}

/// `ln(n choose k)`, exact enough for the sizes audits use (sums of logarithms).
fn ln_choose(n: u64, k: u64) -> f64 {
    let k = k.min(n - k);
    (0..k)
        .map(|i| ((n - i) as f64).ln() - ((i + 1) as f64).ln())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binomial_tail_matches_small_exact_cases() {
        // P[Bin(4, 1/2) >= 3] = 5/16.
        assert!((binomial_upper_tail(4, 3, 0.5) - 5.0 / 16.0).abs() < 1e-12);
        // P[Bin(10, 0.3) >= 10] = 0.3^10.
        assert!((binomial_upper_tail(10, 10, 0.3) - 0.3_f64.powi(10)).abs() < 1e-18);
        assert_eq!(binomial_upper_tail(10, 0, 0.3), 1.0);
        assert_eq!(binomial_upper_tail(10, 11, 0.3), 0.0);
    }

    #[test]
    fn a_perfect_score_gives_the_closed_form_bound() {
        // All r right: p^r = alpha, so eps = logit(alpha^(1/r)).
        let r = 200;
        let p = 0.05_f64.powf(1.0 / r as f64);
        let expected = (p / (1.0 - p)).ln();
        let lb = epsilon_lower_bound(r, r, 0.95).unwrap();
        assert!((lb - expected).abs() < 1e-6, "{lb} vs {expected}");
    }

    #[test]
    fn more_correct_guesses_never_lower_the_bound() {
        let mut last = 0.0;
        for correct in 50..=100 {
            let lb = epsilon_lower_bound(correct, 100, 0.95).unwrap();
            assert!(lb >= last);
            last = lb;
        }
        assert!(last > 3.0);
    }

    #[test]
    fn bad_inputs_are_errors() {
        assert!(epsilon_lower_bound(5, 4, 0.95).is_err());
        assert!(epsilon_lower_bound(1, 4, 1.0).is_err());
        assert!(epsilon_lower_bound(1, 4, f64::NAN).is_err());
        assert_eq!(epsilon_lower_bound(0, 0, 0.95).unwrap(), 0.0);
    }
}
