//! A node killed with SIGKILL the instant it reports an update sent: the round's spending must
//! already be in its privacy ledger on disk, and the node restarted on the same config must
//! count that spending and train on to the end of the federation.
//!
//! Real processes on loopback: one `athanor-coordinator serve` and one `athanor-node run`, both
//! plaintext (`--insecure`), the node training DP-SGD on the bundled breast cancer dataset with
//! its ledger in the test's sandbox. Every wait is bounded; on failure the sandbox prints every
//! process's logs.

mod support;

use std::fs::{self, File};
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use athanor_core::model::{Architecture, ModelSpec};
use athanor_core::noise::accounted_noise_multiplier;
use athanor_core::plan::{DpSgdRequest, RoundPlan};
use athanor_node::ledger::{Entry, Ledger, Tail};
use flate2::read::GzDecoder;
use serde_json::Value;
use support::{Sandbox, binaries, start_coordinator, whole_lines};

/// Longest the test may take once the binaries are built; it needs a few seconds, most of
/// them the coordinator's linger after the last round.
const TEST_TIMEOUT: Duration = Duration::from_secs(90);

/// How often the node's log is read while waiting for its first update to leave: often, so
/// that the kill lands while the federation still has rounds to run.
const KILL_POLL: Duration = Duration::from_millis(1);

/// Rounds the federation runs; enough that some are left after the kill.
const ROUNDS: u64 = 6;

/// The bundled dataset (569 rows, 30 features, 2 classes) and its schema, under `data/`.
const DATASET: &str = "sklearn_breast_cancer.csv.gz";
const SCHEMA: &str = "breast_cancer.schema.toml";

/// The plan the coordinator below sends: one local epoch in expected batches of 24, sigma 1.
const PLAN: RoundPlan = RoundPlan {
    learning_rate: 0.5,
    local_epochs: 1.0,
    expected_batch_size: 24,
    dp: Some(DpSgdRequest {
        clip_norm: 1.0,
        noise_multiplier: 1.0,
    }),
};

/// The node's share of rows held out for local evaluation, as its config below sets it.
const TEST_FRACTION: f64 = 0.2;

