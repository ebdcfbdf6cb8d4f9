//! One round of secure aggregation as the coordinator runs it.
//!
//! [`SecureRound`] wraps core's [`ServerRound`] with what the transport needs: the mapping
//! from node identities to protocol numbers, the set of nodes each stage still waits for,
//! the stage's deadline, and the messages each node collects by long poll when a stage closes.
//! The round driver in [`crate::round`] closes a stage as soon as every node it waits for has
//! answered, or at the stage's deadline with whoever answered; core decides whether that is
//! enough and abandons the round otherwise.
//!
//! The quantization is fixed when the round opens: the finest power-of-two step for which the
//! cohort's sum cannot wrap around the ring, a fresh public rotation seed, and with
//! `[node_privacy]` each node's share of discrete Gaussian noise, sized so that any
//! `min_updates` survivors add noise of standard deviation `z S` between them. The coordinator
//! adds no noise of its own in this mode.
//!
//! # What the accounting covers
//!
//! Each round is charged as the Gaussian mechanism with the noise the survivors actually
//! added, `n sigma_node^2` in quantization units, against the quantized sensitivity
//! `S / gamma + sqrt(len)`. The neighbouring federations it compares are those in which one
//! surviving node's update is replaced by any other within the bound (zero included): that
//! node still takes part and still adds its noise share, so the noise is the same in both.
//! Whether a node took part is not what this protects: the coordinator sees who survived, and
//! manifests name the contributors. Had the node not taken part at all, its own noise share
//! would be missing too, and a Gaussian of smaller variance has unbounded Rényi divergence
//! at high orders; accounting with `n - 1` survivors would not cover that case either, which
//! is why the guarantee is stated for replacement. (The plain mode's central noise does not
//! depend on who took part, so there both notions give the same figure.)

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use athanor_core::secagg::messages::{
    AdvertiseKeys, KeyDirectory, MaskedInput, ShareInbox, ShareKeys, UnmaskRequest, UnmaskResponse,
};
use athanor_core::secagg::quantize::{QuantizationConfig, Quantizer};
use athanor_core::secagg::{self, RoundId, SecAggConfig, SecAggError, ServerRound, Stage};
use rand::{Rng, RngExt};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::Error;
use crate::config::CoordinatorConfig;
use crate::round::NodeId;

/// Below this many quantization levels between zero and the clipping bound, the rounding
/// error of the decoded mean is no longer negligible against the update: say so.
pub const COARSE_LEVELS: f64 = 1024.0;

/// What one node needs to take part: the round's parameters and its own number.
#[derive(Debug, Clone)]
pub struct SecureTask {
    /// This node's number in the protocol.
    pub node: secagg::NodeId,
    /// The round's protocol parameters.
    pub config: SecAggConfig,
    /// How to quantize the update.
    pub quantization: QuantizationConfig,
}

/// A node's message for stage 0, 1 or 3.
#[derive(Debug)]
pub enum NodeMessage {
    /// Stage 0.
    AdvertiseKeys(AdvertiseKeys),
    /// Stage 1.
    ShareKeys(ShareKeys),
    /// Stage 3.
    Unmask(UnmaskResponse),
}

/// The coordinator's message to one node for a stage.
#[derive(Debug, Clone)]
pub enum Outgoing {
    /// The stage has not closed yet.
    Pending,
    /// Stage 1.
    Directory(KeyDirectory),
    /// Stage 2.
    Inbox(ShareInbox),
    /// Stage 3.
    Unmask(UnmaskRequest),
    /// The round will not complete.
    Abandoned(String),
}

/// A secure-aggregation round in progress.
#[derive(Debug)]
pub struct SecureRound {
    server: ServerRound,
    config: SecAggConfig,
    quantizer: Quantizer,
    numbers: BTreeMap<NodeId, secagg::NodeId>,
    names: BTreeMap<secagg::NodeId, NodeId>,
    /// The stage whose node messages are being collected; `None` once unmasking closed.
    stage: Option<Stage>,
    deadline: Instant,
    waiting_for: BTreeSet<secagg::NodeId>,
    /// Nodes whose session was replaced after they advertised keys: no later stage waits for
    /// them, since whatever they held for this round is gone.
    lost: BTreeSet<secagg::NodeId>,
    directory: Option<KeyDirectory>,
    inboxes: HashMap<secagg::NodeId, ShareInbox>,
    unmask_requests: HashMap<secagg::NodeId, UnmaskRequest>,
    abandoned: Option<String>,
}

