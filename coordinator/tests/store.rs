//! The model store's public API, on temporary directories.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use athanor_coordinator::store::{
    DatasetFingerprint, Epsilon, ExamplePrivacy, MANIFEST_FILE, Manifest, ManifestDraft,
    ModelStore, NodePrivacy, OPTIMIZER_FILE, StoreError, VersionStatus,
};
use athanor_core::accountant::{Accountant, Step};
use athanor_core::model::{Architecture, ModelSpec};
use safetensors::{Dtype, SafeTensors};
use sha2::{Digest, Sha256};
use tempfile::TempDir;

fn logistic() -> ModelSpec {
    ModelSpec {
        architecture: Architecture::LogisticRegression,
        features: 5,
        classes: 3,
    }
}

fn mlp() -> ModelSpec {
    ModelSpec {
        architecture: Architecture::Mlp { hidden: 4 },
        features: 6,
        classes: 3,
    }
}

/// Parameters with awkward bit patterns: signed zeros, subnormals, extremes and a spread of
/// ordinary values, so a round trip that is not bit-exact shows.
fn params(spec: &ModelSpec, salt: u32) -> Vec<f32> {
    let special = [
        -0.0,
        0.0,
        f32::MIN_POSITIVE,
        f32::from_bits(1),
        f32::MAX,
        f32::MIN,
        f32::EPSILON,
    ];
    (0..spec.num_params())
        .map(|i| {
            let i = i as u32;
            special
                .get(i as usize)
                .copied()
                .unwrap_or_else(|| (i.wrapping_mul(2_654_435_761) ^ salt) as f32 / 1e9 - 2.0)
        })
        .collect()
}

/// A draft for a trained version with every optional field filled.
fn trained_draft(spec: ModelSpec, parent: u64) -> ManifestDraft {
    let mut strategy_params = serde_json::Map::new();
    strategy_params.insert("server_lr".to_owned(), 1.0.into());
    ManifestDraft {
        parent: Some(parent),
        round: parent + 1,
        model: spec,
        init_seed: Some(7),
        strategy: "fedavg".to_owned(),
        strategy_params,
        contributors: 3,
        metrics: BTreeMap::from([("train_loss".to_owned(), 0.5)]),
        example_privacy: ExamplePrivacy {
            max_epsilon: Epsilon::Finite(1.25),
            delta: Some(1e-5),
        },
        node_privacy: Some(NodePrivacy {
            epsilon: 2.5,
            delta: 1e-6,
            noise_multiplier: 1.1,
            update_clip_norm: 0.5,
            sampling_rate: 1.0,
            accountant: Accountant::Rdp,
            history: vec![Step {
                q: 1.0,
                sigma: 1.1,
                count: 3,
            }],
        }),
        dataset_fingerprints: vec![DatasetFingerprint {
            node: "clinic-a".to_owned(),
            sha256: "ab".repeat(32),
            rows: 120,
        }],
        code_version: "0.1.0".to_owned(),
    }
}

/// Opens a store in a new temporary directory and publishes `count` versions of `spec`.
fn store_with(spec: ModelSpec, count: u64) -> (TempDir, ModelStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = ModelStore::open(dir.path()).unwrap();
    for version in 0..count {
        let draft = if version == 0 {
            ManifestDraft::initial(spec, Some(7), "0.1.0")
        } else {
            trained_draft(spec, version - 1)
        };
        store
            .publish(draft, &params(&spec, version as u32))
            .unwrap();
    }
    (dir, store)
}

fn version_dir(root: &Path, version: u64) -> PathBuf {
    root.join("versions").join(format!("{version:06}"))
}

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|value| value.to_bits()).collect()
}

