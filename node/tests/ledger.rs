//! The privacy ledger and the budget it enforces: rounds stop exactly where the budget ends,
//! spending survives a restart, entries are on disk before an update could be sent, damage is
//! an error naming file and line, and the floor refuses weak plans.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use athanor_core::accountant::{Accountant, Step};
use athanor_core::noise::accounted_noise_multiplier;
use athanor_core::plan::{DpSgdRequest, RoundPlan};
use athanor_node::budget::{Budget, Review};
use athanor_node::data::{Dataset, Schema};
use athanor_node::ledger::{Entry, Ledger, LedgerError, Tail};
use athanor_node::{Error, Node, NodeConfig, Randomness};
use tempfile::TempDir;

const DELTA: f64 = 1e-5;
const FEDERATION: &str = "ledger-tests";
const COORDINATOR: &str = "https://127.0.0.1:50051";
/// Parameters of a logistic regression on Adult: 87 features, 2 classes.
const DIMENSION: usize = 87 * 2 + 2;

fn bundled(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../data")
        .join(name)
}

/// The bundled UCI Adult training file, loaded once for every test.
fn adult() -> &'static Dataset {
    static DATA: OnceLock<Dataset> = OnceLock::new();
    DATA.get_or_init(|| {
        let schema = Schema::load(bundled("adult.schema.toml")).expect("bundled schema loads");
        Dataset::load(bundled("adult_numeric_train.csv.gz"), &schema).expect("bundled data loads")
    })
}

/// A plan like the Adult example's: one local epoch in batches of 256, sigma 1.
fn plan() -> RoundPlan {
    RoundPlan {
        learning_rate: 0.5,
        local_epochs: 1.0,
        expected_batch_size: 256,
        dp: Some(DpSgdRequest {
            clip_norm: 1.0,
            noise_multiplier: 1.0,
        }),
    }
}

/// Node config text with the given budget, ledger and extra `[privacy]` lines.
fn config_text(epsilon: f64, ledger: &Path, extra: &str) -> String {
    format!(
        r#"
[node]
id = "clinic-a"

[coordinator]
address = "{COORDINATOR}"

[data]
path = "{data}"
schema = "{schema}"

[privacy]
epsilon = {epsilon}
delta = {DELTA:e}
ledger = "{ledger}"
min_noise_multiplier = 0.8
{extra}
"#,
        data = bundled("adult_numeric_train.csv.gz").display(),
        schema = bundled("adult.schema.toml").display(),
        ledger = ledger.display(),
        epsilon = toml_float(epsilon),
    )
}

/// A float as TOML writes it, exactly.
fn toml_float(x: f64) -> String {
    match x {
        x if x.is_nan() => "nan".into(),
        x if x.is_infinite() => "inf".into(),
        x => format!("{x:?}"),
    }
}

fn config(epsilon: f64, ledger: &Path, extra: &str) -> NodeConfig {
    NodeConfig::parse(&config_text(epsilon, ledger, extra), Path::new("node.toml"))
        .expect("test config is valid")
}

fn node(config: NodeConfig) -> Result<Node, Error> {
    let train = adult().clone();
    let test = train.subset(&[]);
    Node::new(config, train, test, Randomness::InsecureFixedSeed(7))
}

/// A budget that fits two and a half rounds of [`plan`] on the Adult rows exactly: the
/// epsilon of `5T/2` steps, where one round takes `T`.
fn budget_for_two_and_a_half_rounds() -> f64 {
    let rows = adult().rows();
    let steps = plan().steps(rows);
    let step = Step {
        q: plan().sampling_rate(rows),
        sigma: accounted_noise_multiplier(1.0, DIMENSION),
        count: steps * 5 / 2,
    };
    Accountant::Rdp
        .epsilon(&[step], DELTA)
        .expect("valid steps")
        .epsilon
}

/// Reviews `plan` and, if approved, records it as `round` the way the worker does.
fn try_round(node: &mut Node, round: u64, plan: &RoundPlan) -> Result<(), String> {
    match node.review(plan, DIMENSION).expect("review composes") {
        Review::Approved(approval) => {
            let receipt = node
                .pay(approval, round, FEDERATION, COORDINATOR)
                .expect("ledger append succeeds");
            assert_eq!(receipt.round(), round);
            Ok(())
        }
        Review::Declined(reason) => Err(reason),
    }
}

