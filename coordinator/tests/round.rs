//! The round state machine through the public [`Coordinator`] API: real rounds driven by
//! [`Coordinator::drive`] on a temporary model store, with the test playing the nodes
//! in-process (no network).
//!
//! Updates use small values whose weighted means are exact in `f32`, so published weights can
//! be compared with `==` and a stray update that was counted would show.

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use athanor_coordinator::config::ArchitectureName;
use athanor_coordinator::round::{NodeId, Poll, Task, UpdateHeader};
use athanor_coordinator::store::{Epsilon, Manifest, ModelStore, VersionStatus};
use athanor_coordinator::{Coordinator, CoordinatorConfig, Error};
use tempfile::TempDir;
use tokio::task::JoinHandle;

/// Longest wait for anything the driver should do at once; only reached when a test fails.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// A logistic regression of 3 features and 2 classes: 3 * 2 weights and 2 biases, all zero
/// initially.
const NUM_PARAMS: usize = 8;

const CONFIG: &str = r#"
    [federation]
    name = "round-tests"
    [store]
    dir = "replaced by the test"
    [model]
    architecture = "logistic_regression"
    features = 3
    classes = 2
    init_seed = 7
    [rounds]
    total = 1
    min_nodes = 2
    deadline_secs = 60
    cohort_seed = 11
    [training]
    learning_rate = 0.1
    local_epochs = 1.0
    expected_batch_size = 8
    [privacy]
    dp = "on"
    clip_norm = 1.0
    noise_multiplier = 1.0
    [aggregation]
    mode = "plain"
"#;

/// A coordinator on its own store with its round driver running.
struct Federation {
    coordinator: Coordinator,
    driver: JoinHandle<Result<(), Error>>,
    store_dir: TempDir,
}

impl Federation {
    /// Starts a federation from [`CONFIG`] as changed by `adjust`.
    fn start(adjust: impl FnOnce(&mut CoordinatorConfig)) -> Self {
        let store_dir = TempDir::new().expect("temporary directory");
        let mut config = CoordinatorConfig::parse(CONFIG, Path::new("round-tests.toml"))
            .expect("test config is valid");
        config.store.dir = store_dir.path().to_path_buf();
        adjust(&mut config);
        config.check().expect("adjusted test config is valid");
        let coordinator = Coordinator::open(config).expect("coordinator opens a new store");

        let driving = coordinator.clone();
        let driver = tokio::spawn(async move { driving.drive(std::future::pending()).await });
        Federation {
            coordinator,
            driver,
            store_dir,
        }
    }

    /// Joins nodes `node-0`, `node-1`, ... and returns their sessions.
    fn join(&self, count: usize) -> Vec<String> {
        (0..count)
            .map(|i| {
                let node = NodeId(format!("node-{i}"));
                self.coordinator.join(node, None).session
            })
            .collect()
    }

    /// The task each session is given in the next round.
    async fn tasks(&self, sessions: &[String]) -> Vec<Task> {
        let mut tasks = Vec::new();
        for session in sessions {
            let poll = within(self.coordinator.wait_for_task(session), "a task").await;
            match poll {
                Ok(Poll::Task(task)) => tasks.push(task),
                other => panic!("expected a task, got {other:?}"),
            }
        }
        tasks
    }

    /// Waits until the driver returns, which it does after the configured rounds.
    async fn finish(self) -> (Coordinator, TempDir) {
        let driven = within(self.driver, "the driver to return").await;
        driven
            .expect("driver task did not panic")
            .expect("driver succeeded");
        (self.coordinator, self.store_dir)
    }

    /// Waits until the driver gives up after too many abandoned rounds, which is an error.
    async fn give_up(self) -> (Coordinator, TempDir) {
        let driven = within(self.driver, "the driver to return").await;
        match driven.expect("driver task did not panic") {
            Err(Error::GaveUp(reason)) => {
                assert!(reason.contains("abandoned in a row"), "{reason}")
            }
            other => panic!("expected the driver to give up, got {other:?}"),
        }
        (self.coordinator, self.store_dir)
    }
}

/// Awaits `future`, failing the test with `what` after [`STEP_TIMEOUT`].
async fn within<F: Future>(future: F, what: &str) -> F::Output {
    tokio::time::timeout(STEP_TIMEOUT, future)
        .await
        .unwrap_or_else(|_| panic!("no {what} within {STEP_TIMEOUT:?}"))
}

