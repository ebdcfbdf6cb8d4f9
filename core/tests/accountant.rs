//! The privacy accountant against Google's dp-accounting 0.6.0 (`reference/`), and its
//! invariants over wider ranges than those rows.

use athanor_core::accountant::{
    Accountant, AccountantError, EpsilonReport, PldAccountant, RdpAccountant, Step, default_orders,
    sampled_gaussian_rdp,
};
use proptest::prelude::*;
use proptest::test_runner::RngSeed;

/// One row of `reference/dp_accounting.csv`.
#[derive(Debug)]
struct Row {
    case: String,
    q: f64,
    sigma: f64,
    steps: u64,
    delta: f64,
    eps_rdp: f64,
    order: f64,
    eps_pld: f64,
    interval: f64,
}

fn reference_rows() -> Vec<Row> {
    csv_records(include_str!("reference/dp_accounting.csv"))
        .map(|f| Row {
            case: f[0].to_string(),
            q: f[1].parse().unwrap(),
            sigma: f[2].parse().unwrap(),
            steps: f[3].parse().unwrap(),
            delta: f[4].parse().unwrap(),
            eps_rdp: f[5].parse().unwrap(),
            order: f[6].parse().unwrap(),
            eps_pld: f[7].parse().unwrap(),
            interval: f[8].parse().unwrap(),
        })
        .collect()
}

/// Data lines of a small comma-separated file, header skipped.
fn csv_records(text: &str) -> impl Iterator<Item = Vec<&str>> {
    text.lines()
        .skip(1)
        .filter(|line| !line.trim().is_empty())
        .map(|line| line.split(',').map(str::trim).collect())
}

fn one(q: f64, sigma: f64, count: u64) -> [Step; 1] {
    [Step { q, sigma, count }]
}

fn rel(got: f64, want: f64) -> f64 {
    (got - want).abs() / want.abs()
}

#[test]
fn rdp_epsilon_and_order_match_every_reference_row() {
    let mut worst = 0.0f64;
    for row in reference_rows() {
        let report = Accountant::Rdp
            .epsilon(&one(row.q, row.sigma, row.steps), row.delta)
            .unwrap();
        let err = rel(report.epsilon, row.eps_rdp);
        eprintln!(
            "rdp {:<20} steps {:>5}: {:.9} vs {:.9} (rel {err:.1e}), order {:?} vs {}",
            row.case, row.steps, report.epsilon, row.eps_rdp, report.order, row.order
        );
        assert!(err < 1e-3, "{row:?}: got {report:?}");
        let order = report.order.unwrap();
        assert!((order - row.order).abs() < 1e-9, "{row:?}: order {order}");
        worst = worst.max(err);
    }
    eprintln!("rdp: largest relative error {worst:.2e}");
}

#[test]
fn pld_epsilon_matches_every_reference_row_and_never_undercuts_it() {
    let mut worst = 0.0f64;
    for row in reference_rows() {
        let start = std::time::Instant::now();
        let mut acct = PldAccountant::with_interval(row.interval).unwrap();
        acct.compose(row.q, row.sigma, row.steps).unwrap();
        let report = acct.epsilon(row.delta).unwrap();
        let err = rel(report.epsilon, row.eps_pld);
        eprintln!(
            "pld {:<20} steps {:>5}: {:.9} vs {:.9} (rel {:+.1e}) in {:.0?}",
            row.case,
            row.steps,
            report.epsilon,
            row.eps_pld,
            (report.epsilon - row.eps_pld) / row.eps_pld,
            start.elapsed()
        );
        assert!(err < 1e-2, "{row:?}: got {report:?}");
        assert!(
            report.epsilon >= row.eps_pld * (1.0 - 1e-2),
            "{row:?}: got {report:?}"
        );
        assert!(report.epsilon < row.eps_rdp, "{row:?}: PLD above RDP");
        worst = worst.max(err);
    }
    eprintln!("pld: largest relative error {worst:.2e}");
}

