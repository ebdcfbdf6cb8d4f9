//! Node-level differential privacy of the published models, in plain aggregation.
//!
//! Example-level DP-SGD protects each record inside a node; it says nothing about whether an
//! organization took part at all, or how its data as a whole shifted the model. Node-level DP
//! does (DP-FedAvg, McMahan, Ramage, Talwar, Zhang 2018): every node's whole update is
//! clipped to L2 norm `S`, the clipped updates are summed, and Gaussian noise of standard
//! deviation `z * S` is added to every coordinate of the sum before anything is published.
//! Adding or removing one node moves the sum by at most `S`, so each published round is the
//! Gaussian mechanism with noise multiplier `z`; when the cohort is Poisson-sampled from the
//! connected nodes with rate `q`, it is the Poisson-subsampled Gaussian mechanism that the
//! core accountants bound. Rounds compose over the whole lineage, which every manifest
//! records, so the figure survives restarts and can be recomputed by an auditor.
//!
//! In plain mode the coordinator sees every update, so the guarantee is towards the people
//! who receive published models, not towards the coordinator's operator; secure
//! aggregation closes that gap.
//!
//! Known shortcoming: the noised sum is divided by the number of contributors, and that
//! count is published in the manifest. The count is not protected by the noise; a fixed
//! public denominator (the expected cohort size) would protect it at the price of a biased
//! average when nodes drop out.

use athanor_core::accountant::{Accountant, EpsilonReport, Step};
use athanor_core::noise::add_gaussian_noise;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use tracing::{debug, warn};

use crate::Error;
use crate::config::NodePrivacySection;
use crate::store::{Manifest, NodePrivacy};

/// The coordinator's node-level mechanism and its spending so far.
#[derive(Debug)]
pub struct NodeLevelDp {
    settings: NodePrivacySection,
    history: Vec<Step>,
    rng: ChaCha20Rng,
}

/// What a published round would cost.
#[derive(Debug, Clone, PartialEq)]
pub struct Charge {
    /// The manifest record for the version, including this round.
    pub record: NodePrivacy,
    /// Whether it stays within the budget.
    pub within_budget: bool,
}

/// What the published models have spent of the node-level budget, for operators.
#[derive(Debug, Clone, PartialEq)]
pub struct Spending {
    /// Epsilon spent by every published round, at `delta`.
    pub epsilon_spent: f64,
    /// The configured budget.
    pub epsilon_budget: f64,
    /// The delta both hold at.
    pub delta: f64,
    /// The accountant that composed the rounds.
    pub accountant: Accountant,
    /// Configured noise multiplier z.
    pub noise_multiplier: f64,
    /// Configured bound S on each node's update.
    pub update_clip_norm: f64,
    /// Published rounds accounted.
    pub rounds: u64,
    /// The version whose manifest records the spending (the latest published).
    pub version: u64,
}

impl Spending {
    /// Spending of `epsilon_spent` over `history`, recorded in `version`, under `settings`.
    pub fn new(
        settings: &NodePrivacySection,
        history: &[Step],
        epsilon_spent: f64,
        version: u64,
    ) -> Self {
        Spending {
            epsilon_spent,
            epsilon_budget: settings.epsilon,
            delta: settings.delta,
            accountant: settings.accountant,
            noise_multiplier: settings.noise_multiplier,
            update_clip_norm: settings.update_clip_norm,
            rounds: history.iter().map(|step| step.count).sum(),
            version,
        }
    }

    /// What is left of the budget; 0 once it is spent.
    pub fn epsilon_left(&self) -> f64 {
        (self.epsilon_budget - self.epsilon_spent).max(0.0)
    }
}

/// The node-level spending recorded in `latest` (the store's latest version), composed with
/// the accountant and delta of `settings`: what a coordinator started with these settings
/// would report. Reads no file and draws no randomness, so tools can call it on a store.
///
/// # Errors
/// As [`NodeLevelDp::resume`], and [`Error::InvalidRequest`] if the accountant rejects the
/// recorded history.
pub fn spending(settings: &NodePrivacySection, latest: &Manifest) -> Result<Spending, Error> {
    let history = recorded_history(latest)?;
    let report = settings
        .accountant
        .epsilon(&history, settings.delta)
        .map_err(|e| Error::InvalidRequest(format!("node-level accountant: {e}")))?;
    Ok(Spending::new(
        settings,
        &history,
        report.epsilon,
        latest.version,
    ))
}

/// The published rounds' mechanisms recorded in the latest version's manifest.
fn recorded_history(latest: &Manifest) -> Result<Vec<Step>, Error> {
    match (&latest.node_privacy, latest.round) {
        (Some(record), _) => Ok(record.history.clone()),
        (None, 0) => Ok(Vec::new()),
        (None, round) => Err(Error::Config {
            path: "[node_privacy]".into(),
            message: format!(
                "the store's latest version (round {round}) was published without node-level \
                 accounting, so the federation's node-level privacy is already unbounded; start \
                 a new store to train with [node_privacy]"
            ),
        }),
    }
}

