//! Mutual TLS between real processes over loopback, set up the way a newcomer would: `certs
//! init` creates the federation's CA, `certs issue` one bundle per node, the coordinator serves
//! with the CA's files and two nodes train with theirs. Then everyone who should be refused is:
//! a node of another federation, a node whose certificate another CA signed, a node without a
//! certificate, a node that dials plaintext, a revoked node, and a node's certificate used on
//! the admin service. Each refused side's log must say why in plain words, and so must the
//! coordinator's.
//!
//! Processes run in a [`Sandbox`] that kills them when the test ends and prints their logs if
//! it fails; every wait is bounded.

mod support;

use std::fs;
use std::process::Command;
use std::time::{Duration, Instant};

use support::{
    SCHEMA, Sandbox, binaries, certs, coordinator_command, run_ok, start_coordinator, whole_lines,
    write_shards,
};

/// Longest either test may take; each needs a few seconds.
const TEST_TIMEOUT: Duration = Duration::from_secs(90);

#[test]
fn two_nodes_provisioned_with_certs_train_over_mutual_tls() {
    let binaries = binaries();
    let mut sandbox = Sandbox::new();
    let deadline = Instant::now() + TEST_TIMEOUT;
    let dir = sandbox.dir().to_path_buf();
    write_shards(&dir);

    // The CA, the coordinator's certificate and an operator's, from nothing.
    run_ok(
        &mut sandbox,
        "init",
        certs(&["init", "--federation", "e2e", "--out", "ca"]),
        deadline,
    );
    assert!(
        sandbox.log("init", "stdout").contains("[server.tls]"),
        "certs init does not print the coordinator's [server.tls] section"
    );
    // Running it again would replace the CA: refused, and the key is untouched.
    let key = fs::read(dir.join("ca/ca.key")).expect("ca.key");
    sandbox.spawn(
        "init-again",
        certs(&["init", "--federation", "e2e", "--out", "ca"]),
    );
    assert!(!sandbox.wait_for_exit("init-again", deadline).success());
    assert!(
        sandbox
            .log("init-again", "stderr")
            .contains("never overwritten")
    );
    assert_eq!(fs::read(dir.join("ca/ca.key")).expect("ca.key"), key);

    fs::write(dir.join("coordinator.toml"), coordinator_config(2, 2, "")).expect("config");
    let address = start_coordinator(
        &mut sandbox,
        "coordinator",
        &["serve", "--config", "coordinator.toml"],
    );

    // Each node gets its bundle and template, filled in as its operator would.
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
            &format!("https://{address}"),
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
            .replace("epsilon = 0.0", "epsilon = 20.0");
        fs::write(&config, filled).expect("fill in node.toml");

        let mut run = Command::new(&binaries.node);
        run.args(["run", "--config"]).arg(&config);
        sandbox.spawn(node, run);
    }

    for node in ["clinic-a", "clinic-b"] {
        let status = sandbox.wait_for_exit(node, deadline);
        assert!(status.success(), "{node} exited with {status}");
        let summary = sandbox.log(node, "stdout");
        assert!(
            summary.contains("2 rounds trained, 0 declined"),
            "{node} did not train both rounds: {summary}"
        );
    }
    let status = sandbox.wait_for_exit("coordinator", deadline);
    assert!(status.success(), "coordinator exited with {status}");
    let log = sandbox.log("coordinator", "stderr");
    assert!(log.contains("listening (mutual TLS)"), "{log}");
    assert!(!log.contains("refused"), "a good node was refused: {log}");

    // The versions record both nodes, under the ids their certificates prove.
    let manifest = fs::read_to_string(dir.join("store/versions/000002/manifest.json"))
        .expect("version 2 is published");
    let manifest: serde_json::Value = serde_json::from_str(&manifest).expect("manifest is JSON");
    let mut nodes: Vec<&str> = manifest["dataset_fingerprints"]
        .as_array()
        .expect("fingerprints")
        .iter()
        .filter_map(|f| f["node"].as_str())
        .collect();
    nodes.sort_unstable();
    assert_eq!(nodes, ["clinic-a", "clinic-b"]);
}

