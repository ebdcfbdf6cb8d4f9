//! The node's main loop.
//!
//! The node opens its privacy ledger when it is created and recomputes what its data has
//! spent; a damaged ledger stops it there. Then: join, long-poll for work, and for each task
//! check the plan against this node's privacy floor and against what is left of its budget
//! ([`Node::review`]), declining with a reason if it falls short; fetch the global model,
//! train locally with DP-SGD, record the round in the ledger and sync it to disk
//! ([`Node::pay`]), and only then submit the update, which needs the ledger's receipt. When
//! the coordinator cannot be reached the node says which address and why, and retries with
//! exponential backoff capped at `max_backoff_secs`; it never retries silently.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use athanor_core::dpsgd::{self, DpSgdParams, TrainingPlan};
use athanor_core::model::{self, ModelSpec};
use athanor_core::plan::RoundPlan;
use athanor_tls::ClientTls;
use ndarray::ArrayView2;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use tonic::Code;
use tonic::transport::Channel;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::Error;
use crate::budget::{Approval, Budget, Review, Spent};
use crate::client::{CoordinatorClient, Session, Task, Update, Work};
use crate::config::NodeConfig;
use crate::data::Dataset;
use crate::ledger::{Ledger, Receipt, Tail};

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
    ledger: Ledger,
    budget: Budget,
    rounds_trained: u64,
    rounds_declined: u64,
    /// The TLS files to dial with once more when a join fails without saying why.
    diagnosis: Option<ClientTls>,
}

impl Node {
    /// A node over already-loaded training and local test data. Opens (or creates) the
    /// configured privacy ledger and reports what it holds.
    ///
    /// # Errors
    /// [`Error::Ledger`] when the ledger cannot be opened or is damaged, naming the file and
    /// line; [`Error::Accountant`] if its entries cannot be composed; [`Error::Training`] if
    /// the operating system's generator fails.
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

        let ledger = Ledger::open(config.ledger_path())?;
        let budget = config.privacy.budget();
        match ledger.tail() {
            Tail::Clean => {}
            Tail::Unterminated { line } => warn!(
                ledger = %ledger.path().display(),
                line,
                "the ledger's last entry had no newline (an interrupted write); it is kept"
            ),
            Tail::Torn { line, bytes } => warn!(
                ledger = %ledger.path().display(),
                line,
                bytes,
                "the ledger's last line was cut short by an interrupted write; its update was \
                 never sent, so it was dropped"
            ),
        }
        let spent = budget.spent(ledger.entries())?;
        info!(
            ledger = %ledger.path().display(),
            entries = ledger.entries().len(),
            epsilon = spent.epsilon,
            budget = budget.epsilon,
            delta = budget.delta,
            accountant = crate::budget::name(budget.accountant),
            "privacy ledger loaded"
        );
        if spent.epsilon >= budget.epsilon {
            warn!(
                epsilon = spent.epsilon,
                budget = budget.epsilon,
                "the privacy budget is spent: this node will decline every round with DP"
            );
        }

