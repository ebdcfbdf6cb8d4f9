//! The privacy ledger: every spending of this node's privacy budget, on disk.
//!
//! The ledger is a JSON Lines file, one [`Entry`] per line, each the DP-SGD steps one round
//! took on this node's data: sampling rate, noise multiplier, clipping norm and number of
//! steps, with the round, the federation, the coordinator's address and the time.
//!
//! ```text
//! {"round":3,"federation":"adult","coordinator":"https://coordinator.example:50051","time":"2026-12-01T10:04:31Z","rows":24130,"q":0.005304599,"sigma":1.1,"clip_norm":1.0,"steps":189}
//! ```
//!
//! It records mechanisms, not epsilons: [`crate::budget`] recomputes what has been spent by
//! composing every entry with the accountant and delta the configuration names, so changing
//! either later re-reads the same history rather than mixing numbers computed two ways. An
//! entry with `"sigma": null` and `"clip_norm": null` is a round trained without DP.
//!
//! # Durability
//!
//! [`Ledger::append`] writes an entry as one line with a single write to a file opened for
//! appending, then `fsync`s the file before it returns; creating the file also `fsync`s the
//! directory holding it (and any directory created for it), so the file's name survives a
//! crash too. It returns a [`Receipt`], and an update for the coordinator cannot be built
//! without one ([`crate::client::Update`]): what a round spent is on disk before its update
//! leaves the node. A crash can therefore lose at most the line being written, whose update
//! was never sent. A failed write or sync leaves the file in an unknown state, so the ledger
//! refuses any further append until the node restarts and reads it again.
//!
//! # Damage
//!
//! A last line without its newline is what a crash in the middle of an append leaves. If it
//! still parses as a whole entry it is kept (counting it can only overstate what was spent)
//! and its newline is added; otherwise it is dropped, and [`Ledger::tail`] says so for the
//! node to report. Anything else — a line that is not an entry, a value out of range, a blank
//! line — is [`LedgerError::Corrupt`] naming the file and the line, and the node does not start:
//! a ledger is never reset or skipped silently. An operator restores it from a backup.
//!
//! # One writer
//!
//! One running node owns a ledger. Before each append the ledger checks that the file still
//! has the length it left it with, so a second process writing to it (two nodes configured
//! with the same ledger) is an error rather than a lost entry.
//!
//! TODO: the length check can miss a second writer that appends between the check and this
//! node's write. `File::try_lock` would exclude it outright; it needs Rust 1.89, one past the
//! workspace's minimum version.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use athanor_core::accountant::Step;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// One round's spending, as written on one line of the ledger.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// The coordinator's round number.
    pub round: u64,
    /// The federation's name, as the coordinator announced it.
    pub federation: String,
    /// The coordinator's address as configured.
    pub coordinator: String,
    /// When the entry was written, RFC 3339 in UTC.
    pub time: String,
    /// Training rows at the time, which the sampling rate was computed from.
    pub rows: u64,
    /// Poisson sampling rate of every step, in `(0, 1]`.
    pub q: f64,
    /// Noise multiplier charged to the accountant: the plan's, reduced for the noise grid's
    /// rounding (see `athanor_core::noise::accounted_noise_multiplier`); `None` for a round
    /// trained without DP.
    pub sigma: Option<f64>,
    /// Per-example clipping norm; `None` exactly when `sigma` is.
    pub clip_norm: Option<f64>,
    /// Number of DP-SGD steps, at least 1.
    pub steps: u64,
}

/// Proof that an entry is on disk: returned by [`Ledger::append`] only after the file was
/// synced, and required to build the update the entry paid for.
#[derive(Debug)]
#[must_use = "the receipt is what allows the update it paid for to be sent"]
pub struct Receipt {
    round: u64,
    line: usize,
}

/// What the end of the ledger file looked like when it was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tail {
    /// Every line ends with a newline.
    Clean,
    /// The last line had no newline but is a whole entry: it counts.
    Unterminated {
        /// Its line number, from 1.
        line: usize,
    },
    /// The last line had no newline and is not a whole entry: an interrupted append, whose
    /// update was never sent. It does not count.
    Torn {
        /// Its line number, from 1.
        line: usize,
        /// How many bytes it held.
        bytes: usize,
    },
}

