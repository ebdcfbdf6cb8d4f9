//! The node's side of the wire protocol.
//!
//! [`CoordinatorClient`] wraps the generated gRPC client: it streams models and updates in
//! chunks, and converts every message the coordinator sends into checked core values (this is
//! the one place that does), so the worker never handles a raw wire message.

use std::time::Duration;

use athanor_core::model::{Architecture, ModelSpec};
use athanor_core::params;
use athanor_core::plan::{DpSgdRequest, RoundPlan};
use athanor_proto::v1::federation_client::FederationClient;
use athanor_proto::v1::{self as pb};
use athanor_proto::{CHUNK_BYTES, PROTOCOL_VERSION};
use sha2::{Digest, Sha256};
use tonic::transport::Channel;

use athanor_core::secagg::messages::{KeyDirectory, ShareInbox, UnmaskRequest};
use athanor_core::secagg::quantize::{DistributedNoise, QuantizationConfig, Quantizer};
use athanor_core::secagg::{self, SecAggConfig, Stage};

use crate::Error;
use crate::data::Fingerprint;
use crate::ledger::Receipt;

/// What the coordinator said when this node joined.
#[derive(Debug, Clone)]
pub struct Session {
    /// Token for later calls.
    pub token: String,
    /// Name of the federation.
    pub federation: String,
    /// The model being trained.
    pub spec: ModelSpec,
}

/// A model version as downloaded, its parameters checked against the header's hash.
#[derive(Debug, Clone)]
pub struct Model {
    /// Its version number.
    pub version: u64,
    /// Its parameters, in the layout of the session's [`ModelSpec`].
    pub params: Vec<f32>,
    /// SHA-256 of the version's weights file as the coordinator stores it, when the
    /// coordinator says (older ones do not).
    pub weights_sha256: Option<String>,
}

/// A round's work, checked.
#[derive(Debug, Clone)]
pub struct Task {
    /// The round.
    pub round: u64,
    /// Version to start from.
    pub model_version: u64,
    /// Local training asked for.
    pub plan: RoundPlan,
    /// Time the coordinator will wait for the update.
    pub deadline: Duration,
    /// Secure aggregation's parameters; `None` in plain mode.
    pub secure: Option<Box<SecureTask>>,
}

/// A round's secure-aggregation parameters, checked: the protocol configuration validates,
/// the quantizer fits the ring and agrees with it.
#[derive(Debug, Clone)]
pub struct SecureTask {
    /// This node's number in the protocol.
    pub node: secagg::NodeId,
    /// The protocol's parameters.
    pub config: SecAggConfig,
    /// How this node encodes its update.
    pub quantizer: Quantizer,
}

/// The coordinator's answer to a secure-aggregation long poll.
#[derive(Debug)]
pub enum Received {
    /// The stage before has not closed yet.
    Pending,
    /// Stage 1's key directory.
    Directory(KeyDirectory),
    /// Stage 2's share inbox.
    Inbox(ShareInbox),
    /// Stage 3's unmask request.
    Unmask(UnmaskRequest),
    /// The round will not complete.
    Abandoned(String),
}

/// What an update carries.
#[derive(Debug, Clone, Copy)]
pub enum Payload<'a> {
    /// Local parameters minus global parameters, in the clear (plain aggregation).
    Plain(&'a [f32]),
    /// The quantized update plus its masks (secure aggregation).
    Masked {
        /// The protocol round.
        protocol_round: secagg::RoundId,
        /// This node's number.
        node: secagg::NodeId,
        /// Ring elements.
        values: &'a [u32],
    },
}

/// The answer to a long poll.
#[derive(Debug, Clone)]
pub enum Work {
    /// Train.
    Task(Task),
    /// Poll again.
    Idle,
    /// Stop: the federation will run no more rounds.
    Finished(String),
}