#[test]
fn calibrated_sigma_matches_every_reference_row() {
    let mut worst = 0.0f64;
    for f in csv_records(include_str!("reference/dp_sigma_calibration.csv")) {
        let (q, steps, delta, target, want): (f64, u64, f64, f64, f64) = (
            f[1].parse().unwrap(),
            f[2].parse().unwrap(),
            f[3].parse().unwrap(),
            f[4].parse().unwrap(),
            f[5].parse().unwrap(),
        );
        let sigma = Accountant::Rdp
            .calibrate_sigma(q, steps, target, delta)
            .unwrap();
        let err = rel(sigma, want);
        eprintln!("calibration target {target}: sigma {sigma:.9} vs {want:.9} (rel {err:.1e})");
        assert!(err < 5e-3, "target {target}: sigma {sigma} vs {want}");
        worst = worst.max(err);

        // The answer meets the target, and a hair less noise does not.
        let at = |s: f64| Accountant::Rdp.epsilon(&one(q, s, steps), delta).unwrap();
        assert!(at(sigma).epsilon <= target);
        assert!(at(sigma * (1.0 - 1e-8)).epsilon > target);
    }
    eprintln!("calibration: largest relative error {worst:.2e}");
}

#[test]
fn full_sampling_is_the_gaussian_closed_form() {
    for sigma in [0.5, 1.0, 3.7] {
        for order in [1.1, 1.5, 2.0, 7.3, 64.0, 1024.0] {
            let closed = order / (2.0 * sigma * sigma);
            let exact = sampled_gaussian_rdp(1.0, sigma, order).unwrap();
            assert!(rel(exact, closed) < 1e-14);
            // The general formula approaches it as q -> 1.
            let near = sampled_gaussian_rdp(1.0 - 1e-10, sigma, order).unwrap();
            assert!(near <= closed * (1.0 + 1e-12));
            assert!(
                rel(near, closed) < 1e-6,
                "sigma {sigma} order {order}: {near}"
            );
        }
    }
}

#[test]
fn heterogeneous_composition_adds_the_curves() {
    let steps = [
        Step {
            q: 0.01,
            sigma: 1.3,
            count: 700,
        },
        Step {
            q: 0.05,
            sigma: 2.5,
            count: 40,
        },
        Step {
            q: 1.0,
            sigma: 8.0,
            count: 3,
        },
    ];
    let mut acct = RdpAccountant::new();
    for s in &steps {
        acct.compose(s.q, s.sigma, s.count).unwrap();
    }
    for (i, &order) in acct.orders().iter().enumerate() {
        let sum: f64 = steps
            .iter()
            .map(|s| s.count as f64 * sampled_gaussian_rdp(s.q, s.sigma, order).unwrap())
            .sum();
        assert!(rel(acct.rdp()[i], sum) < 1e-12, "order {order}");
    }
    let direct = Accountant::Rdp.epsilon(&steps, 1e-6).unwrap();
    assert_eq!(direct, acct.epsilon(1e-6).unwrap());

    // Composing in pieces is the same as composing at once.
    let mut pieces = RdpAccountant::new();
    pieces.compose(0.01, 1.3, 300).unwrap();
    pieces.compose(0.01, 1.3, 400).unwrap();
    let mut whole = RdpAccountant::new();
    whole.compose(0.01, 1.3, 700).unwrap();
    for (a, b) in pieces.rdp().iter().zip(whole.rdp()) {
        assert!(rel(*a, *b) < 1e-12);
    }
}

#[test]
fn delta_inverts_epsilon() {
    let steps = one(0.004, 1.1, 5_000);
    for kind in [Accountant::Rdp, Accountant::Pld] {
        let report = kind.epsilon(&steps, 1e-5).unwrap();
        let delta = kind.delta(&steps, report.epsilon).unwrap();
        assert!(rel(delta, 1e-5) < 1e-3, "{kind:?}: delta {delta}");
    }
}

#[test]
fn no_steps_spend_nothing() {
    let none = [Step {
        q: 0.1,
        sigma: 1.0,
        count: 0,
    }];
    for kind in [Accountant::Rdp, Accountant::Pld] {
        for steps in [&[][..], &none[..]] {
            let report = kind.epsilon(steps, 1e-5).unwrap();
            assert_eq!(
                report,
                EpsilonReport {
                    epsilon: 0.0,
                    delta: 1e-5,
                    order: None
                }
            );
            assert_eq!(kind.delta(steps, 0.0).unwrap(), 0.0);
        }
    }
    assert_eq!(
        Accountant::Rdp.calibrate_sigma(0.1, 0, 1.0, 1e-5),
        Err(AccountantError::ZeroSteps)
    );
}

