//! The operator's commands: clients of a running coordinator's admin service, and readers of a
//! model store directory.
//!
//! Every command prints text for people, or with `--json` one JSON value for scripts on one
//! line (`versions list` prints one JSON object per line instead, one per version). The JSON
//! shapes below are stable: fields may be added, never renamed, retyped or removed. Numbers
//! marked `f64` may have a fractional part; `u64` are whole numbers; `T | null` may be null.
//!
//! `status`: an object
//!
//! ```text
//! federation        string
//! stage             string: "waiting_for_nodes" | "training" | "paused" | "finished"
//! round             u64 | null        the round in progress
//! paused            bool              true from `rounds pause` to `rounds resume`, across restarts
//! connected_nodes   u64
//! latest_version    u64 | null
//! rounds_completed  u64               rounds that published a version
//! rounds_abandoned  u64               by this process
//! rounds_total      u64               rounds to publish before finishing
//! finished_reason   string | null
//! damaged_versions  [{ "version": u64, "reason": string }]
//! node_privacy      BUDGET | null     null when [node_privacy] is not configured
//! ```
//!
//! where `BUDGET` is an object
//!
//! ```text
//! epsilon_spent     f64               by every published round, at delta
//! epsilon_budget    f64
//! epsilon_left      f64               budget minus spent, at least 0
//! delta             f64
//! accountant        string: "rdp" | "pld"
//! noise_multiplier  f64
//! update_clip_norm  f64
//! rounds            u64               published rounds accounted
//! version           u64               the version whose manifest records the spending
//! ```
//!
//! `budget`: an object `{ "node_privacy": BUDGET | null }`.
//!
//! `nodes list`: an array, ordered by node id, of objects (nodes that joined to train;
//! watch-only sessions, such as `athanor-node fetch` opens, are not listed)
//!
//! ```text
//! node                string
//! connected           bool            seen within the session timeout, or training
//! session_age_ms      u64             since the node's latest join
//! last_seen_ms        u64
//! rounds_contributed  u64             published versions holding its update
//! round_state         string | null: "pending" | "submitted" | "declined"
//! dataset             { "sha256": string, "rows": u64 } | null
//! ```
//!
//! `versions list`: one line per version, oldest first: the version's manifest (the store's
//! documented format, see `athanor_coordinator::store::manifest`), or for a damaged version
//! `{ "version": u64, "damaged": string }`.
//!
//! `versions show N`: the manifest object.
//!
//! `versions export N`: an object
//!
//! ```text
//! version         u64
//! format          string: "safetensors" | "npy"
//! out             string             the file written
//! bytes           u64                its length
//! weights_sha256  string             of the version's weights file, as checked
//! num_params      u64
//! tensors         [{ "name": string, "shape": [u64], "offset": u64 }]   in flat-vector order
//! ```
//!
//! `rounds pause`: `{ "paused": true, "was_paused": bool, "open_round": u64 | null }`, where
//! `open_round` is the round that still runs to its end. The pause is recorded in the store
//! directory (the file `paused`) before the command returns, so a restarted coordinator stays
//! paused. `rounds resume`: `{ "paused": false, "was_paused": bool }`.
//!
//! All remote commands reach the coordinator through [`admin_channel`], the one place where the
//! connection is set up.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};
use athanor_coordinator::CoordinatorConfig;
use athanor_coordinator::export::{self, ExportFormat, Exported};
use athanor_coordinator::node_privacy;
use athanor_coordinator::store::{self, Epsilon, Manifest, ModelStore, VersionStatus};
use athanor_proto::v1::admin_client::AdminClient;
use athanor_proto::v1::{self as pb};
use serde::Serialize;
use serde_json::Value;
use tonic::transport::Channel;

/// Where the admin commands look for a coordinator when given no address.
pub const DEFAULT_ADDRESS: &str = "https://127.0.0.1:50051";

/// How long to wait for a connection to the coordinator.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one admin call may take; exports of large models stream for longer.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// Where a versions command reads from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A running coordinator's admin service at this URL.
    Coordinator(String),
    /// A model store directory, opened read-only.
    Store(PathBuf),
}

