//! The node's main loop.
//!
//! Join, long-poll for work, and for each task: check the plan against this node's privacy
//! floor (declining with a reason if it falls short), fetch the global model, train locally
//! with DP-SGD, charge the accountant, and submit the update. When the coordinator cannot be
//! reached the node says which address and why, and retries with exponential backoff capped
//! at `max_backoff_secs`; it never retries silently.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use athanor_core::accountant::RdpAccountant;
use athanor_core::dpsgd::{self, DpSgdParams, TrainingPlan};
use athanor_core::model::{self, ModelSpec};
use ndarray::ArrayView2;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use tonic::Code;
use tonic::transport::Channel;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::Error;
use crate::client::{CoordinatorClient, Session, Task, Update, Work};
use crate::config::NodeConfig;
use crate::data::Dataset;

/// First pause after a failed connection attempt.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);

/// How a node's run ended.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// Rounds this node trained and submitted.
    pub rounds_trained: u64,
    /// Rounds it declined.
    pub rounds_declined: u64,
    /// Its cumulative example-level epsilon (infinite if it ever trained without DP).
    pub epsilon: f64,
    /// Why it stopped.
    pub reason: String,
}

/// Where a node's randomness comes from.
#[derive(Debug, Clone, Copy)]
pub enum Randomness {
    /// A ChaCha20 generator seeded from the operating system: the only choice for real data.
    OperatingSystem,
    /// A fixed seed, for the simulator's reproducible mode and tests. The noise is then
    /// predictable by anyone who knows the seed, so it protects nothing.
    InsecureFixedSeed(u64),
}

/// A node with its data loaded and split.
#[derive(Debug)]
pub struct Node {
    config: NodeConfig,
    train: Arc<Dataset>,
    test: Dataset,
    rng: ChaCha20Rng,
    accountant: RdpAccountant,
    trained_without_dp: bool,
    rounds_trained: u64,
    rounds_declined: u64,
}

impl Node {
    /// A node over already-loaded training and local test data.
    ///
    /// # Errors
    /// [`Error::Training`] if the operating system's generator fails.
    pub fn new(
        config: NodeConfig,
        train: Dataset,
        test: Dataset,
        randomness: Randomness,
    ) -> Result<Self, Error> {
        let rng = match randomness {
            Randomness::OperatingSystem => dpsgd::try_os_seeded_rng()?,
            Randomness::InsecureFixedSeed(seed) => ChaCha20Rng::seed_from_u64(seed),
        };
        Ok(Node {
            config,
            train: Arc::new(train),
            test,
            rng,
            accountant: RdpAccountant::new(),
            trained_without_dp: false,
            rounds_trained: 0,
            rounds_declined: 0,
        })
    }

    /// Loads the configured data file, validates it against its schema and splits it.
    ///
    /// # Errors
    /// [`Error::Data`] naming the file, line and column of the first problem.
    pub fn load(config: NodeConfig, randomness: Randomness) -> Result<Self, Error> {
        let schema = crate::data::Schema::load(&config.data.schema)?;
        let dataset = Dataset::load(&config.data.path, &schema)?;
        let (train, test) = dataset.split(config.data.test_fraction, config.data.split_seed)?;
        info!(
            train_rows = train.rows(),
            test_rows = test.rows(),
            features = train.cols(),
            "data loaded"
        );
        Self::new(config, train, test, randomness)
    }

    /// A short description of the loaded data: row counts and features, never values.
    pub fn describe_data(&self) -> String {
        format!(
            "{} training rows, {} local test rows, {} features, {} classes, sha256 {}",
            self.train.rows(),
            self.test.rows(),
            self.train.cols(),
            self.train.classes(),
            self.train.fingerprint().sha256_hex()
        )
    }

