//! A federation of real processes over loopback: one `athanor-coordinator` and three
//! `athanor-node`s, each with its own shard of a bundled dataset, trained with DP-SGD; then
//! the model store they leave behind is checked file by file. Also: what a node does when no
//! coordinator answers.
//!
//! These processes talk plaintext, with `--insecure` on every command line, to keep the
//! subject the training and the store; `tls.rs` runs a federation over mutual TLS and checks
//! who is refused.
//!
//! The binaries are the workspace's own, built with this test's profile ([`binaries`]). Each
//! test runs in a [`Sandbox`]: a temporary directory holding the configs, data shards, store
//! and one log file per stream of every child process. The sandbox kills its children when the
//! test ends, passing or failing, and prints their logs when it fails. Every wait on a child
//! is bounded, so a hang fails with a message naming what did not happen.

mod support;

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use athanor_coordinator::store::ModelStore;
use athanor_core::model::{self, Evaluation, ModelSpec};
use athanor_node::data::{Dataset, Schema};
use flate2::read::GzDecoder;
use ndarray::ArrayView2;
use serde_json::Value;
use sha2::{Digest, Sha256};
use support::{Binaries, Sandbox, binaries, start_coordinator, whole_lines};

/// Longest the whole federation may take, start to exit; it needs a few seconds, most of them
/// the coordinator's linger after the last round.
const FEDERATION_TIMEOUT: Duration = Duration::from_secs(120);

/// Rounds trained, hence trained versions published after the initial version 0.
const ROUNDS: u64 = 3;

/// Nodes in the federation.
const NODES: usize = 3;

/// The bundled dataset (569 rows, 30 features, 2 classes) and its schema, under `data/`.
const DATASET: &str = "sklearn_breast_cancer.csv.gz";
const SCHEMA: &str = "breast_cancer.schema.toml";

/// The delta every node reports its epsilon at.
const NODE_DELTA: f64 = 1e-5;

#[test]
fn three_nodes_publish_three_private_versions_that_beat_the_initial_model() {
    let binaries = binaries();
    let mut sandbox = Sandbox::new();
    let held_out = write_shards(sandbox.dir());
    let deadline = Instant::now() + FEDERATION_TIMEOUT;

    // The coordinator picks a free port and says which on stdout.
    fs::write(sandbox.dir().join("coordinator.toml"), COORDINATOR_CONFIG)
        .expect("write coordinator config");
    let address = start_coordinator(
        &mut sandbox,
        "coordinator",
        &["serve", "--insecure", "--config", "coordinator.toml"],
    );

    for node in 0..NODES {
        let config = format!("node-{node}.toml");
        let text = node_config(
            node,
            &format!("http://{address}"),
            &format!("node-{node}.csv"),
        );
        fs::write(sandbox.dir().join(&config), text).expect("write node config");
        let mut run = Command::new(&binaries.node);
        run.args(["run", "--insecure", "--config", &config]);
        sandbox.spawn(&format!("node-{node}"), run);
    }

    // Nodes stop when told the federation is finished; the coordinator stops after lingering.
    for node in 0..NODES {
        let name = format!("node-{node}");
        let status = sandbox.wait_for_exit(&name, deadline);
        assert!(status.success(), "{name} exited with {status}");
        let summary = sandbox.log(&name, "stdout");
        assert!(
            summary.contains(&format!("{ROUNDS} rounds trained, 0 declined")),
            "{name} did not train every round: {summary}"
        );
    }
    let status = sandbox.wait_for_exit("coordinator", deadline);
    assert!(status.success(), "coordinator exited with {status}");

    let store = sandbox.dir().join("store");
    let manifests = check_version_chain(&store, sandbox.dir());
    check_listing(&mut sandbox, binaries, &store, &manifests, deadline);
    check_accuracy(&store, &held_out, sandbox.dir());
}

/// A coordinator on an ephemeral loopback port running three rounds of DP-SGD with three nodes.
/// A round waits for all three (`min_nodes`, and `min_updates` defaults to it), and one
/// abandoned round ends the federation, so a node that fails shows at once. Many small steps
/// (four local epochs at learning rate 1) keep the DP noise from drowning the signal: over 25
/// runs the held-out accuracy after three rounds ranged from 0.84 to 0.95, against 0.66 for
/// the majority class.
const COORDINATOR_CONFIG: &str = r#"
[federation]
name = "end-to-end"

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
total = 3
min_nodes = 3
deadline_secs = 60
max_consecutive_abandoned = 1
cohort_seed = 1