/// What `versions export` is asked to do.
#[derive(Debug, Clone)]
pub struct ExportRequest {
    /// The version.
    pub version: u64,
    /// The file format.
    pub format: ExportFormat,
    /// The file to write.
    pub out: PathBuf,
    /// Whether an existing `out` may be replaced.
    pub overwrite: bool,
}

/// The channel every admin command uses to reach the coordinator at `address`: mutual TLS
/// with the operator's files in `--tls-dir`, or plaintext with `--insecure` (see
/// [`crate::security`]).
///
/// The connection is made on the first call, whose error then names the address.
pub fn admin_channel(address: &str) -> Result<Channel> {
    let endpoint = crate::security::endpoint(address)?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(CALL_TIMEOUT);
    Ok(endpoint.connect_lazy())
}

fn admin_client(address: &str) -> Result<AdminClient<Channel>> {
    Ok(AdminClient::new(admin_channel(address)?))
}

/// A failed call as an error that reads well: the coordinator's message, the status code,
/// and the transport's causes (connection refused, ...).
fn rpc_failed(call: &str, address: &str, status: tonic::Status) -> anyhow::Error {
    let mut text = format!("{} ({:?})", status.message(), status.code());
    let mut source = std::error::Error::source(&status);
    while let Some(cause) = source {
        // Transport errors repeat their message at several levels; say each part once.
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    match crate::security::explain(&status, address) {
        Some(why) => anyhow!("{call} on the coordinator at {address} failed: {why} ({text})"),
        None => anyhow!("{call} on the coordinator at {address} failed: {text}"),
    }
}

/// Appends one line of output to a `String`.
macro_rules! say {
    ($out:expr, $($arg:tt)*) => {{
        $out.push_str(&format!($($arg)*));
        $out.push('\n');
    }};
}

/// Writes a command's output to stdout. A reader that went away (`| head`) is not an error:
/// it has read all it wanted.
fn emit(text: &str) -> Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(e).context("writing to standard output")
        }
        _ => Ok(()),
    }
}

/// Prints `value` as one line of JSON.
fn print_json(value: &impl Serialize) -> Result<()> {
    emit(&format!("{}\n", serde_json::to_string(value)?))
}

// ---------------------------------------------------------------------------------------------
// status and budget

#[derive(Debug, Serialize)]
struct StatusReport {
    federation: String,
    stage: String,
    round: Option<u64>,
    paused: bool,
    connected_nodes: u64,
    latest_version: Option<u64>,
    rounds_completed: u64,
    rounds_abandoned: u64,
    rounds_total: u64,
    finished_reason: Option<String>,
    damaged_versions: Vec<DamagedReport>,
    node_privacy: Option<BudgetFigures>,
}

#[derive(Debug, Serialize)]
struct DamagedReport {
    version: u64,
    reason: String,
}

#[derive(Debug, Serialize)]
struct BudgetFigures {
    epsilon_spent: f64,
    epsilon_budget: f64,
    epsilon_left: f64,
    delta: f64,
    accountant: String,
    noise_multiplier: f64,
    update_clip_norm: f64,
    rounds: u64,
    version: u64,
}

#[derive(Debug, Serialize)]
struct BudgetReport {
    node_privacy: Option<BudgetFigures>,
}

impl From<pb::NodePrivacyBudget> for BudgetFigures {
    fn from(b: pb::NodePrivacyBudget) -> Self {
        BudgetFigures {
            epsilon_spent: b.epsilon_spent,
            epsilon_budget: b.epsilon_budget,
            epsilon_left: (b.epsilon_budget - b.epsilon_spent).max(0.0),
            delta: b.delta,
            accountant: b.accountant,
            noise_multiplier: b.noise_multiplier,
            update_clip_norm: b.update_clip_norm,
            rounds: b.rounds,
            version: b.version,
        }
    }
}

impl From<&node_privacy::Spending> for BudgetFigures {
    fn from(s: &node_privacy::Spending) -> Self {
        BudgetFigures {
            epsilon_spent: s.epsilon_spent,
            epsilon_budget: s.epsilon_budget,
            epsilon_left: s.epsilon_left(),
            delta: s.delta,
            accountant: serde_json::to_value(s.accountant)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            noise_multiplier: s.noise_multiplier,
            update_clip_norm: s.update_clip_norm,
            rounds: s.rounds,
            version: s.version,
        }
    }
}

