//! The gRPC services: the node-facing `Federation` and the operator-facing `Admin`.
//!
//! Both are thin: they convert wire messages into checked values (this module is the one
//! place that does), call [`Coordinator`], and map its errors to status codes in
//! [`status_of`]. Internal details (paths, store errors) are logged here and never sent to
//! the peer.

use std::pin::Pin;

use athanor_core::model::{Architecture, ModelSpec};
use athanor_core::params;
use athanor_core::plan::RoundPlan;
use athanor_proto::v1::admin_server::Admin;
use athanor_proto::v1::federation_server::Federation;
use athanor_proto::v1::{self as pb};
use athanor_proto::{CHUNK_BYTES, PROTOCOL_VERSION};
use sha2::{Digest, Sha256};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, error, warn};

use crate::Error;
use crate::round::{Coordinator, NodeId, Poll, UpdateHeader};
use crate::store::{DatasetFingerprint, Epsilon, Manifest, VersionStatus};

/// Longest node id accepted at join.
const MAX_NODE_ID_LEN: usize = 128;

/// The node-facing service.
#[derive(Debug, Clone)]
pub struct FederationService {
    coordinator: Coordinator,
}

impl FederationService {
    /// Serves `coordinator` to nodes.
    pub fn new(coordinator: Coordinator) -> Self {
        FederationService { coordinator }
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Federation for FederationService {
    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let request = request.into_inner();
        if request.protocol_version != PROTOCOL_VERSION {
            return Err(status_of(Error::ProtocolVersion {
                expected: PROTOCOL_VERSION,
                got: request.protocol_version,
            }));
        }
        let node = node_id(&request.node_id).map_err(status_of)?;
        let fingerprint = request.dataset.map(|d| DatasetFingerprint {
            node: node.0.clone(),
            sha256: d.sha256,
            rows: d.rows,
        });

        let joined = self.coordinator.join(node, fingerprint);
        Ok(Response::new(pb::JoinResponse {
            session: joined.session,
            federation: self.coordinator.federation().to_string(),
            protocol_version: PROTOCOL_VERSION,
            model: Some(spec_to_wire(&joined.spec)),
            latest_version: Some(joined.latest_version),
        }))
    }

    async fn wait_for_task(
        &self,
        request: Request<pb::WaitForTaskRequest>,
    ) -> Result<Response<pb::WaitForTaskResponse>, Status> {
        let session = request.into_inner().session;
        let outcome = match self.coordinator.wait_for_task(&session).await {
            Ok(Poll::Task(task)) => pb::wait_for_task_response::Outcome::Task(pb::Task {
                round: task.round,
                model_version: task.model_version,
                training: Some(plan_to_wire(&task.plan)),
                aggregation: pb::AggregationMode::Plain as i32,
                deadline_ms: u64::try_from(task.time_left.as_millis()).unwrap_or(u64::MAX),
            }),
            Ok(Poll::Idle(reason)) => {
                pb::wait_for_task_response::Outcome::Idle(pb::Idle { reason })
            }
            Ok(Poll::Finished(reason)) => {
                pb::wait_for_task_response::Outcome::Finished(pb::Finished { reason })
            }
            Err(e) => return Err(status_of(e)),
        };
        Ok(Response::new(pb::WaitForTaskResponse {
            outcome: Some(outcome),
        }))
    }

    type FetchModelStream = BoxStream<pb::ModelChunk>;

    async fn fetch_model(
        &self,
        request: Request<pb::FetchModelRequest>,
    ) -> Result<Response<Self::FetchModelStream>, Status> {
        let request = request.into_inner();
        let global = self.coordinator.global();
        let (version, params) = match request.version {
            None => (global.manifest.version, global.params.clone()),
            Some(v) if v == global.manifest.version => (v, global.params.clone()),
            Some(v) => {
                let store = self.coordinator.store();
                let loaded = tokio::task::spawn_blocking(move || store.load(v))
                    .await
                    .map_err(|_| Status::internal("loading the model failed"))?;
                match loaded {
                    Ok((_, params)) => (v, params),
                    Err(crate::store::StoreError::NotFound { .. }) => {
                        return Err(status_of(Error::VersionNotFound(v)));
                    }
                    Err(e) => return Err(status_of(Error::Store(e))),
                }
            }
        };
        debug!(version, "serving model");

        let bytes = params::to_le_bytes(&params);
        let header = pb::ModelHeader {
            version,
            model: Some(spec_to_wire(&self.coordinator.spec())),
            num_params: params.len() as u64,
            params_sha256: hex::encode(Sha256::digest(&bytes)),
        };
        let mut chunks = vec![Ok(pb::ModelChunk {
            part: Some(pb::model_chunk::Part::Header(header)),
        })];
        chunks.extend(bytes.chunks(CHUNK_BYTES).map(|c| {
            Ok(pb::ModelChunk {
                part: Some(pb::model_chunk::Part::Data(c.to_vec())),
            })
        }));
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }

    async fn submit_update(
        &self,
        request: Request<Streaming<pb::UpdateChunk>>,
    ) -> Result<Response<pb::SubmitUpdateResponse>, Status> {
        let mut stream = request.into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty update stream"))?;
        let Some(pb::update_chunk::Part::Header(header)) = first.part else {
            return Err(Status::invalid_argument(
                "an update stream must start with its header",
            ));
        };
        let session = header.session.clone();
        let header = update_header(header).map_err(status_of)?;
        let node = self
            .coordinator
            .check_update(&session, &header)
            .map_err(|e| refuse(&session, e))?;

        // The header's length was checked against the model, so this bound is the model size.
        let expected_bytes = header.num_params * 4;
        let mut bytes = Vec::with_capacity(expected_bytes);
        while let Some(chunk) = stream.message().await? {
            let Some(pb::update_chunk::Part::Data(data)) = chunk.part else {
                return Err(Status::invalid_argument("a second header in one update"));
            };
            if bytes.len() + data.len() > expected_bytes {
                warn!(%node, "update longer than its header says; refused");
                return Err(Status::invalid_argument(format!(
                    "update payload exceeds the {expected_bytes} bytes its header announced"
                )));
            }
            bytes.extend_from_slice(&data);
        }
        let delta = params::from_le_bytes(&bytes, header.num_params).map_err(|e| {
            warn!(%node, error = %e, "update payload refused");
            Status::invalid_argument(format!("update payload: {e}"))
        })?;

        self.coordinator
            .submit_update(&session, header, delta)
            .map_err(|e| refuse(&session, e))?;
        Ok(Response::new(pb::SubmitUpdateResponse { accepted: true }))
    }

    async fn decline_task(
        &self,
        request: Request<pb::DeclineTaskRequest>,
    ) -> Result<Response<pb::DeclineTaskResponse>, Status> {
        let request = request.into_inner();
        let reason: String = request.reason.chars().take(500).collect();
        self.coordinator
            .decline(&request.session, request.round, reason)
            .map_err(status_of)?;
        Ok(Response::new(pb::DeclineTaskResponse {}))
    }

    type WatchVersionsStream = BoxStream<pb::VersionAnnouncement>;

    async fn watch_versions(
        &self,
        request: Request<pb::WatchVersionsRequest>,
    ) -> Result<Response<Self::WatchVersionsStream>, Status> {
        let after = request.into_inner().after_version;
        // Subscribe before reading the backlog so nothing published in between is missed;
        // duplicates are dropped by version number below.
        let mut live = self.coordinator.subscribe();
        let store = self.coordinator.store();
        let backlog = tokio::task::spawn_blocking(move || store.list())
            .await
            .map_err(|_| Status::internal("listing versions failed"))?;

        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            let mut last = after;
            for entry in backlog {
                if let VersionStatus::Valid(manifest) = entry.status
                    && after.is_none_or(|a| manifest.version > a)
                {
                    last = Some(manifest.version);
                    if tx.send(Ok(announcement(&manifest))).await.is_err() {
                        return;
                    }
                }
            }
            loop {
                match live.recv().await {
                    Ok(manifest) if last.is_none_or(|l| manifest.version > l) => {
                        last = Some(manifest.version);
                        if tx.send(Ok(announcement(&manifest))).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        let status = Status::data_loss(format!(
                            "watcher fell {n} versions behind; watch again from version {}",
                            last.unwrap_or(0)
                        ));
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Logs why a node's request was refused, then maps the error.
fn refuse(session: &str, error: Error) -> Status {
    let session_prefix: String = session.chars().take(8).collect();
    warn!(session = %session_prefix, %error, "request refused");
    status_of(error)
}

/// The one mapping from coordinator errors to gRPC status codes.
pub fn status_of(error: Error) -> Status {
    match error {
        Error::UnknownSession => Status::unauthenticated(error.to_string()),
        Error::ProtocolVersion { .. } | Error::WrongRound(_) => {
            Status::failed_precondition(error.to_string())
        }
        Error::InvalidRequest(_) => Status::invalid_argument(error.to_string()),
        Error::VersionNotFound(_) => Status::not_found(error.to_string()),
        Error::ShuttingDown => Status::unavailable(error.to_string()),
        Error::Store(crate::store::StoreError::Damaged { .. }) => {
            error!(%error, "refusing to serve a damaged version");
            Status::data_loss("that version is damaged in the coordinator's store")
        }
        other => {
            error!(error = %other, "internal error");
            Status::internal("internal coordinator error")
        }
    }
}

fn node_id(raw: &str) -> Result<NodeId, Error> {
    let valid = !raw.is_empty()
        && raw.len() <= MAX_NODE_ID_LEN
        && raw
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !valid {
        return Err(Error::InvalidRequest(format!(
            "node id must be 1 to {MAX_NODE_ID_LEN} characters of [A-Za-z0-9._-]"
        )));
    }
    Ok(NodeId(raw.to_string()))
}

fn update_header(header: pb::UpdateHeader) -> Result<UpdateHeader, Error> {
    let report = header
        .report
        .ok_or_else(|| Error::InvalidRequest("update header has no training report".into()))?;
    let privacy = report
        .privacy
        .ok_or_else(|| Error::InvalidRequest("training report has no privacy figures".into()))?;
    let (epsilon, delta) = if privacy.dp {
        if !(privacy.epsilon.is_finite() && privacy.epsilon >= 0.0) {
            return Err(Error::InvalidRequest(format!(
                "reported epsilon {} is not a finite non-negative number",
                privacy.epsilon
            )));
        }
        if !(privacy.delta > 0.0 && privacy.delta < 1.0) {
            return Err(Error::InvalidRequest(format!(
                "reported delta {} is outside (0, 1)",
                privacy.delta
            )));
        }
        (Epsilon::Finite(privacy.epsilon), Some(privacy.delta))
    } else {
        (Epsilon::Unbounded, None)
    };
    let num_params = usize::try_from(header.num_params)
        .map_err(|_| Error::InvalidRequest("num_params does not fit this machine".into()))?;
    Ok(UpdateHeader {
        round: header.round,
        model_version: header.model_version,
        num_examples: header.num_examples,
        num_params,
        train_loss: report.train_loss,
        privacy: epsilon,
        delta,
    })
}

fn announcement(manifest: &Manifest) -> pb::VersionAnnouncement {
    pb::VersionAnnouncement {
        version: manifest.version,
        round: manifest.round,
        contributors: manifest.contributors,
        weights_sha256: manifest.weights_sha256.clone(),
    }
}

/// A model spec on the wire.
pub fn spec_to_wire(spec: &ModelSpec) -> pb::ModelSpec {
    let architecture = match spec.architecture {
        Architecture::LogisticRegression => {
            pb::model_spec::Architecture::LogisticRegression(pb::LogisticRegression {})
        }
        Architecture::Mlp { hidden } => pb::model_spec::Architecture::Mlp(pb::Mlp {
            hidden: hidden as u32,
        }),
    };
    pb::ModelSpec {
        architecture: Some(architecture),
        features: spec.features as u32,
        classes: spec.classes as u32,
    }
}

fn plan_to_wire(plan: &RoundPlan) -> pb::TrainingPlan {
    pb::TrainingPlan {
        learning_rate: plan.learning_rate,
        local_epochs: plan.local_epochs,
        expected_batch_size: plan.expected_batch_size,
        dp: plan.dp.map(|dp| pb::DpSgd {
            clip_norm: dp.clip_norm,
            noise_multiplier: dp.noise_multiplier,
        }),
    }
}

/// The operator-facing service.
#[derive(Debug, Clone)]
pub struct AdminService {
    coordinator: Coordinator,
}

impl AdminService {
    /// Serves `coordinator` to operators.
    pub fn new(coordinator: Coordinator) -> Self {
        AdminService { coordinator }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let status = self.coordinator.status();
        Ok(Response::new(pb::StatusResponse {
            federation: status.federation,
            round: status.round,
            stage: status.stage.to_string(),
            connected_nodes: status.connected_nodes as u32,
            latest_version: Some(status.latest_version),
            rounds_completed: status.rounds_completed,
            rounds_abandoned: status.rounds_abandoned,
        }))
    }

    async fn list_versions(
        &self,
        _request: Request<pb::ListVersionsRequest>,
    ) -> Result<Response<pb::ListVersionsResponse>, Status> {
        let store = self.coordinator.store();
        let entries = tokio::task::spawn_blocking(move || store.list())
            .await
            .map_err(|_| Status::internal("listing versions failed"))?;
        let manifests_json = entries
            .into_iter()
            .filter_map(|entry| match entry.status {
                VersionStatus::Valid(m) => serde_json::to_string(&m).ok(),
                VersionStatus::Damaged(_) => None,
            })
            .collect();
        Ok(Response::new(pb::ListVersionsResponse { manifests_json }))
    }

    async fn get_version(
        &self,
        request: Request<pb::GetVersionRequest>,
    ) -> Result<Response<pb::GetVersionResponse>, Status> {
        let version = request.into_inner().version;
        let store = self.coordinator.store();
        let manifest = tokio::task::spawn_blocking(move || store.manifest(version))
            .await
            .map_err(|_| Status::internal("reading the manifest failed"))?
            .map_err(|e| match e {
                crate::store::StoreError::NotFound { .. } => {
                    status_of(Error::VersionNotFound(version))
                }
                e => status_of(Error::Store(e)),
            })?;
        let manifest_json = serde_json::to_string_pretty(&manifest)
            .map_err(|_| Status::internal("encoding the manifest failed"))?;
        Ok(Response::new(pb::GetVersionResponse { manifest_json }))
    }
}
