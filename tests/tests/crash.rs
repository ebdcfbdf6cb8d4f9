//! A coordinator killed with SIGKILL at random moments, over and over, while its nodes keep
//! running: the model store must stay sound after every kill, and training must go on from
//! where it stopped after every restart.
//!
//! Real processes on loopback: one `athanor-coordinator serve` and three `athanor-node run`
//! training DP-SGD on shards of a bundled dataset. The coordinator listens on a port picked
//! once, so each restart comes back at the address the nodes dial; they notice the loss,
//! back off and join again. A seeded generator (seed printed; set `ATHANOR_CRASH_SEED` to
//! replay one) picks each kill's moment: either a random delay after the restart, or the
//! instant a publish is seen in progress (a `.partial-` directory under `versions/`), which is
//! the moment most likely to tear a version.
//!
//! After each kill, with no coordinator running, the store is checked twice: through
//! [`ModelStore::open_read_only`] (every version valid, dense from 0) and independently, file by
//! file (directory names dense, each manifest naming its own number and the previous version as
//! parent, each weights file hashing to its manifest's record). No published version may ever
//! disappear. After each restart, the coordinator must have cleared any partial version before
//! it listens. At the end, training must have continued after the last restart.
//!
//! Every child is killed when the test ends, passing or failing; on failure the logs of the
//! last coordinator runs and the tail of every node's log are printed.

use std::fs::{self, File};
use std::io::Read;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use athanor_coordinator::store::{ModelStore, VersionStatus};
use flate2::read::GzDecoder;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tempfile::TempDir;

mod support;
use support::{Binaries, binaries};

/// Kills of the coordinator, each followed by a restart.
const KILLS: usize = 22;

/// Nodes that keep running throughout.
const NODES: usize = 3;

/// Longest the test may take once the binaries are built; it needs well under a minute on two
/// cores.
const TEST_TIMEOUT: Duration = Duration::from_secs(120);

/// Longest a restarted coordinator may take to listen.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// The seed used unless `ATHANOR_CRASH_SEED` is set.
const DEFAULT_SEED: u64 = 0x00C0_FFEE_2026;

/// The bundled dataset (569 rows, 30 features, 2 classes) and its schema, under `data/`.
const DATASET: &str = "sklearn_breast_cancer.csv.gz";
const SCHEMA: &str = "breast_cancer.schema.toml";

