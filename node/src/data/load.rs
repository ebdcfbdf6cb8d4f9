//! The CSV loader: one streaming pass from raw bytes to scaled features and labels.
//!
//! Layers, bottom up: the raw reader, wrapped to hash every byte it yields (the fingerprint);
//! the first two bytes, peeked to tell gzip from plain text; a gzip decoder if needed; the
//! `csv` reader, filling one reused `ByteRecord` per row so that cells cost no allocation.

use std::collections::HashMap;
use std::io::{self, Chain, Cursor, Read};
use std::path::Path;
use std::time::Instant;

use csv::ByteRecord;
use flate2::read::MultiGzDecoder;
use sha2::{Digest, Sha256};

use super::schema::Features;
use super::{Bounds, CellText, ColumnRole, DataError, Dataset, ExtraColumns, Fingerprint, Schema};

/// The first two bytes of every gzip member (RFC 1952, section 2.3.1).
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// Read buffer of the CSV reader; larger than its default to cut calls into the decoder.
const CSV_BUFFER: usize = 1 << 16;

// TODO: decompression and parsing share one thread; about 0.4 s of the 1.4 s MNIST train takes
// in release is inflating. A second thread inflating into a bounded pipe would overlap the two.
pub(super) fn read(raw: impl Read, file: &Path, schema: &Schema) -> Result<Dataset, DataError> {
    let started = Instant::now();

    // Hash below everything else, so the fingerprint covers the bytes exactly as stored.
    let mut hashed = Hashing {
        inner: raw,
        hasher: Sha256::new(),
    };
    let magic = peek(&mut hashed).map_err(|source| read_error(file, 1, source))?;
    let gzip = magic == GZIP_MAGIC;
    let input = Cursor::new(magic).chain(hashed);
    let source = if gzip {
        Source::Gzip(MultiGzDecoder::new(input))
    } else {
        Source::Plain(input)
    };

    // Row lengths are checked below, to report them with the schema's names.
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .buffer_capacity(CSV_BUFFER)
        .from_reader(source);
    let header = match reader.byte_headers() {
        Ok(header) => header.clone(),
        Err(err) => return Err(csv_error(err, file, 1, gzip)),
    };
    if header.is_empty() {
        return Err(DataError::EmptyFile {
            file: file.to_owned(),
        });
    }
    let plan = Plan::new(&header, schema, file)?;

    let mut features = Vec::new();
    let mut labels = Vec::new();
    let mut record = ByteRecord::new();
    loop {
        match reader.read_byte_record(&mut record) {
            Ok(true) => {}
            Ok(false) => break,
            Err(err) => return Err(csv_error(err, file, reader.position().line(), gzip)),
        }
        plan.parse_row(&record, schema.classes(), file, &mut features, &mut labels)?;
    }
    if labels.is_empty() {
        return Err(DataError::NoRows {
            file: file.to_owned(),
        });
    }

    // Whatever follows the last row (trailing bytes the decoder stopped short of) is part of
    // the file too.
    let line = reader.position().line();
    let (_, mut hashed) = match reader.into_inner() {
        Source::Plain(input) => input.into_inner(),
        Source::Gzip(decoder) => decoder.into_inner().into_inner(),
    };
    io::copy(&mut hashed, &mut io::sink()).map_err(|source| read_error(file, line, source))?;

    let fingerprint = Fingerprint {
        sha256: hashed.hasher.finalize().into(),
        rows: labels.len() as u64,
    };
    let dataset = Dataset {
        features,
        labels,
        cols: plan.feature_names.len(),
        classes: schema.classes(),
        feature_names: plan.feature_names,
        fingerprint,
    };
    tracing::info!(
        file = %file.display(),
        rows = dataset.rows(),
        cols = dataset.cols(),
        gzip,
        %fingerprint,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "dataset loaded"
    );
    Ok(dataset)
}

/// A reader that feeds every byte it yields into a SHA-256 hasher.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Reads the first two bytes (fewer if the input is shorter).
fn peek(reader: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut magic = Vec::with_capacity(GZIP_MAGIC.len());
    reader
        .take(GZIP_MAGIC.len() as u64)
        .read_to_end(&mut magic)?;
    Ok(magic)
}

/// The decompressed (or plain) byte stream under the CSV reader.
enum Source<R> {
    Plain(Chain<Cursor<Vec<u8>>, Hashing<R>>),
    Gzip(MultiGzDecoder<Chain<Cursor<Vec<u8>>, Hashing<R>>>),
}

impl<R: Read> Read for Source<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Plain(input) => input.read(buf),
            Self::Gzip(decoder) => decoder.read(buf),
        }
    }
}

fn read_error(file: &Path, line: u64, source: io::Error) -> DataError {
    DataError::Read {
        file: file.to_owned(),
        line,
        source,
    }
}

