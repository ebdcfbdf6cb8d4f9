//! Server-side aggregation strategies.
//!
//! FedAvg (McMahan et al. 2017): the new global model is the old one plus the average of the
//! nodes' updates weighted by their example counts. FedAvgM (Hsu, Qi, Brown 2019) treats that
//! average as a pseudo-gradient and applies it with server momentum:
//! `v <- beta * v + mean_delta`, `w <- w + server_lr * v`; with `beta = 0` and
//! `server_lr = 1` it is FedAvg. Both only post-process the aggregate, so they cost no privacy.
//! Sums run in f64 and in a fixed order (the caller sorts contributions), so the same inputs
//! always give bit-identical output.

use thiserror::Error;

/// One node's accepted update.
#[derive(Debug, Clone)]
pub struct Contribution {
    /// Aggregation weight (the node's training example count).
    pub weight: u64,
    /// Local parameters minus global parameters.
    pub delta: Vec<f32>,
}

/// Why a round's contributions produce no model.
#[derive(Debug, Error, PartialEq)]
#[non_exhaustive]
pub enum AggregateError {
    /// No update arrived.
    #[error("no updates to aggregate")]
    Empty,
    /// Every contribution has weight zero, so the weighted mean is undefined.
    #[error("all {count} updates have zero weight")]
    ZeroWeight {
        /// Number of zero-weight updates.
        count: usize,
    },
    /// An update's length differs from the model's.
    #[error("update has {got} values, model has {expected}")]
    Length {
        /// Model parameter count.
        expected: usize,
        /// Update length.
        got: usize,
    },
    /// The result is not finite (it cannot be with finite inputs unless values overflow).
    #[error("aggregate is not finite")]
    NonFinite,
}

/// Applies FedAvg to `global`: `global + sum_i w_i * delta_i / sum_i w_i`.
///
/// # Errors
/// See [`AggregateError`]; `global` is untouched on error.
pub fn fedavg(global: &[f32], contributions: &[Contribution]) -> Result<Vec<f32>, AggregateError> {
    let mean = weighted_mean(global.len(), contributions)?;
    ServerOptimizer::new(1.0, 0.0).apply(global, &mean)
}

/// The server's optimizer state: learning rate, momentum and the velocity carried between
/// rounds. The velocity is stored with each published version (see
/// [`crate::store::ModelStore::publish_with_optimizer`]) so that a restarted coordinator
/// continues where it stopped.
#[derive(Debug, Clone)]
pub struct ServerOptimizer {
    learning_rate: f64,
    momentum: f64,
    velocity: Vec<f64>,
}

impl ServerOptimizer {
    /// An optimizer with no velocity yet.
    pub fn new(learning_rate: f64, momentum: f64) -> Self {
        ServerOptimizer {
            learning_rate,
            momentum,
            velocity: Vec::new(),
        }
    }

    /// An optimizer that continues with `velocity`, the velocity stored with the version it
    /// resumes from. A velocity that does not fit the model is dropped at the next
    /// [`ServerOptimizer::apply`], which then starts afresh.
    pub fn resume(learning_rate: f64, momentum: f64, velocity: Vec<f64>) -> Self {
        ServerOptimizer {
            learning_rate,
            momentum,
            velocity,
        }
    }

    /// The velocity to carry into the next round: empty without momentum or before the first
    /// round.
    pub fn velocity(&self) -> &[f64] {
        &self.velocity
    }

    /// The next global model from the current one and the round's mean update. The velocity
    /// is only updated when the result is usable.
    ///
    /// # Errors
    /// [`AggregateError::Length`] or [`AggregateError::NonFinite`]; the state is unchanged.
    pub fn apply(&mut self, global: &[f32], mean: &[f64]) -> Result<Vec<f32>, AggregateError> {
        if mean.len() != global.len() {
            return Err(AggregateError::Length {
                expected: global.len(),
                got: mean.len(),
            });
        }
        let velocity: Vec<f64> = if self.velocity.len() == mean.len() {
            self.velocity
                .iter()
                .zip(mean)
                .map(|(v, m)| self.momentum * v + m)
                .collect()
        } else {
            mean.to_vec()
        };
        let next: Vec<f32> = global
            .iter()
            .zip(&velocity)
            .map(|(&g, &v)| (f64::from(g) + self.learning_rate * v) as f32)
            .collect();
        if next.iter().any(|v| !v.is_finite()) {
            return Err(AggregateError::NonFinite);
        }
        if self.momentum != 0.0 {
            self.velocity = velocity;
        }
        Ok(next)
    }
}