#[test]
fn a_coordinator_killed_at_random_moments_keeps_a_sound_store_and_resumes_training() {
    let seed = std::env::var("ATHANOR_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_SEED);
    eprintln!("crash test seed {seed} (replay with ATHANOR_CRASH_SEED={seed})");
    let mut rng = SplitMix64(seed);
    // Building the binaries may take minutes on a cold cache; the clock starts after.
    let binaries = binaries();
    let started = Instant::now();
    let deadline = started + TEST_TIMEOUT;

    let mut sandbox = Sandbox::new();
    write_shards(sandbox.dir());
    let port = free_port();
    fs::write(
        sandbox.dir().join("coordinator.toml"),
        coordinator_config(port),
    )
    .expect("write coordinator config");
    let store = sandbox.dir().join("store");

    sandbox.start_coordinator(binaries, deadline);
    for node in 0..NODES {
        let config = format!("node-{node}.toml");
        fs::write(sandbox.dir().join(&config), node_config(node, port)).expect("node config");
        let mut run = Command::new(&binaries.node);
        run.args(["run", "--insecure", "--config", &config]);
        sandbox.spawn(&format!("node-{node}"), run);
    }

    let mut stats = Stats::default();
    let mut latest_seen = 0;
    for kill in 1..=KILLS {
        // Pick the moment: during a publish, or at a random time after the restart.
        let cycle = Instant::now();
        let during_publish = rng.below(3) == 0;
        let moment = if during_publish {
            let found = wait_for_publish(&store, Duration::from_secs(4));
            stats.publish_kills += usize::from(found);
            if found {
                "during a publish"
            } else {
                "after waiting for a publish in vain"
            }
        } else {
            std::thread::sleep(Duration::from_millis(rng.below(1500)));
            "at a random moment"
        };
        let alive = cycle.elapsed();
        sandbox.kill_coordinator();
        assert!(
            Instant::now() < deadline,
            "the test ran out of time at kill {kill}"
        );

        let partials = partial_versions(&store);
        stats.partials_left += usize::from(!partials.is_empty());
        let latest = check_store(&store, kill);
        assert!(
            latest >= latest_seen,
            "kill {kill}: the store went back from version {latest_seen} to {latest}"
        );
        latest_seen = latest;

        let restart = Instant::now();
        sandbox.start_coordinator(binaries, deadline);
        eprintln!(
            "kill {kill:2} {moment} after {:4} ms: {} versions, {} partial left; listening \
             again after {} ms",
            alive.as_millis(),
            latest + 1,
            partials.len(),
            restart.elapsed().as_millis()
        );
        for partial in &partials {
            assert!(
                !store.join("versions").join(partial).exists(),
                "kill {kill}: the restarted coordinator listens with {partial} still there"
            );
        }
    }
    stats.latest_at_last_kill = latest_seen;

    // Training goes on after the last restart: new versions, chained to the old ones.
    let wanted = latest_seen + 3;
    let latest = wait_for_version(&store, wanted, deadline);
    sandbox.kill_coordinator();
    let final_latest = check_store(&store, KILLS + 1);
    assert!(final_latest >= latest, "versions lost at the end");
    for node in 0..NODES {
        assert!(
            sandbox.is_running(&format!("node-{node}")),
            "node-{node} stopped; nodes must ride out coordinator restarts"
        );
    }

    eprintln!(
        "crash test: {KILLS} kills in {:.1}s ({} aimed at a publish and found one, {} left a \
         partial version that the restart cleared); {} versions at the last kill, {} at the end",
        started.elapsed().as_secs_f64(),
        stats.publish_kills,
        stats.partials_left,
        stats.latest_at_last_kill + 1,
        final_latest + 1,
    );
}

#[derive(Debug, Default)]
struct Stats {
    publish_kills: usize,
    partials_left: usize,
    latest_at_last_kill: u64,
}

/// A coordinator that never finishes by itself: it waits for two of the three nodes, takes
/// every connected node into each round, and never gives up on abandoned rounds.
fn coordinator_config(port: u16) -> String {
    format!(
        r#"
[federation]
name = "crash-test"

[server]
listen = "127.0.0.1:{port}"

[store]
dir = "store"

[model]
architecture = "logistic_regression"
features = 30
classes = 2
init_seed = 7

[rounds]
total = 1000000
min_nodes = 2
deadline_secs = 5
max_consecutive_abandoned = 1000000

[training]
learning_rate = 1.0
local_epochs = 0.5
expected_batch_size = 24

[privacy]
dp = "on"
clip_norm = 1.0
noise_multiplier = 1.0

# Secure aggregation, with short stages: a node that lost the coordinator mid-round rejoins
# within a second or two.
[aggregation]
stage_deadline_secs = 2
"#
    )
}

/// Node `index` on its shard. About 150 training rows give a sampling rate near 0.16, under
/// the default limit of 0.25; the budget is large enough for the hundreds of rounds the test
/// runs. The privacy ledger lives next to the shard, in the sandbox.
fn node_config(index: usize, port: u16) -> String {
    format!(
        r#"
[node]
id = "site-{index}"

[coordinator]
address = "http://127.0.0.1:{port}"
max_backoff_secs = 1

[data]
path = "node-{index}.csv"
schema = "{SCHEMA}"
split_seed = {index}

[privacy]
epsilon = 100000.0
delta = 1e-5
"#
    )
}

/// Deals the bundled dataset's rows to the nodes in turn; writes `node-K.csv` and the schema.
fn write_shards(dir: &Path) {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data");
    let mut text = String::new();
    GzDecoder::new(File::open(data.join(DATASET)).expect("bundled dataset"))
        .read_to_string(&mut text)
        .expect("bundled dataset is gzip text");
    let mut lines = text.lines();
    let header = lines.next().expect("dataset has a header");
    let mut shards = vec![format!("{header}\n"); NODES];
    for (i, row) in lines.enumerate() {
        shards[i % NODES].push_str(row);
        shards[i % NODES].push('\n');
    }
    for (node, shard) in shards.iter().enumerate() {
        fs::write(dir.join(format!("node-{node}.csv")), shard).expect("write shard");
    }
    fs::copy(data.join(SCHEMA), dir.join(SCHEMA)).expect("copy schema");
}

/// A loopback port nothing listens on now: one the system hands out, released at once. The
/// coordinator binds it again on every start.
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("bound address").port()
}

