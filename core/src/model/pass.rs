//! Batched forward and backward passes, shared by evaluation and by (DP-)SGD.
//!
//! [`Weights`] borrows the tensors of a flat parameter vector as matrix views, without copying.
//! [`Scratch`] holds one batch's activations and deltas in buffers that are reused from batch
//! to batch, so a training loop allocates only while its batches grow.
//!
//! The order of calls on a batch is fixed: [`Scratch::forward`], then
//! [`Scratch::softmax_deltas`] (which overwrites the logits with the loss gradient at the
//! logits), then [`Scratch::backprop_hidden`], then optionally [`Scratch::squared_norms`] and
//! [`Scratch::scale_rows`], and last [`Scratch::accumulate_gradient`]. Callers check the input
//! width and the labels before the first call; the parameter count is checked by
//! [`Weights::new`].

use std::fmt;

use ndarray::linalg::general_mat_mul;
use ndarray::{ArrayView2, ArrayViewMut2};

use super::{ModelError, ModelSpec, TensorView};

/// The tensors of one parameter vector, viewed in place.
pub(crate) enum Weights<'a> {
    /// `z = x W + b`.
    Linear {
        w: ArrayView2<'a, f32>,
        b: &'a [f32],
    },
    /// `h = relu(x W1 + b1)`, `z = h W2 + b2`.
    Mlp {
        w1: ArrayView2<'a, f32>,
        b1: &'a [f32],
        w2: ArrayView2<'a, f32>,
        b2: &'a [f32],
    },
}

impl<'a> Weights<'a> {
    /// Views `params` through the layout of `spec`.
    ///
    /// # Errors
    /// The spec's own errors ([`ModelSpec::validate`]) and [`ModelError::ParamCount`].
    pub(crate) fn new(spec: &ModelSpec, params: &'a [f32]) -> Result<Self, ModelError> {
        spec.validate()?;
        let expected = spec.num_params();
        if params.len() != expected {
            return Err(ModelError::ParamCount {
                expected,
                got: params.len(),
            });
        }

        // `tensors` lists two tensors for logistic regression and four for the MLP, each
        // weight two-dimensional, and `params` was just checked to cover all of them.
        Ok(match spec.tensors().as_slice() {
            [w, b] => Weights::Linear {
                w: matrix(w, params),
                b: b.slice(params),
            },
            [w1, b1, w2, b2] => Weights::Mlp {
                w1: matrix(w1, params),
                b1: b1.slice(params),
                w2: matrix(w2, params),
                b2: b2.slice(params),
            },
            _ => unreachable!("every architecture has two or four tensors"),
        })
    }

    fn classes(&self) -> usize {
        match self {
            Weights::Linear { b, .. } => b.len(),
            Weights::Mlp { b2, .. } => b2.len(),
        }
    }
}

fn matrix<'a>(view: &TensorView, params: &'a [f32]) -> ArrayView2<'a, f32> {
    // Weight tensors are `[inputs, outputs]` and the slice holds exactly their product.
    ArrayView2::from_shape((view.shape[0], view.shape[1]), view.slice(params))
        .expect("a weight tensor fills its slice of the parameter vector")
}

/// Loss and correct predictions of one batch.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct BatchLoss {
    /// Sum of the examples' cross-entropies.
    pub(crate) loss_sum: f64,
    /// Examples whose largest logit (first one on ties) is their label.
    pub(crate) correct: usize,
}

/// Activations and deltas of one batch.
#[derive(Default)]
pub(crate) struct Scratch {
    rows: usize,
    classes: usize,
    /// Hidden width; zero for logistic regression.
    hidden_width: usize,
    /// `relu(x W1 + b1)`, `rows x hidden_width`.
    hidden: Vec<f32>,
    /// Loss gradient at the hidden pre-activations, `rows x hidden_width`.
    hidden_delta: Vec<f32>,
    /// Logits after `forward`, loss gradient at the logits after `softmax_deltas`;
    /// `rows x classes`.
    out: Vec<f32>,
}

impl fmt::Debug for Scratch {
    // Activations are derived from data rows: show shapes only.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scratch")
            .field("rows", &self.rows)
            .field("classes", &self.classes)
            .field("hidden_width", &self.hidden_width)
            .finish_non_exhaustive()
    }
}

