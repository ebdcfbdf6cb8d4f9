//! The operator's CLI against a coordinator served in-process on a loopback port: the real
//! `athanor-coordinator` binary is run for each command, and its `--json` output is checked
//! field by field against the shapes documented in its `admin_cli` module, so a change to them
//! shows here. Also: pausing and resuming rounds, exports that match the store, and the budget
//! computed offline agreeing with the running coordinator's.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Output;

use athanor_coordinator::store::{self, ModelStore};
use serde_json::Value;
use support::{CONFIG, NUM_PARAMS, Served, join, submit_honest, task, within};

/// The test config with node-level DP on: a generous budget and a fixed noise seed.
fn config_with_node_dp() -> String {
    format!(
        "{CONFIG}
    [node_privacy]
    update_clip_norm = 1.0
    noise_multiplier = 1.0
    epsilon = 50.0
    insecure_noise_seed = 3
"
    )
}

/// Runs the CLI with `args`; a blocking task, so the in-process server keeps serving. The
/// in-process server is plaintext, so the CLI connects with `--insecure`.
async fn cli(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let run = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_athanor-coordinator"))
            .arg("--insecure")
            .args(&args)
            .env("NO_COLOR", "1")
            .output()
            .expect("run athanor-coordinator")
    });
    within(run, "the CLI to exit").await.expect("CLI task")
}