/// Checks the store as a crash left it (no coordinator running) and returns its latest
/// version. See the module documentation for what is checked.
fn check_store(store: &Path, kill: usize) -> u64 {
    let opened = ModelStore::open_read_only(store)
        .unwrap_or_else(|e| panic!("after kill {kill}: the store does not open: {e}"));
    let entries = opened.list();
    assert!(!entries.is_empty(), "after kill {kill}: no version 0");
    for entry in &entries {
        if let VersionStatus::Damaged(cause) = &entry.status {
            panic!(
                "after kill {kill}: version {} is damaged: {cause}",
                entry.version
            );
        }
    }
    let latest = entries.len() as u64 - 1;

    let mut names: Vec<String> = fs::read_dir(store.join("versions"))
        .expect("versions directory")
        .map(|entry| {
            entry
                .expect("directory entry")
                .file_name()
                .to_string_lossy()
                .into()
        })
        .filter(|name: &String| !name.starts_with(".partial-"))
        .collect();
    names.sort();
    let dense: Vec<String> = (0..=latest).map(|v| format!("{v:06}")).collect();
    assert_eq!(
        names, dense,
        "after kill {kill}: version directories are not dense"
    );

    let mut previous_round = None;
    for version in 0..=latest {
        let dir = store.join("versions").join(format!("{version:06}"));
        let text = fs::read_to_string(dir.join("manifest.json"))
            .unwrap_or_else(|e| panic!("after kill {kill}: manifest of {version}: {e}"));
        let manifest: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("after kill {kill}: manifest of {version}: {e}"));
        let weights = fs::read(dir.join("weights.safetensors"))
            .unwrap_or_else(|e| panic!("after kill {kill}: weights of {version}: {e}"));
        let parent = version.checked_sub(1).map_or(Value::Null, Value::from);
        assert_eq!(manifest["version"], version, "after kill {kill}: {text}");
        assert_eq!(manifest["parent"], parent, "after kill {kill}: {text}");
        assert_eq!(
            manifest["weights_sha256"],
            hex::encode(Sha256::digest(&weights)),
            "after kill {kill}: version {version}'s weights do not match its manifest"
        );
        let round = manifest["round"].as_u64().expect("round is a number");
        assert!(
            previous_round.is_none_or(|p| round > p),
            "after kill {kill}: version {version} has round {round}, not after {previous_round:?}"
        );
        previous_round = Some(round);
    }
    latest
}

/// Names of the partial versions under `versions/`.
fn partial_versions(store: &Path) -> Vec<String> {
    let Ok(listing) = fs::read_dir(store.join("versions")) else {
        return Vec::new();
    };
    listing
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with(".partial-"))
        .collect()
}