/// The example-weighted mean of the contributions' deltas, in f64.
///
/// # Errors
/// [`AggregateError::Empty`], [`AggregateError::ZeroWeight`], [`AggregateError::Length`].
pub fn weighted_mean(
    len: usize,
    contributions: &[Contribution],
) -> Result<Vec<f64>, AggregateError> {
    if contributions.is_empty() {
        return Err(AggregateError::Empty);
    }
    // Weights are self-reported by nodes; summed in u128, no number of u64 weights that fits
    // in memory can overflow.
    let total: u128 = contributions.iter().map(|c| u128::from(c.weight)).sum();
    if total == 0 {
        return Err(AggregateError::ZeroWeight {
            count: contributions.len(),
        });
    }

    let mut sum = vec![0.0f64; len];
    for contribution in contributions {
        if contribution.delta.len() != len {
            return Err(AggregateError::Length {
                expected: len,
                got: contribution.delta.len(),
            });
        }
        let weight = contribution.weight as f64;
        for (acc, &d) in sum.iter_mut().zip(&contribution.delta) {
            *acc += weight * f64::from(d);
        }
    }

    let total = total as f64;
    sum.iter_mut().for_each(|s| *s /= total);
    Ok(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contribution(weight: u64, delta: &[f32]) -> Contribution {
        Contribution {
            weight,
            delta: delta.to_vec(),
        }
    }

    #[test]
    fn weights_one_two_three_give_the_exact_weighted_mean() {
        let global = [1.0, -1.0];
        let updates = [
            contribution(1, &[6.0, 0.0]),
            contribution(2, &[0.0, 3.0]),
            contribution(3, &[2.0, -1.0]),
        ];
        // (1*6 + 2*0 + 3*2) / 6 = 2 and (0 + 6 - 3) / 6 = 0.5.
        assert_eq!(fedavg(&global, &updates).unwrap(), vec![3.0, -0.5]);
    }

    #[test]
    fn identical_inputs_give_bit_identical_output() {
        let global: Vec<f32> = (0..1000).map(|i| (i as f32).sin()).collect();
        let updates: Vec<Contribution> = (1..=7)
            .map(|k| Contribution {
                weight: k * 13,
                delta: (0..1000).map(|i| ((i * k) as f32).cos() * 1e-3).collect(),
            })
            .collect();
        let a = fedavg(&global, &updates).unwrap();
        let b = fedavg(&global, &updates).unwrap();
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
    }

    #[test]
    fn momentum_accumulates_repeated_updates() {
        let mut optimizer = ServerOptimizer::new(1.0, 0.5);
        let once = optimizer.apply(&[0.0], &[1.0]).unwrap();
        let twice = optimizer.apply(&once, &[1.0]).unwrap();
        // v1 = 1, w1 = 1; v2 = 0.5 * 1 + 1 = 1.5, w2 = 2.5.
        assert_eq!((once[0], twice[0]), (1.0, 2.5));
    }

    #[test]
    fn a_resumed_optimizer_continues_exactly_where_the_first_stopped() {
        let mut straight = ServerOptimizer::new(0.7, 0.9);
        let w1 = straight.apply(&[0.0, 1.0], &[0.25, -0.5]).unwrap();
        let mut resumed = ServerOptimizer::resume(0.7, 0.9, straight.velocity().to_vec());
        let w2 = straight.apply(&w1, &[0.125, 0.75]).unwrap();
        assert_eq!(resumed.apply(&w1, &[0.125, 0.75]).unwrap(), w2);
        assert_eq!(resumed.velocity(), straight.velocity());
        // Starting afresh instead forgets the first round's velocity.
        assert_ne!(
            ServerOptimizer::new(0.7, 0.9)
                .apply(&w1, &[0.125, 0.75])
                .unwrap(),
            w2
        );
    }

    #[test]
    fn all_zero_weights_are_refused_rather_than_dividing_by_zero() {
        let updates = [contribution(0, &[1.0]), contribution(0, &[2.0])];
        assert_eq!(
            fedavg(&[0.0], &updates),
            Err(AggregateError::ZeroWeight { count: 2 })
        );
    }

    #[test]
    fn the_largest_weights_do_not_overflow() {
        let updates = [
            contribution(u64::MAX, &[1.0]),
            contribution(u64::MAX, &[3.0]),
        ];
        assert_eq!(weighted_mean(1, &updates).unwrap(), vec![2.0]);
    }

    #[test]
    fn an_update_of_the_wrong_length_is_refused() {
        let updates = [contribution(1, &[1.0, 2.0])];
        assert!(matches!(
            fedavg(&[0.0], &updates),
            Err(AggregateError::Length { .. })
        ));
    }
}
