//! The round state machine.
//!
//! [`Coordinator`] holds the federation's state: joined nodes, the round in progress and the
//! current global model. The gRPC services call into it for each request; one driver task
//! ([`Coordinator::drive`]) moves rounds forward:
//!
//! 1. wait until `min_nodes` nodes are connected (seen within the session timeout);
//! 2. sample a cohort of `cohort_size` of them and open the round: each member's next long
//!    poll returns its task;
//! 3. wait until every member has submitted or declined, or the deadline passes;
//! 4. with at least `min_updates` updates of non-zero total weight, aggregate (FedAvg) and
//!    publish a new version; otherwise abandon the round, publishing nothing.
//!
//! Under secure aggregation (the default) step 3 runs the protocol's stages
//! ([`crate::secure`]): each closes when every node it waits for has answered or at its
//! deadline, and step 4 publishes the unmasked mean of the survivors' updates, or abandons
//! the round when the protocol cannot complete.
//!
//! An operator may pause the federation ([`Coordinator::pause_rounds`]): the round already
//! open runs to its end, but the driver opens no new one until
//! [`Coordinator::resume_rounds`]. The pause is recorded in the store directory
//! ([`crate::pause`]) before it is acknowledged, so a restarted coordinator comes up paused.
//!
//! Besides training sessions, a node may hold watch-only ones ([`Coordinator::join_observer`]),
//! which an operator's `athanor-node fetch` opens with the node's own certificate: they may
//! fetch models, but never count towards `min_nodes`, are never drawn into a cohort, are not
//! listed among the nodes, and neither replace nor are replaced by the node's training session,
//! so fetching a model next to a running node does not knock it out of its round.
//!
//! State lives behind one `std::sync::Mutex` that is never held across an `.await`; waiters
//! learn about changes through a `watch` channel whose counter is bumped on every change, so
//! no wake-up is lost between checking the state and starting to wait.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use athanor_core::model::ModelSpec;
use athanor_core::plan::RoundPlan;
use rand::{Rng, SeedableRng, TryRng};
use rand_chacha::ChaCha20Rng;
use tokio::sync::{broadcast, watch};
use tokio::time::Instant;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::Error;
use crate::config::AggregationMode;
use crate::config::CoordinatorConfig;
use crate::node_privacy::{NodeLevelDp, Spending};
use crate::pause::PauseFlag;
use crate::secure::{NodeMessage, Outgoing, SecureRound, SecureSum, SecureTask};
use crate::store::{
    DatasetFingerprint, Epsilon, ExamplePrivacy, Manifest, ManifestDraft, ModelStore, NodePrivacy,
    StoreError, VersionStatus,
};
use crate::strategy::{self, Contribution, ServerOptimizer};

/// How long a long poll waits before answering "idle".
const POLL_TIMEOUT: Duration = Duration::from_secs(20);

/// A node joining again this soon after its previous join is probably a second process with
/// the same identity.
const DUPLICATE_JOIN_WINDOW: Duration = Duration::from_secs(5);

/// Longest pause after a round that could not even start (its cohort cannot be aggregated)
/// before the next try.
const UNUSABLE_ROUND_PAUSE: Duration = Duration::from_secs(5);

/// A node not heard from for this long no longer counts as connected, and a watch-only
/// session unused for this long is forgotten.
const SESSION_TIMEOUT: Duration = Duration::from_secs(90);

/// Watch-only sessions one node id may hold at once; joining past it forgets the one least
/// recently used. Enough for a few operators fetching at once, and a bound on what repeated
/// joins can make the coordinator remember.
const MAX_OBSERVERS_PER_NODE: usize = 8;

/// A node's identity within the federation.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub String);

impl std::fmt::Display for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a node learns when it joins.
#[derive(Debug, Clone)]
pub struct Joined {
    /// Token for later calls.
    pub session: String,
    /// The model being trained.
    pub spec: ModelSpec,
    /// Latest published version.
    pub latest_version: u64,
}

/// A round's work for one node.
#[derive(Debug, Clone)]
pub struct Task {
    /// The round.
    pub round: u64,
    /// The version to start from.
    pub model_version: u64,
    /// Local training asked for.
    pub plan: RoundPlan,
    /// Time left until the round's deadline.
    pub time_left: Duration,
    /// The secure-aggregation parameters, in secure mode.
    pub secure: Option<Box<SecureTask>>,
}

/// The answer to a long poll.
#[derive(Debug, Clone)]
pub enum Poll {
    /// Work to do.
    Task(Task),
    /// Nothing yet; poll again.
    Idle(String),
    /// No more rounds will run.
    Finished(String),
}

/// The header of an update, checked before its payload is read.
#[derive(Debug, Clone)]
pub struct UpdateHeader {
    /// Round the update is for.
    pub round: u64,
    /// Version the node trained from.
    pub model_version: u64,
    /// Aggregation weight.
    pub num_examples: u64,
    /// Length of the update.
    pub num_params: usize,
    /// Mean local training loss.
    pub train_loss: f64,
    /// The node's cumulative example-level privacy.
    pub privacy: Epsilon,
    /// The delta that `privacy` holds at (absent without DP).
    pub delta: Option<f64>,
    /// For a masked input: the protocol round and the sender's number.
    pub secure: Option<(athanor_core::secagg::RoundId, athanor_core::secagg::NodeId)>,
}

/// A round's mean update, its node-level privacy record, and the reports of the nodes in it;
/// or why the round must be abandoned.
type Aggregate = Result<(Vec<f64>, Option<NodePrivacy>, Vec<(NodeId, UpdateHeader)>), String>;

/// The latest published model, kept in memory so nodes fetching it every round do not hit the
/// disk.
#[derive(Debug)]
pub struct GlobalModel {
    /// Its manifest.
    pub manifest: Manifest,
    /// Its parameters.
    pub params: Vec<f32>,
}

/// Where the federation stands, for operators.
#[derive(Debug, Clone)]
pub struct Status {
    /// Federation name.
    pub federation: String,
    /// Round in progress.
    pub round: Option<u64>,
    /// What the coordinator is doing: `waiting_for_nodes`, `training`, `paused` (no round
    /// open and none will open until resumed) or `finished`.
    pub stage: &'static str,
    /// Nodes seen within the session timeout.
    pub connected_nodes: usize,
    /// Latest version.
    pub latest_version: u64,
    /// Rounds that published a version.
    pub rounds_completed: u64,
    /// Rounds abandoned.
    pub rounds_abandoned: u64,
    /// Whether the operator paused rounds (an open round still runs to its end). Read from the
    /// store directory at start, so a pause outlives restarts.
    pub paused: bool,
    /// Rounds to publish before the federation finishes.
    pub rounds_total: u64,
    /// Why the federation finished, once it has.
    pub finished: Option<String>,
    /// Versions found damaged in the store, with what was found wrong.
    pub damaged_versions: Vec<(u64, String)>,
    /// Node-level privacy spent, when it is accounted.
    pub node_privacy: Option<Spending>,
}

/// One joined node, for operators.
#[derive(Debug, Clone)]
pub struct NodeSummary {
    /// Its identity.
    pub node: NodeId,
    /// Time since its current session began (its latest join).
    pub session_age: Duration,
    /// Time since it was last heard from.
    pub last_seen: Duration,
    /// Whether it counts towards `min_nodes` and cohorts.
    pub connected: bool,
    /// Published versions that include its update: counted from the store's manifests when
    /// the coordinator opened, plus the rounds this process published.
    pub rounds_contributed: u64,
    /// What it reported about its data.
    pub fingerprint: Option<DatasetFingerprint>,
    /// Its part in the open round: `pending`, `submitted` or `declined`; `None` when it is
    /// not in the cohort or no round is open.
    pub round_state: Option<&'static str>,
}

