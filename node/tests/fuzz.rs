//! No input makes the node panic while reading its configuration, its schema or its data:
//! arbitrary bytes and near-valid text fed to the loaders come back as `Ok` or as an error that
//! displays, and whatever loads is well formed.
//!
//! Property tests with a fixed seed, so a failure reproduces; proptest prints the input.

use std::io::Write;
use std::path::Path;

use athanor_node::NodeConfig;
use athanor_node::data::{DataError, Dataset, Schema};
use flate2::Compression;
use flate2::write::GzEncoder;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::RngSeed;

/// Three listed features with bounds, extra columns rejected.
const LISTED_SCHEMA: &str = r#"
classes = 3

[features]
columns = ["a", "b", "c"]
default_bounds = [0, 10]

[features.bounds]
c = [-1, 1]
"#;

/// Every column but the label is a feature, extra columns ignored.
const ALL_SCHEMA: &str = r#"
label = "label"
classes = 2
extra_columns = "ignore"

[features]
columns = "all"
default_bounds = [-5, 5]
log_scale = []
"#;

/// A schema using ranges, log scaling and per-feature bounds, to mutate.
const RANGE_SCHEMA: &str = r#"
label = "y"
classes = 4
extra_columns = "reject"

[features]
columns = ["px{0..3}", "gain", "age"]
default_bounds = [0, 255]
log_scale = ["gain"]

[features.bounds]
gain = [0, 99999]
age = [17, 90]
"#;

/// A complete node configuration, to mutate.
const NODE_CONFIG: &str = r#"
[node]
id = "org-a"

[coordinator]
address = "https://127.0.0.1:50051"
max_backoff_secs = 30

[tls]
ca = "certs/ca.crt"
cert = "certs/node.crt"
key = "certs/node.key"
server_name = "coordinator"

[data]
path = "train.csv.gz"
schema = "train.schema.toml"
test_fraction = 0.1
split_seed = 3

[privacy]
epsilon = 2.0
delta = 1e-5
accountant = "rdp"
ledger = "org-a.privacy-ledger.jsonl"
min_noise_multiplier = 1.5
max_clip_norm = 1.0
max_sampling_rate = 0.05
insecure_allow_no_dp = false
"#;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 300,
        rng_seed: RngSeed::Fixed(0x00a7_4a70),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn schema(all_columns: bool) -> Schema {
    let text = if all_columns {
        ALL_SCHEMA
    } else {
        LISTED_SCHEMA
    };
    Schema::from_toml_str(text, "fuzz.schema.toml").expect("the test schemas are valid")
}

/// What every loaded dataset must satisfy: consistent sizes, features scaled into [0, 1] and
/// labels below the number of classes.
fn assert_well_formed(dataset: &Dataset) {
    assert!(dataset.rows() > 0, "a dataset without rows loaded");
    assert_eq!(dataset.features().len(), dataset.rows() * dataset.cols());
    assert_eq!(dataset.labels().len(), dataset.rows());
    assert_eq!(dataset.feature_names().len(), dataset.cols());
    assert!(dataset.features().iter().all(|x| (0.0..=1.0).contains(x)));
    assert!(dataset.labels().iter().all(|&y| y < dataset.classes()));
}

/// Writes `bytes` to `name` in a new temporary directory and loads it: either a well-formed
/// dataset or an error whose message is not empty.
fn load_file(name: &str, bytes: &[u8], all_columns: bool) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).unwrap();

    match Dataset::load(&path, &schema(all_columns)) {
        Ok(dataset) => assert_well_formed(&dataset),
        Err(err) => assert_error_displays(&err),
    }
}

