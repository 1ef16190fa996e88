//! What a large file's building keeps between the chunks it writes and between the steps that
//! write them (see `partial.rs`), and what planning its first chunks remembers.

use std::fs::File;
use std::sync::Arc;
use std::time::Instant;

use super::sys::BackgroundSync;
use crate::hash::ChunkHash;
use crate::held::ChunkList;
use crate::index::PartialSeal;
use crate::manifest::Entry;
use crate::path::RelPath;

/// The chunks written to a partial file and not yet recorded in the index, and the sync that will make
/// the first of them durable.
pub(super) struct Progress {
    /// Written and being synced: recorded once the sync is done.
    pub(super) syncing: Vec<(ChunkHash, u64, u32)>,
    pub(super) sync: Option<BackgroundSync>,
    /// Written (or about to be) since that sync began.
    pub(super) written: Vec<(ChunkHash, u64, u32)>,
    /// How far the file was when the last sync began, and when.
    pub(super) synced_to: u64,
    pub(super) last_sync: Instant,
    /// When chunks were last recorded durably.
    pub(super) last_durable: Instant,
    /// The chunks recorded so far, from the file's start.
    pub(super) recorded: Recorded,
}

impl Progress {
    /// Every chunk written to the file, from its start: recorded, being synced, or since.
    pub(super) fn written_from_start(&self) -> ChunkList {
        let mut all = self.recorded.clone();
        self.syncing.iter().chain(&self.written).for_each(|(hash, _, len)| all.push(hash, *len));
        all
    }
}

/// The chunks recorded of a partial file, from its start, as its seal keeps them.
pub(super) type Recorded = ChunkList;

impl Recorded {
    /// The seal of `file` holding these chunks, as the disk says it is now.
    pub(super) fn seal(&self, file: &File) -> Option<PartialSeal> {
        let (ino, ctime_ns, _) = inode_of(file)?;
        Some(PartialSeal { ino, ctime_ns, len: self.len, digest: self.digest() })
    }
}

/// The inode of `file`, its ctime in nanoseconds and its length.
pub(super) fn inode_of(file: &File) -> Option<(u64, i64, u64)> {
    let stat = rustix::fs::fstat(file).ok()?;
    let ctime_ns = stat.st_ctime * 1_000_000_000 + i64::try_from(stat.st_ctime_nsec).ok()?;
    Some((stat.st_ino, ctime_ns, u64::try_from(stat.st_size).ok()?))
}

/// A large file being built in its partial file, left open between the steps that build it: its
/// first chunks, listed before its entry ([`crate::Step::Prefix`]), then the rest once the entry
/// comes.
pub(super) struct Building {
    pub(super) path: RelPath,
    pub(super) name: Vec<u8>,
    pub(super) shown: String,
    pub(super) file: File,
    /// Shared with the chunk source (see `ChunkSource::written`) and the thread that syncs it.
    pub(super) shared: Arc<File>,
    pub(super) progress: Progress,
    /// Where the next chunk goes: the bytes written.
    pub(super) offset: u64,
}

/// The large file whose first chunks are being planned: what was listed of it (its chunks only
/// until its building begins: the prefixes after are planned on their own), and whether its
/// building began.
pub(super) struct Streaming {
    pub(super) file: Entry,
    pub(super) built: bool,
}

impl Streaming {
    pub(super) fn add(&mut self, chunks: &[crate::manifest::ChunkRef]) {
        self.file.size += chunks.iter().map(|chunk| u64::from(chunk.len)).sum::<u64>();
        if !self.built {
            self.file.chunks.extend_from_slice(chunks);
        }
    }
}

/// What applying a planned prefix does (see `Applier::plan_prefix`).
pub(super) enum PrefixBuild {
    /// Nothing: the file is not built before its entry comes.
    Skip,
    /// Begins building the file: its chunks so far.
    Begin(Box<Entry>),
    /// Builds its next chunks.
    Continue,
}
