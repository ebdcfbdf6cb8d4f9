//! The node's configuration file.
//!
//! Written by the organization running the node. Besides where the coordinator and the data
//! are, it holds the node's privacy settings: the floor, the weakest DP-SGD parameters this
//! node will accept whatever a coordinator asks, and the budget, the total epsilon its data
//! may ever spend (see [`crate::budget`]), recorded in a ledger file ([`crate::ledger`]).
//! The budget has no default: the operator writes it down. Unknown keys are errors; relative
//! paths are resolved against the file's directory.
//!
//! The ledger lives by default next to the data, as `<data file name>.privacy-ledger.jsonl`
//! (for `adult_train.csv.gz`, `adult_train.csv.gz.privacy-ledger.jsonl`). It belongs to the
//! data rather than to the node's name, because the budget protects the people in the data:
//! renaming the node keeps its history. `[privacy] ledger` puts it elsewhere, for instance
//! when the data directory is read-only; moving or deleting the file forgets the history, so
//! back it up with the data.
//!
//! ```toml
//! [node]
//! id = "clinic-a"
//!
//! [coordinator]
//! address = "https://127.0.0.1:50051"
//!
//! # Mutual TLS, the default: the files `athanor-coordinator certs issue` writes. Without this
//! # section the node refuses to start unless run with --insecure (and an http:// address).
//! [tls]
//! ca = "ca.crt"
//! cert = "node.crt"
//! key = "node.key"
//!
//! [data]
//! path = "adult_train.csv.gz"
//! schema = "adult.schema.toml"
//!
//! [privacy]
//! epsilon = 3.0
//! delta = 1e-5
//! accountant = "rdp"
//! min_noise_multiplier = 0.8
//! max_clip_norm = 5.0
//! max_sampling_rate = 0.1
//! ```

use std::path::{Path, PathBuf};

use athanor_core::accountant::Accountant;
use athanor_core::plan::RoundPlan;
use serde::Deserialize;

use crate::Error;
use crate::budget::Budget;

/// Appended to the data file's name to name the default ledger.
const LEDGER_SUFFIX: &str = ".privacy-ledger.jsonl";

/// A validated node configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Who this node is.
    pub node: NodeSection,
    /// Where the coordinator is.
    pub coordinator: CoordinatorSection,
    /// How this node proves who it is, and checks who answers: mutual TLS. Required unless
    /// the node runs with `--insecure`, which ignores it.
    #[serde(default)]
    pub tls: Option<TlsSection>,
    /// The local data.
    pub data: DataSection,
    /// The privacy budget and floor.
    pub privacy: PrivacySection,
}

/// `[node]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    /// The node's name in the federation: 1 to 128 characters of `[A-Za-z0-9._-]`.
    pub id: String,
    /// For reproducible tests only: seeds the node's training and secure-aggregation
    /// randomness instead of the operating system. Anyone who knows the seed can predict the
    /// DP noise and the masks, so nothing is protected; the node warns at every start.
    #[serde(default)]
    pub insecure_seed: Option<u64>,
}

/// `[coordinator]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorSection {
    /// URL of the coordinator: `https://host:port`, or `http://` for a node run with
    /// `--insecure`.
    pub address: String,
    /// Longest pause between reconnection attempts, in seconds.
    #[serde(default = "default_max_backoff")]
    pub max_backoff_secs: u64,
}

fn default_max_backoff() -> u64 {
    30
}

/// `[tls]`: this node's side of mutual TLS.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// The federation's CA certificate (PEM): the only issuer trusted for the coordinator's
    /// certificate.
    pub ca: PathBuf,
    /// This node's certificate (PEM), naming its id. Without it and `key` the node cannot
    /// prove who it is, and coordinators refuse it; it warns at start.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// The private key of `cert` (PEM).
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// The name the coordinator's certificate must cover, when it is not the host of
    /// `[coordinator] address` (dialing through a tunnel, or by an address the certificate
    /// does not list).
    #[serde(default)]
    pub server_name: Option<String>,
}

/// `[data]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// CSV or gzip CSV file.
    pub path: PathBuf,
    /// Schema TOML with the label column, classes and public feature bounds.
    pub schema: PathBuf,
    /// Fraction of rows kept aside for local evaluation.
    #[serde(default = "default_test_fraction")]
    pub test_fraction: f64,
    /// Seed of the local train/test split.
    #[serde(default)]
    pub split_seed: u64,
}

fn default_test_fraction() -> f64 {
    0.2
}

/// `[privacy]`: the budget this node's data may spend, and the floor below which this node
/// refuses to train.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacySection {
    /// The total example-level epsilon, at `delta`, that every round this node ever trains
    /// may spend together. Required, positive and finite in a file.
    pub epsilon: f64,
    /// The delta of the budget and of every epsilon the node reports.
    #[serde(default = "default_delta")]
    pub delta: f64,
    /// How the ledger's entries are composed: `"rdp"` (default) or `"pld"` (tighter, slower).
    #[serde(default)]
    pub accountant: Accountant,
    /// The ledger file; by default next to the data file (see the module's documentation).
    #[serde(default)]
    pub ledger: Option<PathBuf>,
    /// Smallest noise multiplier accepted.
    #[serde(default = "default_min_noise")]
    pub min_noise_multiplier: f64,
    /// Largest clipping bound accepted.
    #[serde(default = "default_max_clip")]
    pub max_clip_norm: f64,
    /// Largest sampling rate accepted.
    #[serde(default = "default_max_q")]
    pub max_sampling_rate: f64,
    /// Accept tasks that ask for training without DP. Off unless written down.
    #[serde(default)]
    pub insecure_allow_no_dp: bool,
}