fn assert_error_displays(err: &DataError) {
    let message = err.to_string();
    assert!(!message.is_empty(), "an error without a message: {err:?}");
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

/// One CSV cell: mostly numbers and labels, with the awkward cases mixed in.
fn cell() -> impl Strategy<Value = String> {
    let awkward = prop::sample::select(vec![
        "NaN",
        "nan",
        "inf",
        "-inf",
        "Infinity",
        "1e999",
        "-1e-400",
        "99999999999999999999999999999",
        "-0",
        "",
        " ",
        " 3 ",
        "\"2\"",
        "\"",
        "\"1,2\"",
        "3.",
        ".5",
        "1_0",
        "0x10",
        "+1",
        "-",
        "e5",
        "\u{661}",
        "\u{1d7d9}",
        "\u{feff}1",
        "1\u{0}",
        "4294967296",
        "-1",
    ]);
    prop_oneof![
        4 => (0u32..4).prop_map(|y| y.to_string()),
        4 => (-20.0f64..20.0).prop_map(|x| x.to_string()),
        1 => any::<f64>().prop_map(|x| x.to_string()),
        3 => awkward.prop_map(str::to_owned),
        1 => "\\PC{0,6}",
        1 => "\\PC{30,80}",
    ]
}

/// One header cell: the schema's names, unknown names, duplicates and oddities.
fn header_cell() -> impl Strategy<Value = String> {
    let names = prop::sample::select(vec![
        "a", "b", "c", "label", "d", "A", " a", "label ", "", "\"b\"", "é",
    ]);
    prop_oneof![
        6 => names.prop_map(str::to_owned),
        1 => "\\PC{0,6}",
    ]
}

/// Text close to a valid data file: a header (usually a valid one), then rows of random cells,
/// some of them ragged, with random line endings, byte order mark and trailing newline.
fn near_valid_csv() -> impl Strategy<Value = String> {
    let valid_header = Just(
        vec!["b", "label", "a", "c"]
            .into_iter()
            .map(str::to_owned)
            .collect(),
    );
    let header = prop_oneof![3 => valid_header, 1 => prop::collection::vec(header_cell(), 0..6)];
    let row = prop_oneof![
        4 => prop::collection::vec(cell(), 4..=4),
        1 => prop::collection::vec(cell(), 0..7),
    ];
    let rows = prop::collection::vec(row, 0..8);
    let line_end = prop::sample::select(vec!["\n", "\r\n", "\r"]);
    (header, rows, line_end, any::<bool>(), any::<bool>()).prop_map(
        |(header, rows, line_end, bom, trailing)| {
            let mut text = String::new();
            if bom {
                text.push('\u{feff}');
            }
            let lines: Vec<String> = std::iter::once(header)
                .chain(rows)
                .map(|cells| cells.join(","))
                .collect();
            text.push_str(&lines.join(line_end));
            if trailing {
                text.push_str(line_end);
            }
            text
        },
    )
}

/// Fragments that are meaningful to TOML or to the parsers' checks.
fn toml_token() -> impl Strategy<Value = String> {
    let tokens = prop::sample::select(vec![
        "=",
        "[",
        "]",
        "[[privacy]]",
        "[features]",
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
        "\"\"",
        "\" \"",
        "true",
        "[]",
        "[0, 0]",
        "[1, 0]",
        "[-1e308, 1e308]",
        "\"all\"",
        "\"px{0..1048576}\"",
        "\"px{5..2}\"",
        "\"px{0..}\"",
        "\"px{0..99999999999999999999}\"",
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

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<Index>(), 1usize..24).prop_map(|(at, len)| Edit::Delete(at, len)),
        (any::<Index>(), toml_token()).prop_map(|(at, text)| Edit::Insert(at, text)),
        (any::<Index>(), toml_token()).prop_map(|(at, text)| Edit::ReplaceValue(at, text)),
    ]
}

/// `seed` with `edits` applied in order, working on characters so every cut is valid UTF-8.
fn mutate(seed: &str, edits: &[Edit]) -> String {
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
                if let Some((key, _)) = lines.get(index).and_then(|line| line.split_once('=')) {
                    lines[index] = format!("{key}= {value}");
                }
                lines.join("\n")
            }
        };
    }
    text
}

fn parse_node_config(text: &str) {
    match NodeConfig::parse(text, Path::new("fuzz-node.toml")) {
        Ok(config) => {
            // What validation promises the rest of the node.
            let privacy = &config.privacy;
            assert!(privacy.epsilon.is_finite() && privacy.epsilon > 0.0);
            assert!(privacy.delta > 0.0 && privacy.delta < 1.0);
            assert!((0.0..1.0).contains(&config.data.test_fraction));
            assert!(!config.ledger_path().as_os_str().is_empty());
        }
        Err(err) => {
            let message = err.to_string();
            assert!(message.contains("fuzz-node.toml"), "{message}");
        }
    }
}

