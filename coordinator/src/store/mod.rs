//! The model store: every published model version, immutable, in one directory.
//!
//! # Layout
//!
//! ```text
//! DIR/
//!   versions/
//!     000000/                  the initial model: parent null, round 0
//!       weights.safetensors
//!       manifest.json
//!     000001/
//!       weights.safetensors
//!       optimizer.safetensors  the server optimizer's velocity after this version (FedAvgM)
//!       manifest.json
//!     .partial-000002/         a publish in progress, or one a crash interrupted
//!   paused                     present while the operator has rounds paused (see below)
//! ```
//!
//! The store itself never reads or writes `paused`: the coordinator keeps the operator's pause
//! there ([`crate::pause`]) so that it lives and moves with the store, and survives restarts.
//!
//! Version directories are named by their number, zero-padded to six digits so that `ls` lists
//! them in order (a seventh digit is used past 999 999). The manifest is described in
//! [`manifest`]; the weights are a safetensors file that numpy and PyTorch read directly
//! (`safetensors.numpy.load_file`, `safetensors.torch.load_file`).
//!
//! `optimizer.safetensors` is only there when the coordinator runs with server momentum: one
//! `F64` tensor `velocity` with a value per parameter, the FedAvgM velocity after the round
//! that produced the version, which a restarted coordinator resumes with
//! ([`ModelStore::optimizer_velocity`]). The manifest's `optimizer_sha256` is its hash. It is
//! not part of what the version serves, so damage to it is reported when it is read and costs
//! only the optimizer's memory; the version stays valid. Versions published before this file
//! existed have none (`optimizer_sha256` absent or null).
//!
//! # Invariants
//!
//! - Version numbers are dense: 0 is the first model published (by convention the seeded
//!   initial model, see [`ManifestDraft::initial`]) and each publish takes the next number.
//! - A version directory only ever appears under its final name complete. [`ModelStore::publish`]
//!   writes both files into `.partial-NNNNNN/`, flushes them and the directory to disk, renames
//!   the directory to `NNNNNN/` and flushes `versions/`. A crash at any moment leaves either no
//!   version or a whole one, plus possibly a `.partial-` directory, which
//!   [`ModelStore::open`] deletes (with a warning) and whose number the next publish reuses.
//!   [`ModelStore::open_read_only`] ignores such directories instead, since they may belong
//!   to a publish in progress in the process that owns the store.
//! - Nothing in a version directory is ever rewritten or deleted by the store.
//! - `weights_sha256` in the manifest is the SHA-256 of the whole weights file. A version whose
//!   manifest is missing or unreadable, whose weights do not match that hash or the model, or
//!   that is absent while later versions exist, is *damaged*: it is listed with its cause and
//!   never served.
//!
//! # Weights file
//!
//! One `F32` tensor per [`TensorView`] of the model, under its name (`w`, `b` or `w1`, `b1`,
//! `w2`, `b2`) and shape, in the order of the flat parameter vector, with the version and the
//! model in its metadata. [`athanor_core::export::safetensors_file`] builds it and documents
//! the layout; nodes that fetch a version build the same bytes with it, so the same
//! parameters and version always give the same file and hash wherever it is written.
//!
//! # Concurrency
//!
//! A [`ModelStore`] is `Send + Sync` and every method takes `&self`: wrap it in an `Arc` and call
//! it from `spawn_blocking`. Publishes are serialized by an internal mutex; readers only wait for
//! the in-memory listing, never for a publish's disk writes. The listing is cached, so
//! [`ModelStore::list`] and [`ModelStore::latest`] do no I/O. One process may write to a
//! directory at a time; this is not enforced. Tools that only read (the operator's CLI, tests)
//! open it with [`ModelStore::open_read_only`], which never deletes, creates or writes
//! anything, so it is safe next to a running coordinator.

pub mod manifest;

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::SystemTime;

use athanor_core::export;
use athanor_core::model::{ModelSpec, TensorView};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tracing::{debug, info, warn};

pub use self::manifest::{
    DatasetFingerprint, Epsilon, ExamplePrivacy, MANIFEST_FORMAT, Manifest, ManifestDraft,
    NodePrivacy,
};

