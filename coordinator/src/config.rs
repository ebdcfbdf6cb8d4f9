//! The coordinator's configuration file.
//!
//! A TOML file with the sections below; unknown keys are errors, so a typo never silently
//! falls back to a default. Everything is validated when the file is loaded, before any
//! socket is opened or anything is written.
//!
//! ```toml
//! [federation]
//! name = "adult-demo"
//!
//! [server]
//! listen = "127.0.0.1:50051"
//! # Optional: only these nodes may join, and these may not even though certified.
//! # allowed_nodes = ["clinic-a", "clinic-b"]
//! # revoked_nodes = ["clinic-c"]
//!
//! # Mutual TLS, the default; the files are those `athanor-coordinator certs init` writes.
//! # Without this section the coordinator refuses to start unless given --insecure.
//! [server.tls]
//! ca = "certs/ca.crt"
//! cert = "certs/coordinator.crt"
//! key = "certs/coordinator.key"
//!
//! [store]
//! dir = "store"
//!
//! [model]
//! architecture = "logistic_regression"   # or "mlp" with `hidden = 64`
//! features = 87
//! classes = 2
//! init_seed = 7
//!
//! [rounds]
//! total = 10
//! min_nodes = 3
//!
//! [training]
//! learning_rate = 0.5
//! local_epochs = 1.0
//! expected_batch_size = 64
//!
//! [privacy]
//! dp = "on"            # "off" must be written out; it is reported everywhere
//! clip_norm = 1.0
//! noise_multiplier = 1.0
//!
//! # Optional: secure aggregation is the default. `mode = "plain"` lets the coordinator see
//! # every update (for debugging and robust aggregators) and warns at every start.
//! [aggregation]
//! mode = "secure"
//! update_clip_norm = 10.0   # without [node_privacy]; with it, its update_clip_norm is used
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use athanor_core::accountant::{Accountant, Step};
use athanor_core::model::{Architecture, ModelSpec};
use athanor_core::plan::{DpSgdRequest, RoundPlan};
use serde::Deserialize;

use crate::Error;

/// A validated coordinator configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// Who this federation is.
    pub federation: FederationSection,
    /// Where to listen.
    #[serde(default)]
    pub server: ServerSection,
    /// Where published versions live.
    pub store: StoreSection,
    /// The model being trained.
    pub model: ModelSection,
    /// How rounds are run.
    #[serde(default)]
    pub rounds: RoundsSection,
    /// Local training asked of the nodes.
    pub training: TrainingSection,
    /// How the server applies the aggregated update.
    #[serde(default)]
    pub strategy: StrategySection,
    /// Example-level privacy asked of the nodes.
    pub privacy: PrivacySection,
    /// Node-level differential privacy of the published models; absent, only the nodes'
    /// example-level guarantees hold.
    #[serde(default)]
    pub node_privacy: Option<NodePrivacySection>,
    /// How updates are combined: secure aggregation unless written otherwise.
    #[serde(default)]
    pub aggregation: AggregationSection,
}

/// Whether the coordinator may see individual updates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AggregationMode {
    /// Secure aggregation: the coordinator learns only the sum of the surviving nodes'
    /// quantized updates (and, with `[node_privacy]`, only a noised sum).
    #[default]
    Secure,
    /// Every update reaches the coordinator in the clear: for debugging, and for aggregators
    /// that must see each update.
    Plain,
}