#[test]
fn max_steps_is_the_last_count_within_budget() {
    let spent = [Step {
        q: 0.02,
        sigma: 1.5,
        count: 200,
    }];
    let (q, sigma, budget, delta) = (0.01, 1.2, 2.0, 1e-5);
    let n = Accountant::Rdp
        .max_steps(&spent, q, sigma, budget, delta)
        .unwrap();
    let at = |count| {
        let steps = [spent[0], Step { q, sigma, count }];
        Accountant::Rdp.epsilon(&steps, delta).unwrap().epsilon
    };
    assert!(n > 0);
    assert!(at(n) <= budget && at(n + 1) > budget, "n {n}");

    // A spent budget allows nothing more.
    assert_eq!(
        Accountant::Rdp.max_steps(&spent, q, sigma, 0.01, delta),
        Ok(0)
    );
}

#[test]
fn rdp_accountant_survives_a_json_round_trip() {
    let mut acct = RdpAccountant::new();
    acct.compose(0.01, 2.0, 1_000).unwrap();
    let json = serde_json::to_string(&acct).unwrap();
    let back: RdpAccountant = serde_json::from_str(&json).unwrap();
    // serde_json's default float parser may be one unit in the last place off.
    assert_eq!(back.orders(), acct.orders());
    for (a, b) in back.rdp().iter().zip(acct.rdp()) {
        assert!(rel(*a, *b) < 1e-15);
    }

    let bad = r#"{"orders":[2.0,3.0],"rdp":[0.1]}"#;
    assert!(serde_json::from_str::<RdpAccountant>(bad).is_err());
    let negative = r#"{"orders":[2.0],"rdp":[-0.1]}"#;
    assert!(serde_json::from_str::<RdpAccountant>(negative).is_err());
    let low_order = r#"{"orders":[1.0],"rdp":[0.1]}"#;
    assert!(serde_json::from_str::<RdpAccountant>(low_order).is_err());
}