fn entry(round: u64, q: f64, sigma: Option<f64>, steps: u64) -> Entry {
    Entry {
        round,
        federation: FEDERATION.into(),
        coordinator: COORDINATOR.into(),
        time: "2026-12-01T10:00:00Z".into(),
        rows: 1000,
        q,
        sigma,
        clip_norm: sigma.map(|_| 1.0),
        steps,
    }
}

fn line(entry: &Entry) -> String {
    serde_json::to_string(entry).unwrap() + "\n"
}

#[test]
fn a_budget_of_two_and_a_half_rounds_trains_two_and_declines_the_third() {
    let dir = TempDir::new().unwrap();
    let ledger = dir.path().join("ledger.jsonl");
    let budget = budget_for_two_and_a_half_rounds();
    let mut node = node(config(budget, &ledger, "")).unwrap();

    assert_eq!(try_round(&mut node, 1, &plan()), Ok(()));
    assert_eq!(try_round(&mut node, 2, &plan()), Ok(()));
    let reason = try_round(&mut node, 3, &plan()).expect_err("third round exceeds the budget");
    assert!(reason.contains("privacy budget exceeded"), "{reason}");

    // Two rounds spent, composed exactly as the accountant composes 2T steps.
    let rows = adult().rows();
    let two_rounds = Step {
        q: plan().sampling_rate(rows),
        sigma: accounted_noise_multiplier(1.0, DIMENSION),
        count: 2 * plan().steps(rows),
    };
    let expected = Accountant::Rdp.epsilon(&[two_rounds], DELTA).unwrap();
    let spent = node.epsilon().unwrap();
    assert!((spent - expected.epsilon).abs() <= 1e-12 * spent, "{spent}");
    assert!(spent < budget);
    assert_eq!(Ledger::read(&ledger).unwrap().entries.len(), 2);
}

#[test]
fn the_ledger_survives_a_restart_and_keeps_declining() {
    let dir = TempDir::new().unwrap();
    let ledger = dir.path().join("state/ledger.jsonl");
    let budget = budget_for_two_and_a_half_rounds();

    let mut first = node(config(budget, &ledger, "")).unwrap();
    try_round(&mut first, 1, &plan()).unwrap();
    try_round(&mut first, 2, &plan()).unwrap();
    let spent = first.epsilon().unwrap();
    drop(first);

    let mut second = node(config(budget, &ledger, "")).unwrap();
    assert_eq!(second.ledger().entries().len(), 2);
    assert_eq!(second.ledger().tail(), Tail::Clean);
    assert_eq!(second.epsilon().unwrap(), spent);
    assert!(try_round(&mut second, 3, &plan()).is_err());
}

#[test]
fn an_entry_is_on_disk_before_pay_returns_its_receipt() {
    let dir = TempDir::new().unwrap();
    let ledger = dir.path().join("ledger.jsonl");
    let mut node = node(config(100.0, &ledger, "")).unwrap();

    let Review::Approved(approval) = node.review(&plan(), DIMENSION).unwrap() else {
        panic!("a round within a large budget is approved");
    };
    let charge = *approval.charge();
    let receipt = node.pay(approval, 41, FEDERATION, COORDINATOR).unwrap();

    // A separate reader, as a restarted node would be, already sees the whole entry.
    let text = fs::read_to_string(&ledger).unwrap();
    assert!(text.ends_with('\n'));
    let on_disk = Ledger::read(&ledger).unwrap();
    assert_eq!(on_disk.tail, Tail::Clean);
    assert_eq!(on_disk.entries.len(), receipt.line());
    let recorded = &on_disk.entries[receipt.line() - 1];
    assert_eq!(recorded.round, 41);
    assert_eq!(recorded.federation, FEDERATION);
    assert_eq!(recorded.coordinator, COORDINATOR);
    assert_eq!(recorded.q, charge.q);
    assert_eq!(recorded.steps, charge.steps);
    // The plan's sigma, reduced for the noise grid's rounding of the clipped sum.
    assert_eq!(
        recorded.sigma,
        Some(accounted_noise_multiplier(1.0, DIMENSION))
    );
    assert!(recorded.sigma.unwrap() < 1.0 && recorded.sigma.unwrap() > 0.9999);
    assert_eq!(recorded.clip_norm, Some(1.0));
    assert_eq!(recorded.rows, adult().rows() as u64);
    assert_eq!(recorded, &node.ledger().entries()[0]);
}

