//! The parameters of a secure-aggregation round, agreed by the coordinator and every node.
//!
//! The coordinator sends a [`SecAggConfig`] with the round's task; both sides validate it
//! before doing anything else, so a bad value is refused when the round is set up rather than
//! halfway through. The ring's capacity against the quantized values is checked separately,
//! by [`super::quantize::Quantizer::new`], which knows the value range.

use serde::{Deserialize, Serialize};

use super::SecAggError;
use super::messages::{NodeId, RoundId};
use super::ring::Ring;

/// Longest vector a round accepts: 2^30 elements (4 GiB per masked vector).
pub const MAX_VECTOR_LEN: usize = 1 << 30;

/// The parameters of one round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecAggConfig {
    /// The round. Must be fresh: it salts every derived key.
    pub round: RoundId,
    /// Nodes invited, in increasing order.
    pub cohort: Vec<NodeId>,
    /// Elements per masked vector.
    pub vector_len: usize,
    /// `b`: masked vectors live in `Z_{2^b}`, `1 <= b <= 32`.
    pub ring_bits: u32,
    /// Up to this many advertising nodes, every node is every other's neighbour (SecAgg);
    /// beyond it, each node has [`SecAggConfig::degree`] neighbours (SecAgg+).
    pub complete_graph_max: usize,
    /// `k`: neighbours per node in the sparse graph. Even, at least 2.
    pub degree: usize,
    /// The threshold as a percentage of a neighbourhood (the node and its neighbours):
    /// `t = max(2, ceil(percent (neighbours + 1) / 100))`. From 51 to 100. An integer, so every
    /// node computes the same `t` without floating-point surprises.
    pub threshold_percent: u32,
    /// `n_min`: fewer survivors than this and the round is abandoned. At least 2, so the
    /// coordinator never learns a lone node's input; the distributed noise is sized for it.
    pub min_survivors: usize,
}

impl SecAggConfig {
    /// Checks every parameter.
    ///
    /// # Errors
    /// [`SecAggError::InvalidConfig`] naming the first parameter out of range.
    pub fn validate(&self) -> Result<(), SecAggError> {
        let invalid = |name, expected, got: String| {
            Err(SecAggError::InvalidConfig {
                name,
                expected,
                got,
            })
        };
        if self.cohort.len() < 2 || !self.cohort.windows(2).all(|w| w[0] < w[1]) {
            return invalid(
                "cohort",
                "at least 2 distinct nodes in increasing order",
                format!("{} nodes", self.cohort.len()),
            );
        }
        if !(1..=MAX_VECTOR_LEN).contains(&self.vector_len) {
            return invalid("vector_len", "1 to 2^30", self.vector_len.to_string());
        }
        Ring::new(self.ring_bits)?;
        if self.degree < 2 || !self.degree.is_multiple_of(2) {
            return invalid(
                "degree",
                "an even number, at least 2",
                self.degree.to_string(),
            );
        }
        if !(51..=100).contains(&self.threshold_percent) {
            return invalid(
                "threshold_percent",
                "51 to 100",
                self.threshold_percent.to_string(),
            );
        }
        if !(2..=self.cohort.len()).contains(&self.min_survivors) {
            return invalid(
                "min_survivors",
                "at least 2 and at most the cohort size",
                self.min_survivors.to_string(),
            );
        }
        Ok(())
    }

    /// The ring of masked vectors.
    ///
    /// # Errors
    /// [`SecAggError::InvalidConfig`] if `ring_bits` is out of range.
    pub fn ring(&self) -> Result<Ring, SecAggError> {
        Ring::new(self.ring_bits)
    }

    /// `t` for a node with `neighbours` neighbours: its secrets are shared among
    /// `neighbours + 1` holders (itself included) and any `t` of them reconstruct.
    ///
    /// With `t` above half the holders, the holders answering "alive" for a node and those
    /// answering "dropped" (each answers once) cannot both reach `t`, so even a coordinator
    /// that sends inconsistent unmask requests cannot obtain both secrets of one node.
    pub fn threshold(&self, neighbours: usize) -> usize {
        let holders = neighbours + 1;
        let t = (holders * self.threshold_percent as usize).div_ceil(100);
        t.clamp(2, holders.max(2))
    }

    /// Whether `node` was invited.
    pub fn contains(&self, node: NodeId) -> bool {
        self.cohort.binary_search(&node).is_ok()
    }
}