/// What pausing found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Paused {
    /// Whether rounds were already paused.
    pub was_paused: bool,
    /// The round still open, which runs to its end.
    pub open_round: Option<u64>,
}

/// The coordinator's shared state; cheap to clone.
#[derive(Debug, Clone)]
pub struct Coordinator {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    federation: String,
    spec: ModelSpec,
    plan: RoundPlan,
    config: CoordinatorConfig,
    state: Mutex<State>,
    store: Arc<ModelStore>,
    changed: watch::Sender<u64>,
    published: broadcast::Sender<Manifest>,
    /// Node-level DP of the published models, when configured. Only the task that drives
    /// rounds takes this lock.
    node_dp: Option<Mutex<NodeLevelDp>>,
    /// Where the pause is recorded.
    pause_flag: PauseFlag,
    /// Held while the pause is changed, so the file and [`State::paused`] change together.
    pausing: Mutex<()>,
}

#[derive(Debug)]
struct State {
    /// Nodes with a training session, by id.
    nodes: HashMap<NodeId, NodeEntry>,
    /// Every valid session token, training and watch-only.
    sessions: HashMap<String, Holder>,
    round: Option<OpenRound>,
    global: Arc<GlobalModel>,
    next_round: u64,
    rounds_completed: u64,
    rounds_abandoned: u64,
    finished: Option<String>,
    optimizer: ServerOptimizer,
    /// Set by the operator: open no new round. Mirrors the pause file, which is written
    /// first.
    paused: bool,
    /// Published versions each node contributed to (see [`NodeSummary::rounds_contributed`]).
    contributions: HashMap<NodeId, u64>,
    /// Node-level spending as of the latest version, when accounted.
    node_spending: Option<Spending>,
}

/// Who holds a session token.
#[derive(Debug, Clone)]
enum Holder {
    /// The node's training session; its [`NodeEntry`] keeps the rest.
    Training(NodeId),
    /// A watch-only session of the node.
    Observer {
        /// The node whose certificate (or claimed id) opened it.
        node: NodeId,
        /// When it was last used; it is forgotten [`SESSION_TIMEOUT`] later.
        last_seen: Instant,
    },
}

impl Holder {
    fn node(&self) -> &NodeId {
        match self {
            Holder::Training(node) | Holder::Observer { node, .. } => node,
        }
    }
}

#[derive(Debug)]
struct NodeEntry {
    session: String,
    fingerprint: Option<DatasetFingerprint>,
    joined_at: Instant,
    last_seen: Instant,
}

#[derive(Debug)]
struct OpenRound {
    id: u64,
    model_version: u64,
    deadline: Instant,
    /// Probability with which each connected node was drawn into the cohort.
    sampling_rate: f64,
    members: BTreeMap<NodeId, Outcome>,
    /// The protocol state, under secure aggregation.
    secure: Option<SecureRound>,
}

#[derive(Debug)]
enum Outcome {
    Pending,
    Submitted(Submission),
    /// A masked input arrived; only the sum of such inputs is ever known.
    Masked(UpdateHeader),
    Declined,
}

#[derive(Debug)]
struct Submission {
    header: UpdateHeader,
    delta: Vec<f32>,
}

impl Coordinator {
    /// Opens the model store (publishing the seeded initial model as version 0 if the store is
    /// empty) and sets up an idle federation that resumes after the latest version.
    ///
    /// # Errors
    /// Store errors, or a store whose model differs from the configured one.
    pub fn open(config: CoordinatorConfig) -> Result<Self, Error> {
        let spec = config.model_spec().map_err(|message| Error::Config {
            path: config.store.dir.clone(),
            message,
        })?;
        let plan = config.round_plan().map_err(|message| Error::Config {
            path: config.store.dir.clone(),
            message,
        })?;
        if plan.dp.is_none() {
            warn!(
                "differential privacy is OFF: nodes train without clipping or noise and every \
                 published version carries epsilon = infinity"
            );
        }

        if config.aggregation.mode == AggregationMode::Plain {
            warn!(
                "PLAIN AGGREGATION: every node's update reaches this coordinator in the clear; \
                 use it for debugging or aggregators that must see each update, and leave \
                 [aggregation] mode at \"secure\" otherwise"
            );
        }

        if config.aggregation.mode == AggregationMode::Secure {
            warn_about_secure_settings(&config);
        }
        if config.aggregation.mode == AggregationMode::Secure && config.node_privacy.is_none() {
            warn!(
                "secure aggregation without [node_privacy]: nodes add no node-level noise, so \
                 this coordinator learns the exact sum of each round's updates (each still \
                 carries its node's DP-SGD noise) and published models hide no organization"
            );
        }

        let store = ModelStore::open(&config.store.dir)?;
        if store.latest().is_none() {
            let params = spec.init(config.model.init_seed);
            let draft = ManifestDraft::initial(
                spec,
                Some(config.model.init_seed),
                env!("CARGO_PKG_VERSION"),
            );
            let manifest = store.publish(draft, &params)?;
            info!(version = manifest.version, "published initial model");
        }
        let latest = store
            .latest()
            .ok_or_else(|| Error::InvalidRequest("store has no version after init".into()))?;
        if latest.model != spec {
            return Err(Error::Config {
                path: config.store.dir.clone(),
                message: format!(
                    "the store holds a {} model but [model] describes a {}; use a new store \
                     directory for a different model",
                    latest.model, spec
                ),
            });
        }
        let (manifest, params) = store.load(latest.version)?;
        let (node_dp, node_spending) = match &config.node_privacy {
            Some(settings) => {
                let dp = NodeLevelDp::resume(settings.clone(), &manifest)?;
                let spent = dp.spent()?.epsilon;
                info!(
                    epsilon_spent = spent,
                    budget = settings.epsilon,
                    "node-level privacy accounting on"
                );
                let spending = Spending::new(settings, dp.history(), spent, manifest.version);
                (Some(Mutex::new(dp)), Some(spending))
            }
            None => (None, None),
        };
        let mut rounds_completed = 0;
        let mut contributions: HashMap<NodeId, u64> = HashMap::new();
        for entry in store.list() {
            let VersionStatus::Valid(m) = entry.status else {
                continue;
            };
            if m.round > 0 {
                rounds_completed += 1;
            }
            for fingerprint in m.dataset_fingerprints {
                *contributions.entry(NodeId(fingerprint.node)).or_default() += 1;
            }
        }
        info!(
            version = manifest.version,
            round = manifest.round,
            "resuming from latest version"
        );
        let optimizer = resume_optimizer(&config, &store, &manifest);
        let pause_flag = PauseFlag::in_store(&config.store.dir);
        let paused = pause_flag.is_set()?;
        if paused {
            info!(
                flag = %pause_flag.path().display(),
                "starting paused, as the operator left it: no round opens until `rounds resume`"
            );
        }

        let state = State {
            nodes: HashMap::new(),
            sessions: HashMap::new(),
            round: None,
            next_round: manifest.round + 1,
            global: Arc::new(GlobalModel { manifest, params }),
            rounds_completed,
            rounds_abandoned: 0,
            finished: None,
            optimizer,
            paused,
            contributions,
            node_spending,
        };
        let (changed, _) = watch::channel(0);
        let (published, _) = broadcast::channel(64);
        Ok(Coordinator {
            shared: Arc::new(Shared {
                federation: config.federation.name.clone(),
                spec,
                plan,
                config,
                state: Mutex::new(state),
                store: Arc::new(store),
                changed,
                published,
                node_dp,
                pause_flag,
                pausing: Mutex::new(()),
            }),
        })
    }