#[test]
fn strangers_are_refused_and_told_why_in_plain_words() {
    let binaries = binaries();
    let mut sandbox = Sandbox::new();
    let deadline = Instant::now() + TEST_TIMEOUT;
    let dir = sandbox.dir().to_path_buf();
    write_shards(&dir);

    // This federation, another one, and bundles from each.
    run_ok(
        &mut sandbox,
        "init",
        certs(&["init", "--federation", "home", "--out", "ca"]),
        deadline,
    );
    run_ok(
        &mut sandbox,
        "init-other",
        certs(&["init", "--federation", "away", "--out", "other"]),
        deadline,
    );
    for (ca, node, out) in [
        ("ca", "clinic-a", "clinic-a"),
        ("ca", "clinic-revoked", "clinic-revoked"),
        ("other", "clinic-x", "clinic-x"),
    ] {
        let issue = certs(&["issue", "--ca-dir", ca, "--node", node, "--out", out]);
        run_ok(&mut sandbox, &format!("issue-{node}"), issue, deadline);
    }

    // A coordinator that waits for more nodes than will come, so it keeps serving.
    let lists = "revoked_nodes = [\"clinic-revoked\"]";
    fs::write(
        dir.join("coordinator.toml"),
        coordinator_config(1000, 50, lists),
    )
    .expect("config");
    let address = start_coordinator(
        &mut sandbox,
        "coordinator",
        &["serve", "--config", "coordinator.toml"],
    );
    let https = format!("https://{address}");

    let cases: [(&str, &str, String, &[&str]); 5] = [
        (
            "another-federation",
            "clinic-x",
            tls_section("clinic-x/ca.crt", Some("clinic-x")),
            &["run"],
        ),
        (
            "signed-by-another-ca",
            "clinic-x",
            tls_section("ca/ca.crt", Some("clinic-x")),
            &["run"],
        ),
        (
            "no-certificate",
            "clinic-a",
            tls_section("ca/ca.crt", None),
            &["run"],
        ),
        (
            "plaintext",
            "clinic-a",
            String::new(),
            &["run", "--insecure"],
        ),
        (
            "revoked",
            "clinic-revoked",
            tls_section("clinic-revoked/ca.crt", Some("clinic-revoked")),
            &["run"],
        ),
    ];
    for (name, id, tls, args) in &cases {
        let address = if name == &"plaintext" {
            format!("http://{address}")
        } else {
            https.clone()
        };
        let config = format!("{name}.toml");
        fs::write(dir.join(&config), node_config(id, &address, name, tls)).expect("config");
        let mut run = Command::new(&binaries.node);
        run.args(*args).args(["--config", &config]);
        sandbox.spawn(name, run);
    }

    // Nodes whose handshake fails keep retrying, and every attempt says why.
    for (name, why) in [
        (
            "another-federation",
            "the coordinator's certificate is not signed by the CA this side trusts ([tls] ca)",
        ),
        (
            "signed-by-another-ca",
            "the coordinator does not trust this side's certificate ([tls] cert and key): it \
             was not issued by the federation's CA",
        ),
        (
            "no-certificate",
            "the coordinator requires a client certificate and this side presented none",
        ),
    ] {
        let line = sandbox.wait_for_log(name, "stderr", deadline, |log| {
            whole_lines(log)
                .find(|line| line.contains("cannot join the coordinator") && line.contains(why))
                .map(str::to_string)
        });
        assert!(
            line.contains(&https),
            "{name}: the log does not name {https}: {line}"
        );
    }
    // Refusals that cannot go away by retrying stop the node, with the reason.
    for (name, why) in [
        (
            "plaintext",
            "the coordinator serves mutual TLS and this side dialed plaintext (--insecure)",
        ),
        (
            "revoked",
            "node clinic-revoked is revoked: this coordinator refuses its certificate",
        ),
    ] {
        let status = sandbox.wait_for_exit(name, deadline);
        assert!(!status.success(), "{name} was not refused");
        let log = sandbox.log(name, "stderr");
        assert!(
            log.contains(why),
            "{name} does not say why it was refused: {log}"
        );
    }

    // The coordinator's log names each refused connection and why.
    sandbox.wait_for_log("coordinator", "stderr", deadline, |log| {
        let seen = [
            "the client's certificate is not signed by this federation's CA",
            "the client presented no certificate",
            "the client speaks plaintext HTTP/2",
            "the client refused this coordinator's certificate",
            "node clinic-revoked is revoked",
        ];
        seen.iter().all(|reason| log.contains(reason)).then_some(())
    });

    check_admin_access(&mut sandbox, &https, deadline);
}