[training]
learning_rate = 1.0
local_epochs = 4.0
expected_batch_size = 24

[privacy]
dp = "on"
clip_norm = 1.0
noise_multiplier = 1.0
"#;

/// The config of node `index`, reading `data` (relative to the sandbox) and dialing `address`.
/// With about 114 training rows a node samples at 24 / 114, under its 0.25 limit, and three
/// rounds spend an epsilon of about 13, under its budget of 20. Its privacy ledger goes next
/// to its data, in the sandbox.
fn node_config(index: usize, address: &str, data: &str) -> String {
    format!(
        r#"
[node]
id = "clinic-{index}"

[coordinator]
address = "{address}"
max_backoff_secs = 1

[data]
path = "{data}"
schema = "{SCHEMA}"
split_seed = {index}

[privacy]
epsilon = 20.0
delta = {NODE_DELTA:e}
"#
    )
}

/// Splits the bundled dataset by row: row `i` goes to node `i % 4` when that is below 3 and to
/// the held-out set otherwise, so every node has different rows and the evaluation set is
/// seen by none. Writes `node-K.csv`, `held-out.csv` and the schema into `dir`; returns the
/// held-out file.
fn write_shards(dir: &Path) -> PathBuf {
    let mut text = String::new();
    let file = File::open(data_dir().join(DATASET)).expect("bundled dataset");
    GzDecoder::new(file)
        .read_to_string(&mut text)
        .expect("bundled dataset is gzip text");
    let mut lines = text.lines();
    let header = lines.next().expect("dataset has a header");

    let mut shards = vec![format!("{header}\n"); NODES + 1];
    for (i, row) in lines.enumerate() {
        let shard = &mut shards[i % (NODES + 1)];
        shard.push_str(row);
        shard.push('\n');
    }
    let held_out = shards.pop().expect("NODES + 1 shards");
    for (node, shard) in shards.iter().enumerate() {
        fs::write(dir.join(format!("node-{node}.csv")), shard).expect("write shard");
    }
    fs::write(dir.join("held-out.csv"), held_out).expect("write held-out rows");
    fs::copy(data_dir().join(SCHEMA), dir.join(SCHEMA)).expect("copy schema");
    dir.join("held-out.csv")
}

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../data")
}

/// Checks every version directory in the store and returns the manifests, version 0 first:
/// versions 0 to [`ROUNDS`] and nothing else, each manifest valid JSON naming its own number,
/// its parent and its round, each weights file hashing to what its manifest records, and each
/// trained version recording all three nodes, their shards' fingerprints and a finite,
/// growing example-level epsilon.
fn check_version_chain(store: &Path, sandbox: &Path) -> Vec<Value> {
    let mut names: Vec<String> = fs::read_dir(store.join("versions"))
        .expect("store has a versions directory")
        .map(|entry| {
            entry
                .expect("directory entry")
                .file_name()
                .to_string_lossy()
                .into()
        })
        .collect();
    names.sort();
    let expected: Vec<String> = (0..=ROUNDS).map(|v| format!("{v:06}")).collect();
    assert_eq!(names, expected, "version directories in the store");

    let fingerprints: BTreeSet<(String, String, u64)> = (0..NODES)
        .map(|node| {
            let shard = fs::read(sandbox.join(format!("node-{node}.csv"))).expect("shard");
            let rows = shard.iter().filter(|&&b| b == b'\n').count() as u64 - 1;
            (
                format!("clinic-{node}"),
                hex::encode(Sha256::digest(&shard)),
                rows,
            )
        })
        .collect();

    let mut manifests = Vec::new();
    let mut previous_epsilon = 0.0;
    for version in 0..=ROUNDS {
        let dir = store.join("versions").join(format!("{version:06}"));
        let text = fs::read_to_string(dir.join("manifest.json")).expect("manifest.json");
        let manifest: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("manifest of version {version} is not JSON: {e}"));
        let weights = fs::read(dir.join("weights.safetensors")).expect("weights.safetensors");

        let parent = version.checked_sub(1).map_or(Value::Null, Value::from);
        assert_eq!(manifest["version"], version, "{text}");
        assert_eq!(manifest["parent"], parent, "{text}");
        assert_eq!(manifest["round"], version, "{text}");
        assert_eq!(
            manifest["weights_sha256"],
            hex::encode(Sha256::digest(&weights)),
            "version {version}'s weights do not match its manifest"
        );

        if version > 0 {
            assert_eq!(manifest["contributors"], NODES, "{text}");
            assert_eq!(
                manifest["strategy_params"]["noise_multiplier"], 1.0,
                "{text}"
            );
            let privacy = &manifest["example_privacy"];
            let epsilon = privacy["max_epsilon"]
                .as_f64()
                .unwrap_or_else(|| panic!("version {version} has no finite epsilon: {text}"));
            assert!(
                epsilon > previous_epsilon,
                "epsilon {epsilon} of version {version} does not exceed {previous_epsilon}"
            );
            previous_epsilon = epsilon;
            assert_eq!(privacy["delta"], NODE_DELTA, "{text}");

            let recorded: BTreeSet<(String, String, u64)> = manifest["dataset_fingerprints"]
                .as_array()
                .unwrap_or_else(|| panic!("version {version} has no dataset fingerprints"))
                .iter()
                .map(|f| {
                    let node = f["node"].as_str().expect("fingerprint node");
                    let sha256 = f["sha256"].as_str().expect("fingerprint sha256");
                    let rows = f["rows"].as_u64().expect("fingerprint rows");
                    (node.to_string(), sha256.to_string(), rows)
                })
                .collect();
            assert_eq!(recorded, fingerprints, "version {version}'s data lineage");
        }
        manifests.push(manifest);
    }
    manifests
}