async fn fetch_status(address: &str) -> Result<pb::StatusResponse> {
    let mut client = admin_client(address)?;
    let response = client
        .status(pb::StatusRequest {})
        .await
        .map_err(|s| rpc_failed("Status", address, s))?;
    Ok(response.into_inner())
}

/// `status`: prints where the federation at `address` stands.
pub async fn status(address: &str, json: bool) -> Result<()> {
    let s = fetch_status(address).await?;
    let report = StatusReport {
        federation: s.federation,
        stage: s.stage,
        round: s.round,
        paused: s.paused,
        connected_nodes: u64::from(s.connected_nodes),
        latest_version: s.latest_version,
        rounds_completed: s.rounds_completed,
        rounds_abandoned: s.rounds_abandoned,
        rounds_total: s.rounds_total,
        finished_reason: Some(s.finished_reason).filter(|r| !r.is_empty()),
        damaged_versions: s
            .damaged_versions
            .into_iter()
            .map(|d| DamagedReport {
                version: d.version,
                reason: d.reason,
            })
            .collect(),
        node_privacy: s.node_privacy.map(BudgetFigures::from),
    };
    if json {
        return print_json(&report);
    }

    let stage = match report.round {
        Some(round) => format!("{} (round {round})", report.stage),
        None => report.stage.clone(),
    };
    let mut out = String::new();
    say!(out, "federation    {}", report.federation);
    say!(out, "stage         {stage}");
    let paused = match (report.paused, report.round) {
        (false, _) => "no".to_string(),
        (true, Some(round)) => format!("yes; round {round} runs to its end, no new round opens"),
        (true, None) => {
            "yes; no round opens until `rounds resume` (kept across restarts)".to_string()
        }
    };
    say!(out, "paused        {paused}");
    say!(out, "nodes         {} connected", report.connected_nodes);
    let latest = report
        .latest_version
        .map_or("none".to_string(), |v| v.to_string());
    say!(
        out,
        "versions      latest {latest}; {} of {} rounds published, {} abandoned since start",
        report.rounds_completed,
        report.rounds_total,
        report.rounds_abandoned
    );
    if report.damaged_versions.is_empty() {
        say!(out, "damaged       none");
    }
    for damaged in &report.damaged_versions {
        say!(
            out,
            "damaged       version {} (not served): {}",
            damaged.version,
            damaged.reason
        );
    }
    say!(
        out,
        "node privacy  {}",
        budget_line(report.node_privacy.as_ref())
    );
    if let Some(reason) = &report.finished_reason {
        say!(out, "finished      {reason}");
    }
    emit(&out)
}

fn budget_line(figures: Option<&BudgetFigures>) -> String {
    match figures {
        Some(b) => format!(
            "epsilon {:.4} spent of {}, {:.4} left (delta {:e}, {} rounds, {})",
            b.epsilon_spent, b.epsilon_budget, b.epsilon_left, b.delta, b.rounds, b.accountant
        ),
        None => "not accounted (no [node_privacy] section)".to_string(),
    }
}

/// `budget`: prints the node-level spending the coordinator at `address` reports.
pub async fn budget(address: &str, json: bool) -> Result<()> {
    let status = fetch_status(address).await?;
    print_budget(
        &BudgetReport {
            node_privacy: status.node_privacy.map(BudgetFigures::from),
        },
        json,
    )
}

/// `budget --config`: computes the node-level spending from the configuration's
/// `[node_privacy]` settings and the latest manifest in its store, as a coordinator started
/// with it would.
pub fn budget_offline(config: &CoordinatorConfig, json: bool) -> Result<()> {
    let node_privacy = match &config.node_privacy {
        None => None,
        Some(settings) => {
            let store = open_store(&config.store.dir)?;
            let latest = store
                .latest()
                .context("the store holds no readable version yet")?;
            let spending = node_privacy::spending(settings, &latest).with_context(|| {
                format!(
                    "composing the node-level spending of version {}",
                    latest.version
                )
            })?;
            Some(BudgetFigures::from(&spending))
        }
    };
    print_budget(&BudgetReport { node_privacy }, json)
}