    /// The model being trained.
    pub fn spec(&self) -> ModelSpec {
        self.shared.spec
    }

    /// The federation's name.
    pub fn federation(&self) -> &str {
        &self.shared.federation
    }

    /// The configuration this coordinator runs with.
    pub fn config(&self) -> &CoordinatorConfig {
        &self.shared.config
    }

    /// The model store. Its reads touch the disk: call them from `spawn_blocking`.
    pub fn store(&self) -> Arc<ModelStore> {
        Arc::clone(&self.shared.store)
    }

    /// The latest published model.
    pub fn global(&self) -> Arc<GlobalModel> {
        Arc::clone(&self.lock().global)
    }

    /// Subscribes to versions as they are published.
    pub fn subscribe(&self) -> broadcast::Receiver<Manifest> {
        self.shared.published.subscribe()
    }

    /// Registers a node; a node joining again replaces its earlier session (and keeps its
    /// place in an open round's cohort).
    pub fn join(&self, node: NodeId, fingerprint: Option<DatasetFingerprint>) -> Joined {
        let session = new_session_token();
        let mut state = self.lock();
        if let Some(old) = state.nodes.get(&node) {
            let old_session = old.session.clone();
            let age = old.joined_at.elapsed();
            state.sessions.remove(&old_session);
            if age < DUPLICATE_JOIN_WINDOW {
                warn!(
                    %node,
                    previous_session_age = ?age,
                    "node joined again moments after its previous join; if two processes run \
                     as this node, each keeps replacing the other's session: stop one"
                );
            } else {
                debug!(%node, "node joined again; earlier session replaced");
            }
            // The earlier process's part in a secure round is lost with it: stages need not
            // wait for messages only it could have sent.
            if let Some(secure) = state.round.as_mut().and_then(|r| r.secure.as_mut()) {
                secure.forget(&node);
            }
        }
        state
            .sessions
            .insert(session.clone(), Holder::Training(node.clone()));
        let now = Instant::now();
        state.nodes.insert(
            node.clone(),
            NodeEntry {
                session: session.clone(),
                fingerprint,
                joined_at: now,
                last_seen: now,
            },
        );
        let latest_version = state.global.manifest.version;
        drop(state);

        info!(%node, "node joined");
        self.notify();
        Joined {
            session,
            spec: self.shared.spec,
            latest_version,
        }
    }

    /// Opens a watch-only session for `node`: it may fetch models, and takes no part in rounds
    /// (see the [module documentation](self)). The node's training session, if it has one, is
    /// left as it is.
    pub fn join_observer(&self, node: NodeId) -> Joined {
        let session = new_session_token();
        let now = Instant::now();
        // Unused sessions are forgotten here, and each node keeps a few at most.
        // TODO: under --insecure a peer may claim any number of node ids, so only the session
        // timeout bounds how many watch-only sessions are held (training joins share the gap,
        // and are never forgotten at all); a cap on sessions per peer address would close it.
        let mut state = self.lock();
        state.sessions.retain(|_, holder| match holder {
            Holder::Observer { last_seen, .. } => now.duration_since(*last_seen) < SESSION_TIMEOUT,
            Holder::Training(_) => true,
        });
        let mut held: Vec<(Instant, String)> = state
            .sessions
            .iter()
            .filter_map(|(token, holder)| match holder {
                Holder::Observer { node: n, last_seen } if *n == node => {
                    Some((*last_seen, token.clone()))
                }
                _ => None,
            })
            .collect();
        held.sort();
        let excess = (held.len() + 1).saturating_sub(MAX_OBSERVERS_PER_NODE);
        for (_, token) in held.into_iter().take(excess) {
            state.sessions.remove(&token);
        }
        state.sessions.insert(
            session.clone(),
            Holder::Observer {
                node: node.clone(),
                last_seen: now,
            },
        );
        let latest_version = state.global.manifest.version;
        drop(state);

        info!(%node, "observer joined (watch only)");
        Joined {
            session,
            spec: self.shared.spec,
            latest_version,
        }
    }

    /// Long poll for work: returns a task as soon as the node is in an open round's cohort
    /// and has not answered yet, or `Idle` after a bounded wait.
    ///
    /// # Errors
    /// [`Error::UnknownSession`].
    pub async fn wait_for_task(&self, session: &str) -> Result<Poll, Error> {
        let mut changes = self.shared.changed.subscribe();
        let give_up = Instant::now() + POLL_TIMEOUT;
        loop {
            changes.borrow_and_update();
            if let Some(answer) = self.poll_once(session)? {
                return Ok(answer);
            }
            match tokio::time::timeout_at(give_up, changes.changed()).await {
                Err(_) if self.lock().paused => {
                    return Ok(Poll::Idle("rounds are paused by the operator".into()));
                }
                Err(_) => return Ok(Poll::Idle("waiting for the next round".into())),
                Ok(Err(_)) => return Err(Error::ShuttingDown),
                Ok(Ok(())) => {}
            }
        }
    }

    fn poll_once(&self, session: &str) -> Result<Option<Poll>, Error> {
        let mut state = self.lock();
        let node = state.touch(session)?;
        if let Some(reason) = &state.finished {
            return Ok(Some(Poll::Finished(reason.clone())));
        }
        let Some(round) = &state.round else {
            return Ok(None);
        };
        if !matches!(round.members.get(&node), Some(Outcome::Pending)) {
            return Ok(None);
        }
        // Under secure aggregation a task is only worth handing out while keys may still be
        // advertised: a node that starts later could not join the protocol.
        let secure = match &round.secure {
            Some(secure) => match secure.task_for(&node) {
                Some(task) => Some(Box::new(task)),
                None => return Ok(None),
            },
            None => None,
        };
        Ok(Some(Poll::Task(Task {
            round: round.id,
            model_version: round.model_version,
            plan: self.shared.plan,
            time_left: round.deadline.saturating_duration_since(Instant::now()),
            secure,
        })))
    }

    /// The node that joined with `session`. A token names one node for as long as it is valid,
    /// so a caller may be checked against this before the call it makes with the token.
    ///
    /// # Errors
    /// [`Error::UnknownSession`].
    pub fn session_owner(&self, session: &str) -> Result<NodeId, Error> {
        let state = self.lock();
        let holder = state.sessions.get(session).ok_or(Error::UnknownSession)?;
        Ok(holder.node().clone())
    }

    /// Checks that `session` is a current session, training or watch-only, and counts the
    /// call as a sign of life.
    ///
    /// # Errors
    /// [`Error::UnknownSession`].
    pub fn check_session(&self, session: &str) -> Result<NodeId, Error> {
        let mut state = self.lock();
        let now = Instant::now();
        match state.sessions.get_mut(session) {
            Some(Holder::Observer { node, last_seen }) => {
                *last_seen = now;
                Ok(node.clone())
            }
            Some(Holder::Training(_)) => state.touch(session),
            None => Err(Error::UnknownSession),
        }
    }

    /// Time left until the open round's deadline; `None` when no round is open.
    pub fn round_time_left(&self) -> Option<Duration> {
        let state = self.lock();
        let round = state.round.as_ref()?;
        Some(round.deadline.saturating_duration_since(Instant::now()))
    }

