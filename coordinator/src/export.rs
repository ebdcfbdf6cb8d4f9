//! Exporting a model version's weights to a file other tools read.
//!
//! Two formats:
//!
//! - `safetensors`: the version's weights file, byte for byte, as the store holds it (one
//!   tensor per layer, with its name and shape; see [`crate::store`]). Read it with
//!   `safetensors.numpy.load_file` or `safetensors.torch.load_file`.
//! - `npy`: one NumPy array holding the model's flat parameter vector: little-endian `f32`
//!   (`<f4`), shape `(num_params,)`, C order. The vector is the tensors laid end to end in the
//!   order and at the offsets [`Exported::tensors`] lists (the same layout nodes train on and
//!   the wire carries), so `w = a[offset:offset + rows * cols].reshape(rows, cols)` recovers a
//!   tensor. A single file was chosen over one file per tensor so that both formats export to
//!   one path and the flat vector needs no reassembly for tools that treat the model as one
//!   vector.
//!
//! Whatever the format, the weights are checked against the manifest's hash and the model's
//! tensor shapes before anything is written, and the file is written atomically: into a
//! temporary file next to the target, flushed to disk, then renamed over it, so no reader ever
//! sees half a file. An existing file is only replaced when the caller says so.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::Error;
use crate::store::{self, Manifest};

/// The file formats a version can be exported to. See the [module documentation](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    /// The store's own weights file.
    Safetensors,
    /// The flat parameter vector as one NumPy array.
    Npy,
}

impl ExportFormat {
    /// The format's name as the CLI spells it.
    pub fn name(self) -> &'static str {
        match self {
            ExportFormat::Safetensors => "safetensors",
            ExportFormat::Npy => "npy",
        }
    }
}

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
    if !overwrite && out.exists() {
        return Err(Error::InvalidRequest(format!(
            "{} already exists; choose another path or allow overwriting",
            out.display()
        )));
    }

    let contents = match format {
        ExportFormat::Safetensors => weights.to_vec(),
        ExportFormat::Npy => npy_f32(&params),
    };
    write_atomically(out, &contents)?;

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

/// A one-dimensional `<f4` array in NumPy's `.npy` format, version 1.0: the magic string
/// `\x93NUMPY`, the version bytes `1 0`, the header length as a little-endian `u16`, a Python
/// dict literal describing the array, padded with spaces and ended by a newline so that the
/// data starts at a multiple of 64 bytes, then the values.
///
/// ```
/// let bytes = athanor_coordinator::export::npy_f32(&[1.0, -2.0]);
/// assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
/// let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
/// let data = 10 + header_len;
/// assert_eq!(data % 64, 0);
/// assert!(std::str::from_utf8(&bytes[10..data]).unwrap().contains("'shape': (2,)"));
/// assert_eq!(&bytes[data..], [1.0f32.to_le_bytes(), (-2.0f32).to_le_bytes()].concat());
/// ```
pub fn npy_f32(values: &[f32]) -> Vec<u8> {
    const PREAMBLE: usize = 10;
    let mut header = format!(
        "{{'descr': '<f4', 'fortran_order': False, 'shape': ({},), }}",
        values.len()
    );
    let padded = (PREAMBLE + header.len() + 1).next_multiple_of(64);
    header.extend(std::iter::repeat_n(
        ' ',
        padded - PREAMBLE - header.len() - 1,
    ));
    header.push('\n');

    let mut bytes = Vec::with_capacity(padded + values.len() * 4);
    bytes.extend_from_slice(b"\x93NUMPY\x01\x00");
    // Headers are at most a few dozen bytes plus a decimal length, far below 65 535.
    let header_len = u16::try_from(header.len()).unwrap_or(u16::MAX);
    bytes.extend_from_slice(&header_len.to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    for value in values {
        bytes.extend_from_slice(&value.to_le_bytes());
    }
    bytes
}

/// Writes `contents` to a temporary file in `out`'s directory, flushes it, and renames it to
/// `out`; the temporary file is removed if anything fails.
fn write_atomically(out: &Path, contents: &[u8]) -> Result<(), Error> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    let name = out
        .file_name()
        .ok_or_else(|| Error::InvalidRequest(format!("{} does not name a file", out.display())))?;
    let mut temp_name = std::ffi::OsString::from(".");
    temp_name.push(name);
    temp_name.push(format!(".partial-{}", std::process::id()));
    let temp = out.with_file_name(temp_name);

    let written = File::create_new(&temp)
        .and_then(|mut file| {
            file.write_all(contents)?;
            file.sync_all()
        })
        .map_err(io(&temp))
        .and_then(|()| fs::rename(&temp, out).map_err(io(out)));
    if written.is_err() {
        let _ = fs::remove_file(&temp);
        return written;
    }
    // Best effort: make the rename durable too. The file is complete either way.
    #[cfg(unix)]
    if let Some(dir) = out.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        let _ = File::open(dir).and_then(|dir| dir.sync_all());
    }
    Ok(())
}
