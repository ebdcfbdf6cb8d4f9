//! The node's side of a round, as a state machine driven by the coordinator's messages.
//!
//! ```text
//! ClientRound::new ──AdvertiseKeys──▶ share_keys(KeyDirectory) ──ShareKeys──▶
//!     masked_input(ShareInbox, input) ──MaskedInput──▶ unmask(UnmaskRequest) ──UnmaskResponse──▶ done
//! ```
//!
//! Each handler validates its message completely before changing any state, so a refused
//! message (from another round, a replay, out of order, malformed or tampered) leaves the
//! round where it was. Secrets are dropped, and so zeroized, as soon as the protocol no longer
//! needs them: the cipher key after the inbox is decrypted, the mask key and self-mask seed
//! once the input is masked, the held shares once they are revealed.

use std::collections::BTreeMap;
use std::fmt;

use rand::CryptoRng;
use x25519_dalek::PublicKey;
use zeroize::Zeroizing;

use super::config::SecAggConfig;
use super::graph::NeighbourGraph;
use super::keys::{self, KeyPair};
use super::mask::{MaskStreams, Sign};
use super::messages::{
    AdvertiseKeys, EncryptedShare, KeyDirectory, MaskedInput, NodeId, RevealedShare, ShareInbox,
    ShareKeys, Stage, UnmaskRequest, UnmaskResponse, check_header,
};
use super::ring::Ring;
use super::shamir::{self, SHARE_LEN, Secret, Share};
use super::{AbandonReason, SecAggError};

/// Bytes of a share bundle's plaintext: owner, holder, mask-key share, self-mask share.
pub const BUNDLE_LEN: usize = 16 + 2 * SHARE_LEN;

/// Bytes of a share bundle's ciphertext.
pub const BUNDLE_CIPHERTEXT_LEN: usize = BUNDLE_LEN + keys::TAG_LEN;

/// One node's state in one round.
pub struct ClientRound {
    config: SecAggConfig,
    ring: Ring,
    node: NodeId,
    state: State,
}

impl fmt::Debug for ClientRound {
    // The state holds private keys and shares.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientRound")
            .field("round", &self.config.round)
            .field("node", &self.node)
            .field("state", &self.state.name())
            .finish_non_exhaustive()
    }
}

enum State {
    /// Keys advertised; waiting for the key directory.
    Advertised { cipher: KeyPair, mask: KeyPair },
    /// Shares sent; waiting for the inbox.
    Shared(Box<Shared>),
    /// Input sent; waiting for the unmask request.
    Masked {
        /// Shares held, by owner, this node's own included.
        held: BTreeMap<NodeId, HeldShares>,
        /// Neighbours in the round's graph.
        neighbours: Vec<NodeId>,
        threshold: usize,
    },
    /// Shares revealed, or the round refused for good.
    Done,
}

struct Shared {
    cipher: KeyPair,
    mask: KeyPair,
    self_mask_seed: Secret,
    own_shares: HeldShares,
    /// This node's Shamir evaluation point.
    point: u64,
    /// Neighbours with their cipher and mask public keys.
    neighbours: BTreeMap<NodeId, (PublicKey, PublicKey)>,
    threshold: usize,
}

/// The two shares a holder keeps of one owner's secrets.
struct HeldShares {
    mask_key: Share,
    self_mask: Share,
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            State::Advertised { .. } => "awaiting the key directory",
            State::Shared(_) => "awaiting the share inbox",
            State::Masked { .. } => "awaiting the unmask request",
            State::Done => "done",
        }
    }
}

impl ClientRound {
    /// Starts `node`'s part in the round: draws fresh key pairs and returns the advertisement.
    ///
    /// # Errors
    /// [`SecAggError::InvalidConfig`] if the configuration is invalid or `node` is not in the
    /// cohort.
    pub fn new<R: CryptoRng + ?Sized>(
        config: SecAggConfig,
        node: NodeId,
        rng: &mut R,
    ) -> Result<(ClientRound, AdvertiseKeys), SecAggError> {
        config.validate()?;
        if !config.contains(node) {
            return Err(SecAggError::InvalidConfig {
                name: "cohort",
                expected: "a cohort that includes this node",
                got: format!("node {node} not invited"),
            });
        }

        let cipher = KeyPair::generate(rng);
        let mask = KeyPair::generate(rng);
        let advertisement = AdvertiseKeys {
            round: config.round,
            stage: Stage::AdvertiseKeys.number(),
            node,
            cipher_public_key: cipher.public.as_bytes().to_vec(),
            mask_public_key: mask.public.as_bytes().to_vec(),
        };
        let round = ClientRound {
            ring: config.ring()?,
            config,
            node,
            state: State::Advertised { cipher, mask },
        };
        Ok((round, advertisement))
    }