/// Runs the CLI, expects success, and returns its stdout.
async fn cli_ok(args: &[&str]) -> String {
    let output = cli(args).await;
    assert!(
        output.status.success(),
        "athanor-coordinator {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("stdout is UTF-8")
}

/// Runs the CLI with `--json` and parses its single line of output.
async fn cli_json(args: &[&str]) -> Value {
    let mut args = args.to_vec();
    args.push("--json");
    let stdout = cli_ok(&args).await;
    assert_eq!(
        stdout.lines().count(),
        1,
        "--json printed more than one line: {stdout}"
    );
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

/// The JSON type of a value, in the module documentation's words.
fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_u64() => "u64",
        Value::Number(_) => "f64",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Checks that `value` is an object with exactly the fields of `shape`, each of one of the
/// `|`-separated kinds given. An `f64` field may print as a whole number only if it says so.
fn assert_shape(value: &Value, shape: &[(&str, &str)], what: &str) {
    let Value::Object(fields) = value else {
        panic!("{what} is not an object: {value}");
    };
    let names: Vec<&str> = fields.keys().map(String::as_str).collect();
    let mut expected: Vec<&str> = shape.iter().map(|(name, _)| *name).collect();
    expected.sort_unstable();
    assert_eq!(names, expected, "{what}'s fields: {value}");
    for (name, kinds) in shape {
        let got = kind(&fields[*name]);
        assert!(
            kinds.split('|').any(|k| k == got),
            "{what}.{name} is {got}, documented as {kinds}: {value}"
        );
    }
}

const BUDGET_SHAPE: &[(&str, &str)] = &[
    ("epsilon_spent", "f64"),
    ("epsilon_budget", "f64"),
    ("epsilon_left", "f64"),
    ("delta", "f64"),
    ("accountant", "string"),
    ("noise_multiplier", "f64"),
    ("update_clip_norm", "f64"),
    ("rounds", "u64"),
    ("version", "u64"),
];

/// Runs one round with two nodes and waits until version 1 is published; returns the nodes'
/// clients and sessions, for rounds to come.
async fn one_round(
    served: &Served,
) -> Vec<(
    athanor_proto::v1::federation_client::FederationClient<tonic::transport::Channel>,
    String,
)> {
    let mut published = served.coordinator.subscribe();
    let mut nodes = Vec::new();
    for node in ["clinic-a", "clinic-b"] {
        let mut client = served.federation().await;
        let session = join(&mut client, node).await;
        nodes.push((client, session));
    }
    for (client, session) in &mut nodes {
        let task = task(client, session).await;
        submit_honest(client, session, &task, 0.25).await;
    }
    let manifest = within(published.recv(), "version 1")
        .await
        .expect("published");
    assert_eq!(manifest.version, 1);
    nodes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_budget_and_nodes_print_their_documented_json() {
    let served = Served::start_from(&config_with_node_dp(), |_| {}).await;
    let _nodes = one_round(&served).await;
    let address = served.address.as_str();

    let status = cli_json(&["status", "--address", address]).await;
    assert_shape(
        &status,
        &[
            ("federation", "string"),
            ("stage", "string"),
            ("round", "u64|null"),
            ("paused", "bool"),
            ("connected_nodes", "u64"),
            ("latest_version", "u64|null"),
            ("rounds_completed", "u64"),
            ("rounds_abandoned", "u64"),
            ("rounds_total", "u64"),
            ("finished_reason", "string|null"),
            ("damaged_versions", "array"),
            ("node_privacy", "object|null"),
        ],
        "status",
    );
    assert_eq!(status["federation"], "service-tests");
    assert_eq!(status["latest_version"], 1);
    assert_eq!(status["rounds_completed"], 1);
    assert_eq!(status["connected_nodes"], 2);
    assert_eq!(status["paused"], false);
    assert_shape(&status["node_privacy"], BUDGET_SHAPE, "status.node_privacy");
    assert_eq!(status["node_privacy"]["rounds"], 1);
    assert_eq!(status["node_privacy"]["version"], 1);

    let budget = cli_json(&["budget", "--address", address]).await;
    assert_shape(&budget, &[("node_privacy", "object")], "budget");
    assert_eq!(budget["node_privacy"], status["node_privacy"]);
    let spent = budget["node_privacy"]["epsilon_spent"]
        .as_f64()
        .expect("spent");
    let left = budget["node_privacy"]["epsilon_left"]
        .as_f64()
        .expect("left");
    assert!(
        spent > 0.0 && (spent + left - 50.0).abs() < 1e-9,
        "{budget}"
    );

    // Computed from the config and the store alone, it is the same figure.
    let config_dir = tempfile::tempdir().expect("temporary directory");
    let config_file = config_dir.path().join("coordinator.toml");
    let store_dir = served.store_dir.path().display().to_string();
    let text = config_with_node_dp().replace("replaced by the test", &store_dir);
    std::fs::write(&config_file, text).expect("write config");
    let config_arg = config_file.display().to_string();
    let offline = cli_json(&["budget", "--config", &config_arg]).await;
    assert_eq!(offline, budget);

    let nodes = cli_json(&["nodes", "list", "--address", address]).await;
    let nodes = nodes.as_array().expect("nodes list prints an array");
    let names: Vec<&str> = nodes.iter().map(|n| n["node"].as_str().unwrap()).collect();
    assert_eq!(names, ["clinic-a", "clinic-b"]);
    for node in nodes {
        assert_shape(
            node,
            &[
                ("node", "string"),
                ("connected", "bool"),
                ("session_age_ms", "u64"),
                ("last_seen_ms", "u64"),
                ("rounds_contributed", "u64"),
                ("round_state", "string|null"),
                ("dataset", "object|null"),
            ],
            "node",
        );
        assert_shape(
            &node["dataset"],
            &[("sha256", "string"), ("rows", "u64")],
            "dataset",
        );
        assert_eq!(node["rounds_contributed"], 1);
        assert_eq!(node["connected"], true);
    }

    // And the text forms say the same things to people.
    let text = cli_ok(&["status", "--address", address]).await;
    assert!(
        text.contains("service-tests") && text.contains("latest 1"),
        "{text}"
    );
    let text = cli_ok(&["budget", "--address", address]).await;
    assert!(text.contains("budget  epsilon 50"), "{text}");
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_lets_the_open_round_finish_and_opens_no_new_one_until_resumed() {
    let served = Served::start(|_| {}).await;
    let address = served.address.as_str();
    let mut published = served.coordinator.subscribe();
    let mut joined = Vec::new();
    for node in ["clinic-a", "clinic-b"] {
        let mut client = served.federation().await;
        let session = join(&mut client, node).await;
        joined.push((client, session));
    }
    let mut nodes = Vec::new();
    for (mut client, session) in joined {
        let task = task(&mut client, &session).await;
        nodes.push((client, session, task));
    }

    // Paused with round 1 open: it still runs to its end and publishes.
    let paused = cli_json(&["rounds", "pause", "--address", address]).await;
    assert_shape(
        &paused,
        &[
            ("paused", "bool"),
            ("was_paused", "bool"),
            ("open_round", "u64|null"),
        ],
        "rounds pause",
    );
    assert_eq!(
        paused,
        serde_json::json!({"paused": true, "was_paused": false, "open_round": 1})
    );
    let status = cli_json(&["status", "--address", address]).await;
    assert_eq!(
        (&status["stage"], &status["paused"]),
        (&"training".into(), &true.into())
    );
    for (client, session, task) in &mut nodes {
        submit_honest(client, session, task, 0.5).await;
    }
    let manifest = within(published.recv(), "version 1")
        .await
        .expect("published");
    assert_eq!(manifest.version, 1);

    // No round 2 while paused.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let status = cli_json(&["status", "--address", address]).await;
    assert_eq!(status["stage"], "paused", "{status}");
    assert_eq!(status["round"], Value::Null, "{status}");
    let again = cli_json(&["rounds", "pause", "--address", address]).await;
    assert_eq!(again["was_paused"], true);

    let resumed = cli_json(&["rounds", "resume", "--address", address]).await;
    assert_shape(
        &resumed,
        &[("paused", "bool"), ("was_paused", "bool")],
        "rounds resume",
    );
    assert_eq!(
        resumed,
        serde_json::json!({"paused": false, "was_paused": true})
    );
    let (client, session, _) = &mut nodes[0];
    let next = task(client, session).await;
    assert_eq!((next.round, next.model_version), (2, 1));
    let status = cli_json(&["status", "--address", address]).await;
    assert_eq!(
        (&status["stage"], &status["paused"]),
        (&"training".into(), &false.into())
    );
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_commands_agree_with_the_store_through_the_coordinator_and_directly() {
    let served = Served::start(|_| {}).await;
    let _nodes = one_round(&served).await;
    let address = served.address.as_str();
    let store_arg = served.store_dir.path().display().to_string();

    // The listing: one manifest per line, the same whether asked of the coordinator or read
    // from the directory.
    let remote = cli_ok(&["versions", "list", "--json", "--address", address]).await;
    let local = cli_ok(&["versions", "list", "--json", "--store", &store_arg]).await;
    assert_eq!(remote, local);
    let store = ModelStore::open_read_only(served.store_dir.path()).expect("store opens");
    let lines: Vec<Value> = remote
        .lines()
        .map(|line| serde_json::from_str(line).expect("JSON line"))
        .collect();
    let manifests: Vec<Value> = (0..=1)
        .map(|v| serde_json::to_value(store.manifest(v).expect("manifest")).unwrap())
        .collect();
    assert_eq!(lines, manifests);

    let shown = cli_json(&["versions", "show", "1", "--address", address]).await;
    assert_eq!(shown, manifests[1]);
    let shown = cli_json(&["versions", "show", "1", "--store", &store_arg]).await;
    assert_eq!(shown, manifests[1]);
    let text = cli_ok(&["versions", "show", "1", "--address", address]).await;
    assert!(
        text.contains("(parent 0, round 1)") && text.contains("clinic-a"),
        "{text}"
    );

    // Exports: the safetensors file byte for byte, the npy file the same parameters.
    let out_dir = tempfile::tempdir().expect("temporary directory");
    let safetensors = out_dir.path().join("v1.safetensors");
    let path = safetensors.display().to_string();
    let report = cli_json(&[
        "versions",
        "export",
        "1",
        "--format",
        "safetensors",
        "--out",
        &path,
        "--address",
        address,
    ])
    .await;
    assert_shape(
        &report,
        &[
            ("version", "u64"),
            ("format", "string"),
            ("out", "string"),
            ("bytes", "u64"),
            ("weights_sha256", "string"),
            ("num_params", "u64"),
            ("tensors", "array"),
        ],
        "versions export",
    );
    for tensor in report["tensors"].as_array().expect("tensors") {
        assert_shape(
            tensor,
            &[("name", "string"), ("shape", "array"), ("offset", "u64")],
            "tensor",
        );
    }
    assert_eq!(report["weights_sha256"], manifests[1]["weights_sha256"]);
    let stored = std::fs::read(
        served
            .store_dir
            .path()
            .join("versions/000001/weights.safetensors"),
    )
    .expect("stored weights");
    assert_eq!(std::fs::read(&safetensors).expect("exported file"), stored);

    let (_, params) = store.load(1).expect("version 1 loads");
    for source in [["--address", address], ["--store", store_arg.as_str()]] {
        let npy = out_dir.path().join(format!("v1{}.npy", source[0]));
        let path = npy.display().to_string();
        let mut args = vec!["versions", "export", "1", "--format", "npy", "--out", &path];
        args.extend(source);
        let report = cli_json(&args).await;
        assert_eq!(report["num_params"], NUM_PARAMS);
        assert_eq!(read_npy_f32(&npy), params, "npy exported via {}", source[0]);
    }

    // An existing file is kept unless --force is given.
    let refused = cli(&[
        "versions",
        "export",
        "1",
        "--format",
        "npy",
        "--out",
        &path,
        "--address",
        address,
    ])
    .await;
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("already exists"));
    cli_ok(&[
        "versions",
        "export",
        "1",
        "--format",
        "npy",
        "--out",
        &path,
        "--force",
        "--address",
        address,
    ])
    .await;
    served.stop().await;
}

/// Parses a one-dimensional little-endian `f32` `.npy` file, checking its header.
fn read_npy_f32(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).expect("npy file");
    assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00", "npy magic and version");
    let header_len = usize::from(u16::from_le_bytes([bytes[8], bytes[9]]));
    let data_start = 10 + header_len;
    assert_eq!(data_start % 64, 0, "data is aligned to 64 bytes");
    let header = std::str::from_utf8(&bytes[10..data_start]).expect("ASCII header");
    let count = (bytes.len() - data_start) / 4;
    assert!(
        header.starts_with("{'descr': '<f4', 'fortran_order': False, "),
        "{header}"
    );
    assert!(header.contains(&format!("'shape': ({count},)")), "{header}");
    assert!(header.ends_with('\n'));
    bytes[data_start..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_version_is_listed_with_its_reason() {
    let served = Served::start(|_| {}).await;
    let _nodes = one_round(&served).await;
    let store_arg = served.store_dir.path().display().to_string();
    let weights = served
        .store_dir
        .path()
        .join("versions/000000/weights.safetensors");
    let mut bytes = std::fs::read(&weights).expect("weights");
    bytes[20] ^= 1;
    std::fs::write(&weights, bytes).expect("rewrite weights");

    let listed = cli_ok(&["versions", "list", "--json", "--store", &store_arg]).await;
    let first: BTreeMap<String, Value> =
        serde_json::from_str(listed.lines().next().expect("a line")).expect("JSON");
    assert_eq!(first.keys().collect::<Vec<_>>(), ["damaged", "version"]);
    assert!(
        first["damaged"].as_str().unwrap().contains("sha256"),
        "{first:?}"
    );
    let text = cli_ok(&["versions", "list", "--store", &store_arg]).await;
    assert!(text.contains("DAMAGED"), "{text}");
    let export = cli(&[
        "versions",
        "export",
        "0",
        "--format",
        "npy",
        "--out",
        "/nonexistent/never.npy",
        "--store",
        &store_arg,
    ])
    .await;
    assert!(!export.status.success());
    let stderr = String::from_utf8_lossy(&export.stderr);
    assert!(stderr.contains("sha256"), "{stderr}");

    // Reading the directory never touched it: no partial file, version 1 still valid.
    let store = ModelStore::open_read_only(served.store_dir.path()).expect("store opens");
    assert!(store.manifest(1).is_ok());
    assert!(matches!(
        store.manifest(0),
        Err(store::StoreError::Damaged { .. })
    ));
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_that_does_not_answer_is_named_in_the_error() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("an ephemeral port");
    let address = format!("http://{closed}");
    let output = cli(&["status", "--address", &address]).await;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&address) && stderr.to_lowercase().contains("refused"),
        "{stderr}"
    );
    let output = cli(&["status", "--address", "127.0.0.1:1"]).await;
    assert!(String::from_utf8_lossy(&output.stderr).contains("must start with http://"));
}
