//! Secure aggregation end to end: exact sums under dropouts, abandonment, distributed noise,
//! refused messages, and the pinned mask generator.

mod secagg_harness;

use std::collections::BTreeMap;

use athanor_core::secagg::mask::keystream_words;
use athanor_core::secagg::messages::{AdvertiseKeys, MaskedInput, Stage};
use athanor_core::secagg::quantize::{DistributedNoise, QuantizationConfig, Quantizer};
use athanor_core::secagg::{
    AbandonReason, ClientRound, NodeId, RoundId, SecAggConfig, SecAggError, ServerRound,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

use secagg_harness::{Dropouts, config, ring_sum, run_round};

/// Float updates of norm up to about 2 (some above the clipping bound of 1).
fn float_updates(config: &SecAggConfig, dimension: usize, seed: u64) -> BTreeMap<NodeId, Vec<f32>> {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    config
        .cohort
        .iter()
        .map(|&node| {
            let scale = 2.0 / (dimension as f32).sqrt();
            let update = (0..dimension)
                .map(|_| ((rng.next_u32() as f32 / u32::MAX as f32) * 2.0 - 1.0) * scale * 1.7)
                .collect();
            (node, update)
        })
        .collect()
}

fn noiseless_quantizer(config: &SecAggConfig, dimension: usize, rotate: bool) -> Quantizer {
    Quantizer::new(QuantizationConfig {
        dimension,
        clip_norm: 1.0,
        granularity: 1.0 / 4096.0,
        rotation_seed: rotate.then_some([3; 32]),
        noise: DistributedNoise::InsecureNone,
        max_contributors: config.cohort.len(),
        ring_bits: config.ring_bits,
        tail_bits: 40,
    })
    .unwrap()
}

/// Runs a round over quantized random updates and checks the sum exactly and the decoded mean
/// within the rounding bound.
fn check_exact_round(
    config: &SecAggConfig,
    dimension: usize,
    rotate: bool,
    dropouts: &Dropouts,
    seed: u64,
) {
    let quantizer = noiseless_quantizer(config, dimension, rotate);
    quantizer.check_round(config).unwrap();
    let updates = float_updates(config, dimension, seed);
    let mut rng = ChaCha20Rng::seed_from_u64(seed ^ 0xabc);
    let inputs: BTreeMap<NodeId, Vec<u32>> = updates
        .iter()
        .map(|(&node, update)| (node, quantizer.encode(update, &mut rng).unwrap()))
        .collect();

    let trace = run_round(config, &inputs, dropouts, seed);
    let result = trace
        .result
        .unwrap_or_else(|e| panic!("seed {seed}, {dropouts:?}: {e}"));

    let contributors = dropouts.contributors(&config.cohort);
    assert_eq!(result.contributors, contributors, "seed {seed}");
    let expected = ring_sum(
        contributors.iter().map(|n| &inputs[n]),
        config.vector_len,
        config.ring_bits,
    );
    assert_eq!(
        result.sum, expected,
        "seed {seed}: unmasked sum differs from the plain sum"
    );

    // Decoded mean versus the mean of the clipped float updates.
    let count = contributors.len() as f64;
    let decoded = quantizer.decode_sum(&result.sum).unwrap();
    let mut float_mean = vec![0.0; dimension];
    for node in &contributors {
        for (m, v) in float_mean
            .iter_mut()
            .zip(quantizer.clip(&updates[node]).unwrap())
        {
            *m += v / count;
        }
    }
    let error = decoded
        .iter()
        .zip(&float_mean)
        .map(|(d, m)| (d / count - m).powi(2))
        .sum::<f64>()
        .sqrt();
    assert!(
        error <= quantizer.rounding_error_bound(),
        "seed {seed}: mean error {error} above bound {}",
        quantizer.rounding_error_bound()
    );
}

#[test]
fn three_nodes_sum_exactly_whichever_node_drops_at_whichever_stage() {
    let config = config(1, 3, 50, 32);
    check_exact_round(&config, 50, false, &Dropouts::default(), 1);
    for (stage, node) in (0..4).flat_map(|s| config.cohort.iter().map(move |&n| (s, n))) {
        let mut dropouts = Dropouts::default();
        let set = match stage {
            0 => &mut dropouts.before_advertising,
            1 => &mut dropouts.after_advertising,
            2 => &mut dropouts.after_sharing,
            _ => &mut dropouts.after_masking,
        };
        set.insert(node);
        check_exact_round(&config, 50, false, &dropouts, 10 + stage);
    }
}

#[test]
fn ten_nodes_sum_exactly_with_random_dropouts_down_to_the_threshold() {
    // Complete graph, t = ceil(0.6 * 10) = 6: up to 4 nodes may drop, at any stages.
    let config = SecAggConfig {
        min_survivors: 3,
        ..config(2, 10, 128, 30)
    };
    let mut rng = ChaCha20Rng::seed_from_u64(2);
    for trial in 0..12 {
        let dropouts = Dropouts::random(&config.cohort, trial % 5, &mut rng);
        check_exact_round(&config, 100, true, &dropouts, 100 + trial as u64);
    }
}

#[test]
fn hundred_nodes_on_the_sparse_graph_sum_exactly_with_random_dropouts() {
    // Degree 20, t = ceil(0.6 * 21) = 13; 15 random dropouts leave every neighbourhood above it
    // for these seeds.
    let config = SecAggConfig {
        min_survivors: 50,
        ..config(3, 100, 1024, 32)
    };
    let mut rng = ChaCha20Rng::seed_from_u64(3);
    for trial in 0..2 {
        let dropouts = Dropouts::random(&config.cohort, 15, &mut rng);
        check_exact_round(&config, 1000, true, &dropouts, 200 + trial);
    }
}

#[test]
fn sparse_graph_is_used_for_large_cohorts() {
    let config = config(4, 60, 8, 32);
    let trace = run_round(&config, &zero_inputs(&config), &Dropouts::default(), 4);
    trace.result.unwrap();
    // Each node holds shares of its 20 neighbours and asks nothing about the others.
    for request in &trace.requests {
        assert_eq!(request.alive.len(), 21);
    }
}

fn zero_inputs(config: &SecAggConfig) -> BTreeMap<NodeId, Vec<u32>> {
    config
        .cohort
        .iter()
        .map(|&n| (n, vec![0; config.vector_len]))
        .collect()
}

fn assert_abandoned(result: Result<impl std::fmt::Debug, SecAggError>) -> AbandonReason {
    match result {
        Err(SecAggError::Abandoned(reason)) => reason,
        other => panic!("expected an abandoned round, got {other:?}"),
    }
}

#[test]
fn round_is_abandoned_when_fewer_than_threshold_shares_return() {
    // Ten nodes, t = 6: five unmask responses are one short.
    let config = SecAggConfig {
        min_survivors: 3,
        ..config(5, 10, 16, 32)
    };
    let dropouts = Dropouts {
        after_masking: config.cohort[..5].iter().copied().collect(),
        ..Dropouts::default()
    };
    let trace = run_round(&config, &zero_inputs(&config), &dropouts, 5);
    let reason = assert_abandoned(trace.result);
    assert!(
        matches!(
            reason,
            AbandonReason::TooFewShares {
                got: 5,
                need: 6,
                ..
            }
        ),
        "{reason:?}"
    );
}

#[test]
fn round_is_abandoned_before_unmasking_when_survivors_hold_too_few_shares() {
    // Five inputs: each survivor's self-mask has five live holders, t = 6. Nothing is revealed.
    let config = SecAggConfig {
        min_survivors: 3,
        ..config(6, 10, 16, 32)
    };
    let dropouts = Dropouts {
        after_sharing: config.cohort[5..].iter().copied().collect(),
        ..Dropouts::default()
    };
    let trace = run_round(&config, &zero_inputs(&config), &dropouts, 6);
    assert!(trace.requests.is_empty());
    let reason = assert_abandoned(trace.result);
    assert!(
        matches!(
            reason,
            AbandonReason::TooFewHolders {
                got: 5,
                need: 6,
                ..
            }
        ),
        "{reason:?}"
    );
}

#[test]
fn round_is_abandoned_when_fewer_than_the_minimum_survive() {
    let config = SecAggConfig {
        min_survivors: 8,
        ..config(7, 10, 16, 32)
    };
    let dropouts = Dropouts {
        after_sharing: config.cohort[..3].iter().copied().collect(),
        ..Dropouts::default()
    };
    let reason = assert_abandoned(run_round(&config, &zero_inputs(&config), &dropouts, 7).result);
    assert_eq!(
        reason,
        AbandonReason::TooFewNodes {
            stage: Stage::MaskedInput,
            got: 7,
            need: 8
        }
    );

    let dropouts = Dropouts {
        before_advertising: config.cohort[..3].iter().copied().collect(),
        ..Dropouts::default()
    };
    let reason = assert_abandoned(run_round(&config, &zero_inputs(&config), &dropouts, 7).result);
    assert_eq!(
        reason,
        AbandonReason::TooFewNodes {
            stage: Stage::AdvertiseKeys,
            got: 7,
            need: 8
        }
    );
}

#[test]
fn abandoned_round_stays_abandoned() {
    let config = SecAggConfig {
        min_survivors: 3,
        ..config(8, 3, 4, 32)
    };
    let mut server = ServerRound::new(config).unwrap();
    assert_abandoned(server.close_advertisements());
    assert_eq!(
        assert_abandoned(server.close_shares()),
        AbandonReason::AlreadyAbandoned
    );
    assert_eq!(
        assert_abandoned(server.finish()),
        AbandonReason::AlreadyAbandoned
    );
    assert_eq!(server.stage(), None);
}

#[test]
fn summed_noise_matches_the_target_for_the_survivors() {
    // 20 nodes send zero updates with noise sized for n_min = 10, sigma = 0.05, gamma = 2^-10:
    // sigma / gamma = 51.2 units, so each node adds D(ceil(51.2^2 / 10) = 263). With 16
    // contributors the sum's variance is 16 * 263 units^2, standard deviation 64.9 units.
    let dimension = 4096;
    let config = SecAggConfig {
        min_survivors: 10,
        ..config(9, 20, dimension, 32)
    };
    let quantizer = Quantizer::new(QuantizationConfig {
        dimension,
        clip_norm: 1.0,
        granularity: 1.0 / 1024.0,
        rotation_seed: Some([9; 32]),
        noise: DistributedNoise::Gaussian {
            sum_std: 0.05,
            min_survivors: 10,
        },
        max_contributors: 20,
        ring_bits: 32,
        tail_bits: 40,
    })
    .unwrap();
    assert_eq!(quantizer.node_noise_variance(), Some(263));
    quantizer.check_round(&config).unwrap();
    let fewer = SecAggConfig {
        min_survivors: 9,
        ..config.clone()
    };
    assert!(matches!(
        quantizer.check_round(&fewer),
        Err(SecAggError::InvalidConfig {
            name: "min_survivors",
            ..
        })
    ));

    let mut rng = ChaCha20Rng::seed_from_u64(9);
    let zeros = vec![0.0_f32; dimension];
    let inputs = config
        .cohort
        .iter()
        .map(|&n| (n, quantizer.encode(&zeros, &mut rng).unwrap()))
        .collect();
    let dropouts = Dropouts::random(&config.cohort, 4, &mut rng);
    let contributors = dropouts.contributors(&config.cohort).len();
    let sum = run_round(&config, &inputs, &dropouts, 9).result.unwrap();
    let decoded = quantizer.decode_sum(&sum.sum).unwrap();

    // The rotation is orthogonal, so decoded coordinates keep the variance. The sample
    // variance of 4096 Gaussian values has relative standard error sqrt(2 / 4096) = 2.2%;
    // the tolerance is 5 of them.
    let expected = (contributors as f64 * 263.0).sqrt() / 1024.0;
    let variance = decoded.iter().map(|v| v * v).sum::<f64>() / dimension as f64;
    let ratio = variance / (expected * expected);
    assert!(
        (ratio - 1.0).abs() < 0.11,
        "{contributors} contributors: variance ratio {ratio}"
    );
    // And never less than the target for the guaranteed survivors.
    assert!(contributors >= 10 && variance.sqrt() > 0.05 * 0.9);
}

#[test]
fn ring_too_small_for_the_cohort_is_refused_with_the_numbers() {
    // Max |value| M = 2^20 - 1. A 32-bit ring holds centred sums up to 2^31 - 1: 2048 M fits,
    // 2049 M does not, nor does a cohort of 2^32 / M + 1.
    let base = QuantizationConfig {
        dimension: 10,
        clip_norm: (1 << 20) as f64 - 2.0,
        granularity: 1.0,
        rotation_seed: None,
        noise: DistributedNoise::InsecureNone,
        max_contributors: 2048,
        ring_bits: 32,
        tail_bits: 40,
    };
    let fits = Quantizer::new(base).unwrap();
    assert_eq!(fits.max_value(), (1 << 20) - 1);

    let err = Quantizer::new(QuantizationConfig {
        max_contributors: 2049,
        ..base
    })
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "cohort of 2049 x max |value| 1048575 (2^20.0) + noise tail 0 needs 33 bits, ring has 32"
    );
    let wrapping = (1_usize << 32) / ((1 << 20) - 1) + 1;
    let config = QuantizationConfig {
        max_contributors: wrapping,
        ..base
    };
    assert!(matches!(
        Quantizer::new(config),
        Err(SecAggError::RingTooSmall { .. })
    ));

    // Noise counts too: 256 units of standard deviation per node, over 2048 nodes, add a tail of
    // z sqrt(2048) 256 = 90812 with z = sqrt(2 ln(2 * 10 * 2^40)) = 7.84.
    let noisy = QuantizationConfig {
        noise: DistributedNoise::Gaussian {
            sum_std: 256.0 * 1000_f64.sqrt(),
            min_survivors: 1000,
        },
        ..base
    };
    let err = Quantizer::new(noisy).unwrap_err();
    assert!(
        matches!(
            err,
            SecAggError::RingTooSmall {
                needed_bits: 33,
                ring_bits: 32,
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("+ noise tail 90812 (2^16.5)"),
        "{err}"
    );
}

#[test]
fn clipping_happens_before_quantization() {
    let quantizer = Quantizer::new(QuantizationConfig {
        dimension: 2,
        clip_norm: 1.0,
        granularity: 1.0 / 256.0,
        rotation_seed: None,
        noise: DistributedNoise::InsecureNone,
        max_contributors: 1,
        ring_bits: 16,
        tail_bits: 40,
    })
    .unwrap();
    let mut rng = ChaCha20Rng::seed_from_u64(10);
    let encoded = quantizer.encode(&[300.0, -400.0], &mut rng).unwrap();
    let decoded = quantizer.decode_sum(&encoded).unwrap();
    assert!((decoded[0] - 0.6).abs() <= 1.0 / 256.0 && (decoded[1] + 0.8).abs() <= 1.0 / 256.0);
    assert!(matches!(
        quantizer.encode(&[f32::NAN, 0.0], &mut rng),
        Err(SecAggError::NonFinite { index: 0 })
    ));
}

#[test]
fn mask_stream_is_the_chacha20_keystream() {
    // RFC 8439 appendix A.1, test vector 1: all-zero key and nonce, block 0.
    let zero_key = [
        0xade0_b876,
        0x903d_f1a0,
        0xe56a_5d40,
        0x28bd_8653,
        0xb819_d2bd,
        0x1aed_8da0,
        0xccef_36a8,
        0xc70d_778b,
        0x7c59_41da,
        0x8d48_5751,
        0x3fe0_2477,
        0x374a_d8b8,
        0xf4b8_436a,
        0x1ca1_1815,
        0x69b6_87c3,
        0x8665_eeb2,
    ];
    assert_eq!(keystream_words(&[0; 32], 16), zero_key);

    // Pinned output for a structured key, across a block boundary.
    let seed: [u8; 32] = std::array::from_fn(|i| i as u8);
    let words = keystream_words(&seed, 20);
    assert_eq!(&words[..4], &GOLDEN_STRUCTURED_KEY[..4]);
    assert_eq!(&words[16..], &GOLDEN_STRUCTURED_KEY[4..]);

    // The same words as the generator's raw next_u32, across its internal buffer refill.
    let mut rng = ChaCha20Rng::from_seed(seed);
    let raw: Vec<u32> = (0..300).map(|_| rng.next_u32()).collect();
    assert_eq!(keystream_words(&seed, 300), raw);
}

/// Words 0..4 and 16..20 of the stream for the key `00 01 02 ... 1f` (zero nonce, counter 0),
/// checked against OpenSSL's ChaCha20 when first recorded.
const GOLDEN_STRUCTURED_KEY: [u32; 8] = [
    0x7d2b_fd39,
    0x6a19_c5d9,
    0x7703_bd8d,
    0x494a_dcb8,
    0x3142_b818,
    0xd1a6_e6ad,
    0x615c_6113,
    0x274e_43af,
];

#[test]
fn replayed_duplicate_and_out_of_order_messages_are_refused_and_change_nothing() {
    let config = config(11, 3, 8, 32);
    let mut rng = ChaCha20Rng::seed_from_u64(11);
    let mut server = ServerRound::new(config.clone()).unwrap();
    let mut clients = Vec::new();
    let mut adverts = Vec::new();
    for &node in &config.cohort {
        let (client, advert) = ClientRound::new(config.clone(), node, &mut rng).unwrap();
        clients.push(client);
        adverts.push(advert);
    }

    // Advertisements: another round, a wrong stage number, a stranger, a duplicate.
    let foreign = AdvertiseKeys {
        round: RoundId(10),
        ..adverts[0].clone()
    };
    assert_eq!(
        server.receive_advertisement(&foreign),
        Err(SecAggError::WrongRound {
            expected: 11,
            got: 10
        })
    );
    let restaged = AdvertiseKeys {
        stage: 2,
        ..adverts[0].clone()
    };
    assert_eq!(
        server.receive_advertisement(&restaged),
        Err(SecAggError::WrongStage {
            expected: 0,
            got: 2
        })
    );
    let stranger = AdvertiseKeys {
        node: NodeId(5),
        ..adverts[0].clone()
    };
    assert!(matches!(
        server.receive_advertisement(&stranger),
        Err(SecAggError::NotAParticipant { .. })
    ));
    let early = MaskedInput {
        round: RoundId(11),
        stage: 2,
        node: config.cohort[0],
        masked: vec![0; 8],
    };
    assert!(matches!(
        server.receive_masked_input(&early),
        Err(SecAggError::OutOfOrder { .. })
    ));
    for advert in &adverts {
        server.receive_advertisement(advert).unwrap();
    }
    assert!(matches!(
        server.receive_advertisement(&adverts[1]),
        Err(SecAggError::Duplicate { .. })
    ));

    // Key directory: replayed to a node, or from another round.
    let directory = server.close_advertisements().unwrap();
    assert!(matches!(
        server.receive_advertisement(&adverts[1]),
        Err(SecAggError::OutOfOrder { .. })
    ));
    let mut old = directory.clone();
    old.round = RoundId(3);
    assert!(matches!(
        clients[0].share_keys(&old, &mut rng),
        Err(SecAggError::WrongRound { .. })
    ));
    let mut shares = Vec::new();
    for client in &mut clients {
        shares.push(client.share_keys(&directory, &mut rng).unwrap());
    }
    assert!(matches!(
        clients[0].share_keys(&directory, &mut rng),
        Err(SecAggError::OutOfOrder { .. })
    ));
    for message in &shares {
        server.receive_shares(message.clone()).unwrap();
    }
    assert!(matches!(
        server.receive_shares(shares[0].clone()),
        Err(SecAggError::Duplicate { .. })
    ));

    // Inboxes: delivered to the wrong node, replayed.
    let inboxes = server.close_shares().unwrap();
    let input = vec![5; 8];
    assert!(matches!(
        clients[0].masked_input(&inboxes[1], &input),
        Err(SecAggError::WrongRecipient { .. })
    ));
    let mut masked = Vec::new();
    for (client, inbox) in clients.iter_mut().zip(&inboxes) {
        masked.push(client.masked_input(inbox, &input).unwrap());
    }
    assert!(matches!(
        clients[0].masked_input(&inboxes[0], &input),
        Err(SecAggError::OutOfOrder { .. })
    ));
    server.receive_masked_input(&masked[0]).unwrap();
    assert!(matches!(
        server.receive_masked_input(&masked[0]),
        Err(SecAggError::Duplicate { .. })
    ));
    server.receive_masked_input(&masked[1]).unwrap();

    // Node 3's input comes after the stage closed: refused, and it counts as dropped.
    let requests = server.close_masked_inputs().unwrap();
    assert!(matches!(
        server.receive_masked_input(&masked[2]),
        Err(SecAggError::OutOfOrder { .. })
    ));
    for request in &requests {
        let client = clients
            .iter_mut()
            .find(|c| c.node() == request.recipient)
            .unwrap();
        let response = client.unmask(request).unwrap();
        assert!(matches!(
            client.unmask(request),
            Err(SecAggError::OutOfOrder { .. })
        ));
        server.receive_unmask_response(&response).unwrap();
        assert!(matches!(
            server.receive_unmask_response(&response),
            Err(SecAggError::Duplicate { .. })
        ));
    }
    let sum = server.finish().unwrap();
    assert_eq!(sum.contributors, config.cohort[..2]);
    assert_eq!(sum.sum, vec![10; 8]);
    assert!(matches!(
        server.finish(),
        Err(SecAggError::OutOfOrder { .. })
    ));
}