    /// This node.
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// The stage whose request the node is waiting for, or `None` once done.
    pub fn stage(&self) -> Option<Stage> {
        match self.state {
            State::Advertised { .. } => Some(Stage::ShareKeys),
            State::Shared(_) => Some(Stage::MaskedInput),
            State::Masked { .. } => Some(Stage::Unmasking),
            State::Done => None,
        }
    }

    /// Stage 1: derives the neighbour graph from the directory, splits this node's mask key and
    /// a fresh self-mask seed into shares, and encrypts one bundle to each neighbour.
    ///
    /// # Errors
    /// [`SecAggError::OutOfOrder`] unless keys were advertised and no directory handled yet;
    /// [`SecAggError::WrongRound`], [`SecAggError::WrongStage`] for a foreign message;
    /// [`SecAggError::Malformed`], [`SecAggError::NotAParticipant`],
    /// [`SecAggError::BadLength`] or [`SecAggError::NonContributoryKey`] for a bad directory;
    /// [`SecAggError::Abandoned`] if too few nodes advertised.
    pub fn share_keys<R: CryptoRng + ?Sized>(
        &mut self,
        directory: &KeyDirectory,
        rng: &mut R,
    ) -> Result<ShareKeys, SecAggError> {
        let State::Advertised { cipher, mask } = &self.state else {
            return Err(self.out_of_order(Stage::ShareKeys));
        };
        check_header(
            directory.round,
            directory.stage,
            self.config.round,
            Stage::ShareKeys,
        )?;
        self.check_directory(directory, cipher, mask)?;

        // Where this node sits in the graph, and its neighbours' keys.
        let graph = NeighbourGraph::build(&self.config, &directory.nodes);
        let own_index = graph
            .index_of(self.node)
            .ok_or(SecAggError::NotAParticipant {
                node: self.node,
                stage: Stage::ShareKeys,
            })?;
        let threshold = graph.threshold();
        let mut neighbours = BTreeMap::new();
        for &index in graph.neighbours(own_index) {
            let entry = &directory.nodes[index];
            let cipher_key = keys::parse_public_key(&entry.cipher_public_key, entry.node)?;
            let mask_key = keys::parse_public_key(&entry.mask_public_key, entry.node)?;
            neighbours.insert(
                entry.node,
                (cipher_key, mask_key, NeighbourGraph::share_point(index)),
            );
        }

        // Shares of both secrets, one per neighbour plus one kept.
        let self_mask_seed = Secret::random(rng);
        let mask_secret = Secret::from_bytes(mask.secret.to_bytes());
        let point = NeighbourGraph::share_point(own_index);
        let mut points: Vec<u64> = neighbours.values().map(|(_, _, x)| *x).collect();
        points.push(point);
        let mut mask_key_shares = shamir::split(&mask_secret, threshold, &points, rng)?;
        let mut self_mask_shares = shamir::split(&self_mask_seed, threshold, &points, rng)?;
        let own_shares = HeldShares {
            // Both vectors have one share per point, the last being this node's own.
            mask_key: mask_key_shares.pop().expect("one share per point"),
            self_mask: self_mask_shares.pop().expect("one share per point"),
        };

        // One bundle per neighbour, under a key only that neighbour can derive.
        let round = self.config.round;
        let mut shares = Vec::with_capacity(neighbours.len());
        let bundles = neighbours
            .iter()
            .zip(mask_key_shares.iter().zip(&self_mask_shares));
        for ((&peer, (cipher_key, _, _)), (key_share, mask_share)) in bundles {
            let shared = keys::agree(&cipher.secret, cipher_key, peer)?;
            let key = keys::share_key(&shared, round, self.node, peer);
            let plaintext = encode_bundle(self.node, peer, key_share, mask_share);
            let ad = keys::associated_data(round, self.node, peer);
            shares.push(EncryptedShare {
                sender: self.node,
                recipient: peer,
                ciphertext: keys::seal_share(&key, &ad, &plaintext),
            });
        }
        let message = ShareKeys {
            round,
            stage: Stage::ShareKeys.number(),
            node: self.node,
            self_mask_commitment: keys::self_mask_commitment(round, self.node, &self_mask_seed)
                .to_vec(),
            shares,
        };

        let State::Advertised { cipher, mask } = std::mem::replace(&mut self.state, State::Done)
        else {
            unreachable!("the state was matched above and not changed since");
        };
        self.state = State::Shared(Box::new(Shared {
            cipher,
            mask,
            self_mask_seed,
            own_shares,
            point,
            neighbours: neighbours
                .into_iter()
                .map(|(n, (c, m, _))| (n, (c, m)))
                .collect(),
            threshold,
        }));
        Ok(message)
    }