/// The header of an honest update for `task`, weighted by `num_examples`.
fn header(task: &Task, num_examples: u64) -> UpdateHeader {
    UpdateHeader {
        secure: None,
        round: task.round,
        model_version: task.model_version,
        num_examples,
        num_params: NUM_PARAMS,
        train_loss: 0.5,
        privacy: Epsilon::Finite(1.0),
        delta: Some(1e-5),
    }
}

/// Waits for the next published manifest on `published`.
async fn next_published(published: &mut tokio::sync::broadcast::Receiver<Manifest>) -> Manifest {
    within(published.recv(), "published version")
        .await
        .expect("publication channel open")
}

#[tokio::test]
async fn rejects_updates_for_other_rounds_without_disturbing_the_open_round() {
    let federation = Federation::start(|config| config.rounds.total = 2);
    let coordinator = &federation.coordinator;
    let mut published = coordinator.subscribe();
    let sessions = federation.join(2);

    // Round 1: both nodes move every parameter by 1, from the all-zero initial model.
    let tasks = federation.tasks(&sessions).await;
    for (session, task) in sessions.iter().zip(&tasks) {
        coordinator
            .submit_update(session, header(task, 10), vec![1.0; NUM_PARAMS])
            .expect("round 1 update accepted");
    }
    assert_eq!(next_published(&mut published).await.version, 1);

    // Round 2 is open; node 0 sends a late update for round 1, then one for a future round.
    let tasks = federation.tasks(&sessions).await;
    assert_eq!((tasks[0].round, tasks[0].model_version), (2, 1));
    let stale = UpdateHeader {
        secure: None,
        round: 1,
        model_version: 0,
        ..header(&tasks[0], 10)
    };
    match coordinator.submit_update(&sessions[0], stale, vec![100.0; NUM_PARAMS]) {
        Err(Error::WrongRound(message)) => assert!(
            message.contains("round 1") && message.contains("round 2 is open"),
            "unclear rejection: {message}"
        ),
        other => panic!("stale update not rejected as for the wrong round: {other:?}"),
    }
    let early = UpdateHeader {
        secure: None,
        round: 3,
        ..header(&tasks[0], 10)
    };
    assert!(matches!(
        coordinator.check_update(&sessions[0], &early),
        Err(Error::WrongRound(_))
    ));
    let status = coordinator.status();
    assert_eq!((status.round, status.stage), (Some(2), "training"));

    // Node 0 is still expected in round 2 and its real update counts, the stale one does not:
    // 1 + (1 * 0.5 + 3 * 0.25) / 4 = 1.3125 exactly.
    coordinator
        .submit_update(&sessions[0], header(&tasks[0], 1), vec![0.5; NUM_PARAMS])
        .expect("node 0's round 2 update accepted after its stale one");
    coordinator
        .submit_update(&sessions[1], header(&tasks[1], 3), vec![0.25; NUM_PARAMS])
        .expect("node 1's round 2 update accepted");
    let manifest = next_published(&mut published).await;
    assert_eq!(
        (
            manifest.version,
            manifest.parent,
            manifest.round,
            manifest.contributors
        ),
        (2, Some(1), 2, 2)
    );
    assert_eq!(coordinator.global().params, vec![1.3125; NUM_PARAMS]);
    federation.finish().await;
}

#[tokio::test]
async fn rejects_updates_of_the_wrong_length() {
    let federation = Federation::start(|_| {});
    let coordinator = &federation.coordinator;
    let sessions = federation.join(2);
    let tasks = federation.tasks(&sessions).await;

    // A header announcing the wrong length is refused before any payload is read.
    let short = UpdateHeader {
        secure: None,
        num_params: NUM_PARAMS - 1,
        ..header(&tasks[0], 10)
    };
    match coordinator.check_update(&sessions[0], &short) {
        Err(Error::InvalidRequest(message)) => assert!(
            message.contains(&format!("{}", NUM_PARAMS - 1))
                && message.contains(&format!("{NUM_PARAMS}")),
            "rejection does not give both lengths: {message}"
        ),
        other => panic!("short header not rejected: {other:?}"),
    }
    assert!(matches!(
        coordinator.submit_update(&sessions[0], short, vec![1.0; NUM_PARAMS - 1]),
        Err(Error::InvalidRequest(_))
    ));

    // So is a payload longer than its (correct) header says.
    assert!(matches!(
        coordinator.submit_update(
            &sessions[0],
            header(&tasks[0], 10),
            vec![1.0; NUM_PARAMS + 1]
        ),
        Err(Error::InvalidRequest(_))
    ));

    // Neither attempt counted as node 0's answer: it can still submit, and the round publishes
    // the mean of the two valid updates only.
    coordinator
        .submit_update(&sessions[0], header(&tasks[0], 1), vec![2.0; NUM_PARAMS])
        .expect("node 0's valid update accepted after the rejected ones");
    coordinator
        .submit_update(&sessions[1], header(&tasks[1], 1), vec![4.0; NUM_PARAMS])
        .expect("node 1's update accepted");
    let (coordinator, _store) = federation.finish().await;
    assert_eq!(coordinator.global().manifest.contributors, 2);
    assert_eq!(coordinator.global().params, vec![3.0; NUM_PARAMS]);
}