        Ok(Node {
            config,
            train: Arc::new(train),
            test,
            rng,
            ledger,
            budget,
            rounds_trained: 0,
            rounds_declined: 0,
            diagnosis: None,
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

    /// The cumulative example-level epsilon at the configured delta, composed from every
    /// entry of the ledger (infinite after any round without DP, zero before any training).
    ///
    /// # Errors
    /// [`Error::Accountant`].
    pub fn epsilon(&self) -> Result<f64, Error> {
        Ok(self.spent()?.epsilon)
    }

    /// What the ledger's entries add up to.
    ///
    /// # Errors
    /// [`Error::Accountant`].
    pub fn spent(&self) -> Result<Spent, Error> {
        Ok(self.budget.spent(self.ledger.entries())?)
    }

    /// The privacy ledger.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Decides whether to train a round planned as `plan`: it must clear this node's privacy
    /// floor, and its steps at this node's own sampling rate must fit in what the ledger
    /// leaves of the budget. `dimension` is the model's parameter count, which the noise's
    /// grid rounding makes part of the accounting.
    ///
    /// # Errors
    /// [`Error::Accountant`] if the composition fails.
    pub fn review(&self, plan: &RoundPlan, dimension: usize) -> Result<Review, Error> {
        let rows = self.train.rows();
        if let Err(reason) = self.config.privacy.admit(plan, rows) {
            return Ok(Review::Declined(reason));
        }
        let charge = crate::budget::Charge::of(plan, rows, dimension);
        Ok(self.budget.review(self.ledger.entries(), charge)?)
    }

    /// Records an approved round in the ledger and syncs it to disk. The receipt is what
    /// allows the round's update to be sent.
    ///
    /// # Errors
    /// [`Error::Ledger`]; the update must then not be sent.
    pub fn pay(
        &mut self,
        approval: Approval,
        round: u64,
        federation: &str,
        coordinator: &str,
    ) -> Result<Receipt, Error> {
        // The write and fsync block this thread for a few milliseconds once per round, far
        // less than the training before it.
        let entry = approval.into_entry(round, federation, coordinator);
        Ok(self.ledger.append(entry)?)
    }

    /// Lets the node find out why a join failed when the transport does not say: under TLS 1.3
    /// a coordinator refuses a certificate after the node's side of the handshake is done, and
    /// the refusal can be lost to a bare "connection closed". The node then dials once more with
    /// `tls`, outside gRPC, to read the refusal (see [`ClientTls::diagnose`]).
    pub fn diagnose_refusals_with(&mut self, tls: ClientTls) {
        self.diagnosis = Some(tls);
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
                    let error = crate::transport::why(self.diagnosis.as_ref(), &e).await;
                    warn!(%error, retry_in = ?backoff, "cannot join the coordinator; retrying");
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
                    if let Some(reason) =
                        self.handle(client, session, task).instrument(span).await?
                    {
                        return Ok(format!("left the federation: {reason}"));
                    }
                }
            }
        }
    }

    async fn handle(
        &mut self,
        client: &mut CoordinatorClient,
        session: &Session,
        task: Task,
    ) -> Result<Option<String>, Error> {
        let rows = self.train.rows();
        let approval = match self.review(&task.plan, session.spec.num_params())? {
            Review::Approved(approval) => approval,
            Review::Declined(reason) => {
                // The plan is the same in every round of a federation, so what rules it out
                // now rules out every later round too: leave rather than be asked again.
                warn!(%reason, "declining the round and leaving the federation");
                self.rounds_declined += 1;
                client
                    .decline(&session.token, task.round, &reason, true)
                    .await?;
                return Ok(Some(reason));
            }
        };

        let model = client
            .fetch_model(&session.token, Some(task.model_version), &session.spec)
            .await?;
        let (version, global) = (model.version, model.params);
        let before = evaluate(&session.spec, &global, &self.test)?;
        debug!(
            version,
            accuracy = before.0,
            "global model evaluated locally"
        );

        // Train exactly the steps that were checked against the budget.
        let charge = *approval.charge();
        let plan = TrainingPlan {
            learning_rate: task.plan.learning_rate,
            steps: charge.steps,
            sampling_rate: charge.q,
            privacy: charge.dp.map(|dp| DpSgdParams {
                clip_norm: dp.clip_norm,
                noise_multiplier: dp.noise_multiplier,
            }),
        };
        let (local, outcome) = self.train_locally(&session.spec, &global, plan).await?;

        // The round's spending is on disk before the update can even be built.
        let paid = self.pay(approval, task.round, &session.federation, client.address())?;
        let spent = self.spent()?;
        let epsilon = spent.epsilon;
        let after = evaluate(&session.spec, &local, &self.test)?;
        info!(
            steps = plan.steps,
            q = plan.sampling_rate,
            epsilon,
            delta = self.config.privacy.delta,
            budget = self.budget.epsilon,
            ledger_line = paid.line(),
            local_accuracy = after.0,
            clipped_fraction = outcome.clipped_fraction,
            "trained locally"
        );

        let delta: Vec<f32> = local.iter().zip(&global).map(|(l, g)| l - g).collect();
        let update = Update {
            paid,
            model_version: version,
            num_examples: rows as u64,
            delta: &delta,
            steps: plan.steps,
            train_loss: outcome.mean_loss.unwrap_or(0.0),
            // A round without DP, or any earlier one, leaves no finite epsilon to report.
            privacy: (plan.privacy.is_some() && epsilon.is_finite())
                .then_some((epsilon, spent.delta)),
        };
        match client.submit_update(&session.token, update).await {
            Ok(()) => {
                self.rounds_trained += 1;
                info!("update submitted");
                Ok(None)
            }
            Err(Error::Rpc { status, .. }) if status.code() == Code::FailedPrecondition => {
                warn!(
                    reason = status.message(),
                    "update not accepted for this round"
                );
                Ok(None)
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