/// The outcome of a completed round.
#[derive(Debug)]
pub struct SecureSum {
    /// The decoded sum of the survivors' clipped (and, with node-level privacy, noised)
    /// updates, in update units.
    pub sum: Vec<f64>,
    /// The survivors whose inputs are in the sum.
    pub contributors: Vec<NodeId>,
    /// The noise multiplier the survivors' noise amounts to against the quantized
    /// sensitivity, when nodes added noise.
    pub noise_multiplier: Option<f64>,
}

impl SecureRound {
    /// Sets up a round for `members` (at least two) over updates of `dimension` parameters.
    ///
    /// # Errors
    /// A reason to abandon the round: too few members for `min_updates`, or a cohort whose
    /// sum no quantization step fits into the ring.
    pub fn open<R: Rng + ?Sized>(
        config: &CoordinatorConfig,
        members: &[NodeId],
        dimension: usize,
        rng: &mut R,
    ) -> Result<SecureRound, String> {
        let min_survivors = config.min_updates();
        if members.len() < min_survivors {
            return Err(format!(
                "a cohort of {} cannot reach the {min_survivors} survivors secure aggregation \
                 needs",
                members.len()
            ));
        }
        // Numbers follow the identities' order, so the cohort's numbers increase with it.
        let mut sorted = members.to_vec();
        sorted.sort();
        let numbers: BTreeMap<NodeId, secagg::NodeId> =
            sorted.into_iter().zip((1..).map(secagg::NodeId)).collect();
        let names = numbers.iter().map(|(n, &i)| (i, n.clone())).collect();

        let settings = &config.aggregation;
        let clip_norm = config.secure_clip_norm();
        let rotation_seed = settings.rotation.then(|| rng.random());
        let quantizer = config
            .secure_quantizer(members.len(), dimension, rotation_seed)
            .map_err(|e| format!("no quantization fits the cohort: {e}"))?;
        let protocol = SecAggConfig {
            round: RoundId(rng.random()),
            cohort: numbers.values().copied().collect(),
            vector_len: quantizer.encoded_len(),
            ring_bits: settings.ring_bits,
            complete_graph_max: settings.complete_graph_max,
            degree: settings.degree,
            threshold_percent: settings.threshold_percent,
            min_survivors,
        };
        quantizer
            .check_round(&protocol)
            .map_err(|e| e.to_string())?;
        let server = ServerRound::new(protocol.clone()).map_err(|e| e.to_string())?;
        // The start-up check covered cohorts up to the reference size; a larger one gets a
        // coarser step, which is worth a word when it becomes coarse.
        let levels = clip_norm / quantizer.config().granularity;
        if levels < COARSE_LEVELS && members.len() > config.reference_cohort() {
            warn!(
                levels,
                rounding_error = quantizer.rounding_error_bound(),
                clip_norm,
                "coarse quantization: the ring leaves few levels per update for this cohort; \
                 raise [aggregation] ring_bits or lower update_clip_norm"
            );
        }
        info!(
            protocol_round = protocol.round.0,
            granularity = quantizer.config().granularity,
            vector_len = protocol.vector_len,
            node_noise_variance = quantizer.node_noise_variance(),
            "secure aggregation set up"
        );

        Ok(SecureRound {
            server,
            config: protocol,
            quantizer,
            waiting_for: numbers.values().copied().collect(),
            lost: BTreeSet::new(),
            numbers,
            names,
            stage: Some(Stage::AdvertiseKeys),
            deadline: Instant::now() + config.stage_deadline(),
            directory: None,
            inboxes: HashMap::new(),
            unmask_requests: HashMap::new(),
            abandoned: None,
        })
    }

    /// The task's secure-aggregation part for `node`, while it may still advertise keys.
    pub fn task_for(&self, node: &NodeId) -> Option<SecureTask> {
        let number = *self.numbers.get(node)?;
        let advertising = self.stage == Some(Stage::AdvertiseKeys);
        (advertising && self.waiting_for.contains(&number)).then(|| SecureTask {
            node: number,
            config: self.config.clone(),
            quantization: *self.quantizer.config(),
        })
    }

    /// The stage being collected, if any.
    pub fn stage(&self) -> Option<Stage> {
        self.stage
    }

    /// When the stage being collected closes at the latest.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Whether every node the stage waits for has answered (or the round is over).
    pub fn stage_complete(&self) -> bool {
        self.waiting_for.is_empty() || self.abandoned.is_some() || self.stage.is_none()
    }

    /// Why the round was abandoned, if it was.
    pub fn abandoned(&self) -> Option<&str> {
        self.abandoned.as_deref()
    }

