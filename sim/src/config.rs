//! The simulator's configuration file.
//!
//! One file describes the whole federation: the dataset and how it is split across virtual
//! nodes, and the same `[model]`, `[rounds]` and `[training]` sections a coordinator reads.
//! `[privacy]` sets what the coordinator asks and what every node accepts.
//!
//! ```toml
//! [simulation]
//! nodes = 8
//! partition = "iid"          # or "dirichlet" with alpha = 0.5
//! seed = 42
//!
//! [data]
//! train = "../data/adult_numeric_train.csv.gz"
//! test = "../data/adult_numeric_test.csv.gz"
//! schema = "../data/adult.schema.toml"
//!
//! [model]
//! architecture = "logistic_regression"
//! features = 87
//! classes = 2
//!
//! [rounds]
//! total = 20
//!
//! [training]
//! learning_rate = 0.5
//! local_epochs = 1.0
//! expected_batch_size = 64
//!
//! [privacy]
//! dp = "on"
//! clip_norm = 1.0
//! noise_multiplier = 1.0
//! delta = 1e-5
//! ```
//!
//! Updates are combined with secure aggregation unless `[aggregation] mode = "plain"`; the
//! section takes the coordinator's keys. `[simulation] dropout_rate` and `dropout_stage` make
//! each virtual node go silent in a round with that probability, before sending its message
//! for that stage (`advertise-keys`, `share-keys`, `masked-input` or `unmasking`). A silent
//! node holds its stage until the stage's deadline, as a real one would, so simulations with
//! dropouts want short `[aggregation] stage_deadline_secs` and `[rounds] deadline_secs`, and
//! an explicit `[rounds] min_updates` below the cohort.

use std::path::{Path, PathBuf};

use athanor_coordinator::CoordinatorConfig;
use athanor_coordinator::config::{
    AggregationMode, AggregationSection, DpSwitch, FederationSection, ModelSection,
    NodePrivacySection, PrivacySection as CoordinatorPrivacy, RoundsSection, ServerSection,
    StoreSection, StrategySection, TrainingSection,
};
use athanor_core::accountant::Accountant;
use athanor_node::NodeConfig;
use athanor_node::config::{CoordinatorSection, DataSection, NodeSection, PrivacySection};
use serde::Deserialize;

use crate::Error;
use crate::partition::Partition;

/// A validated simulation configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimConfig {
    /// Virtual nodes and partitioning.
    pub simulation: SimulationSection,
    /// The dataset.
    pub data: SimDataSection,
    /// The model, as for a coordinator.
    pub model: ModelSection,
    /// Rounds, as for a coordinator.
    #[serde(default)]
    pub rounds: RoundsSection,
    /// Local training, as for a coordinator.
    pub training: TrainingSection,
    /// Server optimizer, as for a coordinator.
    #[serde(default)]
    pub strategy: StrategySection,
    /// Example-level privacy for every node.
    pub privacy: SimPrivacySection,
    /// Node-level DP of the published models, as for the coordinator.
    #[serde(default)]
    pub node_privacy: Option<NodePrivacySection>,
    /// How updates are combined, as for the coordinator.
    #[serde(default)]
    pub aggregation: AggregationSection,
}

/// `[simulation]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimulationSection {
    /// Number of virtual nodes.
    pub nodes: usize,
    /// `iid` or `dirichlet` (label skew).
    pub partition: PartitionName,
    /// Dirichlet concentration, for `partition = "dirichlet"` only.
    pub alpha: Option<f64>,
    /// Seed of the partition, the cohort sampling and, in reproducible mode, the noise.
    #[serde(default)]
    pub seed: u64,
    /// Derive every node's noise from `seed` so runs repeat exactly. The noise is then known
    /// to anyone with the config: for research on public data only.
    #[serde(default)]
    pub reproducible: bool,
    /// Probability that a virtual node drops out of a secure round.
    #[serde(default)]
    pub dropout_rate: f64,
    /// The stage whose message a dropping node never sends.
    #[serde(default)]
    pub dropout_stage: DropoutStage,
}