/// A ledger read without being opened for writing, for reporting.
#[derive(Debug, Clone)]
pub struct Contents {
    /// The file.
    pub path: PathBuf,
    /// Whether the file exists; a node creates it when it starts.
    pub exists: bool,
    /// The entries that count.
    pub entries: Vec<Entry>,
    /// The state of the last line.
    pub tail: Tail,
}

/// The ledger of a running node, open for appending.
#[derive(Debug)]
pub struct Ledger {
    path: PathBuf,
    file: File,
    entries: Vec<Entry>,
    /// Length of the file as this ledger last left it.
    len: u64,
    tail: Tail,
    /// Set while an append is in flight and left set if it fails.
    poisoned: bool,
}

/// A ledger that cannot be read or written.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum LedgerError {
    /// The file or its directory could not be opened, read, written or synced.
    #[error("privacy ledger {}: cannot {action}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What was attempted.
        action: &'static str,
        /// The cause.
        source: io::Error,
    },
    /// A line that is not a valid entry, anywhere but an interrupted last line.
    #[error(
        "privacy ledger {}, line {line}: {reason}; the node does not train on a damaged ledger \
         and never resets one (restore the file from a backup)",
        path.display()
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Line number, from 1.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// The file's length changed behind this node's back.
    #[error(
        "privacy ledger {} changed outside this node (expected {expected} bytes, found \
         {found}); only one running node may use a ledger",
        path.display()
    )]
    ChangedOutside {
        /// The file.
        path: PathBuf,
        /// Length this ledger left it with.
        expected: u64,
        /// Length found.
        found: u64,
    },
    /// An earlier append failed, so the end of the file is unknown.
    #[error(
        "privacy ledger {}: an earlier write failed, so nothing more is written; restart the \
         node to read the ledger again",
        path.display()
    )]
    Poisoned {
        /// The file.
        path: PathBuf,
    },
    /// An entry that would not read back as valid.
    #[error("privacy ledger {}: refusing to write an invalid entry: {reason}", path.display())]
    InvalidEntry {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

impl Entry {
    /// The DP-SGD steps this entry stands for; `None` for a round without DP.
    pub fn step(&self) -> Option<Step> {
        self.sigma.map(|sigma| Step {
            q: self.q,
            sigma,
            count: self.steps,
        })
    }

    /// Checks every value, as [`Ledger::open`] does for each line.
    ///
    /// # Errors
    /// A description of the first value out of range.
    pub fn check(&self) -> Result<(), String> {
        if !(self.q > 0.0 && self.q <= 1.0) {
            return Err(format!("sampling rate q must be in (0, 1], got {}", self.q));
        }
        if self.steps == 0 {
            return Err("steps must be at least 1".into());
        }
        match (self.sigma, self.clip_norm) {
            (None, None) => Ok(()),
            (Some(sigma), Some(clip)) => {
                if !(sigma.is_finite() && sigma > 0.0) {
                    return Err(format!("sigma must be positive and finite, got {sigma}"));
                }
                if !(clip.is_finite() && clip > 0.0) {
                    return Err(format!("clip_norm must be positive and finite, got {clip}"));
                }
                Ok(())
            }
            _ => Err("sigma and clip_norm must both be numbers (DP) or both null (no DP)".into()),
        }
    }
}

impl Receipt {
    /// The round the recorded entry belongs to.
    pub fn round(&self) -> u64 {
        self.round
    }

    /// The entry's line in the ledger, from 1.
    pub fn line(&self) -> usize {
        self.line
    }
}

impl Ledger {
    /// Opens the ledger at `path` for appending, creating it (and its directory) if missing,
    /// and reads every entry. An interrupted last line is repaired as the module explains and
    /// reported by [`Ledger::tail`].
    ///
    /// # Errors
    /// [`LedgerError::Corrupt`] naming the line of the first damaged entry;
    /// [`LedgerError::Io`] when the file or its directory cannot be created, read or synced.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, LedgerError> {
        let path = path.into();
        let dir = parent_dir(&path);
        create_dirs(dir).map_err(io_error(&path, "create its directory"))?;

        // A new file is synced with its directory entry, so that a crash cannot lose the file
        // after entries were written to it.
        let (mut file, created) = match open_file(&path, true) {
            Ok(file) => (file, true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => (
                open_file(&path, false).map_err(io_error(&path, "open it"))?,
                false,
            ),
            Err(e) => return Err(io_error(&path, "create it")(e)),
        };
        if created {
            file.sync_all().map_err(io_error(&path, "sync it"))?;
            sync_dir(dir).map_err(io_error(&path, "sync its directory"))?;
        }

        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(io_error(&path, "read it"))?;
        let (entries, tail, clean_len) = parse(&path, &bytes)?;

        // Leave the file ending in a newline so the next append starts a line of its own.
        match tail {
            Tail::Clean => {}
            Tail::Unterminated { .. } => file
                .write_all(b"\n")
                .and_then(|()| file.sync_all())
                .map_err(io_error(&path, "end its last line"))?,
            Tail::Torn { .. } => file
                .set_len(clean_len)
                .and_then(|()| file.sync_all())
                .map_err(io_error(&path, "drop its interrupted last line"))?,
        }
        let len = file
            .metadata()
            .map_err(io_error(&path, "read its length"))?
            .len();

        Ok(Ledger {
            path,
            file,
            entries,
            len,
            tail,
            poisoned: false,
        })
    }

    /// Reads the ledger at `path` without creating or repairing it: a missing file has no
    /// entries, and an interrupted last line is reported but left in place.
    ///
    /// # Errors
    /// [`LedgerError::Corrupt`] for a damaged entry; [`LedgerError::Io`] when the file
    /// exists but cannot be read.
    pub fn read(path: impl Into<PathBuf>) -> Result<Contents, LedgerError> {
        let path = path.into();
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok(Contents {
                    path,
                    exists: false,
                    entries: Vec::new(),
                    tail: Tail::Clean,
                });
            }
            Err(e) => return Err(io_error(&path, "read it")(e)),
        };
        let (entries, tail, _) = parse(&path, &bytes)?;
        Ok(Contents {
            path,
            exists: true,
            entries,
            tail,
        })
    }

    /// Appends `entry` and syncs it to disk; the [`Receipt`] proves it is there.
    ///
    /// The entry kept in memory is the line read back, so it is exactly what a restart would
    /// read.
    ///
    /// # Errors
    /// [`LedgerError::InvalidEntry`] for an entry [`Entry::check`] refuses;
    /// [`LedgerError::ChangedOutside`] if another process wrote to the file;
    /// [`LedgerError::Io`] if the write or the sync fails, after which every append is
    /// [`LedgerError::Poisoned`].
    pub fn append(&mut self, entry: Entry) -> Result<Receipt, LedgerError> {
        if self.poisoned {
            return Err(LedgerError::Poisoned {
                path: self.path.clone(),
            });
        }
        entry.check().map_err(|reason| self.invalid(reason))?;
        let mut line = serde_json::to_vec(&entry).map_err(|e| self.invalid(e.to_string()))?;
        let stored: Entry =
            serde_json::from_slice(&line).map_err(|e| self.invalid(e.to_string()))?;
        line.push(b'\n');

        let found = self
            .file
            .metadata()
            .map_err(io_error(&self.path, "read its length"))?
            .len();
        if found != self.len {
            self.poisoned = true;
            return Err(LedgerError::ChangedOutside {
                path: self.path.clone(),
                expected: self.len,
                found,
            });
        }

        // Poisoned until both the write and the sync have succeeded.
        self.poisoned = true;
        self.file
            .write_all(&line)
            .map_err(io_error(&self.path, "append an entry"))?;
        self.file
            .sync_all()
            .map_err(io_error(&self.path, "sync an entry"))?;
        self.poisoned = false;

        self.len += line.len() as u64;
        let round = stored.round;
        self.entries.push(stored);
        Ok(Receipt {
            round,
            line: self.entries.len(),
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every entry that counts, oldest first.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// What the last line looked like when the ledger was opened (and has since been
    /// repaired).
    pub fn tail(&self) -> Tail {
        self.tail
    }

    fn invalid(&self, reason: String) -> LedgerError {
        LedgerError::InvalidEntry {
            path: self.path.clone(),
            reason,
        }
    }
}

/// The entries of a ledger file's bytes, the state of its last line, and the length of the
/// file without a torn last line.
fn parse(path: &Path, bytes: &[u8]) -> Result<(Vec<Entry>, Tail, u64), LedgerError> {
    let corrupt = |line: usize, reason: String| LedgerError::Corrupt {
        path: path.to_path_buf(),
        line,
        reason,
    };

    let complete_len = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let (complete, last) = bytes.split_at(complete_len);
    let mut entries = Vec::new();
    if let Some((_, lines)) = complete.split_last() {
        for (index, line) in lines.split(|&b| b == b'\n').enumerate() {
            entries.push(parse_line(line).map_err(|reason| corrupt(index + 1, reason))?);
        }
    }

    let number = entries.len() + 1;
    let tail = if last.is_empty() {
        Tail::Clean
    } else if let Ok(entry) = parse_line(last) {
        entries.push(entry);
        Tail::Unterminated { line: number }
    } else {
        Tail::Torn {
            line: number,
            bytes: last.len(),
        }
    };
    Ok((entries, tail, complete_len as u64))
}

/// One line, without its newline, as a checked entry.
fn parse_line(line: &[u8]) -> Result<Entry, String> {
    if line.iter().all(u8::is_ascii_whitespace) {
        return Err("blank line".into());
    }
    let entry: Entry = serde_json::from_slice(line).map_err(|e| {
        // The parser numbers lines within this one line; only its column is informative.
        let text = e.to_string();
        let position = format!(" at line {} column {}", e.line(), e.column());
        let message = text.strip_suffix(&position).unwrap_or(&text);
        format!("{message} (column {})", e.column())
    })?;
    entry.check()?;
    Ok(entry)
}

/// Opens the ledger file for reading and appending; `create` asks for a new file only.
fn open_file(path: &Path, create: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .append(true)
        .create_new(create)
        .open(path)
}

/// The directory holding `path` (`.` for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// Creates `dir` and its missing ancestors, syncing the parent of each one created so that
/// the new directories survive a crash.
fn create_dirs(dir: &Path) -> io::Result<()> {
    let missing: Vec<&Path> = dir.ancestors().take_while(|d| !d.exists()).collect();
    if missing.is_empty() {
        return Ok(());
    }
    fs::create_dir_all(dir)?;
    for created in missing.iter().rev() {
        sync_dir(parent_dir(created))?;
    }
    Ok(())
}

/// Makes a directory's entries durable (on Unix, `fsync` on the directory).
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn io_error<'a>(
    path: &'a Path,
    action: &'static str,
) -> impl FnOnce(io::Error) -> LedgerError + 'a {
    move |source| LedgerError::Io {
        path: path.to_path_buf(),
        action,
        source,
    }
}

