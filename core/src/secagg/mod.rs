//! Secure aggregation: the coordinator learns the sum of the surviving nodes' updates and
//! nothing else about any one of them, whatever nodes drop out and whenever.
//!
//! This module holds the transport-independent protocol: message types
//! ([`messages`]), the node's state machine ([`ClientRound`]), the coordinator's
//! ([`ServerRound`]), and the quantization that turns float updates into ring elements and
//! back ([`quantize`]). The node and coordinator crates carry the messages over gRPC.
//!
//! # Protocol
//!
//! Double masking (Bonawitz et al. 2017, "Practical secure aggregation for privacy-preserving
//! machine learning") over the sparse neighbour graph of SecAgg+ (Bell et al. 2020, "Secure
//! single-server aggregation with (poly)logarithmic overhead"). Node `i` with quantized input
//! `x_i` in `Z_{2^b}^n`:
//!
//! 0. **Advertise keys.** `i` draws two fresh X25519 key pairs: `(c_i, C_i)` to encrypt shares
//!    and `(s_i, S_i)` to agree masks, and sends `C_i, S_i`. The coordinator relays the
//!    directory of all advertised keys. Every node derives the same neighbour graph `G` from
//!    it ([`graph`]): complete for small cohorts, else `k`-regular over an order taken from a
//!    hash of all the keys, which the coordinator cannot steer.
//! 1. **Share keys.** `i` draws a self-mask seed `b_i` and Shamir-shares both `s_i` and `b_i`
//!    ([`shamir`]) with threshold `t` among its neighbours and itself. The bundle for neighbour
//!    `j` is encrypted with ChaCha20-Poly1305 under `HKDF(DH(c_i, C_j))`, bound to the round,
//!    sender and recipient ([`keys`]). `i` also sends a hash commitment to `b_i`.
//! 2. **Masked input.** The coordinator forwards each node's bundles. With `U2` the nodes that
//!    sent shares, `i` sends
//!    `y_i = x_i + PRG(b_i) + sum_{j in N(i) ∩ U2, j > i} PRG(s_ij) - sum_{j in N(i) ∩ U2, j < i} PRG(s_ij)`
//!    where `s_ij = HKDF(DH(s_i, S_j))` and PRG is the ChaCha20 keystream ([`mask`]).
//! 3. **Unmasking.** With `U3` the nodes whose `y` arrived, each survivor is told which of the
//!    nodes whose shares it holds are alive (it reveals their `b` share) and which dropped (it
//!    reveals their `s` share). It refuses a request that names a node both ways, names a
//!    non-neighbour, or does not match the shares it holds; and it answers once. The
//!    coordinator reconstructs each `b_i` (`i` in `U3`) and each dropped `s_d`, checks them
//!    against the commitment and the advertised public key, and computes
//!    `sum_{U3} y_i - sum_{U3} PRG(b_i) -/+ PRG(s_dj)` for each dropped `d` and surviving
//!    neighbour `j`, which is `sum_{U3} x_i` exactly in the ring.
//!
//! Every message carries the round id and stage; messages from another round, for another
//! stage, duplicated, out of order or late are refused with a typed [`SecAggError`]. A round
//! whose survivors or shares fall below what is needed is abandoned with
//! [`SecAggError::Abandoned`] before anything more is revealed, never finished with a wrong
//! sum.
//!
//! # Threat model
//!
//! The coordinator is honest but curious: it follows the protocol and tries to learn
//! individual inputs from everything it sees. Nodes are honest but may drop out at any
//! moment; some may also share what they know with the coordinator.
//!
//! What the coordinator sees: public keys, ciphertexts, one masked vector per survivor
//! (uniform in the ring while its `b_i` and pairwise seeds are unknown), and for each node
//! *either* `b_i` (it survived) *or* `s_i` (it dropped before its input arrived), never both.
//! Revealing `b_i` leaves `x_i` hidden under the pairwise masks, which cancel only in the sum;
//! revealing `s_i` exposes masks of an input that never arrived (and an input arriving after
//! the survivors were fixed is refused). Shamir shares below the threshold are uniformly
//! random, so fewer than `t` holders pooling their shares learn nothing.
//!
//! Nodes that collude with the coordinator pool their own pairwise seeds and shares with it.
//! A survivor's input stays hidden as long as at least one of its neighbours that exchanged
//! masks with it is honest and fewer than `t` holders of its shares collude. On the complete
//! graph that means the whole cohort; on the sparse graph, a node's privacy rests on its `k`
//! neighbours, so `k` must be chosen for the fraction of colluding nodes expected (Bell et
//! al. give the bound) as well as for the dropout rate (a neighbourhood with fewer than `t`
//! survivors abandons the round).
//!
//! Two defences reach beyond that model. Each holder answers one unmask request and `t`
//! exceeds half of each neighbourhood, so even inconsistent requests to different holders
//! cannot collect `t` shares of both secrets of one node from honest holders. And the graph
//! comes from a hash of all the keys, so the coordinator cannot place nodes next to each other
//! (though a malicious one could grind by leaving advertisements out).
//!
//! **Not built:** the consistency check of Bonawitz et al.'s actively secure variant, in
//! which nodes sign the survivor set with long-term keys and check each other's signatures
//! before revealing anything, and signed advertisements. Together they stop a malicious
//! coordinator from lying about who survived in ways the threshold does not catch, and from
//! substituting its own keys for an honest node's (which would let it decrypt the bundles
//! sent to that node). Without them, advertisements are as trustworthy as the transport's
//! node authentication (mutual TLS), and a coordinator that deviates from the protocol gets
//! no further guarantee.
//!
//! Privacy of the sum itself comes from the distributed noise each node adds before masking
//! ([`quantize`]), sized so that any `n_min` survivors add the target noise between them.
//!
//! # Parameters
//!
//! [`SecAggConfig`]: the round id (fresh every round), cohort, vector length, ring bits `b`
//! (at most 32), the largest cohort that still uses the complete graph, the degree `k` of the
//! sparse graph, the threshold as a percentage of a neighbourhood
//! (`t = max(2, ceil(percent (neighbours + 1) / 100))`, above one half) and `n_min`, the
//! fewest survivors with which a round completes.
//! [`quantize::QuantizationConfig`]: the clipping bound `S`, the step `gamma`, the optional
//! rotation seed, the target noise and its `n_min`, the cohort size, `b` and the tail
//! probability with which the sum may wrap; its constructor refuses a ring too small for the
//! cohort, and [`quantize::Quantizer::check_round`] checks it against the round's
//! [`SecAggConfig`].

pub mod client;
pub mod config;
pub mod discrete_gaussian;
mod error;
mod field;
pub mod graph;
pub mod hadamard;
pub mod keys;
pub mod mask;
pub mod messages;
pub mod quantize;
pub mod ring;
pub mod server;
pub mod shamir;

pub use client::ClientRound;
pub use config::SecAggConfig;
pub use error::{AbandonReason, SecAggError};
pub use messages::{NodeId, RoundId, Stage};
pub use ring::Ring;
pub use server::{ServerRound, UnmaskedSum};