impl NodeLevelDp {
    /// Picks up the spending recorded in the latest version's manifest.
    ///
    /// # Errors
    /// [`Error::Config`] when trained versions exist but the latest one carries no node-level
    /// record: what those rounds released was never accounted, so no budget can be claimed
    /// for the federation; and when the operating system's generator fails.
    pub fn resume(settings: NodePrivacySection, latest: &Manifest) -> Result<Self, Error> {
        let history = recorded_history(latest)?;

        let rng = match settings.insecure_noise_seed {
            Some(seed) => {
                warn!(
                    "[node_privacy] insecure_noise_seed is set: anyone who knows it can remove \
                     the noise from published models; use it for reproducible simulations only"
                );
                ChaCha20Rng::seed_from_u64(seed)
            }
            None => ChaCha20Rng::try_from_rng(&mut rand::rngs::SysRng).map_err(|e| {
                Error::InvalidRequest(format!("operating system random generator: {e}"))
            })?,
        };
        Ok(NodeLevelDp {
            settings,
            history,
            rng,
        })
    }

    /// The configured mechanism.
    pub fn settings(&self) -> &NodePrivacySection {
        &self.settings
    }

    /// The sampling rate of a cohort of `cohort_size` drawn from `connected` nodes; a
    /// `cohort_size` of 0 takes everyone (rate 1).
    pub fn sampling_rate(cohort_size: usize, connected: usize) -> f64 {
        if cohort_size == 0 || connected == 0 || cohort_size >= connected {
            1.0
        } else {
            cohort_size as f64 / connected as f64
        }
    }

    /// Node-level epsilon spent by the rounds published so far.
    ///
    /// # Errors
    /// [`Error::InvalidRequest`] if the accountant rejects the recorded history.
    pub fn spent(&self) -> Result<EpsilonReport, Error> {
        self.settings
            .accountant
            .epsilon(&self.history, self.settings.delta)
            .map_err(|e| Error::InvalidRequest(format!("node-level accountant: {e}")))
    }

    /// What publishing one more round at sampling rate `q` would bring the total to.
    ///
    /// # Errors
    /// [`Error::InvalidRequest`] if the accountant rejects the history or `q`.
    pub fn charge(&self, q: f64) -> Result<Charge, Error> {
        self.charge_at(q, self.settings.noise_multiplier)
    }

    /// As [`NodeLevelDp::charge`], for a round whose noise amounted to `noise_multiplier`
    /// rather than the configured one (secure aggregation: the survivors' noise against the
    /// quantized sensitivity).
    ///
    /// # Errors
    /// As [`NodeLevelDp::charge`].
    pub fn charge_at(&self, q: f64, noise_multiplier: f64) -> Result<Charge, Error> {
        let history = extend(&self.history, q, noise_multiplier);
        let report = self
            .settings
            .accountant
            .epsilon(&history, self.settings.delta)
            .map_err(|e| Error::InvalidRequest(format!("node-level accountant: {e}")))?;
        Ok(Charge {
            within_budget: report.epsilon <= self.settings.epsilon,
            record: NodePrivacy {
                epsilon: report.epsilon,
                delta: self.settings.delta,
                noise_multiplier,
                update_clip_norm: self.settings.update_clip_norm,
                sampling_rate: q,
                accountant: self.settings.accountant,
                history,
            },
        })
    }

    /// Records a round as published: its charge is now spent.
    pub fn commit(&mut self, record: &NodePrivacy) {
        self.history = record.history.clone();
    }

    /// The recorded rounds' mechanisms, merged where consecutive rounds were alike.
    pub fn history(&self) -> &[Step] {
        &self.history
    }

    /// Clips each update to `S`, sums, adds the noise and divides by the number of updates.
    ///
    /// # Errors
    /// [`Error::InvalidRequest`] when there is no update, when lengths differ from `dim`, or
    /// when an update holds a non-finite value.
    pub fn noised_mean(&mut self, dim: usize, updates: &[&[f32]]) -> Result<Vec<f64>, Error> {
        if updates.is_empty() {
            return Err(Error::InvalidRequest("no update to aggregate".into()));
        }
        let bound = self.settings.update_clip_norm;

        let mut sum = vec![0.0_f64; dim];
        for update in updates {
            if update.len() != dim {
                return Err(Error::InvalidRequest(format!(
                    "update of {} values for a model of {dim}",
                    update.len()
                )));
            }
            let scale = clip_factor(update, bound)?;
            for (total, value) in sum.iter_mut().zip(update.iter()) {
                *total += f64::from(*value) * scale;
            }
        }

        let mut noised: Vec<f32> = sum.iter().map(|&v| v as f32).collect();
        let std_dev = self.settings.noise_multiplier * bound;
        add_gaussian_noise(&mut noised, std_dev, &mut self.rng)
            .map_err(|e| Error::InvalidRequest(format!("node-level noise: {e}")))?;

        let count = updates.len() as f64;
        Ok(noised.iter().map(|&v| f64::from(v) / count).collect())
    }
}

