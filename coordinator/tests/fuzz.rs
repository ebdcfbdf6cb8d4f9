//! No input makes the coordinator panic while reading its configuration or its model store:
//! arbitrary and mutated configuration text comes back as `Ok` or as an error, and a damaged
//! manifest makes its version damaged (listed, reported, never served) while the rest of the
//! store keeps working.
//!
//! Property tests with a fixed seed, so a failure reproduces; proptest prints the input.

use std::fs;
use std::path::Path;
use std::sync::OnceLock;

use athanor_coordinator::CoordinatorConfig;
use athanor_coordinator::round::NodeId;
use athanor_coordinator::secure::{NodeMessage, SecureRound};
use athanor_coordinator::store::{
    self, DatasetFingerprint, Epsilon, ExamplePrivacy, MANIFEST_FILE, ManifestDraft, ModelStore,
    NodePrivacy, StoreError, VersionStatus, WEIGHTS_FILE,
};
use athanor_core::accountant::{Accountant, Step};
use athanor_core::model::{Architecture, ModelSpec};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::RngSeed;
use rand::SeedableRng;
use serde_json::Value;

/// A complete coordinator configuration, to mutate.
const COORDINATOR_CONFIG: &str = r#"
[federation]
name = "fuzz"

[server]
listen = "127.0.0.1:50051"
max_model_params = 1000000
max_streams_per_connection = 8
allowed_nodes = ["org-a", "org-b"]
revoked_nodes = ["org-c"]

[server.tls]
ca = "certs/ca.crt"
cert = "certs/coordinator.crt"
key = "certs/coordinator.key"

[store]
dir = "store"

[model]
architecture = "mlp"
hidden = 8
features = 87
classes = 2
init_seed = 7

[rounds]
total = 10
min_nodes = 2
cohort_size = 3
min_updates = 2
deadline_secs = 120
max_consecutive_abandoned = 5
cohort_seed = 11

[training]
learning_rate = 1.0
local_epochs = 0.5
expected_batch_size = 256

[strategy]
server_learning_rate = 1.0
server_momentum = 0.7

[privacy]
dp = "on"
clip_norm = 1.0
noise_multiplier = 2.0

[node_privacy]
update_clip_norm = 0.5
noise_multiplier = 1.1
epsilon = 8.0
delta = 1e-6
accountant = "rdp"
"#;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 300,
        rng_seed: RngSeed::Fixed(0x00a7_4a71),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn parse_config(text: &str) {
    match CoordinatorConfig::parse(text, Path::new("fuzz-coordinator.toml")) {
        // Parsing validates; a parsed configuration must pass the same check again.
        Ok(config) => assert_eq!(config.check(), Ok(())),
        Err(err) => {
            let message = err.to_string();
            assert!(message.contains("fuzz-coordinator.toml"), "{message}");
        }
    }
}

/// Fragments that are meaningful to TOML or to the configuration's checks.
fn toml_token() -> impl Strategy<Value = String> {
    let tokens = prop::sample::select(vec![
        "=",
        "[",
        "]",
        "[[rounds]]",
        "[server.tls]",
        "\"",
        "'''",
        "\n",
        "#",
        "{",
        "}",
        ",",
        "-1",
        "0",
        "1e400",
        "nan",
        "inf",
        "-inf",
        "18446744073709551616",
        "9223372036854775807",
        "4294967295",
        "\"\"",
        "\" \"",
        "true",
        "[]",
        "\"off\"",
        "\"pld\"",
        "\"logistic_regression\"",
        "\"[::1]:0\"",
        "\"127.0.0.1:99999\"",
        "\"\\u0000\"",
        "\"é\"",
    ]);
    prop_oneof![4 => tokens.prop_map(str::to_owned), 1 => "\\PC{0,8}"]
}

/// One edit to a text: delete a span, insert a fragment, or replace a line's value.
#[derive(Debug, Clone)]
enum Edit {
    Delete(Index, usize),
    Insert(Index, String),
    ReplaceValue(Index, String),
}

fn edit<S: Strategy<Value = String>>(token: impl Fn() -> S) -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<Index>(), 1usize..24).prop_map(|(at, len)| Edit::Delete(at, len)),
        (any::<Index>(), token()).prop_map(|(at, text)| Edit::Insert(at, text)),
        (any::<Index>(), token()).prop_map(|(at, text)| Edit::ReplaceValue(at, text)),
    ]
}