#[test]
fn a_new_ledger_and_its_directories_are_created_empty() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("a/b/ledger.jsonl");
    let ledger = Ledger::open(&path).unwrap();
    assert!(ledger.entries().is_empty());
    assert_eq!(fs::read(&path).unwrap(), b"");
}

#[test]
fn a_corrupt_line_is_an_error_naming_the_file_and_the_line() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("ledger.jsonl");
    let damaged = [
        (
            format!(
                "{}{{\"round\": 2, \"oops\n{}",
                line(&entry(1, 0.01, Some(1.0), 10)),
                line(&entry(3, 0.01, Some(1.0), 10))
            ),
            2,
        ),
        (line(&entry(1, 1.5, Some(1.0), 10)), 1),
        (line(&entry(1, 0.01, Some(-1.0), 10)), 1),
        (line(&entry(1, 0.01, Some(1.0), 0)), 1),
        (
            format!(
                "{}\n{}",
                line(&entry(1, 0.01, Some(1.0), 10)),
                line(&entry(2, 0.01, Some(1.0), 10))
            ),
            2,
        ),
        (
            line(&entry(1, 0.01, Some(1.0), 10)).replace("\"steps\"", "\"extra\":1,\"steps\""),
            1,
        ),
    ];
    for (text, bad_line) in damaged {
        fs::write(&path, &text).unwrap();

        let err = Ledger::open(&path).expect_err("a damaged ledger is refused");
        let LedgerError::Corrupt { path: p, line, .. } = &err else {
            panic!("expected a corrupt-ledger error, got {err:?}");
        };
        assert_eq!((p.as_path(), *line), (path.as_path(), bad_line), "{text}");
        let message = err.to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(message.contains(&format!("line {bad_line}")), "{message}");

        // The node refuses to start on it, and nothing was rewritten.
        let refused = node(config(100.0, &path, ""));
        assert!(matches!(
            refused,
            Err(Error::Ledger(LedgerError::Corrupt { .. }))
        ));
        assert_eq!(fs::read_to_string(&path).unwrap(), text);
    }
}

#[test]
fn a_torn_last_line_is_reported_then_dropped_and_the_ledger_goes_on() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("ledger.jsonl");
    let whole = line(&entry(1, 0.01, Some(1.0), 10)) + &line(&entry(2, 0.01, Some(1.0), 10));
    let torn = line(&entry(3, 0.01, Some(1.0), 10));
    fs::write(&path, format!("{whole}{}", &torn[..40])).unwrap();

    // Reading for a report leaves the file alone.
    let read = Ledger::read(&path).unwrap();
    assert_eq!(read.entries.len(), 2);
    assert_eq!(read.tail, Tail::Torn { line: 3, bytes: 40 });
    assert_eq!(fs::read(&path).unwrap().len(), whole.len() + 40);

    // Opening for training drops it and appends after the last whole line.
    let mut ledger = Ledger::open(&path).unwrap();
    assert_eq!(ledger.tail(), Tail::Torn { line: 3, bytes: 40 });
    assert_eq!(ledger.entries().len(), 2);
    assert_eq!(fs::read_to_string(&path).unwrap(), whole);
    let receipt = ledger.append(entry(3, 0.02, Some(1.2), 5)).unwrap();
    assert_eq!(receipt.line(), 3);
    drop(ledger);

    let reopened = Ledger::open(&path).unwrap();
    assert_eq!(reopened.tail(), Tail::Clean);
    assert_eq!(reopened.entries().len(), 3);
    assert_eq!(reopened.entries()[2].sigma, Some(1.2));
}