/// An update and what the node reports with it.
///
/// It cannot be built without the [`Receipt`] of the ledger entry that records the round's
/// privacy spending, so an update never leaves before its cost is on disk. The round it is
/// sent for is the receipt's.
#[derive(Debug)]
pub struct Update<'a> {
    /// Proof that the round's spending is recorded.
    pub paid: Receipt,
    /// Version trained from.
    pub model_version: u64,
    /// Local training rows (the aggregation weight).
    pub num_examples: u64,
    /// The update itself.
    pub payload: Payload<'a>,
    /// DP-SGD steps taken.
    pub steps: u64,
    /// Mean training loss.
    pub train_loss: f64,
    /// Cumulative example-level `(epsilon, delta)`; `None` without DP.
    pub privacy: Option<(f64, f64)>,
}

/// A client of one coordinator.
#[derive(Debug, Clone)]
pub struct CoordinatorClient {
    inner: FederationClient<Channel>,
    address: String,
}

impl CoordinatorClient {
    /// Wraps a channel to the coordinator at `address` (used in error messages).
    pub fn new(channel: Channel, address: impl Into<String>) -> Self {
        let limit = CHUNK_BYTES * 2;
        CoordinatorClient {
            inner: FederationClient::new(channel)
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit),
            address: address.into(),
        }
    }

    /// The coordinator's address.
    pub fn address(&self) -> &str {
        &self.address
    }

    fn rpc_error(&self, call: &'static str, status: tonic::Status) -> Error {
        Error::Rpc {
            address: self.address.clone(),
            call,
            status: Box::new(status),
        }
    }

    /// Joins the federation to train.
    ///
    /// # Errors
    /// [`Error::Rpc`], or [`Error::Protocol`] when the answer is malformed.
    pub async fn join(&mut self, node_id: &str, data: &Fingerprint) -> Result<Session, Error> {
        let dataset = pb::DatasetFingerprint {
            sha256: data.sha256_hex(),
            rows: data.rows(),
        };
        self.join_as(node_id, Some(dataset), false).await
    }

    /// Joins with a watch-only session: it may fetch models, never takes part in a round, and
    /// leaves this node's training session, if any, as it is.
    ///
    /// # Errors
    /// [`Error::Rpc`], or [`Error::Protocol`] when the answer is malformed.
    pub async fn join_observer(&mut self, node_id: &str) -> Result<Session, Error> {
        self.join_as(node_id, None, true).await
    }

    async fn join_as(
        &mut self,
        node_id: &str,
        dataset: Option<pb::DatasetFingerprint>,
        observer: bool,
    ) -> Result<Session, Error> {
        let request = pb::JoinRequest {
            protocol_version: PROTOCOL_VERSION,
            node_id: node_id.to_string(),
            dataset,
            software_version: env!("CARGO_PKG_VERSION").to_string(),
            observer,
        };
        let response = self
            .inner
            .join(request)
            .await
            .map_err(|s| self.rpc_error("Join", s))?
            .into_inner();
        let spec = response
            .model
            .ok_or_else(|| Error::Protocol("join answer has no model".into()))
            .and_then(spec_from_wire)?;
        Ok(Session {
            token: response.session,
            federation: response.federation,
            spec,
        })
    }

    /// Long-polls for work.
    ///
    /// # Errors
    /// [`Error::Rpc`], or [`Error::Protocol`] for a malformed task.
    pub async fn wait_for_task(&mut self, session: &str) -> Result<Work, Error> {
        let response = self
            .inner
            .wait_for_task(pb::WaitForTaskRequest {
                session: session.to_string(),
            })
            .await
            .map_err(|s| self.rpc_error("WaitForTask", s))?
            .into_inner();
        match response.outcome {
            Some(pb::wait_for_task_response::Outcome::Task(task)) => task_from_wire(task),
            Some(pb::wait_for_task_response::Outcome::Idle(_)) => Ok(Work::Idle),
            Some(pb::wait_for_task_response::Outcome::Finished(f)) => Ok(Work::Finished(f.reason)),
            None => Err(Error::Protocol("empty answer to a poll".into())),
        }
    }

    /// Downloads a model version (the latest when `version` is `None`), checking its length
    /// against `spec` and its hash against the header.
    ///
    /// # Errors
    /// [`Error::Rpc`], or [`Error::Protocol`] when the stream is malformed, too long, not the
    /// version asked for, or does not match its hash.
    pub async fn fetch_model(
        &mut self,
        session: &str,
        version: Option<u64>,
        spec: &ModelSpec,
    ) -> Result<Model, Error> {
        let mut stream = self
            .inner
            .fetch_model(pb::FetchModelRequest {
                session: session.to_string(),
                version,
            })
            .await
            .map_err(|s| self.rpc_error("FetchModel", s))?
            .into_inner();

        let first = stream
            .message()
            .await
            .map_err(|s| self.rpc_error("FetchModel", s))?;
        let Some(pb::ModelChunk {
            part: Some(pb::model_chunk::Part::Header(header)),
        }) = first
        else {
            return Err(Error::Protocol(
                "model stream does not start with a header".into(),
            ));
        };
        if let Some(asked) = version
            && header.version != asked
        {
            return Err(Error::Protocol(format!(
                "asked for model version {asked}, got version {}",
                header.version
            )));
        }
        let expected = spec.num_params();
        if header.num_params != expected as u64 {
            return Err(Error::Protocol(format!(
                "model version {} has {} parameters, expected {expected}",
                header.version, header.num_params
            )));
        }

        let mut bytes = Vec::with_capacity(expected * 4);
        while let Some(chunk) = stream
            .message()
            .await
            .map_err(|s| self.rpc_error("FetchModel", s))?
        {
            let Some(pb::model_chunk::Part::Data(data)) = chunk.part else {
                return Err(Error::Protocol(
                    "a second header in one model stream".into(),
                ));
            };
            if bytes.len() + data.len() > expected * 4 {
                return Err(Error::Protocol("model stream longer than announced".into()));
            }
            bytes.extend_from_slice(&data);
        }
        let digest = hex::encode(Sha256::digest(&bytes));
        if digest != header.params_sha256 {
            return Err(Error::Protocol(format!(
                "model version {} does not match its hash",
                header.version
            )));
        }
        let params = params::from_le_bytes(&bytes, expected)
            .map_err(|e| Error::Protocol(format!("model version {}: {e}", header.version)))?;
        Ok(Model {
            version: header.version,
            params,
            weights_sha256: Some(header.weights_sha256).filter(|hash| !hash.is_empty()),
        })
    }

    /// Sends an update as a header chunk followed by parameter chunks.
    ///
    /// # Errors
    /// [`Error::Rpc`] when the coordinator refuses it or cannot be reached.
    pub async fn submit_update(&mut self, session: &str, update: Update<'_>) -> Result<(), Error> {
        let (bytes, secure) = match update.payload {
            Payload::Plain(delta) => (params::to_le_bytes(delta), None),
            Payload::Masked {
                protocol_round,
                node,
                values,
            } => (
                values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                Some(pb::SecureInput {
                    protocol_round: protocol_round.0,
                    node: node.0,
                }),
            ),
        };
        let header = pb::UpdateHeader {
            session: session.to_string(),
            round: update.paid.round(),
            model_version: update.model_version,
            num_examples: update.num_examples,
            num_params: (bytes.len() / 4) as u64,
            secure,
            report: Some(pb::TrainingReport {
                steps: update.steps,
                train_loss: update.train_loss,
                privacy: Some(match update.privacy {
                    Some((epsilon, delta)) => pb::ExamplePrivacy {
                        dp: true,
                        epsilon,
                        delta,
                    },
                    None => pb::ExamplePrivacy {
                        dp: false,
                        epsilon: f64::INFINITY,
                        delta: 0.0,
                    },
                }),
            }),
        };
        let mut chunks = vec![pb::UpdateChunk {
            part: Some(pb::update_chunk::Part::Header(header)),
        }];
        chunks.extend(bytes.chunks(CHUNK_BYTES).map(|c| pb::UpdateChunk {
            part: Some(pb::update_chunk::Part::Data(c.to_vec())),
        }));

        self.inner
            .submit_update(tokio_stream::iter(chunks))
            .await
            .map_err(|s| self.rpc_error("SubmitUpdate", s))?;
        Ok(())
    }

    /// Sends this node's message for a stage of a secure round.
    ///
    /// # Errors
    /// [`Error::Rpc`] when the coordinator refuses it or cannot be reached.
    pub async fn secagg_send(
        &mut self,
        session: &str,
        round: u64,
        message: pb::sec_agg_send_request::Message,
    ) -> Result<(), Error> {
        self.inner
            .sec_agg_send(pb::SecAggSendRequest {
                session: session.to_string(),
                round,
                message: Some(message),
            })
            .await
            .map_err(|s| self.rpc_error("SecAggSend", s))?;
        Ok(())
    }

    /// Long-polls for the coordinator's message for `stage` of a secure round.
    ///
    /// # Errors
    /// [`Error::Rpc`], or [`Error::Protocol`] for an empty answer or one for another stage.
    pub async fn secagg_receive(
        &mut self,
        session: &str,
        round: u64,
        stage: Stage,
    ) -> Result<Received, Error> {
        use pb::sec_agg_receive_response::Outcome;
        let response = self
            .inner
            .sec_agg_receive(pb::SecAggReceiveRequest {
                session: session.to_string(),
                round,
                stage: stage.number(),
            })
            .await
            .map_err(|s| self.rpc_error("SecAggReceive", s))?
            .into_inner();
        let received = match response.outcome {
            Some(Outcome::Pending(_)) => Received::Pending,
            Some(Outcome::KeyDirectory(m)) if stage == Stage::ShareKeys => {
                Received::Directory(m.into())
            }
            Some(Outcome::ShareInbox(m)) if stage == Stage::MaskedInput => {
                Received::Inbox(m.into())
            }
            Some(Outcome::UnmaskRequest(m)) if stage == Stage::Unmasking => {
                Received::Unmask(m.into())
            }
            Some(Outcome::Abandoned(f)) => Received::Abandoned(f.reason),
            Some(_) => {
                return Err(Error::Protocol(format!(
                    "the coordinator answered a poll for the {stage} stage with another \
                     stage's message"
                )));
            }
            None => return Err(Error::Protocol("empty secure-aggregation answer".into())),
        };
        Ok(received)
    }

    /// Declines a round with a reason the coordinator records.
    ///
    /// # Errors
    /// [`Error::Rpc`].
    pub async fn decline(
        &mut self,
        session: &str,
        round: u64,
        reason: &str,
        leaving: bool,
    ) -> Result<(), Error> {
        self.inner
            .decline_task(pb::DeclineTaskRequest {
                session: session.to_string(),
                round,
                reason: reason.to_string(),
                leaving,
            })
            .await
            .map_err(|s| self.rpc_error("DeclineTask", s))?;
        Ok(())
    }
}