#[tokio::test]
async fn rejects_updates_with_non_finite_values() {
    let federation = Federation::start(|_| {});
    let coordinator = &federation.coordinator;
    let sessions = federation.join(2);
    let tasks = federation.tasks(&sessions).await;

    let mut poisoned = vec![1.0; NUM_PARAMS];
    poisoned[3] = f32::NAN;
    assert!(matches!(
        coordinator.submit_update(&sessions[0], header(&tasks[0], 1), poisoned),
        Err(Error::InvalidRequest(_))
    ));
    let mut infinite = vec![1.0; NUM_PARAMS];
    infinite[0] = f32::INFINITY;
    assert!(matches!(
        coordinator.submit_update(&sessions[0], header(&tasks[0], 1), infinite),
        Err(Error::InvalidRequest(_))
    ));

    for (session, task) in sessions.iter().zip(&tasks) {
        coordinator
            .submit_update(session, header(task, 1), vec![1.0; NUM_PARAMS])
            .expect("finite update accepted");
    }
    let (coordinator, _store) = federation.finish().await;
    assert_eq!(coordinator.global().params, vec![1.0; NUM_PARAMS]);
}

#[tokio::test]
async fn a_round_of_zero_weight_updates_is_abandoned_and_publishes_nothing() {
    let federation = Federation::start(|config| config.rounds.max_consecutive_abandoned = 1);
    let coordinator = federation.coordinator.clone();
    let sessions = federation.join(2);
    let tasks = federation.tasks(&sessions).await;
    let initial = coordinator.global();

    // Both updates are well formed, so both are accepted; only their total weight is zero.
    for (session, task) in sessions.iter().zip(&tasks) {
        coordinator
            .submit_update(session, header(task, 0), vec![1.0; NUM_PARAMS])
            .expect("a zero-weight update is well formed");
    }
    let (coordinator, store_dir) = federation.give_up().await;

    let status = coordinator.status();
    assert_eq!(
        (
            status.rounds_completed,
            status.rounds_abandoned,
            status.latest_version
        ),
        (0, 1, 0)
    );
    let global = coordinator.global();
    assert_eq!(global.manifest, initial.manifest);
    assert!(global.params.iter().all(|p| p.is_finite()));
    assert_eq!(global.params, initial.params);

    // On disk too: the store reopened from its directory holds the initial version only, and
    // no partial version was left behind.
    let store = ModelStore::open(store_dir.path()).expect("store reopens");
    let versions: Vec<u64> = store.list().iter().map(|entry| entry.version).collect();
    assert_eq!(versions, vec![0]);
    let names: Vec<String> = std::fs::read_dir(store_dir.path().join("versions"))
        .expect("versions directory")
        .map(|entry| {
            entry
                .expect("directory entry")
                .file_name()
                .to_string_lossy()
                .into()
        })
        .collect();
    assert_eq!(names, vec!["000000".to_string()]);

    // Polling nodes learn that the federation is over.
    let poll = within(coordinator.wait_for_task(&sessions[0]), "an answer").await;
    assert!(matches!(poll, Ok(Poll::Finished(_))), "{poll:?}");
}

#[tokio::test]
async fn identical_runs_publish_bit_identical_weights() {
    // Two runs with the same config and updates, the updates arriving in opposite orders.
    let forward = run_mlp_federation(&[0, 1, 2]).await;
    let backward = run_mlp_federation(&[2, 1, 0]).await;

    for version in 1..=2 {
        let (a, b) = (&forward[version - 1], &backward[version - 1]);
        assert!(
            a.0 == b.0,
            "version {version}: weights files differ between identical runs"
        );
        assert_eq!(a.1, b.1, "version {version}: recorded hashes differ");
    }
}