fn print_budget(report: &BudgetReport, json: bool) -> Result<()> {
    if json {
        return print_json(report);
    }
    let mut out = String::new();
    let Some(b) = &report.node_privacy else {
        say!(
            out,
            "node-level privacy is not accounted: the coordinator has no [node_privacy] \
             section, so published versions carry only the nodes' example-level guarantees"
        );
        return emit(&out);
    };
    say!(
        out,
        "node-level privacy of the published models, as of version {}",
        b.version
    );
    say!(
        out,
        "  spent   epsilon {:.4} at delta {:e}",
        b.epsilon_spent,
        b.delta
    );
    say!(out, "  budget  epsilon {}", b.epsilon_budget);
    say!(out, "  left    epsilon {:.4}", b.epsilon_left);
    say!(
        out,
        "  rounds  {} published ({} accountant, noise multiplier {}, update clip norm {})",
        b.rounds,
        b.accountant,
        b.noise_multiplier,
        b.update_clip_norm
    );
    emit(&out)
}

// ---------------------------------------------------------------------------------------------
// nodes

#[derive(Debug, Serialize)]
struct NodeReport {
    node: String,
    connected: bool,
    session_age_ms: u64,
    last_seen_ms: u64,
    rounds_contributed: u64,
    round_state: Option<String>,
    dataset: Option<DatasetReport>,
}

#[derive(Debug, Serialize)]
struct DatasetReport {
    sha256: String,
    rows: u64,
}

/// `nodes list`: prints every node that joined the coordinator at `address`.
pub async fn list_nodes(address: &str, json: bool) -> Result<()> {
    let mut client = admin_client(address)?;
    let response = client
        .list_nodes(pb::ListNodesRequest {})
        .await
        .map_err(|s| rpc_failed("ListNodes", address, s))?
        .into_inner();
    let nodes: Vec<NodeReport> = response
        .nodes
        .into_iter()
        .map(|n| NodeReport {
            node: n.node_id,
            connected: n.connected,
            session_age_ms: n.session_age_ms,
            last_seen_ms: n.last_seen_ms,
            rounds_contributed: n.rounds_contributed,
            round_state: Some(n.round_state).filter(|s| !s.is_empty()),
            dataset: n.dataset.map(|d| DatasetReport {
                sha256: d.sha256,
                rows: d.rows,
            }),
        })
        .collect();
    if json {
        return print_json(&nodes);
    }

    let mut out = String::new();
    if nodes.is_empty() {
        say!(out, "no node has joined");
        return emit(&out);
    }
    let width = nodes.iter().map(|n| n.node.len()).max().unwrap_or(0).max(4);
    say!(
        out,
        "{:<width$}  {:<9}  {:>9}  {:>9}  {:>6}  {:<9}  dataset",
        "node",
        "connected",
        "session",
        "last seen",
        "rounds",
        "round"
    );
    for n in &nodes {
        let dataset = n.dataset.as_ref().map_or("-".to_string(), |d| {
            format!("sha256 {} ({} rows)", short_hash(&d.sha256), d.rows)
        });
        say!(
            out,
            "{:<width$}  {:<9}  {:>9}  {:>9}  {:>6}  {:<9}  {dataset}",
            n.node,
            if n.connected { "yes" } else { "no" },
            duration_text(n.session_age_ms),
            duration_text(n.last_seen_ms),
            n.rounds_contributed,
            n.round_state.as_deref().unwrap_or("-"),
        );
    }
    emit(&out)
}

/// A duration for people: `0.4s`, `12.0s`, `4m 05s`, `3h 02m`.
fn duration_text(ms: u64) -> String {
    let secs = ms / 1000;
    match secs {
        0..60 => format!("{:.1}s", ms as f64 / 1000.0),
        60..3600 => format!("{}m {:02}s", secs / 60, secs % 60),
        _ => format!("{}h {:02}m", secs / 3600, secs / 60 % 60),
    }
}

