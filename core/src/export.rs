//! Model files that other tools read, built the same way wherever they are written.
//!
//! The coordinator's store keeps each version's weights as a safetensors file
//! ([`safetensors_file`]). Operators export versions from the coordinator, and nodes fetch them,
//! either as that file or as one NumPy array ([`npy_f32`]). Both sides build the bytes with the
//! functions here, so a file a node fetched is byte for byte the file the store holds and an
//! operator exports, and its SHA-256 is the one the version's manifest records.
//!
//! Files are put in place with [`write_atomically`]: no reader ever sees half a file, and an
//! existing file is only replaced when the caller says so.
//!
//! Two formats:
//!
//! - `safetensors`: one `F32` tensor per layer of the model, under its name (`w`, `b` or `w1`,
//!   `b1`, `w2`, `b2`) and shape, laid out in the order of the flat parameter vector, so the
//!   file's data section is exactly that vector in little-endian `f32`. The header carries
//!   string metadata: `athanor_format` ([`WEIGHTS_FORMAT`]), `version`, `architecture`
//!   (`logistic_regression` or `mlp`) and `model` (the [`ModelSpec`] as JSON). The header is
//!   written here with sorted keys rather than by the `safetensors` crate, so the same
//!   parameters and version always give the same bytes and hash. Read it with
//!   `safetensors.numpy.load_file` or `safetensors.torch.load_file`.
//! - `npy`: the flat parameter vector as one array, little-endian `f32` (`<f4`), shape
//!   `(num_params,)`, C order. The tensors lie end to end at the offsets
//!   [`ModelSpec::tensors`] gives, so `w = a[offset:offset + rows * cols].reshape(rows, cols)`
//!   recovers one. A single file was chosen over one per tensor so that both formats export to
//!   one path and tools that treat the model as one vector need no reassembly.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{Map, Value, json};

use crate::model::{Architecture, ModelSpec};

/// Value of the `athanor_format` metadata key in weights files.
pub const WEIGHTS_FORMAT: &str = "1";

/// The file formats a model version can be written in. See the [module documentation](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    /// The store's own weights file.
    Safetensors,
    /// The flat parameter vector as one NumPy array.
    Npy,
}

impl ExportFormat {
    /// The format's name as command lines spell it.
    pub fn name(self) -> &'static str {
        match self {
            ExportFormat::Safetensors => "safetensors",
            ExportFormat::Npy => "npy",
        }
    }

    /// The usual file name extension, without the dot.
    pub fn extension(self) -> &'static str {
        self.name()
    }
}

/// What [`write_atomically`] does when the target file exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overwrite {
    /// Refuse with [`WriteError::Exists`] and leave the file as it is.
    Refuse,
    /// Replace it in one step.
    Allow,
}

