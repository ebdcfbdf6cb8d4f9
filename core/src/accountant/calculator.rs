//! The privacy calculator behind `athanor-node privacy` and `athanor-sim privacy`.
//!
//! Two questions an operator or a researcher asks before a run: what epsilon a number of
//! DP-SGD steps at `(q, sigma)` costs, and what noise multiplier keeps a number of steps within
//! a target epsilon. Both binaries parse their flags into an [`EpsilonQuery`] or a
//! [`SigmaQuery`] and print its answer, as text ([`std::fmt::Display`]) or as one JSON object
//! (serde), so they cannot disagree. Every input is checked here, before any accounting, so a
//! bad flag is a clear error rather than a NaN in the output.

use std::fmt;

use serde::Serialize;
use thiserror::Error;

use super::{Accountant, AccountantError, Step, check_delta, check_q, check_sigma, check_target};

/// How much `steps` DP-SGD steps at sampling rate `q` and noise multiplier `sigma` cost.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EpsilonQuery {
    /// Poisson sampling rate, in `(0, 1]`.
    pub q: f64,
    /// Noise multiplier, positive and finite.
    pub sigma: f64,
    /// Number of steps, at least 1.
    pub steps: u64,
    /// The delta epsilon is reported at, in `(0, 1)`.
    pub delta: f64,
    /// Which accountant composes the steps.
    pub accountant: Accountant,
}

/// The noise multiplier that keeps `steps` steps at sampling rate `q` within `epsilon`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SigmaQuery {
    /// Poisson sampling rate, in `(0, 1]`.
    pub q: f64,
    /// Number of steps, at least 1.
    pub steps: u64,
    /// The delta of the target, in `(0, 1)`.
    pub delta: f64,
    /// The target epsilon, positive and finite.
    pub epsilon: f64,
    /// Which accountant the noise is calibrated with.
    pub accountant: Accountant,
}

/// The answer to an [`EpsilonQuery`], with the query it answers.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct EpsilonAnswer {
    /// The accountant used.
    pub accountant: Accountant,
    /// Sampling rate asked about.
    pub q: f64,
    /// Noise multiplier asked about.
    pub sigma: f64,
    /// Number of steps asked about.
    pub steps: u64,
    /// The delta of the guarantee.
    pub delta: f64,
    /// The epsilon of all steps together; `null` in JSON when no finite epsilon holds.
    #[serde(serialize_with = "finite_or_null")]
    pub epsilon: f64,
    /// The Rényi order that gave the bound (RDP only).
    pub order: Option<f64>,
}

/// The answer to a [`SigmaQuery`], with the query it answers.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SigmaAnswer {
    /// The accountant used.
    pub accountant: Accountant,
    /// Sampling rate asked about.
    pub q: f64,
    /// Number of steps asked about.
    pub steps: u64,
    /// The delta of the guarantee.
    pub delta: f64,
    /// The epsilon asked for.
    pub target_epsilon: f64,
    /// The smallest noise multiplier found that meets the target.
    pub sigma: f64,
    /// The epsilon `sigma` actually gives, at most the target.
    pub epsilon: f64,
    /// The Rényi order that gave that epsilon (RDP only).
    pub order: Option<f64>,
}

