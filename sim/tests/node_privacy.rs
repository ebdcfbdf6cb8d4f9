//! Node-level privacy through the whole simulated federation: every manifest's cumulative
//! epsilon is what the accountant gives for the rounds published so far, and publishing stops
//! at the federation's budget. In plain mode the coordinator adds the noise and the figures
//! are exact; under secure aggregation the nodes add it, and the coordinator accounts what
//! the survivors' noise amounts to against the quantized sensitivity, a hair below the
//! configured multiplier.

use std::path::Path;

use athanor_coordinator::store::{ModelStore, VersionStatus};
use athanor_core::accountant::{Accountant, Step};
use athanor_sim::config::SimConfig;

const DELTA: f64 = 1e-5;
const NOISE_MULTIPLIER: f64 = 4.0;

fn node_epsilon(rounds: u64) -> f64 {
    let steps = [Step {
        q: 1.0,
        sigma: NOISE_MULTIPLIER,
        count: rounds,
    }];
    Accountant::Rdp.epsilon(&steps, DELTA).unwrap().epsilon
}

fn config(budget: f64, mode: &str) -> String {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data");
    format!(
        r#"
        [simulation]
        nodes = 3
        partition = "iid"
        seed = 5
        reproducible = true

        [data]
        train = "{train}"
        schema = "{schema}"
        test_fraction = 0.2

        [model]
        architecture = "logistic_regression"
        features = 30
        classes = 2
        init_seed = 1

        [rounds]
        total = 10
        deadline_secs = 60

        [training]
        learning_rate = 0.5
        local_epochs = 1.0
        expected_batch_size = 32

        [privacy]
        dp = "on"
        clip_norm = 1.0
        noise_multiplier = 1.0

        [node_privacy]
        update_clip_norm = 0.5
        noise_multiplier = {NOISE_MULTIPLIER}
        epsilon = {budget}
        delta = {DELTA}

        [aggregation]
        mode = "{mode}"
        "#,
        train = data.join("sklearn_breast_cancer.csv.gz").display(),
        schema = data.join("breast_cancer.schema.toml").display(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_account_every_round_and_publishing_stops_at_the_budget() {
    manifests_account_every_round("plain", 1e-12).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_secure_aggregation_the_survivors_noise_is_accounted() {
    // The noise sampler's range (per-node variance up to 2^48) caps 1 / gamma at 2^23 here,
    // so S / gamma is about 4.2e6 against sqrt(32) for the rounding: the accounted multiplier
    // is within 1.4e-6 of the configured one, and epsilon moves about as much.
    manifests_account_every_round("secure", 1e-5).await;
}

async fn manifests_account_every_round(mode: &str, tolerance: f64) {
    // Room for three and a half rounds: the fourth would overspend.
    let budget = (node_epsilon(3) + node_epsilon(4)) / 2.0;
    let out = tempfile::tempdir().unwrap();
    let config = SimConfig::parse(&config(budget, mode), Path::new("node_privacy.toml")).unwrap();

    let summary = athanor_sim::run::run(config, out.path()).await.unwrap();
    assert_eq!(
        summary.versions_published, 4,
        "the initial model and three rounds"
    );

    let store = ModelStore::open(out.path().join("store")).unwrap();
    let mut rounds = 0;
    for entry in store.list() {
        let VersionStatus::Valid(manifest) = &entry.status else {
            panic!("version {} is damaged", entry.version);
        };
        if manifest.round == 0 {
            assert!(manifest.node_privacy.is_none());
            continue;
        }
        rounds += 1;
        let record = manifest.node_privacy.as_ref().expect("node-level record");
        let expected = node_epsilon(rounds);
        assert!(
            (record.epsilon - expected).abs() <= tolerance * expected,
            "version {}: manifest says {}, accountant {}",
            manifest.version,
            record.epsilon,
            expected
        );
        assert_eq!(
            Accountant::Rdp
                .epsilon(&record.history, DELTA)
                .unwrap()
                .epsilon,
            record.epsilon,
            "the recorded history reproduces the recorded epsilon"
        );
        assert!(record.epsilon <= budget);
        assert_eq!(record.sampling_rate, 1.0);
        for step in &record.history {
            assert!(
                (step.sigma - NOISE_MULTIPLIER).abs() <= tolerance * NOISE_MULTIPLIER,
                "round noise multiplier {} against {NOISE_MULTIPLIER}",
                step.sigma
            );
        }
    }
    assert_eq!(rounds, 3);
}

#[test]
fn a_budget_below_one_round_is_a_configuration_error() {
    let error = SimConfig::parse(
        &config(node_epsilon(1) / 2.0, "secure"),
        Path::new("node_privacy.toml"),
    )
    .unwrap_err()
    .to_string();
    assert!(error.contains("[node_privacy]"), "{error}");
}
