//! Model architectures, their parameters, and their forward and backward passes.
//!
//! Every model keeps its parameters as one flat `f32` vector. The vector is what crosses the
//! wire, what the coordinator averages and what the model store writes; the named tensor
//! views ([`ModelSpec::tensors`]) give it shape when it is saved or inspected. Keeping one flat
//! layout means aggregation, clipping of updates and quantization never need to know the
//! architecture.
//!
//! # Models
//!
//! Both architectures end in a softmax over `classes` logits `z`:
//!
//! - logistic regression: `z = x W + b`;
//! - MLP: `h = relu(x W1 + b1)`, `z = h W2 + b2`.
//!
//! They are trained on the mean cross-entropy `L = (1/n) sum_i l_i` with
//! `l_i = log sum_j exp(z_ij) - z_{i,y_i}`, evaluated as a log-softmax shifted by the row
//! maximum so that no exponential overflows. The gradient of `l_i` with respect to the logits
//! is `d_i = softmax(z_i) - e_{y_i}`, and for every dense layer with input `a_i` the
//! example's gradient is the outer product `a_i d_i^T` for the weights and `d_i` for the bias.
//! [`crate::dpsgd`] relies on that structure to clip per-example gradients without
//! materializing them.
//!
//! # Inputs
//!
//! `x` holds one example per row and one feature per column, already scaled to `[0, 1]` by the
//! loader; `y` holds one label per row, each below `classes`. Every function here checks the
//! spec, the parameter count and the input width, and those that take labels also check the
//! label count, the label range and that every input value is finite; they return a
//! [`ModelError`] instead of panicking. Batches are evaluated in chunks of
//! [`EVAL_CHUNK_ROWS`] rows so that memory stays bounded on large evaluation sets.
//!
//! # Example
//!
//! ```
//! use athanor_core::model::{self, Architecture, ModelSpec};
//! use ndarray::array;
//!
//! let spec = ModelSpec { architecture: Architecture::Mlp { hidden: 4 }, features: 2, classes: 3 };
//! let params = spec.init(7);
//! let x = array![[0.0_f32, 1.0], [0.5, 0.5]];
//! let evaluation = model::evaluate(&spec, &params, x.view(), &[2, 0])?;
//! assert_eq!(evaluation.examples, 2);
//! assert!(evaluation.loss > 0.0);
//! # Ok::<(), model::ModelError>(())
//! ```

use ndarray::{Array2, ArrayView2, Axis, Slice};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};

pub use self::error::ModelError;
pub(crate) use self::pass::{Scratch, Weights};

mod error;
mod pass;

/// Rows evaluated at once by the whole-dataset functions ([`loss`], [`gradient`],
/// [`evaluate`], ...). Bounds their scratch memory at a few times
/// `EVAL_CHUNK_ROWS * max(features, hidden)` floats.
pub const EVAL_CHUNK_ROWS: usize = 1024;

/// Which architecture a model has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Architecture {
    /// Multinomial logistic regression: `softmax(x W + b)`.
    LogisticRegression,
    /// One hidden layer with ReLU: `softmax(relu(x W1 + b1) W2 + b2)`.
    Mlp {
        /// Width of the hidden layer.
        hidden: usize,
    },
}

/// A model's architecture and input/output sizes: everything needed to interpret a flat
/// parameter vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// The architecture.
    #[serde(flatten)]
    pub architecture: Architecture,
    /// Number of input features.
    pub features: usize,
    /// Number of classes.
    pub classes: usize,
}

impl std::fmt::Display for ModelSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.architecture {
            Architecture::LogisticRegression => f.write_str("logistic regression")?,
            Architecture::Mlp { hidden } => write!(f, "MLP with {hidden} hidden units")?,
        }
        write!(
            f,
            " over {} features and {} classes",
            self.features, self.classes
        )
    }
}

/// Where one named tensor lives inside the flat parameter vector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorView {
    /// Stable name, used as the safetensors key (`w`, `b`, `w1`, `b1`, `w2`, `b2`).
    pub name: &'static str,
    /// Row-major shape.
    pub shape: Vec<usize>,
    /// Offset of the first element in the flat vector.
    pub offset: usize,
}

