//! No input makes a secure-aggregation handler panic, and a refused message leaves the round
//! able to finish with the right sum.
//!
//! Messages are generated near the valid ones (the real round id, stage numbers, cohort
//! members, plausible lengths, mixed with arbitrary values) so that the checks deep inside
//! the handlers are reached, not only the first one.

use athanor_core::secagg::client::{BUNDLE_LEN, decode_bundle_shares};
use athanor_core::secagg::keys::{open_share, parse_public_key};
use athanor_core::secagg::messages::{
    AdvertiseKeys, EncryptedShare, KeyDirectory, MaskedInput, NodeKeys, RevealedShare, ShareInbox,
    ShareKeys, UnmaskRequest, UnmaskResponse,
};
use athanor_core::secagg::quantize::{DistributedNoise, QuantizationConfig, Quantizer};
use athanor_core::secagg::shamir::{self, SHARE_LEN, Share};
use athanor_core::secagg::{ClientRound, NodeId, RoundId, SecAggConfig, ServerRound};
use proptest::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

const ROUND: u64 = 77;
const LEN: usize = 6;

fn config() -> SecAggConfig {
    SecAggConfig {
        round: RoundId(ROUND),
        cohort: vec![NodeId(1), NodeId(2), NodeId(3)],
        vector_len: LEN,
        ring_bits: 16,
        complete_graph_max: 10,
        degree: 2,
        threshold_percent: 60,
        min_survivors: 2,
    }
}

/// A three-node round advanced one step at a time; after `step` k the state is:
/// 1 adverts in, 2 directory out, 3 shares in, 4 inboxes out, 5 inputs in, 6 requests out,
/// 7 responses in.
struct Fixture {
    rng: ChaCha20Rng,
    server: ServerRound,
    clients: Vec<ClientRound>,
    directory: Option<KeyDirectory>,
    inboxes: Vec<ShareInbox>,
    requests: Vec<UnmaskRequest>,
    step: u32,
}

impl Fixture {
    fn at(step: u32) -> Fixture {
        let config = config();
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        let mut server = ServerRound::new(config.clone()).unwrap();
        let mut clients = Vec::new();
        for &node in &config.cohort {
            let (client, advert) = ClientRound::new(config.clone(), node, &mut rng).unwrap();
            server.receive_advertisement(&advert).unwrap();
            clients.push(client);
        }
        let mut fixture = Fixture {
            rng,
            server,
            clients,
            directory: None,
            inboxes: Vec::new(),
            requests: Vec::new(),
            step: 1,
        };
        while fixture.step < step {
            fixture.advance();
        }
        fixture
    }

    fn advance(&mut self) {
        match self.step {
            1 => self.directory = Some(self.server.close_advertisements().unwrap()),
            2 => {
                let directory = self.directory.as_ref().unwrap();
                for client in &mut self.clients {
                    let shares = client.share_keys(directory, &mut self.rng).unwrap();
                    self.server.receive_shares(shares).unwrap();
                }
            }
            3 => self.inboxes = self.server.close_shares().unwrap(),
            4 => {
                for (i, (client, inbox)) in self.clients.iter_mut().zip(&self.inboxes).enumerate() {
                    let masked = client.masked_input(inbox, &[i as u32 + 1; LEN]).unwrap();
                    self.server.receive_masked_input(&masked).unwrap();
                }
            }
            5 => self.requests = self.server.close_masked_inputs().unwrap(),
            6 => {
                for (client, request) in self.clients.iter_mut().zip(&self.requests) {
                    let response = client.unmask(request).unwrap();
                    self.server.receive_unmask_response(&response).unwrap();
                }
            }
            _ => panic!("no step after 7"),
        }
        self.step += 1;
    }

    /// Finishes the round and checks the sum of the inputs 1, 2 and 3.
    fn finish_correctly(mut self) {
        while self.step < 7 {
            self.advance();
        }
        assert_eq!(self.server.finish().unwrap().sum, vec![6; LEN]);
    }
}

