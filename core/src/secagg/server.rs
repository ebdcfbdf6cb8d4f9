//! The coordinator's side of a round, as a state machine fed with the nodes' messages.
//!
//! ```text
//! receive_advertisement* ─ close_advertisements ─▶ KeyDirectory (to all)
//! receive_shares*        ─ close_shares         ─▶ ShareInbox (one per node)
//! receive_masked_input*  ─ close_masked_inputs  ─▶ UnmaskRequest (one per survivor)
//! receive_unmask_response* ─ finish             ─▶ UnmaskedSum
//! ```
//!
//! The caller decides when a stage closes (all expected messages arrived, or its deadline
//! passed); whoever has not answered by then has dropped. With `U1 ⊇ U2 ⊇ U3` the nodes that
//! completed stages 0, 1 and 2:
//!
//! - a node's masks involve only its neighbours in `U2` (the ones that sent it shares);
//! - the survivors are `U3`; each survivor is asked for the self-mask shares of its alive
//!   neighbours (and itself) and the mask-key shares of its neighbours in `U2 \ U3`;
//! - the sum is `sum_{U3} y_i - sum_{U3} PRG(b_i)`, corrected by the pairwise masks that
//!   survivors shared with dropped nodes.
//!
//! A refused message leaves the state unchanged. A close that finds too few nodes, or a
//! finish that finds too few shares, abandons the round for good before anything more is
//! revealed: no unmask request is sent unless every needed secret has `t` live holders.

use std::collections::{BTreeMap, BTreeSet};

use x25519_dalek::{PublicKey, StaticSecret};

use super::client::BUNDLE_CIPHERTEXT_LEN;
use super::config::SecAggConfig;
use super::graph::NeighbourGraph;
use super::keys;
use super::mask::{MaskStreams, Sign};
use super::messages::{
    AdvertiseKeys, EncryptedShare, KeyDirectory, MaskedInput, NodeId, NodeKeys, ShareInbox,
    ShareKeys, Stage, UnmaskRequest, UnmaskResponse, check_header,
};
use super::ring::Ring;
use super::shamir::{self, Secret, Share};
use super::{AbandonReason, SecAggError};

/// The outcome of a round: the sum of the survivors' inputs in the ring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnmaskedSum {
    /// Nodes whose inputs are in the sum, in increasing order.
    pub contributors: Vec<NodeId>,
    /// `sum of inputs mod 2^b`, element-wise.
    pub sum: Vec<u32>,
}

/// The coordinator's state in one round.
pub struct ServerRound {
    config: SecAggConfig,
    ring: Ring,
    state: State,
}

impl std::fmt::Debug for ServerRound {
    // The state holds ciphertexts, shares and vectors: too large, and not for logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerRound")
            .field("round", &self.config.round)
            .field("state", &self.state.name())
            .finish_non_exhaustive()
    }
}

enum State {
    Advertising {
        keys: BTreeMap<NodeId, NodeKeys>,
    },
    Sharing {
        ctx: Context,
        received: BTreeMap<NodeId, ShareKeys>,
    },
    Collecting {
        ctx: Context,
        sharers: BTreeSet<NodeId>,
        sum: Vec<u32>,
        inputs: BTreeSet<NodeId>,
    },
    Unmasking(Box<Unmasking>),
    Finished,
    Abandoned,
}

/// What stays known from the key directory on.
struct Context {
    directory: Vec<NodeKeys>,
    graph: NeighbourGraph,
    /// Self-mask commitments of the nodes that sent shares.
    commitments: BTreeMap<NodeId, [u8; 32]>,
}

struct Unmasking {
    ctx: Context,
    sum: Vec<u32>,
    alive: BTreeSet<NodeId>,
    /// Dropped nodes whose mask keys are needed (they have an alive neighbour).
    dropped: BTreeSet<NodeId>,
    requests: BTreeMap<NodeId, UnmaskRequest>,
    answered: BTreeSet<NodeId>,
    self_mask_shares: BTreeMap<NodeId, Vec<Share>>,
    mask_key_shares: BTreeMap<NodeId, Vec<Share>>,
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            State::Advertising { .. } => "advertise-keys",
            State::Sharing { .. } => "share-keys",
            State::Collecting { .. } => "masked-input",
            State::Unmasking(_) => "unmasking",
            State::Finished => "finished",
            State::Abandoned => "abandoned",
        }
    }
}