/// Stage names accepted in `[simulation] dropout_stage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DropoutStage {
    /// Never advertises keys.
    AdvertiseKeys,
    /// Advertises, never sends shares.
    ShareKeys,
    /// Sends shares, never its masked input.
    #[default]
    MaskedInput,
    /// Sends its masked input, never the unmasking shares.
    Unmasking,
}

impl DropoutStage {
    /// The protocol stage.
    pub fn stage(self) -> athanor_core::secagg::Stage {
        use athanor_core::secagg::Stage;
        match self {
            DropoutStage::AdvertiseKeys => Stage::AdvertiseKeys,
            DropoutStage::ShareKeys => Stage::ShareKeys,
            DropoutStage::MaskedInput => Stage::MaskedInput,
            DropoutStage::Unmasking => Stage::Unmasking,
        }
    }
}

/// Partition names accepted in `[simulation] partition`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PartitionName {
    /// Equal random shares.
    Iid,
    /// Label skew drawn from Dirichlet(alpha).
    Dirichlet,
}

impl SimulationSection {
    /// The partition described by `partition` and `alpha`.
    ///
    /// # Errors
    /// A message naming the inconsistent key.
    pub fn partition(&self) -> Result<Partition, String> {
        match (self.partition, self.alpha) {
            (PartitionName::Iid, None) => Ok(Partition::Iid),
            (PartitionName::Iid, Some(_)) => {
                Err("[simulation] alpha applies only to partition = \"dirichlet\"".into())
            }
            (PartitionName::Dirichlet, Some(alpha)) if alpha.is_finite() && alpha > 0.0 => {
                Ok(Partition::Dirichlet { alpha })
            }
            (PartitionName::Dirichlet, _) => {
                Err("[simulation] partition = \"dirichlet\" needs a positive alpha".into())
            }
        }
    }
}

/// `[data]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimDataSection {
    /// CSV or gzip CSV split across the nodes.
    pub train: PathBuf,
    /// Held-out file the global model is evaluated on; without it `test_fraction` of
    /// `train` is held out.
    pub test: Option<PathBuf>,
    /// Schema with label, classes and public feature bounds.
    pub schema: PathBuf,
    /// Fraction of `train` held out when there is no `test` file.
    #[serde(default = "default_test_fraction")]
    pub test_fraction: f64,
}

fn default_test_fraction() -> f64 {
    0.2
}

/// `[privacy]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimPrivacySection {
    /// `on` or `off`, always written out.
    pub dp: DpSwitch,
    /// Per-example clipping bound C.
    pub clip_norm: Option<f64>,
    /// Noise multiplier sigma.
    pub noise_multiplier: Option<f64>,
    /// The delta every node reports its epsilon at.
    #[serde(default = "default_delta")]
    pub delta: f64,
}

fn default_delta() -> f64 {
    1e-5
}