fn versions_dir_names(root: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(root.join("versions"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

/// The cause inside a `Damaged` error.
fn damage(error: &StoreError) -> &StoreError {
    match error {
        StoreError::Damaged { cause, .. } => cause,
        other => panic!("expected a damaged version, got {other:?}"),
    }
}

fn listed_damage(store: &ModelStore, version: u64) -> std::sync::Arc<StoreError> {
    match &store.list()[version as usize].status {
        VersionStatus::Damaged(cause) => cause.clone(),
        VersionStatus::Valid(_) => panic!("version {version} is listed as valid"),
    }
}

#[test]
fn round_trip_is_bit_exact_for_logistic_regression() {
    let spec = logistic();
    let (_dir, store) = store_with(spec, 2);

    let (manifest, loaded) = store.load(1).unwrap();
    assert_eq!(bits(&loaded), bits(&params(&spec, 1)));
    assert_eq!(manifest, store.manifest(1).unwrap());
    assert_eq!(manifest.model, spec);
}

#[test]
fn round_trip_is_bit_exact_for_mlp() {
    let spec = mlp();
    let (_dir, store) = store_with(spec, 2);

    for version in 0..2 {
        let (_, loaded) = store.load(version).unwrap();
        assert_eq!(bits(&loaded), bits(&params(&spec, version as u32)));
    }
}

#[test]
fn publish_returns_the_completed_manifest() {
    let spec = mlp();
    let (dir, store) = store_with(spec, 1);
    let draft = trained_draft(spec, 0);

    let manifest = store.publish(draft.clone(), &params(&spec, 1)).unwrap();

    assert_eq!(manifest.format, 1);
    assert_eq!(manifest.version, 1);
    assert_eq!(manifest.parent, Some(0));
    assert_eq!(manifest.node_privacy, draft.node_privacy);
    assert_eq!(manifest.dataset_fingerprints, draft.dataset_fingerprints);
    assert_eq!(manifest.created_at.len(), "2026-12-04T15:02:11Z".len());
    assert!(manifest.created_at.ends_with('Z'));
    let file = fs::read(version_dir(dir.path(), 1).join("weights.safetensors")).unwrap();
    assert_eq!(manifest.weights_sha256, hex::encode(Sha256::digest(&file)));
}

#[test]
fn initial_model_is_version_zero_without_parent() {
    let (_dir, store) = store_with(logistic(), 1);

    let initial = store.manifest(0).unwrap();
    assert_eq!(
        (initial.version, initial.parent, initial.round),
        (0, None, 0)
    );
    assert_eq!(initial.example_privacy.max_epsilon, Epsilon::Finite(0.0));
    assert_eq!(initial.strategy, "init");
}

#[test]
fn versions_are_dense_from_zero() {
    let (dir, store) = store_with(logistic(), 4);

    let listed: Vec<u64> = store.list().iter().map(|entry| entry.version).collect();
    assert_eq!(listed, [0, 1, 2, 3]);
    assert_eq!(store.latest().unwrap().version, 3);
    assert_eq!(store.next_version(), 4);
    assert_eq!(
        versions_dir_names(dir.path()),
        ["000000", "000001", "000002", "000003"]
    );
}

#[test]
fn published_files_are_never_rewritten() {
    let spec = logistic();
    let (dir, store) = store_with(spec, 1);
    let weights = version_dir(dir.path(), 0).join("weights.safetensors");
    let manifest = version_dir(dir.path(), 0).join("manifest.json");
    let before = (fs::read(&weights).unwrap(), fs::read(&manifest).unwrap());

    for version in 1..4 {
        store
            .publish(trained_draft(spec, version - 1), &params(&spec, 9))
            .unwrap();
    }

    assert_eq!(
        (fs::read(&weights).unwrap(), fs::read(&manifest).unwrap()),
        before
    );
}

#[test]
fn refuses_to_publish_over_an_existing_version_directory() {
    let spec = logistic();
    let (dir, store) = store_with(spec, 2);
    // Another writer creates the next version behind the store's back.
    let intruder = version_dir(dir.path(), 2);
    fs::create_dir(&intruder).unwrap();
    fs::write(intruder.join("marker"), b"not ours").unwrap();

    let error = store
        .publish(trained_draft(spec, 1), &params(&spec, 2))
        .unwrap_err();

    assert!(
        matches!(error, StoreError::VersionExists { version: 2, .. }),
        "{error:?}"
    );
    assert_eq!(fs::read(intruder.join("marker")).unwrap(), b"not ours");
    assert_eq!(fs::read_dir(&intruder).unwrap().count(), 1);
    assert_eq!(store.next_version(), 2);
    assert!(
        !versions_dir_names(dir.path())
            .iter()
            .any(|name| name.starts_with('.'))
    );
}

#[test]
fn reopening_sees_all_versions() {
    let spec = mlp();
    let (dir, store) = store_with(spec, 3);
    let before: Vec<Manifest> = (0..3).map(|v| store.manifest(v).unwrap()).collect();
    drop(store);

    let reopened = ModelStore::open(dir.path()).unwrap();

    let after: Vec<Manifest> = (0..3).map(|v| reopened.manifest(v).unwrap()).collect();
    assert_eq!(after, before);
    assert_eq!(reopened.latest().unwrap().version, 2);
    assert_eq!(bits(&reopened.load(2).unwrap().1), bits(&params(&spec, 2)));
    let next = reopened
        .publish(trained_draft(spec, 2), &params(&spec, 3))
        .unwrap();
    assert_eq!(next.version, 3);
}

#[test]
fn corrupted_weights_are_reported_on_load_and_not_served() {
    let spec = logistic();
    let (dir, store) = store_with(spec, 2);
    let path = version_dir(dir.path(), 1).join("weights.safetensors");
    let mut bytes = fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    fs::write(&path, &bytes).unwrap();

    let error = store.load(1).unwrap_err();

    assert!(
        matches!(damage(&error), StoreError::HashMismatch { version: 1, .. }),
        "{error:?}"
    );
    assert!(matches!(
        store.weights_bytes(1),
        Err(StoreError::Damaged { version: 1, .. })
    ));
    assert!(matches!(
        store.manifest(1),
        Err(StoreError::Damaged { version: 1, .. })
    ));
    assert!(matches!(
        *listed_damage(&store, 1),
        StoreError::HashMismatch { .. }
    ));
    assert_eq!(store.latest().unwrap().version, 0);
    // The damaged version keeps its number.
    assert_eq!(store.next_version(), 2);
}

#[test]
fn corrupted_weights_are_reported_on_open() {
    let spec = mlp();
    let (dir, store) = store_with(spec, 3);
    drop(store);
    let path = version_dir(dir.path(), 1).join("weights.safetensors");
    let mut bytes = fs::read(&path).unwrap();
    bytes[20] ^= 0x80;
    fs::write(&path, &bytes).unwrap();

    let store = ModelStore::open(dir.path()).unwrap();

    let StoreError::HashMismatch {
        version,
        expected,
        got,
    } = &*listed_damage(&store, 1)
    else {
        panic!("expected a hash mismatch");
    };
    assert_eq!(*version, 1);
    assert_ne!(expected, got);
    assert!(matches!(
        damage(&store.load(1).unwrap_err()),
        StoreError::HashMismatch { .. }
    ));
    assert!(store.weights_bytes(1).is_err());
    // Versions before and after are still served.
    assert!(store.load(0).is_ok());
    assert_eq!(store.latest().unwrap().version, 2);
}

#[test]
fn weights_that_match_their_hash_but_not_the_model_are_reported() {
    let spec = logistic();
    let (dir, store) = store_with(spec, 1);
    drop(store);
    // Rewrite the manifest so it describes a bigger model than the weights hold, keeping
    // the hash right: only the tensor check can catch it.
    let path = version_dir(dir.path(), 0).join("manifest.json");
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    manifest["model"]["classes"] = 4.into();
    fs::write(&path, serde_json::to_vec(&manifest).unwrap()).unwrap();

    let store = ModelStore::open(dir.path()).unwrap();

    assert!(matches!(
        *listed_damage(&store, 0),
        StoreError::InvalidWeights { version: 0, .. }
    ));
    assert!(store.latest().is_none());
}

#[test]
fn garbage_manifest_is_reported() {
    let (dir, store) = store_with(logistic(), 3);
    drop(store);
    fs::write(
        version_dir(dir.path(), 1).join("manifest.json"),
        b"{ not json",
    )
    .unwrap();

    let store = ModelStore::open(dir.path()).unwrap();

    let cause = listed_damage(&store, 1);
    let StoreError::CorruptManifest {
        version: 1,
        message,
    } = &*cause
    else {
        panic!("expected a corrupt manifest, got {cause:?}");
    };
    assert!(!message.is_empty());
    assert!(matches!(
        store.manifest(1),
        Err(StoreError::Damaged { version: 1, .. })
    ));
    assert!(store.load(1).is_err());
    assert!(store.load(2).is_ok());
}

#[test]
fn truncated_manifest_is_reported() {
    let (dir, store) = store_with(mlp(), 2);
    drop(store);
    let path = version_dir(dir.path(), 1).join("manifest.json");
    let bytes = fs::read(&path).unwrap();
    fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();

    let store = ModelStore::open(dir.path()).unwrap();

    assert!(matches!(
        *listed_damage(&store, 1),
        StoreError::CorruptManifest { version: 1, .. }
    ));
    assert_eq!(store.latest().unwrap().version, 0);
}

#[test]
fn manifest_of_an_unknown_format_is_reported() {
    let (dir, store) = store_with(logistic(), 1);
    drop(store);
    let path = version_dir(dir.path(), 0).join("manifest.json");
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    manifest["format"] = 2.into();
    fs::write(&path, serde_json::to_vec(&manifest).unwrap()).unwrap();

    let store = ModelStore::open(dir.path()).unwrap();

    let cause = listed_damage(&store, 0);
    assert!(cause.to_string().contains("format is 2"), "{cause}");
}

#[test]
fn missing_manifest_and_missing_version_are_reported() {
    let (dir, store) = store_with(logistic(), 4);
    drop(store);
    fs::remove_file(version_dir(dir.path(), 1).join("manifest.json")).unwrap();
    fs::remove_dir_all(version_dir(dir.path(), 2)).unwrap();

    let store = ModelStore::open(dir.path()).unwrap();

    assert!(matches!(*listed_damage(&store, 1), StoreError::Io { .. }));
    assert!(matches!(
        *listed_damage(&store, 2),
        StoreError::MissingVersion { version: 2, .. }
    ));
    assert_eq!(store.latest().unwrap().version, 3);
    assert_eq!(store.next_version(), 4);
}

#[test]
fn leftover_partial_version_is_deleted_on_open_and_its_number_reused() {
    let spec = logistic();
    let (dir, store) = store_with(spec, 2);
    drop(store);
    // A publish of version 2 interrupted after half its weights were written.
    let partial = dir.path().join("versions").join(".partial-000002");
    fs::create_dir(&partial).unwrap();
    fs::write(partial.join("weights.safetensors"), b"\x10\0\0\0").unwrap();

    let store = ModelStore::open(dir.path()).unwrap();

    assert!(!partial.exists());
    assert_eq!(store.next_version(), 2);
    let published = store
        .publish(trained_draft(spec, 1), &params(&spec, 2))
        .unwrap();
    assert_eq!(published.version, 2);
    assert_eq!(bits(&store.load(2).unwrap().1), bits(&params(&spec, 2)));
}

#[test]
fn nan_or_infinite_parameters_are_rejected_and_nothing_is_written() {
    let spec = mlp();
    let (dir, store) = store_with(spec, 1);
    let before = versions_dir_names(dir.path());

    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut values = params(&spec, 1);
        let index = spec.num_params() - 2;
        values[index] = bad;

        let error = store.publish(trained_draft(spec, 0), &values).unwrap_err();

        let StoreError::NonFiniteParameter {
            index: at, tensor, ..
        } = error
        else {
            panic!("expected a non-finite parameter, got {error:?}");
        };
        assert_eq!((at, tensor), (index, "b2"));
    }
    assert_eq!(versions_dir_names(dir.path()), before);
    assert_eq!(store.next_version(), 1);
}

#[test]
fn wrong_length_is_rejected() {
    let spec = logistic();
    let (dir, store) = store_with(spec, 1);
    let mut values = params(&spec, 1);
    values.push(0.0);

    let error = store.publish(trained_draft(spec, 0), &values).unwrap_err();

    assert!(
        matches!(
            error,
            StoreError::WrongLength {
                expected: 18,
                got: 19
            }
        ),
        "{error:?}"
    );
    assert_eq!(versions_dir_names(dir.path()), ["000000"]);
}

#[test]
fn invalid_drafts_are_rejected_before_writing() {
    let spec = logistic();
    let (dir, store) = store_with(spec, 1);
    let values = params(&spec, 1);

    let mut nan_metric = trained_draft(spec, 0);
    nan_metric.metrics.insert("train_loss".to_owned(), f64::NAN);
    let error = store.publish(nan_metric, &values).unwrap_err();
    assert!(
        matches!(&error, StoreError::InvalidDraft { field, .. } if field == "metrics.train_loss"),
        "{error:?}"
    );

    let mut bad_delta = trained_draft(spec, 0);
    bad_delta.example_privacy.delta = Some(1.0);
    assert!(matches!(
        store.publish(bad_delta, &values),
        Err(StoreError::InvalidDraft { .. })
    ));

    let mut infinite_epsilon = trained_draft(spec, 0);
    infinite_epsilon.example_privacy.max_epsilon = Epsilon::Finite(f64::INFINITY);
    let error = store.publish(infinite_epsilon, &values).unwrap_err();
    assert!(
        matches!(error, StoreError::InvalidDraft { .. }),
        "{error:?}"
    );

    let error = store.publish(trained_draft(spec, 1), &values).unwrap_err();
    assert!(
        matches!(error, StoreError::UnknownParent { parent: 1, next: 1 }),
        "{error:?}"
    );

    assert_eq!(versions_dir_names(dir.path()), ["000000"]);
}

#[test]
fn unknown_versions_are_not_found() {
    let (_dir, store) = store_with(logistic(), 1);

    assert!(matches!(
        store.manifest(1),
        Err(StoreError::NotFound { version: 1 })
    ));
    assert!(matches!(
        store.load(u64::MAX),
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        store.weights_bytes(5),
        Err(StoreError::NotFound { .. })
    ));
}

#[test]
fn empty_store_has_no_latest_version() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("does").join("not").join("exist");

    let store = ModelStore::open(&root).unwrap();

    assert!(store.latest().is_none());
    assert!(store.list().is_empty());
    assert_eq!(store.next_version(), 0);
    assert!(root.join("versions").is_dir());
}

#[test]
fn weights_file_reads_with_the_safetensors_crate() {
    let spec = mlp();
    let (_dir, store) = store_with(spec, 2);
    let expected = params(&spec, 1);

    let bytes = store.weights_bytes(1).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();

    let mut names = file.names();
    names.sort_unstable();
    assert_eq!(names, ["b1", "b2", "w1", "w2"]);
    for view in spec.tensors() {
        let tensor = file.tensor(view.name).unwrap();
        assert_eq!(tensor.dtype(), Dtype::F32);
        assert_eq!(tensor.shape(), view.shape.as_slice());
        let values: Vec<f32> = tensor
            .data()
            .chunks_exact(4)
            .map(|chunk| f32::from_le_bytes(chunk.try_into().unwrap()))
            .collect();
        assert_eq!(bits(&values), bits(view.slice(&expected)));
    }

    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let metadata = header.metadata().clone().unwrap();
    assert_eq!(metadata["version"], "1");
    assert_eq!(metadata["architecture"], "mlp");
    let model: ModelSpec = serde_json::from_str(&metadata["model"]).unwrap();
    assert_eq!(model, spec);
}

#[test]
fn same_parameters_and_version_give_the_same_file() {
    let spec = mlp();
    let (_first_dir, first) = store_with(spec, 2);
    let (_second_dir, second) = store_with(spec, 2);

    assert_eq!(
        first.weights_bytes(1).unwrap(),
        second.weights_bytes(1).unwrap()
    );
    assert_eq!(
        first.manifest(1).unwrap().weights_sha256,
        second.manifest(1).unwrap().weights_sha256
    );
}

#[test]
fn manifest_json_has_stable_field_names() {
    let spec = mlp();
    let (dir, store) = store_with(spec, 1);
    let mut draft = trained_draft(spec, 0);
    draft.example_privacy = ExamplePrivacy {
        max_epsilon: Epsilon::Unbounded,
        delta: None,
    };
    store.publish(draft, &params(&spec, 1)).unwrap();

    let text = fs::read_to_string(version_dir(dir.path(), 1).join("manifest.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();

    let keys: Vec<&str> = json
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let mut expected = vec![
        "format",
        "version",
        "parent",
        "round",
        "created_at",
        "model",
        "init_seed",
        "strategy",
        "strategy_params",
        "contributors",
        "metrics",
        "example_privacy",
        "node_privacy",
        "dataset_fingerprints",
        "weights_sha256",
        "optimizer_sha256",
        "code_version",
    ];
    let mut sorted_keys = keys.clone();
    sorted_keys.sort_unstable();
    expected.sort_unstable();
    assert_eq!(sorted_keys, expected);
    assert_eq!(json["example_privacy"]["max_epsilon"], "inf");
    assert_eq!(json["example_privacy"]["delta"], serde_json::Value::Null);
    assert_eq!(json["node_privacy"]["noise_multiplier"], 1.1);
    assert_eq!(json["node_privacy"]["accountant"], "rdp");
    assert_eq!(json["node_privacy"]["history"][0]["count"], 3);
    assert_eq!(json["dataset_fingerprints"][0]["rows"], 120);
    assert_eq!(json["model"]["kind"], "mlp");
    assert_eq!(json["model"]["hidden"], 4);
    assert_eq!(json["metrics"]["train_loss"], 0.5);

    let reread = ModelStore::open(dir.path()).unwrap().manifest(1).unwrap();
    assert_eq!(reread.example_privacy.max_epsilon, Epsilon::Unbounded);
}

#[test]
fn read_only_open_leaves_a_partial_version_alone_and_refuses_to_publish() {
    let spec = logistic();
    let (dir, store) = store_with(spec, 2);
    // What a publish in progress in the owning process looks like from outside.
    let partial = dir.path().join("versions").join(".partial-000002");
    fs::create_dir(&partial).unwrap();
    fs::write(partial.join("weights.safetensors"), b"half").unwrap();

    let reader = ModelStore::open_read_only(dir.path()).unwrap();

    assert!(partial.join("weights.safetensors").exists());
    assert_eq!(reader.next_version(), 2);
    assert_eq!(reader.latest().unwrap().version, 1);
    assert!(matches!(
        reader.publish(trained_draft(spec, 1), &params(&spec, 2)),
        Err(StoreError::ReadOnly { .. })
    ));
    assert!(partial.exists(), "a refused publish touched nothing");
    // The owner's publish of version 2 is unaffected by the reader.
    drop(reader);
    fs::remove_dir_all(&partial).unwrap();
    assert_eq!(
        store
            .publish(trained_draft(spec, 1), &params(&spec, 2))
            .unwrap()
            .version,
        2
    );
}

#[test]
fn read_only_open_of_a_missing_store_fails_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-store");
    assert!(matches!(
        ModelStore::open_read_only(&missing),
        Err(StoreError::Io { .. })
    ));
    assert!(!missing.exists());
}

#[test]
fn weights_that_travelled_are_checked_against_their_manifest() {
    let spec = mlp();
    let (_dir, store) = store_with(spec, 2);
    let manifest = store.manifest(1).unwrap();
    let mut weights = store.weights_bytes(1).unwrap();

    let decoded = athanor_coordinator::store::params_from_weights(&manifest, &weights).unwrap();
    assert_eq!(bits(&decoded), bits(&params(&spec, 1)));
    let last = weights.len() - 1;
    weights[last] ^= 1;
    assert!(matches!(
        athanor_coordinator::store::params_from_weights(&manifest, &weights),
        Err(StoreError::HashMismatch { version: 1, .. })
    ));
}

#[test]
fn damaged_versions_are_listed_by_number() {
    let spec = logistic();
    let (dir, store) = store_with(spec, 3);
    drop(store);
    fs::write(
        version_dir(dir.path(), 1).join("weights.safetensors"),
        b"garbage",
    )
    .unwrap();

    let store = ModelStore::open(dir.path()).unwrap();
    let damaged: Vec<u64> = store.damaged().iter().map(|(v, _)| *v).collect();
    assert_eq!(damaged, vec![1]);
    assert_eq!(store.latest().unwrap().version, 2);
}

/// A velocity with awkward f64 bit patterns, so a round trip through `f32` or text would show.
fn velocity(spec: &ModelSpec) -> Vec<f64> {
    (0..spec.num_params())
        .map(|i| match i {
            0 => -0.0,
            1 => f64::from_bits(1),
            2 => f64::MAX,
            _ => (i as f64).sin() * 1e-3 + 1e-12,
        })
        .collect()
}

/// Publishes version 1 of `spec` with `velocity()` as its optimizer state.
fn store_with_velocity(spec: ModelSpec) -> (TempDir, ModelStore) {
    let (dir, store) = store_with(spec, 1);
    store
        .publish_with_optimizer(
            trained_draft(spec, 0),
            &params(&spec, 1),
            Some(&velocity(&spec)),
        )
        .unwrap();
    (dir, store)
}

#[test]
fn the_optimizer_velocity_round_trips_bit_exact_under_its_manifest_hash() {
    let spec = mlp();
    let (dir, store) = store_with_velocity(spec);

    let file = fs::read(version_dir(dir.path(), 1).join(OPTIMIZER_FILE)).unwrap();
    let manifest = store.manifest(1).unwrap();
    assert_eq!(
        manifest.optimizer_sha256.as_deref(),
        Some(hex::encode(Sha256::digest(&file)).as_str())
    );
    let reopened = ModelStore::open(dir.path()).unwrap();
    let read = reopened.optimizer_velocity(1).unwrap().expect("a velocity");
    let bits64 = |values: &[f64]| values.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits64(&read), bits64(&velocity(&spec)));

    // Versions published without one, the initial model included, have none.
    assert_eq!(reopened.manifest(0).unwrap().optimizer_sha256, None);
    assert_eq!(reopened.optimizer_velocity(0).unwrap(), None);
    assert!(!version_dir(dir.path(), 0).join(OPTIMIZER_FILE).exists());
}

#[test]
fn a_damaged_or_missing_optimizer_file_is_reported_and_its_version_stays_valid() {
    let spec = logistic();
    let (dir, _store) = store_with_velocity(spec);
    let path = version_dir(dir.path(), 1).join(OPTIMIZER_FILE);
    let mut bytes = fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    fs::write(&path, &bytes).unwrap();

    let store = ModelStore::open(dir.path()).unwrap();
    assert!(store.damaged().is_empty());
    assert_eq!(store.latest().unwrap().version, 1);
    assert_eq!(bits(&store.load(1).unwrap().1), bits(&params(&spec, 1)));
    let error = store.optimizer_velocity(1).unwrap_err();
    assert!(
        matches!(error, StoreError::InvalidOptimizerState { version: 1, .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains("sha256"), "{error}");

    fs::remove_file(&path).unwrap();
    let error = store.optimizer_velocity(1).unwrap_err();
    assert!(matches!(error, StoreError::Io { .. }), "{error:?}");
    assert!(store.damaged().is_empty());
}

#[test]
fn a_manifest_written_before_optimizer_files_existed_reads_as_having_none() {
    let spec = logistic();
    let (dir, _store) = store_with(spec, 2);
    let path = version_dir(dir.path(), 1).join(MANIFEST_FILE);
    let mut manifest: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    manifest
        .as_object_mut()
        .unwrap()
        .remove("optimizer_sha256")
        .expect("the field is written");
    fs::write(&path, serde_json::to_vec_pretty(&manifest).unwrap()).unwrap();

    let store = ModelStore::open(dir.path()).unwrap();
    assert!(store.damaged().is_empty());
    assert_eq!(store.manifest(1).unwrap().optimizer_sha256, None);
    assert_eq!(store.optimizer_velocity(1).unwrap(), None);
}

#[test]
fn a_velocity_that_does_not_fit_the_model_is_refused_before_writing() {
    let spec = logistic();
    let (dir, store) = store_with(spec, 1);
    let mut not_finite = velocity(&spec);
    not_finite[3] = f64::NAN;
    for bad in [vec![0.0; spec.num_params() + 1], not_finite] {
        let error = store
            .publish_with_optimizer(trained_draft(spec, 0), &params(&spec, 1), Some(&bad))
            .unwrap_err();
        assert!(
            matches!(&error, StoreError::InvalidDraft { field, .. } if field == "optimizer.velocity"),
            "{error:?}"
        );
    }
    assert_eq!(store.next_version(), 1);
    assert_eq!(versions_dir_names(dir.path()), ["000000"]);
}