    /// The cumulative example-level epsilon at the configured delta (infinite after any
    /// round without DP, zero before any training).
    ///
    /// # Errors
    /// [`Error::Accountant`].
    pub fn epsilon(&self) -> Result<f64, Error> {
        if self.trained_without_dp {
            return Ok(f64::INFINITY);
        }
        Ok(self.accountant.epsilon(self.config.privacy.delta)?.epsilon)
    }

    /// Works for the coordinator behind `channel` until the federation finishes or `shutdown`
    /// resolves.
    ///
    /// # Errors
    /// Unrecoverable errors: the coordinator's model does not fit the data, training fails,
    /// or the coordinator refuses this node for good (wrong protocol version).
    pub async fn run(
        mut self,
        channel: Channel,
        shutdown: impl Future<Output = ()>,
    ) -> Result<RunSummary, Error> {
        let mut client = CoordinatorClient::new(channel, self.config.coordinator.address.clone());
        let span = info_span!("node", node = %self.config.node.id);
        let reason = tokio::select! {
            reason = self.serve(&mut client).instrument(span) => reason?,
            () = shutdown => "stopped".to_string(),
        };
        Ok(RunSummary {
            rounds_trained: self.rounds_trained,
            rounds_declined: self.rounds_declined,
            epsilon: self.epsilon()?,
            reason,
        })
    }