/// Maps a CSV reader error. With the `flexible` reader and byte records, only I/O errors
/// (including the decompressor's) are expected in practice.
fn csv_error(err: csv::Error, file: &Path, line: u64, gzip: bool) -> DataError {
    let reason = err.to_string();
    match err.into_kind() {
        csv::ErrorKind::Io(source) if gzip => DataError::CorruptGzip {
            file: file.to_owned(),
            line,
            source,
        },
        csv::ErrorKind::Io(source) => read_error(file, line, source),
        _ => DataError::Csv {
            file: file.to_owned(),
            line,
            reason,
        },
    }
}

/// What the loader does with each column of the file, worked out once from the header.
struct Plan {
    /// One slot per header cell, in file order.
    slots: Vec<Slot>,
    /// Header names, trimmed, in file order.
    columns: Vec<String>,
    /// Names of the features, in feature order.
    feature_names: Vec<String>,
}

#[derive(Clone, Copy)]
enum Slot {
    Label,
    Feature { at: usize, bounds: Bounds },
    Skip,
}

impl Plan {
    fn new(header: &ByteRecord, schema: &Schema, file: &Path) -> Result<Self, DataError> {
        // Names, trimmed, unique and non-empty.
        let mut columns = Vec::with_capacity(header.len());
        let mut positions = HashMap::with_capacity(header.len());
        for (i, cell) in header.iter().enumerate() {
            let bad_header = |reason| DataError::BadHeader {
                file: file.to_owned(),
                index: i + 1,
                reason,
            };
            let name = std::str::from_utf8(cell.trim_ascii())
                .map_err(|_| bad_header("column name is not valid utf-8"))?;
            if name.is_empty() {
                return Err(bad_header("empty column name"));
            }
            if let Some(first) = positions.insert(name.to_owned(), i) {
                return Err(DataError::DuplicateColumn {
                    file: file.to_owned(),
                    column: name.to_owned(),
                    first: first + 1,
                    second: i + 1,
                });
            }
            columns.push(name.to_owned());
        }
        let missing = |column: &str, role| DataError::MissingColumn {
            file: file.to_owned(),
            schema: schema.origin().to_owned(),
            column: column.to_owned(),
            role,
        };

        let mut slots = vec![Slot::Skip; columns.len()];
        let Some(&label) = positions.get(schema.label()) else {
            return Err(missing(schema.label(), ColumnRole::Label));
        };
        slots[label] = Slot::Label;

        let mut feature_names = Vec::new();
        match schema.features() {
            Features::Listed(listed) => {
                for (at, (name, bounds)) in listed.iter().enumerate() {
                    let Some(&i) = positions.get(name) else {
                        return Err(missing(name, ColumnRole::Feature));
                    };
                    slots[i] = Slot::Feature {
                        at,
                        bounds: *bounds,
                    };
                    feature_names.push(name.clone());
                }
                if schema.extra_columns() == ExtraColumns::Reject {
                    let extra = slots.iter().position(|slot| matches!(slot, Slot::Skip));
                    if let Some(i) = extra {
                        return Err(DataError::UnexpectedColumn {
                            file: file.to_owned(),
                            schema: schema.origin().to_owned(),
                            column: columns[i].clone(),
                            index: i + 1,
                        });
                    }
                }
            }
            Features::All { default, overrides } => {
                if let Some(name) = overrides.keys().find(|name| !positions.contains_key(*name)) {
                    return Err(missing(name, ColumnRole::Feature));
                }
                for (i, name) in columns.iter().enumerate().filter(|&(i, _)| i != label) {
                    let bounds = overrides.get(name).copied().unwrap_or(*default);
                    slots[i] = Slot::Feature {
                        at: feature_names.len(),
                        bounds,
                    };
                    feature_names.push(name.clone());
                }
            }
        }
        Ok(Self {
            slots,
            columns,
            feature_names,
        })
    }

    /// Parses one row, appending its scaled features and its label.
    fn parse_row(
        &self,
        record: &ByteRecord,
        classes: u32,
        file: &Path,
        features: &mut Vec<f32>,
        labels: &mut Vec<u32>,
    ) -> Result<(), DataError> {
        let line = record.position().map_or(0, csv::Position::line);
        if record.len() != self.slots.len() {
            return Err(DataError::RaggedRow {
                file: file.to_owned(),
                line,
                index: record.len().min(self.slots.len()) + 1,
                expected: self.slots.len(),
                got: record.len(),
            });
        }

        let start = features.len();
        features.resize(start + self.feature_names.len(), 0.0);
        let row = &mut features[start..];
        for (i, (cell, slot)) in record.iter().zip(&self.slots).enumerate() {
            let parsed = match *slot {
                Slot::Feature { at, bounds } => {
                    parse_feature(cell).map(|x| row[at] = bounds.scale(x))
                }
                Slot::Label => parse_label(cell, classes).map(|label| labels.push(label)),
                Slot::Skip => Ok(()),
            };
            if let Err(fault) = parsed {
                return Err(fault.locate(cell, file, line, &self.columns[i], i + 1, classes));
            }
        }
        Ok(())
    }
}