/// Runs two rounds of FedAvgM (so the server's velocity carries over) on a seeded MLP, with
/// three nodes submitting in `order`, and returns each trained version's weights file and
/// recorded hash.
async fn run_mlp_federation(order: &[usize]) -> Vec<(Vec<u8>, String)> {
    let federation = Federation::start(|config| {
        config.model.architecture = ArchitectureName::Mlp;
        config.model.hidden = Some(4);
        config.rounds.total = 2;
        config.rounds.min_nodes = 3;
        config.strategy.server_learning_rate = 0.7;
        config.strategy.server_momentum = 0.9;
    });
    let sessions = federation.join(3);
    let num_params = federation.coordinator.spec().num_params();

    for round in 1..=2u64 {
        let tasks = federation.tasks(&sessions).await;
        for &node in order {
            // Values whose sums round in f32 and f64, with different weights per node.
            let delta: Vec<f32> = (0..num_params)
                .map(|i| ((i as f32 + 1.0) * (node as f32 + 0.3) * round as f32).sin() * 0.01)
                .collect();
            let header = UpdateHeader {
                secure: None,
                num_params,
                ..header(&tasks[node], 7 + 13 * node as u64)
            };
            federation
                .coordinator
                .submit_update(&sessions[node], header, delta)
                .expect("update accepted");
        }
    }
    let (coordinator, store_dir) = federation.finish().await;

    let store = coordinator.store();
    (1..=2)
        .map(|version| {
            let entry = &store.list()[version];
            let VersionStatus::Valid(manifest) = &entry.status else {
                panic!("version {version} is damaged: {:?}", entry.status);
            };
            let path = store_dir
                .path()
                .join(format!("versions/{version:06}/weights.safetensors"));
            let weights = std::fs::read(&path).expect("weights file");
            (weights, manifest.weights_sha256.clone())
        })
        .collect()
}

#[tokio::test]
async fn a_node_that_declines_for_good_is_never_asked_again() {
    let federation = Federation::start(|config| {
        config.rounds.min_nodes = 2;
        config.rounds.min_updates = Some(1);
    });
    let coordinator = federation.coordinator.clone();
    let sessions = federation.join(3);
    let tasks = federation.tasks(&sessions).await;

    // node-2 leaves (its budget is spent); a one-off decline keeps node-1 in the federation.
    coordinator
        .decline(&sessions[2], tasks[2].round, "budget spent".into(), true)
        .expect("decline accepted");
    coordinator
        .decline(&sessions[1], tasks[1].round, "busy".into(), false)
        .expect("decline accepted");
    assert_eq!(coordinator.status().connected_nodes, 2);
    let gone = coordinator.wait_for_task(&sessions[2]).await;
    assert!(matches!(gone, Err(Error::UnknownSession)), "{gone:?}");

    coordinator
        .submit_update(&sessions[0], header(&tasks[0], 4), vec![1.0; NUM_PARAMS])
        .expect("update accepted");
    let (coordinator, _store) = federation.finish().await;
    assert_eq!(coordinator.status().rounds_completed, 1);
}

/// Opens a coordinator configured by [`CONFIG`] on the store in `dir`, as a restarted process
/// would.
fn reopen(dir: &Path, adjust: impl FnOnce(&mut CoordinatorConfig)) -> Coordinator {
    let mut config = CoordinatorConfig::parse(CONFIG, Path::new("round-tests.toml"))
        .expect("test config is valid");
    config.store.dir = dir.to_path_buf();
    adjust(&mut config);
    config.check().expect("adjusted test config is valid");
    Coordinator::open(config).expect("coordinator opens its store")
}

#[tokio::test]
async fn a_pause_outlives_a_restart_and_so_does_resuming() {
    let store_dir = TempDir::new().expect("temporary directory");
    let more_rounds = |config: &mut CoordinatorConfig| config.rounds.total = 5;

    let first = reopen(store_dir.path(), more_rounds);
    assert!(!first.status().paused);
    let paused = first.pause_rounds().expect("pause recorded");
    assert!(!paused.was_paused);
    assert!(store_dir.path().join("paused").is_file());
    drop(first);

    // The restarted coordinator is paused before anyone says so again, and opens no round
    // although enough nodes are connected.
    let second = reopen(store_dir.path(), more_rounds);
    let status = second.status();
    assert!(status.paused, "{status:?}");
    assert_eq!(status.stage, "paused");
    let driving = second.clone();
    let driver = tokio::spawn(async move { driving.drive(std::future::pending()).await });
    let sessions: Vec<String> = (0..2)
        .map(|i| second.join(NodeId(format!("node-{i}")), None).session)
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(second.status().round, None, "a round opened while paused");

    assert!(second.resume_rounds().expect("resume recorded"));
    assert!(!store_dir.path().join("paused").exists());
    let poll = within(second.wait_for_task(&sessions[0]), "a task").await;
    assert!(matches!(poll, Ok(Poll::Task(_))), "{poll:?}");
    driver.abort();
    drop(second);

    let third = reopen(store_dir.path(), more_rounds);
    assert!(!third.status().paused);
}

