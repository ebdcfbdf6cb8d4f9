//! `athanor-node fetch` against a real coordinator over mutual TLS, with real processes on
//! loopback: two nodes train while an operator fetches with one node's own configuration
//! (its certificate), and training goes on undisturbed; the fetched files are byte for byte
//! what `versions export` writes; the operator's pause outlives a restart of the coordinator;
//! an existing file is not overwritten without `--force`; an unknown version is a clear
//! error.
//!
//! Processes run in a [`Sandbox`] that kills them when the test ends and prints their logs if
//! it fails; every wait is bounded.

mod support;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{
    SCHEMA, Sandbox, binaries, certs, coordinator_command, run_ok, start_coordinator, whole_lines,
    write_shards,
};

/// Longest the test may take; it needs a few seconds.
const TEST_TIMEOUT: Duration = Duration::from_secs(120);

/// clinic-a's configuration with the restarted coordinator's address.
const MOVED_CONFIG: &str = "clinic-a/restarted.toml";

#[test]
fn fetched_versions_are_the_published_files_and_do_not_disturb_training() {
    let binaries = binaries();
    let mut sandbox = Sandbox::new();
    let deadline = Instant::now() + TEST_TIMEOUT;
    let dir = sandbox.dir().to_path_buf();
    write_shards(&dir);

    // A federation of two nodes with far more rounds than the test waits for.
    run_ok(
        &mut sandbox,
        "init",
        certs(&["init", "--federation", "fetch", "--out", "ca"]),
        deadline,
    );
    fs::write(dir.join("coordinator.toml"), COORDINATOR_CONFIG).expect("config");
    let address = start_coordinator(
        &mut sandbox,
        "coordinator",
        &["serve", "--config", "coordinator.toml"],
    );
    let https = format!("https://{address}");
    for node in ["clinic-a", "clinic-b"] {
        let issue = certs(&[
            "issue",
            "--ca-dir",
            "ca",
            "--node",
            node,
            "--out",
            node,
            "--coordinator-address",
            &https,
        ]);
        run_ok(&mut sandbox, &format!("issue-{node}"), issue, deadline);
        let config = dir.join(node).join("node.toml");
        let template = fs::read_to_string(&config).expect("certs issue writes node.toml");
        let filled = template
            .replace(
                "FILL-IN-data.csv",
                &dir.join(format!("{node}.csv")).display().to_string(),
            )
            .replace(
                "FILL-IN-schema.toml",
                &dir.join(SCHEMA).display().to_string(),
            )
            .replace("epsilon = 0.0", "epsilon = 1000.0");
        fs::write(&config, filled).expect("fill in node.toml");
        let mut run = Command::new(&binaries.node);
        run.args(["run", "--config"]).arg(&config);
        sandbox.spawn(node, run);
    }
    wait_for_version(&dir, 2, deadline);

    // While clinic-a trains, its operator fetches with clinic-a's own configuration.
    let fetched = fetch(
        &mut sandbox,
        "fetch-1",
        "clinic-a/node.toml",
        &["--version", "1", "--out", "v1.safetensors"],
        deadline,
    );
    assert_eq!(fetched, 1);
    let exported = export(&mut sandbox, "export-1", &https, 1, "safetensors", deadline);
    assert_files_equal(&dir, "v1.safetensors", &exported);
    let fetched = fetch(
        &mut sandbox,
        "fetch-latest",
        "clinic-a/node.toml",
        &["--format", "npy", "--out", "latest.npy"],
        deadline,
    );
    assert!(fetched >= 2, "the latest version fetched is {fetched}");
    let exported = export(
        &mut sandbox,
        "export-latest",
        &https,
        fetched,
        "npy",
        deadline,
    );
    assert_files_equal(&dir, "latest.npy", &exported);

    // Training went on with both nodes, neither of which lost its session to the fetches.
    let later = wait_for_version(&dir, fetched + 2, deadline);
    let manifest = manifest(&dir, later);
    assert_eq!(manifest["contributors"], 2, "{manifest}");
    let log = sandbox.log("coordinator", "stderr");
    assert!(log.contains("observer joined"), "{log}");
    assert!(
        !log.contains("unknown session") && !log.contains("request refused"),
        "a session was knocked out or refused: {log}"
    );

    // Paused, stopped hard and started again, the coordinator is still paused.
    let operator = ["--address", https.as_str(), "--tls-dir", "ca"];
    let mut pause = coordinator_command(&["rounds", "pause"]);
    pause.args(operator);
    run_ok(&mut sandbox, "pause", pause, deadline);
    wait_for_stage(&mut sandbox, "paused", &https, "paused", deadline);
    let coordinator = sandbox.child("coordinator");
    coordinator.kill().expect("stop the coordinator");
    coordinator.wait().expect("reap the coordinator");

    let first_https = https;
    let address = start_coordinator(
        &mut sandbox,
        "restarted",
        &["serve", "--config", "coordinator.toml"],
    );
    let https = format!("https://{address}");
    let log = sandbox.log("restarted", "stderr");
    assert!(
        log.contains("starting paused"),
        "not paused at start: {log}"
    );
    assert!(
        log.contains("server momentum resumed"),
        "momentum lost: {log}"
    );
    let status = wait_for_stage(&mut sandbox, "restarted", &https, "paused", deadline);
    assert_eq!(status["paused"], true, "{status}");
    let latest = status["latest_version"].as_u64().expect("a latest version");

    // Against the restarted coordinator: the latest version, to the default file name.
    let moved = fs::read_to_string(dir.join("clinic-a/node.toml"))
        .expect("node.toml")
        .replace(&first_https, &https);
    // Next to the original, whose TLS file names are relative to its directory.
    fs::write(dir.join(MOVED_CONFIG), moved).expect("the moved node config");
    let fetched = fetch(&mut sandbox, "fetch-default", MOVED_CONFIG, &[], deadline);
    assert_eq!(fetched, latest);
    let exported = export(
        &mut sandbox,
        "export-default",
        &https,
        latest,
        "safetensors",
        deadline,
    );
    assert_files_equal(&dir, &format!("model-v{latest}.safetensors"), &exported);

    // An existing file is left alone unless --force says otherwise.
    fs::write(dir.join("taken.npy"), b"an earlier file").expect("write a file");
    let refused = fetch_fails(
        &mut sandbox,
        "fetch-taken",
        &["--format", "npy", "--out", "taken.npy"],
        deadline,
    );
    assert!(
        refused.contains("taken.npy already exists") && refused.contains("--force"),
        "{refused}"
    );
    assert_eq!(
        fs::read(dir.join("taken.npy")).expect("taken.npy"),
        b"an earlier file"
    );
    let forced = fetch(
        &mut sandbox,
        "fetch-force",
        MOVED_CONFIG,
        &["--format", "npy", "--out", "taken.npy", "--force"],
        deadline,
    );
    let exported = export(
        &mut sandbox,
        "export-force",
        &https,
        forced,
        "npy",
        deadline,
    );
    assert_files_equal(&dir, "taken.npy", &exported);

    // A version that was never published.
    let missing = fetch_fails(
        &mut sandbox,
        "fetch-missing",
        &["--version", "999999", "--out", "missing.safetensors"],
        deadline,
    );
    assert!(
        missing.contains("fetching version 999999") && missing.contains("version 999999 not found"),
        "{missing}"
    );
    assert!(!dir.join("missing.safetensors").exists());
    let leftovers: Vec<String> = fs::read_dir(&dir)
        .expect("sandbox listing")
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| name.ends_with(".partial"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

/// A coordinator on an ephemeral loopback port over the CA directory's files, waiting for two
/// nodes and running more rounds than any test waits for.
const COORDINATOR_CONFIG: &str = r#"
[federation]
name = "fetch-test"

[server]
listen = "127.0.0.1:0"

[server.tls]
ca = "ca/ca.crt"
cert = "ca/coordinator.crt"
key = "ca/coordinator.key"

[store]
dir = "store"

[model]
architecture = "logistic_regression"
features = 30
classes = 2
init_seed = 7

[rounds]
total = 100000
min_nodes = 2
deadline_secs = 60
max_consecutive_abandoned = 3

[strategy]
server_momentum = 0.5

[training]
learning_rate = 1.0
local_epochs = 0.2
expected_batch_size = 24

[privacy]
dp = "on"
clip_norm = 1.0
noise_multiplier = 1.0
"#;

/// Runs `athanor-node fetch --config CONFIG ARGS` to success and returns the version it says
/// it fetched.
fn fetch(sandbox: &mut Sandbox, name: &str, config: &str, args: &[&str], deadline: Instant) -> u64 {
    let mut command = Command::new(&binaries().node);
    command.args(["fetch", "--config", config]).args(args);
    run_ok(sandbox, name, command, deadline);
    let out = sandbox.log(name, "stdout");
    whole_lines(&out)
        .find_map(|line| line.strip_prefix("fetched version "))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("{name} does not say which version it fetched: {out}"))
}

/// Runs `athanor-node fetch --config MOVED_CONFIG ARGS`, insists that it fails, and returns
/// what it said on standard error.
fn fetch_fails(sandbox: &mut Sandbox, name: &str, args: &[&str], deadline: Instant) -> String {
    let mut command = Command::new(&binaries().node);
    command.args(["fetch", "--config", MOVED_CONFIG]).args(args);
    sandbox.spawn(name, command);
    let status = sandbox.wait_for_exit(name, deadline);
    assert!(!status.success(), "{name} succeeded");
    sandbox.log(name, "stderr")
}

/// Exports `version` through the admin service at `address` with the operator's certificate,
/// and returns the file's name.
fn export(
    sandbox: &mut Sandbox,
    name: &str,
    address: &str,
    version: u64,
    format: &str,
    deadline: Instant,
) -> String {
    let out = format!("{name}.{format}");
    let version = version.to_string();
    let command = coordinator_command(&[
        "versions",
        "export",
        &version,
        "--format",
        format,
        "--out",
        &out,
        "--address",
        address,
        "--tls-dir",
        "ca",
    ]);
    run_ok(sandbox, name, command, deadline);
    out
}

fn assert_files_equal(dir: &Path, fetched: &str, exported: &str) {
    let read = |name: &str| fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(
        read(fetched) == read(exported),
        "{fetched} differs from {exported}"
    );
}

fn manifest(dir: &Path, version: u64) -> Value {
    let path = dir.join(format!("store/versions/{version:06}/manifest.json"));
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("a manifest is JSON")
}

/// Waits until version `wanted` is published in the sandbox's store, and returns it.
fn wait_for_version(dir: &Path, wanted: u64, deadline: Instant) -> u64 {
    let path = dir.join(format!("store/versions/{wanted:06}/manifest.json"));
    while !path.is_file() {
        assert!(
            Instant::now() < deadline,
            "version {wanted} was not published in time"
        );
        std::thread::sleep(support::POLL_INTERVAL);
    }
    wanted
}

/// Waits until `status --json` at `address` reports `stage`, and returns the status. The
/// status commands run as processes named `LABEL-status-N`.
fn wait_for_stage(
    sandbox: &mut Sandbox,
    label: &str,
    address: &str,
    stage: &str,
    deadline: Instant,
) -> Value {
    for attempt in 0.. {
        let name = format!("{label}-status-{attempt}");
        let command =
            coordinator_command(&["status", "--json", "--address", address, "--tls-dir", "ca"]);
        run_ok(sandbox, &name, command, deadline);
        let status: Value =
            serde_json::from_str(&sandbox.log(&name, "stdout")).expect("status --json is JSON");
        if status["stage"] == stage {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "the coordinator did not reach stage {stage}: {status}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    unreachable!("the loop only ends by returning or failing")
}