impl TensorView {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The tensor's slice of a flat parameter vector.
    ///
    /// # Panics
    /// If `params` is shorter than the spec's parameter count.
    pub fn slice<'a>(&self, params: &'a [f32]) -> &'a [f32] {
        &params[self.offset..self.offset + self.len()]
    }
}

impl ModelSpec {
    /// The named tensors, in the order they are laid out in the flat vector. Weight matrices
    /// are `[inputs, outputs]`, row-major.
    pub fn tensors(&self) -> Vec<TensorView> {
        let (f, c) = (self.features, self.classes);
        let shapes: Vec<(&'static str, Vec<usize>)> = match self.architecture {
            Architecture::LogisticRegression => vec![("w", vec![f, c]), ("b", vec![c])],
            Architecture::Mlp { hidden: h } => vec![
                ("w1", vec![f, h]),
                ("b1", vec![h]),
                ("w2", vec![h, c]),
                ("b2", vec![c]),
            ],
        };

        let mut offset = 0;
        shapes
            .into_iter()
            .map(|(name, shape)| {
                let view = TensorView {
                    name,
                    shape,
                    offset,
                };
                offset += view.len();
                view
            })
            .collect()
    }

    /// Total number of parameters.
    pub fn num_params(&self) -> usize {
        self.tensors().iter().map(TensorView::len).sum()
    }

    /// Checks that every dimension is at least 1, that the parameter count fits in `usize` and
    /// that class indices fit in `u32` labels.
    ///
    /// # Errors
    /// [`ModelError::EmptyDimension`] or [`ModelError::TooLarge`].
    pub fn validate(&self) -> Result<(), ModelError> {
        let (f, c) = (self.features, self.classes);
        let hidden = match self.architecture {
            Architecture::LogisticRegression => None,
            Architecture::Mlp { hidden } => Some(hidden),
        };
        let dimensions = [("features", f), ("classes", c)].into_iter();
        for (name, value) in dimensions.chain(hidden.map(|h| ("hidden", h))) {
            if value == 0 {
                return Err(ModelError::EmptyDimension { name });
            }
        }

        if u32::try_from(c).is_err() {
            return Err(ModelError::TooLarge {
                what: "class count",
            });
        }
        let count = match hidden {
            None => f.checked_mul(c).and_then(|w| w.checked_add(c)),
            Some(h) => f
                .checked_add(1)
                .and_then(|inputs| inputs.checked_mul(h))
                .and_then(|first| h.checked_add(1)?.checked_mul(c)?.checked_add(first)),
        };
        match count {
            Some(_) => Ok(()),
            None => Err(ModelError::TooLarge {
                what: "parameter count",
            }),
        }
    }

    /// Initial parameters, the same for a given `seed` on every machine.
    ///
    /// - Logistic regression starts at zero: its loss is convex, so the starting point only
    ///   affects how fast it converges, and zero predicts the uniform distribution.
    /// - The MLP draws `W1` from He-uniform, `U(-sqrt(6 / features), sqrt(6 / features))`,
    ///   suited to the ReLU that follows (He et al. 2015, "Delving deep into rectifiers"),
    ///   and `W2` from Glorot-uniform, `U(-sqrt(6 / (hidden + classes)), ...)`, for the
    ///   linear output layer (Glorot and Bengio 2010); biases start at zero.
    ///
    /// The generator is ChaCha20 keyed by `seed` (little-endian) followed by a fixed domain
    /// string, and each weight is `(2u - 1) * bound` with `u` taken from the top 24 bits of
    /// one raw 32-bit word: no library range helper, whose output could change between
    /// versions, is involved.
    ///
    /// # Panics
    /// If the parameter count overflows or cannot be allocated (see [`ModelSpec::validate`]).
    ///
    /// ```
    /// use athanor_core::model::{Architecture, ModelSpec};
    ///
    /// let spec = ModelSpec { architecture: Architecture::Mlp { hidden: 8 }, features: 4, classes: 3 };
    /// assert_eq!(spec.init(1), spec.init(1));
    /// assert_ne!(spec.init(1), spec.init(2));
    /// ```
    pub fn init(&self, seed: u64) -> Vec<f32> {
        const DOMAIN: &[u8; 24] = b"athanor model init v1\0\0\0";

        let mut params = vec![0.0; self.num_params()];
        let Architecture::Mlp { hidden } = self.architecture else {
            return params;
        };
        let mut key = [0; 32];
        key[..8].copy_from_slice(&seed.to_le_bytes());
        key[8..].copy_from_slice(DOMAIN);
        let mut rng = ChaCha20Rng::from_seed(key);

        for view in self.tensors() {
            let bound = match view.name {
                "w1" => (6.0 / self.features as f64).sqrt(),
                "w2" => (6.0 / (hidden + self.classes) as f64).sqrt(),
                _ => continue,
            } as f32;
            for weight in &mut params[view.offset..view.offset + view.len()] {
                let unit = (rng.next_u32() >> 8) as f32 * (1.0 / 16_777_216.0);
                *weight = (2.0 * unit - 1.0) * bound;
            }
        }
        params
    }
}

