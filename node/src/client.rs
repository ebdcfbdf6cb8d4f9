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
    /// Local parameters minus global parameters.
    pub delta: &'a [f32],
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
        let header = pb::UpdateHeader {
            session: session.to_string(),
            round: update.paid.round(),
            model_version: update.model_version,
            num_examples: update.num_examples,
            num_params: update.delta.len() as u64,
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
        let bytes = params::to_le_bytes(update.delta);
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
    if task.aggregation != pb::AggregationMode::Plain as i32 {
        return Err(Error::Protocol(format!(
            "round {} asks for aggregation mode {}, which this node does not support",
            task.round, task.aggregation
        )));
    }
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
    }))
}