/// `athanor-coordinator versions list --json` prints exactly the manifests on disk, one per
/// line, oldest first.
fn check_listing(
    sandbox: &mut Sandbox,
    binaries: &Binaries,
    store: &Path,
    manifests: &[Value],
    deadline: Instant,
) {
    let mut list = Command::new(&binaries.coordinator);
    list.args(["versions", "list", "--json", "--store"])
        .arg(store);
    sandbox.spawn("versions-list", list);
    let status = sandbox.wait_for_exit("versions-list", deadline);
    assert!(status.success(), "versions list exited with {status}");

    let output = sandbox.log("versions-list", "stdout");
    let listed: Vec<Value> = output
        .lines()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|e| {
                panic!("versions list printed a line that is not JSON ({e}): {line}")
            })
        })
        .collect();
    assert_eq!(
        listed, manifests,
        "versions list --json differs from the store"
    );
}

/// The last version classifies the held-out rows better than the initial model and better than
/// always answering the majority class.
fn check_accuracy(store: &Path, held_out: &Path, sandbox: &Path) {
    let store = ModelStore::open(store).expect("store opens");
    let (initial_manifest, initial) = store.load(0).expect("version 0 loads");
    let (last_manifest, last) = store.load(ROUNDS).expect("last version loads");
    assert_eq!(initial_manifest.model, last_manifest.model);

    let schema = Schema::load(sandbox.join(SCHEMA)).expect("schema loads");
    let data = Dataset::load(held_out, &schema).expect("held-out rows load");
    let spec = last_manifest.model;
    let before = evaluate(&spec, &initial, &data);
    let after = evaluate(&spec, &last, &data);

    eprintln!(
        "held-out accuracy {:.3} -> {:.3}, loss {:.4} -> {:.4}",
        before.accuracy, after.accuracy, before.loss, after.loss
    );
    let positives = data.labels().iter().filter(|&&label| label == 1).count();
    let majority = positives.max(data.rows() - positives) as f64 / data.rows() as f64;
    assert!(
        after.accuracy > before.accuracy && after.accuracy > majority,
        "held-out accuracy: initial {:.3}, after {ROUNDS} rounds {:.3}, majority class \
         {majority:.3}",
        before.accuracy,
        after.accuracy
    );
    assert!(
        after.loss < before.loss,
        "held-out loss rose from {:.4} to {:.4}",
        before.loss,
        after.loss
    );
}