fn parse_schema(text: &str) {
    match Schema::from_toml_str(text, "fuzz.schema.toml") {
        Ok(schema) => {
            assert!(schema.classes() >= 2);
            assert!(!schema.label().is_empty());
            assert_eq!(schema.label(), schema.label().trim());
        }
        Err(err) => assert_error_displays(&err),
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_bytes_as_csv_load_or_fail_cleanly(
        bytes in prop::collection::vec(any::<u8>(), 0..512),
        all_columns in any::<bool>(),
    ) {
        load_file("data.csv", &bytes, all_columns);
    }

    #[test]
    fn near_valid_csv_loads_well_formed_or_fails_cleanly(
        text in near_valid_csv(),
        all_columns in any::<bool>(),
    ) {
        load_file("data.csv", text.as_bytes(), all_columns);
    }

    #[test]
    fn arbitrary_bytes_as_gzip_load_or_fail_cleanly(
        bytes in prop::collection::vec(any::<u8>(), 0..512),
        with_magic in any::<bool>(),
    ) {
        // With gzip's magic number the decoder gets past the first check and reads the rest.
        let mut contents = if with_magic { vec![0x1f, 0x8b, 0x08] } else { Vec::new() };
        contents.extend_from_slice(&bytes);
        load_file("data.csv.gz", &contents, false);
    }

    #[test]
    fn truncated_or_damaged_gzip_of_near_valid_csv_fails_cleanly(
        text in near_valid_csv(),
        cut in any::<Index>(),
        flip in any::<Option<(Index, u8)>>(),
    ) {
        let mut contents = gzip(text.as_bytes());
        contents.truncate(cut.index(contents.len() + 1));
        if let Some((at, mask)) = flip.filter(|_| !contents.is_empty()) {
            let at = at.index(contents.len());
            contents[at] ^= mask;
        }
        load_file("data.csv.gz", &contents, false);
    }

    #[test]
    fn arbitrary_text_as_node_config_parses_or_fails_cleanly(text in "\\PC{0,200}") {
        parse_node_config(&text);
    }

    #[test]
    fn mutated_node_config_parses_or_fails_cleanly(
        edits in prop::collection::vec(edit(), 1..5),
    ) {
        parse_node_config(&mutate(NODE_CONFIG, &edits));
    }

    #[test]
    fn arbitrary_text_as_schema_parses_or_fails_cleanly(text in "\\PC{0,200}") {
        parse_schema(&text);
    }

    #[test]
    fn mutated_schema_parses_or_fails_cleanly(
        seed in prop::sample::select(vec![LISTED_SCHEMA, ALL_SCHEMA, RANGE_SCHEMA]),
        edits in prop::collection::vec(edit(), 1..5),
    ) {
        parse_schema(&mutate(seed, &edits));
    }
}

/// Secure-aggregation parameters as a coordinator might send them: a valid set with each
/// field, independently, replaced by an arbitrary value now and then, so that most cases
/// differ from a good task in one or two places.
fn secure_task() -> impl Strategy<Value = athanor_proto::v1::SecureAggregation> {
    use athanor_proto::v1::{Quantization, SecureAggregation};
    fn or<T: Clone + std::fmt::Debug + 'static>(
        good: T,
        any: impl Strategy<Value = T> + 'static,
    ) -> BoxedStrategy<T> {
        prop_oneof![17 => Just(good), 3 => any].boxed()
    }
    let quantization = (
        (
            or(10u64, 0u64..3000),
            or(1.0f64, prop::num::f64::ANY),
            or(1.0f64 / 1024.0, prop::num::f64::ANY),
        ),
        or(Vec::new(), prop::collection::vec(any::<u8>(), 0..40)),
        (
            or(None, prop::option::of(prop::num::f64::ANY)),
            or(2u64, 0u64..8),
        ),
        (or(3u64, 0u64..12), or(40u32, 0u32..140)),
    )
        .prop_map(
            |(
                (dimension, clip_norm, granularity),
                rotation_seed,
                (noise_sum_std, noise_min),
                (max, tail),
            )| {
                Quantization {
                    dimension,
                    clip_norm,
                    granularity,
                    rotation_seed,
                    noise_sum_std,
                    noise_min_survivors: noise_min,
                    max_contributors: max,
                    tail_bits: tail,
                }
            },
        );
    (
        (any::<u64>(), or(1u64, 0u64..8)),
        or(vec![1u64, 2, 3], prop::collection::vec(0u64..8, 0..8)),
        (or(10u64, 0u64..5000), or(32u32, 0u32..70)),
        (
            or(10u64, 0u64..10),
            or(2u64, 0u64..10),
            or(67u32, 0u32..120),
            or(2u64, 0u64..8),
        ),
        or(true, any::<bool>()),
        quantization,
    )
        .prop_map(
            |(
                (round, node),
                cohort,
                (vector_len, ring_bits),
                (complete, degree, threshold, min),
                has_q,
                q,
            )| {
                SecureAggregation {
                    protocol_round: round,
                    node,
                    cohort,
                    vector_len,
                    ring_bits,
                    complete_graph_max: complete,
                    degree,
                    threshold_percent: threshold,
                    min_survivors: min,
                    quantization: has_q.then_some(q),
                }
            },
        )
}

proptest! {
    #![proptest_config(config())]

    /// Whatever secure-aggregation parameters a task carries, the node accepts them as a
    /// consistent whole or names what is wrong; it never panics.
    #[test]
    fn arbitrary_secure_aggregation_parameters_are_checked_without_panic(task in secure_task()) {
        let accepted = athanor_node::client::secure_from_wire(task);
        if let Ok(secure) = accepted {
            // What it accepts is usable: the quantizer encodes a zero update of its dimension.
            let zeros = vec![0.0f32; secure.quantizer.config().dimension];
            let mut rng = <rand_chacha::ChaCha20Rng as rand::SeedableRng>::seed_from_u64(1);
            let encoded = secure.quantizer.encode(&zeros, &mut rng).expect("zeros encode");
            prop_assert_eq!(encoded.len(), secure.config.vector_len);
        }
    }
}
