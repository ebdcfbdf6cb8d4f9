//! Secure aggregation with real processes losing nodes mid-round: five nodes start a secure
//! round, one is killed with SIGKILL right after it advertises its keys and another right after
//! its masked input was accepted, and the round still publishes a version equal, within the
//! quantization error, to plain FedAvg over the nodes whose masked inputs arrived.
//!
//! Real processes on loopback: one `athanor-coordinator serve` and five `athanor-node run`, all
//! plaintext (`--insecure`), each node training DP-SGD on the bundled breast cancer dataset
//! with its own train/test split and a fixed `insecure_seed`. The seed makes each node's
//! training reproducible, so the test recomputes every node's update in-process with the same
//! library code the node runs and checks the published parameters against the mean of exactly
//! the right updates.
//!
//! The kills race the protocol. The first node may be killed before its encrypted shares leave
//! (it then drops out of the share-keys stage) or just after (it drops out of the masked-input
//! stage, and the survivors must reveal its mask key); the second may be killed before it
//! answers the unmask request or just after. Every case must publish the same version; the
//! test prints which one it saw. Every wait is bounded; on failure the sandbox prints every
//! process's logs.

mod support;

use std::collections::BTreeSet;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use athanor_coordinator::store::ModelStore;
use athanor_core::dpsgd::{self, DpSgdParams, TrainingPlan};
use athanor_core::model::ModelSpec;
use athanor_core::plan::{DpSgdRequest, RoundPlan};
use athanor_node::budget::Charge;
use athanor_node::data::{Dataset, Schema};
use ndarray::ArrayView2;
use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::SeedableRng;
use support::{Sandbox, binaries, start_coordinator, whole_lines};

/// Longest the test may take once the binaries are built. The usual run needs about ten
/// seconds: two short stages that close at their deadline and the coordinator's linger. When the
/// first kill lands after that node's shares left, the masked-input stage waits for it until
/// the round's deadline, which adds [`ROUND_DEADLINE_SECS`].
const TEST_TIMEOUT: Duration = Duration::from_secs(120);

/// How often the nodes' logs are read while waiting for the moments to kill them: often, so
/// that each kill lands while the protocol is still where the test means it to be.
const KILL_POLL: Duration = Duration::from_millis(1);

/// Nodes in the cohort.
const NODES: usize = 5;

/// Killed as soon as it logs that its keys were advertised.
const KILLED_AFTER_KEYS: usize = 1;

/// Killed as soon as it logs that its masked update was accepted.
const KILLED_AFTER_UPDATE: usize = 3;

/// What the node logs when the coordinator has accepted its keys.
const KEYS_ADVERTISED: &str = "keys advertised";

/// What the node logs when the coordinator has accepted its masked update.
const UPDATE_SUBMITTED: &str = "update submitted";

/// What the coordinator logs when a stage closes at its deadline with nodes missing.
const STAGE_INCOMPLETE: &str = "stage closed without every node's answer";

/// Seconds each short stage waits: short, since two stages wait for a killed node.
const STAGE_DEADLINE_SECS: f64 = 3.0;

/// Seconds the round waits for masked inputs. Only the case where the first killed node's shares
/// got out waits this long; local training itself takes milliseconds.
const ROUND_DEADLINE_SECS: u64 = 20;

/// Percentage of a neighbourhood needed to reconstruct a secret. Five holders on the complete
/// graph give `t = ceil(0.51 * 5) = 3`, which the three nodes that live to the end can reach.
const THRESHOLD_PERCENT: u32 = 51;

/// Fewest masked inputs the round publishes with, and the fewest survivors of unmasking.
const MIN_UPDATES: usize = 3;

/// The bound S nodes clip their updates to: far above the norm of one round's update here, so
/// nothing is clipped (the recomputation clips all the same, as the nodes do).
const UPDATE_CLIP_NORM: f64 = 1000.0;

/// The bundled dataset (569 rows, 30 features, 2 classes) and its schema, under `data/`.
const DATASET: &str = "sklearn_breast_cancer.csv.gz";
const SCHEMA: &str = "breast_cancer.schema.toml";

/// Each node's share of rows held out for local evaluation, as its config sets it.
const TEST_FRACTION: f64 = 0.2;

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

/// The coordinator's server learning rate (FedAvg, no momentum).
const SERVER_LEARNING_RATE: f64 = 1.0;

