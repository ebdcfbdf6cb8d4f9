//! The node's privacy budget, and the check that keeps every round within it.
//!
//! The operator sets a budget, an `(epsilon, delta)` guarantee the node's data must keep over
//! every round it ever trains, and picks the accountant that composes rounds. What was spent
//! is the composition of every entry of the [`crate::ledger`]; before a round,
//! [`Budget::review`] composes those entries with the steps the round would take — the plan's
//! step count at this node's own sampling rate `expected_batch_size / rows` and the plan's
//! noise multiplier — and approves the round only if the total stays within the budget.
//! Entries may differ in `q` and `sigma` from round to round; both accountants compose such
//! heterogeneous steps. An [`Approval`] becomes the round's ledger entry, so the node records
//! exactly the steps it checked.
//!
//! # Rounds without DP
//!
//! A round trained without noise has no finite epsilon, so it fits no budget. A node trains
//! one only when its operator wrote `[privacy] insecure_allow_no_dp = true`, which waives the
//! guarantee; the round is still recorded (with `sigma` null), and from then on the ledger's
//! epsilon is infinite. The budget then counts as spent: every later round with DP is
//! declined, because no finite budget can be honoured any more, while rounds without DP stay
//! allowed by the same waiver. Only the operator can undo this, by retiring the ledger.
//!
//! The check is a promise about the data, not about one federation: a node that trains for
//! several coordinators with the same ledger is held to one budget over all of them.

use std::collections::BTreeSet;
use std::path::PathBuf;

use athanor_core::accountant::{Accountant, AccountantError, Step};
use athanor_core::noise::accounted_noise_multiplier;
use athanor_core::plan::{DpSgdRequest, RoundPlan};
use serde::Serialize;

use crate::ledger::{Contents, Entry, Tail};

/// What the node may spend, and how spending is composed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    /// Total epsilon allowed at `delta`; `f64::INFINITY` (only in code, as the simulator
    /// does) sets no limit.
    pub epsilon: f64,
    /// The delta epsilon is computed at.
    pub delta: f64,
    /// How the ledger's entries are composed.
    pub accountant: Accountant,
    /// Whether rounds without DP are trained (see the module's documentation).
    pub insecure_allow_no_dp: bool,
}

/// The steps a round would take on this node's data.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Charge {
    /// Training rows.
    pub rows: usize,
    /// Poisson sampling rate, `expected_batch_size / rows` capped at 1.
    pub q: f64,
    /// DP-SGD steps.
    pub steps: u64,
    /// Clipping and noise; `None` for training without DP.
    pub dp: Option<DpSgdRequest>,
    /// The noise multiplier the accountant is charged with: the plan's, reduced for the
    /// rounding of the clipped sum to the noise grid
    /// ([`athanor_core::noise::accounted_noise_multiplier`]).
    pub charged_sigma: Option<f64>,
}

/// What the ledger's entries add up to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spent {
    /// Epsilon at `delta`; infinite after a round without DP.
    pub epsilon: f64,
    /// The delta it is computed at.
    pub delta: f64,
    /// The Rényi order that gave the bound (RDP only, and only once something was spent).
    pub order: Option<f64>,
}

/// The outcome of [`Budget::review`].
#[derive(Debug)]
pub enum Review {
    /// The round fits: train it, then record the approval.
    Approved(Approval),
    /// The round does not fit; the reason is sent to the coordinator.
    Declined(String),
}

/// A round that fits the budget. It is consumed by turning it into the round's ledger entry,
/// so what is recorded is exactly what was checked.
#[derive(Debug)]
pub struct Approval {
    charge: Charge,
    epsilon_after: f64,
}

/// A ledger summary for the operator, as `athanor-node budget` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// The ledger file.
    pub ledger: PathBuf,
    /// Whether it exists yet.
    pub exists: bool,
    /// Entries that count.
    pub entries: usize,
    /// Distinct rounds among them (a round is recorded twice if the node restarted between
    /// recording it and sending its update, and was then asked again).
    pub rounds: usize,
    /// DP-SGD steps over all entries.
    pub steps: u64,
    /// The accountant that composed them.
    pub accountant: Accountant,
    /// The delta of every epsilon here.
    pub delta: f64,
    /// Epsilon spent; `null` in JSON when unbounded (a round without DP).
    #[serde(serialize_with = "finite_or_null")]
    pub spent: f64,
    /// The Rényi order that gave `spent` (RDP only).
    pub order: Option<f64>,
    /// The budget.
    #[serde(serialize_with = "finite_or_null")]
    pub budget: f64,
    /// `budget - spent`, at least 0. Epsilons do not add up exactly under composition, so
    /// this is a guide: the budget check composes the whole history every time.
    #[serde(serialize_with = "finite_or_null")]
    pub remaining: f64,
    /// Whether some round was trained without DP.
    pub trained_without_dp: bool,
    /// The line number of an interrupted last line, which does not count.
    pub torn_last_line: Option<usize>,
}

impl Charge {
    /// What `plan` would cost a node holding `rows` training rows, for a model of
    /// `dimension` parameters.
    pub fn of(plan: &RoundPlan, rows: usize, dimension: usize) -> Self {
        Charge {
            rows,
            q: plan.sampling_rate(rows),
            steps: plan.steps(rows),
            dp: plan.dp,
            charged_sigma: plan
                .dp
                .map(|dp| accounted_noise_multiplier(dp.noise_multiplier, dimension)),
        }
    }
}

