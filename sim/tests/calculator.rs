//! `athanor-sim privacy` is the node's calculator: same flags, same answers as core computes.

use std::process::{Command, Output};

use athanor_core::accountant::Accountant;
use athanor_core::accountant::calculator::{EpsilonQuery, SigmaQuery};
use serde_json::Value;

fn sim(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_athanor-sim"))
        .args(args)
        .output()
        .expect("the simulator binary runs")
}

/// `value` as the binary prints it and a reader parses it back: both sides of a comparison go
/// through the same float formatting and parsing.
fn printed<T: serde::Serialize>(value: &T) -> Value {
    serde_json::from_str(&serde_json::to_string(value).unwrap()).unwrap()
}

fn json(args: &[&str]) -> Value {
    let output = sim(args);
    assert!(output.status.success(), "{args:?}: {output:?}");
    serde_json::from_slice(&output.stdout).unwrap()
}

#[test]
fn epsilon_is_cores_answer_and_matches_the_reference() {
    let answer = json(&[
        "privacy", "epsilon", "--q", "0.01", "--sigma", "2", "--steps", "10000", "--delta", "1e-5",
        "--json",
    ]);
    let core = EpsilonQuery {
        q: 0.01,
        sigma: 2.0,
        steps: 10_000,
        delta: 1e-5,
        accountant: Accountant::Rdp,
    }
    .answer()
    .unwrap();
    assert_eq!(answer, printed(&core));
    // `abadi2016_mnist` in core/tests/reference/dp_accounting.csv: 2.35291312878 at order 8.9.
    let epsilon = answer["epsilon"].as_f64().unwrap();
    assert!((epsilon - 2.35291312878).abs() < 1e-6, "{answer}");
    assert_eq!(answer["order"], 8.9);
}

#[test]
fn sigma_is_cores_answer() {
    let answer = json(&[
        "privacy",
        "sigma",
        "--q",
        "0.01",
        "--steps",
        "1000",
        "--delta",
        "1e-5",
        "--epsilon",
        "1",
        "--accountant",
        "pld",
        "--json",
    ]);
    let core = SigmaQuery {
        q: 0.01,
        steps: 1000,
        delta: 1e-5,
        epsilon: 1.0,
        accountant: Accountant::Pld,
    }
    .answer()
    .unwrap();
    assert_eq!(answer, printed(&core));
}

#[test]
fn simulator_refuses_a_sampling_rate_above_one() {
    let output = sim(&[
        "privacy", "epsilon", "--q", "2", "--sigma", "1", "--steps", "1", "--delta", "1e-5",
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("sampling rate q must be in (0, 1]"),
        "{stderr}"
    );
}