    /// A node declined its task: stage 0 no longer waits for it.
    pub fn withdraw(&mut self, node: &NodeId) {
        if self.stage == Some(Stage::AdvertiseKeys)
            && let Some(number) = self.numbers.get(node)
        {
            self.waiting_for.remove(number);
        }
    }

    /// A node's session was replaced (it restarted, or lost its connection): whatever it
    /// held for this round is gone, so once it has advertised keys no stage waits for it
    /// again. Before that, its new session may still take part.
    pub fn forget(&mut self, node: &NodeId) {
        let Some(&number) = self.numbers.get(node) else {
            return;
        };
        let advertised =
            self.stage != Some(Stage::AdvertiseKeys) || !self.waiting_for.contains(&number);
        if advertised && self.lost.insert(number) {
            self.waiting_for.remove(&number);
            info!(%node, stage = ?self.stage, "a node rejoined mid-round; no stage waits for it now");
        }
    }

    /// Records a node's message for stage 0, 1 or 3.
    ///
    /// # Errors
    /// [`Error::WrongRound`] for a message outside its stage or from a node outside the
    /// cohort, [`Error::InvalidRequest`] for one the protocol refuses (naming another sender,
    /// malformed, duplicated).
    pub fn receive(&mut self, node: &NodeId, message: NodeMessage) -> Result<(), Error> {
        let number = self.sender(node)?;
        let (claimed, stage) = match &message {
            NodeMessage::AdvertiseKeys(m) => (m.node, Stage::AdvertiseKeys),
            NodeMessage::ShareKeys(m) => (m.node, Stage::ShareKeys),
            NodeMessage::Unmask(m) => (m.node, Stage::Unmasking),
        };
        self.check_sender(number, claimed, stage)?;
        let result = match message {
            NodeMessage::AdvertiseKeys(m) => self.server.receive_advertisement(&m),
            NodeMessage::ShareKeys(m) => self.server.receive_shares(m),
            NodeMessage::Unmask(m) => self.server.receive_unmask_response(&m),
        };
        result.map_err(refused)?;
        self.waiting_for.remove(&number);
        Ok(())
    }

    /// Records a node's masked input.
    ///
    /// # Errors
    /// As [`SecureRound::receive`].
    pub fn receive_masked(&mut self, node: &NodeId, input: &MaskedInput) -> Result<(), Error> {
        let number = self.sender(node)?;
        self.check_sender(number, input.node, Stage::MaskedInput)?;
        self.server.receive_masked_input(input).map_err(refused)?;
        self.waiting_for.remove(&number);
        Ok(())
    }

    /// The length a masked input must have.
    pub fn vector_len(&self) -> usize {
        self.config.vector_len
    }

    /// Whether `node`'s masked input is still awaited.
    pub fn awaits_masked_input(&self, node: &NodeId) -> bool {
        self.stage == Some(Stage::MaskedInput)
            && self
                .numbers
                .get(node)
                .is_some_and(|n| self.waiting_for.contains(n))
    }

    fn sender(&self, node: &NodeId) -> Result<secagg::NodeId, Error> {
        self.numbers
            .get(node)
            .copied()
            .ok_or_else(|| Error::WrongRound(format!("node {node} is not in this round's cohort")))
    }

    fn check_sender(
        &self,
        number: secagg::NodeId,
        claimed: secagg::NodeId,
        stage: Stage,
    ) -> Result<(), Error> {
        if claimed != number {
            return Err(Error::InvalidRequest(format!(
                "the message names sender {claimed}, but this node is number {number}"
            )));
        }
        if let Some(reason) = &self.abandoned {
            return Err(Error::WrongRound(format!(
                "the round was abandoned: {reason}"
            )));
        }
        if self.stage != Some(stage) {
            return Err(Error::WrongRound(format!(
                "a {stage} message while the round is at {}",
                self.stage
                    .map_or_else(|| "its end".to_string(), |s| s.to_string())
            )));
        }
        if !self.waiting_for.contains(&number) {
            return Err(Error::WrongRound(format!(
                "node {number} already answered the {stage} stage, or was not asked"
            )));
        }
        Ok(())
    }