fn spec_from_wire(spec: pb::ModelSpec) -> Result<ModelSpec, Error> {
    let architecture = match spec.architecture {
        Some(pb::model_spec::Architecture::LogisticRegression(_)) => {
            Architecture::LogisticRegression
        }
        Some(pb::model_spec::Architecture::Mlp(mlp)) if mlp.hidden > 0 => Architecture::Mlp {
            hidden: mlp.hidden as usize,
        },
        _ => {
            return Err(Error::Protocol(
                "unknown or empty model architecture".into(),
            ));
        }
    };
    if spec.features == 0 || spec.classes < 2 {
        return Err(Error::Protocol(format!(
            "model with {} features and {} classes",
            spec.features, spec.classes
        )));
    }
    Ok(ModelSpec {
        architecture,
        features: spec.features as usize,
        classes: spec.classes as usize,
    })
}

fn task_from_wire(task: pb::Task) -> Result<Work, Error> {
    let secure = match (pb::AggregationMode::try_from(task.aggregation), task.secure) {
        (Ok(pb::AggregationMode::Plain), None) => None,
        (Ok(pb::AggregationMode::Secure), Some(secure)) => {
            Some(Box::new(secure_from_wire(secure).map_err(|e| {
                Error::Protocol(format!("round {} secure aggregation: {e}", task.round))
            })?))
        }
        (Ok(pb::AggregationMode::Secure), None) => {
            return Err(Error::Protocol(format!(
                "round {} asks for secure aggregation without its parameters",
                task.round
            )));
        }
        _ => {
            return Err(Error::Protocol(format!(
                "round {} asks for aggregation mode {}, which this node does not support",
                task.round, task.aggregation
            )));
        }
    };
    let training = task.training.ok_or_else(|| {
        Error::Protocol(format!("round {} task has no training plan", task.round))
    })?;
    let plan = RoundPlan {
        learning_rate: training.learning_rate,
        local_epochs: training.local_epochs,
        expected_batch_size: training.expected_batch_size,
        dp: training.dp.map(|dp| DpSgdRequest {
            clip_norm: dp.clip_norm,
            noise_multiplier: dp.noise_multiplier,
        }),
    };
    plan.validate()
        .map_err(|e| Error::Protocol(format!("round {} plan: {e}", task.round)))?;
    Ok(Work::Task(Task {
        round: task.round,
        model_version: task.model_version,
        plan,
        deadline: Duration::from_millis(task.deadline_ms),
        secure,
    }))
}