#[test]
fn a_whole_last_entry_without_its_newline_still_counts() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("ledger.jsonl");
    let text =
        line(&entry(1, 0.01, Some(1.0), 10)) + line(&entry(2, 0.01, Some(1.0), 10)).trim_end();
    fs::write(&path, &text).unwrap();

    let ledger = Ledger::open(&path).unwrap();
    assert_eq!(ledger.tail(), Tail::Unterminated { line: 2 });
    assert_eq!(ledger.entries().len(), 2);
    assert_eq!(fs::read_to_string(&path).unwrap(), text + "\n");
}

#[test]
fn a_second_writer_is_detected_before_an_append() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("ledger.jsonl");
    let mut mine = Ledger::open(&path).unwrap();
    let mut other = Ledger::open(&path).unwrap();
    let _receipt = other.append(entry(1, 0.01, Some(1.0), 10)).unwrap();

    let err = mine.append(entry(1, 0.01, Some(1.0), 10)).unwrap_err();
    assert!(matches!(err, LedgerError::ChangedOutside { .. }), "{err:?}");
    // The ledger stays shut until it is read again.
    let again = mine.append(entry(2, 0.01, Some(1.0), 10)).unwrap_err();
    assert!(matches!(again, LedgerError::Poisoned { .. }), "{again:?}");
    assert_eq!(Ledger::read(&path).unwrap().entries.len(), 1);
}

#[test]
fn an_invalid_entry_is_never_written() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("ledger.jsonl");
    let mut ledger = Ledger::open(&path).unwrap();
    let mut half = entry(1, 0.01, Some(1.0), 10);
    half.clip_norm = None;
    for bad in [
        entry(1, 0.0, Some(1.0), 10),
        entry(1, 0.01, Some(f64::NAN), 10),
        half,
    ] {
        let err = ledger.append(bad).unwrap_err();
        assert!(matches!(err, LedgerError::InvalidEntry { .. }), "{err:?}");
    }
    assert_eq!(fs::read(&path).unwrap(), b"");
}

#[test]
fn heterogeneous_entries_compose_like_the_accountant() {
    let entries = [
        entry(1, 0.01, Some(1.0), 100),
        entry(2, 0.02, Some(0.9), 50),
        entry(3, 0.01, Some(1.0), 100),
    ];
    let steps = [
        Step {
            q: 0.01,
            sigma: 1.0,
            count: 200,
        },
        Step {
            q: 0.02,
            sigma: 0.9,
            count: 50,
        },
    ];
    for accountant in [Accountant::Rdp, Accountant::Pld] {
        let budget = Budget {
            epsilon: 10.0,
            delta: DELTA,
            accountant,
            insecure_allow_no_dp: false,
        };
        let spent = budget.spent(&entries).unwrap();
        let expected = accountant.epsilon(&steps, DELTA).unwrap();
        assert!(
            (spent.epsilon - expected.epsilon).abs() <= 1e-12 * expected.epsilon,
            "{accountant:?}: {} vs {}",
            spent.epsilon,
            expected.epsilon
        );
        assert_eq!(spent.order, expected.order);
    }
}

#[test]
fn a_plan_below_the_noise_floor_is_refused() {
    let dir = TempDir::new().unwrap();
    let config = config(100.0, &dir.path().join("ledger.jsonl"), "");
    let rows = adult().rows();
    let mut weak = plan();
    weak.dp = Some(DpSgdRequest {
        clip_norm: 1.0,
        noise_multiplier: 0.5,
    });

    let reason = config.privacy.admit(&weak, rows).unwrap_err();
    assert!(reason.contains("below this node's floor 0.8"), "{reason}");
    assert_eq!(config.privacy.admit(&plan(), rows), Ok(()));

    let node = node(config).unwrap();
    let Review::Declined(reason) = node.review(&weak, DIMENSION).unwrap() else {
        panic!("the node approved sigma 0.5 below its floor 0.8");
    };
    assert!(reason.contains("floor"), "{reason}");
}