    /// The coordinator's message to `node` for `stage` (1, 2 or 3).
    ///
    /// # Errors
    /// [`Error::WrongRound`] for a node outside the cohort or a stage without such a message;
    /// [`Error::InvalidRequest`] for a stage number out of range.
    pub fn outgoing(&self, node: &NodeId, stage: u32) -> Result<Outgoing, Error> {
        let number = self.sender(node)?;
        if let Some(reason) = &self.abandoned {
            return Ok(Outgoing::Abandoned(reason.clone()));
        }
        let closed = |s: Stage| self.stage.is_none_or(|current| current > s);
        let missing = || {
            Error::WrongRound(format!(
                "node {number} has no message for stage {stage}: it did not take part in the \
                 stage before"
            ))
        };
        match stage {
            1 if closed(Stage::AdvertiseKeys) => self
                .directory
                .clone()
                .map(Outgoing::Directory)
                .ok_or_else(missing),
            2 if closed(Stage::ShareKeys) => self
                .inboxes
                .get(&number)
                .cloned()
                .map(Outgoing::Inbox)
                .ok_or_else(missing),
            3 if closed(Stage::MaskedInput) => self
                .unmask_requests
                .get(&number)
                .cloned()
                .map(Outgoing::Unmask)
                .ok_or_else(missing),
            1..=3 => Ok(Outgoing::Pending),
            _ => Err(Error::InvalidRequest(format!(
                "stage {stage} has no coordinator message; stages 1 to 3 do"
            ))),
        }
    }

    /// Closes the stage being collected with whoever answered, and opens the next one with
    /// `stage_deadline`, or the round's `masked_deadline` for the masked inputs. Returns
    /// `false` once nothing is left to collect (unmasking closed, or the round abandoned).
    pub fn close_stage(&mut self, stage_deadline: Duration, masked_deadline: Instant) -> bool {
        let Some(stage) = self.stage else {
            return false;
        };
        if self.abandoned.is_some() {
            return false;
        }
        let missing = self.waiting_for.len();
        if missing > 0 {
            warn!(%stage, missing, "stage closed without every node's answer");
        }
        let now = Instant::now();
        let result = match stage {
            Stage::AdvertiseKeys => self.server.close_advertisements().map(|directory| {
                self.waiting_for = directory.nodes.iter().map(|k| k.node).collect();
                self.directory = Some(directory);
                self.stage = Some(Stage::ShareKeys);
                self.deadline = now + stage_deadline;
            }),
            Stage::ShareKeys => self.server.close_shares().map(|inboxes| {
                self.waiting_for = inboxes.iter().map(|i| i.recipient).collect();
                self.inboxes = inboxes.into_iter().map(|i| (i.recipient, i)).collect();
                self.stage = Some(Stage::MaskedInput);
                self.deadline = masked_deadline.max(now + stage_deadline);
            }),
            Stage::MaskedInput => self.server.close_masked_inputs().map(|requests| {
                self.waiting_for = requests.iter().map(|r| r.recipient).collect();
                self.unmask_requests = requests.into_iter().map(|r| (r.recipient, r)).collect();
                self.stage = Some(Stage::Unmasking);
                self.deadline = now + stage_deadline;
            }),
            Stage::Unmasking => {
                self.stage = None;
                Ok(())
            }
        };
        for number in &self.lost {
            self.waiting_for.remove(number);
        }
        match result {
            Ok(()) => {
                info!(closed = %stage, waiting_for = self.waiting_for.len(), "stage closed");
                self.stage.is_some()
            }
            Err(e) => {
                self.abandoned = Some(e.to_string());
                false
            }
        }
    }

    /// Removes the masks and decodes the sum. Costly (every self mask and the pairwise masks
    /// of dropped nodes are regenerated): call it off the async threads.
    ///
    /// # Errors
    /// Why the round cannot publish: it was abandoned, or too few shares arrived to unmask.
    pub fn finish(mut self) -> Result<SecureSum, String> {
        if let Some(reason) = self.abandoned.take() {
            return Err(reason);
        }
        let unmasked = self.server.finish().map_err(|e| e.to_string())?;
        let sum = self
            .quantizer
            .decode_sum(&unmasked.sum)
            .map_err(|e| e.to_string())?;
        let contributors: Vec<NodeId> = unmasked
            .contributors
            .iter()
            .filter_map(|n| self.names.get(n).cloned())
            .collect();
        let noise_multiplier = self.quantizer.node_noise_variance().map(|variance| {
            let survivors = contributors.len() as f64;
            (survivors * variance as f64).sqrt() / self.quantizer.quantized_norm_bound()
        });
        Ok(SecureSum {
            sum,
            contributors,
            noise_multiplier,
        })
    }
}

/// A message the protocol refused, as a request error.
fn refused(error: SecAggError) -> Error {
    match error {
        SecAggError::OutOfOrder { .. }
        | SecAggError::WrongRound { .. }
        | SecAggError::WrongStage { .. }
        | SecAggError::Abandoned(_) => Error::WrongRound(error.to_string()),
        other => Error::InvalidRequest(other.to_string()),
    }
}