/// Name of the weights file in a version directory.
pub const WEIGHTS_FILE: &str = "weights.safetensors";
/// Name of the manifest file in a version directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Name of the server optimizer's state file in a version directory, when it has one.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// Name of the velocity tensor in the optimizer's state file.
const VELOCITY_TENSOR: &str = "velocity";
/// Subdirectory of the store holding the versions.
const VERSIONS_DIR: &str = "versions";
/// Prefix of a version directory being written.
const PARTIAL_PREFIX: &str = ".partial-";

/// What can go wrong storing or reading model versions.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Reading or writing a file or directory failed.
    #[error("i/o error at {path}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A manifest is not valid JSON of the expected shape, has an unknown format, or records a
    /// version other than the directory it is in.
    #[error("manifest of version {version} is corrupt: {message}")]
    CorruptManifest {
        /// The version whose manifest it is.
        version: u64,
        /// What is wrong, from the JSON parser or the checks after it.
        message: String,
    },
    /// A weights file does not have the hash its manifest records.
    #[error("weights of version {version} have sha256 {got}, the manifest records {expected}")]
    HashMismatch {
        /// The version.
        version: u64,
        /// Hash recorded in the manifest.
        expected: String,
        /// Hash of the file as read.
        got: String,
    },
    /// A weights file matches its hash but not the model in its manifest (tensor names, types
    /// or shapes), or is not valid safetensors.
    #[error("weights of version {version} do not fit its model: {message}")]
    InvalidWeights {
        /// The version.
        version: u64,
        /// What does not fit.
        message: String,
    },
    /// A version's directory is absent although later versions exist.
    #[error("version {version} is missing ({path} does not exist) although later versions do")]
    MissingVersion {
        /// The missing version.
        version: u64,
        /// Where it should be.
        path: PathBuf,
    },
    /// A version was found damaged, now or earlier, and is not served.
    #[error("version {version} is damaged and is not served")]
    Damaged {
        /// The version.
        version: u64,
        /// What was found wrong with it.
        #[source]
        cause: Arc<StoreError>,
    },
    /// The directory for the version being published already exists; it was left untouched.
    #[error("version {version} already exists at {path}")]
    VersionExists {
        /// The version number.
        version: u64,
        /// Its directory.
        path: PathBuf,
    },
    /// The store was opened read-only, so nothing can be published to it.
    #[error("the model store at {path} was opened read-only")]
    ReadOnly {
        /// The store's directory.
        path: PathBuf,
    },
    /// The parameter vector does not have the model's length.
    #[error("the model has {expected} parameters, got {got}")]
    WrongLength {
        /// The model's parameter count.
        expected: usize,
        /// Length of the vector given.
        got: usize,
    },
    /// A parameter is NaN or infinite; such a model is never published.
    #[error("parameter {index} (in tensor {tensor}) is {value}")]
    NonFiniteParameter {
        /// Index in the flat parameter vector.
        index: usize,
        /// Name of the tensor it falls in.
        tensor: &'static str,
        /// The value.
        value: f32,
    },
    /// A manifest draft holds a value that cannot be stored (a non-finite metric, a delta of 1).
    #[error("manifest field {field} is invalid: {reason}")]
    InvalidDraft {
        /// Path of the field, e.g. `metrics.train_loss`.
        field: String,
        /// Why it is invalid.
        reason: String,
    },
    /// A draft names a parent version that has not been published.
    #[error("parent version {parent} does not exist; the next version is {next}")]
    UnknownParent {
        /// The parent named.
        parent: u64,
        /// The number the new version would have had.
        next: u64,
    },
    /// No version with this number has been published.
    #[error("version {version} does not exist")]
    NotFound {
        /// The version asked for.
        version: u64,
    },
    /// A version's optimizer state file does not match its manifest's hash or the model, or
    /// is not valid safetensors. The version itself stays valid: only the state is lost.
    #[error("the optimizer state of version {version} is unusable: {message}")]
    InvalidOptimizerState {
        /// The version.
        version: u64,
        /// What is wrong.
        message: String,
    },
}

/// One version number in the store's listing.
#[derive(Debug, Clone)]
pub struct VersionEntry {
    /// The version number.
    pub version: u64,
    /// Whether it can be served.
    pub status: VersionStatus,
}