#[test]
fn a_round_without_dp_is_declined_unless_waived_and_then_spends_the_budget() {
    let dir = TempDir::new().unwrap();
    let mut no_dp = plan();
    no_dp.dp = None;

    let strict = node(config(100.0, &dir.path().join("strict.jsonl"), "")).unwrap();
    assert!(matches!(
        strict.review(&no_dp, DIMENSION).unwrap(),
        Review::Declined(_)
    ));

    let waived = config(
        100.0,
        &dir.path().join("waived.jsonl"),
        "insecure_allow_no_dp = true",
    );
    let mut node = node(waived).unwrap();
    try_round(&mut node, 1, &plan()).unwrap();
    try_round(&mut node, 2, &no_dp).unwrap();
    assert_eq!(node.epsilon().unwrap(), f64::INFINITY);
    assert_eq!(node.ledger().entries()[1].sigma, None);

    let reason = try_round(&mut node, 3, &plan()).unwrap_err();
    assert!(reason.contains("trained without DP in round 2"), "{reason}");
    assert_eq!(try_round(&mut node, 4, &no_dp), Ok(()));
}

#[test]
fn the_budget_is_required_positive_and_finite() {
    let ledger = Path::new("/nonexistent/ledger.jsonl");
    let without = config_text(1.0, ledger, "").replace("epsilon = 1.0\n", "");
    for (text, needle) in [
        (without, "epsilon"),
        (config_text(0.0, ledger, ""), "epsilon"),
        (config_text(f64::INFINITY, ledger, ""), "epsilon"),
        (config_text(f64::NAN, ledger, ""), "epsilon"),
        (
            config_text(1.0, ledger, "accountant = \"moments\""),
            "moments",
        ),
    ] {
        let err = NodeConfig::parse(&text, Path::new("node.toml")).unwrap_err();
        assert!(err.to_string().contains(needle), "{err}");
    }
    let pld = config(1.0, ledger, "accountant = \"pld\"");
    assert_eq!(pld.privacy.budget().accountant, Accountant::Pld);
}

#[test]
fn the_default_ledger_sits_next_to_the_data_file() {
    let dir = TempDir::new().unwrap();
    let file = dir.path().join("node.toml");
    let text = config_text(1.0, Path::new("unused"), "").replace("ledger = \"unused\"\n", "");
    fs::write(&file, text).unwrap();
    let config = NodeConfig::load(&file).unwrap();
    assert_eq!(
        config.ledger_path(),
        bundled("adult_numeric_train.csv.gz.privacy-ledger.jsonl")
    );

    let relative = config_text(1.0, Path::new("state/ledger.jsonl"), "");
    fs::write(&file, relative).unwrap();
    let config = NodeConfig::load(&file).unwrap();
    assert_eq!(config.ledger_path(), dir.path().join("state/ledger.jsonl"));
}

#[test]
fn budget_command_summarizes_the_ledger() {
    let dir = TempDir::new().unwrap();
    let ledger = dir.path().join("ledger.jsonl");
    let file = dir.path().join("node.toml");
    fs::write(&file, config_text(3.0, &ledger, "")).unwrap();
    let run = |json: bool| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_athanor-node"));
        command.args(["budget", "--config"]).arg(&file);
        if json {
            command.arg("--json");
        }
        let output = command.output().unwrap();
        assert!(output.status.success(), "{output:?}");
        String::from_utf8(output.stdout).unwrap()
    };

    // Before the node first starts, there is no ledger, and the command does not create one.
    let empty: serde_json::Value = serde_json::from_str(&run(true)).unwrap();
    assert_eq!(empty["exists"], false);
    assert_eq!(empty["entries"], 0);
    assert_eq!(empty["spent"], 0.0);
    assert!(!ledger.exists());

    let text = line(&entry(1, 0.01, Some(2.0), 100))
        + &line(&entry(2, 0.01, Some(2.0), 900))
        + &line(&entry(2, 0.01, Some(2.0), 9000));
    fs::write(&ledger, text).unwrap();
    let summary: serde_json::Value = serde_json::from_str(&run(true)).unwrap();
    assert_eq!(summary["entries"], 3);
    assert_eq!(summary["rounds"], 2);
    assert_eq!(summary["steps"], 10_000);
    assert_eq!(summary["accountant"], "rdp");
    assert_eq!(summary["delta"], DELTA);
    assert_eq!(summary["budget"], 3.0);
    assert_eq!(summary["order"], 8.9);
    // dp-accounting puts 10 000 steps at q = 0.01, sigma = 2 at epsilon 2.35291312878.
    let spent = summary["spent"].as_f64().unwrap();
    assert!((spent - 2.35291312878).abs() < 1e-6, "{spent}");
    let remaining = summary["remaining"].as_f64().unwrap();
    assert!((remaining - (3.0 - spent)).abs() < 1e-12);

    let text = run(false);
    assert!(
        text.contains("entries     3 (2 rounds, 10000 steps)"),
        "{text}"
    );
    assert!(text.contains("budget      epsilon 3.0000"), "{text}");
}

