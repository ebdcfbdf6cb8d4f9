//! Exporting a model version's weights to a file other tools read.
//!
//! The formats, `safetensors` (the store's weights file byte for byte) and `npy` (the flat
//! parameter vector as one NumPy array), are described and built in
//! [`athanor_core::export`], which nodes use too when they fetch a version.
//!
//! Whatever the format, the weights are checked against the manifest's hash and the model's
//! tensor shapes before anything is written, and the file is written atomically: into a
//! temporary file next to the target, flushed to disk, then moved into place, so no reader
//! ever sees half a file. An existing file is only replaced when the caller says so.

use std::path::{Path, PathBuf};

pub use athanor_core::export::ExportFormat;
use athanor_core::export::{self as formats, Overwrite, WriteError};

use crate::Error;
use crate::store::{self, Manifest};

/// Where one tensor lies in the flat parameter vector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorLayout {
    /// Its name (`w`, `b`, or `w1`, `b1`, `w2`, `b2`), the safetensors key.
    pub name: &'static str,
    /// Row-major shape.
    pub shape: Vec<usize>,
    /// Index of its first value in the flat vector.
    pub offset: usize,
}

/// What an export wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct Exported {
    /// The version exported.
    pub version: u64,
    /// The format written.
    pub format: ExportFormat,
    /// The file written.
    pub path: PathBuf,
    /// Its length in bytes.
    pub bytes: u64,
    /// The SHA-256 of the version's weights file, as its manifest records and as checked.
    pub weights_sha256: String,
    /// Length of the flat parameter vector.
    pub num_params: usize,
    /// The tensors, in the order of the flat vector.
    pub tensors: Vec<TensorLayout>,
}

/// Writes `weights`, the bytes of the weights file of the version `manifest` describes, to
/// `out` in `format`, after checking them against the manifest.
///
/// # Errors
/// [`Error::Store`] when the bytes do not match the manifest's hash or model;
/// [`Error::InvalidRequest`] when `out` exists and `overwrite` is false; [`Error::Io`] when
/// writing fails (the target is then untouched).
pub fn export(
    manifest: &Manifest,
    weights: &[u8],
    format: ExportFormat,
    out: &Path,
    overwrite: bool,
) -> Result<Exported, Error> {
    let params = store::params_from_weights(manifest, weights)?;
    let contents = match format {
        ExportFormat::Safetensors => weights.to_vec(),
        ExportFormat::Npy => formats::npy_f32(&params),
    };
    let overwrite = if overwrite {
        Overwrite::Allow
    } else {
        Overwrite::Refuse
    };
    formats::write_atomically(out, &contents, overwrite).map_err(|error| match error {
        WriteError::Io { path, source } => Error::Io { path, source },
        other => Error::InvalidRequest(other.to_string()),
    })?;

    let tensors = manifest
        .model
        .tensors()
        .into_iter()
        .map(|view| TensorLayout {
            name: view.name,
            shape: view.shape,
            offset: view.offset,
        })
        .collect();
    Ok(Exported {
        version: manifest.version,
        format,
        path: out.to_path_buf(),
        bytes: contents.len() as u64,
        weights_sha256: manifest.weights_sha256.clone(),
        num_params: params.len(),
        tensors,
    })
}
