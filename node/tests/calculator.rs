//! `athanor-node privacy`: the calculator against Google's dp-accounting reference values,
//! its JSON shape, and its refusal of inputs outside their domains.

use std::process::{Command, Output};

use serde_json::Value;

/// `tfprivacy_tutorial` in `core/tests/reference/dp_accounting.csv`: TF Privacy's MNIST
/// tutorial, 60 000 examples in batches of 256, sigma 1.1, 14 063 steps, delta 1e-5.
const Q: &str = "0.00426666666667";
const SIGMA: &str = "1.1";
const STEPS: &str = "14063";
const DELTA: &str = "1e-05";
const EPS_RDP: f64 = 2.59665552868;
const EPS_RDP_ORDER: f64 = 8.1;
const EPS_PLD: f64 = 2.38177881258;

fn node(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_athanor-node"))
        .args(args)
        .output()
        .expect("the node binary runs")
}

fn json(args: &[&str]) -> Value {
    let output = node(args);
    assert!(output.status.success(), "{args:?}: {output:?}");
    let text = String::from_utf8(output.stdout).unwrap();
    assert_eq!(
        text.lines().count(),
        1,
        "one JSON object on one line: {text}"
    );
    serde_json::from_str(&text).unwrap()
}

fn epsilon_args(accountant: &str) -> Vec<&str> {
    vec![
        "privacy",
        "epsilon",
        "--q",
        Q,
        "--sigma",
        SIGMA,
        "--steps",
        STEPS,
        "--delta",
        DELTA,
        "--accountant",
        accountant,
        "--json",
    ]
}

#[test]
fn rdp_epsilon_matches_the_reference_row_with_its_order() {
    let answer = json(&epsilon_args("rdp"));
    let epsilon = answer["epsilon"].as_f64().unwrap();
    assert!((epsilon - EPS_RDP).abs() / EPS_RDP < 1e-6, "{answer}");
    assert_eq!(answer["order"], EPS_RDP_ORDER);
    assert_eq!(answer["accountant"], "rdp");
    assert_eq!(answer["q"], 0.00426666666667);
    assert_eq!(answer["sigma"], 1.1);
    assert_eq!(answer["steps"], 14063);
    assert_eq!(answer["delta"], 1e-5);
}

#[test]
fn pld_epsilon_matches_the_reference_row_within_its_discretization() {
    // Same interval as the reference (1e-4); the two discretizations differ slightly.
    let answer = json(&epsilon_args("pld"));
    let epsilon = answer["epsilon"].as_f64().unwrap();
    assert!((epsilon - EPS_PLD).abs() / EPS_PLD < 5e-3, "{answer}");
    assert_eq!(answer["accountant"], "pld");
    assert_eq!(answer["order"], Value::Null);
}

#[test]
fn rdp_is_the_default_accountant() {
    let mut args = epsilon_args("rdp");
    args.retain(|a| *a != "--accountant" && *a != "rdp");
    assert_eq!(json(&args), json(&epsilon_args("rdp")));
}

#[test]
fn sigma_matches_the_reference_calibration_and_meets_its_target() {
    // `dp_sigma_calibration.csv`: sigma 1.01402095003 for epsilon 3 at the same q and steps.
    let answer = json(&[
        "privacy",
        "sigma",
        "--q",
        Q,
        "--steps",
        STEPS,
        "--delta",
        DELTA,
        "--epsilon",
        "3",
        "--json",
    ]);
    let sigma = answer["sigma"].as_f64().unwrap();
    assert!((sigma - 1.01402095003).abs() < 1e-6, "{answer}");
    assert!(answer["epsilon"].as_f64().unwrap() <= 3.0, "{answer}");
    assert_eq!(answer["target_epsilon"], 3.0);
    assert!(answer["order"].as_f64().is_some(), "{answer}");
}

#[test]
fn text_output_names_epsilon_delta_and_order() {
    let mut args = epsilon_args("rdp");
    args.pop();
    let output = node(&args);
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(text.contains("epsilon     2.596656"), "{text}");
    assert!(text.contains("rdp (best order 8.1)"), "{text}");
}

#[test]
fn inputs_outside_their_domains_fail_with_a_message() {
    let cases: &[(&[&str], &str)] = &[
        (
            &[
                "--q", "0", "--sigma", "1", "--steps", "10", "--delta", "1e-5",
            ],
            "sampling rate q",
        ),
        (
            &[
                "--q", "1.5", "--sigma", "1", "--steps", "10", "--delta", "1e-5",
            ],
            "sampling rate q",
        ),
        (
            &[
                "--q", "0.1", "--sigma", "0", "--steps", "10", "--delta", "1e-5",
            ],
            "sigma",
        ),
        (
            &[
                "--q", "0.1", "--sigma", "-1", "--steps", "10", "--delta", "1e-5",
            ],
            "sigma",
        ),
        (
            &[
                "--q", "0.1", "--sigma", "NaN", "--steps", "10", "--delta", "1e-5",
            ],
            "sigma",
        ),
        (
            &[
                "--q", "0.1", "--sigma", "1", "--steps", "0", "--delta", "1e-5",
            ],
            "steps",
        ),
        (
            &[
                "--q", "0.1", "--sigma", "1", "--steps", "10", "--delta", "0",
            ],
            "delta",
        ),
        (
            &[
                "--q", "0.1", "--sigma", "1", "--steps", "10", "--delta", "1",
            ],
            "delta",
        ),
        (
            &[
                "--q", "0.1", "--sigma", "1", "--steps", "-3", "--delta", "1e-5",
            ],
            "steps",
        ),
        (
            &[
                "--q", "a", "--sigma", "1", "--steps", "10", "--delta", "1e-5",
            ],
            "--q",
        ),
    ];
    for (flags, needle) in cases {
        let mut args = vec!["privacy", "epsilon"];
        args.extend_from_slice(flags);
        let output = node(&args);
        assert!(!output.status.success(), "{args:?} succeeded");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }

    let output = node(&[
        "privacy",
        "sigma",
        "--q",
        "0.1",
        "--steps",
        "10",
        "--delta",
        "1e-5",
        "--epsilon",
        "-1",
    ]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("target epsilon"));
}

#[test]
fn help_explains_every_flag() {
    for (command, flags) in [
        (
            "epsilon",
            &[
                "--q",
                "--sigma",
                "--steps",
                "--delta",
                "--accountant",
                "--json",
            ][..],
        ),
        (
            "sigma",
            &[
                "--q",
                "--epsilon",
                "--steps",
                "--delta",
                "--accountant",
                "--json",
            ][..],
        ),
    ] {
        let output = node(&["privacy", command, "--help"]);
        assert!(output.status.success());
        let help = String::from_utf8(output.stdout).unwrap();
        for flag in flags {
            assert!(help.contains(flag), "{command} --help lacks {flag}: {help}");
        }
        assert!(help.contains("(0, 1]"), "{help}");
    }
}