    async fn serve(&mut self, client: &mut CoordinatorClient) -> Result<String, Error> {
        let max_backoff = Duration::from_secs(self.config.coordinator.max_backoff_secs.max(1));
        let mut backoff = FIRST_BACKOFF;
        loop {
            let session = match client
                .join(&self.config.node.id, self.train.fingerprint())
                .await
            {
                Ok(session) => session,
                Err(e) if is_transient(&e) => {
                    warn!(error = %e, retry_in = ?backoff, "cannot join the coordinator; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(max_backoff);
                    continue;
                }
                Err(e) => return Err(e),
            };
            backoff = FIRST_BACKOFF;
            self.check_model(&session.spec)?;
            info!(federation = %session.federation, "joined");

            match self.work(client, &session).await {
                Ok(reason) => return Ok(reason),
                Err(e) if is_transient(&e) => {
                    warn!(error = %e, retry_in = ?backoff, "lost the coordinator; rejoining");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(max_backoff);
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn check_model(&self, spec: &ModelSpec) -> Result<(), Error> {
        if spec.features != self.train.cols() || spec.classes != self.train.classes() as usize {
            return Err(Error::Protocol(format!(
                "the coordinator trains a model of {} features and {} classes, but this node's \
                 data has {} features and {} classes",
                spec.features,
                spec.classes,
                self.train.cols(),
                self.train.classes()
            )));
        }
        Ok(())
    }

    async fn work(
        &mut self,
        client: &mut CoordinatorClient,
        session: &Session,
    ) -> Result<String, Error> {
        loop {
            match client.wait_for_task(&session.token).await? {
                Work::Idle => debug!("no work yet"),
                Work::Finished(reason) => {
                    info!(%reason, "federation finished");
                    return Ok(reason);
                }
                Work::Task(task) => {
                    let span = info_span!("round", round = task.round);
                    self.handle(client, session, task).instrument(span).await?;
                }
            }
        }
    }

    async fn handle(
        &mut self,
        client: &mut CoordinatorClient,
        session: &Session,
        task: Task,
    ) -> Result<(), Error> {
        let rows = self.train.rows();
        if let Err(reason) = self.config.privacy.admit(&task.plan, rows) {
            warn!(%reason, "declining the round");
            self.rounds_declined += 1;
            return client.decline(&session.token, task.round, &reason).await;
        }

        let (version, global) = client
            .fetch_model(&session.token, Some(task.model_version), &session.spec)
            .await?;
        let before = evaluate(&session.spec, &global, &self.test)?;
        debug!(
            version,
            accuracy = before.0,
            "global model evaluated locally"
        );

        let plan = TrainingPlan {
            learning_rate: task.plan.learning_rate,
            steps: task.plan.steps(rows),
            sampling_rate: task.plan.sampling_rate(rows),
            privacy: task.plan.dp.map(|dp| DpSgdParams {
                clip_norm: dp.clip_norm,
                noise_multiplier: dp.noise_multiplier,
            }),
        };
        let (local, outcome) = self.train_locally(&session.spec, &global, plan).await?;

        // Spending is recorded before the update leaves the node.
        match plan.privacy {
            Some(dp) => {
                self.accountant
                    .compose(plan.sampling_rate, dp.noise_multiplier, plan.steps)?
            }
            None => self.trained_without_dp = true,
        }
        let epsilon = self.epsilon()?;
        let after = evaluate(&session.spec, &local, &self.test)?;
        info!(
            steps = plan.steps,
            q = plan.sampling_rate,
            epsilon,
            delta = self.config.privacy.delta,
            local_accuracy = after.0,
            clipped_fraction = outcome.clipped_fraction,
            "trained locally"
        );

        let delta: Vec<f32> = local.iter().zip(&global).map(|(l, g)| l - g).collect();
        let update = Update {
            round: task.round,
            model_version: version,
            num_examples: rows as u64,
            delta: &delta,
            steps: plan.steps,
            train_loss: outcome.mean_loss.unwrap_or(0.0),
            privacy: plan
                .privacy
                .map(|_| (epsilon, self.config.privacy.delta))
                .filter(|_| !self.trained_without_dp),
        };
        match client.submit_update(&session.token, update).await {
            Ok(()) => {
                self.rounds_trained += 1;
                info!("update submitted");
                Ok(())
            }
            Err(Error::Rpc { status, .. }) if status.code() == Code::FailedPrecondition => {
                warn!(
                    reason = status.message(),
                    "update not accepted for this round"
                );
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    async fn train_locally(
        &mut self,
        spec: &ModelSpec,
        global: &[f32],
        plan: TrainingPlan,
    ) -> Result<(Vec<f32>, dpsgd::TrainingOutcome), Error> {
        let spec = *spec;
        let mut params = global.to_vec();
        let train = Arc::clone(&self.train);
        let mut rng = self.rng.clone();
        let (params, rng, outcome) = tokio::task::spawn_blocking(move || {
            let x = ArrayView2::from_shape((train.rows(), train.cols()), train.features())
                .map_err(|e| Error::Protocol(format!("data shape: {e}")))?;
            let outcome = dpsgd::train(&spec, &mut params, x, train.labels(), &plan, &mut rng)?;
            Ok::<_, Error>((params, rng, outcome))
        })
        .await
        .map_err(|e| Error::Protocol(format!("training task failed: {e}")))??;
        self.rng = rng;
        Ok((params, outcome))
    }
}

/// Accuracy and loss of `params` on `data` (`(NaN, NaN)` when `data` is empty).
fn evaluate(spec: &ModelSpec, params: &[f32], data: &Dataset) -> Result<(f64, f64), Error> {
    if data.rows() == 0 {
        return Ok((f64::NAN, f64::NAN));
    }
    let x = ArrayView2::from_shape((data.rows(), data.cols()), data.features())
        .map_err(|e| Error::Protocol(format!("data shape: {e}")))?;
    let evaluation = model::evaluate(spec, params, x, data.labels())?;
    Ok((evaluation.accuracy, evaluation.loss))
}

/// Whether an error may go away by itself (coordinator restarting, network down, session
/// forgotten), so the node should rejoin rather than stop.
fn is_transient(error: &Error) -> bool {
    match error {
        Error::Rpc { status, .. } => matches!(
            status.code(),
            Code::Unavailable
                | Code::Unknown
                | Code::Unauthenticated
                | Code::DeadlineExceeded
                | Code::Cancelled
                | Code::Aborted
                | Code::Internal
                | Code::ResourceExhausted
        ),
        _ => false,
    }
}
