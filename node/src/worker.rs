//! The node's main loop.
//!
//! The node opens its privacy ledger when it is created and recomputes what its data has
//! spent; a damaged ledger stops it there. Then: join, long-poll for work, and for each task
//! check the plan against this node's privacy floor and against what is left of its budget
//! ([`Node::review`]), declining with a reason if it falls short; fetch the global model,
//! train locally with DP-SGD, record the round in the ledger and sync it to disk
//! ([`Node::pay`]), and only then submit the update, which needs the ledger's receipt.
//!
//! Under secure aggregation the node advertises fresh keys as soon as it accepts a task and
//! exchanges encrypted shares while the rest of the cohort gathers; then it trains, pays, and
//! sends its update quantized and masked ([`athanor_core::secagg`]); last, it reveals the
//! shares the coordinator needs to remove the masks of the sum. A protocol error or an
//! abandoned round ends the node's part in that round, never the node. When
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
use crate::client::{
    CoordinatorClient, Payload, Received, SecureTask, Session, Task, Update, Work,
};
use crate::config::NodeConfig;
use crate::data::Dataset;
use crate::ledger::{Ledger, Receipt, Tail};
use athanor_core::secagg::messages::ShareInbox;
use athanor_core::secagg::{ClientRound, Stage};
use athanor_proto::v1::sec_agg_send_request::Message as SendMessage;
use rand::RngExt;

/// How long a node that left a secure round waits before polling again while that round is
/// still open.
const LEFT_ROUND_PAUSE: Duration = Duration::from_millis(200);

/// A session lost sooner than this after joining does not reset the reconnection pauses.
const SHORT_SESSION: Duration = Duration::from_secs(5);

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
    /// Seed of the secure-aggregation generator in the insecure reproducible mode; `None`
    /// draws each round's generator from the operating system.
    secure_seed: Option<u64>,
    /// Dropouts injected by the simulator.
    dropouts: Option<Dropouts>,
    /// The secure round this node left or dropped out of: its task is not taken up again.
    left_round: Option<u64>,
}

/// Makes a node drop out of secure rounds on purpose, as the simulator asks: in each round,
/// with probability `rate`, the node goes silent before sending its message for `stage`.
#[derive(Debug, Clone)]
pub struct Dropouts {
    /// Probability of dropping out of a round.
    pub rate: f64,
    /// The stage whose message is never sent.
    pub stage: Stage,
    /// Decides which rounds.
    pub rng: ChaCha20Rng,
}

/// A node's part in one secure round.
struct SecureRound {
    task: SecureTask,
    client: ClientRound,
    rng: ChaCha20Rng,
    /// The stage at which this node drops out, when the simulator asks for it.
    drop_at: Option<Stage>,
}