/// The factor that brings `update` within L2 norm `bound` (1 when it already is).
///
/// Honest nodes clip their own updates; clipping again here makes the guarantee independent
/// of whether they did.
fn clip_factor(update: &[f32], bound: f64) -> Result<f64, Error> {
    let norm = update
        .iter()
        .map(|&v| f64::from(v) * f64::from(v))
        .sum::<f64>()
        .sqrt();
    if !norm.is_finite() {
        return Err(Error::InvalidRequest(
            "update holds a non-finite value".into(),
        ));
    }
    if norm <= bound {
        return Ok(1.0);
    }
    debug!(
        ratio = norm / bound,
        "update clipped to the node-level bound"
    );
    Ok(bound / norm)
}

/// `history` plus one round at `(q, sigma)`, merged into the last step when it matches.
fn extend(history: &[Step], q: f64, sigma: f64) -> Vec<Step> {
    let mut extended = history.to_vec();
    match extended.last_mut() {
        Some(last) if last.q == q && last.sigma == sigma => last.count += 1,
        _ => extended.push(Step { q, sigma, count: 1 }),
    }
    extended
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(epsilon: f64) -> NodePrivacySection {
        NodePrivacySection {
            update_clip_norm: 1.0,
            noise_multiplier: 1.0,
            epsilon,
            delta: 1e-5,
            accountant: Accountant::Rdp,
            insecure_noise_seed: Some(3),
        }
    }

    fn fresh(epsilon: f64) -> NodeLevelDp {
        NodeLevelDp {
            settings: settings(epsilon),
            history: Vec::new(),
            rng: ChaCha20Rng::seed_from_u64(3),
        }
    }

    #[test]
    fn charges_compose_like_the_accountant() {
        let mut dp = fresh(100.0);
        for _ in 0..4 {
            let charge = dp.charge(0.5).unwrap();
            dp.commit(&charge.record);
        }
        let direct = Accountant::Rdp
            .epsilon(
                &[Step {
                    q: 0.5,
                    sigma: 1.0,
                    count: 4,
                }],
                1e-5,
            )
            .unwrap();
        assert_eq!(dp.spent().unwrap().epsilon, direct.epsilon);
        assert_eq!(dp.history.len(), 1, "equal rounds merge into one step");
    }

    #[test]
    fn budget_is_reported_exceeded_before_spending() {
        let one = Accountant::Rdp
            .epsilon(
                &[Step {
                    q: 1.0,
                    sigma: 1.0,
                    count: 1,
                }],
                1e-5,
            )
            .unwrap()
            .epsilon;
        let two = Accountant::Rdp
            .epsilon(
                &[Step {
                    q: 1.0,
                    sigma: 1.0,
                    count: 2,
                }],
                1e-5,
            )
            .unwrap()
            .epsilon;
        let mut dp = fresh((one + two) / 2.0);
        let first = dp.charge(1.0).unwrap();
        assert!(first.within_budget);
        dp.commit(&first.record);
        assert!(!dp.charge(1.0).unwrap().within_budget);
    }

    #[test]
    fn updates_are_clipped_before_noise() {
        let mut dp = fresh(100.0);
        dp.settings.noise_multiplier = 1e-9;
        let big = vec![30.0_f32, 40.0];
        let small = vec![0.3_f32, 0.4];
        let mean = dp.noised_mean(2, &[&big, &small]).unwrap();
        // The first update is scaled to norm 1: (0.6, 0.8); mean with (0.3, 0.4).
        assert!((mean[0] - 0.45).abs() < 1e-6 && (mean[1] - 0.6).abs() < 1e-6);
    }

    #[test]
    fn noise_on_the_sum_has_the_configured_spread() {
        let mut dp = fresh(100.0);
        dp.settings.noise_multiplier = 2.0;
        dp.settings.update_clip_norm = 0.5;
        let zeros = vec![0.0_f32; 20_000];
        // One contributor: the mean is the noised sum itself.
        let noised = dp.noised_mean(zeros.len(), &[&zeros]).unwrap();
        let n = noised.len() as f64;
        let var = noised.iter().map(|&v| v * v).sum::<f64>() / n;
        // Standard error of a variance estimate is about var * sqrt(2 / n): 1% here.
        assert!((var.sqrt() - 1.0).abs() < 0.03, "std {}", var.sqrt());
    }

    #[test]
    fn bad_updates_are_errors() {
        let mut dp = fresh(100.0);
        assert!(dp.noised_mean(2, &[]).is_err());
        assert!(dp.noised_mean(2, &[&[1.0, 2.0, 3.0]]).is_err());
        assert!(dp.noised_mean(2, &[&[f32::NAN, 0.0]]).is_err());
    }

    #[test]
    fn sampling_rate_of_a_cohort() {
        assert_eq!(NodeLevelDp::sampling_rate(0, 10), 1.0);
        assert_eq!(NodeLevelDp::sampling_rate(5, 10), 0.5);
        assert_eq!(NodeLevelDp::sampling_rate(20, 10), 1.0);
    }
}