impl SimConfig {
    /// Reads and validates a simulation config; relative paths are resolved against the file's
    /// directory.
    ///
    /// # Errors
    /// [`Error::Config`] naming the file and the key.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let config = Self::parse(&text, path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        Ok(config.resolve(base))
    }

    /// Parses and validates config text; `origin` names it in errors.
    ///
    /// # Errors
    /// [`Error::Config`] naming `origin` and the key.
    pub fn parse(text: &str, origin: &Path) -> Result<Self, Error> {
        let config: SimConfig = toml::from_str(text).map_err(|e| Error::Config {
            path: origin.to_path_buf(),
            message: e.to_string(),
        })?;
        config.check().map_err(|message| Error::Config {
            path: origin.to_path_buf(),
            message,
        })?;
        Ok(config)
    }

    fn resolve(mut self, base: &Path) -> Self {
        let data = &mut self.data;
        for file in [
            Some(&mut data.train),
            data.test.as_mut(),
            Some(&mut data.schema),
        ]
        .into_iter()
        .flatten()
        {
            if file.is_relative() {
                *file = base.join(&*file);
            }
        }
        self
    }

    fn check(&self) -> Result<(), String> {
        if self.simulation.nodes == 0 {
            return Err("[simulation] nodes must be at least 1".into());
        }
        self.simulation.partition()?;
        let t = self.data.test_fraction;
        if !(t > 0.0 && t < 1.0) && self.data.test.is_none() {
            return Err(format!("[data] test_fraction must be in (0, 1), got {t}"));
        }
        let d = self.privacy.delta;
        if !(d > 0.0 && d < 1.0) {
            return Err(format!("[privacy] delta must be in (0, 1), got {d}"));
        }
        let rate = self.simulation.dropout_rate;
        if !(0.0..1.0).contains(&rate) {
            return Err(format!(
                "[simulation] dropout_rate must be in [0, 1), got {rate}"
            ));
        }
        if rate > 0.0 {
            if self.aggregation.mode != AggregationMode::Secure {
                return Err(
                    "[simulation] dropout_rate applies to secure aggregation only; plain mode \
                     has no stages to drop out of"
                        .into(),
                );
            }
            if self.rounds.min_updates.is_none() {
                return Err(
                    "[simulation] dropout_rate needs an explicit [rounds] min_updates: by \
                     default a round waits for its whole cohort, which dropouts never leave"
                        .into(),
                );
            }
        }
        self.coordinator(Path::new("store")).check()
    }

    /// The configuration of the simulated coordinator, storing versions in `store`.
    pub fn coordinator(&self, store: &Path) -> CoordinatorConfig {
        let mut rounds = self.rounds.clone();
        if rounds.cohort_seed.is_none() {
            rounds.cohort_seed = Some(self.simulation.seed);
        }
        // Every virtual node joins before the first round, so the round waits for all of
        // them; by default a round publishes only when its whole cohort answered.
        let nodes = self.simulation.nodes;
        rounds.min_nodes = nodes;
        if rounds.min_updates.is_none() {
            let cohort = match rounds.cohort_size {
                0 => nodes,
                n => n.min(nodes),
            };
            rounds.min_updates = Some(cohort);
        }
        CoordinatorConfig {
            federation: FederationSection {
                name: "simulation".into(),
            },
            server: ServerSection::default(),
            store: StoreSection {
                dir: store.to_path_buf(),
            },
            model: self.model.clone(),
            rounds,
            training: self.training.clone(),
            strategy: self.strategy.clone(),
            privacy: CoordinatorPrivacy {
                dp: self.privacy.dp,
                clip_norm: self.privacy.clip_norm,
                noise_multiplier: self.privacy.noise_multiplier,
            },
            node_privacy: self.node_privacy.clone().map(|mut node| {
                if self.simulation.reproducible && node.insecure_noise_seed.is_none() {
                    node.insecure_noise_seed = Some(self.simulation.seed);
                }
                node
            }),
            aggregation: self.aggregation.clone(),
        }
    }

    /// The configuration of virtual node `index`: it accepts exactly what the simulated
    /// coordinator asks, with no limit on its budget, and keeps its privacy ledger in
    /// `ledgers` as `<node name>.privacy-ledger.jsonl`.
    pub fn node(&self, index: usize, ledgers: &Path) -> NodeConfig {
        let dp_off = self.privacy.dp == DpSwitch::Off;
        let id = node_name(index);
        let ledger = ledgers.join(format!("{id}.privacy-ledger.jsonl"));
        NodeConfig {
            node: NodeSection {
                id,
                insecure_seed: None,
            },
            coordinator: CoordinatorSection {
                address: "http://in-memory.invalid".into(),
                max_backoff_secs: 1,
            },
            // The in-memory transport needs no TLS: every virtual node is in this process.
            tls: None,
            data: DataSection {
                path: self.data.train.clone(),
                schema: self.data.schema.clone(),
                test_fraction: 0.0,
                split_seed: 0,
            },
            privacy: PrivacySection {
                // Virtual nodes record what they spend but are held to no budget: the
                // simulator reports the epsilon a configuration reaches.
                epsilon: f64::INFINITY,
                delta: self.privacy.delta,
                accountant: Accountant::Rdp,
                ledger: Some(ledger),
                min_noise_multiplier: self.privacy.noise_multiplier.unwrap_or(1.0),
                max_clip_norm: self.privacy.clip_norm.unwrap_or(1.0),
                max_sampling_rate: 1.0,
                insecure_allow_no_dp: dp_off,
            },
        }
    }
}

/// The name of virtual node `index`: `node-001`, `node-002`, ...
pub fn node_name(index: usize) -> String {
    format!("node-{:03}", index + 1)
}