/// Whether a version can be served.
#[derive(Debug, Clone)]
#[allow(
    clippy::large_enum_variant,
    reason = "nearly every entry is valid, so boxing the manifest would save no memory"
)]
pub enum VersionStatus {
    /// Complete and consistent with its manifest.
    Valid(Manifest),
    /// Found damaged, when the store was opened or when it was last read; never served.
    Damaged(Arc<StoreError>),
}

/// A directory of immutable model versions. See the [module documentation](self).
// TODO: nothing stops a second process from opening the same directory; both would assign the
// same next number, and the existence check before the rename narrows that race without closing
// it. Holding an advisory lock on a `DIR/lock` file while the store is open (`File::try_lock`,
// once the workspace's minimum Rust reaches 1.89) would make a second open fail instead.
#[derive(Debug)]
pub struct ModelStore {
    /// The store's directory.
    root: PathBuf,
    /// `root/versions`.
    versions_dir: PathBuf,
    /// Opened with [`ModelStore::open_read_only`]: publishing is refused.
    read_only: bool,
    /// Held for the whole of a publish, so numbers are assigned and written one at a time.
    publish_lock: Mutex<()>,
    /// Entry `i` is version `i`; the length is the next version number. Only ever grows by a
    /// complete entry or has one entry marked damaged, so it is consistent even after a panic
    /// while locked.
    entries: RwLock<Vec<VersionEntry>>,
}