fn short_hash(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

// ---------------------------------------------------------------------------------------------
// versions

/// Opens a store directory read-only, after checking it looks like one.
fn open_store(dir: &Path) -> Result<ModelStore> {
    ensure!(
        dir.join("versions").is_dir(),
        "{} is not a model store (no versions/ directory)",
        dir.display()
    );
    ModelStore::open_read_only(dir)
        .with_context(|| format!("opening model store {}", dir.display()))
}

/// One line of the version listing.
#[allow(
    clippy::large_enum_variant,
    reason = "nearly every line is a valid version, so boxing the manifest would save nothing"
)]
enum Listed {
    Valid(Manifest),
    Damaged { version: u64, reason: String },
}

impl Listed {
    fn version(&self) -> u64 {
        match self {
            Listed::Valid(m) => m.version,
            Listed::Damaged { version, .. } => *version,
        }
    }
}

/// `versions list`.
pub async fn list_versions(source: &Source, json: bool) -> Result<()> {
    let mut listed = match source {
        Source::Store(dir) => open_store(dir)?
            .list()
            .into_iter()
            .map(|entry| match entry.status {
                VersionStatus::Valid(m) => Listed::Valid(m),
                VersionStatus::Damaged(cause) => Listed::Damaged {
                    version: entry.version,
                    reason: store::error_chain(&cause),
                },
            })
            .collect(),
        Source::Coordinator(address) => fetch_versions(address).await?,
    };
    listed.sort_by_key(Listed::version);

    let mut out = String::new();
    if json {
        for entry in &listed {
            let line = match entry {
                Listed::Valid(m) => serde_json::to_string(m)?,
                Listed::Damaged { version, reason } => {
                    serde_json::json!({ "version": version, "damaged": reason }).to_string()
                }
            };
            say!(out, "{line}");
        }
        return emit(&out);
    }

    say!(
        out,
        "{:>7}  {:>6}  {:>5}  {:>12}  {:>10}  {:<20}  sha256",
        "version",
        "parent",
        "round",
        "contributors",
        "epsilon",
        "created"
    );
    for entry in &listed {
        match entry {
            Listed::Valid(m) => say!(
                out,
                "{:>7}  {:>6}  {:>5}  {:>12}  {:>10}  {:<20}  {}",
                m.version,
                m.parent.map_or("-".to_string(), |p| p.to_string()),
                m.round,
                m.contributors,
                epsilon_text(m.example_privacy.max_epsilon),
                m.created_at,
                short_hash(&m.weights_sha256),
            ),
            Listed::Damaged { version, reason } => say!(out, "{version:>7}  DAMAGED: {reason}"),
        }
    }
    emit(&out)
}

async fn fetch_versions(address: &str) -> Result<Vec<Listed>> {
    let mut client = admin_client(address)?;
    let response = client
        .list_versions(pb::ListVersionsRequest {})
        .await
        .map_err(|s| rpc_failed("ListVersions", address, s))?
        .into_inner();
    let mut listed = Vec::new();
    for text in &response.manifests_json {
        let manifest: Manifest = serde_json::from_str(text)
            .context("the coordinator sent a manifest this tool cannot read")?;
        listed.push(Listed::Valid(manifest));
    }
    listed.extend(response.damaged.into_iter().map(|d| Listed::Damaged {
        version: d.version,
        reason: d.reason,
    }));
    Ok(listed)
}

fn epsilon_text(epsilon: Epsilon) -> String {
    match epsilon {
        Epsilon::Finite(e) => format!("{e:.3}"),
        Epsilon::Unbounded => "inf (no DP)".into(),
    }
}

/// `versions show N`.
pub async fn show_version(source: &Source, version: u64, json: bool) -> Result<()> {
    let manifest = match source {
        Source::Store(dir) => open_store(dir)?
            .manifest(version)
            .map_err(|e| anyhow!(store::error_chain(&e)))?,
        Source::Coordinator(address) => {
            let mut client = admin_client(address)?;
            let response = client
                .get_version(pb::GetVersionRequest { version })
                .await
                .map_err(|s| rpc_failed("GetVersion", address, s))?
                .into_inner();
            serde_json::from_str(&response.manifest_json)
                .context("the coordinator sent a manifest this tool cannot read")?
        }
    };
    if json {
        return print_json(&manifest);
    }
    emit(&manifest_text(&manifest))
}

