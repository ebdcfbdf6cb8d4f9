//! What the coordinator sees in secure aggregation tells it nothing about one node's input:
//! masked vectors are uniform, fewer than `t` shares reveal nothing, ciphertexts are bound to
//! their parties, and unmask requests that would reveal both secrets of a node are refused.

mod secagg_harness;

use std::collections::BTreeMap;

use athanor_core::secagg::keys::{associated_data, open_share, seal_share};
use athanor_core::secagg::messages::{AdvertiseKeys, KeyDirectory, ShareInbox, UnmaskRequest};
use athanor_core::secagg::shamir::{Secret, combine, split};
use athanor_core::secagg::{ClientRound, NodeId, RoundId, SecAggConfig, SecAggError, ServerRound};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

use secagg_harness::{Dropouts, config, run_round};

/// Counts of `values` in `bins` equal bins over `Z_{2^bits}` (by their top bits).
fn histogram(values: &[u32], bits: u32, bins: usize) -> Vec<u64> {
    let shift = bits - bins.trailing_zeros();
    let mut counts = vec![0; bins];
    for &v in values {
        counts[(v >> shift) as usize] += 1;
    }
    counts
}

fn chi_square_uniform(counts: &[u64]) -> f64 {
    let expected = counts.iter().sum::<u64>() as f64 / counts.len() as f64;
    counts
        .iter()
        .map(|&c| (c as f64 - expected).powi(2) / expected)
        .sum()
}

fn chi_square_two_samples(a: &[u64], b: &[u64]) -> f64 {
    a.iter()
        .zip(b)
        .filter(|(x, y)| **x + **y > 0)
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2) / (x + y) as f64)
        .sum()
}

/// The masked vector node 7 sends when every node's input is `value`.
fn masked_vector(config: &SecAggConfig, value: u32, seed: u64) -> Vec<u32> {
    let inputs: BTreeMap<NodeId, Vec<u32>> = config
        .cohort
        .iter()
        .map(|&n| (n, vec![value; config.vector_len]))
        .collect();
    let trace = run_round(config, &inputs, &Dropouts::default(), seed);
    trace.result.unwrap();
    trace.masked[&NodeId(7)].masked.clone()
}

// Critical values of chi-square at a false-alarm probability of 1e-6 (Wilson-Hilferty):
// 377 for 255 degrees of freedom, 218 for 127.
const CHI2_255: f64 = 377.0;
const CHI2_127: f64 = 218.0;

#[test]
fn masked_vector_is_uniform_over_the_full_32_bit_ring() {
    // 256 bins by the top 8 bits, the last covering the top residue 2^32 - 1.
    let config = config(21, 3, 1 << 16, 32);
    let masked = masked_vector(&config, 0, 21);
    let counts = histogram(&masked, 32, 256);
    let statistic = chi_square_uniform(&counts);
    assert!(
        statistic < CHI2_255,
        "chi-square {statistic} over 255 degrees of freedom"
    );
}

#[test]
fn masked_vector_is_uniform_over_every_residue_of_a_7_bit_ring() {
    let config = config(22, 3, 128 * 200, 7);
    let masked = masked_vector(&config, 100, 22);
    let counts = histogram(&masked, 7, 128);
    assert!(counts[127] > 0, "the top residue never appears");
    let statistic = chi_square_uniform(&counts);
    assert!(
        statistic < CHI2_127,
        "chi-square {statistic} over 127 degrees of freedom"
    );
}

#[test]
fn masked_vectors_of_different_inputs_are_indistinguishable() {
    let config = config(23, 3, 1 << 16, 32);
    let zeros = histogram(&masked_vector(&config, 0, 23), 32, 256);
    let large = histogram(&masked_vector(&config, 0x7fff_ffff, 24), 32, 256);
    let statistic = chi_square_two_samples(&zeros, &large);
    assert!(statistic < CHI2_255, "two-sample chi-square {statistic}");

    // The same statistic tells the unmasked inputs apart at once: the test has power.
    let plain_zeros = histogram(&vec![0; 1 << 16], 32, 256);
    let plain_large = histogram(&vec![0x7fff_ffff; 1 << 16], 32, 256);
    assert!(chi_square_two_samples(&plain_zeros, &plain_large) > 1e4);
}