fn round_id() -> impl Strategy<Value = RoundId> {
    prop_oneof![6 => Just(RoundId(ROUND)), 1 => any::<u64>().prop_map(RoundId)]
}

/// Mostly the stage the message type belongs to.
fn stage(own: u32) -> impl Strategy<Value = u32> {
    prop_oneof![6 => Just(own), 1 => 0_u32..4, 1 => any::<u32>()]
}

fn node() -> impl Strategy<Value = NodeId> {
    prop_oneof![4 => (1_u64..=3).prop_map(NodeId), 1 => any::<u64>().prop_map(NodeId)]
}

fn bytes(typical: usize) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        2 => prop::collection::vec(any::<u8>(), typical),
        1 => prop::collection::vec(any::<u8>(), 0..typical + 8),
    ]
}

fn encrypted_share() -> impl Strategy<Value = EncryptedShare> {
    (node(), node(), bytes(BUNDLE_LEN + 16)).prop_map(|(sender, recipient, ciphertext)| {
        EncryptedShare {
            sender,
            recipient,
            ciphertext,
        }
    })
}

fn revealed_share() -> impl Strategy<Value = RevealedShare> {
    (node(), bytes(SHARE_LEN)).prop_map(|(owner, share)| RevealedShare { owner, share })
}

fn ring_vector() -> impl Strategy<Value = Vec<u32>> {
    prop_oneof![
        2 => prop::collection::vec(0_u32..1 << 16, LEN),
        1 => prop::collection::vec(any::<u32>(), 0..LEN + 3),
    ]
}

fn node_list() -> impl Strategy<Value = Vec<NodeId>> {
    prop::collection::vec(node(), 0..5)
}

/// Any of the eight message types.
#[derive(Debug, Clone)]
enum Message {
    Advertise(AdvertiseKeys),
    Directory(KeyDirectory),
    Shares(ShareKeys),
    Inbox(ShareInbox),
    Masked(MaskedInput),
    Request(UnmaskRequest),
    Response(UnmaskResponse),
}