/// `[aggregation]`: how updates are combined, and the parameters of secure aggregation
/// (see `athanor_core::secagg` for what each one does).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregationSection {
    /// `secure` (the default) or `plain`.
    #[serde(default)]
    pub mode: AggregationMode,
    /// L2 bound S each node clips its update to before quantizing, when `[node_privacy]` is
    /// absent (with it, `[node_privacy] update_clip_norm` is the bound). Nodes warn when they
    /// clip.
    #[serde(default)]
    pub update_clip_norm: Option<f64>,
    /// Bits `b` of the ring `Z_{2^b}` masked vectors live in, at most 32.
    #[serde(default = "default_ring_bits")]
    pub ring_bits: u32,
    /// Spread each update with a seeded random rotation before rounding, so that no
    /// coordinate carries much of its norm.
    #[serde(default = "default_true")]
    pub rotation: bool,
    /// Shamir threshold as a percentage of a node's neighbourhood, 51 to 100.
    #[serde(default = "default_threshold_percent")]
    pub threshold_percent: u32,
    /// Cohorts up to this size use the complete neighbour graph.
    #[serde(default = "default_complete_graph_max")]
    pub complete_graph_max: usize,
    /// Neighbours of each node in larger cohorts (even).
    #[serde(default = "default_degree")]
    pub degree: usize,
    /// Seconds each of the short stages (keys, shares, unmasking) waits for the cohort. The
    /// masked inputs, which follow local training, wait until the round's deadline.
    #[serde(default = "default_stage_deadline")]
    pub stage_deadline_secs: f64,
    /// The sum may wrap around the ring with probability at most `2^-tail_bits`.
    #[serde(default = "default_tail_bits")]
    pub tail_bits: u32,
}

fn default_ring_bits() -> u32 {
    32
}
fn default_true() -> bool {
    true
}
fn default_threshold_percent() -> u32 {
    67
}
fn default_complete_graph_max() -> usize {
    64
}
fn default_degree() -> usize {
    20
}
fn default_stage_deadline() -> f64 {
    60.0
}
fn default_tail_bits() -> u32 {
    40
}

/// Fewer quantization levels than this between zero and the clipping bound is refused: the
/// rounding error would be of the order of the updates themselves.
const MIN_QUANTIZATION_LEVELS: f64 = 16.0;

/// S for secure aggregation without `[node_privacy]`.
pub const DEFAULT_SECURE_CLIP_NORM: f64 = 10.0;

impl Default for AggregationSection {
    fn default() -> Self {
        AggregationSection {
            mode: AggregationMode::Secure,
            update_clip_norm: None,
            ring_bits: default_ring_bits(),
            rotation: true,
            threshold_percent: default_threshold_percent(),
            complete_graph_max: default_complete_graph_max(),
            degree: default_degree(),
            stage_deadline_secs: default_stage_deadline(),
            tail_bits: default_tail_bits(),
        }
    }
}

/// `[federation]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationSection {
    /// Name shown to nodes and operators.
    pub name: String,
}

/// `[server]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// Address and port of the gRPC listener (node and admin services).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Largest model, in parameters, the coordinator will store or accept updates for.
    #[serde(default = "default_max_params")]
    pub max_model_params: usize,
    /// Requests one connection may have in flight at once (HTTP/2 streams); a node needs two
    /// (a long poll and a transfer), so the default of 8 leaves room without letting one peer
    /// tie up the server.
    #[serde(default = "default_max_streams")]
    pub max_streams_per_connection: u32,
    /// `[server.tls]`: the files of mutual TLS. Required unless the coordinator is started
    /// with `--insecure`, which ignores them.
    #[serde(default)]
    pub tls: Option<ServerTlsSection>,
    /// Node ids allowed to join; absent, every node the federation's CA certified may.
    #[serde(default)]
    pub allowed_nodes: Option<Vec<String>>,
    /// Node ids refused although the CA certified them (a lost laptop, an organization that
    /// left). Takes precedence over `allowed_nodes`.
    #[serde(default)]
    pub revoked_nodes: Vec<String>,
}

/// `[server.tls]`: the coordinator's side of mutual TLS. Relative paths are resolved against
/// the config file's directory.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTlsSection {
    /// The federation's CA certificate (PEM): the only issuer whose nodes and operators are
    /// accepted.
    pub ca: PathBuf,
    /// The coordinator's certificate (PEM), covering the names nodes dial.
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 50051))
}

fn default_max_params() -> usize {
    64 << 20
}

