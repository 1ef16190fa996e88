//! What a scan is asked to do, what it reports, how it fails, and the cache records it keeps.

use std::io;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::times::{stat_ctime_ns, to_ns};
use crate::chunker::ChunkerConfig;
use crate::hash::RootHash;
use crate::manifest::{Entry, Keyed, RecordFileError};
use crate::path::RelPath;
use crate::progress::Progress;

/// What the last scan knew about a path: its entry, plus what tells whether the file changed since.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CacheRecord {
    /// The entry as it went into the manifest.
    pub entry: Entry,
    /// Inode number.
    pub ino: u64,
    /// Status-change time in nanoseconds.
    pub ctime_ns: i64,
    /// False when the record must not be trusted (changed too close to the scan to be sure).
    pub trusted: bool,
}

impl Keyed for CacheRecord {
    fn key(&self) -> &RelPath {
        &self.entry.path
    }
}

/// Called after a file's bytes were read and before it is checked for changes. Tests use it to change a
/// file at exactly that moment.
pub type AfterReadHook = Arc<dyn Fn(&RelPath) + Send + Sync>;

/// How to scan.
#[derive(Clone)]
pub struct ScanOptions {
    /// Chunk sizes.
    pub chunker: ChunkerConfig,
    /// How many entries are stat'ed and hashed in parallel at a time.
    pub batch: usize,
    /// See [`AfterReadHook`].
    pub after_read: Option<AfterReadHook>,
    /// Where the scan says how far it is: entries scanned, bytes read.
    pub progress: Option<Arc<Progress>>,
    /// Where the manifest goes as it is written (see [`Teed`]): a round sends its changes while
    /// the scan goes on. The scan waits while this is full; once its receiver is gone, it stops
    /// sending and scans on.
    pub tee: Option<std::sync::mpsc::SyncSender<Teed>>,
    /// When the scan began, if the caller took it (see [`SettledBefore`]); otherwise now.
    pub started: Option<std::time::SystemTime>,
    /// Set, the scan stops after the batch it is writing ([`ScanError::Cancelled`]).
    pub cancel: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// With a [`Self::tee`]: a file of at least this many bytes that must be read is read in
    /// manifest order, by the stage that writes the manifest, and its chunks are teed as they are
    /// cut ([`Teed::Prefix`], about every [`PREFIX_EVERY`] bytes), before its entry: a round asks
    /// for them while they are still in memory, however large the file.
    pub stream_from: Option<u64>,
}

/// About how many bytes of a file read in manifest order ([`ScanOptions::stream_from`]) each
/// [`Teed::Prefix`] carries.
pub const PREFIX_EVERY: u64 = 2 << 20;

/// The first chunks of a file whose entry is not yet in the manifest, as its scan cut them: the
/// next `chunks`, from `offset` on, of the file that will be the manifest's entry at `place`. A
/// file that changes while it is read never gets its entry; a file that does begins with these.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FilePrefix {
    /// The file's place in the manifest being written (its first entry is 0).
    pub place: u64,
    /// The file's path.
    pub path: RelPath,
    /// Where `chunks` begin in it: the bytes of the chunks teed before for the same file.
    pub offset: u64,
    /// The chunks that follow, in order.
    pub chunks: Vec<crate::manifest::ChunkRef>,
    /// The file's size when the scan began to read it: what it will take at the destination,
    /// unless it changes.
    pub size: u64,
}

/// What a scan with a [`ScanOptions::tee`] says as it writes its manifest.
#[derive(Debug)]
pub enum Teed {
    /// First: the manifest file being written, open for reading. Whatever entries were teed are in
    /// it (and it becomes the manifest at its final path once the scan ends).
    Manifest(std::fs::File, std::path::PathBuf),
    /// Then: the next entries of the manifest, in order, each as it is stored.
    Entries(Vec<crate::manifest::RawEntry>),
    /// Among them, for a file read in manifest order ([`ScanOptions::stream_from`]): its next
    /// chunks, cut before its entry is written.
    Prefix(FilePrefix),
}

impl Default for ScanOptions {
    fn default() -> Self {
        Self {
            chunker: ChunkerConfig::DEFAULT,
            batch: 512,
            after_read: None,
            progress: None,
            tee: None,
            started: None,
            cancel: None,
            stream_from: None,
        }
    }
}

impl std::fmt::Debug for ScanOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScanOptions").field("chunker", &self.chunker).field("batch", &self.batch).finish()
    }
}

