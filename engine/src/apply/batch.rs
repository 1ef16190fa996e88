//! The applier's bookkeeping: folders being walked, files staged in a batch, what waits to be removed.

use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;

use super::options::ApplyError;
use super::sys::Background;
use crate::hash::ChunkHash;
use crate::index::ChunkIndex;
use crate::manifest::{ChunkRef, Entry, EntryKind};
use crate::path::RelPath;
use crate::rootdir::RootDir;

/// What to do with a folder once everything inside it is done.
pub(super) enum Leave {
    /// Unchanged: restore its mtime if something inside changed.
    Keep(Entry),
    /// New or changed: set owner, mode and mtime.
    Update(Entry),
    /// The source removed it: remove it if it is empty of destination-only content.
    Delete,
    /// The source turned it into a file or symlink: remove it, then put the new entry in its place.
    Replace { old: Entry, new: Entry },
    /// Could not be applied: its contents are left alone.
    Failed,
}

pub(super) struct Frame {
    pub(super) path: RelPath,
    pub(super) leave: Leave,
    /// Something inside was created, renamed or removed, so the kernel moved its mtime.
    pub(super) dirty: bool,
}

/// A file or link built in the staging folder, waiting for the sync that lets it be renamed into place.
pub(super) struct Staged {
    /// Its name in the staging folder (reserved only, while `unnamed` holds it).
    pub(super) tmp: Vec<u8>,
    /// A file built with `O_TMPFILE` in its final folder: no name until it is linked into place, so a
    /// crash leaves nothing behind, and its inode is allocated beside its siblings.
    pub(super) unnamed: Option<OwnedFd>,
    pub(super) path: RelPath,
    pub(super) chunks: Vec<ChunkRef>,
    pub(super) is_file: bool,
    /// Something is at the final path already (so linking straight to it would fail).
    pub(super) replaces: bool,
}

/// Chunks of a file built on the applying thread, fetched and not yet written: they are written
/// together, up to `WRITE_GROUP` (1 MiB) bytes at a time, instead of one `write` each.
#[derive(Default)]
pub(super) struct Unwritten {
    pub(super) pieces: Vec<Bytes>,
    /// Those fetched from the source, with their offsets, to hand back once written.
    pub(super) fetched: Vec<(ChunkHash, u64)>,
    pub(super) len: u64,
}

impl Unwritten {
    pub(super) fn push(&mut self, bytes: Bytes, hash: ChunkHash, offset: u64, fetched: bool) {
        self.len += bytes.len() as u64;
        self.pieces.push(bytes);
        if fetched {
            self.fetched.push((hash, offset));
        }
    }
}

/// A batch being made durable and put into place on another thread (see [`place`]) while the next
/// batch is staged.
pub(super) struct Placing {
    /// The batch's paths (a hard link to one of them waits until it is in place).
    pub(super) paths: HashMap<RelPath, usize>,
    pub(super) work: Background<Result<Placed, ApplyError>>,
}

/// What [`place`] did with a batch.
pub(super) struct Placed {
    /// When its sync ended (before the renames).
    pub(super) synced: Instant,
    /// The chunks it recorded in the index.
    pub(super) hashes: Vec<ChunkHash>,
    pub(super) spent: PlaceTimes,
}

/// How long [`place`] took, by part, after the sync (logged at debug level at the end of an apply).
#[derive(Default)]
pub(super) struct PlaceTimes {
    /// Linking and renaming files into place.
    pub(super) naming: Duration,
    /// Setting folders' metadata.
    pub(super) folders: Duration,
    /// Recording chunks in the index.
    pub(super) index: Duration,
    /// Closing the batch's descriptors and freeing it.
    pub(super) closing: Duration,
}

impl PlaceTimes {
    pub(super) fn add(&mut self, other: &PlaceTimes) {
        self.naming += other.naming;
        self.folders += other.folders;
        self.index += other.index;
        self.closing += other.closing;
    }
}

#[derive(Default)]
pub(super) struct Batch {
    pub(super) staged: Vec<Staged>,
    pub(super) by_path: HashMap<RelPath, usize>,
    /// Folders whose metadata is set once the renames into them are done.
    pub(super) dirs: Vec<DoneFolder>,
    /// Files whose metadata was changed in place: their new ctime is recorded with the batch's, and
    /// the chunks given (those of a file taken over in place) where they lie.
    pub(super) touched: Vec<(RelPath, Vec<ChunkRef>)>,
    /// Paths of files and symlinks ferry removed (deleted, or replaced by another kind): their
    /// records go, before the batch's own are written.
    pub(super) gone: Vec<RelPath>,
    pub(super) bytes: u64,
}

/// A folder the walk has left, whose metadata is set once its batch's files are in place.
pub(super) struct DoneFolder {
    pub(super) path: RelPath,
    pub(super) mtime_ns: i64,
    /// Its owner (`None`: left as it is) and mode, for a new or changed folder; `None` when only the
    /// mtime is put back (an unchanged folder that something was put into or removed from).
    pub(super) metadata: Option<(Option<(u32, u32)>, u32)>,
}

/// A deletion put off until the end of the round.
#[derive(Serialize, serde::Deserialize)]
pub(super) struct Deferred {
    pub(super) path: RelPath,
    pub(super) kind: EntryKind,
    /// The mtime the folder holding it must keep, when that folder stays.
    pub(super) parent_mtime_ns: Option<i64>,
}

/// The folder that holds the last path asked about, kept open: sorted paths share parents.
#[derive(Default)]
pub(super) struct ParentDir(Option<(RelPath, Arc<OwnedFd>)>);

impl ParentDir {
    /// The folder that holds `path`, opened beneath `root` unless it is the one kept.
    pub(super) fn of(&mut self, root: &RootDir, path: &RelPath) -> io::Result<Arc<OwnedFd>> {
        let parent = path.parent().unwrap_or_default();
        if let Some((cached, fd)) = &self.0
            && *cached == parent
        {
            return Ok(fd.clone());
        }
        let fd = Arc::new(root.open_dir(&parent)?);
        self.0 = Some((parent, fd.clone()));
        Ok(fd)
    }
}

/// What [`place`] works on, shared with the applier.
pub(super) struct Target {
    pub(super) root: Arc<RootDir>,
    pub(super) staging: Arc<OwnedFd>,
    pub(super) index: ChunkIndex,
}