fn default_max_streams() -> u32 {
    8
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            listen: default_listen(),
            max_model_params: default_max_params(),
            max_streams_per_connection: default_max_streams(),
            tls: None,
            allowed_nodes: None,
            revoked_nodes: Vec::new(),
        }
    }
}

/// `[store]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    /// Directory of the model store, relative to the config file's directory.
    pub dir: PathBuf,
}

/// `[model]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// `logistic_regression` or `mlp`.
    pub architecture: ArchitectureName,
    /// Hidden width, for `mlp` only.
    pub hidden: Option<usize>,
    /// Number of input features (must equal the nodes' schemas).
    pub features: usize,
    /// Number of classes.
    pub classes: usize,
    /// Seed of the initial parameters, recorded in version 0's manifest.
    #[serde(default)]
    pub init_seed: u64,
}

/// Architecture names accepted in `[model] architecture`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ArchitectureName {
    /// Multinomial logistic regression.
    LogisticRegression,
    /// One-hidden-layer ReLU network.
    Mlp,
}

/// `[rounds]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoundsSection {
    /// Rounds to run before the federation finishes (counting only published ones).
    #[serde(default = "default_total")]
    pub total: u64,
    /// Connected nodes needed before a round starts.
    #[serde(default = "default_min_nodes")]
    pub min_nodes: usize,
    /// Nodes sampled into each round's cohort; 0 takes every connected node.
    #[serde(default)]
    pub cohort_size: usize,
    /// Updates needed to publish; fewer abandons the round. Defaults to `min_nodes`.
    pub min_updates: Option<usize>,
    /// Seconds the coordinator waits for a cohort's updates.
    #[serde(default = "default_deadline")]
    pub deadline_secs: u64,
    /// Rounds abandoned in a row before the coordinator gives up.
    #[serde(default = "default_max_abandoned")]
    pub max_consecutive_abandoned: u64,
    /// Seed for cohort sampling; absent draws from the operating system.
    pub cohort_seed: Option<u64>,
}

fn default_total() -> u64 {
    10
}
fn default_min_nodes() -> usize {
    2
}
fn default_deadline() -> u64 {
    600
}
fn default_max_abandoned() -> u64 {
    20
}

impl Default for RoundsSection {
    fn default() -> Self {
        RoundsSection {
            total: default_total(),
            min_nodes: default_min_nodes(),
            cohort_size: 0,
            min_updates: None,
            deadline_secs: default_deadline(),
            max_consecutive_abandoned: default_max_abandoned(),
            cohort_seed: None,
        }
    }
}

/// `[training]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingSection {
    /// SGD learning rate at the nodes.
    pub learning_rate: f32,
    /// Local epochs per round.
    pub local_epochs: f64,
    /// Expected DP-SGD batch size at each node.
    pub expected_batch_size: u32,
}

/// `[strategy]`: FedAvg, or FedAvgM with server momentum.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StrategySection {
    /// Server learning rate applied to the mean update (1 is plain FedAvg).
    #[serde(default = "default_server_lr")]
    pub server_learning_rate: f64,
    /// Server momentum in [0, 1) (0 is plain FedAvg).
    #[serde(default)]
    pub server_momentum: f64,
}

fn default_server_lr() -> f64 {
    1.0
}

impl Default for StrategySection {
    fn default() -> Self {
        StrategySection {
            server_learning_rate: default_server_lr(),
            server_momentum: 0.0,
        }
    }
}

impl StrategySection {
    /// `fedavg` or `fedavgm`, as recorded in manifests.
    pub fn name(&self) -> &'static str {
        if self.server_momentum == 0.0 {
            "fedavg"
        } else {
            "fedavgm"
        }
    }
}

/// `[privacy]`: what the coordinator asks of every node. Nodes check it against their own
/// floors and budgets and may decline.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacySection {
    /// `on` or `off`; there is no default, so turning DP off is always written down.
    pub dp: DpSwitch,
    /// Per-example clipping bound C (required when `dp = "on"`).
    pub clip_norm: Option<f64>,
    /// Noise multiplier sigma (required when `dp = "on"`).
    pub noise_multiplier: Option<f64>,
}

