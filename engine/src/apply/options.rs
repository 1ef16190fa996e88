//! How to apply, what a round of it did, and how it fails.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustix::io::Errno;
use serde::Serialize;

use crate::index::IndexError;
use crate::manifest::{EntryError, RecordFileError};
use crate::path::RelPath;
use crate::progress::Progress;

/// How to apply.
#[derive(Debug, Clone)]
pub struct ApplyOptions {
    /// Remove what the source deleted (only what ferry itself wrote).
    pub delete: bool,
    /// Keep numeric owners as they are instead of mapping them by name.
    pub numeric_ids: bool,
    /// Sync and rename after this many staged files...
    pub batch_files: usize,
    /// ...or this many staged bytes.
    pub batch_bytes: u64,
    /// Which entries ferry did not put in place it may replace.
    pub adopt: Adopt,
    /// Where the apply says how far it is: entries applied, bytes of files written.
    pub progress: Option<Arc<Progress>>,
    /// Where to list what the source removed and the target keeps (without `delete`), so that a later
    /// round with `delete` still knows them as ferry's (see [`crate::held_entries`]).
    pub kept: Option<PathBuf>,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        Self {
            delete: false,
            numeric_ids: false,
            batch_files: 8000,
            batch_bytes: 256 << 20,
            adopt: Adopt::Nothing,
            progress: None,
            kept: None,
        }
    }
}

/// What the target holds at a path that ferry did not put there (or that changed since it did) is
/// the administrator's: a round replaces it only when told to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Adopt {
    /// Replace only what ferry put in place, unchanged since (what its records say of the disk).
    #[default]
    Nothing,
    /// Replace whatever is at a path the source has: a target filled before ferry's first round
    /// (an earlier rsync, a shipped disk), or `--adopt all`.
    All,
    /// Replace what is at these paths or beneath them, besides what ferry put in place.
    Paths(Vec<RelPath>),
}

impl Adopt {
    /// Does this cover `path`?
    pub fn covers(&self, path: &RelPath) -> bool {
        match self {
            Adopt::Nothing => false,
            Adopt::All => true,
            Adopt::Paths(paths) => paths.iter().any(|p| p == path || p.is_ancestor_of(path)),
        }
    }
}

/// What an apply did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ApplyReport {
    /// Files written (new or changed content).
    pub files_written: u64,
    /// Bytes in those files.
    pub bytes_written: u64,
    /// Files whose metadata only changed, updated in place.
    pub metadata_updated: u64,
    /// Folders created.
    pub dirs_created: u64,
    /// Symlinks created or replaced.
    pub symlinks: u64,
    /// Hard links created.
    pub hard_links: u64,
    /// Paths removed because the source removed them (`delete`) or a kind change needed it.
    pub deleted: u64,
    /// Paths the source removed that were kept.
    pub kept: u64,
    /// Chunks copied from data already in the target.
    pub chunks_local: u64,
    /// Bytes of those.
    pub bytes_local: u64,
    /// Chunks that came from the chunk source.
    pub chunks_fetched: u64,
    /// Bytes of those.
    pub bytes_fetched: u64,
    /// Entries that could not be applied, with why (the first 100).
    pub failures: Vec<String>,
    /// How many entries failed.
    pub failure_count: u64,
    /// Wall time.
    #[serde(serialize_with = "crate::timing::serialize_millis")]
    pub duration: Duration,
    /// Of `duration`, the time spent waiting for the disk: the syncs of the target's filesystem,
    /// of large files and of the chunk index.
    #[serde(serialize_with = "crate::timing::serialize_millis")]
    pub sync_wait: Duration,
    /// Of `duration`, the time spent waiting for the thread that makes small files to finish a
    /// batch's, before the batch syncs.
    #[serde(serialize_with = "crate::timing::serialize_millis")]
    pub make_wait: Duration,
    /// Of `duration`, the time spent waiting for a synced batch to be named into place, its folders'
    /// metadata set and its chunks recorded in the index (on another thread, after its sync).
    #[serde(serialize_with = "crate::timing::serialize_millis")]
    pub place_wait: Duration,
}

/// An apply that had to stop: the target keeps every file either old or new, never torn.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A write, sync or rename failed: nothing after it is trusted.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// To what.
        path: String,
        /// The cause.
        source: io::Error,
    },
    /// The chunk index failed.
    #[error(transparent)]
    Index(#[from] IndexError),
    /// Reading a manifest or writing the new one failed.
    #[error(transparent)]
    Manifest(#[from] RecordFileError),
    /// The new manifest breaks the rules (sorted, consistent sizes, ...): refused as a whole.
    #[error("refusing a bad manifest: {0}")]
    BadEntry(#[from] EntryError),
}

pub(super) fn io_err(op: &'static str, path: impl std::fmt::Display) -> impl FnOnce(Errno) -> ApplyError {
    move |e| ApplyError::Io { op, path: path.to_string(), source: e.into() }
}