/// Checks a round's secure-aggregation parameters as far as a node can: the protocol
/// configuration is valid and invites this node, and the quantizer fits the ring and agrees
/// with the protocol on lengths, cohort and survivors.
///
/// # Errors
/// A message naming the parameter at fault.
pub fn secure_from_wire(wire: pb::SecureAggregation) -> Result<SecureTask, String> {
    let usize_of = |name: &str, v: u64| {
        usize::try_from(v).map_err(|_| format!("{name} = {v} does not fit this machine"))
    };
    let q = wire
        .quantization
        .ok_or_else(|| "no quantization parameters".to_string())?;
    let config = SecAggConfig {
        round: secagg::RoundId(wire.protocol_round),
        cohort: wire.cohort.iter().copied().map(secagg::NodeId).collect(),
        vector_len: usize_of("vector_len", wire.vector_len)?,
        ring_bits: wire.ring_bits,
        complete_graph_max: usize_of("complete_graph_max", wire.complete_graph_max)?,
        degree: usize_of("degree", wire.degree)?,
        threshold_percent: wire.threshold_percent,
        min_survivors: usize_of("min_survivors", wire.min_survivors)?,
    };
    config.validate().map_err(|e| e.to_string())?;
    let node = secagg::NodeId(wire.node);
    if !config.contains(node) {
        return Err(format!("this node's number {node} is not in the cohort"));
    }
    let rotation_seed = match q.rotation_seed.len() {
        0 => None,
        32 => {
            let mut seed = [0u8; 32];
            seed.copy_from_slice(&q.rotation_seed);
            Some(seed)
        }
        n => return Err(format!("a rotation seed of {n} bytes, not 32")),
    };
    let noise = match q.noise_sum_std {
        Some(sum_std) => DistributedNoise::Gaussian {
            sum_std,
            min_survivors: usize_of("noise_min_survivors", q.noise_min_survivors)?,
        },
        None => DistributedNoise::InsecureNone,
    };
    let quantizer = Quantizer::new(QuantizationConfig {
        dimension: usize_of("dimension", q.dimension)?,
        clip_norm: q.clip_norm,
        granularity: q.granularity,
        rotation_seed,
        noise,
        max_contributors: usize_of("max_contributors", q.max_contributors)?,
        ring_bits: wire.ring_bits,
        tail_bits: q.tail_bits,
    })
    .map_err(|e| e.to_string())?;
    quantizer.check_round(&config).map_err(|e| e.to_string())?;
    Ok(SecureTask {
        node,
        config,
        quantizer,
    })
}