#[test]
fn fewer_than_threshold_shares_never_reconstruct() {
    let mut rng = ChaCha20Rng::seed_from_u64(25);
    let secret = Secret::random(&mut rng);
    let shares = split(&secret, 5, &[1, 2, 3, 4, 5, 6, 7, 8, 9], &mut rng).unwrap();

    for start in 0..6 {
        let four = &shares[start..start + 4];
        assert_eq!(
            combine(four, 5, |s| s == &secret).unwrap_err(),
            SecAggError::TooFewShares { got: 4, need: 5 }
        );
        // Interpolating the four as if they sufficed gives some other value, which the check
        // value rejects.
        assert_eq!(
            combine(four, 4, |s| s == &secret).unwrap_err(),
            SecAggError::ReconstructionMismatch
        );
    }
    assert_eq!(combine(&shares[4..], 5, |s| s == &secret).unwrap(), secret);
}

/// A three-node round driven to the point where node 7 holds its share inbox.
struct AtInbox {
    clients: Vec<ClientRound>,
    server: ServerRound,
    inboxes: Vec<ShareInbox>,
}

fn at_inbox(config: &SecAggConfig, seed: u64) -> AtInbox {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let mut server = ServerRound::new(config.clone()).unwrap();
    let mut clients = Vec::new();
    for &node in &config.cohort {
        let (client, advert) = ClientRound::new(config.clone(), node, &mut rng).unwrap();
        server.receive_advertisement(&advert).unwrap();
        clients.push(client);
    }
    let directory = server.close_advertisements().unwrap();
    for client in &mut clients {
        server
            .receive_shares(client.share_keys(&directory, &mut rng).unwrap())
            .unwrap();
    }
    let inboxes = server.close_shares().unwrap();
    AtInbox {
        clients,
        server,
        inboxes,
    }
}

#[test]
fn tampered_or_relabelled_share_ciphertexts_are_rejected() {
    let config = config(26, 3, 4, 32);
    let mut round = at_inbox(&config, 26);
    let inbox = round.inboxes[0].clone();
    let input = vec![1; 4];

    let mut flipped = inbox.clone();
    flipped.shares[0].ciphertext[5] ^= 0x10;
    let err = round.clients[0].masked_input(&flipped, &input).unwrap_err();
    assert!(matches!(err, SecAggError::Decryption { .. }), "{err}");

    let mut truncated = inbox.clone();
    truncated.shares[0].ciphertext.pop();
    assert!(matches!(
        round.clients[0].masked_input(&truncated, &input),
        Err(SecAggError::Decryption { .. })
    ));

    // Node 14's bundle presented as node 21's (in place of node 21's own).
    let mut relabelled = inbox.clone();
    relabelled.shares.retain(|s| s.sender == NodeId(14));
    relabelled.shares[0].sender = NodeId(21);
    let err = round.clients[0]
        .masked_input(&relabelled, &input)
        .unwrap_err();
    assert_eq!(
        err,
        SecAggError::Decryption {
            sender: NodeId(21),
            recipient: NodeId(7)
        }
    );

    // Refusals changed nothing: the genuine inbox is still accepted.
    let masked = round.clients[0].masked_input(&inbox, &input).unwrap();
    round.server.receive_masked_input(&masked).unwrap();
}

#[test]
fn ciphertext_under_other_associated_data_is_rejected() {
    let key = [42; 32];
    let ad = associated_data(RoundId(1), NodeId(2), NodeId(3));
    let ciphertext = seal_share(&key, &ad, b"share bundle");
    assert_eq!(
        &open_share(&key, &ad, &ciphertext, NodeId(2), NodeId(3)).unwrap()[..],
        b"share bundle"
    );
    for other in [
        associated_data(RoundId(2), NodeId(2), NodeId(3)),
        associated_data(RoundId(1), NodeId(3), NodeId(3)),
        associated_data(RoundId(1), NodeId(2), NodeId(4)),
    ] {
        assert_eq!(
            open_share(&key, &other, &ciphertext, NodeId(2), NodeId(3)).unwrap_err(),
            SecAggError::Decryption {
                sender: NodeId(2),
                recipient: NodeId(3)
            }
        );
    }
}

/// A round driven to the unmask requests, on a graph given by `config`.
fn at_unmasking(config: &SecAggConfig, seed: u64) -> (Vec<ClientRound>, Vec<UnmaskRequest>) {
    let mut round = at_inbox(config, seed);
    for (client, inbox) in round.clients.iter_mut().zip(&round.inboxes) {
        let masked = client
            .masked_input(inbox, &vec![0; config.vector_len])
            .unwrap();
        round.server.receive_masked_input(&masked).unwrap();
    }
    let requests = round.server.close_masked_inputs().unwrap();
    (round.clients, requests)
}