fn message() -> impl Strategy<Value = Message> {
    let keys = (node(), bytes(32), bytes(32)).prop_map(|(node, c, m)| NodeKeys {
        node,
        cipher_public_key: c,
        mask_public_key: m,
    });
    prop_oneof![
        (round_id(), stage(0), node(), bytes(32), bytes(32)).prop_map(
            |(round, stage, node, c, m)| {
                Message::Advertise(AdvertiseKeys {
                    round,
                    stage,
                    node,
                    cipher_public_key: c,
                    mask_public_key: m,
                })
            }
        ),
        (round_id(), stage(1), prop::collection::vec(keys, 0..5)).prop_map(
            |(round, stage, nodes)| Message::Directory(KeyDirectory {
                round,
                stage,
                nodes
            })
        ),
        (
            round_id(),
            stage(1),
            node(),
            bytes(32),
            prop::collection::vec(encrypted_share(), 0..4)
        )
            .prop_map(|(round, stage, node, commitment, shares)| {
                Message::Shares(ShareKeys {
                    round,
                    stage,
                    node,
                    self_mask_commitment: commitment,
                    shares,
                })
            }),
        (
            round_id(),
            stage(2),
            node(),
            prop::collection::vec(encrypted_share(), 0..4)
        )
            .prop_map(|(round, stage, recipient, shares)| {
                Message::Inbox(ShareInbox {
                    round,
                    stage,
                    recipient,
                    shares,
                })
            }),
        (round_id(), stage(2), node(), ring_vector()).prop_map(|(round, stage, node, masked)| {
            Message::Masked(MaskedInput {
                round,
                stage,
                node,
                masked,
            })
        }),
        (round_id(), stage(3), node(), node_list(), node_list()).prop_map(
            |(round, stage, recipient, alive, dropped)| {
                Message::Request(UnmaskRequest {
                    round,
                    stage,
                    recipient,
                    alive,
                    dropped,
                })
            }
        ),
        (
            round_id(),
            stage(3),
            node(),
            prop::collection::vec(revealed_share(), 0..4),
            prop::collection::vec(revealed_share(), 0..4)
        )
            .prop_map(|(round, stage, node, self_mask_shares, mask_key_shares)| {
                Message::Response(UnmaskResponse {
                    round,
                    stage,
                    node,
                    self_mask_shares,
                    mask_key_shares,
                })
            }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn server_refuses_any_stray_message_and_still_finishes(step in prop::sample::select(vec![1_u32, 3, 5, 7]), message in message()) {
        // At these steps every node has already sent the stage's message, so nothing more can
        // be accepted.
        let mut fixture = Fixture::at(step);
        let server = &mut fixture.server;
        let outcome = match message {
            Message::Advertise(m) => server.receive_advertisement(&m).map(drop),
            Message::Shares(m) => server.receive_shares(m).map(drop),
            Message::Masked(m) => server.receive_masked_input(&m).map(drop),
            Message::Response(m) => server.receive_unmask_response(&m).map(drop),
            _ => Err(athanor_core::secagg::SecAggError::Malformed { what: "test", problem: "not for the server" }),
        };
        prop_assert!(outcome.is_err());
        fixture.finish_correctly();
    }

    #[test]
    fn node_survives_any_message_and_still_finishes(step in prop::sample::select(vec![2_u32, 4, 6]), message in message(), input in ring_vector()) {
        let mut fixture = Fixture::at(step);
        let (client, rng) = (&mut fixture.clients[0], &mut fixture.rng);
        let outcome = match &message {
            Message::Directory(m) => client.share_keys(m, rng).map(drop),
            Message::Inbox(m) => client.masked_input(m, &input).map(drop),
            Message::Request(m) => client.unmask(m).map(drop),
            _ => return Ok(()),
        };
        // Only a request could be valid (it names just node ids); anything else is refused and
        // must leave the node able to go on.
        if outcome.is_err() {
            fixture.finish_correctly();
        } else {
            prop_assert!(matches!(message, Message::Request(_)));
        }
    }

    #[test]
    fn node_survives_edits_of_the_genuine_messages(step in prop::sample::select(vec![2_u32, 4, 6]), edits in prop::collection::vec((0_usize..6, any::<usize>(), node(), bytes(32)), 1..4)) {
        // Edits of the real message reach the checks after the header and sender checks.
        let mut fixture = Fixture::at(step);
        let (client, rng) = (&mut fixture.clients[0], &mut fixture.rng);
        let outcome = match step {
            2 => {
                let mut directory = fixture.directory.clone().unwrap();
                for (kind, at, node, bytes) in &edits {
                    let i = at % directory.nodes.len().max(1);
                    match (kind, directory.nodes.get_mut(i)) {
                        (0, Some(entry)) => entry.cipher_public_key = bytes.clone(),
                        (1, Some(entry)) => entry.mask_public_key = bytes.clone(),
                        (2, Some(entry)) => entry.node = *node,
                        (3, Some(_)) => drop(directory.nodes.remove(i)),
                        (4, Some(entry)) => {
                            let copy = entry.clone();
                            directory.nodes.insert(i, copy);
                        }
                        _ => directory.nodes.reverse(),
                    }
                }
                client.share_keys(&directory, rng).map(drop)
            }
            4 => {
                let mut inbox = fixture.inboxes[0].clone();
                for (kind, at, node, bytes) in &edits {
                    let i = at % inbox.shares.len().max(1);
                    match (kind, inbox.shares.get_mut(i)) {
                        (0, Some(share)) => {
                            let j = at % share.ciphertext.len().max(1);
                            if let Some(byte) = share.ciphertext.get_mut(j) {
                                *byte ^= 1 << (at % 8);
                            }
                        }
                        (1, Some(share)) => share.sender = *node,
                        (2, Some(share)) => share.recipient = *node,
                        (3, Some(share)) => share.ciphertext = bytes.clone(),
                        (4, Some(share)) => {
                            let copy = share.clone();
                            inbox.shares.push(copy);
                        }
                        _ => inbox.shares.truncate(i),
                    }
                }
                client.masked_input(&inbox, &[1; LEN]).map(drop)
            }
            _ => {
                let mut request = fixture.requests[0].clone();
                for (kind, at, node, _) in &edits {
                    let alive = at % request.alive.len().max(1);
                    match kind {
                        0 if alive < request.alive.len() => {
                            let moved = request.alive.remove(alive);
                            request.dropped.push(moved);
                        }
                        1 => request.alive.push(*node),
                        2 => request.dropped.push(*node),
                        3 => request.alive.retain(|n| n != node),
                        4 => request.dropped.clear(),
                        _ => request.alive.reverse(),
                    }
                }
                client.unmask(&request).map(drop)
            }
        };
        if outcome.is_err() {
            fixture.finish_correctly();
        }
    }

    #[test]
    fn decoders_never_panic(data in prop::collection::vec(any::<u8>(), 0..200), owner in any::<u64>(), holder in any::<u64>(), key in any::<[u8; 32]>()) {
        let _ = Share::from_bytes(&data, NodeId(owner));
        let _ = decode_bundle_shares(&data, NodeId(owner), NodeId(holder));
        let _ = parse_public_key(&data, NodeId(owner));
        let _ = open_share(&key, &data[..data.len().min(24)], &data, NodeId(owner), NodeId(holder));
    }

    #[test]
    fn combining_arbitrary_shares_never_panics(raw in prop::collection::vec(prop::collection::vec(any::<u8>(), SHARE_LEN), 0..6), threshold in 0_usize..8) {
        let shares: Vec<Share> = raw.iter().filter_map(|b| Share::from_bytes(b, NodeId(1)).ok()).collect();
        let _ = shamir::combine(&shares, threshold, |_| true);
    }

    #[test]
    fn quantizer_never_panics(update in prop::collection::vec(any::<f32>(), 0..20), sum in prop::collection::vec(any::<u32>(), 0..20), bits in 1_u32..=32) {
        let config = QuantizationConfig {
            dimension: 8,
            clip_norm: 1.0,
            granularity: 1.0 / 16.0,
            rotation_seed: Some([1; 32]),
            noise: DistributedNoise::Gaussian { sum_std: 1.0, min_survivors: 2 },
            max_contributors: 2,
            ring_bits: bits,
            tail_bits: 20,
        };
        if let Ok(quantizer) = Quantizer::new(config) {
            let mut rng = ChaCha20Rng::seed_from_u64(1);
            let _ = quantizer.encode(&update, &mut rng);
            let _ = quantizer.decode_sum(&sum);
        }
    }

    #[test]
    fn masked_sum_equals_plain_sum(inputs in prop::collection::vec(prop::collection::vec(any::<u32>(), LEN), 3), bits in 1_u32..=32, dropped in 0_usize..4, seed in any::<u64>()) {
        // Node `dropped` (if below 3) sends shares but no input.
        let mask = u32::MAX >> (32 - bits);
        let config = SecAggConfig { ring_bits: bits, ..config() };
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
            server.receive_shares(client.share_keys(&directory, &mut rng).unwrap()).unwrap();
        }
        let inboxes = server.close_shares().unwrap();
        let mut expected = vec![0_u32; LEN];
        for (i, (client, inbox)) in clients.iter_mut().zip(&inboxes).enumerate() {
            if i == dropped {
                continue;
            }
            let input: Vec<u32> = inputs[i].iter().map(|v| v & mask).collect();
            for (e, v) in expected.iter_mut().zip(&input) {
                *e = e.wrapping_add(*v) & mask;
            }
            server.receive_masked_input(&client.masked_input(inbox, &input).unwrap()).unwrap();
        }
        for request in server.close_masked_inputs().unwrap() {
            let client = clients.iter_mut().find(|c| c.node() == request.recipient).unwrap();
            server.receive_unmask_response(&client.unmask(&request).unwrap()).unwrap();
        }
        prop_assert_eq!(server.finish().unwrap().sum, expected, "seed {}", seed);
    }
}