impl ModelStore {
    /// Opens the store in `dir`, creating the directory if it is missing.
    ///
    /// Deletes the `.partial-` directories left by interrupted publishes, then reads and checks
    /// every version: manifest, weights hash and tensor shapes. Damaged versions are logged and
    /// listed but do not make opening fail. This reads every weights file once.
    ///
    /// # Errors
    /// [`StoreError::Io`] if the directory cannot be created or listed, or a leftover partial
    /// version cannot be deleted.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, StoreError> {
        let root = dir.as_ref().to_path_buf();
        let versions_dir = root.join(VERSIONS_DIR);
        if !versions_dir.is_dir() {
            fs::create_dir_all(&versions_dir).map_err(io_error(&versions_dir))?;
            // Make the new directories themselves durable, so a crash right after the first
            // publish cannot lose the whole store.
            sync_dir(&root)?;
            if let Some(parent) = root.parent().filter(|p| !p.as_os_str().is_empty()) {
                sync_dir(parent)?;
            }
        }
        Self::load_listing(root, versions_dir, false)
    }

    /// Opens an existing store for reading only: nothing is created, deleted or written, and
    /// `.partial-` directories are ignored (they may be a publish in progress in the process
    /// that owns the store). Every version is checked as in [`ModelStore::open`].
    ///
    /// # Errors
    /// [`StoreError::Io`] if `dir/versions` does not exist or cannot be listed.
    pub fn open_read_only(dir: impl AsRef<Path>) -> Result<Self, StoreError> {
        let root = dir.as_ref().to_path_buf();
        let versions_dir = root.join(VERSIONS_DIR);
        Self::load_listing(root, versions_dir, true)
    }

    /// Scans `versions_dir` and checks every version found.
    fn load_listing(
        root: PathBuf,
        versions_dir: PathBuf,
        read_only: bool,
    ) -> Result<Self, StoreError> {
        let numbers = scan_versions_dir(&versions_dir, read_only)?;

        // Versions are dense, so every number below the highest should be present.
        // TODO: every weights file is read and hashed here, which is fine for hundreds of
        // versions of small models but slow for thousands of large ones; checking the newest
        // few now and the rest on first access would keep start-up short.
        // TODO: a stray directory with a huge number (say `900000`) turns every number below
        // it into a listed missing version, one warning each; treating a number far past the
        // last contiguous one as foreign would avoid that.
        let count = numbers.last().map_or(0, |&highest| highest + 1);
        let entries: Vec<VersionEntry> = (0..count)
            .map(|version| {
                let dir = versions_dir.join(dir_name(version));
                let checked = if numbers.contains(&version) {
                    check_version(&dir, version)
                } else {
                    Err(StoreError::MissingVersion { version, path: dir })
                };
                let status = match checked {
                    Ok(manifest) => VersionStatus::Valid(manifest),
                    Err(error) => {
                        warn!(version, error = %error_chain(&error), "model version is damaged");
                        VersionStatus::Damaged(Arc::new(error))
                    }
                };
                VersionEntry { version, status }
            })
            .collect();

        let damaged = entries
            .iter()
            .filter(|entry| matches!(entry.status, VersionStatus::Damaged(_)))
            .count();
        debug!(dir = %root.display(), versions = count, damaged, read_only, "model store opened");

        Ok(ModelStore {
            root,
            versions_dir,
            read_only,
            publish_lock: Mutex::new(()),
            entries: RwLock::new(entries),
        })
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.root
    }

    /// The number the next published version will get: one more than the highest version on
    /// disk, damaged or not, or 0 for an empty store.
    pub fn next_version(&self) -> u64 {
        self.entries
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len() as u64
    }

    /// The manifest of the highest version that is not damaged, if any.
    pub fn latest(&self) -> Option<Manifest> {
        let entries = self.entries.read().unwrap_or_else(PoisonError::into_inner);
        entries.iter().rev().find_map(|entry| match &entry.status {
            VersionStatus::Valid(manifest) => Some(manifest.clone()),
            VersionStatus::Damaged(_) => None,
        })
    }

    /// Every version number from 0 to the highest, with its status.
    pub fn list(&self) -> Vec<VersionEntry> {
        self.entries
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The damaged versions, oldest first, with what was found wrong with each.
    pub fn damaged(&self) -> Vec<(u64, Arc<StoreError>)> {
        let entries = self.entries.read().unwrap_or_else(PoisonError::into_inner);
        entries
            .iter()
            .filter_map(|entry| match &entry.status {
                VersionStatus::Damaged(cause) => Some((entry.version, Arc::clone(cause))),
                VersionStatus::Valid(_) => None,
            })
            .collect()
    }

    /// The manifest of `version`.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] if it was never published, [`StoreError::Damaged`] if it is
    /// damaged.
    pub fn manifest(&self, version: u64) -> Result<Manifest, StoreError> {
        let entries = self.entries.read().unwrap_or_else(PoisonError::into_inner);
        let entry = usize::try_from(version)
            .ok()
            .and_then(|index| entries.get(index));
        match entry.map(|entry| &entry.status) {
            None => Err(StoreError::NotFound { version }),
            Some(VersionStatus::Valid(manifest)) => Ok(manifest.clone()),
            Some(VersionStatus::Damaged(cause)) => Err(StoreError::Damaged {
                version,
                cause: Arc::clone(cause),
            }),
        }
    }

    /// Reads `version`'s weights as a flat parameter vector in the layout of its
    /// [`ModelSpec`], after checking the file's hash and tensors.
    ///
    /// # Errors
    /// [`StoreError::NotFound`]; [`StoreError::Damaged`] if the version is damaged or is found
    /// damaged now (it is then marked so in the listing); [`StoreError::Io`] if reading fails
    /// for a reason other than a missing file.
    pub fn load(&self, version: u64) -> Result<(Manifest, Vec<f32>), StoreError> {
        let manifest = self.manifest(version)?;
        let path = self.versions_dir.join(dir_name(version)).join(WEIGHTS_FILE);
        let params = read_weights(&path, &manifest)
            .and_then(|bytes| decode_weights(version, &manifest.model, &bytes))
            .map_err(|error| self.found_damaged(version, error))?;
        Ok((manifest, params))
    }

    /// The raw bytes of `version`'s weights file, after checking its hash: what a client that
    /// fetches the model receives. The whole file is held in memory.
    ///
    /// # Errors
    /// As [`ModelStore::load`].
    pub fn weights_bytes(&self, version: u64) -> Result<Vec<u8>, StoreError> {
        let manifest = self.manifest(version)?;
        let path = self.versions_dir.join(dir_name(version)).join(WEIGHTS_FILE);
        // TODO: models here are at most a few megabytes; for larger ones, hash while streaming
        // chunks from the open file (and fail the stream on a mismatch) instead of buffering.
        read_weights(&path, &manifest).map_err(|error| self.found_damaged(version, error))
    }

    /// Publishes a new version with the next number, writing it atomically, and returns its
    /// manifest.
    ///
    /// Everything is checked before anything is written; on any error nothing is published and
    /// no partial directory is left behind (unless deleting it fails too, which is logged).
    ///
    /// # Errors
    /// [`StoreError::WrongLength`] if `params` does not have the model's length;
    /// [`StoreError::NonFiniteParameter`] if a parameter is NaN or infinite;
    /// [`StoreError::InvalidDraft`] and [`StoreError::UnknownParent`] for a bad draft;
    /// [`StoreError::VersionExists`] if another writer created the version's directory;
    /// [`StoreError::ReadOnly`] for a store opened read-only; [`StoreError::Io`] if writing
    /// fails.
    pub fn publish(&self, draft: ManifestDraft, params: &[f32]) -> Result<Manifest, StoreError> {
        self.publish_with_optimizer(draft, params, None)
    }

    /// [`ModelStore::publish`], storing with the version the server optimizer's velocity after
    /// it (FedAvgM), so that a restarted coordinator resumes with it: one `F64` value per
    /// parameter, in the file [`OPTIMIZER_FILE`], whose hash the manifest records as
    /// `optimizer_sha256`.
    ///
    /// # Errors
    /// As [`ModelStore::publish`]; [`StoreError::InvalidDraft`] (field `optimizer.velocity`)
    /// for a velocity of the wrong length or holding a NaN or infinite value.
    pub fn publish_with_optimizer(
        &self,
        draft: ManifestDraft,
        params: &[f32],
        velocity: Option<&[f64]>,
    ) -> Result<Manifest, StoreError> {
        if self.read_only {
            return Err(StoreError::ReadOnly {
                path: self.root.clone(),
            });
        }
        let _publishing = self
            .publish_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let version = self.next_version();

        // Check the inputs.
        if let Some(parent) = draft.parent
            && parent >= version
        {
            return Err(StoreError::UnknownParent {
                parent,
                next: version,
            });
        }
        draft.validate()?;
        check_params(&draft.model, params)?;
        if let Some(velocity) = velocity {
            check_velocity(&draft.model, velocity).map_err(|reason| StoreError::InvalidDraft {
                field: "optimizer.velocity".to_owned(),
                reason,
            })?;
        }

        // Build the files in memory.
        let weights = export::safetensors_file(version, &draft.model, params);
        let weights_sha256 = hex::encode(Sha256::digest(&weights));
        let optimizer = velocity.map(|velocity| optimizer_file(version, velocity));
        let optimizer_sha256 = optimizer
            .as_ref()
            .map(|bytes| hex::encode(Sha256::digest(bytes)));
        let created_at = manifest::rfc3339_utc(SystemTime::now());
        let manifest =
            Manifest::from_draft(draft, version, created_at, weights_sha256, optimizer_sha256);
        let mut manifest_json = serde_json::to_vec_pretty(&manifest)
            .expect("a manifest has only string map keys and finite floats, so it serializes");
        manifest_json.push(b'\n');

        // Write them and move the whole directory into place.
        let mut files = vec![(WEIGHTS_FILE, &weights[..])];
        if let Some(optimizer) = &optimizer {
            files.push((OPTIMIZER_FILE, &optimizer[..]));
        }
        // The manifest goes last: a reader never finds one whose other files are missing.
        files.push((MANIFEST_FILE, &manifest_json[..]));
        self.write_version(version, &files)?;

        let mut entries = self.entries.write().unwrap_or_else(PoisonError::into_inner);
        entries.push(VersionEntry {
            version,
            status: VersionStatus::Valid(manifest.clone()),
        });
        drop(entries);
        info!(
            version,
            parent = ?manifest.parent,
            round = manifest.round,
            contributors = manifest.contributors,
            "model version published"
        );
        Ok(manifest)
    }

    /// The server optimizer's velocity stored with `version`, checked against the manifest's
    /// hash and the model: `None` when the version has none (no momentum, the initial model, or
    /// a version published before velocities were stored). Damage found here does not mark the
    /// version damaged: its weights are still good, only the optimizer's memory is lost.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] and [`StoreError::Damaged`] as [`ModelStore::manifest`];
    /// [`StoreError::Io`] when the file cannot be read (a missing file included);
    /// [`StoreError::InvalidOptimizerState`] when it does not match its hash or the model.
    pub fn optimizer_velocity(&self, version: u64) -> Result<Option<Vec<f64>>, StoreError> {
        let manifest = self.manifest(version)?;
        let Some(expected) = &manifest.optimizer_sha256 else {
            return Ok(None);
        };
        let path = self
            .versions_dir
            .join(dir_name(version))
            .join(OPTIMIZER_FILE);
        let bytes = fs::read(&path).map_err(io_error(&path))?;
        let invalid = |message: String| StoreError::InvalidOptimizerState { version, message };

        let got = hex::encode(Sha256::digest(&bytes));
        if &got != expected {
            return Err(invalid(format!(
                "{OPTIMIZER_FILE} has sha256 {got}, the manifest records {expected}"
            )));
        }
        let velocity = decode_velocity(&bytes).map_err(invalid)?;
        check_velocity(&manifest.model, &velocity).map_err(invalid)?;
        Ok(Some(velocity))
    }

    /// Writes a version's files into its partial directory and renames it into place, deleting
    /// the partial directory if anything fails.
    fn write_version(&self, version: u64, files: &[(&str, &[u8])]) -> Result<(), StoreError> {
        let final_dir = self.versions_dir.join(dir_name(version));
        let partial = self
            .versions_dir
            .join(format!("{PARTIAL_PREFIX}{}", dir_name(version)));
        if final_dir.exists() {
            return Err(StoreError::VersionExists {
                version,
                path: final_dir,
            });
        }

        let written = write_partial(&partial, files).and_then(|()| {
            // `rename` would replace an empty directory of the same name: check again, as late
            // as possible. Only another process could have created it meanwhile.
            if final_dir.exists() {
                return Err(StoreError::VersionExists {
                    version,
                    path: final_dir.clone(),
                });
            }
            fs::rename(&partial, &final_dir).map_err(io_error(&final_dir))
        });
        if let Err(error) = written {
            if let Err(cleanup) = fs::remove_dir_all(&partial)
                && cleanup.kind() != io::ErrorKind::NotFound
            {
                warn!(path = %partial.display(), error = %cleanup, "cannot delete partial version");
            }
            return Err(error);
        }

        // Make the rename itself durable.
        sync_dir(&self.versions_dir)
    }

    /// Marks `version` damaged after reading it failed with `error`, unless the failure looks
    /// transient, and returns the error to report.
    fn found_damaged(&self, version: u64, error: StoreError) -> StoreError {
        if let StoreError::Io { source, .. } = &error
            && source.kind() != io::ErrorKind::NotFound
        {
            return error;
        }

        warn!(version, error = %error_chain(&error), "model version is damaged");
        let cause = Arc::new(error);
        let mut entries = self.entries.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = usize::try_from(version)
            .ok()
            .and_then(|index| entries.get_mut(index))
        {
            entry.status = VersionStatus::Damaged(Arc::clone(&cause));
        }
        StoreError::Damaged { version, cause }
    }
}

