//! Splitting one dataset across virtual nodes.
//!
//! - IID: shuffle the rows and deal them out in near-equal shares.
//! - Dirichlet label skew (Hsu, Qi, Brown 2019): for each class, draw node shares
//!   `p ~ Dir(alpha, ..., alpha)` and deal that class's rows out in those proportions. Small
//!   `alpha` gives each node few classes; large `alpha` approaches IID.
//!
//! Both are seeded: the same seed, labels and node count give the same partition.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, Gamma};
use thiserror::Error;

/// Fewest rows a virtual node may hold; fewer makes its sampling rate meaningless.
pub const MIN_ROWS_PER_NODE: usize = 10;

/// How to partition.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Partition {
    /// Equal random shares.
    Iid,
    /// Label skew with concentration `alpha`.
    Dirichlet {
        /// Concentration; must be positive.
        alpha: f64,
    },
}

/// A partition that cannot be made.
#[derive(Debug, Error, PartialEq)]
#[non_exhaustive]
pub enum PartitionError {
    /// Too few rows for the node count.
    #[error("{rows} rows cannot give {nodes} nodes at least {MIN_ROWS_PER_NODE} rows each")]
    TooFewRows {
        /// Rows available.
        rows: usize,
        /// Nodes asked for.
        nodes: usize,
    },
    /// `alpha` is not positive and finite.
    #[error("dirichlet alpha must be positive and finite, got {0}")]
    Alpha(f64),
    /// Repeated Dirichlet draws kept leaving some node nearly empty.
    #[error(
        "after {0} draws some node still had fewer than {MIN_ROWS_PER_NODE} rows; raise alpha \
         or lower the node count"
    )]
    Degenerate(usize),
}

/// Row indices per node.
///
/// # Errors
/// See [`PartitionError`].
pub fn partition(
    labels: &[u32],
    nodes: usize,
    how: Partition,
    seed: u64,
) -> Result<Vec<Vec<usize>>, PartitionError> {
    if nodes == 0 || labels.len() < nodes * MIN_ROWS_PER_NODE {
        return Err(PartitionError::TooFewRows {
            rows: labels.len(),
            nodes,
        });
    }
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    match how {
        Partition::Iid => {
            let mut rows: Vec<usize> = (0..labels.len()).collect();
            shuffle(&mut rows, &mut rng);
            let mut shares = vec![Vec::new(); nodes];
            for (i, row) in rows.into_iter().enumerate() {
                shares[i % nodes].push(row);
            }
            Ok(shares)
        }
        Partition::Dirichlet { alpha } => dirichlet(labels, nodes, alpha, &mut rng),
    }
}

fn dirichlet(
    labels: &[u32],
    nodes: usize,
    alpha: f64,
    rng: &mut ChaCha20Rng,
) -> Result<Vec<Vec<usize>>, PartitionError> {
    if !(alpha.is_finite() && alpha > 0.0) {
        return Err(PartitionError::Alpha(alpha));
    }
    let gamma = Gamma::new(alpha, 1.0).map_err(|_| PartitionError::Alpha(alpha))?;
    let classes = labels.iter().copied().max().map_or(0, |m| m as usize + 1);
    let mut by_class = vec![Vec::new(); classes];
    for (row, &label) in labels.iter().enumerate() {
        by_class[label as usize].push(row);
    }

    const DRAWS: usize = 100;
    for _ in 0..DRAWS {
        let mut shares = vec![Vec::new(); nodes];
        for rows in &by_class {
            let mut rows = rows.clone();
            shuffle(&mut rows, rng);
            let weights: Vec<f64> = (0..nodes).map(|_| gamma.sample(rng)).collect();
            let total: f64 = weights.iter().sum();
            // Cut points from the cumulative proportions; the last node takes the remainder.
            let mut start = 0;
            let mut cumulative = 0.0;
            for (node, w) in weights.iter().enumerate() {
                cumulative += w / total;
                let end = if node + 1 == nodes {
                    rows.len()
                } else {
                    ((cumulative * rows.len() as f64).round() as usize).clamp(start, rows.len())
                };
                shares[node].extend_from_slice(&rows[start..end]);
                start = end;
            }
        }
        if shares.iter().all(|s| s.len() >= MIN_ROWS_PER_NODE) {
            return Ok(shares);
        }
    }
    Err(PartitionError::Degenerate(DRAWS))
}

/// Fisher-Yates with raw 64-bit words (bias below 2^-40 for any realistic length).
fn shuffle(rows: &mut [usize], rng: &mut ChaCha20Rng) {
    for i in (1..rows.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        rows.swap(i, j);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(n: usize, classes: u32) -> Vec<u32> {
        (0..n as u32).map(|i| i % classes).collect()
    }

    #[test]
    fn iid_covers_every_row_once_in_near_equal_shares() {
        let shares = partition(&labels(1003, 3), 10, Partition::Iid, 1).unwrap();
        let mut all: Vec<usize> = shares.iter().flatten().copied().collect();
        all.sort();
        assert_eq!(all, (0..1003).collect::<Vec<_>>());
        assert!(shares.iter().all(|s| s.len() == 100 || s.len() == 101));
    }

    #[test]
    fn dirichlet_is_seeded_and_covers_every_row_once() {
        let y = labels(2000, 10);
        let a = partition(&y, 10, Partition::Dirichlet { alpha: 0.5 }, 7).unwrap();
        let b = partition(&y, 10, Partition::Dirichlet { alpha: 0.5 }, 7).unwrap();
        assert_eq!(a, b);
        let mut all: Vec<usize> = a.iter().flatten().copied().collect();
        all.sort();
        assert_eq!(all, (0..2000).collect::<Vec<_>>());
    }

    #[test]
    fn small_alpha_skews_labels_more_than_large_alpha() {
        let y = labels(5000, 10);
        // Mean over nodes of the largest class share: near 0.1 for IID, higher with skew.
        let skew = |alpha: f64| {
            let shares = partition(&y, 10, Partition::Dirichlet { alpha }, 3).unwrap();
            shares
                .iter()
                .map(|rows| {
                    let mut counts = [0usize; 10];
                    rows.iter().for_each(|&r| counts[y[r] as usize] += 1);
                    *counts.iter().max().unwrap() as f64 / rows.len() as f64
                })
                .sum::<f64>()
                / 10.0
        };
        assert!(
            skew(0.1) > skew(100.0) + 0.2,
            "{} vs {}",
            skew(0.1),
            skew(100.0)
        );
    }

    #[test]
    fn refuses_more_nodes_than_rows_allow() {
        assert!(matches!(
            partition(&labels(50, 2), 10, Partition::Iid, 0),
            Err(PartitionError::TooFewRows { .. })
        ));
    }
}