/// `seed` with `edits` applied in order, working on characters so every cut is valid UTF-8.
/// `ReplaceValue` rewrites what follows the first `separator` of a line.
fn mutate(seed: &str, edits: &[Edit], separator: char) -> String {
    let mut text = seed.to_owned();
    for edit in edits {
        let chars: Vec<char> = text.chars().collect();
        text = match edit {
            Edit::Delete(at, len) => {
                let start = at.index(chars.len() + 1);
                let end = (start + len).min(chars.len());
                chars[..start].iter().chain(&chars[end..]).collect()
            }
            Edit::Insert(at, fragment) => {
                let at = at.index(chars.len() + 1);
                let tail: String = chars[at..].iter().collect();
                chars[..at].iter().collect::<String>() + fragment + &tail
            }
            Edit::ReplaceValue(at, value) => {
                let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
                let index = at.index(lines.len().max(1));
                if let Some((key, _)) = lines.get(index).and_then(|l| l.split_once(separator)) {
                    lines[index] = format!("{key}{separator} {value}");
                }
                lines.join("\n")
            }
        };
    }
    text
}

/// A published store's files, read once: the manifest and weights of versions 0 and 1 and the
/// parameters published as each.
#[derive(Debug)]
struct Template {
    versions: Vec<(Vec<u8>, Vec<u8>, Vec<f32>)>,
}

const SPEC: ModelSpec = ModelSpec {
    architecture: Architecture::Mlp { hidden: 2 },
    features: 3,
    classes: 2,
};

fn template() -> &'static Template {
    static TEMPLATE: OnceLock<Template> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let store = ModelStore::open(dir.path()).unwrap();
        let mut versions = Vec::new();
        for version in 0..2u64 {
            let params: Vec<f32> = (0..SPEC.num_params())
                .map(|i| (i as f32 - 5.0) * 0.25 + version as f32)
                .collect();
            let draft = if version == 0 {
                ManifestDraft::initial(SPEC, Some(7), "0.1.0")
            } else {
                trained_draft(version - 1)
            };
            store.publish(draft, &params).unwrap();
            let version_dir = dir.path().join("versions").join(format!("{version:06}"));
            versions.push((
                fs::read(version_dir.join(MANIFEST_FILE)).unwrap(),
                fs::read(version_dir.join(WEIGHTS_FILE)).unwrap(),
                params,
            ));
        }
        Template { versions }
    })
}

/// A trained version's draft with every optional field filled, so that mutations reach them.
fn trained_draft(parent: u64) -> ManifestDraft {
    let mut strategy_params = serde_json::Map::new();
    strategy_params.insert("server_momentum".to_owned(), 0.7.into());
    ManifestDraft {
        parent: Some(parent),
        round: parent + 1,
        model: SPEC,
        init_seed: Some(7),
        strategy: "fedavgm".to_owned(),
        strategy_params,
        contributors: 2,
        metrics: [("train_loss".to_owned(), 0.25)].into_iter().collect(),
        example_privacy: ExamplePrivacy {
            max_epsilon: Epsilon::Finite(0.5),
            delta: Some(1e-5),
        },
        node_privacy: Some(NodePrivacy {
            epsilon: 1.5,
            delta: 1e-6,
            noise_multiplier: 1.1,
            update_clip_norm: 0.5,
            sampling_rate: 1.0,
            accountant: Accountant::Rdp,
            history: vec![Step {
                q: 1.0,
                sigma: 1.1,
                count: 1,
            }],
        }),
        dataset_fingerprints: vec![DatasetFingerprint {
            node: "org-a".to_owned(),
            sha256: "0f".repeat(32),
            rows: 40,
        }],
        code_version: "0.1.0".to_owned(),
    }
}

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|value| value.to_bits()).collect()
}