/// `[node_privacy]`: bounds what the published models reveal about any one organization's
/// data as a whole, by clipping every node's whole update to L2 norm `update_clip_norm` and
/// adding Gaussian noise of standard deviation `noise_multiplier * update_clip_norm` to their
/// sum before it is published (DP-FedAvg, McMahan et al. 2018). The coordinator accounts every published round and
/// stops publishing when `epsilon` would be exceeded at `delta`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodePrivacySection {
    /// L2 bound S on each node's update (model delta).
    pub update_clip_norm: f64,
    /// Noise multiplier z: the noise on the sum of updates has standard deviation `z * S`.
    pub noise_multiplier: f64,
    /// The federation's node-level budget: no version is published past it.
    pub epsilon: f64,
    /// The delta of that budget.
    #[serde(default = "default_node_delta")]
    pub delta: f64,
    /// `rdp` or `pld`.
    #[serde(default)]
    pub accountant: Accountant,
    /// Fixed seed for the aggregate's noise. For reproducible simulations only: a known seed
    /// lets anyone subtract the noise, so the coordinator warns whenever it is set.
    #[serde(default)]
    pub insecure_noise_seed: Option<u64>,
}

fn default_node_delta() -> f64 {
    1e-5
}

/// Whether DP-SGD is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DpSwitch {
    /// DP-SGD with the given clipping and noise.
    On,
    /// Plain SGD: no example-level privacy.
    Off,
}

impl NodePrivacySection {
    /// Checks every value, and that a single round fits in the budget: a federation that
    /// could never publish is a configuration error, not a silent stop.
    fn check(&self) -> Result<(), String> {
        let positive = |name: &str, value: f64| {
            if value.is_finite() && value > 0.0 {
                Ok(())
            } else {
                Err(format!(
                    "[node_privacy] {name} must be positive and finite, got {value}"
                ))
            }
        };
        positive("update_clip_norm", self.update_clip_norm)?;
        positive("noise_multiplier", self.noise_multiplier)?;
        positive("epsilon", self.epsilon)?;
        if !(self.delta > 0.0 && self.delta < 1.0) {
            return Err(format!(
                "[node_privacy] delta must be in (0, 1), got {}",
                self.delta
            ));
        }
        let one_round = Step {
            q: 1.0,
            sigma: self.noise_multiplier,
            count: 1,
        };
        let report = self
            .accountant
            .epsilon(&[one_round], self.delta)
            .map_err(|e| format!("[node_privacy]: {e}"))?;
        if report.epsilon > self.epsilon {
            return Err(format!(
                "[node_privacy] one round with every node at noise_multiplier = {} already \
                 spends epsilon = {:.3}, more than the budget {}; raise noise_multiplier or \
                 the budget",
                self.noise_multiplier, report.epsilon, self.epsilon
            ));
        }
        Ok(())
    }
}

