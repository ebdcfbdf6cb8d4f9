//! The neighbour graph: who shares secrets and masks with whom.
//!
//! Small cohorts use the complete graph, as in Bonawitz et al. (2017). Larger ones use a
//! `k`-regular Harary graph over a random ring as in SecAgg+ (Bell et al. 2020, "Secure
//! single-server aggregation with (poly)logarithmic overhead"): nodes are placed on a cycle in
//! a random order and each is joined to the `k / 2` nearest on either side, so masking and
//! unmasking cost `O(k)` streams per node instead of `O(n)`.
//!
//! The order must not be the coordinator's choice, or it could surround a target with nodes
//! it expects to drop. It is derived from SHA-256 of every advertised public key (sorted by
//! node): a Fisher-Yates shuffle driven by ChaCha20 keyed with that hash, with bounded integers
//! drawn by rejection from raw words. Every node computes the same graph from the same key
//! directory, and fresh keys make it fresh each round.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use sha2::{Digest, Sha256};

use super::config::SecAggConfig;
use super::messages::{NodeId, NodeKeys};

/// Hash prefix of the graph seed.
const GRAPH_LABEL: &[u8] = b"athanor/secagg/v1/neighbour-graph";

/// The graph over the nodes of a key directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeighbourGraph {
    /// Nodes in increasing order; a node's index here is its index everywhere below.
    nodes: Vec<NodeId>,
    /// Each node's neighbours, as increasing indices.
    neighbours: Vec<Vec<usize>>,
    /// `t`, the same for every node because the graph is regular.
    threshold: usize,
    complete: bool,
}

impl NeighbourGraph {
    /// The graph for `directory`, whose entries must be in strictly increasing node order.
    pub fn build(config: &SecAggConfig, directory: &[NodeKeys]) -> NeighbourGraph {
        let nodes: Vec<NodeId> = directory.iter().map(|k| k.node).collect();
        let n = nodes.len();
        let complete = n <= config.complete_graph_max || config.degree + 1 >= n;

        let neighbours = if complete {
            (0..n)
                .map(|i| (0..n).filter(|&j| j != i).collect())
                .collect()
        } else {
            harary(&shuffled_ring(config, directory), config.degree)
        };
        let degree = neighbours.first().map_or(0, Vec::len);
        NeighbourGraph {
            nodes,
            neighbours,
            threshold: config.threshold(degree),
            complete,
        }
    }

    /// The nodes, in increasing order.
    pub fn nodes(&self) -> &[NodeId] {
        &self.nodes
    }

    /// The index of `node`, if it is in the graph.
    pub fn index_of(&self, node: NodeId) -> Option<usize> {
        self.nodes.binary_search(&node).ok()
    }

    /// The neighbours of the node at `index`, as increasing indices.
    ///
    /// # Panics
    /// If `index` is not below the number of nodes.
    pub fn neighbours(&self, index: usize) -> &[usize] {
        &self.neighbours[index]
    }

    /// Whether `a` and `b` (indices) are neighbours.
    pub fn are_neighbours(&self, a: usize, b: usize) -> bool {
        self.neighbours[a].binary_search(&b).is_ok()
    }

    /// `t`: shares of a node's secrets needed to reconstruct them.
    pub fn threshold(&self) -> usize {
        self.threshold
    }

    /// Whether every node neighbours every other.
    pub fn is_complete(&self) -> bool {
        self.complete
    }

    /// The Shamir evaluation point of the node at `index`: `index + 1`, never zero.
    pub fn share_point(index: usize) -> u64 {
        index as u64 + 1
    }
}

/// Node indices in cycle order, shuffled by the hash of the directory.
fn shuffled_ring(config: &SecAggConfig, directory: &[NodeKeys]) -> Vec<usize> {
    let mut hash = Sha256::new()
        .chain_update(GRAPH_LABEL)
        .chain_update(config.round.0.to_be_bytes())
        .chain_update((directory.len() as u64).to_be_bytes());
    for keys in directory {
        hash.update(keys.node.0.to_be_bytes());
        hash.update((keys.cipher_public_key.len() as u64).to_be_bytes());
        hash.update(&keys.cipher_public_key);
        hash.update((keys.mask_public_key.len() as u64).to_be_bytes());
        hash.update(&keys.mask_public_key);
    }
    let mut rng = ChaCha20Rng::from_seed(hash.finalize().into());

    let mut order: Vec<usize> = (0..directory.len()).collect();
    for i in (1..order.len()).rev() {
        let j = uniform_below(&mut rng, i as u64 + 1) as usize;
        order.swap(i, j);
    }
    order
}

/// Uniform in `0..bound` by rejection: words at or above the largest multiple of `bound` are
/// redrawn, so every residue is equally likely.
fn uniform_below(rng: &mut ChaCha20Rng, bound: u64) -> u64 {
    let limit = u64::MAX - u64::MAX % bound;
    loop {
        let word = rng.next_u64();
        if word < limit {
            return word % bound;
        }
    }
}

/// Joins each node to the `degree / 2` nearest on either side of the cycle `order`.
/// Requires `degree < order.len()`, so the `degree` neighbours are distinct.
fn harary(order: &[usize], degree: usize) -> Vec<Vec<usize>> {
    let n = order.len();
    let mut neighbours = vec![Vec::with_capacity(degree); n];
    for (position, &node) in order.iter().enumerate() {
        for step in 1..=degree / 2 {
            neighbours[node].push(order[(position + step) % n]);
            neighbours[node].push(order[(position + n - step) % n]);
        }
    }
    neighbours.iter_mut().for_each(|list| list.sort_unstable());
    neighbours
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secagg::messages::RoundId;

    fn config(n: u64, complete_graph_max: usize, degree: usize) -> SecAggConfig {
        SecAggConfig {
            round: RoundId(9),
            cohort: (0..n).map(NodeId).collect(),
            vector_len: 4,
            ring_bits: 32,
            complete_graph_max,
            degree,
            threshold_percent: 60,
            min_survivors: 2,
        }
    }

    fn directory(n: u64) -> Vec<NodeKeys> {
        (0..n)
            .map(|i| NodeKeys {
                node: NodeId(i),
                cipher_public_key: vec![i as u8; 32],
                mask_public_key: vec![i as u8 ^ 0xff; 32],
            })
            .collect()
    }

    #[test]
    fn sparse_graph_is_symmetric_and_regular() {
        let graph = NeighbourGraph::build(&config(50, 10, 8), &directory(50));
        assert!(!graph.is_complete());
        for i in 0..50 {
            assert_eq!(graph.neighbours(i).len(), 8);
            assert!(!graph.neighbours(i).contains(&i));
            for &j in graph.neighbours(i) {
                assert!(graph.are_neighbours(j, i));
            }
        }
        assert_eq!(graph.threshold(), 6);
    }

    #[test]
    fn small_cohort_gets_the_complete_graph() {
        let graph = NeighbourGraph::build(&config(5, 10, 2), &directory(5));
        assert!(graph.is_complete());
        assert_eq!(graph.neighbours(2), &[0, 1, 3, 4]);
    }

    #[test]
    fn different_keys_give_a_different_graph() {
        let config = config(40, 10, 4);
        let mut other = directory(40);
        other[0].mask_public_key[0] ^= 1;
        let a = NeighbourGraph::build(&config, &directory(40));
        let b = NeighbourGraph::build(&config, &other);
        assert_ne!(a, b);
    }
}