/// Writes the template store with `manifest` as version `damaged`'s manifest, opens it, and
/// reads every version through the store's API: the other version stays valid and serves its
/// parameters; the fuzzed one is either valid and serves exactly the published parameters, or
/// is listed as damaged and refused.
fn open_with_manifest(damaged: usize, manifest: &[u8]) {
    let template = template();
    let dir = tempfile::tempdir().unwrap();
    for (version, (manifest_bytes, weights, _)) in template.versions.iter().enumerate() {
        let version_dir = dir.path().join("versions").join(format!("{version:06}"));
        fs::create_dir_all(&version_dir).unwrap();
        let manifest_bytes = if version == damaged {
            manifest
        } else {
            manifest_bytes
        };
        fs::write(version_dir.join(MANIFEST_FILE), manifest_bytes).unwrap();
        fs::write(version_dir.join(WEIGHTS_FILE), weights).unwrap();
    }

    let store = ModelStore::open(dir.path()).expect("a store with a bad manifest still opens");
    let listing = store.list();
    assert_eq!(listing.len(), template.versions.len());
    let damaged_versions: Vec<u64> = store.damaged().iter().map(|(v, _)| *v).collect();

    for (version, (_, weights, params)) in template.versions.iter().enumerate() {
        let number = version as u64;
        let listed_valid = matches!(listing[version].status, VersionStatus::Valid(_));
        assert_eq!(listed_valid, !damaged_versions.contains(&number));
        if version != damaged {
            assert!(
                listed_valid,
                "an untouched version {version} was found damaged"
            );
        }

        match store.load(number) {
            Ok((manifest, loaded)) => {
                assert_eq!(manifest.version, number);
                assert_eq!(bits(&loaded), bits(params));
                assert_eq!(&store.weights_bytes(number).unwrap(), weights);
            }
            Err(err) => {
                assert_eq!(version, damaged, "{}", store::error_chain(&err));
                assert!(
                    matches!(err, StoreError::Damaged { .. }),
                    "version {version}: {err:?}"
                );
                assert!(store.manifest(number).is_err());
                assert!(!store::error_chain(&err).is_empty());
            }
        }
    }
    let latest = store.latest().map(|manifest| manifest.version);
    assert!(latest.is_some_and(|v| v < 2), "latest: {latest:?}");
}

/// A JSON value that a manifest field might be mistaken for.
fn json_value() -> impl Strategy<Value = Value> {
    let json = prop::sample::select(vec![
        "null",
        "true",
        "0",
        "-1",
        "1",
        "2",
        "1.5",
        "1e308",
        "-1e308",
        "18446744073709551615",
        "18446744073709551616",
        "\"\"",
        "\"NaN\"",
        "\"inf\"",
        "\"mlp\"",
        "\"logistic_regression\"",
        "\"00\"",
        "[]",
        "{}",
        "[1, 2]",
        "{\"mlp\": {\"hidden\": 0}}",
        "{\"mlp\": {\"hidden\": 18446744073709551615}}",
    ]);
    prop_oneof![
        4 => json.prop_map(|text| serde_json::from_str(text).unwrap()),
        1 => "\\PC{0,12}".prop_map(Value::String),
        1 => any::<u64>().prop_map(Value::from),
    ]
}

fn json_text() -> impl Strategy<Value = String> {
    json_value().prop_map(|value| value.to_string())
}

/// Replaces the `index`th value of `root` (depth first, the root first) with `with`, or
/// removes it from its object when `with` is `None`.
fn replace_nth(root: &mut Value, index: &mut usize, with: &Option<Value>) -> bool {
    let children: Vec<&mut Value> = match root {
        Value::Object(map) => {
            let key = map.keys().find(|_| {
                let hit = *index == 1;
                *index = index.saturating_sub(1);
                hit
            });
            if let Some(key) = key.cloned() {
                match with {
                    Some(value) => map[&key] = value.clone(),
                    None => {
                        map.remove(&key);
                    }
                }
                return true;
            }
            map.values_mut().collect()
        }
        Value::Array(items) => items.iter_mut().collect(),
        _ => Vec::new(),
    };
    children
        .into_iter()
        .any(|child| replace_nth(child, index, with))
}

/// A manifest may claim any model, and the weights hash does not cover the claim: a spec far
/// larger than its weights file must make the version damaged, not exhaust memory.
#[test]
fn manifest_claiming_a_model_larger_than_its_weights_damages_only_its_version() {
    let mut manifest: Value = serde_json::from_slice(&template().versions[1].0).unwrap();
    manifest["model"]["hidden"] = Value::from(1u64 << 40);
    open_with_manifest(1, manifest.to_string().as_bytes());
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_text_as_coordinator_config_parses_or_fails_cleanly(text in "\\PC{0,200}") {
        parse_config(&text);
    }

    #[test]
    fn mutated_coordinator_config_parses_or_fails_cleanly(
        edits in prop::collection::vec(edit(toml_token), 1..5),
    ) {
        parse_config(&mutate(COORDINATOR_CONFIG, &edits, '='));
    }

    #[test]
    fn arbitrary_bytes_as_manifest_damage_only_their_version(
        bytes in prop::collection::vec(any::<u8>(), 0..256),
        damaged in 0usize..2,
    ) {
        open_with_manifest(damaged, &bytes);
    }

    #[test]
    fn edited_manifest_text_damages_only_its_version(
        edits in prop::collection::vec(edit(json_text), 1..4),
        damaged in 0usize..2,
    ) {
        let text = String::from_utf8(template().versions[damaged].0.clone()).unwrap();
        open_with_manifest(damaged, mutate(&text, &edits, ':').as_bytes());
    }

    #[test]
    fn manifest_with_a_field_replaced_or_removed_damages_only_its_version(
        replacements in prop::collection::vec((0usize..64, prop::option::weighted(0.8, json_value())), 1..3),
        damaged in 0usize..2,
    ) {
        let mut manifest: Value =
            serde_json::from_slice(&template().versions[damaged].0).unwrap();
        for (index, with) in &replacements {
            // Index 0 is the root itself, which is never replaced.
            let mut index = index + 1;
            replace_nth(&mut manifest, &mut index, with);
        }
        open_with_manifest(damaged, manifest.to_string().as_bytes());
    }
}