/// Lists `versions/`: deletes partial versions (skips them when `read_only`), warns about and
/// skips anything that is not a version directory name, and returns the version numbers found.
fn scan_versions_dir(versions_dir: &Path, read_only: bool) -> Result<BTreeSet<u64>, StoreError> {
    let mut numbers = BTreeSet::new();
    let mut deleted_partial = false;
    let listing = fs::read_dir(versions_dir).map_err(io_error(versions_dir))?;
    for item in listing {
        let item = item.map_err(io_error(versions_dir))?;
        let path = item.path();
        let Some(name) = item.file_name().to_str().map(str::to_owned) else {
            warn!(path = %path.display(), "ignoring a non-UTF-8 name in the model store");
            continue;
        };

        if name.starts_with(PARTIAL_PREFIX) && read_only {
            debug!(path = %path.display(), "ignoring a partial version");
            continue;
        }
        if name.starts_with(PARTIAL_PREFIX) {
            warn!(path = %path.display(), "deleting a version an interrupted publish left");
            let removed = if item.file_type().is_ok_and(|kind| kind.is_dir()) {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            removed.map_err(io_error(&path))?;
            deleted_partial = true;
            continue;
        }

        // Only the canonical spelling counts, so two names never claim one number.
        match name.parse::<u64>() {
            Ok(version) if name == dir_name(version) => {
                numbers.insert(version);
            }
            _ => warn!(path = %path.display(), "ignoring unexpected entry in the model store"),
        }
    }

    if deleted_partial {
        sync_dir(versions_dir)?;
    }
    Ok(numbers)
}

/// Reads and fully checks one version directory.
fn check_version(dir: &Path, version: u64) -> Result<Manifest, StoreError> {
    let manifest = read_manifest(&dir.join(MANIFEST_FILE), version)?;
    let bytes = read_weights(&dir.join(WEIGHTS_FILE), &manifest)?;
    decode_weights(version, &manifest.model, &bytes)?;
    Ok(manifest)
}

fn read_manifest(path: &Path, version: u64) -> Result<Manifest, StoreError> {
    let bytes = fs::read(path).map_err(io_error(path))?;
    let corrupt = |message: String| StoreError::CorruptManifest { version, message };

    // Look at the format first: a newer format may not parse as this one.
    let value: Value =
        serde_json::from_slice(&bytes).map_err(|error| corrupt(error.to_string()))?;
    let format = value.get("format").and_then(Value::as_u64);
    if format != Some(u64::from(MANIFEST_FORMAT)) {
        let found = value
            .get("format")
            .map_or("none".to_owned(), Value::to_string);
        return Err(corrupt(format!(
            "format is {found}, this build reads {MANIFEST_FORMAT}"
        )));
    }

    let manifest: Manifest =
        serde_json::from_value(value).map_err(|error| corrupt(error.to_string()))?;
    if manifest.version != version {
        return Err(corrupt(format!("it records version {}", manifest.version)));
    }
    Ok(manifest)
}

/// Reads a weights file and checks it against the manifest's hash.
fn read_weights(path: &Path, manifest: &Manifest) -> Result<Vec<u8>, StoreError> {
    let bytes = fs::read(path).map_err(io_error(path))?;
    check_hash(manifest, &bytes)?;
    Ok(bytes)
}

fn check_hash(manifest: &Manifest, weights: &[u8]) -> Result<(), StoreError> {
    let got = hex::encode(Sha256::digest(weights));
    if got != manifest.weights_sha256 {
        return Err(StoreError::HashMismatch {
            version: manifest.version,
            expected: manifest.weights_sha256.clone(),
            got,
        });
    }
    Ok(())
}

/// Decodes the bytes of a version's weights file (obtained from the store or from the admin
/// service) into the flat parameter vector of its model, after checking them against the
/// manifest's hash. The same checks [`ModelStore::load`] makes, for bytes that travelled.
///
/// # Errors
/// [`StoreError::HashMismatch`] or [`StoreError::InvalidWeights`].
pub fn params_from_weights(manifest: &Manifest, weights: &[u8]) -> Result<Vec<f32>, StoreError> {
    check_hash(manifest, weights)?;
    decode_weights(manifest.version, &manifest.model, weights)
}

/// Checks that a parameter vector fits the model and is finite.
fn check_params(model: &ModelSpec, params: &[f32]) -> Result<(), StoreError> {
    let expected = model.num_params();
    if params.len() != expected {
        return Err(StoreError::WrongLength {
            expected,
            got: params.len(),
        });
    }

    let Some(index) = params.iter().position(|value| !value.is_finite()) else {
        return Ok(());
    };
    let tensor = model
        .tensors()
        .into_iter()
        .find(|view| (view.offset..view.offset + view.len()).contains(&index))
        .map_or("?", |view| view.name);
    Err(StoreError::NonFiniteParameter {
        index,
        tensor,
        value: params[index],
    })
}

/// Parses a safetensors file into a flat parameter vector, checking that it holds exactly the
/// model's tensors, as finite `F32` values of the right shapes.
fn decode_weights(version: u64, model: &ModelSpec, bytes: &[u8]) -> Result<Vec<f32>, StoreError> {
    let invalid = |message: String| StoreError::InvalidWeights { version, message };
    // The manifest's model is not covered by the weights' hash: check it before it sizes any
    // allocation, so a damaged manifest marks its version damaged instead of aborting.
    model
        .validate()
        .map_err(|error| invalid(format!("the manifest's model is invalid: {error}")))?;
    let needed = model.num_params().checked_mul(4);
    if needed.is_none_or(|needed| needed > bytes.len()) {
        return Err(invalid(format!(
            "the manifest's model has {} parameters, more than the {} bytes of weights hold",
            model.num_params(),
            bytes.len()
        )));
    }
    let file = SafeTensors::deserialize(bytes).map_err(|error| invalid(error.to_string()))?;
    let views = model.tensors();
    if file.len() != views.len() {
        let (got, expected) = (file.len(), views.len());
        return Err(invalid(format!(
            "the file has {got} tensors, the model {expected}"
        )));
    }

    let mut params = vec![0.0; model.num_params()];
    for view in &views {
        let TensorView {
            name,
            shape,
            offset,
        } = view;
        let tensor = file
            .tensor(name)
            .map_err(|_| invalid(format!("no tensor {name}")))?;
        if tensor.dtype() != Dtype::F32 {
            return Err(invalid(format!(
                "tensor {name} is {}, not F32",
                tensor.dtype()
            )));
        }
        if tensor.shape() != shape.as_slice() {
            let got = tensor.shape();
            return Err(invalid(format!(
                "tensor {name} has shape {got:?}, not {shape:?}"
            )));
        }

        let target = &mut params[*offset..offset + view.len()];
        for (value, chunk) in target.iter_mut().zip(tensor.data().chunks_exact(4)) {
            // `chunks_exact(4)` only yields 4-byte slices.
            *value = f32::from_le_bytes(chunk.try_into().expect("chunk of 4 bytes"));
        }
        if target.iter().any(|value| !value.is_finite()) {
            return Err(invalid(format!("tensor {name} holds a non-finite value")));
        }
    }
    Ok(params)
}

/// Creates `partial` and writes `files` into it in order, each flushed to disk, then the
/// directory.
fn write_partial(partial: &Path, files: &[(&str, &[u8])]) -> Result<(), StoreError> {
    // A partial directory of this number can only be a leftover of a publish in this process
    // whose cleanup failed; nothing else writes there.
    if partial.exists() {
        fs::remove_dir_all(partial).map_err(io_error(partial))?;
    }
    fs::create_dir(partial).map_err(io_error(partial))?;

    for (name, contents) in files {
        let path = partial.join(name);
        let mut file = File::create_new(&path).map_err(io_error(&path))?;
        file.write_all(contents).map_err(io_error(&path))?;
        file.sync_all().map_err(io_error(&path))?;
    }
    sync_dir(partial)
}

/// The optimizer's state file of `version`: the velocity as one `F64` tensor.
fn optimizer_file(version: u64, velocity: &[f64]) -> Vec<u8> {
    let metadata = [
        ("athanor_format", export::WEIGHTS_FORMAT.to_owned()),
        ("version", version.to_string()),
    ];
    export::safetensors_f64(VELOCITY_TENSOR, &metadata, velocity)
}

/// Reads the velocity out of an optimizer state file.
fn decode_velocity(bytes: &[u8]) -> Result<Vec<f64>, String> {
    let file = SafeTensors::deserialize(bytes).map_err(|error| error.to_string())?;
    let tensor = file
        .tensor(VELOCITY_TENSOR)
        .map_err(|_| format!("no tensor {VELOCITY_TENSOR}"))?;
    if tensor.dtype() != Dtype::F64 || tensor.shape().len() != 1 {
        return Err(format!(
            "tensor {VELOCITY_TENSOR} is {} of shape {:?}, not a vector of F64",
            tensor.dtype(),
            tensor.shape()
        ));
    }
    Ok(tensor
        .data()
        .chunks_exact(8)
        // `chunks_exact(8)` only yields 8-byte slices.
        .map(|chunk| f64::from_le_bytes(chunk.try_into().expect("chunk of 8 bytes")))
        .collect())
}

/// Checks that a velocity has one finite value per parameter of the model; the error says
/// what is wrong.
fn check_velocity(model: &ModelSpec, velocity: &[f64]) -> Result<(), String> {
    if velocity.len() != model.num_params() {
        return Err(format!(
            "the velocity has {} values, the model {} parameters",
            velocity.len(),
            model.num_params()
        ));
    }
    if let Some(index) = velocity.iter().position(|value| !value.is_finite()) {
        return Err(format!("velocity value {index} is {}", velocity[index]));
    }
    Ok(())
}

/// Flushes a directory's entries to disk, so that files created or renamed in it survive a
/// crash.
#[cfg(unix)]
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|handle| handle.sync_all())
        .map_err(io_error(dir))
}

/// Directories cannot be opened as files on this platform; renames are then only as durable
/// as the file system makes them.
#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> Result<(), StoreError> {
    Ok(())
}

/// The directory name of a version.
fn dir_name(version: u64) -> String {
    format!("{version:06}")
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// An error with its causes on one line, for a log field or an operator's report.
pub fn error_chain(error: &StoreError) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
