//! The operator's pause, kept on disk so that it outlives the coordinator process.
//!
//! `rounds pause` creates the file `paused` in the store directory and `rounds resume` deletes
//! it; [`Coordinator::open`](crate::Coordinator::open) looks for it, so a coordinator restarted
//! while paused comes up paused and says so in its log. The file's presence is the whole flag:
//! its text (when the pause was recorded) is only for people looking at the directory, and a
//! file whose text is damaged still means paused. That errs on the side an operator chose
//! last: no round opens that the operator did not allow.
//!
//! Both changes reach the disk before the operator is told they happened: the file is written
//! to a temporary name, flushed, renamed into place and the directory flushed; a deletion is
//! followed by flushing the directory.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use athanor_core::export::{Overwrite, WriteError, write_atomically};

use crate::Error;

/// Name of the flag file in the store directory.
pub const PAUSE_FILE: &str = "paused";

/// The pause flag of one store directory.
#[derive(Debug, Clone)]
pub struct PauseFlag {
    /// `DIR/paused`.
    path: PathBuf,
}

impl PauseFlag {
    /// The flag of the store in `dir`.
    pub fn in_store(dir: &Path) -> Self {
        PauseFlag {
            path: dir.join(PAUSE_FILE),
        }
    }

    /// The flag file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether rounds are paused.
    ///
    /// # Errors
    /// [`Error::Io`] when the directory cannot be searched.
    pub fn is_set(&self) -> Result<bool, Error> {
        self.path.try_exists().map_err(|source| Error::Io {
            path: self.path.clone(),
            source,
        })
    }

    /// Records that rounds are paused, durably.
    ///
    /// # Errors
    /// [`Error::Io`] when the file or its directory cannot be written or flushed.
    pub fn set(&self) -> Result<(), Error> {
        let since = crate::store::manifest::rfc3339_utc(SystemTime::now());
        let text = format!(
            "rounds paused by the operator at {since}; `athanor-coordinator rounds resume` \
             deletes this file\n"
        );
        write_atomically(&self.path, text.as_bytes(), Overwrite::Allow).map_err(
            |error| match error {
                WriteError::Io { path, source } => Error::Io { path, source },
                other => Error::Io {
                    path: self.path.clone(),
                    source: io::Error::other(other.to_string()),
                },
            },
        )?;
        self.sync_dir()
    }

    /// Records that rounds run, durably. Clearing a flag that is not set does nothing.
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be deleted or the directory flushed.
    pub fn clear(&self) -> Result<(), Error> {
        match fs::remove_file(&self.path) {
            Ok(()) => self.sync_dir(),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(Error::Io {
                path: self.path.clone(),
                source,
            }),
        }
    }

    /// Flushes the directory's entries, so the file's creation or deletion survives a crash.
    fn sync_dir(&self) -> Result<(), Error> {
        let Some(dir) = self.path.parent() else {
            return Ok(());
        };
        if cfg!(unix) {
            File::open(dir)
                .and_then(|handle| handle.sync_all())
                .map_err(|source| Error::Io {
                    path: dir.to_path_buf(),
                    source,
                })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_is_set_and_cleared_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let flag = PauseFlag::in_store(dir.path());
        assert!(!flag.is_set().unwrap());

        flag.set().unwrap();
        flag.set().unwrap();
        assert!(PauseFlag::in_store(dir.path()).is_set().unwrap());
        let text = fs::read_to_string(dir.path().join(PAUSE_FILE)).unwrap();
        assert!(text.contains("rounds resume"), "{text}");

        flag.clear().unwrap();
        flag.clear().unwrap();
        assert!(!PauseFlag::in_store(dir.path()).is_set().unwrap());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_flag_file_with_damaged_text_still_means_paused() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(PAUSE_FILE), [0xff, 0x00]).unwrap();
        assert!(PauseFlag::in_store(dir.path()).is_set().unwrap());
    }
}