/// A model's quality on a labelled set.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// Mean cross-entropy (natural log).
    pub loss: f64,
    /// Fraction of examples whose largest logit is their label (the first one on ties).
    pub accuracy: f64,
    /// Number of examples evaluated.
    pub examples: usize,
}

/// Logits, one row per example and one column per class.
///
/// # Errors
/// [`ModelError`] for an invalid spec, a wrong parameter count or a wrong input width.
pub fn logits(
    spec: &ModelSpec,
    params: &[f32],
    x: ArrayView2<'_, f32>,
) -> Result<Array2<f32>, ModelError> {
    let weights = Weights::new(spec, params)?;
    check_features(spec, x)?;

    let mut logits = Array2::zeros((x.nrows(), spec.classes));
    let mut scratch = Scratch::default();
    for (start, chunk) in (0..).step_by(EVAL_CHUNK_ROWS).zip(chunks(x)) {
        scratch.forward(&weights, chunk);
        let rows = start..start + chunk.nrows();
        logits
            .slice_axis_mut(Axis(0), Slice::from(rows))
            .assign(&scratch.logits());
    }
    Ok(logits)
}

/// Class probabilities `softmax(z)`, one row per example.
///
/// # Errors
/// As [`logits`].
pub fn probabilities(
    spec: &ModelSpec,
    params: &[f32],
    x: ArrayView2<'_, f32>,
) -> Result<Array2<f32>, ModelError> {
    let mut probabilities = logits(spec, params, x)?;
    for mut row in probabilities.rows_mut() {
        let max = row.fold(f32::NEG_INFINITY, |m, &z| m.max(z));
        row.mapv_inplace(|z| (z - max).exp());
        let sum = row.sum();
        row.mapv_inplace(|p| p / sum);
    }
    Ok(probabilities)
}

/// The predicted class of every example: the index of its largest logit (the first on ties).
///
/// # Errors
/// As [`logits`].
pub fn predict(
    spec: &ModelSpec,
    params: &[f32],
    x: ArrayView2<'_, f32>,
) -> Result<Vec<u32>, ModelError> {
    let logits = logits(spec, params, x)?;
    let argmax = |row: ndarray::ArrayView1<'_, f32>| {
        let mut best = 0;
        for (j, &z) in row.iter().enumerate() {
            if z > row[best] {
                best = j;
            }
        }
        // `validate` checked that every class index fits in `u32`.
        u32::try_from(best).expect("class index fits in u32")
    };
    Ok(logits.rows().into_iter().map(argmax).collect())
}

/// Mean cross-entropy, accuracy and example count of the model on `(x, y)`.
///
/// # Errors
/// [`ModelError`] for an invalid spec, a wrong parameter count, a wrong input width, a label
/// count that differs from the row count, a label out of range, a NaN or infinite input value,
/// or no rows.
pub fn evaluate(
    spec: &ModelSpec,
    params: &[f32],
    x: ArrayView2<'_, f32>,
    y: &[u32],
) -> Result<Evaluation, ModelError> {
    let weights = Weights::new(spec, params)?;
    check_examples(spec, x, y)?;
    if y.is_empty() {
        return Err(ModelError::NoExamples);
    }

    let (mut loss_sum, mut correct) = (0.0, 0);
    let mut scratch = Scratch::default();
    for (x, y) in chunks(x).zip(y.chunks(EVAL_CHUNK_ROWS)) {
        scratch.forward(&weights, x);
        let batch = scratch.softmax_deltas(y);
        loss_sum += batch.loss_sum;
        correct += batch.correct;
    }
    let examples = y.len();
    Ok(Evaluation {
        loss: loss_sum / examples as f64,
        accuracy: correct as f64 / examples as f64,
        examples,
    })
}

