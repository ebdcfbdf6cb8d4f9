//! The manifest stored next to each model version's weights.
//!
//! A manifest is a JSON object written once, when its version is published, and never changed.
//! Its field names are part of the on-disk format: renaming one means raising
//! [`MANIFEST_FORMAT`]. Readers refuse a manifest whose `format` they do not know.
//!
//! JSON has no infinity and no NaN, so no float field may hold one: metrics and privacy figures
//! are checked when a version is published ([`ManifestDraft::validate`]), and an unbounded
//! example-level epsilon is written as the string `"inf"` ([`Epsilon::Unbounded`]).
//!
//! An example, for the third version trained with FedAvg:
//!
//! ```json
//! {
//!   "format": 1,
//!   "version": 3,
//!   "parent": 2,
//!   "round": 3,
//!   "created_at": "2026-12-04T15:02:11Z",
//!   "model": { "kind": "mlp", "hidden": 32, "features": 784, "classes": 10 },
//!   "init_seed": 7,
//!   "strategy": "fedavg",
//!   "strategy_params": { "server_lr": 1.0 },
//!   "contributors": 12,
//!   "metrics": { "train_loss": 0.41 },
//!   "example_privacy": { "max_epsilon": "inf", "delta": null },
//!   "node_privacy": { "epsilon": 2.5, "delta": 1e-5, "noise_multiplier": 1.1,
//!                     "update_clip_norm": 0.5, "sampling_rate": 1.0, "accountant": "rdp",
//!                     "history": [ { "q": 1.0, "sigma": 1.1, "count": 3 } ] },
//!   "dataset_fingerprints": [ { "node": "clinic-a", "sha256": "9f2c…", "rows": 5120 } ],
//!   "weights_sha256": "3b41…",
//!   "optimizer_sha256": "c07e…",
//!   "code_version": "0.1.0"
//! }
//! ```

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use athanor_core::accountant::{Accountant, Step};
use athanor_core::model::ModelSpec;
use serde::{Deserialize, Serialize};

use super::StoreError;

/// The manifest format this build writes and reads.
pub const MANIFEST_FORMAT: u32 = 1;

/// Everything recorded about one published model version.
///
/// Built by [`ModelStore::publish`](super::ModelStore::publish) from a [`ManifestDraft`]; the
/// store fills in `format`, `version`, `created_at` and `weights_sha256`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Manifest format, [`MANIFEST_FORMAT`] when written by this build.
    pub format: u32,
    /// Version number. Version 0 is the initial (seeded) model; each later version is one more
    /// than the one published before it.
    pub version: u64,
    /// The version this one was trained from; `null` for the initial model.
    pub parent: Option<u64>,
    /// The training round that produced this version; 0 for the initial model.
    pub round: u64,
    /// When the version was published: RFC 3339 in UTC with second precision,
    /// e.g. `2026-12-04T15:02:11Z`.
    pub created_at: String,
    /// Architecture and sizes, which give the weights their shapes.
    pub model: ModelSpec,
    /// Seed the initial parameters were drawn from, if they were drawn from a seed.
    pub init_seed: Option<u64>,
    /// The server strategy that produced this version, e.g. `fedavg`, or `init` for the initial
    /// model.
    pub strategy: String,
    /// The strategy's settings (server learning rate, momentum, ...), free-form.
    pub strategy_params: serde_json::Map<String, serde_json::Value>,
    /// Number of nodes whose updates were aggregated into this version.
    pub contributors: u32,
    /// Named measurements of this version, e.g. `train_loss`. Always finite.
    pub metrics: BTreeMap<String, f64>,
    /// Example-level privacy: what the nodes report having spent on their own data.
    pub example_privacy: ExamplePrivacy,
    /// Node-level privacy spent by the published models up to and including this version;
    /// `null` when it was not accounted.
    pub node_privacy: Option<NodePrivacy>,
    /// Fingerprints of the datasets the contributors trained on, as they reported them.
    pub dataset_fingerprints: Vec<DatasetFingerprint>,
    /// Lower-case hex SHA-256 of the whole `weights.safetensors` file.
    pub weights_sha256: String,
    /// Lower-case hex SHA-256 of `optimizer.safetensors`, the server optimizer's state after
    /// this version; `null` when it has none (no server momentum, the initial model). Absent
    /// from manifests written before the file existed, which read as `null`: adding it did
    /// not change [`MANIFEST_FORMAT`], since older readers ignore it.
    #[serde(default)]
    pub optimizer_sha256: Option<String>,
    /// Version of the coordinator that published this version.
    pub code_version: String,
}