/// A manifest as aligned lines for people.
fn manifest_text(m: &Manifest) -> String {
    let mut lines = Vec::new();
    let parent = m.parent.map_or("none".to_string(), |p| p.to_string());
    lines.push(format!(
        "version          {} (parent {parent}, round {})",
        m.version, m.round
    ));
    lines.push(format!(
        "published        {} by coordinator {}",
        m.created_at, m.code_version
    ));
    let model = serde_json::to_value(m.model).unwrap_or(Value::Null);
    lines.push(format!(
        "model            {} ({} parameters)",
        compact_fields(&model),
        m.model.num_params()
    ));
    let strategy_params = Value::Object(m.strategy_params.clone());
    lines.push(format!(
        "strategy         {} {}",
        m.strategy,
        compact_fields(&strategy_params)
    ));
    lines.push(format!("contributors     {}", m.contributors));
    let metrics: Vec<String> = m.metrics.iter().map(|(k, v)| format!("{k}={v}")).collect();
    lines.push(format!("metrics          {}", metrics.join(" ")));

    let example = &m.example_privacy;
    let example = match (example.max_epsilon, example.delta) {
        (Epsilon::Unbounded, _) => "epsilon inf (some data was used without DP)".to_string(),
        (Epsilon::Finite(e), Some(d)) => format!("epsilon {e:.4} at delta {d:e} (worst node)"),
        (Epsilon::Finite(e), None) => format!("epsilon {e} (no data used)"),
    };
    lines.push(format!("example privacy  {example}"));
    let node = m
        .node_privacy
        .as_ref()
        .map_or("not accounted".to_string(), |n| {
            let rounds: u64 = n.history.iter().map(|s| s.count).sum();
            format!(
                "epsilon {:.4} at delta {:e} after {rounds} rounds (noise multiplier {}, update \
                 clip norm {}, sampling rate {})",
                n.epsilon, n.delta, n.noise_multiplier, n.update_clip_norm, n.sampling_rate
            )
        });
    lines.push(format!("node privacy     {node}"));
    if m.dataset_fingerprints.is_empty() {
        lines.push("datasets         none reported".to_string());
    }
    for f in &m.dataset_fingerprints {
        lines.push(format!(
            "datasets         {} sha256 {} ({} rows)",
            f.node,
            short_hash(&f.sha256),
            f.rows
        ));
    }
    lines.push(format!("weights sha256   {}", m.weights_sha256));
    lines.iter().map(|line| format!("{line}\n")).collect()
}