impl ServerRound {
    /// Opens a round, waiting for advertisements.
    ///
    /// # Errors
    /// [`SecAggError::InvalidConfig`] if the configuration is invalid.
    pub fn new(config: SecAggConfig) -> Result<ServerRound, SecAggError> {
        config.validate()?;
        Ok(ServerRound {
            ring: config.ring()?,
            config,
            state: State::Advertising {
                keys: BTreeMap::new(),
            },
        })
    }

    /// The stage whose replies are being collected, or `None` once finished or abandoned.
    pub fn stage(&self) -> Option<Stage> {
        match self.state {
            State::Advertising { .. } => Some(Stage::AdvertiseKeys),
            State::Sharing { .. } => Some(Stage::ShareKeys),
            State::Collecting { .. } => Some(Stage::MaskedInput),
            State::Unmasking(_) => Some(Stage::Unmasking),
            State::Finished | State::Abandoned => None,
        }
    }

    /// Stage 0: records an invited node's public keys.
    ///
    /// # Errors
    /// [`SecAggError::OutOfOrder`] after the stage closed; [`SecAggError::WrongRound`],
    /// [`SecAggError::WrongStage`] for a foreign message; [`SecAggError::NotAParticipant`] for
    /// an uninvited node; [`SecAggError::Duplicate`]; [`SecAggError::BadLength`] or
    /// [`SecAggError::NonContributoryKey`] for an unusable key.
    pub fn receive_advertisement(&mut self, message: &AdvertiseKeys) -> Result<(), SecAggError> {
        let name = self.state.name();
        let State::Advertising { keys } = &mut self.state else {
            return Err(SecAggError::OutOfOrder {
                state: name,
                got: Stage::AdvertiseKeys,
            });
        };
        check_header(
            message.round,
            message.stage,
            self.config.round,
            Stage::AdvertiseKeys,
        )?;
        let node = message.node;
        if !self.config.contains(node) {
            return Err(SecAggError::NotAParticipant {
                node,
                stage: Stage::AdvertiseKeys,
            });
        }
        if keys.contains_key(&node) {
            return Err(SecAggError::Duplicate {
                node,
                stage: Stage::AdvertiseKeys,
            });
        }
        keys::parse_public_key(&message.cipher_public_key, node)?;
        keys::parse_public_key(&message.mask_public_key, node)?;

        keys.insert(
            node,
            NodeKeys {
                node,
                cipher_public_key: message.cipher_public_key.clone(),
                mask_public_key: message.mask_public_key.clone(),
            },
        );
        Ok(())
    }

    /// Closes stage 0: the directory of every advertised key, to send to each of those nodes.
    ///
    /// # Errors
    /// [`SecAggError::Abandoned`] if fewer than `min_survivors` nodes advertised (or the round
    /// was abandoned before); [`SecAggError::OutOfOrder`] if the stage already closed.
    pub fn close_advertisements(&mut self) -> Result<KeyDirectory, SecAggError> {
        let State::Advertising { keys } = &mut self.state else {
            return Err(self.closing_error(Stage::AdvertiseKeys));
        };
        let directory: Vec<NodeKeys> = std::mem::take(keys).into_values().collect();
        self.require(Stage::AdvertiseKeys, directory.len())?;

        let graph = NeighbourGraph::build(&self.config, &directory);
        let message = KeyDirectory {
            round: self.config.round,
            stage: Stage::ShareKeys.number(),
            nodes: directory.clone(),
        };
        let ctx = Context {
            directory,
            graph,
            commitments: BTreeMap::new(),
        };
        self.state = State::Sharing {
            ctx,
            received: BTreeMap::new(),
        };
        Ok(message)
    }