    /// Stage 2: decrypts the shares neighbours sent, then masks `input` (already quantized
    /// into the ring) with the self mask and one pairwise mask per neighbour that sent shares.
    ///
    /// # Errors
    /// [`SecAggError::OutOfOrder`] unless shares were sent and no inbox handled yet;
    /// [`SecAggError::WrongRound`], [`SecAggError::WrongStage`],
    /// [`SecAggError::WrongRecipient`] for a foreign message; [`SecAggError::NotANeighbour`],
    /// [`SecAggError::Duplicate`], [`SecAggError::Decryption`] or
    /// [`SecAggError::InvalidShare`] for a bad bundle; [`SecAggError::BadLength`] or
    /// [`SecAggError::OutsideRing`] for a bad input; [`SecAggError::Abandoned`] if fewer than
    /// `t` holders (this node included) would hold shares.
    pub fn masked_input(
        &mut self,
        inbox: &ShareInbox,
        input: &[u32],
    ) -> Result<MaskedInput, SecAggError> {
        let State::Shared(shared) = &self.state else {
            return Err(self.out_of_order(Stage::MaskedInput));
        };
        check_header(
            inbox.round,
            inbox.stage,
            self.config.round,
            Stage::MaskedInput,
        )?;
        if inbox.recipient != self.node {
            return Err(SecAggError::WrongRecipient {
                expected: self.node,
                got: inbox.recipient,
            });
        }
        if input.len() != self.config.vector_len {
            return Err(SecAggError::BadLength {
                what: "input vector",
                expected: self.config.vector_len,
                got: input.len(),
            });
        }
        self.ring.check(input)?;

        // Decrypt every bundle before using any.
        let mut held = BTreeMap::new();
        for bundle in &inbox.shares {
            let shares = self.open_bundle(shared, bundle)?;
            if held.insert(bundle.sender, shares).is_some() {
                return Err(SecAggError::Duplicate {
                    node: bundle.sender,
                    stage: Stage::ShareKeys,
                });
            }
        }
        if held.len() + 1 < shared.threshold {
            return Err(SecAggError::Abandoned(AbandonReason::TooFewHolders {
                node: self.node,
                got: held.len() + 1,
                need: shared.threshold,
            }));
        }

        // y = x + PRG(b) + sum_{j > i} PRG(s_ij) - sum_{j < i} PRG(s_ij), over the neighbours
        // that sent shares (the others did not reach stage 1 and mask with no one).
        let mut streams = MaskStreams::default();
        streams.push(shared.self_mask_seed.as_bytes(), Sign::Add);
        for &peer in held.keys() {
            let (_, peer_mask_key) = &shared.neighbours[&peer];
            let agreed = keys::agree(&shared.mask.secret, peer_mask_key, peer)?;
            let seed = keys::pairwise_mask_seed(&agreed, self.config.round, self.node, peer);
            let sign = if self.node < peer {
                Sign::Add
            } else {
                Sign::Subtract
            };
            streams.push(&seed, sign);
        }
        let mut masked = input.to_vec();
        streams.apply(&mut masked);
        self.ring.reduce(&mut masked);

        let State::Shared(shared) = std::mem::replace(&mut self.state, State::Done) else {
            unreachable!("the state was matched above and not changed since");
        };
        let Shared {
            own_shares,
            neighbours,
            threshold,
            ..
        } = *shared;
        held.insert(self.node, own_shares);
        self.state = State::Masked {
            held,
            neighbours: neighbours.into_keys().collect(),
            threshold,
        };
        Ok(MaskedInput {
            round: self.config.round,
            stage: Stage::MaskedInput.number(),
            node: self.node,
            masked,
        })
    }