/// A message of any kind, from any member or a stranger, with arbitrary fields.
fn secure_message() -> impl Strategy<Value = (usize, NodeMessage)> {
    use athanor_core::secagg::messages::{
        AdvertiseKeys, EncryptedShare, RevealedShare, ShareKeys, UnmaskResponse,
    };
    use athanor_core::secagg::{NodeId, RoundId};
    let bytes = || prop::collection::vec(any::<u8>(), 0..40);
    let ids = || prop::collection::vec(0u64..6, 0..4);
    let advertise = (0u32..5, 0u64..6, bytes(), bytes()).prop_map(|(stage, node, c, m)| {
        NodeMessage::AdvertiseKeys(AdvertiseKeys {
            round: RoundId(7),
            stage,
            node: NodeId(node),
            cipher_public_key: c,
            mask_public_key: m,
        })
    });
    let share = (0u32..5, 0u64..6, bytes(), ids(), bytes()).prop_map(
        |(stage, node, commitment, recipients, ciphertext)| {
            NodeMessage::ShareKeys(ShareKeys {
                round: RoundId(7),
                stage,
                node: NodeId(node),
                self_mask_commitment: commitment,
                shares: recipients
                    .into_iter()
                    .map(|r| EncryptedShare {
                        sender: NodeId(node),
                        recipient: NodeId(r),
                        ciphertext: ciphertext.clone(),
                    })
                    .collect(),
            })
        },
    );
    let unmask = (0u32..5, 0u64..6, ids(), bytes()).prop_map(|(stage, node, owners, share)| {
        NodeMessage::Unmask(UnmaskResponse {
            round: RoundId(7),
            stage,
            node: NodeId(node),
            self_mask_shares: owners
                .iter()
                .map(|&o| RevealedShare {
                    owner: NodeId(o),
                    share: share.clone(),
                })
                .collect(),
            mask_key_shares: Vec::new(),
        })
    });
    (0usize..4, prop_oneof![advertise, share, unmask])
}

fn secure_round_config() -> CoordinatorConfig {
    let mut config = CoordinatorConfig::parse(COORDINATOR_CONFIG, Path::new("fuzz.toml"))
        .expect("template parses");
    config.aggregation = Default::default();
    config
}

proptest! {
    #![proptest_config(config())]

    /// Whatever nodes send, in whatever order and whenever stages close, the coordinator's side
    /// of secure aggregation answers with an error or moves on; it never panics.
    #[test]
    fn arbitrary_secure_messages_are_refused_or_handled_without_panic(
        steps in prop::collection::vec(prop::option::weighted(0.85, secure_message()), 1..24),
    ) {
        let config = secure_round_config();
        let members: Vec<NodeId> = ["org-a", "org-b", "org-c"]
            .iter()
            .map(|n| NodeId((*n).to_string()))
            .collect();
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(3);
        let mut round = SecureRound::open(&config, &members, 8, &mut rng)
            .expect("a round for three members");
        let stranger = NodeId("org-z".into());
        for step in steps {
            match step {
                Some((sender, message)) => {
                    let sender = members.get(sender).unwrap_or(&stranger);
                    let _ = round.receive(sender, message);
                    let _ = round.outgoing(sender, 1);
                    let _ = round.outgoing(sender, 3);
                }
                None => {
                    round.close_stage(
                        std::time::Duration::from_millis(1),
                        tokio::time::Instant::now(),
                    );
                }
            }
        }
        let _ = round.finish();
    }
}