    /// Stage 1: records a node's encrypted bundles, which must be one per neighbour.
    ///
    /// # Errors
    /// [`SecAggError::OutOfOrder`] outside the stage; [`SecAggError::WrongRound`],
    /// [`SecAggError::WrongStage`] for a foreign message; [`SecAggError::NotAParticipant`] if
    /// the node did not advertise; [`SecAggError::Duplicate`]; [`SecAggError::Malformed`],
    /// [`SecAggError::NotANeighbour`] or [`SecAggError::BadLength`] for bad bundles.
    pub fn receive_shares(&mut self, message: ShareKeys) -> Result<(), SecAggError> {
        let name = self.state.name();
        let State::Sharing { ctx, received } = &mut self.state else {
            return Err(SecAggError::OutOfOrder {
                state: name,
                got: Stage::ShareKeys,
            });
        };
        check_header(
            message.round,
            message.stage,
            self.config.round,
            Stage::ShareKeys,
        )?;
        let node = message.node;
        let Some(index) = ctx.graph.index_of(node) else {
            return Err(SecAggError::NotAParticipant {
                node,
                stage: Stage::ShareKeys,
            });
        };
        if received.contains_key(&node) {
            return Err(SecAggError::Duplicate {
                node,
                stage: Stage::ShareKeys,
            });
        }
        let commitment: [u8; 32] =
            message
                .self_mask_commitment
                .as_slice()
                .try_into()
                .map_err(|_| SecAggError::BadLength {
                    what: "self-mask commitment",
                    expected: 32,
                    got: message.self_mask_commitment.len(),
                })?;
        check_bundles(&ctx.graph, index, &message)?;

        ctx.commitments.insert(node, commitment);
        received.insert(node, message);
        Ok(())
    }

    /// Closes stage 1: one inbox per node that sent shares, holding the bundles addressed to it
    /// by other such nodes.
    ///
    /// # Errors
    /// [`SecAggError::Abandoned`] if fewer than `min_survivors` nodes sent shares, or some
    /// node's shares reached fewer than `t` holders that are still in the round;
    /// [`SecAggError::OutOfOrder`] outside the stage.
    pub fn close_shares(&mut self) -> Result<Vec<ShareInbox>, SecAggError> {
        if !matches!(self.state, State::Sharing { .. }) {
            return Err(self.closing_error(Stage::ShareKeys));
        }
        let State::Sharing { ctx, received } = std::mem::replace(&mut self.state, State::Abandoned)
        else {
            unreachable!("the state was matched just above");
        };
        self.require(Stage::ShareKeys, received.len())?;
        let sharers: BTreeSet<NodeId> = received.keys().copied().collect();
        check_holders(&ctx.graph, &sharers, &sharers)?;

        let mut inboxes: BTreeMap<NodeId, Vec<EncryptedShare>> =
            sharers.iter().map(|&n| (n, Vec::new())).collect();
        for message in received.into_values() {
            for bundle in message.shares {
                if let Some(inbox) = inboxes.get_mut(&bundle.recipient) {
                    inbox.push(bundle);
                }
            }
        }
        let inboxes = inboxes
            .into_iter()
            .map(|(recipient, shares)| ShareInbox {
                round: self.config.round,
                stage: Stage::MaskedInput.number(),
                recipient,
                shares,
            })
            .collect();

        self.state = State::Collecting {
            ctx,
            sharers,
            sum: vec![0; self.config.vector_len],
            inputs: BTreeSet::new(),
        };
        Ok(inboxes)
    }

    /// Stage 2: adds a node's masked input to the running sum.
    ///
    /// # Errors
    /// [`SecAggError::OutOfOrder`] outside the stage (a late input after the stage closed
    /// included); [`SecAggError::WrongRound`], [`SecAggError::WrongStage`] for a foreign
    /// message; [`SecAggError::NotAParticipant`] if the node sent no shares;
    /// [`SecAggError::Duplicate`]; [`SecAggError::BadLength`] or [`SecAggError::OutsideRing`]
    /// for a bad vector (the sum is then unchanged).
    pub fn receive_masked_input(&mut self, message: &MaskedInput) -> Result<(), SecAggError> {
        let name = self.state.name();
        let State::Collecting {
            sharers,
            sum,
            inputs,
            ..
        } = &mut self.state
        else {
            return Err(SecAggError::OutOfOrder {
                state: name,
                got: Stage::MaskedInput,
            });
        };
        check_header(
            message.round,
            message.stage,
            self.config.round,
            Stage::MaskedInput,
        )?;
        let node = message.node;
        if !sharers.contains(&node) {
            return Err(SecAggError::NotAParticipant {
                node,
                stage: Stage::MaskedInput,
            });
        }
        if inputs.contains(&node) {
            return Err(SecAggError::Duplicate {
                node,
                stage: Stage::MaskedInput,
            });
        }

        self.ring.accumulate(sum, &message.masked)?;
        inputs.insert(node);
        Ok(())
    }

