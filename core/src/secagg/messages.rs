//! The messages of a secure-aggregation round, as plain data.
//!
//! Every message carries its round id and stage number so that a message replayed from
//! another round, or delivered to the wrong stage, is refused by the handler rather than
//! misread. The fields are what a protobuf encoding would carry (`u64` ids, `u32` stage
//! numbers, byte vectors, `u32` ring elements); nothing here is validated. Handlers in
//! [`super::client`] and [`super::server`] check every field before acting on it.
//!
//! Stage `k`'s exchange is a request from the coordinator followed by one reply per node,
//! except the first stage, whose request is the round's task:
//!
//! | stage | coordinator to node | node to coordinator |
//! |---|---|---|
//! | 0 advertise keys | (the task with a [`super::SecAggConfig`]) | [`AdvertiseKeys`] |
//! | 1 share keys | [`KeyDirectory`] | [`ShareKeys`] |
//! | 2 masked input | [`ShareInbox`] | [`MaskedInput`] |
//! | 3 unmasking | [`UnmaskRequest`] | [`UnmaskResponse`] |

use std::fmt;

use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Identifies a secure-aggregation round. Must never repeat: it salts every key derivation
/// and is bound into every ciphertext.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RoundId(pub u64);

/// A node's number within the protocol. The coordinator maps its node identities to these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeId(pub u64);

impl fmt::Display for RoundId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The four stages of a round, numbered as on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Stage {
    /// Nodes advertise fresh public keys.
    AdvertiseKeys = 0,
    /// Nodes send encrypted shares of their secrets to their neighbours.
    ShareKeys = 1,
    /// Nodes send their masked inputs.
    MaskedInput = 2,
    /// Survivors reveal the shares needed to remove the masks.
    Unmasking = 3,
}

impl Stage {
    /// The stage's wire number.
    pub fn number(self) -> u32 {
        self as u32
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::AdvertiseKeys => "advertise-keys",
            Stage::ShareKeys => "share-keys",
            Stage::MaskedInput => "masked-input",
            Stage::Unmasking => "unmasking",
        })
    }
}

/// Stage 0, node to coordinator: the node's fresh public keys for this round.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdvertiseKeys {
    /// The round.
    pub round: RoundId,
    /// Always 0.
    pub stage: u32,
    /// The sender.
    pub node: NodeId,
    /// X25519 public key (32 bytes) for encrypting shares sent to this node.
    pub cipher_public_key: Vec<u8>,
    /// X25519 public key (32 bytes) for agreeing pairwise masks.
    pub mask_public_key: Vec<u8>,
}

/// One node's public keys as the coordinator relays them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeKeys {
    /// The node.
    pub node: NodeId,
    /// X25519 public key for share encryption (32 bytes).
    pub cipher_public_key: Vec<u8>,
    /// X25519 public key for mask agreement (32 bytes).
    pub mask_public_key: Vec<u8>,
}

/// Stage 1, coordinator to every node that advertised: all advertised keys, sorted by node.
/// The same message goes to every node; the neighbour graph is derived from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyDirectory {
    /// The round.
    pub round: RoundId,
    /// Always 1.
    pub stage: u32,
    /// Every node that advertised, in increasing node order.
    pub nodes: Vec<NodeKeys>,
}

/// A share bundle encrypted from one node to another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncryptedShare {
    /// The node whose secrets are shared (the author of the ciphertext).
    pub sender: NodeId,
    /// The neighbour that can decrypt it.
    pub recipient: NodeId,
    /// ChaCha20-Poly1305 ciphertext with tag.
    pub ciphertext: Vec<u8>,
}

/// Stage 1, node to coordinator: one encrypted share bundle per neighbour.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareKeys {
    /// The round.
    pub round: RoundId,
    /// Always 1.
    pub stage: u32,
    /// The sender.
    pub node: NodeId,
    /// SHA-256 commitment to the node's self-mask seed (32 bytes), so the coordinator can tell
    /// a correct reconstruction from a wrong one.
    pub self_mask_commitment: Vec<u8>,
    /// One bundle per neighbour, each with `sender == node`.
    pub shares: Vec<EncryptedShare>,
}

/// Stage 2, coordinator to one node: the bundles its neighbours encrypted to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareInbox {
    /// The round.
    pub round: RoundId,
    /// Always 2.
    pub stage: u32,
    /// The node this inbox is for.
    pub recipient: NodeId,
    /// Bundles with `recipient` as their recipient, one per neighbour that sent shares.
    pub shares: Vec<EncryptedShare>,
}

/// Stage 2, node to coordinator: the node's quantized update plus its masks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaskedInput {
    /// The round.
    pub round: RoundId,
    /// Always 2.
    pub stage: u32,
    /// The sender.
    pub node: NodeId,
    /// Ring elements, each below `2^ring_bits`.
    pub masked: Vec<u32>,
}

/// Stage 3, coordinator to one survivor: which of the nodes whose shares it holds survived
/// (reveal their self-mask share) and which dropped (reveal their mask-key share).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnmaskRequest {
    /// The round.
    pub round: RoundId,
    /// Always 3.
    pub stage: u32,
    /// The survivor this request is for.
    pub recipient: NodeId,
    /// Nodes whose masked input arrived.
    pub alive: Vec<NodeId>,
    /// Nodes that sent shares but whose masked input did not arrive.
    pub dropped: Vec<NodeId>,
}

/// A Shamir share revealed to the coordinator. Zeroized on drop.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
pub struct RevealedShare {
    /// The node whose secret this is a share of.
    #[zeroize(skip)]
    pub owner: NodeId,
    /// The encoded share (see [`super::shamir::Share::to_bytes`]).
    pub share: Vec<u8>,
}

impl fmt::Debug for RevealedShare {
    // Shares are secret until enough of them meet; keep them out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RevealedShare")
            .field("owner", &self.owner)
            .field("share", &"[redacted]")
            .finish()
    }
}

/// Stage 3, survivor to coordinator: the shares the request asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnmaskResponse {
    /// The round.
    pub round: RoundId,
    /// Always 3.
    pub stage: u32,
    /// The sender.
    pub node: NodeId,
    /// Shares of the self-mask seeds of the nodes named alive.
    pub self_mask_shares: Vec<RevealedShare>,
    /// Shares of the mask keys of the nodes named dropped.
    pub mask_key_shares: Vec<RevealedShare>,
}

/// Refuses a message from another round or stage.
pub(crate) fn check_header(
    round: RoundId,
    stage: u32,
    expected_round: RoundId,
    expected_stage: Stage,
) -> Result<(), super::SecAggError> {
    if round != expected_round {
        return Err(super::SecAggError::WrongRound {
            expected: expected_round.0,
            got: round.0,
        });
    }
    if stage != expected_stage.number() {
        return Err(super::SecAggError::WrongStage {
            expected: expected_stage.number(),
            got: stage,
        });
    }
    Ok(())
}