/// `{"a": 1, "b": "x"}` as `a=1 b=x`.
fn compact_fields(value: &Value) -> String {
    let Value::Object(map) = value else {
        return value.to_string();
    };
    map.iter()
        .map(|(k, v)| match v {
            Value::String(s) => format!("{k}={s}"),
            other => format!("{k}={other}"),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[derive(Debug, Serialize)]
struct ExportReport {
    version: u64,
    format: &'static str,
    out: PathBuf,
    bytes: u64,
    weights_sha256: String,
    num_params: usize,
    tensors: Vec<TensorReport>,
}

#[derive(Debug, Serialize)]
struct TensorReport {
    name: &'static str,
    shape: Vec<usize>,
    offset: usize,
}

/// `versions export N`.
pub async fn export_version(source: &Source, request: &ExportRequest, json: bool) -> Result<()> {
    let (manifest, weights) = match source {
        Source::Store(dir) => {
            let store = open_store(dir)?;
            let read = store
                .manifest(request.version)
                .and_then(|m| Ok((m, store.weights_bytes(request.version)?)));
            read.map_err(|e| anyhow!(store::error_chain(&e)))?
        }
        Source::Coordinator(address) => fetch_weights(address, request.version).await?,
    };
    let exported = export::export(
        &manifest,
        &weights,
        request.format,
        &request.out,
        request.overwrite,
    )
    .with_context(|| format!("exporting version {}", request.version))?;

    let report = export_report(exported);
    if json {
        return print_json(&report);
    }
    let mut out = String::new();
    say!(
        out,
        "exported version {} as {} to {} ({} bytes, {} float32 parameters)",
        report.version,
        report.format,
        report.out.display(),
        report.bytes,
        report.num_params
    );
    say!(out, "weights sha256 {} (checked)", report.weights_sha256);
    for t in &report.tensors {
        say!(
            out,
            "  tensor {:<3} shape {:?} at offset {}",
            t.name,
            t.shape,
            t.offset
        );
    }
    emit(&out)
}

fn export_report(exported: Exported) -> ExportReport {
    ExportReport {
        version: exported.version,
        format: exported.format.name(),
        out: exported.path,
        bytes: exported.bytes,
        weights_sha256: exported.weights_sha256,
        num_params: exported.num_params,
        tensors: exported
            .tensors
            .into_iter()
            .map(|t| TensorReport {
                name: t.name,
                shape: t.shape,
                offset: t.offset,
            })
            .collect(),
    }
}

/// Downloads a version's manifest and weights file from the admin service. The bytes are
/// checked against the manifest by the caller.
async fn fetch_weights(address: &str, version: u64) -> Result<(Manifest, Vec<u8>)> {
    let mut client = admin_client(address)?;
    let failed = |s| rpc_failed("ExportVersion", address, s);
    let mut stream = client
        .export_version(pb::ExportVersionRequest { version })
        .await
        .map_err(failed)?
        .into_inner();

    let Some(pb::ExportChunk {
        part: Some(pb::export_chunk::Part::Header(header)),
    }) = stream.message().await.map_err(failed)?
    else {
        bail!("the coordinator's export of version {version} does not start with a header");
    };
    ensure!(
        header.version == version,
        "asked for version {version}, the coordinator sent version {}",
        header.version
    );
    let manifest: Manifest = serde_json::from_str(&header.manifest_json)
        .context("the coordinator sent a manifest this tool cannot read")?;
    let size = usize::try_from(header.size_bytes).context("the weights file is too large")?;

    let mut weights = Vec::with_capacity(size);
    while let Some(chunk) = stream.message().await.map_err(failed)? {
        let Some(pb::export_chunk::Part::Data(data)) = chunk.part else {
            bail!("the coordinator's export of version {version} holds a second header");
        };
        ensure!(
            weights.len() + data.len() <= size,
            "the coordinator sent more than the {size} bytes it announced"
        );
        weights.extend_from_slice(&data);
    }
    ensure!(
        weights.len() == size,
        "the coordinator sent {} of the {size} bytes it announced",
        weights.len()
    );
    Ok((manifest, weights))
}

// ---------------------------------------------------------------------------------------------
// rounds

#[derive(Debug, Serialize)]
struct PauseReport {
    paused: bool,
    was_paused: bool,
    open_round: Option<u64>,
}

#[derive(Debug, Serialize)]
struct ResumeReport {
    paused: bool,
    was_paused: bool,
}

/// `rounds pause`.
pub async fn pause(address: &str, json: bool) -> Result<()> {
    let mut client = admin_client(address)?;
    let response = client
        .pause_rounds(pb::PauseRoundsRequest {})
        .await
        .map_err(|s| rpc_failed("PauseRounds", address, s))?
        .into_inner();
    let report = PauseReport {
        paused: true,
        was_paused: response.was_paused,
        open_round: response.open_round,
    };
    if json {
        return print_json(&report);
    }
    let mut out = String::new();
    let already = if report.was_paused {
        " (they already were)"
    } else {
        ""
    };
    match report.open_round {
        Some(round) => say!(
            out,
            "rounds paused{already}; round {round} is still open and runs to its end, then no \
             new round opens until `rounds resume`"
        ),
        None => say!(
            out,
            "rounds paused{already}; no round opens until `rounds resume`"
        ),
    }
    emit(&out)
}

/// `rounds resume`.
pub async fn resume(address: &str, json: bool) -> Result<()> {
    let mut client = admin_client(address)?;
    let response = client
        .resume_rounds(pb::ResumeRoundsRequest {})
        .await
        .map_err(|s| rpc_failed("ResumeRounds", address, s))?
        .into_inner();
    let report = ResumeReport {
        paused: false,
        was_paused: response.was_paused,
    };
    if json {
        return print_json(&report);
    }
    let mut out = String::new();
    if report.was_paused {
        say!(out, "rounds resumed");
    } else {
        say!(out, "rounds were not paused; nothing changed");
    }
    emit(&out)
}