/// FedAvgM on a seeded MLP with three nodes, stopping after `total` published versions.
fn fedavgm(total: u64) -> impl FnOnce(&mut CoordinatorConfig) {
    move |config| {
        config.model.architecture = ArchitectureName::Mlp;
        config.model.hidden = Some(4);
        config.rounds.total = total;
        config.rounds.min_nodes = 3;
        config.strategy.server_learning_rate = 0.7;
        config.strategy.server_momentum = 0.9;
    }
}

/// Runs one coordinator process's life on the store in `dir`: FedAvgM rounds until `total`
/// versions are published, with three nodes whose updates depend only on the node and the
/// round, so two histories of the same rounds see the same updates.
async fn run_fedavgm(dir: &Path, total: u64) {
    let coordinator = reopen(dir, fedavgm(total));
    let driving = coordinator.clone();
    let driver = tokio::spawn(async move { driving.drive(std::future::pending()).await });
    let sessions: Vec<String> = (0..3)
        .map(|i| coordinator.join(NodeId(format!("node-{i}")), None).session)
        .collect();
    let num_params = coordinator.spec().num_params();

    'rounds: loop {
        for (node, session) in sessions.iter().enumerate() {
            let task = match within(coordinator.wait_for_task(session), "an answer").await {
                Ok(Poll::Task(task)) => task,
                Ok(Poll::Finished(_)) => break 'rounds,
                other => panic!("expected a task, got {other:?}"),
            };
            let delta: Vec<f32> = (0..num_params)
                .map(|i| ((i as f32 + 1.0) * (node as f32 + 0.3) * task.round as f32).sin() * 0.01)
                .collect();
            let header = UpdateHeader {
                num_params,
                ..header(&task, 7 + 13 * node as u64)
            };
            coordinator
                .submit_update(session, header, delta)
                .expect("update accepted");
        }
    }
    within(driver, "the driver to return")
        .await
        .expect("driver task did not panic")
        .expect("driver succeeded");
}

fn version_file(dir: &Path, version: u64, name: &str) -> Vec<u8> {
    std::fs::read(dir.join(format!("versions/{version:06}/{name}"))).expect("version file")
}

#[tokio::test]
async fn server_momentum_survives_a_restart_and_a_damaged_velocity_only_resets_it() {
    // Four rounds in one process, and the same four rounds with a restart after the second.
    let straight = TempDir::new().expect("temporary directory");
    run_fedavgm(straight.path(), 4).await;
    let restarted = TempDir::new().expect("temporary directory");
    run_fedavgm(restarted.path(), 2).await;
    run_fedavgm(restarted.path(), 4).await;

    for version in 3..=4 {
        assert!(
            version_file(straight.path(), version, "weights.safetensors")
                == version_file(restarted.path(), version, "weights.safetensors"),
            "version {version}: a restart changed the weights"
        );
    }
    assert!(
        version_file(straight.path(), 4, "optimizer.safetensors")
            == version_file(restarted.path(), 4, "optimizer.safetensors")
    );

    // A restart over a damaged velocity opens the store with every version valid, and goes on
    // from zero velocity, which gives other weights.
    let damaged = TempDir::new().expect("temporary directory");
    run_fedavgm(damaged.path(), 2).await;
    let velocity = damaged.path().join("versions/000002/optimizer.safetensors");
    let mut bytes = std::fs::read(&velocity).expect("velocity file");
    bytes.truncate(bytes.len() / 2);
    std::fs::write(&velocity, bytes).expect("damage the velocity");
    run_fedavgm(damaged.path(), 4).await;

    let store = ModelStore::open_read_only(damaged.path()).expect("the store opens");
    assert!(store.damaged().is_empty(), "{:?}", store.damaged());
    assert_eq!(store.latest().map(|m| m.version), Some(4));
    assert!(
        version_file(straight.path(), 3, "weights.safetensors")
            != version_file(damaged.path(), 3, "weights.safetensors"),
        "the damaged velocity was used"
    );
}