    /// Checks that an update with this header would be accepted now, before its payload is
    /// read.
    ///
    /// # Errors
    /// [`Error::WrongRound`] for an update that does not belong to the open round or comes
    /// twice, [`Error::InvalidRequest`] for a wrong length or bad field.
    pub fn check_update(&self, session: &str, header: &UpdateHeader) -> Result<NodeId, Error> {
        let mut state = self.lock();
        let node = state.touch(session)?;
        self.check_against_round(&state, &node, header)?;
        Ok(node)
    }

    fn check_against_round(
        &self,
        state: &State,
        node: &NodeId,
        header: &UpdateHeader,
    ) -> Result<(), Error> {
        let (expected, what) = match state.round.as_ref().and_then(|r| r.secure.as_ref()) {
            Some(secure) => (
                secure.vector_len(),
                "values, the round's masked vectors have",
            ),
            None => (self.shared.spec.num_params(), "parameters, the model has"),
        };
        if header.num_params != expected {
            return Err(Error::InvalidRequest(format!(
                "update has {} {what} {expected}",
                header.num_params
            )));
        }
        if !header.train_loss.is_finite() {
            return Err(Error::InvalidRequest("train_loss is not finite".into()));
        }
        let Some(round) = &state.round else {
            return Err(Error::WrongRound(format!(
                "update for round {} but no round is open",
                header.round
            )));
        };
        if header.round != round.id {
            return Err(Error::WrongRound(format!(
                "update for round {} but round {} is open",
                header.round, round.id
            )));
        }
        if header.model_version != round.model_version {
            return Err(Error::WrongRound(format!(
                "update trained from version {} but round {} starts from version {}",
                header.model_version, round.id, round.model_version
            )));
        }
        match (&round.secure, &header.secure) {
            (Some(_), None) => {
                return Err(Error::InvalidRequest(format!(
                    "round {} uses secure aggregation; a plain update is refused",
                    round.id
                )));
            }
            (None, Some(_)) => {
                return Err(Error::InvalidRequest(format!(
                    "round {} uses plain aggregation; a masked input is refused",
                    round.id
                )));
            }
            (Some(secure), Some(_)) if !secure.awaits_masked_input(node) => {
                return Err(Error::WrongRound(format!(
                    "round {} is not collecting a masked input from node {node}",
                    round.id
                )));
            }
            _ => {}
        }
        match round.members.get(node) {
            None => Err(Error::WrongRound(format!(
                "node {node} is not in round {}'s cohort",
                round.id
            ))),
            Some(Outcome::Pending) => Ok(()),
            Some(_) => Err(Error::WrongRound(format!(
                "node {node} already answered round {}",
                round.id
            ))),
        }
    }

    /// Records a node's update for the open round.
    ///
    /// # Errors
    /// As [`Coordinator::check_update`] (the round may have closed while the payload
    /// streamed), and [`Error::InvalidRequest`] for a payload of the wrong length.
    pub fn submit_update(
        &self,
        session: &str,
        header: UpdateHeader,
        delta: Vec<f32>,
    ) -> Result<(), Error> {
        let mut state = self.lock();
        let node = state.touch(session)?;
        self.check_against_round(&state, &node, &header)?;
        if delta.len() != header.num_params {
            return Err(Error::InvalidRequest(format!(
                "update payload has {} values, its header announced {}",
                delta.len(),
                header.num_params
            )));
        }
        if let Some(index) = delta.iter().position(|v| !v.is_finite()) {
            return Err(Error::InvalidRequest(format!(
                "update value {index} is not finite"
            )));
        }

        let round = state.round.as_mut().ok_or(Error::ShuttingDown)?;
        debug!(%node, round = round.id, examples = header.num_examples, "update accepted");
        round
            .members
            .insert(node, Outcome::Submitted(Submission { header, delta }));
        drop(state);
        self.notify();
        Ok(())
    }

    /// Records a node's masked input for the open secure round.
    ///
    /// # Errors
    /// As [`Coordinator::check_update`], and what the protocol refuses (a vector of the wrong
    /// length or outside the ring, another sender's number).
    pub fn submit_masked(
        &self,
        session: &str,
        header: UpdateHeader,
        masked: Vec<u32>,
    ) -> Result<(), Error> {
        let mut state = self.lock();
        let node = state.touch(session)?;
        self.check_against_round(&state, &node, &header)?;
        let (protocol_round, number) = header
            .secure
            .ok_or_else(|| Error::InvalidRequest("not a masked input".into()))?;
        let round = state.round.as_mut().ok_or(Error::ShuttingDown)?;
        let secure = round.secure.as_mut().ok_or(Error::ShuttingDown)?;
        let input = athanor_core::secagg::messages::MaskedInput {
            round: protocol_round,
            stage: athanor_core::secagg::Stage::MaskedInput.number(),
            node: number,
            masked,
        };
        secure.receive_masked(&node, &input)?;
        debug!(%node, round = round.id, "masked input accepted");
        round.members.insert(node, Outcome::Masked(header));
        drop(state);
        self.notify();
        Ok(())
    }

    /// Records a node's message for a short stage of the open secure round.
    ///
    /// # Errors
    /// [`Error::UnknownSession`]; [`Error::WrongRound`] when no such round is open or the
    /// stage is not the one being collected; [`Error::InvalidRequest`] for a message the
    /// protocol refuses.
    pub fn secure_send(
        &self,
        session: &str,
        round_id: u64,
        message: NodeMessage,
    ) -> Result<(), Error> {
        let mut state = self.lock();
        let node = state.touch(session)?;
        let secure = state
            .round
            .as_mut()
            .filter(|r| r.id == round_id)
            .and_then(|r| r.secure.as_mut())
            .ok_or_else(|| {
                Error::WrongRound(format!(
                    "no secure aggregation is open for round {round_id}"
                ))
            })?;
        secure.receive(&node, message)?;
        drop(state);
        self.notify();
        Ok(())
    }

    /// Long poll for the coordinator's message to this node for `stage` of the open secure
    /// round: returns as soon as the stage before closes, or `Pending` after a bounded wait.
    ///
    /// # Errors
    /// [`Error::UnknownSession`]; [`Error::WrongRound`] when the round is not open (it may
    /// have been published or abandoned since) or the node has no message for the stage.
    pub async fn secure_receive(
        &self,
        session: &str,
        round_id: u64,
        stage: u32,
    ) -> Result<Outgoing, Error> {
        let mut changes = self.shared.changed.subscribe();
        let give_up = Instant::now() + POLL_TIMEOUT;
        loop {
            changes.borrow_and_update();
            let outgoing = {
                let mut state = self.lock();
                let node = state.touch(session)?;
                let secure = state
                    .round
                    .as_ref()
                    .filter(|r| r.id == round_id)
                    .and_then(|r| r.secure.as_ref())
                    .ok_or_else(|| Error::WrongRound(format!("round {round_id} is not open")))?;
                secure.outgoing(&node, stage)?
            };
            if !matches!(outgoing, Outgoing::Pending) {
                return Ok(outgoing);
            }
            match tokio::time::timeout_at(give_up, changes.changed()).await {
                Err(_) => return Ok(Outgoing::Pending),
                Ok(Err(_)) => return Err(Error::ShuttingDown),
                Ok(Ok(())) => {}
            }
        }
    }