fn default_delta() -> f64 {
    1e-5
}
fn default_min_noise() -> f64 {
    0.5
}
fn default_max_clip() -> f64 {
    10.0
}
fn default_max_q() -> f64 {
    0.25
}

impl NodeConfig {
    /// Reads and validates a config file, resolving relative paths against its directory.
    ///
    /// # Errors
    /// [`Error::Config`] naming the file and the key.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config = Self::parse(&text, path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        let tls = config.tls.iter_mut().flat_map(|tls| {
            std::iter::once(&mut tls.ca)
                .chain(tls.cert.as_mut())
                .chain(tls.key.as_mut())
        });
        let files = [&mut config.data.path, &mut config.data.schema]
            .into_iter()
            .chain(config.privacy.ledger.as_mut())
            .chain(tls);
        for file in files {
            if file.is_relative() {
                *file = base.join(&*file);
            }
        }
        Ok(config)
    }

    /// The privacy ledger file: `[privacy] ledger`, or `<data file name>.privacy-ledger.jsonl`
    /// next to the data file.
    pub fn ledger_path(&self) -> PathBuf {
        if let Some(path) = &self.privacy.ledger {
            return path.clone();
        }
        let mut name = self
            .data
            .path
            .file_name()
            .unwrap_or(self.data.path.as_os_str())
            .to_os_string();
        name.push(LEDGER_SUFFIX);
        self.data.path.with_file_name(name)
    }

    /// Parses and validates config text; `origin` names it in errors.
    ///
    /// # Errors
    /// [`Error::Config`] naming `origin` and the key.
    pub fn parse(text: &str, origin: &Path) -> Result<Self, Error> {
        let config: NodeConfig = toml::from_str(text).map_err(|e| Error::Config {
            path: origin.to_path_buf(),
            message: e.to_string(),
        })?;
        config.validate().map_err(|message| Error::Config {
            path: origin.to_path_buf(),
            message,
        })?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        let id = &self.node.id;
        let id_ok = !id.is_empty()
            && id.len() <= 128
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !id_ok {
            return Err(format!(
                "[node] id {id:?} must be 1 to 128 characters of [A-Za-z0-9._-]"
            ));
        }
        let address = &self.coordinator.address;
        if !(address.starts_with("http://") || address.starts_with("https://")) {
            return Err(format!(
                "[coordinator] address {address:?} must start with http:// or https://"
            ));
        }
        if let Some(tls) = &self.tls
            && tls.cert.is_some() != tls.key.is_some()
        {
            return Err("[tls] cert and key go together: set both, or neither".into());
        }
        let t = self.data.test_fraction;
        if !(0.0..1.0).contains(&t) {
            return Err(format!("[data] test_fraction must be in [0, 1), got {t}"));
        }
        let p = &self.privacy;
        if !(p.epsilon.is_finite() && p.epsilon > 0.0) {
            return Err(format!(
                "[privacy] epsilon, the node's total budget, must be positive and finite, got {}",
                p.epsilon
            ));
        }
        if !(p.delta > 0.0 && p.delta < 1.0) {
            return Err(format!(
                "[privacy] delta must be in (0, 1), got {}",
                p.delta
            ));
        }
        if !(p.min_noise_multiplier.is_finite() && p.min_noise_multiplier > 0.0) {
            return Err(format!(
                "[privacy] min_noise_multiplier must be positive, got {}",
                p.min_noise_multiplier
            ));
        }
        if !(p.max_clip_norm.is_finite() && p.max_clip_norm > 0.0) {
            return Err(format!(
                "[privacy] max_clip_norm must be positive, got {}",
                p.max_clip_norm
            ));
        }
        if !(p.max_sampling_rate > 0.0 && p.max_sampling_rate <= 1.0) {
            return Err(format!(
                "[privacy] max_sampling_rate must be in (0, 1], got {}",
                p.max_sampling_rate
            ));
        }
        Ok(())
    }
}

impl PrivacySection {
    /// The budget these settings describe.
    pub fn budget(&self) -> Budget {
        Budget {
            epsilon: self.epsilon,
            delta: self.delta,
            accountant: self.accountant,
            insecure_allow_no_dp: self.insecure_allow_no_dp,
        }
    }

    /// Checks a coordinator's plan against this floor for a node holding `rows` examples.
    ///
    /// # Errors
    /// A reason, sent to the coordinator when the node declines.
    pub fn admit(&self, plan: &RoundPlan, rows: usize) -> Result<(), String> {
        let Some(dp) = &plan.dp else {
            if self.insecure_allow_no_dp {
                return Ok(());
            }
            return Err(
                "the round asks for training without DP, which this node does not \
                        allow (set [privacy] insecure_allow_no_dp = true to permit it)"
                    .into(),
            );
        };
        if dp.noise_multiplier < self.min_noise_multiplier {
            return Err(format!(
                "noise multiplier {} is below this node's floor {}",
                dp.noise_multiplier, self.min_noise_multiplier
            ));
        }
        if dp.clip_norm > self.max_clip_norm {
            return Err(format!(
                "clip norm {} is above this node's limit {}",
                dp.clip_norm, self.max_clip_norm
            ));
        }
        let q = plan.sampling_rate(rows);
        if q > self.max_sampling_rate {
            return Err(format!(
                "sampling rate {q:.4} (batch {} of {rows} rows) is above this node's limit {}",
                plan.expected_batch_size, self.max_sampling_rate
            ));
        }
        Ok(())
    }
}