    /// Closes stage 2: decides the survivors and builds one unmask request per survivor.
    ///
    /// # Errors
    /// [`SecAggError::Abandoned`] if fewer than `min_survivors` inputs arrived or some needed
    /// secret has fewer than `t` surviving holders; [`SecAggError::OutOfOrder`] outside the
    /// stage.
    pub fn close_masked_inputs(&mut self) -> Result<Vec<UnmaskRequest>, SecAggError> {
        if !matches!(self.state, State::Collecting { .. }) {
            return Err(self.closing_error(Stage::MaskedInput));
        }
        let State::Collecting {
            ctx,
            sharers,
            sum,
            inputs: alive,
        } = std::mem::replace(&mut self.state, State::Abandoned)
        else {
            unreachable!("the state was matched just above");
        };
        self.require(Stage::MaskedInput, alive.len())?;
        check_holders(&ctx.graph, &sharers, &alive)?;

        // Each survivor holds shares of its neighbours in U2 and of itself.
        let graph = &ctx.graph;
        let mut dropped = BTreeSet::new();
        let mut requests = BTreeMap::new();
        for &node in &alive {
            let index = graph.index_of(node).expect("survivors are in the graph");
            let neighbours = graph.neighbours(index).iter().map(|&j| graph.nodes()[j]);
            let held: Vec<NodeId> = neighbours.filter(|n| sharers.contains(n)).collect();
            let (mut named_alive, named_dropped): (Vec<NodeId>, Vec<NodeId>) =
                held.into_iter().partition(|n| alive.contains(n));
            named_alive.push(node);
            named_alive.sort_unstable();
            dropped.extend(named_dropped.iter().copied());
            requests.insert(
                node,
                UnmaskRequest {
                    round: self.config.round,
                    stage: Stage::Unmasking.number(),
                    recipient: node,
                    alive: named_alive,
                    dropped: named_dropped,
                },
            );
        }

        let messages = requests.values().cloned().collect();
        self.state = State::Unmasking(Box::new(Unmasking {
            ctx,
            sum,
            alive,
            dropped,
            requests,
            answered: BTreeSet::new(),
            self_mask_shares: BTreeMap::new(),
            mask_key_shares: BTreeMap::new(),
        }));
        Ok(messages)
    }

    /// Stage 3: records a survivor's revealed shares, which must answer its request exactly.
    ///
    /// # Errors
    /// [`SecAggError::OutOfOrder`] outside the stage; [`SecAggError::WrongRound`],
    /// [`SecAggError::WrongStage`] for a foreign message; [`SecAggError::NotAParticipant`] if
    /// the node was not asked; [`SecAggError::Duplicate`]; [`SecAggError::Malformed`] if the
    /// owners differ from those requested; [`SecAggError::InvalidShare`] for a share that does
    /// not decode or is not at the sender's evaluation point.
    pub fn receive_unmask_response(&mut self, message: &UnmaskResponse) -> Result<(), SecAggError> {
        let name = self.state.name();
        let State::Unmasking(unmasking) = &mut self.state else {
            return Err(SecAggError::OutOfOrder {
                state: name,
                got: Stage::Unmasking,
            });
        };
        check_header(
            message.round,
            message.stage,
            self.config.round,
            Stage::Unmasking,
        )?;
        let node = message.node;
        let Some(request) = unmasking.requests.get(&node) else {
            return Err(SecAggError::NotAParticipant {
                node,
                stage: Stage::Unmasking,
            });
        };
        if unmasking.answered.contains(&node) {
            return Err(SecAggError::Duplicate {
                node,
                stage: Stage::Unmasking,
            });
        }

        // Decode everything before storing anything.
        let graph = &unmasking.ctx.graph;
        let point = NeighbourGraph::share_point(
            graph
                .index_of(node)
                .expect("requested nodes are in the graph"),
        );
        let self_mask = decode_revealed(&message.self_mask_shares, &request.alive, point)?;
        let mask_key = decode_revealed(&message.mask_key_shares, &request.dropped, point)?;

        for (owner, share) in self_mask {
            unmasking
                .self_mask_shares
                .entry(owner)
                .or_default()
                .push(share);
        }
        for (owner, share) in mask_key {
            unmasking
                .mask_key_shares
                .entry(owner)
                .or_default()
                .push(share);
        }
        unmasking.answered.insert(node);
        Ok(())
    }