    /// Records that a node declines the open round.
    ///
    /// # Errors
    /// [`Error::WrongRound`] when the node has no pending task in that round.
    pub fn decline(
        &self,
        session: &str,
        round_id: u64,
        reason: String,
        leaving: bool,
    ) -> Result<(), Error> {
        let mut state = self.lock();
        let node = state.touch(session)?;
        let round = state
            .round
            .as_mut()
            .filter(|r| r.id == round_id)
            .ok_or_else(|| Error::WrongRound(format!("round {round_id} is not open")))?;
        match round.members.get(&node) {
            Some(Outcome::Pending) => {}
            _ => {
                return Err(Error::WrongRound(format!(
                    "node {node} has no pending task in round {round_id}"
                )));
            }
        }
        warn!(%node, round = round_id, %reason, leaving, "node declined the round");
        round.members.insert(node.clone(), Outcome::Declined);
        if let Some(secure) = &mut round.secure {
            secure.withdraw(&node);
        }
        if leaving {
            state.nodes.remove(&node);
            // Its watch-only sessions stay: an operator may still fetch the models it helped
            // train.
            state
                .sessions
                .retain(|_, holder| !matches!(holder, Holder::Training(n) if *n == node));
            info!(%node, "node left the federation");
        }
        drop(state);
        self.notify();
        Ok(())
    }

    /// Where the federation stands.
    pub fn status(&self) -> Status {
        // The store's listing is in memory; read it before taking the state lock.
        let damaged_versions = self
            .shared
            .store
            .damaged()
            .into_iter()
            .map(|(version, cause)| (version, crate::store::error_chain(&cause)))
            .collect();
        let state = self.lock();
        let stage = match (&state.finished, &state.round, state.paused) {
            (Some(_), _, _) => "finished",
            (None, Some(_), _) => "training",
            (None, None, true) => "paused",
            (None, None, false) => "waiting_for_nodes",
        };
        Status {
            federation: self.shared.federation.clone(),
            round: state.round.as_ref().map(|r| r.id),
            stage,
            connected_nodes: state.connected(),
            latest_version: state.global.manifest.version,
            rounds_completed: state.rounds_completed,
            rounds_abandoned: state.rounds_abandoned,
            paused: state.paused,
            rounds_total: self.shared.config.rounds.total,
            finished: state.finished.clone(),
            damaged_versions,
            node_privacy: state.node_spending.clone(),
        }
    }

    /// Every node that joined this process, ordered by id.
    pub fn nodes(&self) -> Vec<NodeSummary> {
        let state = self.lock();
        let now = Instant::now();
        let connected: HashSet<NodeId> = state.connected_nodes().into_iter().collect();
        let mut nodes: Vec<NodeSummary> = state
            .nodes
            .iter()
            .map(|(node, entry)| {
                let round_state = state
                    .round
                    .as_ref()
                    .and_then(|round| round.members.get(node))
                    .map(|outcome| match outcome {
                        Outcome::Pending => "pending",
                        Outcome::Submitted(_) | Outcome::Masked(_) => "submitted",
                        Outcome::Declined => "declined",
                    });
                NodeSummary {
                    node: node.clone(),
                    session_age: now.saturating_duration_since(entry.joined_at),
                    last_seen: now.saturating_duration_since(entry.last_seen),
                    connected: connected.contains(node),
                    rounds_contributed: state.contributions.get(node).copied().unwrap_or(0),
                    fingerprint: entry.fingerprint.clone(),
                    round_state,
                }
            })
            .collect();
        nodes.sort_by(|a, b| a.node.cmp(&b.node));
        nodes
    }

    /// Stops the driver from opening new rounds; the open round, if any, runs to its end. The
    /// pause is on disk when this returns, so it outlives a restart. Touches the disk: call it
    /// from `spawn_blocking`.
    ///
    /// # Errors
    /// [`Error::Io`] when the pause cannot be recorded; rounds are then not paused.
    pub fn pause_rounds(&self) -> Result<Paused, Error> {
        let _pausing = lock(&self.shared.pausing);
        // Written even when already paused, in case the file was deleted by hand.
        self.shared.pause_flag.set()?;
        let mut state = self.lock();
        let paused = Paused {
            was_paused: state.paused,
            open_round: state.round.as_ref().map(|r| r.id),
        };
        state.paused = true;
        drop(state);
        if !paused.was_paused {
            info!(open_round = ?paused.open_round, "rounds paused by the operator");
        }
        self.notify();
        Ok(paused)
    }

    /// Lets the driver open rounds again, and removes the pause from disk. Returns whether
    /// rounds were paused. Touches the disk: call it from `spawn_blocking`.
    ///
    /// # Errors
    /// [`Error::Io`] when the pause file cannot be deleted; rounds then stay paused.
    pub fn resume_rounds(&self) -> Result<bool, Error> {
        let _pausing = lock(&self.shared.pausing);
        self.shared.pause_flag.clear()?;
        let was_paused = std::mem::replace(&mut self.lock().paused, false);
        if was_paused {
            info!("rounds resumed by the operator");
        }
        self.notify();
        Ok(was_paused)
    }

    /// Runs rounds until the configured number has been published, too many in a row were
    /// abandoned, or `shutdown` resolves. Marks the federation finished when it returns, so
    /// polling nodes learn there is no more work.
    ///
    /// # Errors
    /// Store failures while publishing.
    pub async fn drive(
        &self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), Error> {
        tokio::pin!(shutdown);
        let result = tokio::select! {
            result = self.run_rounds() => result,
            () = &mut shutdown => Ok("coordinator stopped".to_string()),
        };

        let reason = match &result {
            Ok(reason) | Err(Error::GaveUp(reason)) => reason.clone(),
            Err(e) => format!("coordinator failed: {e}"),
        };
        self.finish(reason);
        result.map(drop)
    }

    /// Runs rounds until the federation is done; returns why it is.
    async fn run_rounds(&self) -> Result<String, Error> {
        let config = &self.shared.config;
        let mut rng = match config.rounds.cohort_seed {
            Some(seed) => ChaCha20Rng::seed_from_u64(seed),
            None => ChaCha20Rng::try_from_rng(&mut rand::rngs::SysRng)
                .map_err(|e| Error::InvalidRequest(format!("operating system RNG: {e}")))?,
        };
        let mut abandoned_in_a_row = 0;

        while self.lock().rounds_completed < config.rounds.total {
            if abandoned_in_a_row >= config.rounds.max_consecutive_abandoned {
                warn!(
                    abandoned_in_a_row,
                    "giving up after too many abandoned rounds"
                );
                return Err(Error::GaveUp(format!(
                    "{abandoned_in_a_row} rounds abandoned in a row"
                )));
            }

            self.wait_for_nodes(config.rounds.min_nodes).await;
            if self.wait_while_paused().await {
                // Nodes may have come and gone during the pause: count them again.
                continue;
            }
            let sampling_rate =
                NodeLevelDp::sampling_rate(config.rounds.cohort_size, self.lock().connected());
            if let Some(spent) = self.node_budget_exhausted(sampling_rate)? {
                return Ok(spent);
            }
            let (round_id, unusable) = self.open_round(&mut rng, sampling_rate);
            let span = info_span!("round", round = round_id);
            let published = async {
                if let Some(reason) = unusable {
                    self.abandon(round_id, &reason);
                    // Nothing was asked of anyone: give nodes time to come or go before the
                    // next try, rather than burning through rounds in a millisecond.
                    self.wait_for_change(UNUSABLE_ROUND_PAUSE).await;
                    return Ok(false);
                }
                if config.aggregation.mode == AggregationMode::Secure {
                    self.run_secure_stages().await;
                } else {
                    self.wait_for_answers().await;
                }
                self.close_round().await
            }
            .instrument(span)
            .await?;

            if published {
                abandoned_in_a_row = 0;
            } else {
                abandoned_in_a_row += 1;
            }
        }
        Ok(format!("all {} rounds published", config.rounds.total))
    }