#[test]
fn unmask_request_naming_a_node_alive_and_dropped_is_refused() {
    let config = config(27, 3, 4, 32);
    let (mut clients, requests) = at_unmasking(&config, 27);
    let genuine = requests[0].clone();

    let mut both = genuine.clone();
    both.dropped.push(NodeId(14));
    assert_eq!(
        clients[0].unmask(&both).unwrap_err(),
        SecAggError::AliveAndDropped { node: NodeId(14) }
    );

    let mut self_dropped = genuine.clone();
    self_dropped.alive.retain(|&n| n != NodeId(7));
    self_dropped.dropped.push(NodeId(7));
    assert!(matches!(
        clients[0].unmask(&self_dropped),
        Err(SecAggError::InconsistentUnmaskRequest { .. })
    ));

    let mut missing = genuine.clone();
    missing.alive.retain(|&n| n != NodeId(21));
    assert!(matches!(
        clients[0].unmask(&missing),
        Err(SecAggError::InconsistentUnmaskRequest { .. })
    ));

    let mut twice = genuine.clone();
    twice.alive.push(NodeId(14));
    assert!(matches!(
        clients[0].unmask(&twice),
        Err(SecAggError::Malformed { .. })
    ));

    // Only the genuine request is answered, with one kind of share per node.
    let response = clients[0].unmask(&genuine).unwrap();
    assert_eq!(response.self_mask_shares.len(), 3);
    assert!(response.mask_key_shares.is_empty());
}

#[test]
fn unmask_request_naming_a_non_neighbour_is_refused() {
    // 30 nodes on a 4-regular graph: each node has 26 non-neighbours.
    let config = SecAggConfig {
        complete_graph_max: 10,
        degree: 4,
        ..config(28, 30, 4, 32)
    };
    let (mut clients, requests) = at_unmasking(&config, 28);
    let request = &requests[0];
    assert_eq!(request.alive.len(), 5);
    let stranger = config
        .cohort
        .iter()
        .find(|n| !request.alive.contains(n))
        .unwrap();

    let mut widened = request.clone();
    widened.dropped.push(*stranger);
    let err = clients[0].unmask(&widened).unwrap_err();
    assert_eq!(
        err,
        SecAggError::NotANeighbour {
            node: NodeId(7),
            peer: *stranger
        }
    );
    clients[0].unmask(request).unwrap();
}

#[test]
fn low_order_public_keys_are_refused() {
    let config = config(29, 3, 4, 32);
    let mut rng = ChaCha20Rng::seed_from_u64(29);
    let mut server = ServerRound::new(config.clone()).unwrap();
    let (mut client, advert) = ClientRound::new(config.clone(), NodeId(7), &mut rng).unwrap();
    for low_order in [[0_u8; 32], {
        let mut p = [0_u8; 32];
        p[0] = 1;
        p
    }] {
        let bad = AdvertiseKeys {
            mask_public_key: low_order.to_vec(),
            ..advert.clone()
        };
        assert_eq!(
            server.receive_advertisement(&bad).unwrap_err(),
            SecAggError::NonContributoryKey { node: NodeId(7) }
        );
    }

    // A directory that carries one (bypassing the coordinator's check) is refused by nodes.
    let mut others = Vec::new();
    for &node in &config.cohort[1..] {
        others.push(ClientRound::new(config.clone(), node, &mut rng).unwrap().1);
    }
    let mut nodes = vec![athanor_core::secagg::messages::NodeKeys {
        node: advert.node,
        cipher_public_key: advert.cipher_public_key.clone(),
        mask_public_key: advert.mask_public_key.clone(),
    }];
    for other in &others {
        nodes.push(athanor_core::secagg::messages::NodeKeys {
            node: other.node,
            cipher_public_key: vec![0; 32],
            mask_public_key: other.mask_public_key.clone(),
        });
    }
    let directory = KeyDirectory {
        round: config.round,
        stage: 1,
        nodes,
    };
    let err = client.share_keys(&directory, &mut rng).unwrap_err();
    assert!(
        matches!(err, SecAggError::NonContributoryKey { .. }),
        "{err}"
    );
}