/// What a scan found and did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ScanReport {
    /// The new manifest's root hash.
    pub root_hash: Option<RootHash>,
    /// Entries in the manifest.
    pub entries: u64,
    /// Regular files among them.
    pub files: u64,
    /// Bytes in those files.
    pub file_bytes: u64,
    /// Files whose content was read (the others were unchanged since the last scan).
    pub files_read: u64,
    /// Bytes read from file contents.
    pub bytes_read: u64,
    /// Paths that changed while being read, left for the next round (the first 100).
    pub changed_while_read: Vec<String>,
    /// How many changed while being read.
    pub changed_while_read_count: u64,
    /// Paths that could not be read or are of a kind ferry does not copy, with why (the first 100).
    pub skipped: Vec<String>,
    /// How many were skipped.
    pub skipped_count: u64,
    /// Of those, devices, FIFOs and sockets (which an operator may choose to leave behind).
    pub skipped_special: u64,
    /// Wall time.
    #[serde(serialize_with = "crate::timing::serialize_millis")]
    pub duration: Duration,
    /// What the scan's trust in unchanged files rests on.
    #[serde(skip)]
    pub settled_before: SettledBefore,
}

/// A second before a scan began. A file whose inode last changed (its ctime) before then was settled
/// when the scan read it: a record of it is trusted next time, and while its ctime stays before
/// then it holds what the scan read (any write, truncation, rename or link moves the ctime to the
/// present). The second is the filesystem's timestamp granularity: a file changed in the same tick
/// as the scan began could change again without its timestamps moving (git's "racy" problem). The
/// default is the epoch: nothing is settled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SettledBefore(pub(super) i64);

impl SettledBefore {
    /// For a scan beginning at `start`.
    pub fn scan_at(start: SystemTime) -> Self {
        Self(to_ns(start) - 1_000_000_000)
    }

    /// True when `file`'s inode shows no change since: it holds what the scan read.
    pub fn holds(self, file: impl AsFd) -> bool {
        rustix::fs::fstat(file).is_ok_and(|stat| stat_ctime_ns(&stat) < self.0)
    }
}

impl ScanReport {
    pub(super) fn changed(&mut self, path: &RelPath) {
        self.changed_while_read_count += 1;
        if self.changed_while_read.len() < 100 {
            self.changed_while_read.push(path.to_string());
        }
    }

    /// Entries of the tree the round does not carry: every one skipped, but for devices, FIFOs and
    /// sockets when `skip_special` (the operator said to leave them behind). A target cannot match a
    /// tree while this is not zero.
    pub fn not_carried(&self, skip_special: bool) -> u64 {
        self.skipped_count - if skip_special { self.skipped_special } else { 0 }
    }

    /// Whether the scan caught the whole tree as it is: nothing left out (see [`Self::not_carried`])
    /// and no file changed while it was read (its last version, or nothing, stays in the manifest).
    /// A target cannot be said to match the source otherwise.
    pub fn whole(&self, skip_special: bool) -> bool {
        self.not_carried(skip_special) == 0 && self.changed_while_read_count == 0
    }

    /// Adds the paths `other` skipped to this report's.
    pub(super) fn absorb_skips(&mut self, other: ScanReport) {
        self.skipped_count += other.skipped_count;
        self.skipped_special += other.skipped_special;
        let room = 100usize.saturating_sub(self.skipped.len());
        self.skipped.extend(other.skipped.into_iter().take(room));
    }

    pub(super) fn skip(&mut self, path: &RelPath, why: impl std::fmt::Display) {
        tracing::warn!("skipped {path}: {why}");
        self.skipped_count += 1;
        if self.skipped.len() < 100 {
            self.skipped.push(format!("{path}: {why}"));
        }
    }
}

/// A scan that could not complete.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    /// The tree's top folder could not be opened.
    #[error("cannot open source folder {path}: {source}")]
    OpenRoot {
        /// The folder.
        path: String,
        /// The cause.
        source: io::Error,
    },
    /// Writing the new manifest or cache failed (the job's state folder's disk full, say).
    #[error("cannot keep the scan's records in the job's state folder: {0}")]
    Output(#[from] RecordFileError),
    /// The scan's threads could not be started.
    #[error("cannot start the scan's threads: {0}")]
    Threads(io::Error),
    /// [`ScanOptions::cancel`] was set: the scan stopped, and wrote no manifest.
    #[error("the scan was stopped")]
    Cancelled,
}