#[test]
fn a_secure_round_losing_nodes_after_keys_and_after_masking_publishes_the_survivors_mean() {
    let binaries = binaries();
    let started = Instant::now();
    let deadline = started + TEST_TIMEOUT;
    let mut sandbox = Sandbox::new();

    fs::write(sandbox.dir().join("coordinator.toml"), coordinator_config())
        .expect("write coordinator config");
    let address = start_coordinator(
        &mut sandbox,
        "coordinator",
        &["serve", "--insecure", "--config", "coordinator.toml"],
    );

    for node in 0..NODES {
        let config = format!("{}.toml", process(node));
        let ledger = sandbox
            .dir()
            .join(format!("ledger/{}.jsonl", node_id(node)));
        fs::write(
            sandbox.dir().join(&config),
            node_config(node, address, &ledger),
        )
        .expect("write node config");
        let mut run = Command::new(&binaries.node);
        run.args(["run", "--insecure", "--config", &config]);
        sandbox.spawn(&process(node), run);
    }

    // One node dies holding keys the others know; one dies with its masked input in the sum.
    let kills = kill_on_markers(
        &mut sandbox,
        &[
            (KILLED_AFTER_KEYS, KEYS_ADVERTISED),
            (KILLED_AFTER_UPDATE, UPDATE_SUBMITTED),
        ],
        started,
        deadline,
    );

    // The three others see the round through and leave when the federation finishes.
    let survivors: Vec<usize> = (0..NODES)
        .filter(|&node| node != KILLED_AFTER_KEYS && node != KILLED_AFTER_UPDATE)
        .collect();
    for &node in &survivors {
        let name = process(node);
        let status = sandbox.wait_for_exit(&name, deadline);
        assert!(status.success(), "{name} exited with {status}");
        let summary = sandbox.log(&name, "stdout");
        assert!(
            summary.contains("1 rounds trained, 0 declined"),
            "{name} did not train the round: {summary}"
        );
        assert!(
            whole_lines(&sandbox.log(&name, "stderr"))
                .any(|line| line.contains("unmasking shares sent")),
            "{name} never revealed shares for unmasking"
        );
    }
    let finished = started.elapsed();
    let status = sandbox.wait_for_exit("coordinator", deadline);
    assert!(status.success(), "coordinator exited with {status}");

    let names = std::iter::once("coordinator".to_string()).chain((0..NODES).map(process));
    for name in names {
        let log = sandbox.log(&name, "stderr");
        assert!(!log.contains("panicked"), "{name} panicked");
    }
    let killed_early = sandbox.log(&process(KILLED_AFTER_KEYS), "stderr");
    assert!(
        !killed_early.contains(UPDATE_SUBMITTED),
        "the kill after the keys landed so late that the node had already sent its update; \
         the case under test did not happen"
    );

    let coordinator_log = sandbox.log("coordinator", "stderr");
    let dropouts = Dropouts::from_log(&coordinator_log);
    let fit = check_published_version(&sandbox.dir().join("store"), &coordinator_log);

    eprintln!(
        "node {KILLED_AFTER_KEYS} killed {:?} after start, {} its shares left (dropped at {}); \
         node {KILLED_AFTER_UPDATE} killed {:?} after start, {} it answered the unmask request; \
         survivors done {finished:?} after start",
        kills[0],
        if dropouts.first_at == "share-keys" {
            "before"
        } else {
            "after"
        },
        dropouts.first_at,
        kills[1],
        if dropouts.second_missed_unmasking {
            "before"
        } else {
            "after"
        },
    );
    eprintln!("{fit}");
}

/// Where the two killed nodes dropped out, as the coordinator's stage closings tell it.
#[derive(Debug)]
struct Dropouts {
    /// The stage the node killed after its keys is missing from: `share-keys` when the kill
    /// landed before its shares left, `masked-input` when after.
    first_at: String,
    /// Whether unmasking closed without the node killed after its update (it may also have
    /// answered in the instant before the kill landed).
    second_missed_unmasking: bool,
}

impl Dropouts {
    /// Reads the coordinator's log, failing unless the stages that closed short are exactly
    /// what the two kills explain: the first node missing from one stage before unmasking,
    /// whichever side of its shares the kill landed on, and at most the second node missing
    /// from unmasking.
    fn from_log(log: &str) -> Dropouts {
        let short = stages_closed_short(log);
        let (unmasking, before): (Vec<_>, Vec<_>) =
            short.iter().partition(|(stage, _)| stage == "unmasking");
        let [(first_at, 1)] = before.as_slice() else {
            panic!(
                "node {KILLED_AFTER_KEYS} should be the one node missing from one stage before \
                 unmasking (none missing there means its kill came after its masked input); \
                 stages closed short: {short:?}"
            );
        };
        assert!(
            first_at == "share-keys" || first_at == "masked-input",
            "node {KILLED_AFTER_KEYS} advertised its keys, yet {first_at} closed short"
        );
        assert!(
            matches!(unmasking.as_slice(), [] | [(_, 1)]),
            "unmasking closed short by more than the node killed after its update: {short:?}"
        );
        Dropouts {
            first_at: first_at.clone(),
            second_missed_unmasking: !unmasking.is_empty(),
        }
    }
}