    /// Why no further round may be published under the node-level budget, if that is so.
    fn node_budget_exhausted(&self, sampling_rate: f64) -> Result<Option<String>, Error> {
        let Some(node_dp) = &self.shared.node_dp else {
            return Ok(None);
        };
        let node_dp = lock(node_dp);
        let charge = node_dp.charge(sampling_rate)?;
        if charge.within_budget {
            return Ok(None);
        }
        let spent = node_dp.spent()?.epsilon;
        let budget = node_dp.settings().epsilon;
        warn!(
            spent,
            budget,
            next = charge.record.epsilon,
            "node-level privacy budget reached"
        );
        Ok(Some(format!(
            "node-level privacy budget reached: epsilon {spent:.4} spent of {budget}, one more \
             round would bring it to {:.4}",
            charge.record.epsilon
        )))
    }

    /// Waits until the state changes (a node joins or leaves, an operator acts) or `limit`
    /// passes.
    async fn wait_for_change(&self, limit: Duration) {
        let mut changes = self.shared.changed.subscribe();
        changes.borrow_and_update();
        let _ = tokio::time::timeout(limit, changes.changed()).await;
    }

    /// Waits until rounds are not paused; returns whether it had to wait.
    async fn wait_while_paused(&self) -> bool {
        let mut changes = self.shared.changed.subscribe();
        let mut waited = false;
        loop {
            changes.borrow_and_update();
            if !self.lock().paused {
                return waited;
            }
            if !waited {
                info!("paused: no round opens until the operator resumes");
                waited = true;
            }
            if changes.changed().await.is_err() {
                return waited;
            }
        }
    }

    async fn wait_for_nodes(&self, min_nodes: usize) {
        let mut changes = self.shared.changed.subscribe();
        let mut announced = false;
        loop {
            changes.borrow_and_update();
            let connected = self.lock().connected();
            if connected >= min_nodes {
                return;
            }
            if !announced {
                info!(connected, min_nodes, "waiting for nodes");
                announced = true;
            }
            // Sessions also expire by time alone, so look again now and then.
            let _ = tokio::time::timeout(Duration::from_secs(5), changes.changed()).await;
        }
    }

    /// Opens a round; the reason is set when it cannot run at all (and is not left open).
    fn open_round(&self, rng: &mut ChaCha20Rng, sampling_rate: f64) -> (u64, Option<String>) {
        let config = &self.shared.config;
        let mut state = self.lock();
        let mut candidates: Vec<NodeId> = state.connected_nodes();
        candidates.sort();
        if self.shared.node_dp.is_some() && sampling_rate < 1.0 {
            // The node-level accountant assumes each node is drawn independently (Poisson
            // sampling), so the cohort size varies from round to round.
            let threshold = (sampling_rate * 2f64.powi(64)) as u64;
            candidates.retain(|_| rng.next_u64() < threshold);
        } else {
            let cohort_size = match config.rounds.cohort_size {
                0 => candidates.len(),
                n => n.min(candidates.len()),
            };
            // Partial Fisher-Yates with raw words; the modulo bias of a 64-bit word over a
            // few thousand candidates is below 2^-50.
            for i in 0..cohort_size {
                let j = i + (rng.next_u64() % (candidates.len() - i) as u64) as usize;
                candidates.swap(i, j);
            }
            candidates.truncate(cohort_size);
        }
        let cohort_size = candidates.len();

        let id = state.next_round;
        state.next_round += 1;
        let model_version = state.global.manifest.version;
        let (secure, unusable) = match config.aggregation.mode {
            AggregationMode::Plain => (None, None),
            // The protocol round and the rotation come from the operating system's generator,
            // never from a configured cohort seed: the round id must not repeat.
            AggregationMode::Secure => match SecureRound::open(
                config,
                &candidates,
                self.shared.spec.num_params(),
                &mut rand::rng(),
            ) {
                Ok(secure) => (Some(secure), None),
                Err(reason) => (None, Some(reason)),
            },
        };
        state.round = Some(OpenRound {
            id,
            model_version,
            deadline: Instant::now() + config.round_deadline(),
            sampling_rate,
            members: candidates
                .into_iter()
                .map(|n| (n, Outcome::Pending))
                .collect(),
            secure,
        });
        if unusable.is_some() {
            state.round = None;
        }
        drop(state);

        info!(
            round = id,
            cohort = cohort_size,
            model_version,
            "round opened"
        );
        self.notify();
        (id, unusable)
    }

    /// Runs a secure round's stages: each closes when every node it waits for has answered,
    /// or at its deadline.
    async fn run_secure_stages(&self) {
        let stage_deadline = self.shared.config.stage_deadline();
        let mut changes = self.shared.changed.subscribe();
        loop {
            changes.borrow_and_update();
            let deadline = {
                let mut state = self.lock();
                let Some(round) = &mut state.round else {
                    return;
                };
                let round_deadline = round.deadline;
                let Some(secure) = &mut round.secure else {
                    return;
                };
                if secure.stage_complete() || Instant::now() >= secure.deadline() {
                    let more = secure.close_stage(stage_deadline, round_deadline);
                    if let Some(reason) = secure.abandoned() {
                        warn!(%reason, "secure aggregation cannot complete");
                    }
                    drop(state);
                    self.notify();
                    if !more {
                        return;
                    }
                    continue;
                }
                secure.deadline()
            };
            let _ = tokio::time::timeout_at(deadline, changes.changed()).await;
        }
    }