/// What is wrong with one cell, before the error is given its position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Empty,
    NotNumeric,
    NonFinite,
    LabelNotInteger,
    LabelOutOfRange,
}

impl Fault {
    #[cold]
    fn locate(
        self,
        cell: &[u8],
        file: &Path,
        line: u64,
        column: &str,
        index: usize,
        classes: u32,
    ) -> DataError {
        let file = file.to_owned();
        let column = column.to_owned();
        let text = CellText::new(cell.trim_ascii());
        match self {
            Self::Empty => DataError::EmptyCell {
                file,
                line,
                column,
                index,
            },
            Self::NotNumeric => DataError::NotNumeric {
                file,
                line,
                column,
                index,
                text,
            },
            Self::NonFinite => DataError::NonFinite {
                file,
                line,
                column,
                index,
                text,
            },
            Self::LabelNotInteger => DataError::LabelNotInteger {
                file,
                line,
                column,
                index,
                text,
            },
            Self::LabelOutOfRange => DataError::LabelOutOfRange {
                file,
                line,
                column,
                index,
                text,
                classes,
            },
        }
    }
}

/// Parses a feature cell as a finite number.
fn parse_feature(cell: &[u8]) -> Result<f64, Fault> {
    let cell = cell.trim_ascii();
    if cell.is_empty() {
        return Err(Fault::Empty);
    }

    // Fast path for short unsigned integers, the bulk of image data; nine digits cannot
    // overflow a u32, and every u32 is exact in f64.
    if cell.len() <= 9 && cell.iter().all(u8::is_ascii_digit) {
        let value = cell
            .iter()
            .fold(0u32, |acc, d| acc * 10 + u32::from(d - b'0'));
        return Ok(f64::from(value));
    }

    let text = std::str::from_utf8(cell).map_err(|_| Fault::NotNumeric)?;
    let value: f64 = text.parse().map_err(|_| Fault::NotNumeric)?;
    // `parse` accepts "nan", "inf" and "infinity", and turns overflowing literals into inf.
    if !value.is_finite() {
        return Err(Fault::NonFinite);
    }
    Ok(value)
}

/// Parses a label cell as an integer in `0..classes`.
fn parse_label(cell: &[u8], classes: u32) -> Result<u32, Fault> {
    let cell = cell.trim_ascii();
    if cell.is_empty() {
        return Err(Fault::Empty);
    }
    let text = std::str::from_utf8(cell).map_err(|_| Fault::LabelNotInteger)?;
    match text.parse::<i64>() {
        Ok(value) => u32::try_from(value)
            .ok()
            .filter(|&label| label < classes)
            .ok_or(Fault::LabelOutOfRange),
        Err(err) => match err.kind() {
            std::num::IntErrorKind::PosOverflow | std::num::IntErrorKind::NegOverflow => {
                Err(Fault::LabelOutOfRange)
            }
            _ => Err(Fault::LabelNotInteger),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_parse_integers_decimals_and_exponents() {
        assert_eq!(parse_feature(b"255"), Ok(255.0));
        assert_eq!(parse_feature(b" 0.5 "), Ok(0.5));
        assert_eq!(parse_feature(b"-1.5e2"), Ok(-150.0));
        assert_eq!(parse_feature(b"1234567890123"), Ok(1_234_567_890_123.0));
    }

    #[test]
    fn features_reject_empty_text_and_non_finite_cells() {
        assert_eq!(parse_feature(b"  "), Err(Fault::Empty));
        assert_eq!(parse_feature(b"12a"), Err(Fault::NotNumeric));
        assert_eq!(parse_feature(b"\xff"), Err(Fault::NotNumeric));
        for cell in [&b"NaN"[..], b"inf", b"-Infinity", b"1e999"] {
            assert_eq!(parse_feature(cell), Err(Fault::NonFinite));
        }
    }

    #[test]
    fn labels_accept_integers_below_classes_only() {
        assert_eq!(parse_label(b"0", 3), Ok(0));
        assert_eq!(parse_label(b" 2 ", 3), Ok(2));
        assert_eq!(parse_label(b"3", 3), Err(Fault::LabelOutOfRange));
        assert_eq!(parse_label(b"-1", 3), Err(Fault::LabelOutOfRange));
        assert_eq!(
            parse_label(b"99999999999999999999", 3),
            Err(Fault::LabelOutOfRange)
        );
        assert_eq!(parse_label(b"1.0", 3), Err(Fault::LabelNotInteger));
        assert_eq!(parse_label(b"one", 3), Err(Fault::LabelNotInteger));
    }
}
