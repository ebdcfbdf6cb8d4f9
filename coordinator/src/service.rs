//! The gRPC services: the node-facing `Federation` and the operator-facing `Admin`.
//!
//! Both are thin: they convert wire messages into checked values (this module is the one
//! place that does), call [`Coordinator`], and map its errors to status codes in
//! [`status_of`]. Internal details (paths, store errors) are logged here and never sent to
//! the peer.
//!
//! Every request a node gets wrong is refused with a status code that says whose fault it is
//! and a logged reason (`warn`, or `info` for an unknown session, which every node meets once
//! after a coordinator restart), and leaves the open round as it was: a refused update does
//! not count as the node's answer, so the node may still send a good one. In particular an
//! update is refused with
//!
//! - `UNAUTHENTICATED` when its session is unknown (never joined, or replaced by a newer join);
//! - `PERMISSION_DENIED` under mutual TLS when its session was opened by another node than the
//!   one its connection's certificate names (the same holds for every call that names a
//!   session);
//! - `FAILED_PRECONDITION` when it is for another round or model version, comes from a node
//!   outside the cohort or one that already answered, streams past the round's deadline, or
//!   comes from a watch-only session (which may only fetch models);
//! - `INVALID_ARGUMENT` when the stream is empty, does not start with a header, holds a second
//!   header or an empty chunk, announces a length other than the model's, carries more or
//!   fewer bytes than it announced, or holds a NaN or infinite value;
//! - `OUT_OF_RANGE` (from the transport) when one chunk exceeds twice [`CHUNK_BYTES`].
//!
//! The admin service answers operators. It shares the node-facing listener; under mutual TLS
//! only clients with an operator's certificate reach it, and nodes reach only the node-facing
//! service, as the gates of [`crate::access`] decide before any handler runs.

use std::pin::Pin;
use std::time::Duration;

use athanor_core::accountant::Accountant;
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
use tracing::{debug, error, info, warn};

use crate::Error;
use crate::access::Caller;
use crate::node_privacy::Spending;
use crate::round::{Coordinator, NodeId, Poll, UpdateHeader};
use crate::secure::{NodeMessage, Outgoing, SecureTask};
use crate::store::{self, DatasetFingerprint, Epsilon, Manifest, StoreError, VersionStatus};
use athanor_core::secagg::quantize::DistributedNoise;

/// Longest node id accepted at join.
const MAX_NODE_ID_LEN: usize = 128;

/// How long past the round's deadline an update may still be streaming: enough for a payload
/// that started in time to finish over a slow link, short enough that a stalled stream does not
/// hold its task for long.
const STREAM_GRACE: Duration = Duration::from_secs(10);

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