/// How close version 1 came to the right mean, and how far from the wrong ones.
#[derive(Debug)]
struct Fit {
    /// The quantization step `gamma` the coordinator chose.
    granularity: f64,
    /// L2 distance from FedAvg over the nodes whose masked inputs arrived.
    distance: f64,
    /// Largest difference of one parameter from it.
    max_abs: f64,
    /// What quantization and rounding allow for `distance`.
    tolerance: f64,
    /// L2 distance from FedAvg with the node killed after its keys added.
    with_first: f64,
    /// L2 distance from FedAvg without the node killed after its update.
    without_second: f64,
}

impl std::fmt::Display for Fit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "granularity {:e}: version 1 is {:e} in L2 from the contributors' FedAvg (max \
             |difference| {:e}), tolerance {:e}; {:e} from FedAvg with node {KILLED_AFTER_KEYS}, \
             {:e} from FedAvg without node {KILLED_AFTER_UPDATE}",
            self.granularity,
            self.distance,
            self.max_abs,
            self.tolerance,
            self.with_first,
            self.without_second
        )
    }
}

/// Checks the store the coordinator left: versions 0 and 1 only, version 1 naming exactly the
/// nodes whose masked inputs arrived, and its parameters those of FedAvg over exactly their
/// recomputed updates, within the quantization and rounding error, and far from FedAvg over
/// the two wrong sets a bug in dropout handling would give.
fn check_published_version(store: &Path, coordinator_log: &str) -> Fit {
    let store = ModelStore::open_read_only(store).expect("open the store");
    assert_eq!(
        store.list().len(),
        2,
        "the store should hold versions 0 and 1"
    );
    let (initial, global) = store.load(0).expect("version 0 loads");
    let (published, params) = store.load(1).expect("version 1 was published");
    let contributors: Vec<usize> = (0..NODES).filter(|&n| n != KILLED_AFTER_KEYS).collect();
    assert_eq!(
        published.contributors as usize,
        contributors.len(),
        "contributors of version 1"
    );
    let reported: BTreeSet<String> = published
        .dataset_fingerprints
        .iter()
        .map(|fingerprint| fingerprint.node.clone())
        .collect();
    let expected: BTreeSet<String> = contributors.iter().map(|&n| node_id(n)).collect();
    assert_eq!(
        reported, expected,
        "version 1 should name every node whose masked input arrived, and no other"
    );

    let (updates, fingerprint) = recompute_updates(&initial.model, &global);
    for recorded in &published.dataset_fingerprints {
        assert_eq!(
            (recorded.sha256.as_str(), recorded.rows),
            (fingerprint.0.as_str(), fingerprint.1),
            "{} reports another dataset than the bundled one",
            recorded.node
        );
    }

    // Quantization: each node's stochastic rounding moves each of the `vector_len` (rotated)
    // coordinates by less than one step `gamma`, so the decoded mean of any number of nodes is
    // within `gamma sqrt(vector_len)` of the true mean in L2; the unrotation is orthogonal and
    // dropping the padding only shortens the error. Publishing rounds each parameter to f32,
    // at most half an ulp, at most `2^-24 |p|`, so at most `2^-24 |p|_2` in L2. What is left,
    // f64 arithmetic on values of order one, is bounded by the last term with room to spare.
    let granularity = logged_field(coordinator_log, "secure aggregation set up", "granularity");
    let vector_len = logged_field(coordinator_log, "secure aggregation set up", "vector_len");
    let tolerance = granularity * vector_len.sqrt()
        + f64::from(f32::EPSILON) / 2.0 * l2(params.iter().map(|&p| f64::from(p)))
        + 1e-9;
    let distance_to = |nodes: &[usize]| {
        let expected = fedavg(&global, &updates, nodes);
        let differences = params.iter().zip(expected).map(|(&p, e)| f64::from(p) - e);
        (
            l2(differences.clone()),
            differences.map(f64::abs).fold(0.0, f64::max),
        )
    };
    let (distance, max_abs) = distance_to(&contributors);
    assert!(
        distance <= tolerance,
        "version 1 is {distance:e} (L2) from FedAvg of nodes {contributors:?}; quantization \
         and rounding allow {tolerance:e}"
    );

    // The same check catches a wrong set: the mean with the node killed after its keys, or
    // without the one killed after its update, lies far outside the tolerance.
    let survivors: Vec<usize> = contributors
        .iter()
        .copied()
        .filter(|&n| n != KILLED_AFTER_UPDATE)
        .collect();
    let all: Vec<usize> = (0..NODES).collect();
    let (with_first, _) = distance_to(&all);
    let (without_second, _) = distance_to(&survivors);
    for (gap, nodes) in [(with_first, &all), (without_second, &survivors)] {
        assert!(
            gap > 100.0 * tolerance,
            "version 1 is only {gap:e} (L2) from FedAvg of nodes {nodes:?}, too close to tell \
             from the right set at tolerance {tolerance:e}"
        );
    }

    Fit {
        granularity,
        distance,
        max_abs,
        tolerance,
        with_first,
        without_second,
    }
}