/// The operator's certificate reaches the admin service; a node's does not, and neither does
/// an operator who forgot `--tls-dir`.
fn check_admin_access(sandbox: &mut Sandbox, address: &str, deadline: Instant) {
    let status =
        coordinator_command(&["status", "--json", "--address", address, "--tls-dir", "ca"]);
    run_ok(sandbox, "status", status, deadline);
    let status: serde_json::Value =
        serde_json::from_str(&sandbox.log("status", "stdout")).expect("status --json is JSON");
    assert_eq!(status["federation"], "tls-test");

    // A directory laid out like an operator's, holding a node's certificate and key.
    let dir = sandbox.dir().to_path_buf();
    let impostor = dir.join("impostor");
    fs::create_dir(&impostor).expect("impostor directory");
    for (from, to) in [
        ("clinic-a/ca.crt", "ca.crt"),
        ("clinic-a/node.crt", "operator.crt"),
        ("clinic-a/node.key", "operator.key"),
    ] {
        fs::copy(dir.join(from), impostor.join(to)).expect("copy the node's files");
    }
    for (name, args, why) in [
        (
            "status-as-node",
            vec!["status", "--address", address, "--tls-dir", "impostor"],
            "the admin service is for operators, and this certificate is for node clinic-a",
        ),
        (
            "status-without-tls",
            vec!["status", "--address", address],
            "the admin service needs mutual TLS: pass --tls-dir DIR",
        ),
    ] {
        sandbox.spawn(name, coordinator_command(&args));
        assert!(
            !sandbox.wait_for_exit(name, deadline).success(),
            "{name} succeeded"
        );
        let stderr = sandbox.log(name, "stderr");
        assert!(stderr.contains(why), "{name} does not say why: {stderr}");
    }
}

/// A coordinator on an ephemeral loopback port over the CA directory's files, running `total`
/// rounds once `min_nodes` nodes are connected; `server` adds lines to `[server]`.
fn coordinator_config(total: u64, min_nodes: usize, server: &str) -> String {
    format!(
        r#"
[federation]
name = "tls-test"

[server]
listen = "127.0.0.1:0"
{server}

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
total = {total}
min_nodes = {min_nodes}
deadline_secs = 60
max_consecutive_abandoned = 1

[training]
learning_rate = 1.0
local_epochs = 1.0
expected_batch_size = 24

[privacy]
dp = "on"
clip_norm = 1.0
noise_multiplier = 1.0
"#
    )
}

/// A `[tls]` section trusting `ca`, with the certificate and key in directory `bundle`.
fn tls_section(ca: &str, bundle: Option<&str>) -> String {
    let mut section = format!("[tls]\nca = \"{ca}\"\n");
    if let Some(bundle) = bundle {
        section.push_str(&format!(
            "cert = \"{bundle}/node.crt\"\nkey = \"{bundle}/node.key\"\n"
        ));
    }
    section
}

/// A node `id` dialing `address`, training on shard `clinic-a` with its ledger named after
/// `name`, secured by `tls`.
fn node_config(id: &str, address: &str, name: &str, tls: &str) -> String {
    format!(
        r#"
[node]
id = "{id}"

[coordinator]
address = "{address}"
max_backoff_secs = 1

{tls}

[data]
path = "clinic-a.csv"
schema = "{SCHEMA}"

[privacy]
epsilon = 20.0
ledger = "{name}.privacy-ledger.jsonl"
"#
    )
}