impl Scratch {
    /// Computes the logits of every row of `x`.
    pub(crate) fn forward(&mut self, weights: &Weights<'_>, x: ArrayView2<'_, f32>) {
        self.rows = x.nrows();
        self.classes = weights.classes();
        match weights {
            Weights::Linear { w, b } => {
                self.hidden_width = 0;
                dense_forward(x, *w, b, &mut self.out);
            }
            Weights::Mlp { w1, b1, w2, b2 } => {
                self.hidden_width = b1.len();
                dense_forward(x, *w1, b1, &mut self.hidden);
                self.hidden.iter_mut().for_each(|a| *a = a.max(0.0));
                let hidden = view(&self.hidden, self.rows, self.hidden_width);
                dense_forward(hidden, *w2, b2, &mut self.out);
            }
        }
    }

    /// The logits of the last forward pass (before `softmax_deltas`).
    pub(crate) fn logits(&self) -> ArrayView2<'_, f32> {
        view(&self.out, self.rows, self.classes)
    }

    /// Scores the logits against `y`, then replaces them with `softmax(z_i) - e_{y_i}`.
    ///
    /// The log-softmax is shifted by the row maximum `m`: `l_i = ln sum_j exp(z_ij - m) -
    /// (z_{i,y_i} - m)`, so every exponential is at most 1.
    pub(crate) fn softmax_deltas(&mut self, y: &[u32]) -> BatchLoss {
        let mut batch = BatchLoss::default();
        for (row, &label) in self.out.chunks_exact_mut(self.classes).zip(y) {
            let label = label as usize;
            let (argmax, max) =
                row.iter()
                    .enumerate()
                    .fold((0, f32::NEG_INFINITY), |best, (j, &z)| {
                        if z > best.1 { (j, z) } else { best }
                    });
            let shifted_label = row[label] - max;

            let mut sum = 0.0;
            for z in row.iter_mut() {
                *z = (*z - max).exp();
                sum += *z;
            }
            let inverse = sum.recip();
            row.iter_mut().for_each(|p| *p *= inverse);
            row[label] -= 1.0;

            batch.loss_sum += f64::from(sum.ln() - shifted_label);
            batch.correct += usize::from(argmax == label);
        }
        batch
    }

    /// Backpropagates the logit deltas to the hidden pre-activations (MLP only):
    /// `d1 = (d2 W2^T) * 1[h > 0]`.
    pub(crate) fn backprop_hidden(&mut self, weights: &Weights<'_>) {
        let Weights::Mlp { w2, .. } = weights else {
            return;
        };
        self.hidden_delta.resize(self.rows * self.hidden_width, 0.0);
        if self.rows == 0 {
            return;
        }

        let deltas = view(&self.out, self.rows, self.classes);
        let mut hidden_delta = view_mut(&mut self.hidden_delta, self.rows, self.hidden_width);
        general_mat_mul(1.0, &deltas, &w2.t(), 0.0, &mut hidden_delta);
        for (d, &a) in self.hidden_delta.iter_mut().zip(&self.hidden) {
            if a <= 0.0 {
                *d = 0.0;
            }
        }
    }

    /// Squared L2 norm of every example's whole gradient, from the layer inputs and deltas
    /// alone: a dense layer contributes `(|a_i|^2 + 1) |d_i|^2` (weights plus bias).
    /// `x_sq_norms[i]` is `|x_i|^2` for the batch's row `i`.
    pub(crate) fn squared_norms(&self, x_sq_norms: &[f32], norms: &mut Vec<f32>) {
        norms.clear();
        let out = self.out.chunks_exact(self.classes);
        if self.hidden_width == 0 {
            norms.extend(
                out.zip(x_sq_norms)
                    .map(|(d, &x_sq)| (x_sq + 1.0) * squared(d)),
            );
            return;
        }

        let hidden = self.hidden.chunks_exact(self.hidden_width);
        let hidden_delta = self.hidden_delta.chunks_exact(self.hidden_width);
        for (((d2, a), d1), &x_sq) in out.zip(hidden).zip(hidden_delta).zip(x_sq_norms) {
            norms.push((squared(a) + 1.0) * squared(d2) + (x_sq + 1.0) * squared(d1));
        }
    }

    /// Multiplies every example's deltas by its factor, which scales its whole gradient by the
    /// same factor: each layer's gradient is linear in that layer's delta. A zero factor
    /// overwrites the deltas with zeros, so that it also silences non-finite ones.
    pub(crate) fn scale_rows(&mut self, factors: &[f32]) {
        let scale = |row: &mut [f32], factor: f32| {
            if factor == 0.0 {
                row.fill(0.0);
            } else {
                row.iter_mut().for_each(|d| *d *= factor);
            }
        };
        for (row, &factor) in self.out.chunks_exact_mut(self.classes).zip(factors) {
            scale(row, factor);
        }
        if self.hidden_width == 0 {
            return;
        }
        let hidden_rows = self.hidden_delta.chunks_exact_mut(self.hidden_width);
        for (row, &factor) in hidden_rows.zip(factors) {
            scale(row, factor);
        }
    }

    /// Adds `sum_i g_i` to `grad` (or writes it there if `overwrite`), where `g_i` is example
    /// `i`'s gradient as weighted by the current deltas, in the flat layout: `A^T D` for each
    /// layer's weights and the column sums of `D` for its bias.
    pub(crate) fn accumulate_gradient(
        &self,
        weights: &Weights<'_>,
        x: ArrayView2<'_, f32>,
        grad: &mut [f32],
        overwrite: bool,
    ) {
        let deltas = view(&self.out, self.rows, self.classes);
        match weights {
            Weights::Linear { w, .. } => {
                let (grad_w, grad_b) = grad.split_at_mut(w.len());
                dense_backward(x, deltas, grad_w, grad_b, overwrite);
            }
            Weights::Mlp { w1, b1, w2, .. } => {
                let (grad_w1, rest) = grad.split_at_mut(w1.len());
                let (grad_b1, rest) = rest.split_at_mut(b1.len());
                let (grad_w2, grad_b2) = rest.split_at_mut(w2.len());
                let hidden = view(&self.hidden, self.rows, self.hidden_width);
                let hidden_delta = view(&self.hidden_delta, self.rows, self.hidden_width);
                dense_backward(x, hidden_delta, grad_w1, grad_b1, overwrite);
                dense_backward(hidden, deltas, grad_w2, grad_b2, overwrite);
            }
        }
    }
}