/// Mean cross-entropy `(1/n) sum_i (log sum_j exp(z_ij) - z_{i,y_i})`.
///
/// # Errors
/// As [`evaluate`].
pub fn loss(
    spec: &ModelSpec,
    params: &[f32],
    x: ArrayView2<'_, f32>,
    y: &[u32],
) -> Result<f64, ModelError> {
    evaluate(spec, params, x, y).map(|evaluation| evaluation.loss)
}

/// Fraction of examples predicted correctly.
///
/// # Errors
/// As [`evaluate`].
pub fn accuracy(
    spec: &ModelSpec,
    params: &[f32],
    x: ArrayView2<'_, f32>,
    y: &[u32],
) -> Result<f64, ModelError> {
    evaluate(spec, params, x, y).map(|evaluation| evaluation.accuracy)
}

/// Gradient of the mean cross-entropy with respect to every parameter, in the flat layout of
/// [`ModelSpec::tensors`].
///
/// # Errors
/// As [`evaluate`].
pub fn gradient(
    spec: &ModelSpec,
    params: &[f32],
    x: ArrayView2<'_, f32>,
    y: &[u32],
) -> Result<Vec<f32>, ModelError> {
    let weights = Weights::new(spec, params)?;
    check_examples(spec, x, y)?;
    if y.is_empty() {
        return Err(ModelError::NoExamples);
    }

    let mut grad = vec![0.0; params.len()];
    let mut scratch = Scratch::default();
    for (x, y) in chunks(x).zip(y.chunks(EVAL_CHUNK_ROWS)) {
        scratch.forward(&weights, x);
        scratch.softmax_deltas(y);
        scratch.backprop_hidden(&weights);
        scratch.accumulate_gradient(&weights, x, &mut grad, false);
    }
    let inverse = 1.0 / y.len() as f32;
    grad.iter_mut().for_each(|g| *g *= inverse);
    Ok(grad)
}

/// Checks the input width, the label count, every label and every input value.
pub(crate) fn check_examples(
    spec: &ModelSpec,
    x: ArrayView2<'_, f32>,
    y: &[u32],
) -> Result<(), ModelError> {
    check_features(spec, x)?;
    if y.len() != x.nrows() {
        return Err(ModelError::LabelCount {
            expected: x.nrows(),
            got: y.len(),
        });
    }
    if let Some(row) = y.iter().position(|&label| label as usize >= spec.classes) {
        return Err(ModelError::LabelOutOfRange {
            row,
            label: y[row],
            classes: spec.classes,
        });
    }
    for (row, values) in x.rows().into_iter().enumerate() {
        if let Some(column) = values.iter().position(|v| !v.is_finite()) {
            return Err(ModelError::NonFiniteInput { row, column });
        }
    }
    Ok(())
}

fn check_features(spec: &ModelSpec, x: ArrayView2<'_, f32>) -> Result<(), ModelError> {
    if x.ncols() == spec.features {
        return Ok(());
    }
    Err(ModelError::FeatureCount {
        expected: spec.features,
        got: x.ncols(),
    })
}

/// `x` in blocks of at most [`EVAL_CHUNK_ROWS`] rows.
pub(crate) fn chunks<'a>(
    x: ArrayView2<'a, f32>,
) -> impl Iterator<Item = ArrayView2<'a, f32>> + use<'a> {
    let mut rest = x;
    std::iter::from_fn(move || {
        if rest.nrows() == 0 {
            return None;
        }
        let (chunk, tail) = rest.split_at(Axis(0), rest.nrows().min(EVAL_CHUNK_ROWS));
        rest = tail;
        Some(chunk)
    })
}
