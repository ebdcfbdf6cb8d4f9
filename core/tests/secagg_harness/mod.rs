//! An in-process driver of secure-aggregation rounds for the tests: every node's
//! `ClientRound` and the coordinator's `ServerRound`, with chosen nodes dropping out at
//! chosen stages.

#![allow(
    dead_code,
    reason = "each test crate that includes the harness uses part of it"
)]

use std::collections::{BTreeMap, BTreeSet};

use athanor_core::secagg::messages::{KeyDirectory, MaskedInput, ShareInbox, UnmaskRequest};
use athanor_core::secagg::{
    ClientRound, NodeId, RoundId, SecAggConfig, SecAggError, ServerRound, UnmaskedSum,
};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

/// Nodes that stop answering, by the last stage they completed.
#[derive(Debug, Clone, Default)]
pub struct Dropouts {
    /// Never advertise keys.
    pub before_advertising: BTreeSet<NodeId>,
    /// Advertise, then send no shares.
    pub after_advertising: BTreeSet<NodeId>,
    /// Send shares, then no masked input.
    pub after_sharing: BTreeSet<NodeId>,
    /// Send a masked input, then no unmask response.
    pub after_masking: BTreeSet<NodeId>,
}

impl Dropouts {
    /// Nodes whose inputs should be in the sum.
    pub fn contributors(&self, cohort: &[NodeId]) -> Vec<NodeId> {
        cohort
            .iter()
            .copied()
            .filter(|n| {
                !self.before_advertising.contains(n)
                    && !self.after_advertising.contains(n)
                    && !self.after_sharing.contains(n)
            })
            .collect()
    }

    /// Drops `count` random distinct nodes, each at a random stage.
    pub fn random(cohort: &[NodeId], count: usize, rng: &mut ChaCha20Rng) -> Dropouts {
        let mut nodes = cohort.to_vec();
        let mut dropouts = Dropouts::default();
        for _ in 0..count {
            let node = nodes.swap_remove(below(rng, nodes.len()));
            let set = match below(rng, 4) {
                0 => &mut dropouts.before_advertising,
                1 => &mut dropouts.after_advertising,
                2 => &mut dropouts.after_sharing,
                _ => &mut dropouts.after_masking,
            };
            set.insert(node);
        }
        dropouts
    }
}

/// Uniform below `bound` for test bookkeeping (not for anything protocol-related).
pub fn below(rng: &mut ChaCha20Rng, bound: usize) -> usize {
    use rand::Rng;
    (rng.next_u64() % bound as u64) as usize
}

/// What the coordinator saw and produced.
#[derive(Debug)]
pub struct Trace {
    pub directory: Option<KeyDirectory>,
    pub inboxes: Vec<ShareInbox>,
    pub masked: BTreeMap<NodeId, MaskedInput>,
    pub requests: Vec<UnmaskRequest>,
    pub result: Result<UnmaskedSum, SecAggError>,
}

pub fn config(round: u64, cohort: u64, vector_len: usize, ring_bits: u32) -> SecAggConfig {
    SecAggConfig {
        round: RoundId(round),
        cohort: (1..=cohort).map(|i| NodeId(i * 7)).collect(),
        vector_len,
        ring_bits,
        complete_graph_max: 20,
        degree: 20,
        threshold_percent: 60,
        min_survivors: 2,
    }
}

/// Runs a whole round; the first error (from any node or the coordinator) ends it.
pub fn run_round(
    config: &SecAggConfig,
    inputs: &BTreeMap<NodeId, Vec<u32>>,
    dropouts: &Dropouts,
    seed: u64,
) -> Trace {
    let mut trace = Trace {
        directory: None,
        inboxes: Vec::new(),
        masked: BTreeMap::new(),
        requests: Vec::new(),
        result: Err(SecAggError::Malformed {
            what: "test",
            problem: "not finished",
        }),
    };
    let outcome = drive(config, inputs, dropouts, seed, &mut trace);
    trace.result = outcome;
    trace
}

fn drive(
    config: &SecAggConfig,
    inputs: &BTreeMap<NodeId, Vec<u32>>,
    dropouts: &Dropouts,
    seed: u64,
    trace: &mut Trace,
) -> Result<UnmaskedSum, SecAggError> {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let mut server = ServerRound::new(config.clone())?;

    let mut clients = BTreeMap::new();
    for &node in &config.cohort {
        let (client, advertisement) = ClientRound::new(config.clone(), node, &mut rng)?;
        if dropouts.before_advertising.contains(&node) {
            continue;
        }
        server.receive_advertisement(&advertisement)?;
        clients.insert(node, client);
    }
    let directory = server.close_advertisements()?;
    trace.directory = Some(directory.clone());

    for (node, client) in &mut clients {
        if dropouts.after_advertising.contains(node) {
            continue;
        }
        server.receive_shares(client.share_keys(&directory, &mut rng)?)?;
    }
    let inboxes = server.close_shares()?;
    trace.inboxes = inboxes.clone();

    for inbox in &inboxes {
        if dropouts.after_sharing.contains(&inbox.recipient) {
            continue;
        }
        let client = clients
            .get_mut(&inbox.recipient)
            .expect("inboxes go to known nodes");
        let masked = client.masked_input(inbox, &inputs[&inbox.recipient])?;
        server.receive_masked_input(&masked)?;
        trace.masked.insert(inbox.recipient, masked);
    }
    let requests = server.close_masked_inputs()?;
    trace.requests = requests.clone();

    for request in &requests {
        if dropouts.after_masking.contains(&request.recipient) {
            continue;
        }
        let client = clients
            .get_mut(&request.recipient)
            .expect("requests go to known nodes");
        server.receive_unmask_response(&client.unmask(request)?)?;
    }
    server.finish()
}

/// `sum of vectors mod 2^bits`.
pub fn ring_sum<'a>(
    vectors: impl IntoIterator<Item = &'a Vec<u32>>,
    len: usize,
    bits: u32,
) -> Vec<u32> {
    let mask = u32::MAX >> (32 - bits);
    let mut sum = vec![0_u32; len];
    for vector in vectors {
        for (s, v) in sum.iter_mut().zip(vector) {
            *s = s.wrapping_add(*v) & mask;
        }
    }
    sum
}
