//! The local training a coordinator asks of the nodes in a round.
//!
//! The coordinator states the plan in terms that do not depend on any node's data (epochs,
//! expected batch size); each node turns it into its own sampling rate and step count from
//! its local row count. Values are validated here once, so the coordinator's config loader
//! and the node's wire decoding share the same rules.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Local training hyperparameters sent with every task.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoundPlan {
    /// SGD learning rate.
    pub learning_rate: f32,
    /// Local passes over the node's training rows (fractional allowed).
    pub local_epochs: f64,
    /// Expected batch size: each example is sampled with rate `expected_batch_size / rows`.
    pub expected_batch_size: u32,
    /// DP-SGD parameters; `None` asks for non-private training.
    pub dp: Option<DpSgdRequest>,
}

/// The DP-SGD parameters of a plan.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpSgdRequest {
    /// Per-example L2 clipping bound C.
    pub clip_norm: f64,
    /// Noise multiplier sigma: the noise standard deviation is `sigma * C`.
    pub noise_multiplier: f64,
}

/// A plan value that cannot be used.
#[derive(Debug, Error, PartialEq)]
#[non_exhaustive]
pub enum PlanError {
    /// The learning rate is not a positive finite number.
    #[error("learning_rate must be positive and finite, got {0}")]
    LearningRate(f32),
    /// The epoch count is not a positive finite number.
    #[error("local_epochs must be positive and finite, got {0}")]
    LocalEpochs(f64),
    /// The batch size is zero.
    #[error("expected_batch_size must be at least 1")]
    BatchSize,
    /// The clipping bound is not a positive finite number.
    #[error("clip_norm must be positive and finite, got {0}")]
    ClipNorm(f64),
    /// The noise multiplier is not a positive finite number.
    #[error("noise_multiplier must be positive and finite, got {0}")]
    NoiseMultiplier(f64),
}

impl RoundPlan {
    /// Checks every field.
    ///
    /// # Errors
    /// The first field that is out of range.
    pub fn validate(&self) -> Result<(), PlanError> {
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return Err(PlanError::LearningRate(self.learning_rate));
        }
        if !(self.local_epochs.is_finite() && self.local_epochs > 0.0) {
            return Err(PlanError::LocalEpochs(self.local_epochs));
        }
        if self.expected_batch_size == 0 {
            return Err(PlanError::BatchSize);
        }
        if let Some(dp) = &self.dp {
            if !(dp.clip_norm.is_finite() && dp.clip_norm > 0.0) {
                return Err(PlanError::ClipNorm(dp.clip_norm));
            }
            if !(dp.noise_multiplier.is_finite() && dp.noise_multiplier > 0.0) {
                return Err(PlanError::NoiseMultiplier(dp.noise_multiplier));
            }
        }
        Ok(())
    }

    /// The Poisson sampling rate for a node holding `rows` training examples, capped at 1.
    ///
    /// This is the rate the node's accountant is charged with, so it is computed from the
    /// real row count, never from a batch count.
    pub fn sampling_rate(&self, rows: usize) -> f64 {
        if rows == 0 {
            return 1.0;
        }
        (f64::from(self.expected_batch_size) / rows as f64).min(1.0)
    }

    /// Number of DP-SGD steps for `local_epochs` passes at sampling rate `q`: `ceil(epochs / q)`.
    pub fn steps(&self, rows: usize) -> u64 {
        let q = self.sampling_rate(rows);
        (self.local_epochs / q).ceil().max(1.0) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> RoundPlan {
        RoundPlan {
            learning_rate: 0.1,
            local_epochs: 1.0,
            expected_batch_size: 64,
            dp: Some(DpSgdRequest {
                clip_norm: 1.0,
                noise_multiplier: 1.0,
            }),
        }
    }

    #[test]
    fn sampling_rate_is_batch_over_rows_capped_at_one() {
        assert_eq!(plan().sampling_rate(640), 0.1);
        assert_eq!(plan().sampling_rate(10), 1.0);
        assert_eq!(plan().steps(640), 10);
    }

    #[test]
    fn rejects_non_positive_noise_and_nan_learning_rate() {
        let mut p = plan();
        p.dp.as_mut().unwrap().noise_multiplier = 0.0;
        assert_eq!(p.validate(), Err(PlanError::NoiseMultiplier(0.0)));
        let mut p = plan();
        p.learning_rate = f32::NAN;
        assert!(matches!(p.validate(), Err(PlanError::LearningRate(_))));
    }
}