impl FederationService {
    /// Refuses a call whose connection's certificate names another node than the one that
    /// joined with `session` (see [`crate::access`]). Checked before the call does anything,
    /// which is sound because a token names the same node for as long as it is valid.
    fn check_caller(&self, caller: &Caller, session: &str) -> Result<(), Status> {
        let owner = self
            .coordinator
            .session_owner(session)
            .map_err(|e| refuse(session, e))?;
        caller.check_owner(&owner.0)
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Federation for FederationService {
    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        // Under mutual TLS the node is who its certificate says, whatever it claims.
        crate::access::check_claim(&request)?;
        let request = request.into_inner();
        if request.protocol_version != PROTOCOL_VERSION {
            return Err(refuse_join(Error::ProtocolVersion {
                expected: PROTOCOL_VERSION,
                got: request.protocol_version,
            }));
        }
        let node = node_id(&request.node_id).map_err(refuse_join)?;
        let joined = if request.observer {
            self.coordinator.join_observer(node)
        } else {
            let fingerprint = request.dataset.map(|d| DatasetFingerprint {
                node: node.0.clone(),
                sha256: d.sha256,
                rows: d.rows,
            });
            self.coordinator.join(node, fingerprint)
        };
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
        let caller = Caller::of(&request);
        let session = request.into_inner().session;
        self.check_caller(&caller, &session)?;
        let outcome = match self.coordinator.wait_for_task(&session).await {
            Ok(Poll::Task(task)) => pb::wait_for_task_response::Outcome::Task(pb::Task {
                round: task.round,
                model_version: task.model_version,
                training: Some(plan_to_wire(&task.plan)),
                aggregation: if task.secure.is_some() {
                    pb::AggregationMode::Secure as i32
                } else {
                    pb::AggregationMode::Plain as i32
                },
                deadline_ms: u64::try_from(task.time_left.as_millis()).unwrap_or(u64::MAX),
                secure: task.secure.as_deref().map(secure_task_to_wire),
            }),
            Ok(Poll::Idle(reason)) => {
                pb::wait_for_task_response::Outcome::Idle(pb::Idle { reason })
            }
            Ok(Poll::Finished(reason)) => {
                pb::wait_for_task_response::Outcome::Finished(pb::Finished { reason })
            }
            Err(e) => return Err(refuse(&session, e)),
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
        let caller = Caller::of(&request);
        let request = request.into_inner();
        self.check_caller(&caller, &request.session)?;
        self.coordinator
            .check_session(&request.session)
            .map_err(|e| refuse(&request.session, e))?;
        let global = self.coordinator.global();
        let (version, weights_sha256, params) = match request.version {
            None => (
                global.manifest.version,
                global.manifest.weights_sha256.clone(),
                global.params.clone(),
            ),
            Some(v) if v == global.manifest.version => (
                v,
                global.manifest.weights_sha256.clone(),
                global.params.clone(),
            ),
            Some(v) => {
                let store = self.coordinator.store();
                let loaded = tokio::task::spawn_blocking(move || store.load(v))
                    .await
                    .map_err(|_| Status::internal("loading the model failed"))?;
                match loaded {
                    Ok((manifest, params)) => (v, manifest.weights_sha256, params),
                    Err(e) => return Err(refuse(&request.session, store_error(v, e))),
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
            weights_sha256,
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
        let caller = Caller::of(&request);
        let mut stream = request.into_inner();
        let header = match stream.message().await.map_err(|s| refuse_stream("", s))? {
            Some(pb::UpdateChunk {
                part: Some(pb::update_chunk::Part::Header(header)),
            }) => header,
            Some(_) => {
                let reason = "an update stream must start with its header";
                return Err(refuse("", Error::InvalidRequest(reason.into())));
            }
            None => {
                return Err(refuse(
                    "",
                    Error::InvalidRequest("empty update stream".into()),
                ));
            }
        };
        let session = header.session.clone();
        self.check_caller(&caller, &session)?;
        let header = update_header(header).map_err(|e| refuse(&session, e))?;
        let node = self
            .coordinator
            .check_update(&session, &header)
            .map_err(|e| refuse(&session, e))?;
        debug!(%node, round = header.round, "update header accepted");

        // The header's length was checked against the round, so this bound is the model size
        // (or the masked vector's length, a power of two at most twice it).
        let expected_bytes = header.num_params * 4;
        let time_left = self.coordinator.round_time_left().unwrap_or_default();
        let bytes = read_payload(&mut stream, expected_bytes, time_left + STREAM_GRACE)
            .await
            .map_err(|e| match e {
                Payload::Refused(e) => refuse(&session, e),
                Payload::Transport(status) => refuse_stream(&session, status),
            })?;
        if header.secure.is_some() {
            let masked = bytes
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            self.coordinator
                .submit_masked(&session, header, masked)
                .map_err(|e| refuse(&session, e))?;
            return Ok(Response::new(pb::SubmitUpdateResponse { accepted: true }));
        }
        let delta = params::from_le_bytes(&bytes, header.num_params).map_err(|e| {
            refuse(
                &session,
                Error::InvalidRequest(format!("update payload: {e}")),
            )
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
        let caller = Caller::of(&request);
        let request = request.into_inner();
        self.check_caller(&caller, &request.session)?;
        let reason: String = request.reason.chars().take(500).collect();
        self.coordinator
            .decline(&request.session, request.round, reason, request.leaving)
            .map_err(|e| refuse(&request.session, e))?;
        Ok(Response::new(pb::DeclineTaskResponse {}))
    }

    async fn sec_agg_send(
        &self,
        request: Request<pb::SecAggSendRequest>,
    ) -> Result<Response<pb::SecAggSendResponse>, Status> {
        let caller = Caller::of(&request);
        let request = request.into_inner();
        self.check_caller(&caller, &request.session)?;
        let message = match request.message {
            Some(pb::sec_agg_send_request::Message::AdvertiseKeys(m)) => {
                NodeMessage::AdvertiseKeys(m.into())
            }
            Some(pb::sec_agg_send_request::Message::ShareKeys(m)) => {
                NodeMessage::ShareKeys(m.into())
            }
            Some(pb::sec_agg_send_request::Message::Unmask(m)) => NodeMessage::Unmask(m.into()),
            None => {
                let reason = "a secure-aggregation message with no content";
                return Err(refuse(
                    &request.session,
                    Error::InvalidRequest(reason.into()),
                ));
            }
        };
        self.coordinator
            .secure_send(&request.session, request.round, message)
            .map_err(|e| refuse(&request.session, e))?;
        Ok(Response::new(pb::SecAggSendResponse {}))
    }

    async fn sec_agg_receive(
        &self,
        request: Request<pb::SecAggReceiveRequest>,
    ) -> Result<Response<pb::SecAggReceiveResponse>, Status> {
        use pb::sec_agg_receive_response::Outcome as Wire;
        let caller = Caller::of(&request);
        let request = request.into_inner();
        self.check_caller(&caller, &request.session)?;
        let outgoing = self
            .coordinator
            .secure_receive(&request.session, request.round, request.stage)
            .await
            .map_err(|e| refuse(&request.session, e))?;
        let outcome = match outgoing {
            Outgoing::Pending => Wire::Pending(pb::Idle {
                reason: "the stage before has not closed yet".into(),
            }),
            Outgoing::Directory(m) => Wire::KeyDirectory(m.into()),
            Outgoing::Inbox(m) => Wire::ShareInbox(m.into()),
            Outgoing::Unmask(m) => Wire::UnmaskRequest(m.into()),
            Outgoing::Abandoned(reason) => Wire::Abandoned(pb::Finished { reason }),
        };
        Ok(Response::new(pb::SecAggReceiveResponse {
            outcome: Some(outcome),
        }))
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

/// Why reading an update's payload stopped.
enum Payload {
    /// The payload breaks the protocol.
    Refused(Error),
    /// The stream itself failed (the peer went away, a chunk over the size limit).
    Transport(Status),
}

/// Reads an update's data chunks: at most `expected_bytes` in all, none empty (so a stream
/// cannot spin on empty messages), no second header, and all within `limit`.
async fn read_payload(
    stream: &mut Streaming<pb::UpdateChunk>,
    expected_bytes: usize,
    limit: Duration,
) -> Result<Vec<u8>, Payload> {
    let read = async {
        let mut bytes = Vec::with_capacity(expected_bytes);
        while let Some(chunk) = stream.message().await.map_err(Payload::Transport)? {
            let data = match chunk.part {
                Some(pb::update_chunk::Part::Data(data)) => data,
                Some(pb::update_chunk::Part::Header(_)) => {
                    let reason = "a second header in one update";
                    return Err(Payload::Refused(Error::InvalidRequest(reason.into())));
                }
                None => {
                    let reason = "an update chunk with neither header nor data";
                    return Err(Payload::Refused(Error::InvalidRequest(reason.into())));
                }
            };
            if data.is_empty() {
                let reason = "an empty data chunk in an update";
                return Err(Payload::Refused(Error::InvalidRequest(reason.into())));
            }
            if bytes.len() + data.len() > expected_bytes {
                return Err(Payload::Refused(Error::InvalidRequest(format!(
                    "update payload exceeds the {expected_bytes} bytes its header announced"
                ))));
            }
            bytes.extend_from_slice(&data);
        }
        Ok(bytes)
    };
    match tokio::time::timeout(limit, read).await {
        Ok(read) => read,
        Err(_) => Err(Payload::Refused(Error::WrongRound(
            "the update was still streaming after the round's deadline".into(),
        ))),
    }
}

/// Logs why a node's request was refused, then maps the error. An unknown session is what
/// every node meets once after the coordinator restarts, so it is not a warning.
fn refuse(session: &str, error: Error) -> Status {
    let session_prefix: String = session.chars().take(8).collect();
    match &error {
        Error::UnknownSession => {
            info!(session = %session_prefix, "request from an unknown session; the node must join again");
        }
        _ => warn!(session = %session_prefix, %error, "request refused"),
    }
    status_of(error)
}

/// Logs a refused join (no session yet), then maps the error.
fn refuse_join(error: Error) -> Status {
    warn!(%error, "join refused");
    status_of(error)
}

/// Logs a stream that failed under the transport (a message over the size limit, a peer that
/// went away) and passes its status on.
fn refuse_stream(session: &str, status: Status) -> Status {
    let session_prefix: String = session.chars().take(8).collect();
    warn!(
        session = %session_prefix,
        code = ?status.code(),
        message = status.message(),
        "update stream failed"
    );
    status
}

/// The error to report for a store failure while reading `version`.
fn store_error(version: u64, error: StoreError) -> Error {
    match error {
        StoreError::NotFound { .. } => Error::VersionNotFound(version),
        other => Error::Store(other),
    }
}

/// The one mapping from coordinator errors to gRPC status codes.
pub fn status_of(error: Error) -> Status {
    match error {
        Error::UnknownSession => Status::unauthenticated(error.to_string()),
        Error::ProtocolVersion { .. } | Error::WrongRound(_) | Error::WatchOnly => {
            Status::failed_precondition(error.to_string())
        }
        Error::InvalidRequest(_) => Status::invalid_argument(error.to_string()),
        Error::VersionNotFound(_) => Status::not_found(error.to_string()),
        Error::ShuttingDown => Status::unavailable(error.to_string()),
        Error::Store(StoreError::Damaged { version, .. }) => {
            error!(%error, "refusing to serve a damaged version");
            Status::data_loss(format!(
                "version {version} is damaged in the coordinator's store and is not served"
            ))
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
    let secure = header.secure.map(|s| {
        (
            athanor_core::secagg::RoundId(s.protocol_round),
            athanor_core::secagg::NodeId(s.node),
        )
    });
    Ok(UpdateHeader {
        secure,
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

fn secure_task_to_wire(task: &SecureTask) -> pb::SecureAggregation {
    let c = &task.config;
    let q = &task.quantization;
    let (noise_sum_std, noise_min_survivors) = match q.noise {
        DistributedNoise::Gaussian {
            sum_std,
            min_survivors,
        } => (Some(sum_std), min_survivors as u64),
        DistributedNoise::InsecureNone => (None, 0),
    };
    pb::SecureAggregation {
        protocol_round: c.round.0,
        node: task.node.0,
        cohort: c.cohort.iter().map(|n| n.0).collect(),
        vector_len: c.vector_len as u64,
        ring_bits: c.ring_bits,
        complete_graph_max: c.complete_graph_max as u64,
        degree: c.degree as u64,
        threshold_percent: c.threshold_percent,
        min_survivors: c.min_survivors as u64,
        quantization: Some(pb::Quantization {
            dimension: q.dimension as u64,
            clip_norm: q.clip_norm,
            granularity: q.granularity,
            rotation_seed: q.rotation_seed.map(|s| s.to_vec()).unwrap_or_default(),
            noise_sum_std,
            noise_min_survivors,
            max_contributors: q.max_contributors as u64,
            tail_bits: q.tail_bits,
        }),
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
            connected_nodes: u32::try_from(status.connected_nodes).unwrap_or(u32::MAX),
            latest_version: Some(status.latest_version),
            rounds_completed: status.rounds_completed,
            rounds_abandoned: status.rounds_abandoned,
            paused: status.paused,
            rounds_total: status.rounds_total,
            damaged_versions: status
                .damaged_versions
                .into_iter()
                .map(|(version, reason)| pb::DamagedVersion { version, reason })
                .collect(),
            node_privacy: status.node_privacy.as_ref().map(spending_to_wire),
            finished_reason: status.finished.unwrap_or_default(),
        }))
    }

    async fn list_nodes(
        &self,
        _request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let millis = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let nodes = self
            .coordinator
            .nodes()
            .into_iter()
            .map(|node| pb::NodeInfo {
                node_id: node.node.0,
                session_age_ms: millis(node.session_age),
                last_seen_ms: millis(node.last_seen),
                connected: node.connected,
                rounds_contributed: node.rounds_contributed,
                dataset: node.fingerprint.map(|f| pb::DatasetFingerprint {
                    sha256: f.sha256,
                    rows: f.rows,
                }),
                round_state: node.round_state.unwrap_or_default().to_string(),
            })
            .collect();
        Ok(Response::new(pb::ListNodesResponse { nodes }))
    }

    async fn list_versions(
        &self,
        _request: Request<pb::ListVersionsRequest>,
    ) -> Result<Response<pb::ListVersionsResponse>, Status> {
        // The listing is cached in memory: no need for a blocking task.
        let mut response = pb::ListVersionsResponse::default();
        for entry in self.coordinator.store().list() {
            match entry.status {
                VersionStatus::Valid(m) => response.manifests_json.push(manifest_json(&m)?),
                VersionStatus::Damaged(cause) => response.damaged.push(pb::DamagedVersion {
                    version: entry.version,
                    reason: store::error_chain(&cause),
                }),
            }
        }
        Ok(Response::new(response))
    }

    async fn get_version(
        &self,
        request: Request<pb::GetVersionRequest>,
    ) -> Result<Response<pb::GetVersionResponse>, Status> {
        let version = request.into_inner().version;
        let manifest = self
            .coordinator
            .store()
            .manifest(version)
            .map_err(|e| status_of(store_error(version, e)))?;
        let manifest_json = manifest_json(&manifest)?;
        Ok(Response::new(pb::GetVersionResponse { manifest_json }))
    }

    type ExportVersionStream = BoxStream<pb::ExportChunk>;

    async fn export_version(
        &self,
        request: Request<pb::ExportVersionRequest>,
    ) -> Result<Response<Self::ExportVersionStream>, Status> {
        let version = request.into_inner().version;
        let store = self.coordinator.store();
        // `weights_bytes` checks the file against the manifest's hash and marks the version
        // damaged if it does not match, so a damaged version is never exported.
        let read = tokio::task::spawn_blocking(move || {
            let manifest = store.manifest(version)?;
            let weights = store.weights_bytes(version)?;
            Ok::<_, StoreError>((manifest, weights))
        })
        .await
        .map_err(|_| Status::internal("reading the version failed"))?;
        let (manifest, weights) = read.map_err(|e| status_of(store_error(version, e)))?;
        debug!(version, bytes = weights.len(), "exporting a version");

        let header = pb::ExportHeader {
            version,
            manifest_json: manifest_json(&manifest)?,
            size_bytes: weights.len() as u64,
            weights_sha256: manifest.weights_sha256.clone(),
        };
        let mut chunks = vec![Ok(pb::ExportChunk {
            part: Some(pb::export_chunk::Part::Header(header)),
        })];
        chunks.extend(weights.chunks(CHUNK_BYTES).map(|c| {
            Ok(pb::ExportChunk {
                part: Some(pb::export_chunk::Part::Data(c.to_vec())),
            })
        }));
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }

    async fn pause_rounds(
        &self,
        _request: Request<pb::PauseRoundsRequest>,
    ) -> Result<Response<pb::PauseRoundsResponse>, Status> {
        let coordinator = self.coordinator.clone();
        let paused = tokio::task::spawn_blocking(move || coordinator.pause_rounds())
            .await
            .map_err(|_| Status::internal("pausing failed"))?
            .map_err(|e| {
                error!(error = %e, "cannot record the pause");
                Status::internal(
                    "the pause could not be recorded in the store directory, so rounds are not \
                     paused; the coordinator's log says why",
                )
            })?;
        Ok(Response::new(pb::PauseRoundsResponse {
            was_paused: paused.was_paused,
            open_round: paused.open_round,
        }))
    }

    async fn resume_rounds(
        &self,
        _request: Request<pb::ResumeRoundsRequest>,
    ) -> Result<Response<pb::ResumeRoundsResponse>, Status> {
        let coordinator = self.coordinator.clone();
        let was_paused = tokio::task::spawn_blocking(move || coordinator.resume_rounds())
            .await
            .map_err(|_| Status::internal("resuming failed"))?
            .map_err(|e| {
                error!(error = %e, "cannot remove the pause");
                Status::internal(
                    "the pause could not be removed from the store directory, so rounds stay \
                     paused; the coordinator's log says why",
                )
            })?;
        Ok(Response::new(pb::ResumeRoundsResponse { was_paused }))
    }
}

/// A manifest as the store writes it (pretty JSON).
fn manifest_json(manifest: &Manifest) -> Result<String, Status> {
    serde_json::to_string_pretty(manifest).map_err(|e| {
        error!(version = manifest.version, error = %e, "encoding a manifest failed");
        Status::internal("encoding the manifest failed")
    })
}

fn spending_to_wire(spending: &Spending) -> pb::NodePrivacyBudget {
    pb::NodePrivacyBudget {
        epsilon_spent: spending.epsilon_spent,
        epsilon_budget: spending.epsilon_budget,
        delta: spending.delta,
        accountant: accountant_name(spending.accountant).to_owned(),
        noise_multiplier: spending.noise_multiplier,
        update_clip_norm: spending.update_clip_norm,
        rounds: spending.rounds,
        version: spending.version,
    }
}

/// The accountant's name as written in configs and manifests.
fn accountant_name(accountant: Accountant) -> &'static str {
    match accountant {
        Accountant::Rdp => "rdp",
        Accountant::Pld => "pld",
    }
}