/// Kills each `(node, marker)`'s process the moment a whole line of its stderr contains the
/// marker, reading every log each [`KILL_POLL`]; returns how long after `started` each kill
/// landed, in the order given.
fn kill_on_markers(
    sandbox: &mut Sandbox,
    plan: &[(usize, &str)],
    started: Instant,
    deadline: Instant,
) -> Vec<Duration> {
    let mut killed: Vec<Option<Duration>> = vec![None; plan.len()];
    while killed.iter().any(Option::is_none) {
        for (slot, &(node, marker)) in killed.iter_mut().zip(plan) {
            if slot.is_some() {
                continue;
            }
            let name = process(node);
            if whole_lines(&sandbox.log(&name, "stderr")).any(|line| line.contains(marker)) {
                let child = sandbox.child(&name);
                child.kill().expect("SIGKILL the node");
                child.wait().expect("reap the node");
                *slot = Some(started.elapsed());
                continue;
            }
            if let Ok(Some(status)) = sandbox.child(&name).try_wait() {
                panic!("{name} exited with {status} before logging {marker:?}");
            }
        }
        assert!(
            Instant::now() < deadline,
            "not every node reached the moment of its kill in time: {killed:?}"
        );
        std::thread::sleep(KILL_POLL);
    }
    killed.into_iter().flatten().collect()
}

/// The stages the coordinator closed with nodes missing, and how many, in order.
fn stages_closed_short(log: &str) -> Vec<(String, usize)> {
    whole_lines(log)
        .filter(|line| line.contains(STAGE_INCOMPLETE))
        .map(|line| {
            let stage = field(line, "stage");
            let missing = field(line, "missing")
                .parse()
                .unwrap_or_else(|e| panic!("missing count in {line:?}: {e}"));
            (stage.to_string(), missing)
        })
        .collect()
}

/// A number the coordinator logged as `name=value` on the first line with `message`.
fn logged_field(log: &str, message: &str, name: &str) -> f64 {
    let line = whole_lines(log)
        .find(|line| line.contains(message))
        .unwrap_or_else(|| panic!("the coordinator never logged {message:?}"));
    field(line, name)
        .parse()
        .unwrap_or_else(|e| panic!("{name} in {line:?}: {e}"))
}

/// The value of a `name=value` field of a log line.
fn field<'a>(line: &'a str, name: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|word| word.strip_prefix(name)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {name} in {line:?}"))
}