#[test]
fn budget_command_fails_on_a_corrupt_ledger_naming_the_line() {
    let dir = TempDir::new().unwrap();
    let ledger = dir.path().join("ledger.jsonl");
    let file = dir.path().join("node.toml");
    fs::write(&file, config_text(3.0, &ledger, "")).unwrap();
    fs::write(
        &ledger,
        line(&entry(1, 0.01, Some(2.0), 100)) + "not json\n",
    )
    .unwrap();

    let output = Command::new(env!("CARGO_BIN_EXE_athanor-node"))
        .args(["budget", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("line 2"), "{stderr}");
    assert!(stderr.contains(&ledger.display().to_string()), "{stderr}");
}

#[test]
fn an_approved_round_records_the_sampling_rate_of_the_batch_over_the_training_rows() {
    // Rows counted from the file itself, not from the loaded dataset: every line but the
    // header is one training row, since the test node holds none out.
    let mut text = String::new();
    let file = fs::File::open(bundled("adult_numeric_train.csv.gz")).unwrap();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(file), &mut text).unwrap();
    let rows = text.lines().skip(1).filter(|line| !line.is_empty()).count();
    assert_eq!(rows, adult().rows());
    let q = 256.0 / rows as f64;

    let dir = TempDir::new().unwrap();
    let ledger = dir.path().join("ledger.jsonl");
    let mut node = node(config(100.0, &ledger, "")).unwrap();
    try_round(&mut node, 1, &plan()).unwrap();

    let recorded = &Ledger::read(&ledger).unwrap().entries[0];
    assert_eq!(recorded.q, q);
    assert_eq!(recorded.rows, rows as u64);
    // One local epoch is 1 / q steps, rounded up; a rate derived from a count of batches
    // (one over ceil(rows / 256)) would differ from q in the fourth significant digit.
    assert_eq!(recorded.steps, (1.0 / q).ceil() as u64);
    let per_batch = 1.0 / rows.div_ceil(256) as f64;
    assert!(
        (recorded.q - per_batch).abs() > 1e-6,
        "{} vs {per_batch}",
        recorded.q
    );
}

#[test]
fn scaling_the_clipping_norm_scales_the_noise_and_leaves_epsilon_unchanged() {
    let dir = TempDir::new().unwrap();
    let ledger = dir.path().join("ledger.jsonl");
    let mut node = node(config(100.0, &ledger, "max_clip_norm = 4.0")).unwrap();
    // Some history first, so both plans are composed with the same earlier spending.
    try_round(&mut node, 1, &plan()).unwrap();

    // The noise's standard deviation is sigma C: 1.3 at C = 1, 5.2 at C = 4.
    let sigma = 1.3;
    let with_clip = |clip_norm: f64| {
        let mut plan = plan();
        plan.dp = Some(DpSgdRequest {
            clip_norm,
            noise_multiplier: sigma,
        });
        match node.review(&plan, DIMENSION).unwrap() {
            Review::Approved(approval) => approval,
            Review::Declined(reason) => panic!("clip norm {clip_norm} declined: {reason}"),
        }
    };
    let small = with_clip(1.0);
    let large = with_clip(4.0);

    assert_eq!(small.charge().dp.unwrap().clip_norm, 1.0);
    assert_eq!(large.charge().dp.unwrap().clip_norm, 4.0);
    assert_eq!(small.charge().charged_sigma, large.charge().charged_sigma);
    assert!(small.epsilon_after() > node.epsilon().unwrap());
    assert_eq!(small.epsilon_after(), large.epsilon_after());

    // A clipping norm above the node's limit is still refused.
    let mut above = plan();
    above.dp = Some(DpSgdRequest {
        clip_norm: 4.5,
        noise_multiplier: sigma,
    });
    assert!(matches!(
        node.review(&above, DIMENSION).unwrap(),
        Review::Declined(_)
    ));
}