#[test]
fn a_node_killed_right_after_sending_an_update_had_already_recorded_its_spending() {
    let binaries = binaries();
    let deadline = Instant::now() + TEST_TIMEOUT;
    let mut sandbox = Sandbox::new();
    let ledger = sandbox.dir().join("ledger/site-0.jsonl");

    fs::write(sandbox.dir().join("coordinator.toml"), coordinator_config())
        .expect("write coordinator config");
    let address = start_coordinator(
        &mut sandbox,
        "coordinator",
        &["serve", "--insecure", "--config", "coordinator.toml"],
    );

    fs::write(
        sandbox.dir().join("node.toml"),
        node_config(address, &ledger),
    )
    .expect("write node config");
    let run = || {
        let mut run = Command::new(&binaries.node);
        run.args(["run", "--insecure", "--config", "node.toml"]);
        run
    };
    sandbox.spawn("node", run());

    // Kill the node the moment its first update has gone out.
    let round = wait_for_first_submission(&mut sandbox, deadline);
    let node = sandbox.child("node");
    node.kill().expect("SIGKILL the node");
    node.wait().expect("reap the node");

    // The round's spending was on disk before the update left: a fresh reader finds it whole.
    let at_kill = Ledger::read(&ledger).expect("the killed node's ledger reads back");
    assert!(at_kill.exists, "no ledger at {}", ledger.display());
    let recorded = at_kill
        .entries
        .iter()
        .find(|entry| entry.round == round)
        .unwrap_or_else(|| {
            panic!(
                "round {round}'s update was sent, but the ledger holds no entry for it: {:?}",
                at_kill.entries
            )
        });
    check_entry(recorded);
    let logged = logged_training(&sandbox.log("node", "stderr"), round);
    assert_eq!(
        (recorded.q, recorded.steps),
        logged,
        "the ledger records other steps than the node trained in round {round}"
    );
    let spent_at_kill = budget(&ledger_summary(binaries, sandbox.dir()), "at the kill");
    assert!(
        spent_at_kill.entries >= 1 && spent_at_kill.spent > 0.0,
        "`athanor-node budget` does not count the killed round: {spent_at_kill:?}"
    );
    assert_eq!(spent_at_kill.entries, at_kill.entries.len());

    // Restarted on the same config, the node picks up the same ledger and trains to the end.
    sandbox.spawn("node-restarted", run());
    let status = sandbox.wait_for_exit("node-restarted", deadline);
    assert!(status.success(), "the restarted node exited with {status}");
    let summary = sandbox.log("node-restarted", "stdout");
    assert!(
        summary.contains(&format!("all {ROUNDS} rounds published")),
        "the restarted node stopped before the federation finished: {summary}"
    );
    let loaded = sandbox.log("node-restarted", "stderr");
    assert!(
        whole_lines(&loaded).any(|line| line.contains("privacy ledger loaded")
            && line.contains(&format!("entries={}", at_kill.entries.len()))),
        "the restarted node did not load the {} entries the killed one left",
        at_kill.entries.len()
    );

    let after = Ledger::read(&ledger).expect("the final ledger reads back");
    assert_eq!(after.tail, Tail::Clean);
    assert_eq!(
        after.entries[..at_kill.entries.len()],
        at_kill.entries[..],
        "the restarted node changed entries the killed one had written"
    );
    assert!(
        after.entries.len() > at_kill.entries.len(),
        "the restarted node trained no round: {:?}",
        after.entries
    );
    for entry in &after.entries {
        check_entry(entry);
    }
    let rounds: Vec<u64> = after.entries.iter().map(|entry| entry.round).collect();
    for round in 1..=ROUNDS {
        assert!(
            rounds.contains(&round),
            "round {round} is missing from the ledger: {rounds:?}"
        );
    }
    let spent_at_end = budget(&ledger_summary(binaries, sandbox.dir()), "at the end");
    assert_eq!(spent_at_end.entries, after.entries.len());
    assert!(
        spent_at_end.spent > spent_at_kill.spent,
        "spending did not grow after the restart: {spent_at_kill:?} then {spent_at_end:?}"
    );

    let status = sandbox.wait_for_exit("coordinator", deadline);
    assert!(status.success(), "coordinator exited with {status}");
    eprintln!(
        "node killed after sending round {round}: {} ledger entries then (epsilon {:.4}), {} \
         at the end (epsilon {:.4}), rounds {rounds:?}",
        at_kill.entries.len(),
        spent_at_kill.spent,
        after.entries.len(),
        spent_at_end.spent
    );
}

/// Waits, reading the node's stderr every [`KILL_POLL`], until it reports an update sent;
/// returns that update's round.
fn wait_for_first_submission(sandbox: &mut Sandbox, deadline: Instant) -> u64 {
    loop {
        let log = sandbox.log("node", "stderr");
        let submitted = whole_lines(&log)
            .find(|line| line.ends_with("update submitted"))
            .map(|line| round_of(line).unwrap_or_else(|| panic!("no round in {line:?}")));
        if let Some(round) = submitted {
            return round;
        }
        if let Ok(Some(status)) = sandbox.child("node").try_wait() {
            panic!("the node exited with {status} before sending an update");
        }
        assert!(Instant::now() < deadline, "the node sent no update in time");
        std::thread::sleep(KILL_POLL);
    }
}

/// The round of a log line written inside a round's span (`round{round=3}`).
fn round_of(line: &str) -> Option<u64> {
    let rest = &line[line.find("round{round=")? + "round{round=".len()..];
    rest[..rest.find('}')?].parse().ok()
}

/// The sampling rate and steps the node logged when it trained `round`.
fn logged_training(log: &str, round: u64) -> (f64, u64) {
    let line = whole_lines(log)
        .find(|line| round_of(line) == Some(round) && line.contains("trained locally"))
        .unwrap_or_else(|| panic!("the node logged no training for round {round}"));
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|word| word.strip_prefix(name)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("no {name} in {line:?}"))
    };
    let q = field("q").parse().expect("q is a number");
    let steps = field("steps").parse().expect("steps is a number");
    (q, steps)
}