/// The current time as RFC 3339 in UTC, to the second (the epoch if the clock is before it).
pub(crate) fn now_utc() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    rfc3339(secs)
}

/// `secs` after the Unix epoch as `YYYY-MM-DDTHH:MM:SSZ`.
fn rfc3339(secs: u64) -> String {
    let leap = |y: u64| (y.is_multiple_of(4) && !y.is_multiple_of(100)) || y.is_multiple_of(400);
    let (mut days, time) = (secs / 86_400, secs % 86_400);

    let mut year = 1970;
    while days >= if leap(year) { 366 } else { 365 } {
        days -= if leap(year) { 366 } else { 365 };
        year += 1;
    }
    let february = if leap(year) { 29 } else { 28 };
    let mut month = 1;
    for length in [31, february, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31] {
        if days < length {
            break;
        }
        days -= length;
        month += 1;
    }

    format!(
        "{year:04}-{month:02}-{:02}T{:02}:{:02}:{:02}Z",
        days + 1,
        time / 3600,
        time / 60 % 60,
        time % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_dates_across_leap_years_and_month_ends() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_709_251_199), "2024-02-29T23:59:59Z");
        assert_eq!(rfc3339(1_735_689_599), "2024-12-31T23:59:59Z");
        assert_eq!(rfc3339(4_107_542_400), "2100-03-01T00:00:00Z");
    }
}