/// Every node's update for the round as it entered secure aggregation, recomputed: the node's
/// training rows, its steps and sampling rate at those rows, DP-SGD from `global` with the
/// generator its `insecure_seed` gives, local minus global in f32, then clipped to S in f64 as
/// the quantizer does. Also returns the bundled file's fingerprint (sha256, rows), which every
/// node reports.
fn recompute_updates(spec: &ModelSpec, global: &[f32]) -> (Vec<Vec<f64>>, (String, u64)) {
    let schema = Schema::load(data_dir().join(SCHEMA)).expect("bundled schema");
    let dataset = Dataset::load(data_dir().join(DATASET), &schema).expect("bundled dataset");
    let fingerprint = (
        dataset.fingerprint().sha256_hex(),
        dataset.fingerprint().rows(),
    );

    let updates = (0..NODES)
        .map(|node| {
            let (train, _) = dataset
                .clone()
                .split(TEST_FRACTION, split_seed(node))
                .expect("split the dataset as the node does");
            let charge = Charge::of(&PLAN, train.rows(), spec.num_params());
            let plan = TrainingPlan {
                learning_rate: PLAN.learning_rate,
                steps: charge.steps,
                sampling_rate: charge.q,
                privacy: charge.dp.map(|dp| DpSgdParams {
                    clip_norm: dp.clip_norm,
                    noise_multiplier: dp.noise_multiplier,
                }),
            };
            let x = ArrayView2::from_shape((train.rows(), train.cols()), train.features())
                .expect("rows times features");
            let mut local = global.to_vec();
            let mut rng = ChaCha20Rng::seed_from_u64(insecure_seed(node));
            dpsgd::train(spec, &mut local, x, train.labels(), &plan, &mut rng)
                .expect("train as the node does");

            let delta: Vec<f64> = local
                .iter()
                .zip(global)
                .map(|(l, g)| f64::from(l - g))
                .collect();
            let norm = l2(delta.iter().copied());
            let scale = if norm > UPDATE_CLIP_NORM {
                UPDATE_CLIP_NORM / norm
            } else {
                1.0
            };
            delta.into_iter().map(|v| v * scale).collect()
        })
        .collect();
    (updates, fingerprint)
}

/// Version 0 moved by the server learning rate times the unweighted mean of the updates of
/// `nodes`, in f64: what FedAvg without momentum publishes before rounding to f32.
fn fedavg(global: &[f32], updates: &[Vec<f64>], nodes: &[usize]) -> Vec<f64> {
    let count = nodes.len() as f64;
    (0..global.len())
        .map(|i| {
            let mean = nodes.iter().map(|&n| updates[n][i]).sum::<f64>() / count;
            f64::from(global[i]) + SERVER_LEARNING_RATE * mean
        })
        .collect()
}

fn l2(values: impl Iterator<Item = f64>) -> f64 {
    values.map(|v| v * v).sum::<f64>().sqrt()
}

/// A coordinator on an ephemeral loopback port running one secure round with all five nodes.
/// One abandoned round ends the federation, so a round that cannot complete fails the test at
/// once instead of retrying.
fn coordinator_config() -> String {
    format!(
        r#"
[federation]
name = "secure-aggregation"

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
total = 1
min_nodes = {NODES}
min_updates = {MIN_UPDATES}
deadline_secs = {ROUND_DEADLINE_SECS}
max_consecutive_abandoned = 1
cohort_seed = 1

[training]
learning_rate = {lr:?}
local_epochs = {epochs:?}
expected_batch_size = {batch}

[strategy]
server_learning_rate = {SERVER_LEARNING_RATE:?}
server_momentum = 0.0

[privacy]
dp = "on"
clip_norm = {clip:?}
noise_multiplier = {sigma:?}

# No [node_privacy]: nodes add no noise before masking, so the sum is exact up to rounding.
[aggregation]
mode = "secure"
update_clip_norm = {UPDATE_CLIP_NORM:?}
threshold_percent = {THRESHOLD_PERCENT}
stage_deadline_secs = {STAGE_DEADLINE_SECS:?}
"#,
        lr = PLAN.learning_rate,
        epochs = PLAN.local_epochs,
        batch = PLAN.expected_batch_size,
        clip = PLAN.dp.map(|dp| dp.clip_norm).unwrap_or_default(),
        sigma = PLAN.dp.map(|dp| dp.noise_multiplier).unwrap_or_default(),
    )
}

/// The config of node `node`: the whole bundled dataset with its own split, its own training
/// seed, its ledger at `ledger` (in the sandbox, not next to the bundled data), and a budget far
/// above one round's spending.
fn node_config(node: usize, address: SocketAddr, ledger: &Path) -> String {
    format!(
        r#"
[node]
id = "{id}"
insecure_seed = {seed}

[coordinator]
address = "http://{address}"
max_backoff_secs = 1

[data]
path = "{data}"
schema = "{schema}"
test_fraction = {TEST_FRACTION:?}
split_seed = {split}

[privacy]
epsilon = 1000.0
delta = 1e-5
ledger = "{ledger}"
"#,
        id = node_id(node),
        seed = insecure_seed(node),
        split = split_seed(node),
        data = data_dir().join(DATASET).display(),
        schema = data_dir().join(SCHEMA).display(),
        ledger = ledger.display(),
    )
}

fn node_id(node: usize) -> String {
    format!("site-{node}")
}

fn process(node: usize) -> String {
    format!("node-{node}")
}

fn insecure_seed(node: usize) -> u64 {
    1000 + node as u64
}

fn split_seed(node: usize) -> u64 {
    node as u64
}

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../data")
}