/// Checks an entry against what the coordinator asked and what the node holds, computed here
/// from the dataset itself: its training rows, the sampling rate and steps at those rows, and
/// the noise multiplier charged for the model's size.
fn check_entry(entry: &Entry) {
    let rows = training_rows();
    let spec = ModelSpec {
        architecture: Architecture::LogisticRegression,
        features: 30,
        classes: 2,
    };
    assert_eq!(entry.federation, "node-crash", "{entry:?}");
    assert_eq!(entry.rows, rows as u64, "{entry:?}");
    assert_eq!(entry.q, 24.0 / rows as f64, "{entry:?}");
    assert_eq!(entry.steps, PLAN.steps(rows), "{entry:?}");
    assert_eq!(
        entry.sigma,
        Some(accounted_noise_multiplier(1.0, spec.num_params())),
        "{entry:?}"
    );
    assert_eq!(entry.clip_norm, Some(1.0), "{entry:?}");
}

/// The rows the node trains on: the dataset's rows less the share it holds out.
fn training_rows() -> usize {
    let mut text = String::new();
    GzDecoder::new(File::open(data_dir().join(DATASET)).expect("bundled dataset"))
        .read_to_string(&mut text)
        .expect("bundled dataset is gzip text");
    let rows = text.lines().skip(1).filter(|line| !line.is_empty()).count();
    rows - (TEST_FRACTION * rows as f64).floor() as usize
}

/// What `athanor-node budget --json` reports.
#[derive(Debug)]
struct Spent {
    entries: usize,
    spent: f64,
}

fn budget(summary: &Value, when: &str) -> Spent {
    Spent {
        entries: summary["entries"]
            .as_u64()
            .unwrap_or_else(|| panic!("{when}: no entry count in {summary}"))
            as usize,
        spent: summary["spent"]
            .as_f64()
            .unwrap_or_else(|| panic!("{when}: no finite epsilon spent in {summary}")),
    }
}

/// Runs `athanor-node budget --json` on the node's config, with its own deadline.
fn ledger_summary(binaries: &support::Binaries, dir: &Path) -> Value {
    let output = Command::new(&binaries.node)
        .current_dir(dir)
        .args(["budget", "--json", "--config", "node.toml"])
        .output()
        .expect("run athanor-node budget");
    assert!(
        output.status.success(),
        "athanor-node budget failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("athanor-node budget prints JSON")
}

/// A coordinator on an ephemeral loopback port running [`ROUNDS`] rounds of [`PLAN`] with
/// one node. The round deadline is generous and one abandoned round is tolerated, so the
/// federation waits for the killed node to come back.
fn coordinator_config() -> String {
    format!(
        r#"
[federation]
name = "node-crash"

[server]
listen = "127.0.0.1:0"

[store]
dir = "store"

[model]
architecture = "logistic_regression"
features = 30
classes = 2
init_seed = 7

[rounds]
total = {ROUNDS}
min_nodes = 1
deadline_secs = 30
max_consecutive_abandoned = 2
cohort_seed = 1

[training]
learning_rate = {lr:?}
local_epochs = {epochs:?}
expected_batch_size = {batch}

[privacy]
dp = "on"
clip_norm = 1.0
noise_multiplier = 1.0

# One node: secure aggregation needs at least two.
[aggregation]
mode = "plain"
"#,
        lr = PLAN.learning_rate,
        epochs = PLAN.local_epochs,
        batch = PLAN.expected_batch_size,
    )
}

/// The node's config: the whole bundled dataset, a fifth of it held out, its ledger at
/// `ledger`, and a budget far above what the federation spends.
fn node_config(address: SocketAddr, ledger: &Path) -> String {
    format!(
        r#"
[node]
id = "site-0"

[coordinator]
address = "http://{address}"
max_backoff_secs = 1

[data]
path = "{data}"
schema = "{schema}"
test_fraction = {TEST_FRACTION:?}
split_seed = 3

[privacy]
epsilon = 1000.0
delta = 1e-5
ledger = "{ledger}"
"#,
        data = data_dir().join(DATASET).display(),
        schema = data_dir().join(SCHEMA).display(),
        ledger = ledger.display(),
    )
}

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../data")
}