fn evaluate(spec: &ModelSpec, params: &[f32], data: &Dataset) -> Evaluation {
    let x = ArrayView2::from_shape((data.rows(), data.cols()), data.features())
        .expect("dataset features are rows x cols");
    model::evaluate(spec, params, x, data.labels()).expect("model evaluates on held-out rows")
}

#[test]
fn a_node_names_the_unreachable_coordinator_and_retries_with_growing_pauses() {
    let binaries = binaries();
    let mut sandbox = Sandbox::new();
    let address = format!("http://{}", closed_port());
    fs::copy(data_dir().join(DATASET), sandbox.dir().join(DATASET)).expect("copy dataset");
    fs::copy(data_dir().join(SCHEMA), sandbox.dir().join(SCHEMA)).expect("copy schema");
    fs::write(
        sandbox.dir().join("node.toml"),
        node_config(0, &address, DATASET).replace("max_backoff_secs = 1", "max_backoff_secs = 30"),
    )
    .expect("write node config");

    // Pauses of 0.5 s, 1 s and 2 s put the third retry about 1.5 s after the first attempt.
    let mut run = Command::new(&binaries.node);
    run.args(["run", "--insecure", "--config", "node.toml"]);
    sandbox.spawn("node", run);
    let deadline = Instant::now() + Duration::from_secs(30);
    let retries = sandbox.wait_for_log("node", "stderr", deadline, |log| {
        let retries: Vec<String> = whole_lines(log)
            .filter(|line| line.contains("retry_in="))
            .map(str::to_string)
            .collect();
        (retries.len() >= 3).then_some(retries)
    });
    assert!(
        sandbox.is_running("node"),
        "the node gave up instead of retrying"
    );

    for line in &retries {
        assert!(
            line.contains(&address),
            "retry log does not name {address}: {line}"
        );
        assert!(
            line.to_lowercase().contains("refused"),
            "retry log does not say the connection was refused: {line}"
        );
    }
    // The announced pauses grow, and the node really waits that long: each failure is logged
    // at least the previous one's pause after it (less a little clock jitter).
    let pauses: Vec<Duration> = retries.iter().map(|line| retry_pause(line)).collect();
    assert!(
        pauses.windows(2).all(|pair| pair[0] < pair[1]),
        "pauses between attempts do not grow: {pauses:?}"
    );
    let times: Vec<f64> = retries.iter().map(|line| time_of_day(line)).collect();
    for (k, pause) in pauses.iter().enumerate().take(times.len() - 1) {
        // Modulo a day, in case the test runs across midnight.
        let waited = (times[k + 1] - times[k]).rem_euclid(86_400.0);
        assert!(
            waited + 0.01 >= pause.as_secs_f64(),
            "attempt {} came {waited:.3} s after the failure that announced {pause:?}",
            k + 2
        );
    }
}

/// Seconds since midnight UTC of a log line, from its RFC 3339 timestamp
/// (`2026-12-04T15:02:11.123456Z ...`).
fn time_of_day(line: &str) -> f64 {
    let clock = line
        .split_whitespace()
        .next()
        .and_then(|stamp| stamp.split_once('T'))
        .and_then(|(_, clock)| clock.strip_suffix('Z'))
        .unwrap_or_else(|| panic!("log line does not start with a UTC timestamp: {line}"));
    clock
        .split(':')
        .map(|part| part.parse::<f64>().expect("timestamp field is a number"))
        .fold(0.0, |seconds, part| seconds * 60.0 + part)
}

/// An address on loopback where nothing listens: a port the system just handed out, closed
/// again.
fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("bound address")
}

/// The `retry_in` field of a log line, written as a `Duration`'s debug form (`500ms`, `1s`,
/// `1.5s`).
fn retry_pause(line: &str) -> Duration {
    let field = line
        .split_whitespace()
        .find_map(|word| word.strip_prefix("retry_in="))
        .unwrap_or_else(|| panic!("no retry_in field in {line}"));
    let (number, scale) = if let Some(ms) = field.strip_suffix("ms") {
        (ms, 1e-3)
    } else if let Some(s) = field.strip_suffix('s') {
        (s, 1.0)
    } else {
        panic!("retry_in={field} is not in milliseconds or seconds")
    };
    let value: f64 = number
        .parse()
        .unwrap_or_else(|_| panic!("retry_in={field} is not a number of units"));
    Duration::from_secs_f64(value * scale)
}
