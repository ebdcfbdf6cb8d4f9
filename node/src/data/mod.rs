//! Loading a node's local data: schema, CSV loader, train/test split.
//!
//! A node trains on one CSV file (plain or gzip, told apart by its first bytes) with a header
//! row, described by a [`Schema`]: the label column, the number of classes, and the feature
//! columns with public bounds. [`Dataset::load`] reads the file in one streaming pass and
//! returns the features clamped to their bounds and scaled to `[0, 1]`, the labels as class
//! indices, and a [`Fingerprint`] of the file that the node reports for lineage.
//! [`Dataset::split`] then holds out a test set, reproducibly from a seed.
//!
//! Invariants of a [`Dataset`]: `features().len() == rows() * cols()`, every feature lies in
//! `[0, 1]`, every label in `0..classes()`. A loaded dataset has at least one row; a part made
//! by [`Dataset::split`] or [`Dataset::subset`] may have none.
//!
//! Raw data never reaches a log line or an error message: errors name the file, line and column
//! and show at most the one offending cell, cut short, and `Dataset`'s `Debug` shows only shapes.
//! The training code reads datasets through [`Dataset::features`] and [`Dataset::labels`].

mod error;
mod load;
mod schema;
mod split;

use std::fmt;
use std::io::Read;
use std::path::Path;

pub use error::{CELL_TEXT_CHARS, CellText, ColumnRole, DataError};
pub use schema::{Bounds, ExtraColumns, Schema};

/// A node's local examples, features scaled to `[0, 1]`, stored row-major.
#[derive(Clone)]
pub struct Dataset {
    /// `rows * cols` values in `[0, 1]`, row-major.
    features: Vec<f32>,
    /// One class index in `0..classes` per row.
    labels: Vec<u32>,
    /// Number of features per row.
    cols: usize,
    /// Number of classes the schema declares (not necessarily all present).
    classes: u32,
    /// Names of the feature columns, in feature order.
    feature_names: Vec<String>,
    /// The source file's fingerprint.
    fingerprint: Fingerprint,
}

/// Identifies the file a dataset was loaded from: SHA-256 of its bytes as stored (compressed,
/// if it is gzip) and the number of data rows it holds.
///
/// Displayed as `sha256:<64 hex digits>/rows:<n>`. The split parts of a dataset keep the
/// fingerprint of the whole file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint {
    sha256: [u8; 32],
    rows: u64,
}

impl Dataset {
    /// Loads a CSV or gzip CSV file described by `schema`.
    ///
    /// Features are clamped to their schema bounds and scaled to `[0, 1]`
    /// (see [`Bounds::scale`]). Cells may be surrounded by spaces; labels must be written as
    /// integers in `0..classes`. The file is read once, streaming; only the result is held in
    /// memory.
    ///
    /// # Errors
    ///
    /// [`DataError::FileNotFound`], [`DataError::Read`], [`DataError::CorruptGzip`], and, with
    /// the file, line and column of the problem, every way the content can disagree with the
    /// schema: [`DataError::EmptyFile`], [`DataError::NoRows`], [`DataError::MissingColumn`],
    /// [`DataError::UnexpectedColumn`], [`DataError::RaggedRow`], [`DataError::EmptyCell`],
    /// [`DataError::NotNumeric`], [`DataError::NonFinite`], [`DataError::LabelNotInteger`],
    /// [`DataError::LabelOutOfRange`], and others of [`DataError`].
    pub fn load(path: impl AsRef<Path>, schema: &Schema) -> Result<Self, DataError> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => DataError::FileNotFound {
                file: path.to_owned(),
            },
            _ => DataError::Read {
                file: path.to_owned(),
                line: 0,
                source,
            },
        })?;
        load::read(file, path, schema)
    }

    /// Loads CSV or gzip CSV from any reader; `name` stands for the file in error messages.
    ///
    /// # Errors
    ///
    /// As [`Dataset::load`], except for opening the file.
    pub fn from_reader(
        reader: impl Read,
        name: impl AsRef<Path>,
        schema: &Schema,
    ) -> Result<Self, DataError> {
        load::read(reader, name.as_ref(), schema)
    }

    /// Number of rows (examples).
    pub fn rows(&self) -> usize {
        self.labels.len()
    }

    /// Number of features per row.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Number of classes the schema declares; labels lie in `0..classes()`.
    pub fn classes(&self) -> u32 {
        self.classes
    }

    /// All features, row-major: row `i` is `features()[i * cols()..(i + 1) * cols()]`.
    pub fn features(&self) -> &[f32] {
        &self.features
    }

    /// The label of each row.
    pub fn labels(&self) -> &[u32] {
        &self.labels
    }

    /// The features of row `i`.
    ///
    /// # Panics
    ///
    /// If `i >= rows()`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.features[i * self.cols..(i + 1) * self.cols]
    }

    /// Names of the feature columns, in feature order.
    pub fn feature_names(&self) -> &[String] {
        &self.feature_names
    }

    /// The fingerprint of the file the dataset was loaded from.
    pub fn fingerprint(&self) -> &Fingerprint {
        &self.fingerprint
    }

    /// Takes the features (row-major, `rows() x cols()`) and labels out of the dataset.
    pub fn into_parts(self) -> (Vec<f32>, Vec<u32>) {
        (self.features, self.labels)
    }
}

// Only shapes: a derived `Debug` would print every value into whatever log line formats it.
impl fmt::Debug for Dataset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dataset")
            .field("rows", &self.rows())
            .field("cols", &self.cols)
            .field("classes", &self.classes)
            .field("fingerprint", &format_args!("{}", self.fingerprint))
            .finish_non_exhaustive()
    }
}

impl Fingerprint {
    /// SHA-256 of the file's bytes as stored.
    pub fn sha256(&self) -> &[u8; 32] {
        &self.sha256
    }

    /// SHA-256 of the file's bytes as stored, in lowercase hex (as `sha256sum` prints it).
    pub fn sha256_hex(&self) -> String {
        hex::encode(self.sha256)
    }

    /// Number of data rows in the file.
    pub fn rows(&self) -> u64 {
        self.rows
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}/rows:{}", self.sha256_hex(), self.rows)
    }
}