/// The caller's part of a manifest, handed to
/// [`ModelStore::publish`](super::ModelStore::publish).
///
/// Every float in it must be finite: a caller holding a NaN loss leaves that metric out.
#[derive(Debug, Clone, PartialEq)]
pub struct ManifestDraft {
    /// See [`Manifest::parent`]. Must name an already published version.
    pub parent: Option<u64>,
    /// See [`Manifest::round`].
    pub round: u64,
    /// See [`Manifest::model`]. The parameters must have its layout.
    pub model: ModelSpec,
    /// See [`Manifest::init_seed`].
    pub init_seed: Option<u64>,
    /// See [`Manifest::strategy`].
    pub strategy: String,
    /// See [`Manifest::strategy_params`].
    pub strategy_params: serde_json::Map<String, serde_json::Value>,
    /// See [`Manifest::contributors`].
    pub contributors: u32,
    /// See [`Manifest::metrics`]. Each value must be finite.
    pub metrics: BTreeMap<String, f64>,
    /// See [`Manifest::example_privacy`].
    pub example_privacy: ExamplePrivacy,
    /// See [`Manifest::node_privacy`].
    pub node_privacy: Option<NodePrivacy>,
    /// See [`Manifest::dataset_fingerprints`].
    pub dataset_fingerprints: Vec<DatasetFingerprint>,
    /// See [`Manifest::code_version`]; callers pass `env!("CARGO_PKG_VERSION")`.
    pub code_version: String,
}

/// Example-level privacy of a version, as reported by the nodes.
///
/// Each node enforces its own budget; the coordinator cannot check what a node reports. The
/// figure is meant to cover every node whose data reached this version through its lineage.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ExamplePrivacy {
    /// The largest epsilon any such node has spent on its data, or `"inf"` in JSON
    /// ([`Epsilon::Unbounded`]) if any of them trained without differential privacy.
    pub max_epsilon: Epsilon,
    /// The delta that epsilon holds at; `null` when unbounded or when no data was used.
    pub delta: Option<f64>,
}

/// A privacy loss that may be unbounded.
///
/// In JSON a finite epsilon is a number and an unbounded one is the string `"inf"`; nothing
/// else is accepted, so `null` never has to be guessed at.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "EpsilonRepr", into = "EpsilonRepr")]
pub enum Epsilon {
    /// A finite, non-negative epsilon.
    Finite(f64),
    /// No bound: some data was used without differential privacy.
    Unbounded,
}

/// The JSON form of [`Epsilon`].
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum EpsilonRepr {
    Finite(f64),
    Unbounded(Infinity),
}

/// The only string an [`Epsilon`] may be written as.
#[derive(Serialize, Deserialize)]
enum Infinity {
    #[serde(rename = "inf")]
    Inf,
}

impl TryFrom<EpsilonRepr> for Epsilon {
    type Error = String;

    fn try_from(repr: EpsilonRepr) -> Result<Self, Self::Error> {
        match repr {
            EpsilonRepr::Finite(eps) if eps.is_finite() && eps >= 0.0 => Ok(Epsilon::Finite(eps)),
            EpsilonRepr::Finite(eps) => Err(format!("epsilon {eps} is negative")),
            EpsilonRepr::Unbounded(Infinity::Inf) => Ok(Epsilon::Unbounded),
        }
    }
}

impl From<Epsilon> for EpsilonRepr {
    fn from(eps: Epsilon) -> Self {
        match eps {
            Epsilon::Finite(eps) => EpsilonRepr::Finite(eps),
            Epsilon::Unbounded => EpsilonRepr::Unbounded(Infinity::Inf),
        }
    }
}

