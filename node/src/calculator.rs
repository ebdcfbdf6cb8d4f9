//! The `privacy` subcommand of `athanor-node` and `athanor-sim`: flags for the privacy
//! calculator of [`athanor_core::accountant::calculator`].
//!
//! Both binaries embed [`PrivacyCommand`], so they accept the same flags, print the same
//! output and share their help text. All checking and arithmetic happens in core; this module
//! only turns flags into a query and its answer into the text to print.

use athanor_core::accountant::Accountant;
use athanor_core::accountant::calculator::{CalculatorError, EpsilonQuery, SigmaQuery};
use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;

/// A privacy calculator question.
#[derive(Debug, Clone, Subcommand)]
pub enum PrivacyCommand {
    /// Epsilon of a DP-SGD run: STEPS steps of Poisson sampling at rate Q with noise
    /// multiplier SIGMA, at DELTA.
    Epsilon(EpsilonArgs),
    /// The smallest noise multiplier that keeps STEPS steps at sampling rate Q within
    /// (EPSILON, DELTA).
    Sigma(SigmaArgs),
}

/// Flags of `privacy epsilon`.
#[derive(Debug, Clone, Args)]
pub struct EpsilonArgs {
    /// Poisson sampling rate of each step, in (0, 1]: the expected batch size divided by the
    /// number of training rows.
    #[arg(long, value_name = "Q", allow_negative_numbers = true)]
    pub q: f64,
    /// Noise multiplier: the noise's standard deviation divided by the clipping norm;
    /// positive.
    #[arg(long, value_name = "SIGMA", allow_negative_numbers = true)]
    pub sigma: f64,
    /// Number of DP-SGD steps, at least 1 (one epoch is about 1/Q steps).
    #[arg(long, value_name = "STEPS")]
    pub steps: u64,
    /// The delta of the (epsilon, delta) guarantee, in (0, 1); usually well below one over
    /// the number of rows.
    #[arg(long, value_name = "DELTA", allow_negative_numbers = true)]
    pub delta: f64,
    /// Accountant that composes the steps.
    #[arg(long, value_enum, default_value_t = AccountantName::Rdp)]
    pub accountant: AccountantName,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Flags of `privacy sigma`.
#[derive(Debug, Clone, Args)]
pub struct SigmaArgs {
    /// Poisson sampling rate of each step, in (0, 1]: the expected batch size divided by the
    /// number of training rows.
    #[arg(long, value_name = "Q", allow_negative_numbers = true)]
    pub q: f64,
    /// Number of DP-SGD steps, at least 1 (one epoch is about 1/Q steps).
    #[arg(long, value_name = "STEPS")]
    pub steps: u64,
    /// The delta of the target guarantee, in (0, 1).
    #[arg(long, value_name = "DELTA", allow_negative_numbers = true)]
    pub delta: f64,
    /// The target epsilon, positive and finite.
    #[arg(long, value_name = "EPSILON", allow_negative_numbers = true)]
    pub epsilon: f64,
    /// Accountant that the noise is calibrated with.
    #[arg(long, value_enum, default_value_t = AccountantName::Rdp)]
    pub accountant: AccountantName,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Accountant names on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AccountantName {
    /// Rényi DP, converted to (epsilon, delta); reports the order that gave the bound.
    Rdp,
    /// Privacy loss distribution: tighter, slower.
    Pld,
}

impl From<AccountantName> for Accountant {
    fn from(name: AccountantName) -> Self {
        match name {
            AccountantName::Rdp => Accountant::Rdp,
            AccountantName::Pld => Accountant::Pld,
        }
    }
}

impl PrivacyCommand {
    /// Answers the question, as text or as one line of JSON.
    ///
    /// # Errors
    /// [`CalculatorError`] for an input outside its domain or an unreachable target.
    pub fn run(&self) -> Result<String, CalculatorError> {
        match self {
            PrivacyCommand::Epsilon(args) => {
                let answer = EpsilonQuery {
                    q: args.q,
                    sigma: args.sigma,
                    steps: args.steps,
                    delta: args.delta,
                    accountant: args.accountant.into(),
                }
                .answer()?;
                Ok(render(&answer, args.json))
            }
            PrivacyCommand::Sigma(args) => {
                let answer = SigmaQuery {
                    q: args.q,
                    steps: args.steps,
                    delta: args.delta,
                    epsilon: args.epsilon,
                    accountant: args.accountant.into(),
                }
                .answer()?;
                Ok(render(&answer, args.json))
            }
        }
    }
}

fn render<T: Serialize + std::fmt::Display>(answer: &T, json: bool) -> String {
    if !json {
        return answer.to_string();
    }
    // The answers are structs of numbers and enums, with infinities written as null: they
    // always serialize.
    serde_json::to_string(answer).expect("calculator answers serialize to JSON")
}