/// Why a node's part in a secure round ended early.
enum Exit {
    /// The coordinator abandoned the round, or the protocol refused a message.
    Left(String),
    /// The simulator's injected dropout.
    Dropped(Stage),
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
        let (rng, secure_seed) = match randomness {
            Randomness::OperatingSystem => (dpsgd::try_os_seeded_rng()?, None),
            Randomness::InsecureFixedSeed(seed) => (
                ChaCha20Rng::seed_from_u64(seed),
                Some(seed ^ 0x005e_ca66_5eed),
            ),
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
            secure_seed,
            dropouts: None,
            left_round: None,
        })
    }

    /// Makes this node drop out of secure rounds on purpose (for the simulator).
    pub fn inject_dropouts(&mut self, dropouts: Dropouts) {
        self.dropouts = Some(dropouts);
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
            self.check_model(&session.spec)?;
            info!(federation = %session.federation, "joined");
            let joined = tokio::time::Instant::now();

            match self.work(client, &session).await {
                Ok(reason) => return Ok(reason),
                Err(e) if is_transient(&e) => {
                    // A session the coordinator forgot at once keeps the pauses growing, so two
                    // processes sharing an identity do not flap at full speed; anything else
                    // starts them over.
                    if joined.elapsed() >= SHORT_SESSION || !is_unknown_session(&e) {
                        backoff = FIRST_BACKOFF;
                    } else {
                        warn!(
                            node = %self.config.node.id,
                            "the coordinator forgot this node's session right after it joined: \
                             is another process running as the same node?"
                        );
                    }
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
                Work::Task(task) if self.left_round == Some(task.round) => {
                    // The coordinator hands the task out while keys may still be advertised;
                    // a node that left the round stays out, as if it were gone.
                    tokio::time::sleep(LEFT_ROUND_PAUSE).await;
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

        // Keys go out first, so the cohort's key exchange runs while this node trains.
        let mut secure = match &task.secure {
            Some(secure_task) => {
                match self
                    .start_secure(client, session, &task, (**secure_task).clone())
                    .await?
                {
                    Ok(secure) => Some(secure),
                    Err(exit) => return Ok(self.left_round(task.round, exit)),
                }
            }
            None => None,
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
        let delta: Vec<f32> = local.iter().zip(&global).map(|(l, g)| l - g).collect();

        // Shares from the neighbours arrive before anything is paid: a round abandoned by
        // then costs this node nothing.
        let inbox = match &mut secure {
            Some(secure) => match self.receive_inbox(client, session, &task, secure).await? {
                Ok(inbox) => Some(inbox),
                Err(exit) => return Ok(self.left_round(task.round, exit)),
            },
            None => None,
        };

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

        let masked = match (&mut secure, inbox) {
            (Some(secure), Some(inbox)) => match mask(secure, &inbox, &delta) {
                Ok(masked) => Some((secure.task.config.round, secure.task.node, masked)),
                Err(exit) => return Ok(self.left_round(task.round, exit)),
            },
            _ => None,
        };
        let payload = match &masked {
            Some((protocol_round, node, values)) => Payload::Masked {
                protocol_round: *protocol_round,
                node: *node,
                values,
            },
            None => Payload::Plain(&delta),
        };
        let update = Update {
            paid,
            model_version: version,
            num_examples: rows as u64,
            payload,
            steps: plan.steps,
            // Under secure aggregation the loss stays here: it says something about the update.
            train_loss: if masked.is_some() {
                0.0
            } else {
                outcome.mean_loss.unwrap_or(0.0)
            },
            // A round without DP, or any earlier one, leaves no finite epsilon to report.
            privacy: (plan.privacy.is_some() && epsilon.is_finite())
                .then_some((epsilon, spent.delta)),
        };
        match client.submit_update(&session.token, update).await {
            Ok(()) => {
                self.rounds_trained += 1;
                info!("update submitted");
                if let Some(secure) = &mut secure
                    && let Err(exit) = self.unmask(client, session, &task, secure).await?
                {
                    return Ok(self.left_round(task.round, exit));
                }
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

    /// Advertises this node's keys, then waits for the key directory and sends its encrypted
    /// shares.
    async fn start_secure(
        &mut self,
        client: &mut CoordinatorClient,
        session: &Session,
        task: &Task,
        secure_task: SecureTask,
    ) -> Result<Result<SecureRound, Exit>, Error> {
        let mut rng = match self.secure_seed {
            Some(seed) => ChaCha20Rng::seed_from_u64(seed.wrapping_add(task.round)),
            None => dpsgd::try_os_seeded_rng()?,
        };
        let drop_at = self
            .dropouts
            .as_mut()
            .and_then(|d| (d.rng.random::<f64>() < d.rate).then_some(d.stage));
        let (round, advertisement) =
            match ClientRound::new(secure_task.config.clone(), secure_task.node, &mut rng) {
                Ok(started) => started,
                Err(e) => return Ok(Err(Exit::Left(e.to_string()))),
            };
        let mut secure = SecureRound {
            task: secure_task,
            client: round,
            rng,
            drop_at,
        };

        if secure.drop_at == Some(Stage::AdvertiseKeys) {
            return Ok(Err(Exit::Dropped(Stage::AdvertiseKeys)));
        }
        let message = SendMessage::AdvertiseKeys(advertisement.into());
        if let Err(exit) = send(client, session, task, message).await? {
            return Ok(Err(exit));
        }
        info!(node = secure.task.node.0, "keys advertised");

        let directory = match poll(client, session, task, Stage::ShareKeys).await? {
            Ok(Received::Directory(directory)) => directory,
            Ok(_) => return Ok(Err(Exit::Left("unexpected answer".into()))),
            Err(exit) => return Ok(Err(exit)),
        };
        if secure.drop_at == Some(Stage::ShareKeys) {
            return Ok(Err(Exit::Dropped(Stage::ShareKeys)));
        }
        let shares = match secure.client.share_keys(&directory, &mut secure.rng) {
            Ok(shares) => shares,
            Err(e) => return Ok(Err(Exit::Left(e.to_string()))),
        };
        if let Err(exit) =
            send(client, session, task, SendMessage::ShareKeys(shares.into())).await?
        {
            return Ok(Err(exit));
        }
        debug!(neighbours = directory.nodes.len() - 1, "shares sent");
        Ok(Ok(secure))
    }

    /// Waits for the shares this node's neighbours encrypted to it.
    async fn receive_inbox(
        &mut self,
        client: &mut CoordinatorClient,
        session: &Session,
        task: &Task,
        secure: &mut SecureRound,
    ) -> Result<Result<ShareInbox, Exit>, Error> {
        if secure.drop_at == Some(Stage::MaskedInput) {
            return Ok(Err(Exit::Dropped(Stage::MaskedInput)));
        }
        match poll(client, session, task, Stage::MaskedInput).await? {
            Ok(Received::Inbox(inbox)) => Ok(Ok(inbox)),
            Ok(_) => Ok(Err(Exit::Left("unexpected answer".into()))),
            Err(exit) => Ok(Err(exit)),
        }
    }

    /// Reveals the shares the coordinator asks for to remove the masks of the sum.
    async fn unmask(
        &mut self,
        client: &mut CoordinatorClient,
        session: &Session,
        task: &Task,
        secure: &mut SecureRound,
    ) -> Result<Result<(), Exit>, Error> {
        if secure.drop_at == Some(Stage::Unmasking) {
            return Ok(Err(Exit::Dropped(Stage::Unmasking)));
        }
        let request = match poll(client, session, task, Stage::Unmasking).await? {
            Ok(Received::Unmask(request)) => request,
            Ok(_) => return Ok(Err(Exit::Left("unexpected answer".into()))),
            Err(exit) => return Ok(Err(exit)),
        };
        let response = match secure.client.unmask(&request) {
            Ok(response) => response,
            Err(e) => return Ok(Err(Exit::Left(e.to_string()))),
        };
        let message = SendMessage::Unmask((&response).into());
        if let Err(exit) = send(client, session, task, message).await? {
            return Ok(Err(exit));
        }
        info!(
            survivors = request.alive.len(),
            dropped = request.dropped.len(),
            "unmasking shares sent"
        );
        Ok(Ok(()))
    }

    /// Logs why this node's part in a secure round ended; the node goes back to polling.
    fn left_round(&mut self, round: u64, exit: Exit) -> Option<String> {
        self.left_round = Some(round);
        match exit {
            Exit::Left(reason) => warn!(%reason, "left the secure round"),
            Exit::Dropped(stage) => info!(%stage, "dropped out of the round (simulated)"),
        }
        None
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

/// Whether the coordinator answered that it does not know the session.
fn is_unknown_session(error: &Error) -> bool {
    matches!(error, Error::Rpc { status, .. } if status.code() == Code::Unauthenticated)
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

/// Quantizes and masks this node's update.
fn mask(secure: &mut SecureRound, inbox: &ShareInbox, delta: &[f32]) -> Result<Vec<u32>, Exit> {
    let quantizer = &secure.task.quantizer;
    let norm = delta
        .iter()
        .map(|&v| f64::from(v) * f64::from(v))
        .sum::<f64>()
        .sqrt();
    let bound = quantizer.config().clip_norm;
    if norm > bound {
        warn!(
            norm,
            bound, "the update is longer than secure aggregation's bound and is clipped to it"
        );
    }
    let encoded = quantizer
        .encode(delta, &mut secure.rng)
        .map_err(|e| Exit::Left(format!("quantizing the update: {e}")))?;
    let masked = secure
        .client
        .masked_input(inbox, &encoded)
        .map_err(|e| Exit::Left(e.to_string()))?;
    Ok(masked.masked)
}

/// Sends a message for a short stage. A refusal ends this node's part in the round; a
/// transport failure is the caller's to handle.
async fn send(
    client: &mut CoordinatorClient,
    session: &Session,
    task: &Task,
    message: SendMessage,
) -> Result<Result<(), Exit>, Error> {
    match client
        .secagg_send(&session.token, task.round, message)
        .await
    {
        Ok(()) => Ok(Ok(())),
        Err(Error::Rpc { status, .. }) if is_refusal(status.code()) => {
            Ok(Err(Exit::Left(status.message().to_string())))
        }
        Err(e) => Err(e),
    }
}

/// Long-polls for the coordinator's message for `stage`, until it comes or the round is
/// abandoned.
async fn poll(
    client: &mut CoordinatorClient,
    session: &Session,
    task: &Task,
    stage: Stage,
) -> Result<Result<Received, Exit>, Error> {
    loop {
        match client
            .secagg_receive(&session.token, task.round, stage)
            .await
        {
            Ok(Received::Pending) => continue,
            Ok(Received::Abandoned(reason)) => return Ok(Err(Exit::Left(reason))),
            Ok(received) => return Ok(Ok(received)),
            Err(Error::Rpc { status, .. }) if is_refusal(status.code()) => {
                return Ok(Err(Exit::Left(status.message().to_string())));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Codes with which the coordinator refuses a message for this round only.
fn is_refusal(code: Code) -> bool {
    matches!(code, Code::FailedPrecondition | Code::InvalidArgument)
}