/// `out = a W + b`, one row per row of `a`.
fn dense_forward(a: ArrayView2<'_, f32>, w: ArrayView2<'_, f32>, b: &[f32], out: &mut Vec<f32>) {
    let rows = a.nrows();
    out.clear();
    for _ in 0..rows {
        out.extend_from_slice(b);
    }
    if rows == 0 {
        return;
    }
    let mut z = view_mut(out, rows, b.len());
    general_mat_mul(1.0, &a, &w, 1.0, &mut z);
}

/// `grad_w += a^T d` and `grad_b += sum of d's rows`, after zeroing both if `overwrite`.
fn dense_backward(
    a: ArrayView2<'_, f32>,
    d: ArrayView2<'_, f32>,
    grad_w: &mut [f32],
    grad_b: &mut [f32],
    overwrite: bool,
) {
    if overwrite {
        grad_w.fill(0.0);
        grad_b.fill(0.0);
    }
    if a.nrows() == 0 {
        return;
    }

    let mut grad_w = view_mut(grad_w, a.ncols(), d.ncols());
    general_mat_mul(1.0, &a.t(), &d, 1.0, &mut grad_w);
    for row in d.rows() {
        grad_b.iter_mut().zip(row).for_each(|(g, &v)| *g += v);
    }
}

fn squared(v: &[f32]) -> f32 {
    v.iter().map(|a| a * a).sum()
}

fn view(buffer: &[f32], rows: usize, cols: usize) -> ArrayView2<'_, f32> {
    // Every buffer is sized `rows * cols` by the pass that filled it.
    ArrayView2::from_shape((rows, cols), &buffer[..rows * cols]).expect("buffer holds the batch")
}

fn view_mut(buffer: &mut [f32], rows: usize, cols: usize) -> ArrayViewMut2<'_, f32> {
    // As for `view`: callers size the buffer first.
    ArrayViewMut2::from_shape((rows, cols), &mut buffer[..rows * cols])
        .expect("buffer holds the batch")
}
