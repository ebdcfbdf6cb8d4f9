//! Errors of schema and data loading.
//!
//! Messages name the file, the line (1-based, the header being line 1) and the column (its name
//! and 1-based index) of the problem. They never carry the values of a row: at most the one
//! offending cell, cut to [`CELL_TEXT_CHARS`] characters.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// How many characters of an offending cell an error message may show.
pub const CELL_TEXT_CHARS: usize = 20;

/// Why a schema or a data file was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    /// The schema file could not be read.
    #[error("cannot read schema file `{}`", path.display())]
    SchemaRead {
        /// The schema file.
        path: PathBuf,
        /// What the operating system reported.
        #[source]
        source: io::Error,
    },

    /// The schema is not TOML, or has a misspelt, missing or mistyped key.
    #[error("schema `{}`: {message}", path.display())]
    SchemaSyntax {
        /// The schema file.
        path: PathBuf,
        /// The TOML parser's message, with the line and column of the problem.
        message: String,
    },

    /// A schema value is invalid.
    #[error("schema `{}`: `{key}` {reason}", path.display())]
    SchemaInvalid {
        /// The schema file.
        path: PathBuf,
        /// The offending key, as a dotted path (`features.bounds.age`).
        key: String,
        /// What is wrong with it.
        reason: String,
    },

    /// The data file does not exist.
    #[error("data file `{}` not found", file.display())]
    FileNotFound {
        /// The data file.
        file: PathBuf,
    },

    /// The data file could not be opened or read.
    #[error("cannot read data file `{}` near line {line}", file.display())]
    Read {
        /// The data file.
        file: PathBuf,
        /// The line being read when the error happened (0 if it could not be opened).
        line: u64,
        /// What the operating system reported.
        #[source]
        source: io::Error,
    },

    /// The data file starts as gzip but cannot be decompressed: corrupt or truncated.
    #[error("data file `{}`: corrupt or truncated gzip data near line {line}", file.display())]
    CorruptGzip {
        /// The data file.
        file: PathBuf,
        /// The line being decompressed when the error happened.
        line: u64,
        /// What the decompressor reported.
        #[source]
        source: io::Error,
    },

    /// The CSV itself is malformed in a way the other variants do not cover.
    #[error("data file `{}`, line {line}: malformed csv: {reason}", file.display())]
    Csv {
        /// The data file.
        file: PathBuf,
        /// The line of the problem.
        line: u64,
        /// The CSV parser's description.
        reason: String,
    },

    /// The data file is empty: not even a header row.
    #[error("data file `{}` is empty: no header row", file.display())]
    EmptyFile {
        /// The data file.
        file: PathBuf,
    },

    /// The data file has a header row and nothing else.
    #[error("data file `{}` has a header row but no data rows", file.display())]
    NoRows {
        /// The data file.
        file: PathBuf,
    },

    /// A header cell is not a usable column name.
    #[error("data file `{}`, line 1, column #{index}: {reason}", file.display())]
    BadHeader {
        /// The data file.
        file: PathBuf,
        /// 1-based index of the column.
        index: usize,
        /// What is wrong with the name.
        reason: &'static str,
    },

    /// Two header cells have the same name.
    #[error(
        "data file `{}`, line 1: column `{column}` appears twice (#{first} and #{second})",
        file.display()
    )]
    DuplicateColumn {
        /// The data file.
        file: PathBuf,
        /// The repeated name.
        column: String,
        /// 1-based index of its first occurrence.
        first: usize,
        /// 1-based index of its second occurrence.
        second: usize,
    },

    /// A column the schema requires is not in the header.
    #[error(
        "data file `{}`, line 1: missing {role} column `{column}` (schema `{}`)",
        file.display(),
        schema.display()
    )]
    MissingColumn {
        /// The data file.
        file: PathBuf,
        /// The schema that requires the column.
        schema: PathBuf,
        /// The missing column's name.
        column: String,
        /// Whether the label or a feature is missing.
        role: ColumnRole,
    },

    /// The header has a column the schema does not mention, and the schema rejects extra
    /// columns.
    #[error(
        "data file `{}`, line 1, column `{column}` (#{index}): not in schema `{}` \
         (set `extra_columns = \"ignore\"` there to skip such columns)",
        file.display(),
        schema.display()
    )]
    UnexpectedColumn {
        /// The data file.
        file: PathBuf,
        /// The schema.
        schema: PathBuf,
        /// The unexpected column's name.
        column: String,
        /// Its 1-based index.
        index: usize,
    },

    /// A row has more or fewer cells than the header.
    #[error(
        "data file `{}`, line {line}, column #{index}: row has {got} cells, header has {expected}",
        file.display()
    )]
    RaggedRow {
        /// The data file.
        file: PathBuf,
        /// The row's line.
        line: u64,
        /// 1-based index of the first missing or first surplus cell.
        index: usize,
        /// Number of header cells.
        expected: usize,
        /// Number of cells in the row.
        got: usize,
    },

    /// A label or feature cell is empty (or only spaces).
    #[error(
        "data file `{}`, line {line}, column `{column}` (#{index}): empty cell",
        file.display()
    )]
    EmptyCell {
        /// The data file.
        file: PathBuf,
        /// The cell's line.
        line: u64,
        /// The cell's column name.
        column: String,
        /// The cell's 1-based column index.
        index: usize,
    },

    /// A feature cell is not a number.
    #[error(
        "data file `{}`, line {line}, column `{column}` (#{index}): not a number: {text}",
        file.display()
    )]
    NotNumeric {
        /// The data file.
        file: PathBuf,
        /// The cell's line.
        line: u64,
        /// The cell's column name.
        column: String,
        /// The cell's 1-based column index.
        index: usize,
        /// The cell, cut short and quoted.
        text: CellText,
    },

    /// A feature cell is NaN or infinite (including a number too large for `f64`).
    #[error(
        "data file `{}`, line {line}, column `{column}` (#{index}): not a finite number: {text}",
        file.display()
    )]
    NonFinite {
        /// The data file.
        file: PathBuf,
        /// The cell's line.
        line: u64,
        /// The cell's column name.
        column: String,
        /// The cell's 1-based column index.
        index: usize,
        /// The cell, cut short and quoted.
        text: CellText,
    },

    /// A label cell is not written as an integer (`3.0` is refused: labels are class indices).
    #[error(
        "data file `{}`, line {line}, column `{column}` (#{index}): \
         label is not an integer: {text}",
        file.display()
    )]
    LabelNotInteger {
        /// The data file.
        file: PathBuf,
        /// The cell's line.
        line: u64,
        /// The cell's column name.
        column: String,
        /// The cell's 1-based column index.
        index: usize,
        /// The cell, cut short and quoted.
        text: CellText,
    },

    /// A label is an integer outside `0..classes`.
    #[error(
        "data file `{}`, line {line}, column `{column}` (#{index}): label {text} is outside \
         0..{classes} (the schema declares {classes} classes)",
        file.display()
    )]
    LabelOutOfRange {
        /// The data file.
        file: PathBuf,
        /// The cell's line.
        line: u64,
        /// The cell's column name.
        column: String,
        /// The cell's 1-based column index.
        index: usize,
        /// The cell, cut short and quoted.
        text: CellText,
        /// The number of classes the schema declares.
        classes: u32,
    },

    /// A train/test split was asked for with a test fraction outside `[0, 1)`.
    #[error("test fraction must lie in [0, 1), got {got}")]
    InvalidTestFraction {
        /// The fraction asked for.
        got: f64,
    },
}

/// Which role a column plays in a schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnRole {
    /// The label column.
    Label,
    /// A feature column.
    Feature,
}

impl fmt::Display for ColumnRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Label => "label",
            Self::Feature => "feature",
        })
    }
}

/// The text of one offending cell, cut to [`CELL_TEXT_CHARS`] characters; displayed quoted
/// and escaped, with `…` when cut.
///
/// Only ever built from the cell at fault, never from a whole row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CellText {
    text: String,
    cut: bool,
}

impl CellText {
    /// Keeps the start of `cell`, replacing invalid UTF-8.
    pub(super) fn new(cell: &[u8]) -> Self {
        // Four bytes per character at most, plus one character to tell whether anything was cut.
        let head = &cell[..cell.len().min(4 * (CELL_TEXT_CHARS + 1))];
        let lossy = String::from_utf8_lossy(head);
        let mut chars = lossy.chars();
        let text: String = chars.by_ref().take(CELL_TEXT_CHARS).collect();
        let cut = chars.next().is_some() || head.len() < cell.len();
        Self { text, cut }
    }

    /// The kept text, without quotes.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for CellText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.text)?;
        if self.cut {
            f.write_str("…")?;
        }
        Ok(())
    }
}
