//! Model architectures and their parameters.
//!
//! Every model keeps its parameters as one flat `f32` vector. The vector is what crosses the
//! wire, what the coordinator averages and what the model store writes; the named tensor
//! views ([`ModelSpec::tensors`]) give it shape when it is saved or inspected. Keeping one flat
//! layout means aggregation, clipping of updates and quantization never need to know the
//! architecture.

use serde::{Deserialize, Serialize};

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
}