    /// Ends the round: reconstructs the survivors' self-mask seeds and the dropped nodes'
    /// mask keys from the shares received, removes every mask, and returns the sum.
    ///
    /// # Errors
    /// [`SecAggError::Abandoned`] if a needed secret has fewer than `t` shares or does not
    /// reconstruct to its check value; [`SecAggError::OutOfOrder`] outside the stage.
    pub fn finish(&mut self) -> Result<UnmaskedSum, SecAggError> {
        if !matches!(self.state, State::Unmasking(_)) {
            return Err(self.closing_error(Stage::Unmasking));
        }
        let State::Unmasking(unmasking) = std::mem::replace(&mut self.state, State::Abandoned)
        else {
            unreachable!("the state was matched just above");
        };
        let Unmasking {
            ctx,
            mut sum,
            alive,
            dropped,
            self_mask_shares,
            mask_key_shares,
            ..
        } = *unmasking;
        let round = self.config.round;
        let threshold = ctx.graph.threshold();
        let mut streams = MaskStreams::default();

        // Self masks of the survivors, checked against their commitments.
        for &owner in &alive {
            let commitment = ctx.commitments[&owner];
            let seed = reconstruct(&self_mask_shares, owner, threshold, |s| {
                keys::self_mask_commitment(round, owner, s) == commitment
            })?;
            streams.push(seed.as_bytes(), Sign::Subtract);
        }

        // Pairwise masks between each dropped node and its surviving neighbours, checked
        // against the dropped node's advertised mask key.
        for &owner in &dropped {
            let index = ctx
                .graph
                .index_of(owner)
                .expect("dropped nodes are in the graph");
            let public = mask_public_key(&ctx.directory[index])?;
            let key = reconstruct(&mask_key_shares, owner, threshold, |s| {
                PublicKey::from(&StaticSecret::from(*s.as_bytes())) == public
            })?;
            let secret = StaticSecret::from(*key.as_bytes());
            for &j in ctx.graph.neighbours(index) {
                let peer = ctx.graph.nodes()[j];
                if !alive.contains(&peer) {
                    continue;
                }
                let peer_public = mask_public_key(&ctx.directory[j])?;
                let agreed = keys::agree(&secret, &peer_public, peer)?;
                let seed = keys::pairwise_mask_seed(&agreed, round, owner, peer);
                // The survivor added the stream if it had the smaller id: undo what it did.
                let sign = if peer < owner {
                    Sign::Subtract
                } else {
                    Sign::Add
                };
                streams.push(&seed, sign);
            }
        }

        streams.apply(&mut sum);
        self.ring.reduce(&mut sum);
        self.state = State::Finished;
        Ok(UnmaskedSum {
            contributors: alive.into_iter().collect(),
            sum,
        })
    }

    /// Abandons the round if fewer than `min_survivors` nodes completed `stage`.
    fn require(&mut self, stage: Stage, got: usize) -> Result<(), SecAggError> {
        if got < self.config.min_survivors {
            self.state = State::Abandoned;
            return Err(SecAggError::Abandoned(AbandonReason::TooFewNodes {
                stage,
                got,
                need: self.config.min_survivors,
            }));
        }
        Ok(())
    }

    fn closing_error(&self, stage: Stage) -> SecAggError {
        match self.state {
            State::Abandoned => SecAggError::Abandoned(AbandonReason::AlreadyAbandoned),
            _ => SecAggError::OutOfOrder {
                state: self.state.name(),
                got: stage,
            },
        }
    }
}