/// A calculator question that cannot be answered.
#[derive(Debug, Clone, PartialEq, Error)]
#[non_exhaustive]
pub enum CalculatorError {
    /// No step at all: nothing is released, so there is nothing to account or calibrate.
    #[error("steps must be at least 1")]
    ZeroSteps,
    /// An input outside its domain, or a target no noise multiplier reaches.
    #[error(transparent)]
    Accountant(#[from] AccountantError),
}

impl EpsilonQuery {
    /// The `(epsilon, delta)` guarantee of the steps.
    ///
    /// # Errors
    /// [`CalculatorError::ZeroSteps`], or [`CalculatorError::Accountant`] for `q`, `sigma` or
    /// `delta` outside their domains.
    ///
    /// ```
    /// use athanor_core::accountant::Accountant;
    /// use athanor_core::accountant::calculator::EpsilonQuery;
    ///
    /// let query = EpsilonQuery {
    ///     q: 0.01,
    ///     sigma: 2.0,
    ///     steps: 10_000,
    ///     delta: 1e-5,
    ///     accountant: Accountant::Rdp,
    /// };
    /// let answer = query.answer()?;
    /// assert!((answer.epsilon - 2.3529).abs() < 1e-3);
    /// assert_eq!(answer.order, Some(8.9));
    /// # Ok::<(), athanor_core::accountant::calculator::CalculatorError>(())
    /// ```
    pub fn answer(&self) -> Result<EpsilonAnswer, CalculatorError> {
        check_q(self.q)?;
        check_sigma(self.sigma)?;
        check_delta(self.delta)?;
        if self.steps == 0 {
            return Err(CalculatorError::ZeroSteps);
        }

        let step = Step {
            q: self.q,
            sigma: self.sigma,
            count: self.steps,
        };
        let report = self.accountant.epsilon(&[step], self.delta)?;
        Ok(EpsilonAnswer {
            accountant: self.accountant,
            q: self.q,
            sigma: self.sigma,
            steps: self.steps,
            delta: self.delta,
            epsilon: report.epsilon,
            order: report.order,
        })
    }
}

impl SigmaQuery {
    /// The smallest noise multiplier that meets the target, and the epsilon it gives.
    ///
    /// # Errors
    /// [`CalculatorError::ZeroSteps`], or [`CalculatorError::Accountant`] for inputs outside
    /// their domains or a target that no noise multiplier up to `2^20` reaches.
    ///
    /// ```
    /// use athanor_core::accountant::Accountant;
    /// use athanor_core::accountant::calculator::SigmaQuery;
    ///
    /// let query = SigmaQuery {
    ///     q: 256.0 / 60_000.0,
    ///     steps: 14_063,
    ///     delta: 1e-5,
    ///     epsilon: 3.0,
    ///     accountant: Accountant::Rdp,
    /// };
    /// let answer = query.answer()?;
    /// assert!((answer.sigma - 1.01402).abs() < 1e-4);
    /// assert!(answer.epsilon <= 3.0);
    /// # Ok::<(), athanor_core::accountant::calculator::CalculatorError>(())
    /// ```
    pub fn answer(&self) -> Result<SigmaAnswer, CalculatorError> {
        check_q(self.q)?;
        check_delta(self.delta)?;
        check_target(self.epsilon)?;
        if self.steps == 0 {
            return Err(CalculatorError::ZeroSteps);
        }

        let sigma =
            self.accountant
                .calibrate_sigma(self.q, self.steps, self.epsilon, self.delta)?;

        // Account the answer again to report the epsilon it reaches and, for RDP, its order.
        let step = Step {
            q: self.q,
            sigma,
            count: self.steps,
        };
        let report = self.accountant.epsilon(&[step], self.delta)?;
        Ok(SigmaAnswer {
            accountant: self.accountant,
            q: self.q,
            steps: self.steps,
            delta: self.delta,
            target_epsilon: self.epsilon,
            sigma,
            epsilon: report.epsilon,
            order: report.order,
        })
    }
}

impl fmt::Display for EpsilonAnswer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "epsilon     {:.6}", self.epsilon)?;
        writeln!(f, "delta       {:e}", self.delta)?;
        writeln!(
            f,
            "accountant  {}",
            accountant_line(self.accountant, self.order)
        )?;
        write!(
            f,
            "mechanism   {} steps at q = {}, sigma = {}",
            self.steps, self.q, self.sigma
        )
    }
}

impl fmt::Display for SigmaAnswer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "sigma       {:.6}", self.sigma)?;
        writeln!(
            f,
            "epsilon     {:.6} (target {})",
            self.epsilon, self.target_epsilon
        )?;
        writeln!(f, "delta       {:e}", self.delta)?;
        writeln!(
            f,
            "accountant  {}",
            accountant_line(self.accountant, self.order)
        )?;
        write!(f, "mechanism   {} steps at q = {}", self.steps, self.q)
    }
}

fn accountant_line(accountant: Accountant, order: Option<f64>) -> String {
    match (accountant, order) {
        (Accountant::Rdp, Some(order)) => format!("rdp (best order {order})"),
        (Accountant::Rdp, None) => "rdp".into(),
        (Accountant::Pld, _) => "pld".into(),
    }
}

/// JSON has no infinity: an unbounded epsilon is written as `null`.
fn finite_or_null<S: serde::Serializer>(value: &f64, serializer: S) -> Result<S::Ok, S::Error> {
    if value.is_finite() {
        serializer.serialize_f64(*value)
    } else {
        serializer.serialize_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query() -> EpsilonQuery {
        EpsilonQuery {
            q: 0.01,
            sigma: 2.0,
            steps: 100,
            delta: 1e-5,
            accountant: Accountant::Rdp,
        }
    }

    #[test]
    fn rejects_each_input_outside_its_domain() {
        let bad = [
            EpsilonQuery { q: 0.0, ..query() },
            EpsilonQuery { q: 1.5, ..query() },
            EpsilonQuery {
                sigma: f64::NAN,
                ..query()
            },
            EpsilonQuery {
                sigma: -1.0,
                ..query()
            },
            EpsilonQuery {
                delta: 1.0,
                ..query()
            },
            EpsilonQuery {
                steps: 0,
                ..query()
            },
        ];
        for q in bad {
            assert!(q.answer().is_err(), "{q:?} was answered");
        }
    }

    #[test]
    fn sigma_answer_meets_its_target_and_inverts_the_epsilon_query() {
        let target = query().answer().unwrap();
        let sigma = SigmaQuery {
            q: 0.01,
            steps: 100,
            delta: 1e-5,
            epsilon: target.epsilon,
            accountant: Accountant::Rdp,
        }
        .answer()
        .unwrap();
        assert!(sigma.epsilon <= target.epsilon);
        assert!((sigma.sigma - 2.0).abs() < 1e-6, "{}", sigma.sigma);
    }
}