impl CoordinatorConfig {
    /// Reads and validates a config file; relative paths in it are resolved against the
    /// file's directory.
    ///
    /// # Errors
    /// [`Error::Config`] naming the file and the problem.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config = Self::parse(&text, path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        let tls = config
            .server
            .tls
            .iter_mut()
            .flat_map(|tls| [&mut tls.ca, &mut tls.cert, &mut tls.key]);
        for file in std::iter::once(&mut config.store.dir).chain(tls) {
            if file.is_relative() {
                *file = base.join(&*file);
            }
        }
        Ok(config)
    }

    /// Parses and validates config text; `origin` names it in errors.
    ///
    /// # Errors
    /// [`Error::Config`] naming `origin` and the problem.
    pub fn parse(text: &str, origin: &Path) -> Result<Self, Error> {
        let config: CoordinatorConfig = toml::from_str(text).map_err(|e| Error::Config {
            path: origin.to_path_buf(),
            message: e.to_string(),
        })?;
        config.check().map_err(|message| Error::Config {
            path: origin.to_path_buf(),
            message,
        })?;
        Ok(config)
    }

    /// Validates a configuration built in code (files are checked when parsed).
    ///
    /// # Errors
    /// A message naming the section and key at fault.
    pub fn check(&self) -> Result<(), String> {
        if self.federation.name.trim().is_empty() {
            return Err("[federation] name must not be empty".into());
        }
        let listed = self.server.allowed_nodes.iter().flatten();
        for id in listed.chain(&self.server.revoked_nodes) {
            athanor_tls::identity::check_name("[server] allowed_nodes/revoked_nodes: node id", id)?;
        }
        let spec = self.model_spec()?;
        if self.server.max_streams_per_connection < 2 {
            return Err(format!(
                "[server] max_streams_per_connection = {} is below 2: a node holds a long poll \
                 open while it transfers a model",
                self.server.max_streams_per_connection
            ));
        }
        if spec.num_params() > self.server.max_model_params {
            return Err(format!(
                "[model] has {} parameters, more than [server] max_model_params = {}",
                spec.num_params(),
                self.server.max_model_params
            ));
        }
        let rounds = &self.rounds;
        if rounds.total == 0 {
            return Err("[rounds] total must be at least 1".into());
        }
        if rounds.min_nodes == 0 {
            return Err("[rounds] min_nodes must be at least 1".into());
        }
        if rounds.cohort_size != 0 && rounds.cohort_size < self.min_updates() {
            return Err(format!(
                "[rounds] cohort_size = {} is below min_updates = {}: no round could publish",
                rounds.cohort_size,
                self.min_updates()
            ));
        }
        if self.min_updates() == 0 {
            return Err("[rounds] min_updates must be at least 1".into());
        }
        if self.min_updates() > rounds.min_nodes {
            return Err(format!(
                "[rounds] min_updates = {} exceeds min_nodes = {}: a round could open with fewer \
                 nodes than it needs to publish; raise min_nodes",
                self.min_updates(),
                rounds.min_nodes
            ));
        }
        if rounds.max_consecutive_abandoned == 0 {
            return Err(
                "[rounds] max_consecutive_abandoned must be at least 1: with 0 the coordinator \
                 would give up before its first round"
                    .into(),
            );
        }
        let strategy = &self.strategy;
        if !(strategy.server_learning_rate.is_finite() && strategy.server_learning_rate > 0.0) {
            return Err(format!(
                "[strategy] server_learning_rate must be positive, got {}",
                strategy.server_learning_rate
            ));
        }
        if !(0.0..1.0).contains(&strategy.server_momentum) {
            return Err(format!(
                "[strategy] server_momentum must be in [0, 1), got {}",
                strategy.server_momentum
            ));
        }
        if rounds.deadline_secs == 0 {
            return Err("[rounds] deadline_secs must be at least 1".into());
        }
        self.round_plan()?
            .validate()
            .map_err(|e| format!("[training]/[privacy]: {e}"))?;
        if let Some(node) = &self.node_privacy {
            node.check()?;
        }
        self.check_aggregation_values()?;
        if self.aggregation.mode == AggregationMode::Secure {
            self.check_secure()?;
        }
        Ok(())
    }

    /// Checks the `[aggregation]` values whatever the mode, so that switching to secure
    /// aggregation never uncovers a bad value.
    fn check_aggregation_values(&self) -> Result<(), String> {
        let a = &self.aggregation;
        if let (Some(clip), Some(node)) = (a.update_clip_norm, &self.node_privacy)
            && clip != node.update_clip_norm
        {
            return Err(format!(
                "[aggregation] update_clip_norm = {clip} differs from [node_privacy] \
                 update_clip_norm = {}; with node-level privacy the latter is the bound, so \
                 leave the former out",
                node.update_clip_norm
            ));
        }
        let clip = self.secure_clip_norm();
        if !(clip.is_finite() && clip > 0.0) {
            return Err(format!(
                "[aggregation] update_clip_norm must be positive and finite, got {clip}"
            ));
        }
        if !(a.stage_deadline_secs.is_finite() && (0.1..=86_400.0).contains(&a.stage_deadline_secs))
        {
            return Err(format!(
                "[aggregation] stage_deadline_secs must be between 0.1 and 86400, got {}",
                a.stage_deadline_secs
            ));
        }
        if !(1..=128).contains(&a.tail_bits) {
            return Err(format!(
                "[aggregation] tail_bits must be between 1 and 128, got {}",
                a.tail_bits
            ));
        }
        let cohort = self.reference_cohort().max(2);
        athanor_core::secagg::SecAggConfig {
            round: athanor_core::secagg::RoundId(0),
            cohort: (1..=cohort as u64)
                .map(athanor_core::secagg::NodeId)
                .collect(),
            vector_len: 1,
            ring_bits: a.ring_bits,
            complete_graph_max: a.complete_graph_max,
            degree: a.degree,
            threshold_percent: a.threshold_percent,
            min_survivors: 2,
        }
        .validate()
        .map_err(|e| format!("[aggregation]: {e}"))
    }

    /// Checks that secure aggregation can run at all: at least two updates, and a ring that
    /// holds the sum of the cohort the federation starts with at a useful precision.
    fn check_secure(&self) -> Result<(), String> {
        if self.min_updates() < 2 {
            return Err(format!(
                "[aggregation] mode = \"secure\" needs [rounds] min_updates of at least 2 (got \
                 {}): the sum of one node's update is that update; use mode = \"plain\" for a \
                 single node",
                self.min_updates()
            ));
        }
        let quantizer = self
            .reference_quantizer()
            .map_err(|e| format!("[aggregation]: {e}"))?;
        let levels = self.secure_clip_norm() / quantizer.config().granularity;
        if levels < MIN_QUANTIZATION_LEVELS {
            return Err(format!(
                "[aggregation] ring_bits = {} leaves {levels} quantization levels between zero \
                 and update_clip_norm = {} for a cohort of {}: the rounding would swamp the \
                 updates; raise ring_bits or lower update_clip_norm",
                self.aggregation.ring_bits,
                self.secure_clip_norm(),
                self.reference_cohort()
            ));
        }
        Ok(())
    }

    /// The cohort size the checks at load time assume: the configured cohort, or every node
    /// the first round waits for.
    pub fn reference_cohort(&self) -> usize {
        self.rounds
            .cohort_size
            .max(self.rounds.min_nodes)
            .max(self.min_updates())
    }

    /// The finest quantization for [`CoordinatorConfig::reference_cohort`] nodes, as rounds of
    /// that size will use.
    ///
    /// # Errors
    /// When no quantization step fits the ring.
    pub fn reference_quantizer(
        &self,
    ) -> Result<athanor_core::secagg::quantize::Quantizer, athanor_core::secagg::SecAggError> {
        let dimension = self.model_spec().map_or(1, |spec| spec.num_params());
        let rotation_seed = self.aggregation.rotation.then_some([0; 32]);
        self.secure_quantizer(self.reference_cohort(), dimension, rotation_seed)
    }

    /// The finest quantization of updates of `dimension` parameters for a cohort of `cohort`
    /// nodes, with each node's share of `[node_privacy]` noise sized for `min_updates`
    /// survivors.
    ///
    /// # Errors
    /// When no quantization step fits the ring.
    pub fn secure_quantizer(
        &self,
        cohort: usize,
        dimension: usize,
        rotation_seed: Option<[u8; 32]>,
    ) -> Result<athanor_core::secagg::quantize::Quantizer, athanor_core::secagg::SecAggError> {
        use athanor_core::secagg::quantize::{DistributedNoise, QuantizationConfig, Quantizer};
        let noise = match &self.node_privacy {
            Some(node) => DistributedNoise::Gaussian {
                sum_std: node.noise_multiplier * node.update_clip_norm,
                min_survivors: self.min_updates(),
            },
            None => DistributedNoise::InsecureNone,
        };
        Quantizer::finest(QuantizationConfig {
            dimension,
            clip_norm: self.secure_clip_norm(),
            granularity: 1.0,
            rotation_seed,
            noise,
            max_contributors: cohort,
            ring_bits: self.aggregation.ring_bits,
            tail_bits: self.aggregation.tail_bits,
        })
    }

    /// The L2 bound nodes clip their updates to under secure aggregation.
    pub fn secure_clip_norm(&self) -> f64 {
        match &self.node_privacy {
            Some(node) => node.update_clip_norm,
            None => self
                .aggregation
                .update_clip_norm
                .unwrap_or(DEFAULT_SECURE_CLIP_NORM),
        }
    }

    /// How long each short stage of secure aggregation waits.
    pub fn stage_deadline(&self) -> Duration {
        Duration::from_secs_f64(self.aggregation.stage_deadline_secs)
    }

    /// Updates needed to publish a round.
    pub fn min_updates(&self) -> usize {
        self.rounds.min_updates.unwrap_or(self.rounds.min_nodes)
    }

    /// How long a round waits for its cohort.
    pub fn round_deadline(&self) -> Duration {
        Duration::from_secs(self.rounds.deadline_secs)
    }

    /// The model spec described by `[model]`.
    ///
    /// # Errors
    /// A message naming the bad key.
    pub fn model_spec(&self) -> Result<ModelSpec, String> {
        let m = &self.model;
        if m.features == 0 {
            return Err("[model] features must be at least 1".into());
        }
        if m.classes < 2 {
            return Err(format!(
                "[model] classes must be at least 2, got {}",
                m.classes
            ));
        }
        let architecture = match (m.architecture, m.hidden) {
            (ArchitectureName::LogisticRegression, None) => Architecture::LogisticRegression,
            (ArchitectureName::LogisticRegression, Some(_)) => {
                return Err("[model] hidden applies only to architecture = \"mlp\"".into());
            }
            (ArchitectureName::Mlp, Some(hidden)) if hidden > 0 => Architecture::Mlp { hidden },
            (ArchitectureName::Mlp, _) => {
                return Err("[model] architecture = \"mlp\" needs hidden >= 1".into());
            }
        };
        Ok(ModelSpec {
            architecture,
            features: m.features,
            classes: m.classes,
        })
    }

    /// The plan sent with every task.
    ///
    /// # Errors
    /// A message naming the missing `[privacy]` key.
    pub fn round_plan(&self) -> Result<RoundPlan, String> {
        let p = &self.privacy;
        let dp = match (p.dp, p.clip_norm, p.noise_multiplier) {
            (DpSwitch::On, Some(clip_norm), Some(noise_multiplier)) => Some(DpSgdRequest {
                clip_norm,
                noise_multiplier,
            }),
            (DpSwitch::On, _, _) => {
                return Err("[privacy] dp = \"on\" needs clip_norm and noise_multiplier".into());
            }
            // Switching DP off keeps the tuned clip norm and noise multiplier in the file, so
            // that a private and a non-private run differ by one line; they are ignored.
            (DpSwitch::Off, _, _) => None,
        };
        Ok(RoundPlan {
            learning_rate: self.training.learning_rate,
            local_epochs: self.training.local_epochs,
            expected_batch_size: self.training.expected_batch_size,
            dp,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        [federation]
        name = "t"
        [store]
        dir = "s"
        [model]
        architecture = "mlp"
        hidden = 8
        features = 4
        classes = 3
        [training]
        learning_rate = 0.1
        local_epochs = 1.0
        expected_batch_size = 16
        [privacy]
        dp = "on"
        clip_norm = 1.0
        noise_multiplier = 1.0
    "#;

    fn parse(text: &str) -> Result<CoordinatorConfig, Error> {
        CoordinatorConfig::parse(text, Path::new("coordinator.toml"))
    }

    fn refusal(extra: &str) -> String {
        parse(&format!("{GOOD}\n{extra}"))
            .expect_err(extra)
            .to_string()
    }

    #[test]
    fn a_ring_too_small_for_the_cohort_is_refused_with_its_numbers() {
        let error = refusal("[rounds]\nmin_nodes = 8\n[aggregation]\nring_bits = 4");
        assert!(
            error.contains("needs") && error.contains("ring has 4"),
            "{error}"
        );
        let error = refusal("[aggregation]\nupdate_clip_norm = 1e30");
        assert!(error.contains("[aggregation]"), "{error}");
        // Fits, but with a handful of levels the rounding would drown the updates.
        let error = refusal("[rounds]\nmin_nodes = 8\n[aggregation]\nring_bits = 8");
        assert!(error.contains("quantization levels"), "{error}");
        assert!(parse(&format!("{GOOD}\n[rounds]\nmin_nodes = 8")).is_ok());
    }

    #[test]
    fn rounds_that_could_never_publish_are_refused() {
        let error = refusal("[rounds]\nmin_nodes = 2\nmin_updates = 3");
        assert!(
            error.contains("min_updates = 3 exceeds min_nodes = 2"),
            "{error}"
        );
        let error = refusal("[rounds]\nmax_consecutive_abandoned = 0");
        assert!(error.contains("max_consecutive_abandoned"), "{error}");
    }

    #[test]
    fn aggregation_values_are_checked_in_plain_mode_too() {
        for bad in [
            "ring_bits = 0",
            "threshold_percent = 5",
            "degree = 3",
            "update_clip_norm = -4.0",
            "update_clip_norm = nan",
            "tail_bits = 0",
        ] {
            let error = refusal(&format!("[aggregation]\nmode = \"plain\"\n{bad}"));
            assert!(error.contains("[aggregation]"), "{bad}: {error}");
        }
    }

    #[test]
    fn accepts_a_complete_config() {
        let config = parse(GOOD).unwrap();
        assert_eq!(
            config.model_spec().unwrap().num_params(),
            4 * 8 + 8 + 8 * 3 + 3
        );
        assert_eq!(config.min_updates(), 2);
    }

    #[test]
    fn dp_on_without_noise_names_the_missing_key() {
        let text = GOOD.replace("noise_multiplier = 1.0", "");
        let err = parse(&text).unwrap_err().to_string();
        assert!(
            err.contains("coordinator.toml") && err.contains("noise_multiplier"),
            "{err}"
        );
    }

    #[test]
    fn a_typo_in_a_key_is_an_error_not_a_default() {
        let text = GOOD.replace("local_epochs", "local_epoch");
        assert!(parse(&text).is_err());
    }

    #[test]
    fn tls_files_are_resolved_against_the_config_directory() {
        let dir = tempfile::tempdir().unwrap();
        let text = GOOD.replace(
            "[store]",
            "[server]\nrevoked_nodes = [\"x\"]\n[server.tls]\nca = \"c/ca.crt\"\n\
             cert = \"/abs/coordinator.crt\"\nkey = \"c/coordinator.key\"\n[store]",
        );
        let path = dir.path().join("coordinator.toml");
        std::fs::write(&path, text).unwrap();
        let config = CoordinatorConfig::load(&path).unwrap();
        let tls = config.server.tls.expect("[server.tls] is read");
        assert_eq!(tls.ca, dir.path().join("c/ca.crt"));
        assert_eq!(tls.cert, Path::new("/abs/coordinator.crt"));
        assert_eq!(config.server.revoked_nodes, ["x"]);
    }

    #[test]
    fn a_malformed_node_id_in_the_access_lists_is_rejected() {
        let text = GOOD.replace("[store]", "[server]\nallowed_nodes = [\"a b\"]\n[store]");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("allowed_nodes"), "{err}");
    }

    #[test]
    fn negative_noise_is_rejected_at_load() {
        let text = GOOD.replace("noise_multiplier = 1.0", "noise_multiplier = -1.0");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("noise_multiplier"), "{err}");
    }
}