/// Node-level privacy of the published models, from the coordinator's own accounting.
///
/// The full history of published rounds is kept so that a restarted coordinator, or an
/// auditor holding only this manifest, can recompute `epsilon` with any accountant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodePrivacy {
    /// Epsilon spent by all published rounds up to and including this version.
    pub epsilon: f64,
    /// The delta that epsilon holds at.
    pub delta: f64,
    /// Noise multiplier of the round that produced this version.
    pub noise_multiplier: f64,
    /// L2 bound on each node's update in the round that produced this version.
    pub update_clip_norm: f64,
    /// Probability with which each connected node was sampled into that round's cohort.
    pub sampling_rate: f64,
    /// The accountant that computed `epsilon`.
    pub accountant: Accountant,
    /// Every published round's mechanism, merged where consecutive rounds were alike.
    pub history: Vec<Step>,
}

/// One node's report of the data it trained on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetFingerprint {
    /// The node's identity.
    pub node: String,
    /// Hex SHA-256 of the node's dataset, as the node computed it.
    pub sha256: String,
    /// Number of rows in that dataset.
    pub rows: u64,
}

impl ManifestDraft {
    /// The draft of the initial model: version 0, no parent, round 0, strategy `init`, no
    /// contributors and no data used (example-level epsilon 0).
    pub fn initial(model: ModelSpec, init_seed: Option<u64>, code_version: &str) -> Self {
        ManifestDraft {
            parent: None,
            round: 0,
            model,
            init_seed,
            strategy: "init".to_owned(),
            strategy_params: serde_json::Map::new(),
            contributors: 0,
            metrics: BTreeMap::new(),
            example_privacy: ExamplePrivacy {
                max_epsilon: Epsilon::Finite(0.0),
                delta: None,
            },
            node_privacy: None,
            dataset_fingerprints: Vec::new(),
            code_version: code_version.to_owned(),
        }
    }

    /// Checks that every float is finite and in range, so the manifest is valid JSON that reads
    /// back equal.
    ///
    /// # Errors
    /// [`StoreError::InvalidDraft`] naming the first offending field.
    pub fn validate(&self) -> Result<(), StoreError> {
        let invalid =
            |field: String, reason: String| Err(StoreError::InvalidDraft { field, reason });

        for (name, &value) in &self.metrics {
            if !value.is_finite() {
                return invalid(format!("metrics.{name}"), format!("{value} is not finite"));
            }
        }

        let privacy = &self.example_privacy;
        if let Epsilon::Finite(eps) = privacy.max_epsilon
            && !(eps.is_finite() && eps >= 0.0)
        {
            let reason = format!("{eps} is not a finite, non-negative number");
            return invalid("example_privacy.max_epsilon".to_owned(), reason);
        }
        if let Some(delta) = privacy.delta
            && !is_delta(delta)
        {
            return invalid(
                "example_privacy.delta".to_owned(),
                format!("{delta} is not in [0, 1)"),
            );
        }

        let Some(node) = &self.node_privacy else {
            return Ok(());
        };
        if !(node.epsilon.is_finite() && node.epsilon >= 0.0) {
            let reason = format!("{} is not a finite, non-negative number", node.epsilon);
            return invalid("node_privacy.epsilon".to_owned(), reason);
        }
        if !is_delta(node.delta) {
            return invalid(
                "node_privacy.delta".to_owned(),
                format!("{} is not in [0, 1)", node.delta),
            );
        }
        if !(node.noise_multiplier.is_finite() && node.noise_multiplier >= 0.0) {
            let reason = format!(
                "{} is not a finite, non-negative number",
                node.noise_multiplier
            );
            return invalid("node_privacy.noise_multiplier".to_owned(), reason);
        }
        if !(node.update_clip_norm.is_finite() && node.update_clip_norm > 0.0) {
            let reason = format!("{} is not a positive number", node.update_clip_norm);
            return invalid("node_privacy.update_clip_norm".to_owned(), reason);
        }
        if !(node.sampling_rate > 0.0 && node.sampling_rate <= 1.0) {
            let reason = format!("{} is not in (0, 1]", node.sampling_rate);
            return invalid("node_privacy.sampling_rate".to_owned(), reason);
        }
        if node.history.iter().any(|step| {
            !(step.q > 0.0 && step.q <= 1.0 && step.sigma.is_finite() && step.sigma > 0.0)
        }) {
            let reason = "a step has q outside (0, 1] or a non-positive sigma".to_owned();
            return invalid("node_privacy.history".to_owned(), reason);
        }
        Ok(())
    }
}

fn is_delta(delta: f64) -> bool {
    (0.0..1.0).contains(&delta)
}