impl Budget {
    /// The composition of `entries`.
    ///
    /// # Errors
    /// [`AccountantError`] for a delta outside `(0, 1)`; entries were checked when read.
    pub fn spent(&self, entries: &[Entry]) -> Result<Spent, AccountantError> {
        self.compose(entries, None)
    }

    /// Whether `charge` fits in what `entries` leave of the budget.
    ///
    /// # Errors
    /// [`AccountantError`] for a delta outside `(0, 1)` or a charge outside the accountant's
    /// domain.
    pub fn review(&self, entries: &[Entry], charge: Charge) -> Result<Review, AccountantError> {
        let Some(sigma) = charge.charged_sigma else {
            if !self.insecure_allow_no_dp {
                return Ok(Review::Declined(
                    "the round asks for training without DP, which has no finite epsilon and \
                     fits no privacy budget"
                        .into(),
                ));
            }
            return Ok(Review::Approved(Approval {
                charge,
                epsilon_after: f64::INFINITY,
            }));
        };

        let step = Step {
            q: charge.q,
            sigma,
            count: charge.steps,
        };
        let after = self.compose(entries, Some(step))?;
        if after.epsilon <= self.epsilon {
            return Ok(Review::Approved(Approval {
                charge,
                epsilon_after: after.epsilon,
            }));
        }

        let reason = match entries.iter().find(|e| e.sigma.is_none()) {
            Some(e) => format!(
                "this node's privacy budget is spent: it trained without DP in round {} of \
                 federation {:?}, so its epsilon is unbounded",
                e.round, e.federation
            ),
            None => format!(
                "privacy budget exceeded: {} steps at q = {:.6}, sigma = {} would bring this \
                 node's epsilon from {:.4} to {:.4}, above its budget of {} at delta {:e} ({})",
                charge.steps,
                charge.q,
                sigma,
                self.spent(entries)?.epsilon,
                after.epsilon,
                self.epsilon,
                self.delta,
                name(self.accountant)
            ),
        };
        Ok(Review::Declined(reason))
    }

    /// A summary of a ledger read from disk.
    ///
    /// # Errors
    /// As [`Budget::spent`].
    pub fn summary(&self, contents: &Contents) -> Result<Summary, AccountantError> {
        let entries = &contents.entries;
        let spent = self.spent(entries)?;
        let rounds: BTreeSet<(&str, &str, u64)> = entries
            .iter()
            .map(|e| (e.federation.as_str(), e.coordinator.as_str(), e.round))
            .collect();
        Ok(Summary {
            ledger: contents.path.clone(),
            exists: contents.exists,
            entries: entries.len(),
            rounds: rounds.len(),
            steps: entries.iter().map(|e| e.steps).fold(0, u64::saturating_add),
            accountant: self.accountant,
            delta: self.delta,
            spent: spent.epsilon,
            order: spent.order,
            budget: self.epsilon,
            remaining: (self.epsilon - spent.epsilon).max(0.0),
            trained_without_dp: entries.iter().any(|e| e.sigma.is_none()),
            torn_last_line: match contents.tail {
                Tail::Torn { line, .. } => Some(line),
                Tail::Clean | Tail::Unterminated { .. } => None,
            },
        })
    }

    /// Composes `entries`, plus `extra` if given. Steps with the same `q` and `sigma` are
    /// merged first, which is exact and keeps RDP's cost proportional to the number of
    /// distinct settings rather than of rounds.
    fn compose(&self, entries: &[Entry], extra: Option<Step>) -> Result<Spent, AccountantError> {
        if entries.iter().any(|e| e.sigma.is_none()) {
            return Ok(Spent {
                epsilon: f64::INFINITY,
                delta: self.delta,
                order: None,
            });
        }

        let mut steps: Vec<Step> = Vec::new();
        for step in entries.iter().filter_map(Entry::step).chain(extra) {
            match steps
                .iter_mut()
                .find(|s| s.q == step.q && s.sigma == step.sigma)
            {
                Some(same) => same.count = same.count.saturating_add(step.count),
                None => steps.push(step),
            }
        }
        let report = self.accountant.epsilon(&steps, self.delta)?;
        Ok(Spent {
            epsilon: report.epsilon,
            delta: self.delta,
            order: report.order,
        })
    }
}

impl Approval {
    /// The steps approved.
    pub fn charge(&self) -> &Charge {
        &self.charge
    }

    /// The node's epsilon once the round is recorded (infinite for a round without DP).
    pub fn epsilon_after(&self) -> f64 {
        self.epsilon_after
    }

    /// The ledger entry recording this round, stamped with the current time.
    pub fn into_entry(self, round: u64, federation: &str, coordinator: &str) -> Entry {
        let charge = self.charge;
        Entry {
            round,
            federation: federation.to_string(),
            coordinator: coordinator.to_string(),
            time: crate::ledger::now_utc(),
            rows: charge.rows as u64,
            q: charge.q,
            sigma: charge.charged_sigma,
            clip_norm: charge.dp.map(|dp| dp.clip_norm),
            steps: charge.steps,
        }
    }
}

/// The accountant's name as written in the configuration.
pub fn name(accountant: Accountant) -> &'static str {
    match accountant {
        Accountant::Rdp => "rdp",
        Accountant::Pld => "pld",
    }
}

/// JSON has no infinity: an unbounded epsilon is written as `null`.
fn finite_or_null<S: serde::Serializer>(value: &f64, serializer: S) -> Result<S::Ok, S::Error> {
    if value.is_finite() {
        serializer.serialize_f64(*value)
    } else {
        serializer.serialize_none()
    }
}