    /// Stage 3: reveals, for each node whose shares this node holds, the self-mask share if
    /// the request names it alive or the mask-key share if it names it dropped; never both.
    /// Answers at most once.
    ///
    /// # Errors
    /// [`SecAggError::OutOfOrder`] unless the input was sent and no request answered yet;
    /// [`SecAggError::WrongRound`], [`SecAggError::WrongStage`],
    /// [`SecAggError::WrongRecipient`] for a foreign message;
    /// [`SecAggError::AliveAndDropped`] if a node is named both ways; [`SecAggError::Malformed`]
    /// for a node named twice; [`SecAggError::NotANeighbour`] for a node outside the
    /// neighbourhood; [`SecAggError::InconsistentUnmaskRequest`] if the request does not name
    /// exactly the nodes whose shares are held, or names this node dropped;
    /// [`SecAggError::Abandoned`] if fewer than `t` holders are named alive.
    pub fn unmask(&mut self, request: &UnmaskRequest) -> Result<UnmaskResponse, SecAggError> {
        let State::Masked {
            held,
            neighbours,
            threshold,
        } = &self.state
        else {
            return Err(self.out_of_order(Stage::Unmasking));
        };
        check_header(
            request.round,
            request.stage,
            self.config.round,
            Stage::Unmasking,
        )?;
        if request.recipient != self.node {
            return Err(SecAggError::WrongRecipient {
                expected: self.node,
                got: request.recipient,
            });
        }
        self.check_unmask_request(request, held, neighbours, *threshold)?;

        let reveal = |owners: &[NodeId], pick: fn(&HeldShares) -> &Share| {
            owners
                .iter()
                .map(|owner| RevealedShare {
                    owner: *owner,
                    share: pick(&held[owner]).to_bytes(),
                })
                .collect()
        };
        let response = UnmaskResponse {
            round: self.config.round,
            stage: Stage::Unmasking.number(),
            node: self.node,
            self_mask_shares: reveal(&request.alive, |h| &h.self_mask),
            mask_key_shares: reveal(&request.dropped, |h| &h.mask_key),
        };
        self.state = State::Done;
        Ok(response)
    }

    fn out_of_order(&self, got: Stage) -> SecAggError {
        SecAggError::OutOfOrder {
            state: self.state.name(),
            got,
        }
    }

    /// The directory must list the invited nodes in order, with this node's keys untouched.
    fn check_directory(
        &self,
        directory: &KeyDirectory,
        cipher: &KeyPair,
        mask: &KeyPair,
    ) -> Result<(), SecAggError> {
        let nodes = &directory.nodes;
        if !nodes.windows(2).all(|w| w[0].node < w[1].node) {
            return Err(SecAggError::Malformed {
                what: "key directory",
                problem: "nodes not in strictly increasing order",
            });
        }
        if let Some(stranger) = nodes.iter().find(|k| !self.config.contains(k.node)) {
            return Err(SecAggError::NotAParticipant {
                node: stranger.node,
                stage: Stage::ShareKeys,
            });
        }
        let own = nodes.iter().find(|k| k.node == self.node);
        let intact = own.is_some_and(|k| {
            k.cipher_public_key == cipher.public.as_bytes()
                && k.mask_public_key == mask.public.as_bytes()
        });
        if !intact {
            return Err(SecAggError::Malformed {
                what: "key directory",
                problem: "this node is missing or its keys differ from those it advertised",
            });
        }
        if nodes.len() < self.config.min_survivors {
            return Err(SecAggError::Abandoned(AbandonReason::TooFewNodes {
                stage: Stage::AdvertiseKeys,
                got: nodes.len(),
                need: self.config.min_survivors,
            }));
        }
        Ok(())
    }

    /// Decrypts one neighbour's bundle and checks it is what that neighbour owed this node.
    fn open_bundle(
        &self,
        shared: &Shared,
        bundle: &EncryptedShare,
    ) -> Result<HeldShares, SecAggError> {
        let (sender, recipient) = (bundle.sender, bundle.recipient);
        if recipient != self.node {
            return Err(SecAggError::WrongRecipient {
                expected: self.node,
                got: recipient,
            });
        }
        let Some((cipher_key, _)) = shared.neighbours.get(&sender) else {
            return Err(SecAggError::NotANeighbour {
                node: self.node,
                peer: sender,
            });
        };

        let agreed = keys::agree(&shared.cipher.secret, cipher_key, sender)?;
        let key = keys::share_key(&agreed, self.config.round, sender, recipient);
        let ad = keys::associated_data(self.config.round, sender, recipient);
        let plaintext = keys::open_share(&key, &ad, &bundle.ciphertext, sender, recipient)?;

        let shares = decode_bundle(&plaintext, sender, recipient)?;
        if shares.mask_key.x() != shared.point || shares.self_mask.x() != shared.point {
            return Err(SecAggError::InvalidShare {
                owner: sender,
                problem: "evaluation point is not this node's",
            });
        }
        Ok(shares)
    }

