//! The error type of [`crate::model`] and [`crate::dpsgd`].

use thiserror::Error;

/// Why a model, its inputs or a training setting cannot be used.
///
/// Shape and label errors are the caller's (usually a loader or a peer sending a mismatched
/// model); setting errors come from a plan that was not validated when it was loaded.
#[derive(Debug, Clone, PartialEq, Error)]
#[non_exhaustive]
pub enum ModelError {
    /// A dimension of the model spec is zero.
    #[error("model dimension `{name}` is zero: expected at least 1")]
    EmptyDimension {
        /// `features`, `classes` or `hidden`.
        name: &'static str,
    },
    /// The spec's parameter count or class count does not fit the address space or `u32`
    /// labels.
    #[error("model spec too large: {what} overflows")]
    TooLarge {
        /// What overflows.
        what: &'static str,
    },
    /// The parameter vector's length does not match the spec.
    #[error("wrong number of parameters: expected {expected}, got {got}")]
    ParamCount {
        /// The spec's parameter count.
        expected: usize,
        /// The vector's length.
        got: usize,
    },
    /// The input's column count differs from the model's feature count.
    #[error("wrong number of features: expected {expected}, got {got}")]
    FeatureCount {
        /// The model's features.
        expected: usize,
        /// The input's columns.
        got: usize,
    },
    /// The number of labels differs from the number of input rows.
    #[error("wrong number of labels: expected {expected} (one per row), got {got}")]
    LabelCount {
        /// The input's rows.
        expected: usize,
        /// The labels given.
        got: usize,
    },
    /// A label is not a class index of the model.
    #[error("label out of range at row {row}: expected below {classes}, got {label}")]
    LabelOutOfRange {
        /// Row of the first bad label.
        row: usize,
        /// The label.
        label: u32,
        /// The model's classes.
        classes: usize,
    },
    /// An input value is NaN or infinite.
    #[error("non-finite input at row {row}, column {column}: expected a finite number")]
    NonFiniteInput {
        /// Row of the first bad value.
        row: usize,
        /// Its column.
        column: usize,
    },
    /// An average over examples was asked of an empty input.
    #[error("no examples: expected at least 1 row, got 0")]
    NoExamples,
    /// A training or noise setting is out of its range.
    #[error("invalid {name}: expected {expected}, got {got}")]
    InvalidSetting {
        /// The setting (`learning_rate`, `sampling_rate`, `clip_norm`, ...).
        name: &'static str,
        /// Its valid range, in words.
        expected: &'static str,
        /// The rejected value.
        got: f64,
    },
    /// The operating system's random number generator failed.
    #[error("operating system randomness unavailable")]
    Entropy(#[source] rand::rngs::SysError),
}
