//! The error type of [`crate::secagg`].
//!
//! Two kinds of failure matter to a caller. A *refused message* ([`SecAggError`] other than
//! [`SecAggError::Abandoned`]) leaves the state machine as it was: the coordinator logs the
//! misbehaving node and goes on, and the node ignores the message. An *abandoned round*
//! ([`SecAggError::Abandoned`]) is final: too few nodes or shares remain to finish without
//! revealing something or producing a wrong sum, so no aggregate is produced.

use thiserror::Error;

use super::messages::{NodeId, Stage};

/// Why a secure-aggregation message, configuration or round cannot go on.
#[derive(Debug, Clone, PartialEq, Error)]
#[non_exhaustive]
pub enum SecAggError {
    /// A configuration value is out of range (found when the round is set up, never midway).
    #[error("invalid secure-aggregation setting `{name}`: expected {expected}, got {got}")]
    InvalidConfig {
        /// The setting.
        name: &'static str,
        /// What would be accepted.
        expected: &'static str,
        /// What was given.
        got: String,
    },
    /// The quantized sum of a full cohort could wrap around the ring.
    #[error(
        "cohort of {cohort} x max |value| {} + noise tail {} needs {needed_bits} bits, ring has \
         {ring_bits}",
        with_log2(*max_value),
        with_log2(*noise_tail)
    )]
    RingTooSmall {
        /// Nodes whose values may be summed.
        cohort: usize,
        /// Largest magnitude of one node's quantized coordinate before noise.
        max_value: u64,
        /// Bound on the magnitude of the summed noise of one coordinate, except with the
        /// configured tail probability.
        noise_tail: u64,
        /// Bits the centred sum needs, sign included.
        needed_bits: u32,
        /// Bits of the ring.
        ring_bits: u32,
    },
    /// An update value is NaN or infinite.
    #[error("update value {index} is not finite")]
    NonFinite {
        /// Position of the first bad value.
        index: usize,
    },
    /// A rounded coordinate exceeds the bound the ring was sized for. Clipping makes this
    /// impossible; seeing it means a bug, and the value is refused rather than saturated.
    #[error("quantized coordinate {index} exceeds the bound {max}")]
    ValueTooLarge {
        /// Position of the coordinate.
        index: usize,
        /// The bound.
        max: u64,
    },
    /// A message belongs to another round (a replay or a mix-up of rounds).
    #[error("message for round {got}, this is round {expected}")]
    WrongRound {
        /// This round.
        expected: u64,
        /// The message's round.
        got: u64,
    },
    /// A message's stage number does not match the handler it was given to.
    #[error("message says stage {got}, the handler expects stage {expected}")]
    WrongStage {
        /// The handler's stage.
        expected: u32,
        /// The message's stage field.
        got: u32,
    },
    /// A message arrived when the state machine is at another stage (out of order, replayed
    /// after its stage, or late).
    #[error("a {got} message arrived in state `{state}`")]
    OutOfOrder {
        /// Where the state machine is.
        state: &'static str,
        /// The stage of the message.
        got: Stage,
    },
    /// A node sent a second message for a stage.
    #[error("node {node} already sent its {stage} message")]
    Duplicate {
        /// The sender.
        node: NodeId,
        /// The stage.
        stage: Stage,
    },
    /// A node that is not (or no longer) taking part sent or was named in a message.
    #[error("node {node} is not a participant at {stage}")]
    NotAParticipant {
        /// The node.
        node: NodeId,
        /// The stage.
        stage: Stage,
    },
    /// A message was delivered to the wrong node.
    #[error("message addressed to node {got}, delivered to node {expected}")]
    WrongRecipient {
        /// The node that received it.
        expected: NodeId,
        /// The node named in the message.
        got: NodeId,
    },
    /// A node named a peer that is not its neighbour in the round's graph.
    #[error("node {peer} is not a neighbour of node {node}")]
    NotANeighbour {
        /// The node whose neighbourhood was checked.
        node: NodeId,
        /// The peer named.
        peer: NodeId,
    },
    /// A field has the wrong length (keys, ciphertexts, shares, vectors).
    #[error("{what} has length {got}, expected {expected}")]
    BadLength {
        /// The field.
        what: &'static str,
        /// The expected length.
        expected: usize,
        /// The length received.
        got: usize,
    },
    /// A list in a message is not as the protocol requires (order, duplicates, coverage).
    #[error("malformed {what}: {problem}")]
    Malformed {
        /// The list or message.
        what: &'static str,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// A vector element is not in the ring `Z_{2^bits}`.
    #[error("element {index} is {value}, outside the ring of {bits} bits")]
    OutsideRing {
        /// Position of the first bad element.
        index: usize,
        /// Its value.
        value: u32,
        /// Bits of the ring.
        bits: u32,
    },
    /// A peer's public key gives an all-zero (non-contributory) shared secret: a low-order
    /// point that would make the derived key predictable.
    #[error("node {node}'s public key is a low-order point")]
    NonContributoryKey {
        /// The node that advertised the key.
        node: NodeId,
    },
    /// A share ciphertext failed authentication: tampered, truncated, or bound to another
    /// round, sender or recipient.
    #[error("share ciphertext from node {sender} to node {recipient} failed authentication")]
    Decryption {
        /// The claimed sender.
        sender: NodeId,
        /// The claimed recipient.
        recipient: NodeId,
    },
    /// A Shamir share does not decode, or does not belong where it was sent.
    #[error("invalid share of node {owner}'s secret: {problem}")]
    InvalidShare {
        /// The node whose secret the share is of.
        owner: NodeId,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// Fewer shares than the threshold were offered for a reconstruction.
    #[error("{got} shares given, the threshold is {need}")]
    TooFewShares {
        /// Shares given.
        got: usize,
        /// The threshold.
        need: usize,
    },
    /// Interpolation gave a value that is not the shared secret: its check value does not
    /// match. Expected whenever fewer than the threshold of genuine shares were combined.
    #[error("reconstructed value does not match the secret's check value")]
    ReconstructionMismatch,
    /// An unmask request names a node both as a survivor and as dropped. Answering it would
    /// reveal both its self-mask and its mask key, hence its input.
    #[error("unmask request names node {node} both alive and dropped")]
    AliveAndDropped {
        /// The node named twice.
        node: NodeId,
    },
    /// An unmask request does not match the shares this node holds.
    #[error("unmask request inconsistent with held shares: {problem} (node {node})")]
    InconsistentUnmaskRequest {
        /// The first node concerned.
        node: NodeId,
        /// What is wrong.
        problem: &'static str,
    },
    /// The round cannot finish; see the reason. Final: no aggregate will be produced.
    #[error("round abandoned: {0}")]
    Abandoned(AbandonReason),
}

/// Why a round was abandoned.
#[derive(Debug, Clone, PartialEq, Error)]
#[non_exhaustive]
pub enum AbandonReason {
    /// Too few nodes completed a stage.
    #[error("{got} nodes completed {stage}, at least {need} are required")]
    TooFewNodes {
        /// The stage.
        stage: Stage,
        /// Nodes that completed it.
        got: usize,
        /// The minimum.
        need: usize,
    },
    /// Too few surviving holders of a node's shares remain to remove its masks.
    #[error("node {node}'s secret has {got} surviving share holders, threshold is {need}")]
    TooFewHolders {
        /// The node whose secret is needed.
        node: NodeId,
        /// Surviving holders of its shares.
        got: usize,
        /// The threshold.
        need: usize,
    },
    /// Too few shares of a needed secret were returned.
    #[error("{got} shares of node {owner}'s secret returned, threshold is {need}")]
    TooFewShares {
        /// The node whose secret is needed.
        owner: NodeId,
        /// Shares returned.
        got: usize,
        /// The threshold.
        need: usize,
    },
    /// A needed secret did not reconstruct to a value matching its check value.
    #[error("node {owner}'s secret did not reconstruct to its check value")]
    Reconstruction {
        /// The node whose secret is needed.
        owner: NodeId,
    },
    /// An earlier step abandoned the round.
    #[error("the round was already abandoned")]
    AlreadyAbandoned,
}

/// `v (2^log2 v)`, or `0`.
fn with_log2(v: u64) -> String {
    if v == 0 {
        return "0".into();
    }
    format!("{v} (2^{:.1})", (v as f64).log2())
}