    fn check_unmask_request(
        &self,
        request: &UnmaskRequest,
        held: &BTreeMap<NodeId, HeldShares>,
        neighbours: &[NodeId],
        threshold: usize,
    ) -> Result<(), SecAggError> {
        let mut alive = request.alive.clone();
        let mut dropped = request.dropped.clone();
        alive.sort_unstable();
        dropped.sort_unstable();
        if let Some(node) = alive.iter().find(|n| dropped.binary_search(n).is_ok()) {
            return Err(SecAggError::AliveAndDropped { node: *node });
        }
        if alive.windows(2).any(|w| w[0] == w[1]) || dropped.windows(2).any(|w| w[0] == w[1]) {
            return Err(SecAggError::Malformed {
                what: "unmask request",
                problem: "a node is named twice",
            });
        }
        if dropped.contains(&self.node) {
            return Err(SecAggError::InconsistentUnmaskRequest {
                node: self.node,
                problem: "names the node answering it as dropped",
            });
        }

        // Named nodes must be exactly the owners of the shares held.
        for &node in alive.iter().chain(&dropped) {
            if node != self.node && neighbours.binary_search(&node).is_err() {
                return Err(SecAggError::NotANeighbour {
                    node: self.node,
                    peer: node,
                });
            }
            if !held.contains_key(&node) {
                return Err(SecAggError::InconsistentUnmaskRequest {
                    node,
                    problem: "names a neighbour that sent this node no shares",
                });
            }
        }
        if let Some(node) = held
            .keys()
            .find(|n| alive.binary_search(n).is_err() && dropped.binary_search(n).is_err())
        {
            return Err(SecAggError::InconsistentUnmaskRequest {
                node: *node,
                problem: "leaves out a node whose shares this node holds",
            });
        }
        if alive.len() < threshold {
            return Err(SecAggError::Abandoned(AbandonReason::TooFewHolders {
                node: self.node,
                got: alive.len(),
                need: threshold,
            }));
        }
        Ok(())
    }
}

/// `owner || holder || mask-key share || self-mask share`. Zeroized on drop.
fn encode_bundle(
    owner: NodeId,
    holder: NodeId,
    mask_key: &Share,
    self_mask: &Share,
) -> Zeroizing<Vec<u8>> {
    let mut bytes = Zeroizing::new(Vec::with_capacity(BUNDLE_LEN));
    bytes.extend_from_slice(&owner.0.to_le_bytes());
    bytes.extend_from_slice(&holder.0.to_le_bytes());
    bytes.extend_from_slice(&Zeroizing::new(mask_key.to_bytes()));
    bytes.extend_from_slice(&Zeroizing::new(self_mask.to_bytes()));
    bytes
}

/// Decodes a bundle that must be from `owner` to `holder`.
///
/// # Errors
/// [`SecAggError::InvalidShare`] for a wrong length, wrong parties or an invalid share.
pub fn decode_bundle_shares(
    bytes: &[u8],
    owner: NodeId,
    holder: NodeId,
) -> Result<(Share, Share), SecAggError> {
    decode_bundle(bytes, owner, holder).map(|h| (h.mask_key, h.self_mask))
}

fn decode_bundle(bytes: &[u8], owner: NodeId, holder: NodeId) -> Result<HeldShares, SecAggError> {
    let invalid = |problem| SecAggError::InvalidShare { owner, problem };
    if bytes.len() != BUNDLE_LEN {
        return Err(invalid("bundle has the wrong length"));
    }
    let id = |range: std::ops::Range<usize>| {
        let mut word = [0; 8];
        word.copy_from_slice(&bytes[range]);
        NodeId(u64::from_le_bytes(word))
    };
    if id(0..8) != owner || id(8..16) != holder {
        return Err(invalid("bundle names other parties than its envelope"));
    }
    Ok(HeldShares {
        mask_key: Share::from_bytes(&bytes[16..16 + SHARE_LEN], owner)?,
        self_mask: Share::from_bytes(&bytes[16 + SHARE_LEN..], owner)?,
    })
}