/// Why a file could not be written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WriteError {
    /// The target exists and replacing it was not allowed; it was left untouched.
    #[error("{} already exists", path.display())]
    Exists {
        /// The target.
        path: PathBuf,
    },
    /// The target path ends in `..` or is a root, so it names no file.
    #[error("{} does not name a file", path.display())]
    NotAFile {
        /// The path given.
        path: PathBuf,
    },
    /// Creating, writing, syncing or renaming failed; the target is untouched.
    #[error("writing {}: {source}", path.display())]
    Io {
        /// The file that failed: the temporary file or the target.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// The version's weights as the store's safetensors file (see the
/// [module documentation](self)). `params` must have the model's length.
///
/// The file: an 8-byte little-endian header length, the JSON header padded with spaces to a
/// multiple of 8 bytes, then the tensor data, each tensor at the byte offsets its header entry
/// gives relative to the end of the header.
///
/// # Panics
/// Never; a `params` of the wrong length gives a file whose header disagrees with its data,
/// which readers refuse.
pub fn safetensors_file(version: u64, model: &ModelSpec, params: &[f32]) -> Vec<u8> {
    let architecture = match model.architecture {
        Architecture::LogisticRegression => "logistic_regression",
        Architecture::Mlp { .. } => "mlp",
    };
    let metadata = json!({
        "athanor_format": WEIGHTS_FORMAT,
        "version": version.to_string(),
        "architecture": architecture,
        "model": json!(model).to_string(),
    });
    let tensors = model
        .tensors()
        .into_iter()
        .map(|view| {
            let (start, end) = (view.offset * 4, (view.offset + view.len()) * 4);
            let entry =
                json!({ "dtype": "F32", "shape": view.shape, "data_offsets": [start, end] });
            (view.name.to_owned(), entry)
        })
        .collect();
    let data = params.iter().flat_map(|value| value.to_le_bytes());
    safetensors_bytes(metadata, tensors, data, params.len() * 4)
}

/// A safetensors file holding one one-dimensional `F64` tensor named `name`, with string
/// `metadata`: for state that must survive exactly, such as an optimizer's velocity.
pub fn safetensors_f64(name: &str, metadata: &[(&str, String)], values: &[f64]) -> Vec<u8> {
    let metadata: Map<String, Value> = metadata
        .iter()
        .map(|(key, value)| ((*key).to_owned(), Value::from(value.as_str())))
        .collect();
    let entry = json!({
        "dtype": "F64",
        "shape": [values.len()],
        "data_offsets": [0, values.len() * 8],
    });
    let data = values.iter().flat_map(|value| value.to_le_bytes());
    safetensors_bytes(
        Value::Object(metadata),
        vec![(name.to_owned(), entry)],
        data,
        values.len() * 8,
    )
}

/// Lays out a safetensors file: header length, header with sorted keys padded to 8 bytes,
/// then `data`.
fn safetensors_bytes(
    metadata: Value,
    tensors: Vec<(String, Value)>,
    data: impl Iterator<Item = u8>,
    data_len: usize,
) -> Vec<u8> {
    // serde_json's map is ordered by key, so the header's text depends only on its contents.
    let mut header = Map::new();
    header.insert("__metadata__".to_owned(), metadata);
    header.extend(tensors);
    let mut header = Value::Object(header).to_string().into_bytes();
    header.resize(header.len().next_multiple_of(8), b' ');

    let mut bytes = Vec::with_capacity(8 + header.len() + data_len);
    bytes.extend_from_slice(&(header.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&header);
    bytes.extend(data);
    bytes
}

/// A one-dimensional `<f4` array in NumPy's `.npy` format, version 1.0: the magic string
/// `\x93NUMPY`, the version bytes `1 0`, the header length as a little-endian `u16`, a Python
/// dict literal describing the array, padded with spaces and ended by a newline so that the
/// data starts at a multiple of 64 bytes, then the values.
///
/// ```
/// let bytes = athanor_core::export::npy_f32(&[1.0, -2.0]);
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

/// Writes `contents` to `out` so that no reader ever sees half a file: into a temporary file
/// next to it (`.NAME.PID.N.partial`), flushed to disk, then moved into place. With
/// [`Overwrite::Refuse`] the move is a hard link, which fails rather than replace a file that
/// appeared meanwhile; on a file system without hard links it falls back to checking first and
/// renaming, which leaves that narrow race open. The temporary file is removed whatever
/// happens.
///
/// The directory is synced afterwards so the new name survives a crash; that last step is
/// best effort, since the file is complete either way and some directories cannot be opened
/// for reading. A caller that needs the name itself durable syncs the directory again and
/// checks the result.
///
/// # Errors
/// [`WriteError::Exists`] (nothing written), [`WriteError::NotAFile`], [`WriteError::Io`]
/// (the target untouched).
pub fn write_atomically(
    out: &Path,
    contents: &[u8],
    overwrite: Overwrite,
) -> Result<(), WriteError> {
    let exists = || WriteError::Exists {
        path: out.to_path_buf(),
    };
    let Some(name) = out.file_name() else {
        return Err(WriteError::NotAFile {
            path: out.to_path_buf(),
        });
    };
    // Checked first as well, so a refused write costs nothing.
    if overwrite == Overwrite::Refuse && out.exists() {
        return Err(exists());
    }

    let temp = temp_path(out, name);
    let written = create_synced(&temp, contents).and_then(|()| match overwrite {
        Overwrite::Allow => fs::rename(&temp, out).map_err(io_error(out)),
        Overwrite::Refuse => link_new(&temp, out, exists),
    });
    // After a rename the temporary name is gone already; after a link or a failure it is
    // still there. This crate does not log, so one that cannot be removed is left behind; its
    // name says what it is.
    let _ = fs::remove_file(&temp);
    written?;

    #[cfg(unix)]
    if let Some(dir) = out.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        let _ = File::open(dir).and_then(|dir| dir.sync_all());
    }
    Ok(())
}

/// A temporary name next to `out`, unique within this process.
fn temp_path(out: &Path, name: &std::ffi::OsStr) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut temp_name = OsString::from(".");
    temp_name.push(name);
    temp_name.push(format!(
        ".{}.{}.partial",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    out.with_file_name(temp_name)
}

/// Creates `path` (which must not exist), writes `contents` and flushes them to disk.
fn create_synced(path: &Path, contents: &[u8]) -> Result<(), WriteError> {
    let mut file = File::create_new(path).map_err(io_error(path))?;
    file.write_all(contents).map_err(io_error(path))?;
    file.sync_all().map_err(io_error(path))
}

/// Gives the complete `temp` the name `out`, unless `out` exists.
fn link_new(temp: &Path, out: &Path, exists: impl Fn() -> WriteError) -> Result<(), WriteError> {
    match fs::hard_link(temp, out) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => Err(exists()),
        // No hard links here (some network and removable file systems): check, then rename.
        Err(_) if out.exists() => Err(exists()),
        Err(_) => fs::rename(temp, out).map_err(io_error(out)),
    }
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> WriteError + '_ {
    move |source| WriteError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_write_leaves_the_existing_file_and_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("model.npy");
        fs::write(&out, b"old").unwrap();

        let refused = write_atomically(&out, b"new", Overwrite::Refuse).unwrap_err();
        assert!(matches!(refused, WriteError::Exists { .. }), "{refused}");
        assert_eq!(fs::read(&out).unwrap(), b"old");

        write_atomically(&out, b"new", Overwrite::Allow).unwrap();
        assert_eq!(fs::read(&out).unwrap(), b"new");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["model.npy"]);
    }

    #[test]
    fn a_new_file_is_written_whole_and_alone() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("weights.safetensors");
        write_atomically(&out, b"contents", Overwrite::Refuse).unwrap();
        assert_eq!(fs::read(&out).unwrap(), b"contents");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_path_without_a_file_name_is_refused() {
        let refused = write_atomically(Path::new("/"), b"x", Overwrite::Allow).unwrap_err();
        assert!(matches!(refused, WriteError::NotAFile { .. }), "{refused}");
    }

    #[test]
    fn the_f64_file_reads_back_exactly_with_its_metadata() {
        let values = [0.1, -3.5e-300, f64::MAX];
        let bytes = safetensors_f64("velocity", &[("version", "3".into())], &values);
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!(header_len % 8, 0);
        let header: Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
        assert_eq!(header["__metadata__"]["version"], "3");
        assert_eq!(header["velocity"]["dtype"], "F64");
        assert_eq!(header["velocity"]["shape"], json!([3]));
        let data: Vec<f64> = bytes[8 + header_len..]
            .chunks_exact(8)
            .map(|chunk| f64::from_le_bytes(chunk.try_into().unwrap()))
            .collect();
        assert_eq!(data, values);
    }
}