/// Waits, polling every millisecond, until a publish is in progress; gives up after `limit`.
fn wait_for_publish(store: &Path, limit: Duration) -> bool {
    let give_up = Instant::now() + limit;
    while Instant::now() < give_up {
        if !partial_versions(store).is_empty() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    false
}

/// Waits until version `wanted` exists; returns the latest version then.
fn wait_for_version(store: &Path, wanted: u64, deadline: Instant) -> u64 {
    loop {
        let latest = fs::read_dir(store.join("versions"))
            .expect("versions directory")
            .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u64>().ok())
            .max()
            .unwrap_or(0);
        if latest >= wanted {
            return latest;
        }
        assert!(
            Instant::now() < deadline,
            "training did not continue after the last restart: version {latest}, waiting for \
             {wanted}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SplitMix64 (Steele, Lea, Flood 2014): a tiny seeded generator, enough to pick moments.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n`; the modulo bias is irrelevant for picking delays.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The test's temporary directory and the processes running in it, each logging to
/// `<name>.stdout` and `<name>.stderr` there. The coordinator's runs are numbered
/// (`coordinator-1`, `coordinator-2`, ...). Dropping it kills every child still running and,
/// when the test is failing, prints the logs.
#[derive(Debug)]
struct Sandbox {
    children: Vec<(String, Child)>,
    coordinator_runs: usize,
    dir: TempDir,
}

/// How often waits look again.
const POLL: Duration = Duration::from_millis(10);

impl Sandbox {
    fn new() -> Self {
        Sandbox {
            children: Vec::new(),
            coordinator_runs: 0,
            dir: TempDir::new().expect("temporary directory"),
        }
    }

    fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn spawn(&mut self, name: &str, mut command: Command) {
        let log = |stream: &str| {
            File::create(self.dir().join(format!("{name}.{stream}"))).expect("create log file")
        };
        command
            .current_dir(self.dir())
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log("stdout"))
            .stderr(log("stderr"));
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        self.children.push((name.to_string(), child));
    }

    fn child(&mut self, name: &str) -> &mut Child {
        self.children
            .iter_mut()
            .find(|(n, _)| n == name)
            .map(|(_, child)| child)
            .unwrap_or_else(|| panic!("no process named {name}"))
    }

    fn is_running(&mut self, name: &str) -> bool {
        matches!(self.child(name).try_wait(), Ok(None))
    }

    fn coordinator_name(&self) -> String {
        format!("coordinator-{}", self.coordinator_runs)
    }

    /// Starts the next run of the coordinator and waits until it listens, which it only does
    /// once its store has opened. A start that fails to bind (the port not yet released by the
    /// killed run) is retried.
    fn start_coordinator(&mut self, binaries: &Binaries, deadline: Instant) {
        let give_up = (Instant::now() + START_TIMEOUT).min(deadline);
        loop {
            self.coordinator_runs += 1;
            let name = self.coordinator_name();
            let mut serve = Command::new(&binaries.coordinator);
            // Plaintext on purpose: this test is about the store, not the transport.
            serve.args(["serve", "--insecure", "--config", "coordinator.toml"]);
            self.spawn(&name, serve);

            loop {
                let stdout = fs::read_to_string(self.dir().join(format!("{name}.stdout")))
                    .unwrap_or_default();
                if stdout.contains("listening on 127.0.0.1:") {
                    return;
                }
                if let Ok(Some(status)) = self.child(&name).try_wait() {
                    assert!(
                        Instant::now() < give_up,
                        "{name} exited with {status} before listening"
                    );
                    std::thread::sleep(Duration::from_millis(100));
                    break;
                }
                assert!(Instant::now() < give_up, "{name} did not listen in time");
                std::thread::sleep(POLL);
            }
        }
    }

    /// SIGKILLs the current coordinator run and reaps it.
    fn kill_coordinator(&mut self) {
        let name = self.coordinator_name();
        let child = self.child(&name);
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{name} exited by itself with {status} before it was killed");
        }
        child.kill().expect("SIGKILL the coordinator");
        child.wait().expect("reap the coordinator");
    }

    /// The last `lines` lines of a log.
    fn tail(&self, name: &str, stream: &str, lines: usize) -> String {
        let path = self.dir().join(format!("{name}.{stream}"));
        let text = fs::read_to_string(&path).unwrap_or_else(|e| format!("({e})"));
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            // Both fail only for a child already exited and reaped.
            let _ = child.kill();
            let _ = child.wait();
        }
        if !std::thread::panicking() {
            return;
        }
        let first_run = self.coordinator_runs.saturating_sub(1).max(1);
        for run in first_run..=self.coordinator_runs {
            for stream in ["stdout", "stderr"] {
                let name = format!("coordinator-{run}");
                eprintln!(
                    "----- {name} {stream} -----\n{}",
                    self.tail(&name, stream, 200)
                );
            }
        }
        for node in 0..NODES {
            let name = format!("node-{node}");
            eprintln!(
                "----- {name} stderr (end) -----\n{}",
                self.tail(&name, "stderr", 40)
            );
        }
    }
}