#[test]
fn accountant_kind_is_lowercase_in_config() {
    assert_eq!(serde_json::to_string(&Accountant::Rdp).unwrap(), r#""rdp""#);
    assert_eq!(serde_json::to_string(&Accountant::Pld).unwrap(), r#""pld""#);
    let kind: Accountant = serde_json::from_str(r#""pld""#).unwrap();
    assert_eq!(kind, Accountant::Pld);
    assert!(serde_json::from_str::<Accountant>(r#""PLD""#).is_err());
}

#[test]
fn invalid_inputs_name_the_bad_value() {
    let kinds = [Accountant::Rdp, Accountant::Pld];
    for kind in kinds {
        for sigma in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let err = kind.epsilon(&one(0.1, sigma, 1), 1e-5).unwrap_err();
            assert!(matches!(err, AccountantError::InvalidSigma { .. }), "{err}");
        }
        for q in [0.0, -0.1, 1.5, f64::NAN] {
            let err = kind.epsilon(&one(q, 1.0, 1), 1e-5).unwrap_err();
            assert!(
                matches!(err, AccountantError::InvalidSamplingRate { .. }),
                "{err}"
            );
        }
        for delta in [0.0, 1.0, -1e-5, f64::NAN] {
            let err = kind.epsilon(&one(0.1, 1.0, 1), delta).unwrap_err();
            assert!(matches!(err, AccountantError::InvalidDelta { .. }), "{err}");
        }
        // A bad step is refused even when it was never taken.
        let err = kind.epsilon(&one(2.0, 1.0, 0), 1e-5).unwrap_err();
        assert_eq!(err, AccountantError::InvalidSamplingRate { q: 2.0 });
        for epsilon in [-0.5, f64::NAN, f64::INFINITY] {
            let err = kind.delta(&one(0.1, 1.0, 1), epsilon).unwrap_err();
            assert!(
                matches!(err, AccountantError::InvalidEpsilon { .. }),
                "{err}"
            );
        }
        for target in [0.0, -1.0, f64::NAN] {
            let err = kind.calibrate_sigma(0.1, 10, target, 1e-5).unwrap_err();
            assert!(
                matches!(err, AccountantError::InvalidTarget { .. }),
                "{err}"
            );
            let err = kind.max_steps(&[], 0.1, 1.0, target, 1e-5).unwrap_err();
            assert!(
                matches!(err, AccountantError::InvalidTarget { .. }),
                "{err}"
            );
        }
    }
    assert_eq!(
        sampled_gaussian_rdp(0.1, 1.0, 1.0),
        Err(AccountantError::InvalidOrder { order: 1.0 })
    );
    assert!(RdpAccountant::with_orders(&[]).is_err());
    assert!(RdpAccountant::with_orders(&[2.0, f64::NAN]).is_err());
    assert_eq!(
        PldAccountant::with_interval(0.0),
        Err(AccountantError::InvalidInterval { interval: 0.0 })
    );

    let message = AccountantError::InvalidSigma { sigma: -2.0 }.to_string();
    assert_eq!(
        message,
        "noise multiplier sigma must be positive and finite, got -2"
    );
}

#[test]
fn unreachable_targets_are_reported() {
    // Even infinite noise leaves the RDP conversion at about ln(1/δ)/1023 with these orders.
    let err = Accountant::Rdp
        .calibrate_sigma(0.01, 100, 1e-3, 1e-5)
        .unwrap_err();
    assert!(matches!(err, AccountantError::Unreachable { target, .. } if target == 1e-3));
}

#[test]
fn pld_is_tighter_than_rdp_on_a_grid() {
    for q in [1e-3, 0.01, 0.1, 1.0] {
        for sigma in [0.7, 1.5, 4.0] {
            for count in [1, 30, 1000] {
                let steps = one(q, sigma, count);
                let rdp = Accountant::Rdp.epsilon(&steps, 1e-5).unwrap().epsilon;
                let mut acct = PldAccountant::with_interval(1e-3).unwrap();
                acct.compose(q, sigma, count).unwrap();
                let pld = acct.epsilon(1e-5).unwrap().epsilon;
                assert!(
                    pld >= 0.0 && pld <= rdp,
                    "q {q} sigma {sigma} steps {count}: {pld} > {rdp}"
                );
            }
        }
    }
}

#[test]
fn pld_composes_heterogeneous_steps() {
    // The same mechanism under two entries (a sigma one ulp apart) composes like one entry.
    let sigma = 1.2;
    let split = [
        Step {
            q: 0.02,
            sigma,
            count: 300,
        },
        Step {
            q: 0.02,
            sigma: f64::from_bits(sigma.to_bits() + 1),
            count: 200,
        },
    ];
    let joint = Accountant::Pld
        .epsilon(&one(0.02, sigma, 500), 1e-6)
        .unwrap();
    let parts = Accountant::Pld.epsilon(&split, 1e-6).unwrap();
    assert!(
        rel(parts.epsilon, joint.epsilon) < 1e-6,
        "{parts:?} vs {joint:?}"
    );

    // Mixed steps land between their homogeneous neighbours and below RDP.
    let mixed = [
        Step {
            q: 0.01,
            sigma: 1.0,
            count: 400,
        },
        Step {
            q: 0.01,
            sigma: 2.0,
            count: 400,
        },
    ];
    let eps = |steps: &[Step], kind: Accountant| kind.epsilon(steps, 1e-5).unwrap().epsilon;
    let mixed_pld = eps(&mixed, Accountant::Pld);
    assert!(mixed_pld > eps(&one(0.01, 2.0, 800), Accountant::Pld));
    assert!(mixed_pld < eps(&one(0.01, 1.0, 800), Accountant::Pld));
    assert!(mixed_pld < eps(&mixed, Accountant::Rdp));

    // Composing step by step is the same as composing the merged list.
    let mut acct = PldAccountant::new();
    acct.compose(0.01, 1.0, 150).unwrap();
    acct.compose(0.01, 2.0, 400).unwrap();
    acct.compose(0.01, 1.0, 250).unwrap();
    assert_eq!(acct.steps(), &mixed[..]);
    assert_eq!(acct.epsilon(1e-5).unwrap().epsilon, mixed_pld);
}

#[test]
fn pld_calibration_and_budget_are_consistent() {
    let (q, steps, target, delta) = (0.01, 1_000, 1.0, 1e-5);
    let sigma = Accountant::Pld
        .calibrate_sigma(q, steps, target, delta)
        .unwrap();
    let at = |s: f64| {
        Accountant::Pld
            .epsilon(&one(q, s, steps), delta)
            .unwrap()
            .epsilon
    };
    assert!(at(sigma) <= target);
    assert!(at(sigma * (1.0 - 1e-4)) > target);
    // PLD needs less noise than RDP for the same target.
    let rdp_sigma = Accountant::Rdp
        .calibrate_sigma(q, steps, target, delta)
        .unwrap();
    assert!(sigma < rdp_sigma, "{sigma} vs {rdp_sigma}");

    let n = Accountant::Pld
        .max_steps(&[], q, sigma, target, delta)
        .unwrap();
    assert!(n >= steps, "{n}");
    assert!(at(sigma) <= target);
    let over = Accountant::Pld
        .epsilon(&one(q, sigma, n + 1), delta)
        .unwrap()
        .epsilon;
    assert!(over > target);
}

#[test]
fn pld_accountant_survives_a_json_round_trip() {
    let mut acct = PldAccountant::with_interval(5e-4).unwrap();
    acct.compose(0.01, 2.0, 1_000).unwrap();
    acct.compose(1.0, 3.0, 2).unwrap();
    let json = serde_json::to_string(&acct).unwrap();
    let back: PldAccountant = serde_json::from_str(&json).unwrap();
    assert_eq!(back, acct);

    let bad = r#"{"interval":1e-4,"steps":[{"q":0.0,"sigma":1.0,"count":3}]}"#;
    assert!(serde_json::from_str::<PldAccountant>(bad).is_err());
    let bad = r#"{"interval":-1.0,"steps":[]}"#;
    assert!(serde_json::from_str::<PldAccountant>(bad).is_err());
}

#[test]
fn default_orders_are_dp_accountings() {
    let orders = default_orders();
    assert_eq!(orders.len(), 99 + 53 + 4);
    assert_eq!(orders[0], 1.1);
    assert_eq!(orders[9], 2.0);
    assert_eq!(orders[98], 10.9);
    assert_eq!(orders[99], 11.0);
    assert_eq!(orders[151], 63.0);
    assert_eq!(&orders[152..], &[128.0, 256.0, 512.0, 1024.0]);
}

proptest! {
    // Fixed seed so that a failure reproduces; proptest prints the failing input.
    #![proptest_config(ProptestConfig {
        cases: 48,
        rng_seed: RngSeed::Fixed(0x5eed_acc0),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn rdp_epsilon_is_non_negative_and_monotone(
        q in 1e-5f64..1.0,
        sigma in 0.4f64..20.0,
        steps in 1u64..100_000,
        delta in 1e-12f64..0.1,
    ) {
        let eps = |q: f64, sigma: f64, steps: u64| {
            Accountant::Rdp.epsilon(&one(q, sigma, steps), delta).unwrap().epsilon
        };
        let base = eps(q, sigma, steps);
        prop_assert!(base >= 0.0);
        let slack = 1e-12 * (1.0 + base);
        prop_assert!(eps(q, sigma, steps + 1 + steps / 3) >= base - slack);
        prop_assert!(eps((q * 1.3).min(1.0), sigma, steps) >= base - slack);
        prop_assert!(eps(q, sigma * 1.2, steps) <= base + slack);
    }

    #[test]
    fn rdp_curve_is_monotone_in_order_and_q(
        q in 1e-6f64..1.0,
        sigma in 0.3f64..30.0,
        k in 0usize..156,
    ) {
        let orders = default_orders();
        let order = orders[k];
        let r = sampled_gaussian_rdp(q, sigma, order).unwrap();
        prop_assert!(r > 0.0 && r.is_finite());
        if k + 1 < orders.len() {
            let next = sampled_gaussian_rdp(q, sigma, orders[k + 1]).unwrap();
            prop_assert!(next >= r * (1.0 - 1e-10), "order {} -> {}: {} > {}", order, orders[k + 1], r, next);
        }
        let more_q = sampled_gaussian_rdp((q * 1.1).min(1.0), sigma, order).unwrap();
        prop_assert!(more_q >= r * (1.0 - 1e-10));
        // Never above the Gaussian mechanism's α/(2σ²).
        prop_assert!(r <= order / (2.0 * sigma * sigma) * (1.0 + 1e-10));
    }
}

proptest! {
    // Each case runs eight PLD compositions, so fewer cases than above.
    #![proptest_config(ProptestConfig {
        cases: 12,
        rng_seed: RngSeed::Fixed(0x5eed_acc1),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn pld_epsilon_is_non_negative_and_monotone(
        q in 1e-3f64..1.0,
        sigma in 0.6f64..5.0,
        steps in 1u64..300,
    ) {
        let eps = |q: f64, sigma: f64, steps: u64| {
            let mut acct = PldAccountant::with_interval(1e-3).unwrap();
            acct.compose(q, sigma, steps).unwrap();
            acct.epsilon(1e-5).unwrap().epsilon
        };
        let base = eps(q, sigma, steps);
        prop_assert!(base >= 0.0);
        // Same discretization, more steps: monotone up to FFT rounding.
        prop_assert!(eps(q, sigma, steps + 1 + steps / 2) >= base - 1e-9);
        // Other parameters discretize differently, which may move epsilon by a few intervals.
        let slack = 5e-3;
        prop_assert!(eps((q * 1.3).min(1.0), sigma, steps) >= base - slack);
        prop_assert!(eps(q, sigma * 1.2, steps) <= base + slack);
    }
}

/// The Rényi divergence of order `alpha` between the subsampled Gaussian's two output
/// distributions, by direct numerical integration of its defining integral
/// `A = E_{z ~ N(0, sigma^2)} [((1 - q) + q exp((2z - 1) / (2 sigma^2)))^alpha]`
/// (Mironov, Talwar, Zhang 2019, section 3), independent of the series the accountant uses.
fn rdp_by_quadrature(q: f64, sigma: f64, alpha: f64) -> f64 {
    let s2 = sigma * sigma;
    let log_integrand = |z: f64| {
        let log_ratio = (2.0 * z - 1.0) / (2.0 * s2);
        // ln((1 - q) + q e^r) without overflow.
        let log_mix = if log_ratio > 0.0 {
            log_ratio + ((1.0 - q) * (-log_ratio).exp() + q).ln()
        } else {
            ((1.0 - q) + q * log_ratio.exp()).ln()
        };
        -z * z / (2.0 * s2) + alpha * log_mix
    };
    // The integrand peaks below z = alpha and has width about sigma.
    let (lo, hi) = (-14.0 * sigma, alpha.max(1.0) + 14.0 * sigma);
    let n = 200_000;
    let h = (hi - lo) / n as f64;
    let logs: Vec<f64> = (0..=n).map(|i| log_integrand(lo + h * i as f64)).collect();
    let max = logs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = logs
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let weight = if i == 0 || i == n { 0.5 } else { 1.0 };
            weight * (l - max).exp()
        })
        .sum();
    let log_a = max + (sum * h).ln() - 0.5 * (2.0 * std::f64::consts::PI * s2).ln();
    log_a / (alpha - 1.0)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 40,
        rng_seed: RngSeed::Fixed(0x5eed_acc2),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Any (q, sigma) and any order, fractional ones included, not only the reference rows.
    #[test]
    fn rdp_matches_numerical_integration(
        q in 1e-4f64..1.0,
        sigma in 0.5f64..10.0,
        alpha in 1.05f64..64.0,
    ) {
        let exact = sampled_gaussian_rdp(q, sigma, alpha).unwrap();
        let quadrature = rdp_by_quadrature(q, sigma, alpha);
        prop_assert!(
            rel(exact, quadrature) < 1e-6 || (exact - quadrature).abs() < 1e-12,
            "q {} sigma {} alpha {}: series {} quadrature {}", q, sigma, alpha, exact, quadrature
        );
    }
}