/// A node's bundles must go to each of its neighbours exactly once, sized as bundles are.
fn check_bundles(
    graph: &NeighbourGraph,
    index: usize,
    message: &ShareKeys,
) -> Result<(), SecAggError> {
    let node = message.node;
    let mut seen = BTreeSet::new();
    for bundle in &message.shares {
        if bundle.sender != node {
            return Err(SecAggError::Malformed {
                what: "share-keys message",
                problem: "a bundle's sender is not the message's sender",
            });
        }
        let peer = graph.index_of(bundle.recipient);
        if !peer.is_some_and(|p| graph.are_neighbours(index, p)) {
            return Err(SecAggError::NotANeighbour {
                node,
                peer: bundle.recipient,
            });
        }
        if !seen.insert(bundle.recipient) {
            return Err(SecAggError::Malformed {
                what: "share-keys message",
                problem: "two bundles for the same neighbour",
            });
        }
        if bundle.ciphertext.len() != BUNDLE_CIPHERTEXT_LEN {
            return Err(SecAggError::BadLength {
                what: "share bundle ciphertext",
                expected: BUNDLE_CIPHERTEXT_LEN,
                got: bundle.ciphertext.len(),
            });
        }
    }
    if seen.len() != graph.neighbours(index).len() {
        return Err(SecAggError::Malformed {
            what: "share-keys message",
            problem: "no bundle for some neighbour",
        });
    }
    Ok(())
}

/// Every node of `owners` must have at least `t` holders of its shares in `live` (itself,
/// if live, and its neighbours that received shares, i.e. are in `sharers`), counting only
/// owners whose secrets will be needed: live owners, and others with a live neighbour.
fn check_holders(
    graph: &NeighbourGraph,
    sharers: &BTreeSet<NodeId>,
    live: &BTreeSet<NodeId>,
) -> Result<(), SecAggError> {
    let threshold = graph.threshold();
    for &owner in sharers {
        let index = graph.index_of(owner).expect("sharers are in the graph");
        let live_neighbours = graph
            .neighbours(index)
            .iter()
            .filter(|&&j| live.contains(&graph.nodes()[j]))
            .count();
        let own_share = usize::from(live.contains(&owner));
        if own_share == 0 && live_neighbours == 0 {
            continue;
        }
        if live_neighbours + own_share < threshold {
            return Err(SecAggError::Abandoned(AbandonReason::TooFewHolders {
                node: owner,
                got: live_neighbours + own_share,
                need: threshold,
            }));
        }
    }
    Ok(())
}

/// Decodes revealed shares whose owners must be exactly `expected`, at evaluation `point`.
fn decode_revealed(
    revealed: &[super::messages::RevealedShare],
    expected: &[NodeId],
    point: u64,
) -> Result<Vec<(NodeId, Share)>, SecAggError> {
    let mut owners: Vec<NodeId> = revealed.iter().map(|r| r.owner).collect();
    owners.sort_unstable();
    if owners != expected {
        return Err(SecAggError::Malformed {
            what: "unmask response",
            problem: "the shares revealed are not those requested",
        });
    }
    revealed
        .iter()
        .map(|r| {
            let share = Share::from_bytes(&r.share, r.owner)?;
            if share.x() != point {
                return Err(SecAggError::InvalidShare {
                    owner: r.owner,
                    problem: "evaluation point is not the sender's",
                });
            }
            Ok((r.owner, share))
        })
        .collect()
}

/// Combines `owner`'s shares, abandoning the round if they are too few or do not verify.
fn reconstruct(
    shares: &BTreeMap<NodeId, Vec<Share>>,
    owner: NodeId,
    threshold: usize,
    verify: impl FnOnce(&Secret) -> bool,
) -> Result<Secret, SecAggError> {
    let shares = shares.get(&owner).map_or(&[][..], Vec::as_slice);
    if shares.len() < threshold {
        return Err(SecAggError::Abandoned(AbandonReason::TooFewShares {
            owner,
            got: shares.len(),
            need: threshold,
        }));
    }
    shamir::combine(shares, threshold, verify)
        .map_err(|_| SecAggError::Abandoned(AbandonReason::Reconstruction { owner }))
}

fn mask_public_key(keys: &NodeKeys) -> Result<PublicKey, SecAggError> {
    keys::parse_public_key(&keys.mask_public_key, keys.node)
}