impl Manifest {
    /// Completes a draft with what only the store knows.
    pub(super) fn from_draft(
        draft: ManifestDraft,
        version: u64,
        created_at: String,
        weights_sha256: String,
        optimizer_sha256: Option<String>,
    ) -> Self {
        Manifest {
            format: MANIFEST_FORMAT,
            version,
            parent: draft.parent,
            round: draft.round,
            created_at,
            model: draft.model,
            init_seed: draft.init_seed,
            strategy: draft.strategy,
            strategy_params: draft.strategy_params,
            contributors: draft.contributors,
            metrics: draft.metrics,
            example_privacy: draft.example_privacy,
            node_privacy: draft.node_privacy,
            dataset_fingerprints: draft.dataset_fingerprints,
            weights_sha256,
            optimizer_sha256,
            code_version: draft.code_version,
        }
    }
}

/// Formats a time as RFC 3339 in UTC to the second, e.g. `2026-12-04T15:02:11Z`. Times before
/// 1970 are written as the epoch; they only occur with a badly set clock.
pub(crate) fn rfc3339_utc(time: SystemTime) -> String {
    let secs = time
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    let (days, secs_of_day) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_date(days);
    let (hour, minute, second) = (secs_of_day / 3600, secs_of_day / 60 % 60, secs_of_day % 60);
    format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}Z")
}

/// The proleptic Gregorian date `days` days after 1970-01-01.
///
/// Counts in 400-year eras starting on 1 March, so that the leap day falls at the end of each
/// counted year: an era has 146 097 days, and a year in it 365 days plus one every 4th year,
/// minus one every 100th, plus one every 400th.
fn civil_date(days: u64) -> (u64, u64, u64) {
    // 1970-01-01 is day 719 468 counted from 0000-03-01.
    let days = days + 719_468;
    let era = days / 146_097;
    let day_of_era = days % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);

    // Months from March: 31, 30, 31, 30, 31, 31, 30, 31, 30, 31, 31, 29|28, which the line
    // (153 * m + 2) / 5 tracks exactly.
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = era * 400 + year_of_era + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn at(secs: u64) -> String {
        rfc3339_utc(UNIX_EPOCH + Duration::from_secs(secs))
    }

    #[test]
    fn formats_known_instants() {
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(1_709_251_199), "2024-02-29T23:59:59Z");
        assert_eq!(at(4_102_444_800), "2100-01-01T00:00:00Z");
        assert_eq!(at(253_402_300_799), "9999-12-31T23:59:59Z");
    }

    /// Month lengths by the Gregorian rule, written independently of `civil_date`.
    fn days_in_month(year: u64, month: u64) -> u64 {
        let leap =
            year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400));
        match month {
            2 if leap => 29,
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            _ => 31,
        }
    }

    #[test]
    fn days_advance_one_date_at_a_time() {
        // Walking day by day from 1970 through 2400 must step the date by exactly one day,
        // across every month end, leap day and century.
        let mut previous = civil_date(0);
        for days in 1..156_000 {
            let (y, m, d) = civil_date(days);
            let (py, pm, pd) = previous;
            let month_ended = d == 1 && pd == days_in_month(py, pm);
            let next_day = y == py && m == pm && d == pd + 1;
            let next_month = y == py && m == pm + 1 && month_ended;
            let next_year = y == py + 1 && m == 1 && pm == 12 && month_ended;
            assert!(
                next_day || next_month || next_year,
                "{previous:?} -> {:?}",
                (y, m, d)
            );
            previous = (y, m, d);
        }
    }

    #[test]
    fn epsilon_reads_numbers_and_inf_only() {
        let read = |json: &str| serde_json::from_str::<Epsilon>(json);
        assert_eq!(read("1.5").unwrap(), Epsilon::Finite(1.5));
        assert_eq!(read("\"inf\"").unwrap(), Epsilon::Unbounded);
        assert!(read("null").is_err());
        assert!(read("-1").is_err());
        assert!(read("\"infinity\"").is_err());
        assert_eq!(
            serde_json::to_string(&Epsilon::Unbounded).unwrap(),
            "\"inf\""
        );
        assert_eq!(serde_json::to_string(&Epsilon::Finite(2.0)).unwrap(), "2.0");
    }
}