    async fn wait_for_answers(&self) {
        let mut changes = self.shared.changed.subscribe();
        loop {
            changes.borrow_and_update();
            let deadline = {
                let state = self.lock();
                let Some(round) = &state.round else { return };
                if round
                    .members
                    .values()
                    .all(|o| !matches!(o, Outcome::Pending))
                {
                    return;
                }
                round.deadline
            };
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                warn!("round deadline passed with nodes still pending");
                return;
            }
        }
    }

    /// Aggregates and publishes, or abandons. Returns whether a version was published.
    async fn close_round(&self) -> Result<bool, Error> {
        let (round, global) = {
            let mut state = self.lock();
            let Some(round) = state.round.take() else {
                return Ok(false);
            };
            (round, Arc::clone(&state.global))
        };

        let mut round = round;
        let secure = round.secure.take();
        if let Some(reason) = secure.as_ref().and_then(SecureRound::abandoned) {
            self.abandon(round.id, &format!("secure aggregation: {reason}"));
            return Ok(false);
        }
        let mut submissions = Vec::new();
        let mut masked = BTreeMap::new();
        let (mut declined, mut missing) = (0usize, 0usize);
        for (node, outcome) in round.members {
            match outcome {
                Outcome::Submitted(s) => submissions.push((node, s)),
                Outcome::Masked(header) => {
                    masked.insert(node, header);
                }
                Outcome::Declined => declined += 1,
                Outcome::Pending => missing += 1,
            }
        }
        let answered = submissions.len() + masked.len();
        let min_updates = self.shared.config.min_updates();
        if answered < min_updates {
            self.abandon(
                round.id,
                &format!(
                    "{answered} updates, {min_updates} needed ({declined} declined, {missing} \
                     missing)"
                ),
            );
            return Ok(false);
        }

        let aggregate = match secure {
            Some(secure) => {
                self.secure_mean(secure, masked, round.sampling_rate)
                    .await?
            }
            None => self
                .mean_update(&global, &submissions, round.sampling_rate)
                .map(|(mean, privacy)| {
                    let reports = submissions
                        .iter()
                        .map(|(n, s)| (n.clone(), s.header.clone()));
                    (mean, privacy, reports.collect())
                }),
        };
        let (mean, node_privacy, reports): (Vec<f64>, _, Vec<(NodeId, UpdateHeader)>) =
            match aggregate {
                Ok(aggregate) => aggregate,
                Err(reason) => {
                    self.abandon(round.id, &reason);
                    return Ok(false);
                }
            };
        drop(submissions);

        let mut optimizer = self.lock().optimizer.clone();
        let params = match optimizer.apply(&global.params, &mean) {
            Ok(params) => params,
            Err(e) => {
                self.abandon(round.id, &e.to_string());
                return Ok(false);
            }
        };
        drop(mean);

        let mut draft = self.draft(round.id, &global.manifest, &reports);
        draft.node_privacy = node_privacy.clone();
        let store = self.store();
        // Without momentum there is no velocity to keep.
        let velocity = Some(optimizer.velocity().to_vec()).filter(|v| !v.is_empty());
        let published = tokio::task::spawn_blocking(move || {
            store
                .publish_with_optimizer(draft, &params, velocity.as_deref())
                .map(|m| (m, params))
        })
        .await
        .map_err(|e| Error::InvalidRequest(format!("publishing task failed: {e}")))?;
        let (manifest, params) = match published {
            Ok(published) => published,
            // A draft the store refuses comes from what nodes sent, not from the disk: lose
            // the round, keep the federation.
            Err(e @ (StoreError::InvalidDraft { .. } | StoreError::NonFiniteParameter { .. })) => {
                self.abandon(round.id, &format!("the store refused the version: {e}"));
                return Ok(false);
            }
            Err(e) => return Err(e.into()),
        };

        info!(
            round = round.id,
            version = manifest.version,
            contributors = manifest.contributors,
            declined,
            missing,
            "version published"
        );
        {
            let mut state = self.lock();
            state.global = Arc::new(GlobalModel {
                manifest: manifest.clone(),
                params,
            });
            state.rounds_completed += 1;
            state.optimizer = optimizer;
            for (node, _) in &reports {
                *state.contributions.entry(node.clone()).or_default() += 1;
            }
        }
        if let (Some(node_dp), Some(record)) = (&self.shared.node_dp, &node_privacy) {
            lock(node_dp).commit(record);
            info!(
                epsilon = record.epsilon,
                delta = record.delta,
                "node-level privacy charged"
            );
            if let Some(settings) = &self.shared.config.node_privacy {
                let spending =
                    Spending::new(settings, &record.history, record.epsilon, manifest.version);
                self.lock().node_spending = Some(spending);
            }
        }
        let _ = self.shared.published.send(manifest);
        self.notify();
        Ok(true)
    }

    /// The unmasked mean of a secure round's survivors, what publishing it costs under
    /// node-level privacy, and the survivors' reports. An `Err` is a reason to abandon.
    ///
    /// The mean is unweighted: weights are self-reported, and a weight inside the masked
    /// vector would scale a node's influence past the clipping bound.
    async fn secure_mean(
        &self,
        secure: SecureRound,
        mut reports: BTreeMap<NodeId, UpdateHeader>,
        sampling_rate: f64,
    ) -> Result<Aggregate, Error> {
        let finished = tokio::task::spawn_blocking(move || secure.finish())
            .await
            .map_err(|e| Error::InvalidRequest(format!("unmasking task failed: {e}")))?;
        let SecureSum {
            sum,
            contributors,
            noise_multiplier,
        } = match finished {
            Ok(sum) => sum,
            Err(reason) => return Ok(Err(format!("secure aggregation failed: {reason}"))),
        };

        let node_privacy = match (&self.shared.node_dp, noise_multiplier) {
            (None, _) => None,
            (Some(node_dp), Some(z)) => {
                let node_dp = lock(node_dp);
                let charge = node_dp.charge_at(sampling_rate, z)?;
                if !charge.within_budget {
                    return Ok(Err(format!(
                        "publishing would bring node-level epsilon to {:.4}, over the budget {}",
                        charge.record.epsilon,
                        node_dp.settings().epsilon
                    )));
                }
                Some(charge.record)
            }
            (Some(_), None) => {
                return Ok(Err("the nodes were asked for no node-level noise".into()));
            }
        };
        let count = contributors.len() as f64;
        let mean = sum.iter().map(|v| v / count).collect();
        let reports = contributors
            .into_iter()
            .filter_map(|node| reports.remove(&node).map(|header| (node, header)))
            .collect();
        Ok(Ok((mean, node_privacy, reports)))
    }

    /// The update to apply to the global model: the example-weighted mean, or with
    /// node-level DP the clipped, noised, unweighted mean and what publishing it costs. An
    /// error is a reason to abandon the round.
    fn mean_update(
        &self,
        global: &GlobalModel,
        submissions: &[(NodeId, Submission)],
        sampling_rate: f64,
    ) -> Result<(Vec<f64>, Option<NodePrivacy>), String> {
        let dim = global.params.len();
        let Some(node_dp) = &self.shared.node_dp else {
            let contributions: Vec<Contribution> = submissions
                .iter()
                .map(|(_, s)| Contribution {
                    weight: s.header.num_examples,
                    delta: s.delta.clone(),
                })
                .collect();
            let mean = strategy::weighted_mean(dim, &contributions).map_err(|e| e.to_string())?;
            return Ok((mean, None));
        };

        // Weighting by example counts would let one node's self-reported count scale its
        // influence past the clipping bound, so node-level DP averages uniformly.
        let mut node_dp = lock(node_dp);
        let charge = node_dp.charge(sampling_rate).map_err(|e| e.to_string())?;
        if !charge.within_budget {
            return Err(format!(
                "publishing would bring node-level epsilon to {:.4}, over the budget {}",
                charge.record.epsilon,
                node_dp.settings().epsilon
            ));
        }
        let updates: Vec<&[f32]> = submissions.iter().map(|(_, s)| &s.delta[..]).collect();
        let mean = node_dp
            .noised_mean(dim, &updates)
            .map_err(|e| e.to_string())?;
        Ok((mean, Some(charge.record)))
    }

    fn draft(
        &self,
        round: u64,
        parent: &Manifest,
        reports: &[(NodeId, UpdateHeader)],
    ) -> ManifestDraft {
        let plan = &self.shared.plan;
        // Counts and losses are self-reported; sums in f64 cannot overflow, and a mean that is
        // not finite (absurd losses) is left out rather than refused by the store.
        let total_examples: f64 = reports.iter().map(|(_, h)| h.num_examples as f64).sum();
        // Under secure aggregation nodes report no loss: one number per node would tell the
        // coordinator something about each update.
        let train_loss = if reports.iter().any(|(_, h)| h.secure.is_some()) {
            f64::NAN
        } else {
            reports
                .iter()
                .map(|(_, h)| h.train_loss * h.num_examples as f64)
                .sum::<f64>()
                / total_examples.max(1.0)
        };

        // The example-level guarantee of a version covers every node whose data reached it
        // through its lineage, so it is the worst of the parent's and this round's.
        let mut max_epsilon = parent.example_privacy.max_epsilon;
        let mut delta = parent.example_privacy.delta;
        for (_, h) in reports {
            max_epsilon = worse(max_epsilon, h.privacy);
            delta = match (delta, h.delta) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            };
        }
        if max_epsilon == Epsilon::Unbounded {
            delta = None;
        }

        let state = self.lock();
        let fingerprints = reports
            .iter()
            .filter_map(|(node, _)| state.nodes.get(node)?.fingerprint.clone())
            .collect();
        drop(state);

        let mut strategy_params = serde_json::Map::new();
        let strategy = &self.shared.config.strategy;
        strategy_params.insert(
            "server_learning_rate".into(),
            strategy.server_learning_rate.into(),
        );
        strategy_params.insert("server_momentum".into(), strategy.server_momentum.into());
        strategy_params.insert(
            "learning_rate".into(),
            serde_json::Value::from(f64::from(plan.learning_rate)),
        );
        strategy_params.insert("local_epochs".into(), plan.local_epochs.into());
        strategy_params.insert(
            "expected_batch_size".into(),
            plan.expected_batch_size.into(),
        );
        if let Some(dp) = &plan.dp {
            strategy_params.insert("clip_norm".into(), dp.clip_norm.into());
            strategy_params.insert("noise_multiplier".into(), dp.noise_multiplier.into());
        }

        let mut metrics = BTreeMap::new();
        let secure = reports.iter().any(|(_, h)| h.secure.is_some());
        if train_loss.is_finite() {
            metrics.insert("train_loss".to_string(), train_loss);
        } else if !secure {
            warn!(
                round,
                "the reported training losses do not average to a finite number"
            );
        }
        metrics.insert("examples".to_string(), total_examples);

        ManifestDraft {
            parent: Some(parent.version),
            round,
            model: self.shared.spec,
            init_seed: parent.init_seed,
            strategy: strategy.name().into(),
            strategy_params,
            contributors: reports.len() as u32,
            metrics,
            example_privacy: ExamplePrivacy { max_epsilon, delta },
            node_privacy: None,
            dataset_fingerprints: fingerprints,
            code_version: env!("CARGO_PKG_VERSION").into(),
        }
    }

    fn abandon(&self, round: u64, reason: &str) {
        warn!(round, %reason, "round abandoned; nothing published");
        self.lock().rounds_abandoned += 1;
        self.notify();
    }

    fn finish(&self, reason: String) {
        info!(%reason, "federation finished");
        let mut state = self.lock();
        state.round = None;
        state.finished = Some(reason);
        drop(state);
        self.notify();
    }

    fn notify(&self) {
        self.shared.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-updated in a way later
        // calls would misread: every update is a single insert or assignment.
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl State {
    /// The node of a training session, which is counted as seen now.
    ///
    /// # Errors
    /// [`Error::UnknownSession`]; [`Error::WatchOnly`] for a watch-only session.
    fn touch(&mut self, session: &str) -> Result<NodeId, Error> {
        let node = match self.sessions.get(session) {
            Some(Holder::Training(node)) => node.clone(),
            Some(Holder::Observer { .. }) => return Err(Error::WatchOnly),
            None => return Err(Error::UnknownSession),
        };
        if let Some(entry) = self.nodes.get_mut(&node) {
            entry.last_seen = Instant::now();
        }
        Ok(node)
    }

    /// Nodes seen recently, plus cohort members still training (they are silent while they
    /// work).
    fn connected_nodes(&self) -> Vec<NodeId> {
        let now = Instant::now();
        self.nodes
            .iter()
            .filter(|(node, entry)| {
                now.duration_since(entry.last_seen) < SESSION_TIMEOUT
                    || self
                        .round
                        .as_ref()
                        .is_some_and(|r| matches!(r.members.get(*node), Some(Outcome::Pending)))
            })
            .map(|(node, _)| node.clone())
            .collect()
    }

    fn connected(&self) -> usize {
        self.connected_nodes().len()
    }
}

/// The server optimizer, with the velocity stored with `latest` when there is momentum to
/// resume. A velocity that is missing or damaged costs only the optimizer's memory: FedAvgM
/// then starts again from zero velocity, which slows it for a few rounds but loses no model.
fn resume_optimizer(
    config: &CoordinatorConfig,
    store: &ModelStore,
    latest: &Manifest,
) -> ServerOptimizer {
    let (learning_rate, momentum) = (
        config.strategy.server_learning_rate,
        config.strategy.server_momentum,
    );
    let fresh = ServerOptimizer::new(learning_rate, momentum);
    if momentum == 0.0 {
        return fresh;
    }

    let version = latest.version;
    match store.optimizer_velocity(version) {
        Ok(Some(velocity)) => {
            info!(version, "server momentum resumed from the store");
            ServerOptimizer::resume(learning_rate, momentum, velocity)
        }
        // The initial model has no velocity to resume.
        Ok(None) if latest.round == 0 => fresh,
        Ok(None) => {
            info!(
                version,
                "version {version} holds no server velocity (published without momentum or by \
                 an older coordinator): server momentum starts from zero"
            );
            fresh
        }
        Err(error) => {
            warn!(
                version,
                error = %crate::store::error_chain(&error),
                "the server velocity stored with version {version} is unusable: server momentum \
                 starts from zero; the version itself is intact"
            );
            fresh
        }
    }
}

/// The weaker of two example-level guarantees.
fn worse(a: Epsilon, b: Epsilon) -> Epsilon {
    match (a, b) {
        (Epsilon::Finite(x), Epsilon::Finite(y)) => Epsilon::Finite(x.max(y)),
        _ => Epsilon::Unbounded,
    }
}

/// A session token: 128 random bits from the operating system, hex encoded.
fn new_session_token() -> String {
    let mut bytes = [0u8; 16];
    // Should the OS generator fail, the thread generator (itself OS-seeded, ChaCha-based)
    // still gives unpredictable tokens.
    if rand::rngs::SysRng.try_fill_bytes(&mut bytes).is_err() {
        rand::rng().fill_bytes(&mut bytes);
    }
    hex::encode(bytes)
}

/// Locks a mutex whose holders never leave it inconsistent, so a poisoned lock is still used.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Says once, at start, what the secure-aggregation settings imply for rounds of the cohort
/// the federation starts with: how finely updates are quantized, and how many nodes must
/// answer to the end, which the Shamir threshold may set above `min_updates`.
fn warn_about_secure_settings(config: &CoordinatorConfig) {
    let cohort = config.reference_cohort();
    if let Ok(quantizer) = config.reference_quantizer() {
        let levels = config.secure_clip_norm() / quantizer.config().granularity;
        info!(
            cohort,
            granularity = quantizer.config().granularity,
            levels,
            "secure aggregation quantizes each update coordinate to this step"
        );
        if levels < crate::secure::COARSE_LEVELS {
            warn!(
                cohort,
                levels,
                rounding_error = quantizer.rounding_error_bound(),
                "coarse quantization: the ring leaves few levels per update for this cohort; \
                 raise [aggregation] ring_bits or lower update_clip_norm"
            );
        }
    }
    let a = &config.aggregation;
    let neighbours = if cohort <= a.complete_graph_max {
        cohort.saturating_sub(1)
    } else {
        a.degree
    };
    let probe = athanor_core::secagg::SecAggConfig {
        round: athanor_core::secagg::RoundId(0),
        cohort: Vec::new(),
        vector_len: 1,
        ring_bits: a.ring_bits,
        complete_graph_max: a.complete_graph_max,
        degree: a.degree,
        threshold_percent: a.threshold_percent,
        min_survivors: 2,
    };
    let threshold = probe.threshold(neighbours);
    if threshold > config.min_updates() {
        warn!(
            cohort,
            threshold,
            min_updates = config.min_updates(),
            threshold_percent = a.threshold_percent,
            "each secret needs {threshold} live holders to be unmasked, so rounds of {cohort} \
             nodes need about that many to answer to the end, more than min_updates; lower \
             [aggregation] threshold_percent (down to 51) for more tolerance to dropouts"
        );
    }
}
