//! The destination side: bring a target folder from the state of one manifest to the next, safely.
//!
//! [`apply`] walks the merged old and new manifests (both sorted, so one pass) and for each path that
//! changed creates, replaces or removes what is in the target. Every operation goes through a
//! [`RootDir`], so nothing outside the target is ever touched and no symlink is followed.
//!
//! A new or changed file is built in `.ferry-staging/` at the top of the target, from chunks the chunk
//! index says the target already holds (re-hashed before use) and from chunks the caller's
//! [`ChunkSource`] hands in (hashed too). Files are staged in batches: one `syncfs` makes a whole batch
//! durable, then each file is renamed over its final path. A final path therefore always holds either
//! the old file or the complete new one, at the cost of one sync per batch instead of one per file.
//! A batch's sync runs on another thread while the next batch is staged ([`Applier::begin_flush`]);
//! the same thread then renames the batch into place, sets the metadata of the folders it finished
//! (after their contents are in place) and records its chunks in the index, all before the next sync
//! begins.
//!
//! Destination-only content (anything the old manifest does not list) is never removed. A path the
//! source deleted is kept unless [`ApplyOptions::delete`] is set. When a path changes kind and the
//! target holds content ferry did not write there, that entry fails with a message and the round goes
//! on; the failed entry keeps its old record in the new manifest, which always describes what is
//! really in the target.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rustix::fs::{AtFlags, FileType, Mode, OFlags, Statx, Timespec, Timestamps, UTIME_OMIT};
use rustix::io::Errno;
use serde::Serialize;

use crate::hash::ChunkHash;
use crate::index::{ChunkIndex, ChunkLocation, IndexError, PlacedStat, look_at};
use crate::manifest::{ChunkRef, Entry, EntryError, EntryKind, ManifestWriter, Pair, RawEntry, RecordFileError};
use crate::owner::OwnerMap;
use crate::path::{RelPath, STAGING_DIR};
use crate::rootdir::{NameExt, RootDir};
use crate::spill::SpillQueue;

mod make;
use make::{Job, Maker, WRITE_GROUP};

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
}

impl Default for ApplyOptions {
    fn default() -> Self {
        Self { delete: false, numeric_ids: false, batch_files: 8000, batch_bytes: 256 << 20, adopt: Adopt::Nothing }
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

/// A chunk the source could not provide.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct FetchError(pub String);

/// A chunk's bytes as a [`ChunkSource`] hands them to the applier: read into the applier's buffer, or
/// shared from where the source keeps them, without a copy.
#[derive(Debug, Default)]
pub struct ChunkBuf {
    owned: Vec<u8>,
    shared: Option<Bytes>,
}

impl ChunkBuf {
    /// The applier's own buffer, to read a chunk into (what was shared before is let go).
    pub fn owned(&mut self) -> &mut Vec<u8> {
        self.shared = None;
        &mut self.owned
    }

    /// Hands in bytes the source holds anyway (a clone of a [`Bytes`] shares them).
    pub fn share(&mut self, bytes: Bytes) {
        self.shared = Some(bytes);
    }

    /// The bytes held, to keep: shared ones as they are, the applier's own copied out.
    fn take(&mut self) -> Bytes {
        self.shared.take().unwrap_or_else(|| Bytes::copy_from_slice(&self.owned))
    }
}

impl std::ops::Deref for ChunkBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.shared.as_deref().unwrap_or(&self.owned)
    }
}

/// Where the chunks the target lacks come from: the source tree in a local round, the peer over the
/// network otherwise.
pub trait ChunkSource {
    /// Puts the bytes of `chunk`, found at `offset` in the new version of `entry`, into `out`.
    fn fetch(
        &mut self,
        entry: &Entry,
        offset: u64,
        chunk: &ChunkRef,
        out: &mut ChunkBuf,
    ) -> Result<Fetched, FetchError>;

    /// Called, for a file of at least [`LARGE_FILE`] bytes, after a fetched chunk was written at
    /// `offset` in `file` (the file being built, open for reading too). A source that holds chunks
    /// in memory or in a spill file may drop its copy and read the chunk from there if it is asked
    /// for it again, so that a large file's chunks are not kept twice while the file is built.
    fn written(&mut self, _hash: &ChunkHash, _file: &Arc<File>, _offset: u64) {}

    /// Whether the source has `hash` at hand (received and kept, in memory or on disk), so that the
    /// applier takes it from there without looking in the chunk index first. A source that would have
    /// to read the chunk from its origin says no (the default).
    fn holds(&mut self, _hash: &ChunkHash) -> bool {
        false
    }
}

/// A file this large is built in steps: its chunks are handed back to the source as they are
/// written ([`ChunkSource::written`]) and a sync of its data starts every 32 MiB, beside the
/// writing, so that the disk writes it while the rest arrives instead of all at the batch's sync.
pub const LARGE_FILE: u64 = 8 << 20;

/// How much of a large file is written between two syncs of its data.
const LARGE_FILE_SYNC: u64 = 32 << 20;

/// Whether the bytes a [`ChunkSource`] handed in were already checked against the chunk's hash.
///
/// The applier hashes every `Unchecked` chunk before it writes it; a `Verified` one was hashed where
/// it arrived (the network destination hashes each chunk as it comes off the wire) and is not hashed
/// twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetched {
    /// Hashed by the source itself, from the bytes it hands in, and found right.
    Verified,
    /// Read from somewhere that may have changed or been damaged since: the applier checks it.
    Unchecked,
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
    #[serde(serialize_with = "crate::serialize_millis")]
    pub duration: Duration,
    /// Of `duration`, the time spent waiting for the disk: the syncs of the target's filesystem,
    /// of large files and of the chunk index.
    #[serde(serialize_with = "crate::serialize_millis")]
    pub sync_wait: Duration,
    /// Of `duration`, the time spent waiting for the thread that makes small files to finish a
    /// batch's, before the batch syncs.
    #[serde(serialize_with = "crate::serialize_millis")]
    pub make_wait: Duration,
    /// Of `duration`, the time spent waiting for a synced batch to be named into place, its folders'
    /// metadata set and its chunks recorded in the index (on another thread, after its sync).
    #[serde(serialize_with = "crate::serialize_millis")]
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

fn io_err(op: &'static str, path: impl std::fmt::Display) -> impl FnOnce(Errno) -> ApplyError {
    move |e| ApplyError::Io { op, path: path.to_string(), source: e.into() }
}

/// Applies the pairs (old manifest × new manifest, sorted) to `target`, writing to `committed` the
/// manifest of what the target then holds.
pub fn apply(
    target: &Path,
    steps: impl Iterator<Item = Result<Step, RecordFileError>>,
    source: &mut dyn ChunkSource,
    index: &mut ChunkIndex,
    committed: &mut ManifestWriter,
    options: &ApplyOptions,
) -> Result<ApplyReport, ApplyError> {
    let mut applier = Applier::new(target, source, index, committed, options)?;
    for step in steps {
        applier.step(step?)?;
    }
    applier.finish()
}

/// One chunk the target lacks, found by [`Applier::plan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Needed {
    /// The file, in the new manifest.
    pub path: RelPath,
    /// Where in it.
    pub offset: u64,
    /// The chunk.
    pub chunk: ChunkRef,
}

/// How many chunk hashes a round remembers having asked for and not yet seen flushed into the index,
/// so that a chunk several new files share is asked for once (past this, duplicates may be asked for
/// again: correct, only slower). A transfer holds far fewer in flight; a dry run, which flushes
/// nothing, can reach it.
const MAX_REQUESTED: usize = 1 << 18;

/// One path of a round, as [`Applier::step`] takes it.
#[derive(Debug)]
pub enum Step {
    /// A path whose entry appears, changes, goes or stays (both sides decoded).
    Apply(Box<Pair<Entry, Entry>>),
    /// A file or symlink that stays as it was: its stored entry goes to the new manifest as it is,
    /// without being decoded (most of a day's round over a large tree).
    Keep(RawEntry),
}

impl From<Pair<Entry, Entry>> for Step {
    fn from(pair: Pair<Entry, Entry>) -> Self {
        Step::Apply(Box::new(pair))
    }
}

impl Step {
    /// The pair, unless the entry is kept as it is.
    pub fn pair(&self) -> Option<&Pair<Entry, Entry>> {
        match self {
            Step::Apply(pair) => Some(pair),
            Step::Keep(_) => None,
        }
    }
}

/// Decides which chunks a round must ask the source for: those of new or changed files that the
/// chunk index does not know and that were not asked for already this round. Writes nothing, so a dry
/// run uses it alone.
#[derive(Debug, Default)]
pub struct Planner {
    requested: std::collections::HashSet<ChunkHash>,
    /// Paths whose chunks the index's hints must not be trusted for (the round's check found them
    /// missing or changed): their chunks are asked for.
    distrusted: std::collections::HashSet<RelPath>,
    /// The index is not asked at all (most of the target is gone).
    ignore_index: bool,
}

impl Planner {
    /// Forgets having asked for `hashes` (they are in the index now).
    fn forget<'a>(&mut self, hashes: impl IntoIterator<Item = &'a ChunkHash>) {
        for hash in hashes {
            self.requested.remove(hash);
        }
    }

    /// The chunks `pair` needs from the source.
    pub fn plan(&mut self, index: &ChunkIndex, pair: &Pair<Entry, Entry>) -> Result<Vec<Needed>, ApplyError> {
        let Some(new) = &pair.new else { return Ok(Vec::new()) };
        if !Self::writes_content(pair) {
            return Ok(Vec::new());
        }
        let mut needed = Vec::new();
        let mut offset = 0u64;
        for chunk in &new.chunks {
            if !self.requested.contains(&chunk.hash) && !self.held(index, &chunk.hash)? {
                if self.requested.len() < MAX_REQUESTED {
                    self.requested.insert(chunk.hash);
                }
                needed.push(Needed { path: new.path.clone(), offset, chunk: *chunk });
            }
            offset += u64::from(chunk.len);
        }
        Ok(needed)
    }

    /// Does the target seem to hold `hash`, where the check found nothing amiss?
    fn held(&self, index: &ChunkIndex, hash: &ChunkHash) -> Result<bool, ApplyError> {
        if self.ignore_index {
            return Ok(false);
        }
        Ok(index.get(hash)?.is_some_and(|location| !self.distrusted.contains(&location.path)))
    }

    /// Trusts no hint of the index that points into `paths` (the check found them missing or changed),
    /// or, with `None`, no hint at all: their chunks are asked for instead of waited for in vain.
    pub fn distrust(&mut self, paths: Option<std::collections::HashSet<RelPath>>) {
        match paths {
            Some(paths) => self.distrusted = paths,
            None => self.ignore_index = true,
        }
    }

    /// True when applying `pair` writes a file's content (a new file, or one whose content changed).
    pub fn writes_content(pair: &Pair<Entry, Entry>) -> bool {
        let Some(new) = &pair.new else { return false };
        new.kind == EntryKind::File
            && new.hard_link_to.is_none()
            && !pair.old.as_ref().is_some_and(|old| old.same_content(new) && old.hard_link_to.is_none())
    }
}

impl<'a> Applier<'a> {
    /// Starts applying to `target`: takes the staging folder (emptying what a crashed run left).
    pub fn new(
        target: &Path,
        source: &'a mut dyn ChunkSource,
        index: &'a mut ChunkIndex,
        committed: &'a mut ManifestWriter,
        options: &ApplyOptions,
    ) -> Result<Self, ApplyError> {
        let root = RootDir::open(target).map_err(|e| ApplyError::Io {
            op: "open target",
            path: target.display().to_string(),
            source: e,
        })?;
        let staging = open_staging(&root)?;
        let maker = Maker::start(&staging);
        // Each file of a batch keeps its descriptor open until the batch's sync, and two batches can be
        // open at once (one syncing, one staging).
        let options =
            ApplyOptions { batch_files: options.batch_files.min(raise_fd_limit() / 4).max(1), ..options.clone() };
        Ok(Applier {
            root: Arc::new(root),
            staging: Arc::new(staging),
            index,
            source,
            committed: Some(committed),
            owners: OwnerMap::new(options.numeric_ids),
            options,
            report: ApplyReport::default(),
            started: Instant::now(),
            stack: Vec::new(),
            batch: Batch::default(),
            placing: None,
            next_tmp: 0,
            buf: ChunkBuf::default(),
            local_file: None,
            dir_cache: ParentDir::default(),
            previous: None,
            root_mtime: None,
            deferred: SpillQueue::new(),
            no_tmpfile: std::env::var_os("FERRY_NO_TMPFILE").is_some(),
            planner: Planner::default(),
            maker,
            place_spent: PlaceTimes::default(),
        })
    }

    /// Applies the next step (steps must come in manifest order). A kept entry ([`Step::Keep`]) is
    /// checked for its place in the order and copied to the new manifest as it is stored (its content
    /// and metadata were checked when it came).
    pub fn step(&mut self, step: Step) -> Result<(), ApplyError> {
        let committed = self.committed.take().expect("committed is only taken for the length of a call");
        let result = match step {
            Step::Apply(pair) => self.step_with(*pair, committed),
            Step::Keep(kept) if kept.kind() == EntryKind::Dir => {
                // A folder opens a frame its contents need: it takes the whole path.
                kept.decode()
                    .map_err(ApplyError::from)
                    .and_then(|entry| self.step_with(Pair { old: Some(entry.clone()), new: Some(entry) }, committed))
            }
            Step::Keep(kept) => self.keep_with(kept, committed),
        };
        self.committed = Some(committed);
        result
    }

    /// The chunks of `pair` that the target does not seem to have and that have not been asked for
    /// yet this round. Called before [`Applier::step`] for the same pair, to ask the source ahead.
    pub fn plan(&mut self, pair: &Pair<Entry, Entry>) -> Result<Vec<Needed>, ApplyError> {
        self.planner.plan(self.index, pair)
    }

    /// See [`Planner::distrust`].
    pub fn distrust(&mut self, paths: Option<std::collections::HashSet<RelPath>>) {
        self.planner.distrust(paths);
    }

    /// Makes everything staged so far durable and visible, and records its chunks in the index,
    /// durably: after a crash, what was written here is found in the index and not fetched again.
    pub fn flush_batch(&mut self) -> Result<(), ApplyError> {
        self.flush()?;
        waiting(&mut self.report.sync_wait, || self.index.sync())?;
        Ok(())
    }

    /// Like [`Applier::flush_batch`], without waiting for the disk: finishes the flush the previous
    /// call began (its batch renamed into place and its chunks recorded in the index, durably), then
    /// begins syncing what is staged now, on another thread, and returns while the next batch is
    /// staged. Everything applied before the *previous* call is durable and visible when this returns.
    pub fn begin_flush(&mut self) -> Result<(), ApplyError> {
        let settled = self.placing.is_some();
        self.settle()?;
        if settled {
            waiting(&mut self.report.sync_wait, || self.index.sync())?;
        }
        self.start_sync()
    }

    /// Whether the batch [`Applier::begin_flush`] handed to the disk last is still syncing or being
    /// put into place: a `begin_flush` now would wait for it.
    pub fn is_syncing(&self) -> bool {
        self.placing.as_ref().is_some_and(|p| !p.work.is_done())
    }

    /// Ends the apply: closes every folder, flushes, runs the deletions, syncs.
    pub fn finish(mut self) -> Result<ApplyReport, ApplyError> {
        let committed = self.committed.take().expect("committed is only taken for the length of a call");
        while let Some(frame) = self.stack.pop() {
            self.leave(frame, committed)?;
        }
        self.flush()?;
        self.delete_deferred()?;
        let shown = self.root.path().display().to_string();
        waiting(&mut self.report.sync_wait, || rustix::fs::syncfs(self.root.fd())).map_err(io_err("sync", &shown))?;
        waiting(&mut self.report.sync_wait, || self.index.sync())?;
        let _ = rustix::fs::unlinkat(self.root.fd(), STAGING_DIR, AtFlags::REMOVEDIR);
        // Creating and removing the staging folder moved the target's own mtime: put it back.
        if let Some(mtime_ns) = self.root_mtime {
            rustix::fs::futimens(self.root.fd(), &times(mtime_ns)).map_err(io_err("set mtime of", &shown))?;
        }
        self.report.duration = self.started.elapsed();
        let spent = &self.place_spent;
        tracing::debug!(
            "putting batches into place (on their own thread, after each sync): {:.2} s naming files, {:.2} s \
             setting folders' metadata, {:.2} s recording chunks in the index, {:.2} s closing",
            spent.naming.as_secs_f64(),
            spent.folders.as_secs_f64(),
            spent.index.as_secs_f64(),
            spent.closing.as_secs_f64()
        );
        Ok(std::mem::take(&mut self.report))
    }
}

impl Drop for Applier<'_> {
    /// An apply that stopped early still waits for the batch being put into place, so that nothing
    /// goes on touching the target or the index once the applier is gone.
    fn drop(&mut self) {
        if let Some(placing) = self.placing.take() {
            let _ = placing.work.wait();
        }
    }
}

/// Creates `.ferry-staging` at the top of the target (emptying what a crashed run left in it).
fn open_staging(root: &RootDir) -> Result<OwnedFd, ApplyError> {
    let shown = root.path().join(STAGING_DIR).display().to_string();
    match rustix::fs::mkdirat(root.fd(), STAGING_DIR, Mode::from_raw_mode(0o700)) {
        Ok(()) | Err(Errno::EXIST) => {}
        Err(e) => return Err(io_err("create", &shown)(e)),
    }
    let fd = rustix::fs::openat(
        root.fd(),
        STAGING_DIR,
        OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(io_err("open (must be a folder, not a symlink)", &shown))?;
    let mut leftovers = Vec::new();
    let mut dir = rustix::fs::Dir::read_from(&fd).map_err(io_err("list", &shown))?;
    while let Some(entry) = dir.read() {
        let entry = entry.map_err(io_err("list", &shown))?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            leftovers.push(name.to_vec());
        }
    }
    for name in leftovers {
        tracing::debug!("removing leftover staging file {}", name.escape_ascii());
        rustix::fs::unlinkat(&fd, name.os(), AtFlags::empty()).map_err(io_err("clean", &shown))?;
    }
    Ok(fd)
}

/// What to do with a folder once everything inside it is done.
enum Leave {
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

struct Frame {
    path: RelPath,
    leave: Leave,
    /// Something inside was created, renamed or removed, so the kernel moved its mtime.
    dirty: bool,
}

/// A file or link built in the staging folder, waiting for the sync that lets it be renamed into place.
struct Staged {
    /// Its name in the staging folder (reserved only, while `unnamed` holds it).
    tmp: Vec<u8>,
    /// A file built with `O_TMPFILE` in its final folder: no name until it is linked into place, so a
    /// crash leaves nothing behind, and its inode is allocated beside its siblings.
    unnamed: Option<OwnedFd>,
    path: RelPath,
    chunks: Vec<ChunkRef>,
    is_file: bool,
    /// Something is at the final path already (so linking straight to it would fail).
    replaces: bool,
}

/// Chunks of a file built on the applying thread, fetched and not yet written: they are written
/// together, up to [`make::WRITE_GROUP`] bytes at a time, instead of one `write` each.
#[derive(Default)]
struct Unwritten {
    pieces: Vec<Bytes>,
    /// Those fetched from the source, with their offsets, to hand back once written.
    fetched: Vec<(ChunkHash, u64)>,
    len: u64,
}

impl Unwritten {
    fn push(&mut self, bytes: Bytes, hash: ChunkHash, offset: u64, fetched: bool) {
        self.len += bytes.len() as u64;
        self.pieces.push(bytes);
        if fetched {
            self.fetched.push((hash, offset));
        }
    }
}

/// A batch being made durable and put into place on another thread (see [`place`]) while the next
/// batch is staged.
struct Placing {
    /// The batch's paths (a hard link to one of them waits until it is in place).
    paths: HashMap<RelPath, usize>,
    work: Background<Result<Placed, ApplyError>>,
}

/// What [`place`] did with a batch.
struct Placed {
    /// When its sync ended (before the renames).
    synced: Instant,
    /// The chunks it recorded in the index.
    hashes: Vec<ChunkHash>,
    spent: PlaceTimes,
}

/// How long [`place`] took, by part, after the sync (logged at debug level at the end of an apply).
#[derive(Default)]
struct PlaceTimes {
    /// Linking and renaming files into place.
    naming: Duration,
    /// Setting folders' metadata.
    folders: Duration,
    /// Recording chunks in the index.
    index: Duration,
    /// Closing the batch's descriptors and freeing it.
    closing: Duration,
}

impl PlaceTimes {
    fn add(&mut self, other: &PlaceTimes) {
        self.naming += other.naming;
        self.folders += other.folders;
        self.index += other.index;
        self.closing += other.closing;
    }
}

#[derive(Default)]
struct Batch {
    staged: Vec<Staged>,
    by_path: HashMap<RelPath, usize>,
    /// Folders whose metadata is set once the renames into them are done.
    dirs: Vec<DoneFolder>,
    /// Files whose metadata was changed in place: their new ctime is recorded with the batch's.
    touched: Vec<RelPath>,
    bytes: u64,
}

/// A folder the walk has left, whose metadata is set once its batch's files are in place.
struct DoneFolder {
    path: RelPath,
    mtime_ns: i64,
    /// Its owner (`None`: left as it is) and mode, for a new or changed folder; `None` when only the
    /// mtime is put back (an unchanged folder that something was put into or removed from).
    metadata: Option<(Option<(u32, u32)>, u32)>,
}

/// Applies a new manifest to a target, one pair at a time (see the module's documentation).
pub struct Applier<'a> {
    root: Arc<RootDir>,
    staging: Arc<OwnedFd>,
    index: &'a mut ChunkIndex,
    source: &'a mut dyn ChunkSource,
    committed: Option<&'a mut ManifestWriter>,
    owners: OwnerMap,
    options: ApplyOptions,
    report: ApplyReport,
    started: Instant,
    stack: Vec<Frame>,
    batch: Batch,
    /// The batch before `batch`, on its way to the disk and its final paths; in place before the next
    /// sync.
    placing: Option<Placing>,
    next_tmp: u64,
    buf: ChunkBuf,
    local_file: Option<(RelPath, File)>,
    dir_cache: ParentDir,
    previous: Option<RelPath>,
    /// The mtime the target's top folder must end with.
    root_mtime: Option<i64>,
    /// Deletions put off until everything new is in place.
    deferred: SpillQueue<Deferred>,
    /// The target's filesystem has no `O_TMPFILE`.
    no_tmpfile: bool,
    /// Chunks asked for this round (see `plan`).
    planner: Planner,
    /// Makes the small files of the batch being staged (`None`: they are made here).
    maker: Option<Maker>,
    /// How long putting the batches into place took, by part.
    place_spent: PlaceTimes,
}

/// A deletion put off until the end of the round.
#[derive(Serialize, serde::Deserialize)]
struct Deferred {
    path: RelPath,
    kind: EntryKind,
    /// The mtime the folder holding it must keep, when that folder stays.
    parent_mtime_ns: Option<i64>,
}

impl Applier<'_> {
    fn fail(&mut self, path: &RelPath, why: impl std::fmt::Display) {
        tracing::warn!("{path}: {why}");
        self.report.failure_count += 1;
        if self.report.failures.len() < 100 {
            self.report.failures.push(format!("{path}: {why}"));
        }
    }

    fn step_with(&mut self, pair: Pair<Entry, Entry>, committed: &mut ManifestWriter) -> Result<(), ApplyError> {
        let path = pair.path().clone();
        if let Some(new) = &pair.new {
            new.validate(self.previous.as_ref())?;
        }
        self.previous = Some(path.clone());
        if let Some(new) = pair.new.as_ref().filter(|n| n.path.is_root()) {
            self.root_mtime = Some(new.mtime_ns);
        }
        self.leave_until_inside(&path, committed)?;
        let forced_delete = matches!(self.stack.last().map(|f| &f.leave), Some(Leave::Replace { .. } | Leave::Delete));
        if matches!(self.stack.last().map(|f| &f.leave), Some(Leave::Failed)) {
            // Inside a folder that could not be applied: leave everything as it was.
            if let Some(old) = &pair.old {
                committed.push(old)?;
            }
            return Ok(());
        }
        if forced_delete && pair.new.is_some() {
            self.fail(&path, "is listed inside a path that is no longer a folder");
            return Ok(());
        }
        match (pair.old, pair.new) {
            (None, None) => Ok(()),
            (Some(old), None) => self.remove(old, forced_delete),
            (old, Some(new)) if old.as_ref() == Some(&new) => {
                committed.push(&new)?;
                if new.kind == EntryKind::Dir {
                    self.stack.push(Frame { path, leave: Leave::Keep(new), dirty: false });
                }
                Ok(())
            }
            (old, Some(new)) => self.place(old, new, committed),
        }
    }

    fn keep_with(&mut self, kept: RawEntry, committed: &mut ManifestWriter) -> Result<(), ApplyError> {
        let path = kept.path();
        crate::manifest::check_order(path, self.previous.as_ref())?;
        self.previous = Some(path.clone());
        self.leave_until_inside(path, committed)?;
        match self.stack.last().map(|f| &f.leave) {
            Some(Leave::Replace { .. } | Leave::Delete) => {
                self.fail(path, "is listed inside a path that is no longer a folder");
                Ok(())
            }
            // Inside a folder that could not be applied, the entry is kept as well.
            _ => Ok(committed.push_raw(&kept)?),
        }
    }

    /// Leaves (finishes) every open folder that `path` is not inside.
    fn leave_until_inside(&mut self, path: &RelPath, committed: &mut ManifestWriter) -> Result<(), ApplyError> {
        while let Some(top) = self.stack.last() {
            if top.path.is_ancestor_of(path) {
                break;
            }
            let frame = self.stack.pop().expect("stack has a top");
            self.leave(frame, committed)?;
        }
        Ok(())
    }

    fn mark_parent_dirty(&mut self, path: &RelPath) {
        if let (Some(parent), Some(top)) = (path.parent(), self.stack.last_mut())
            && top.path == parent
        {
            top.dirty = true;
        }
    }

    /// The folder that holds `path`, opened beneath the root (cached: sorted paths share parents).
    fn parent_dir(&mut self, path: &RelPath) -> io::Result<Arc<OwnedFd>> {
        self.dir_cache.of(&self.root, path)
    }

    /// Like `parent_dir`, for operations whose failure stops the round.
    fn parent_dir_or_fail(&mut self, path: &RelPath) -> Result<Arc<OwnedFd>, ApplyError> {
        self.parent_dir(path).map_err(|e| ApplyError::Io { op: "open folder of", path: path.to_string(), source: e })
    }

    /// What is at `path` in the target now (`None`: nothing).
    fn current_kind(&mut self, path: &RelPath) -> io::Result<Option<FileType>> {
        Ok(self.current_stat(path)?.map(|stat| FileType::from_raw_mode(stat.stx_mode.into())))
    }

    /// The `lstat` of what is at `path` in the target now (`None`: nothing).
    fn current_stat(&mut self, path: &RelPath) -> io::Result<Option<Statx>> {
        if path.is_root() {
            return Ok(Some(look_at(self.root.fd(), "".as_ref())?));
        }
        let dir = self.parent_dir(path)?;
        match look_at(&*dir, name_of(path).os()) {
            Ok(stat) => Ok(Some(stat)),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// May a round replace what is at `path`, which the old manifest does not list as ferry's? Yes
    /// when the operator adopted it, or when ferry put it there itself (a round that stopped before
    /// its commit) and nothing changed it since.
    fn may_replace_unlisted(&mut self, path: &RelPath, stat: &Statx) -> Result<bool, ApplyError> {
        if self.options.adopt.covers(path) {
            return Ok(true);
        }
        let recorded = self.index.placed([path])?.pop().unwrap_or_default();
        Ok(recorded.for_stat(stat).is_some_and(|r| r.matches(stat)))
    }

    /// The source no longer has `old`. Inside a folder being replaced or removed (`forced`) it goes now;
    /// with `delete` it goes at the end of the round, once everything new is in place (so that a
    /// renamed file's chunks are still there to be copied); otherwise it is kept.
    fn remove(&mut self, old: Entry, forced: bool) -> Result<(), ApplyError> {
        if forced {
            if old.kind == EntryKind::Dir {
                let path = old.path.clone();
                self.stack.push(Frame { path, leave: Leave::Delete, dirty: false });
                return Ok(());
            }
            if self.unlink_if_ours(&old.path, old.kind)? {
                self.mark_parent_dirty(&old.path);
            }
            return Ok(());
        }
        if !self.options.delete {
            self.report.kept += 1;
            return Ok(());
        }
        let parent_mtime_ns = match self.stack.last() {
            Some(Frame { path, leave: Leave::Keep(entry) | Leave::Update(entry), .. })
                if Some(path) == old.path.parent().as_ref() =>
            {
                Some(entry.mtime_ns)
            }
            _ => None,
        };
        self.deferred.push(Deferred { path: old.path, kind: old.kind, parent_mtime_ns }).map_err(|e| ApplyError::Io {
            op: "queue deletions in",
            path: "a temporary file".into(),
            source: e,
        })
    }

    /// Removes a file or symlink if what is there is still of the kind ferry wrote.
    fn unlink_if_ours(&mut self, path: &RelPath, kind: EntryKind) -> Result<bool, ApplyError> {
        let current = match self.current_kind(path) {
            Ok(kind) => kind,
            Err(_) => return Ok(false), // its folder is gone or not a folder: nothing of ours to remove
        };
        let ours = match kind {
            EntryKind::File => current == Some(FileType::RegularFile),
            EntryKind::Symlink => current == Some(FileType::Symlink),
            EntryKind::Dir => false,
        };
        if !ours {
            return Ok(false);
        }
        self.unlink(path)?;
        Ok(true)
    }

    /// The deletions `remove` put off, in manifest order: files first, each folder once it is left
    /// (and only if empty of destination-only content); parents get their mtimes back.
    fn delete_deferred(&mut self) -> Result<(), ApplyError> {
        let deferred = std::mem::replace(&mut self.deferred, SpillQueue::new());
        if deferred.is_empty() {
            return Ok(());
        }
        let queue_err =
            |e| ApplyError::Io { op: "read queued deletions from", path: "a temporary file".into(), source: e };
        let mut dirs: Vec<Deferred> = Vec::new();
        for item in deferred.drain().map_err(queue_err)? {
            let item = item.map_err(queue_err)?;
            while let Some(top) = dirs.last() {
                if top.path.is_ancestor_of(&item.path) {
                    break;
                }
                let dir = dirs.pop().expect("dirs has a top");
                self.remove_deferred_dir(&dir)?;
            }
            if item.kind == EntryKind::Dir {
                dirs.push(item);
            } else if self.unlink_if_ours(&item.path, item.kind)? {
                self.restore_parent_mtime(&item)?;
            }
        }
        while let Some(dir) = dirs.pop() {
            self.remove_deferred_dir(&dir)?;
        }
        Ok(())
    }

    fn remove_deferred_dir(&mut self, dir: &Deferred) -> Result<(), ApplyError> {
        if self.rmdir(&dir.path)? {
            self.report.deleted += 1;
            self.restore_parent_mtime(dir)
        } else {
            tracing::info!("kept folder {}: it holds files ferry did not write", dir.path);
            self.report.kept += 1;
            Ok(())
        }
    }

    fn restore_parent_mtime(&mut self, item: &Deferred) -> Result<(), ApplyError> {
        let Some(mtime_ns) = item.parent_mtime_ns else { return Ok(()) };
        if item.path.parent().is_some_and(|p| p.is_root()) {
            self.root_mtime = Some(mtime_ns);
        }
        let dir = self.parent_dir_or_fail(&item.path)?;
        rustix::fs::futimens(&*dir, &times(mtime_ns)).map_err(io_err("set mtime of the folder of", &item.path))
    }

    fn place(&mut self, old: Option<Entry>, new: Entry, committed: &mut ManifestWriter) -> Result<(), ApplyError> {
        let path = new.path.clone();
        let current = match self.current_stat(&path) {
            Ok(stat) => stat,
            Err(e) => {
                self.fail(&path, format_args!("cannot reach its folder: {e}"));
                if new.kind == EntryKind::Dir {
                    self.stack.push(Frame { path, leave: Leave::Failed, dirty: false });
                }
                return Ok(());
            }
        };
        // Something ferry does not know as its own is in the way of a file or symlink: it stays, unless
        // ferry put it there itself in a round that did not commit, or the operator adopted it.
        let theirs = match &current {
            Some(stat) if old.is_none() && FileType::from_raw_mode(stat.stx_mode.into()) != FileType::Directory => {
                !self.may_replace_unlisted(&path, stat)?
            }
            _ => false,
        };
        let current = current.map(|stat| FileType::from_raw_mode(stat.stx_mode.into()));
        if theirs {
            let what = match current {
                Some(FileType::Symlink) => "a symlink",
                _ => "a file",
            };
            self.fail(
                &path,
                format_args!(
                    "holds {what} that ferry did not put there or that changed since it did; left as it is \
                     (move it aside, or let a local round replace it with --adopt {path})"
                ),
            );
            if new.kind == EntryKind::Dir {
                self.stack.push(Frame { path, leave: Leave::Failed, dirty: false });
            }
            return Ok(());
        }
        let adopted = old.is_none() && current.is_some();
        let old_kind = old.as_ref().map(|o| o.kind);
        if new.kind == EntryKind::Dir {
            match current {
                Some(FileType::Directory) => {}
                None => self.mkdir(&path)?,
                Some(_) if adopted || old_kind.is_some_and(|k| k != EntryKind::Dir) => {
                    self.unlink(&path)?;
                    self.mkdir(&path)?;
                }
                Some(other) => {
                    self.fail(
                        &path,
                        format_args!("holds a {other:?} that ferry did not write; not replaced by a folder"),
                    );
                    self.stack.push(Frame { path, leave: Leave::Failed, dirty: false });
                    return Ok(());
                }
            }
            committed.push(&new)?;
            self.stack.push(Frame { path, leave: Leave::Update(new), dirty: false });
            return Ok(());
        }
        if current == Some(FileType::Directory) {
            match old {
                Some(old) if old.kind == EntryKind::Dir => {
                    // Its old contents come next in the stream and are removed first; see `leave`.
                    self.stack.push(Frame { path, leave: Leave::Replace { old, new }, dirty: false });
                }
                _ => {
                    self.fail(&path, "is a folder that ferry did not write; not replaced");
                    self.stack.push(Frame { path, leave: Leave::Failed, dirty: false });
                }
            }
            return Ok(());
        }
        let current_kind = kind_of(current);
        if current.is_some() && current_kind != Some(new.kind) && !adopted && old_kind != current_kind {
            self.fail(
                &path,
                format_args!("holds a {current:?} that ferry did not write; not replaced by a {:?}", new.kind),
            );
            return Ok(());
        }
        match self.place_non_dir(old.as_ref(), &new, current)? {
            true => committed.push(&new)?,
            false => {
                if let Some(old) = old.filter(|o| Some(o.kind) == kind_of(current)) {
                    committed.push(&old)?;
                }
            }
        }
        Ok(())
    }

    /// Puts a file or symlink at its path, where `current` is there now. `Ok(false)`: that entry failed
    /// (already reported).
    fn place_non_dir(
        &mut self,
        old: Option<&Entry>,
        new: &Entry,
        current: Option<FileType>,
    ) -> Result<bool, ApplyError> {
        let replaces = current.is_some();
        if new.kind == EntryKind::Symlink {
            return self.stage_symlink(new, replaces);
        }
        if let Some(leader) = &new.hard_link_to {
            return self.stage_hard_link(new, leader, replaces);
        }
        let same_content = old.is_some_and(|o| o.same_content(new) && o.hard_link_to.is_none());
        if same_content && current == Some(FileType::RegularFile) {
            return self.update_in_place(new);
        }
        self.stage_file(new, replaces)
    }

    fn tmp_name(&mut self) -> Vec<u8> {
        self.next_tmp += 1;
        format!("t{}", self.next_tmp).into_bytes()
    }

    fn mkdir(&mut self, path: &RelPath) -> Result<(), ApplyError> {
        let dir = self.parent_dir_or_fail(path)?;
        // Private until its contents are in place; its real mode is set when it is left.
        rustix::fs::mkdirat(&*dir, name_of(path).os(), Mode::from_raw_mode(0o700))
            .map_err(io_err("create folder", path))?;
        self.report.dirs_created += 1;
        self.mark_parent_dirty(path);
        Ok(())
    }

    fn unlink(&mut self, path: &RelPath) -> Result<(), ApplyError> {
        let dir = self.parent_dir_or_fail(path)?;
        rustix::fs::unlinkat(&*dir, name_of(path).os(), AtFlags::empty()).map_err(io_err("remove", path))?;
        self.report.deleted += 1;
        self.mark_parent_dirty(path);
        Ok(())
    }

    fn owner_of(&mut self, entry: &Entry) -> Option<(u32, u32)> {
        self.owners.resolve(entry.uid, entry.gid, entry.user.as_deref(), entry.group.as_deref())
    }

    fn stage(
        &mut self,
        tmp: Vec<u8>,
        unnamed: Option<OwnedFd>,
        entry: &Entry,
        chunks: Vec<ChunkRef>,
        replaces: bool,
    ) -> Result<(), ApplyError> {
        self.batch.bytes += entry.size;
        self.batch.by_path.insert(entry.path.clone(), self.batch.staged.len());
        let is_file = entry.kind == EntryKind::File;
        self.batch.staged.push(Staged { tmp, unnamed, path: entry.path.clone(), chunks, is_file, replaces });
        self.mark_parent_dirty(&entry.path);
        if self.batch.staged.len() >= self.options.batch_files || self.batch.bytes >= self.options.batch_bytes {
            self.settle()?;
            self.start_sync()?;
        }
        Ok(())
    }

    fn stage_symlink(&mut self, new: &Entry, replaces: bool) -> Result<bool, ApplyError> {
        let target = new.link_target.as_deref().unwrap_or_default();
        let tmp = self.tmp_name();
        let shown = || format!("{} (staged for {})", tmp.escape_ascii(), new.path);
        rustix::fs::symlinkat(target.os(), &self.staging, tmp.os()).map_err(io_err("create symlink", shown()))?;
        if let Some((uid, gid)) = self.owner_of(new) {
            rustix::fs::chownat(
                &self.staging,
                tmp.os(),
                Some(rustix::fs::Uid::from_raw(uid)),
                Some(rustix::fs::Gid::from_raw(gid)),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(io_err("set owner of", shown()))?;
        }
        rustix::fs::utimensat(&self.staging, tmp.os(), &times(new.mtime_ns), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(io_err("set mtime of", shown()))?;
        self.report.symlinks += 1;
        self.stage(tmp, None, new, Vec::new(), replaces)?;
        Ok(true)
    }

    fn stage_hard_link(&mut self, new: &Entry, leader: &RelPath, replaces: bool) -> Result<bool, ApplyError> {
        if self.placing.as_ref().is_some_and(|p| p.paths.contains_key(leader)) {
            // The leader is staged but not in place yet: link to it once it is.
            self.settle()?;
        }
        if self.batch.by_path.contains_key(leader) {
            // The leader may still be on the maker's thread.
            self.collect_made()?;
        }
        let tmp = self.tmp_name();
        let linked = if let Some(&i) = self.batch.by_path.get(leader) {
            if !self.batch.staged[i].is_file {
                Err(Errno::PERM)
            } else {
                // The leader may have no name yet: give it its staging name first.
                if let Some(fd) = self.batch.staged[i].unnamed.take() {
                    let leader_tmp = self.batch.staged[i].tmp.clone();
                    link_unnamed(&fd, &self.staging, &leader_tmp).map_err(io_err("name", &new.path))?;
                }
                let leader_tmp = self.batch.staged[i].tmp.clone();
                rustix::fs::linkat(&self.staging, leader_tmp.os(), &self.staging, tmp.os(), AtFlags::empty())
            }
        } else {
            if self.already_linked(&new.path, leader) {
                // Same inode already (the entry changed only in metadata, which the leader carries).
                return Ok(true);
            }
            let dir = match self.parent_dir(leader) {
                Ok(dir) => dir,
                Err(e) => {
                    self.fail(&new.path, format_args!("hard link to {leader}: {e}"));
                    return Ok(false);
                }
            };
            let name = name_of(leader);
            match rustix::fs::statat(&*dir, name.os(), AtFlags::SYMLINK_NOFOLLOW) {
                Ok(stat) if FileType::from_raw_mode(stat.st_mode) == FileType::RegularFile => {
                    rustix::fs::linkat(&*dir, name.os(), &self.staging, tmp.os(), AtFlags::empty())
                }
                Ok(_) => Err(Errno::PERM),
                Err(e) => Err(e),
            }
        };
        if let Err(e) = linked {
            self.fail(&new.path, format_args!("cannot hard-link to {leader}: {e}"));
            return Ok(false);
        }
        self.report.hard_links += 1;
        self.stage(tmp, None, new, Vec::new(), replaces)?;
        Ok(true)
    }

    /// Are `path` and `leader` already two names of one regular file?
    fn already_linked(&mut self, path: &RelPath, leader: &RelPath) -> bool {
        let mut stat = |p: &RelPath| {
            let dir = self.parent_dir(p).ok()?;
            rustix::fs::statat(&*dir, name_of(p).os(), AtFlags::SYMLINK_NOFOLLOW).ok()
        };
        match (stat(path), stat(leader)) {
            (Some(a), Some(b)) => {
                FileType::from_raw_mode(a.st_mode) == FileType::RegularFile
                    && (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
            }
            _ => false,
        }
    }

    fn set_file_metadata(&mut self, fd: &impl std::os::fd::AsFd, entry: &Entry) -> Result<(), Errno> {
        let owner = self.owner_of(entry);
        set_metadata(fd, owner, entry.mode, entry.mtime_ns)
    }

    fn update_in_place(&mut self, new: &Entry) -> Result<bool, ApplyError> {
        let file = match self.root.open_file(&new.path) {
            Ok(file) => file,
            Err(e) => {
                self.fail(&new.path, format_args!("cannot open to update its metadata: {e}"));
                return Ok(false);
            }
        };
        self.set_file_metadata(&file, new).map_err(io_err("set metadata of", &new.path))?;
        self.report.metadata_updated += 1;
        self.batch.touched.push(new.path.clone());
        Ok(true)
    }

    fn stage_file(&mut self, new: &Entry, replaces: bool) -> Result<bool, ApplyError> {
        let tmp = self.tmp_name();
        let shown = format!("{} (staged for {})", tmp.escape_ascii(), new.path);
        if new.size < LARGE_FILE && self.maker.is_some() {
            return self.give_file(new, tmp, shown, replaces);
        }
        let (fd, unnamed) = match self.create_unnamed(&new.path) {
            Some(fd) => (fd, true),
            None => {
                let fd = create_staged(&self.staging, &tmp).map_err(io_err("create", &shown))?;
                (fd, false)
            }
        };
        let file = File::from(fd);
        // A large file's descriptor, shared with the chunk source (see `ChunkSource::written`).
        let shared = if new.size >= LARGE_FILE {
            let dup = file.try_clone();
            Some(Arc::new(dup.map_err(|e| ApplyError::Io { op: "duplicate", path: shown.clone(), source: e })?))
        } else {
            None
        };
        let (mut offset, mut synced) = (0u64, 0u64);
        let mut syncing: Option<BackgroundSync> = None;
        let mut unwritten = Unwritten::default();
        for chunk in &new.chunks {
            let fetched = match self.get_chunk(new, offset, chunk) {
                Ok(fetched) => fetched,
                Err(why) => {
                    drop(file);
                    if let Some(sync) = syncing.take() {
                        let _ = sync.synced();
                    }
                    if !unnamed {
                        let _ = rustix::fs::unlinkat(&self.staging, tmp.os(), AtFlags::empty());
                    }
                    self.fail(&new.path, why);
                    return Ok(false);
                }
            };
            unwritten.push(self.buf.take(), chunk.hash, offset, fetched);
            offset += u64::from(chunk.len);
            let sync_due = shared.is_some() && offset - synced >= LARGE_FILE_SYNC;
            if unwritten.len >= WRITE_GROUP as u64 || sync_due {
                self.write_unwritten(&mut unwritten, &file, shared.as_ref(), &shown)?;
            }
            if let Some(shared) = shared.as_ref().filter(|_| sync_due) {
                // One sync at a time: the one of the piece before this one must be done.
                if let Some(sync) = syncing.take() {
                    waiting(&mut self.report.sync_wait, || sync.synced()).map_err(io_err("sync", &shown))?;
                }
                syncing = Some(BackgroundSync::sync(shared.clone(), |fd| rustix::fs::fdatasync(fd)));
                synced = offset;
            }
        }
        self.write_unwritten(&mut unwritten, &file, shared.as_ref(), &shown)?;
        if let Some(sync) = syncing.take() {
            waiting(&mut self.report.sync_wait, || sync.synced()).map_err(io_err("sync", &shown))?;
        }
        self.set_file_metadata(&file, new).map_err(io_err("set metadata of", &shown))?;
        self.report.files_written += 1;
        self.report.bytes_written += new.size;
        let unnamed = unnamed.then(|| OwnedFd::from(file));
        self.stage(tmp, unnamed, new, new.chunks.clone(), replaces)?;
        Ok(true)
    }

    /// Writes the chunks gathered in `unwritten` to the end of `file` (see [`make::write_pieces`]),
    /// then hands those that came from the source back to it (a large file's, `shared`).
    fn write_unwritten(
        &mut self,
        unwritten: &mut Unwritten,
        file: &File,
        shared: Option<&Arc<File>>,
        shown: &str,
    ) -> Result<(), ApplyError> {
        let Unwritten { pieces, fetched, .. } = std::mem::take(unwritten);
        make::write_pieces(file, &pieces).map_err(|e| ApplyError::Io {
            op: "write",
            path: shown.to_owned(),
            source: e,
        })?;
        if let Some(shared) = shared {
            for (hash, offset) in fetched {
                self.source.written(&hash, shared, offset);
            }
        }
        Ok(())
    }

    /// Stages a small file made by the maker: its bytes are gathered (and checked) here, the file is
    /// created, written and given its metadata on the maker's thread, and collected before the batch
    /// is synced.
    fn give_file(&mut self, new: &Entry, tmp: Vec<u8>, shown: String, replaces: bool) -> Result<bool, ApplyError> {
        let mut pieces = Vec::with_capacity(new.chunks.len());
        let mut offset = 0u64;
        for chunk in &new.chunks {
            if let Err(why) = self.get_chunk(new, offset, chunk) {
                // Nothing was created: the entry fails and the round goes on.
                self.fail(&new.path, why);
                return Ok(false);
            }
            pieces.push(self.buf.take());
            offset += u64::from(chunk.len);
        }
        let dir = if self.no_tmpfile { None } else { self.parent_dir(&new.path).ok() };
        let job = Job {
            slot: self.batch.staged.len(),
            dir,
            tmp: tmp.clone(),
            pieces,
            owner: self.owner_of(new),
            mode: new.mode,
            mtime_ns: new.mtime_ns,
            shown,
        };
        let maker = self.maker.as_mut().expect("give_file is called with a maker");
        maker.give(job);
        self.report.files_written += 1;
        self.report.bytes_written += new.size;
        self.stage(tmp, None, new, new.chunks.clone(), replaces)?;
        Ok(true)
    }

    /// Waits for the maker's files of the batch being staged and puts each in its place there.
    fn collect_made(&mut self) -> Result<(), ApplyError> {
        let Some(maker) = self.maker.as_mut() else { return Ok(()) };
        while maker.pending() > 0 {
            let (slot, made) = waiting(&mut self.report.make_wait, || maker.collect())?;
            self.no_tmpfile |= made.no_tmpfile;
            self.batch.staged[slot].unnamed = made.unnamed;
        }
        Ok(())
    }

    /// An unnamed file in the folder that will hold `path`, or `None` where `O_TMPFILE` is not
    /// available (then the file is built under a name in the staging folder).
    fn create_unnamed(&mut self, path: &RelPath) -> Option<OwnedFd> {
        if self.no_tmpfile {
            return None;
        }
        let dir = self.parent_dir(path).ok()?;
        match open_unnamed(&*dir) {
            Ok(fd) => Some(fd),
            Err(e) => {
                if no_tmpfile(e) {
                    tracing::debug!("O_TMPFILE is not supported here; files are built in the staging folder");
                    self.no_tmpfile = true;
                }
                None
            }
        }
    }

    /// Puts a chunk's verified bytes into `self.buf`: from the chunk source if it holds them at hand,
    /// else from the target if the index knows where they are and they still hash right, else from
    /// the chunk source. Returns whether the chunk came from the chunk source (`false`: the target).
    fn get_chunk(&mut self, entry: &Entry, offset: u64, chunk: &ChunkRef) -> Result<bool, String> {
        // What was asked for and arrived needs no index lookup: in a first round that is every chunk,
        // and the lookup was an eighth of the applying thread's time.
        let local = if self.source.holds(&chunk.hash) {
            None
        } else {
            self.index.get(&chunk.hash).map_err(|e| e.to_string())?
        };
        if let Some(location) = local {
            if self.read_local(&location, &chunk.hash) {
                self.report.chunks_local += 1;
                self.report.bytes_local += u64::from(chunk.len);
                return Ok(false);
            }
            let _ = self.index.remove(&chunk.hash);
        }
        let fetched = self.source.fetch(entry, offset, chunk, &mut self.buf).map_err(|e| e.to_string())?;
        if self.buf.len() != chunk.len as usize
            || (fetched == Fetched::Unchecked && ChunkHash::of(&self.buf) != chunk.hash)
        {
            return Err(format!(
                "chunk {} at offset {offset} does not match its hash: the source changed since it was \
                 scanned, or the data was damaged on the way; left for the next round",
                chunk.hash.short()
            ));
        }
        self.report.chunks_fetched += 1;
        self.report.bytes_fetched += u64::from(chunk.len);
        Ok(true)
    }

    fn read_local(&mut self, location: &ChunkLocation, hash: &ChunkHash) -> bool {
        if self.local_file.as_ref().is_none_or(|(p, _)| *p != location.path) {
            self.local_file = self.root.open_file(&location.path).ok().map(|f| (location.path.clone(), f));
        }
        let Some((_, file)) = &self.local_file else { return false };
        let buf = self.buf.owned();
        buf.resize(location.len as usize, 0);
        file.read_exact_at(buf, location.offset).is_ok() && ChunkHash::of(buf) == *hash
    }

    fn leave(&mut self, frame: Frame, committed: &mut ManifestWriter) -> Result<(), ApplyError> {
        match frame.leave {
            Leave::Keep(entry) if frame.dirty => {
                self.batch.dirs.push(DoneFolder { path: frame.path, mtime_ns: entry.mtime_ns, metadata: None });
            }
            Leave::Keep(_) | Leave::Failed => {}
            Leave::Update(entry) => {
                let metadata = Some((self.owner_of(&entry), entry.mode));
                self.batch.dirs.push(DoneFolder { path: frame.path, mtime_ns: entry.mtime_ns, metadata });
            }
            Leave::Delete => {
                if self.rmdir(&frame.path)? {
                    self.report.deleted += 1;
                } else {
                    tracing::info!("kept folder {}: it holds files ferry did not write", frame.path);
                    self.report.kept += 1;
                }
            }
            Leave::Replace { old, new } => {
                if !self.rmdir(&frame.path)? {
                    self.fail(&frame.path, "was a folder and holds files ferry did not write; not replaced");
                    committed.push(&old)?;
                } else if self.place_non_dir(None, &new, None)? {
                    self.report.deleted += 1;
                    committed.push(&new)?;
                }
            }
        }
        Ok(())
    }

    /// Removes an empty folder; `Ok(false)` when it still holds something.
    fn rmdir(&mut self, path: &RelPath) -> Result<bool, ApplyError> {
        self.dir_cache = ParentDir::default();
        let dir = match self.parent_dir(path) {
            Ok(dir) => dir,
            Err(_) => return Ok(false),
        };
        match rustix::fs::unlinkat(&*dir, name_of(path).os(), AtFlags::REMOVEDIR) {
            Ok(()) => {
                self.mark_parent_dirty(path);
                Ok(true)
            }
            Err(Errno::NOTEMPTY | Errno::EXIST | Errno::NOENT | Errno::NOTDIR) => Ok(false),
            Err(e) => Err(io_err("remove folder", path)(e)),
        }
    }

    /// Makes the staged files durable with one sync (after the batch already syncing, if any), renames
    /// them into place, then sets the metadata of the folders that are done and records the new chunks'
    /// places in the index.
    fn flush(&mut self) -> Result<(), ApplyError> {
        self.settle()?;
        self.start_sync()?;
        self.settle()
    }

    /// Hands the current batch to a thread of its own that syncs it and puts it into place (the batch
    /// before it must be settled).
    fn start_sync(&mut self) -> Result<(), ApplyError> {
        debug_assert!(self.placing.is_none(), "one batch is put into place at a time");
        self.collect_made()?;
        let mut batch = std::mem::take(&mut self.batch);
        let paths = std::mem::take(&mut batch.by_path);
        let target = Target { root: self.root.clone(), staging: self.staging.clone(), index: self.index.clone() };
        if batch.staged.is_empty() && batch.touched.is_empty() {
            // Folders' metadata only: nothing to wait for.
            let placed = place(target, batch)?;
            self.place_spent.add(&placed.spent);
            return Ok(());
        }
        let work = Background::start("ferry-place", move || place(target, batch));
        self.placing = Some(Placing { paths, work });
        Ok(())
    }

    /// Waits for the batch being synced and put into place, if any.
    fn settle(&mut self) -> Result<(), ApplyError> {
        let Some(placing) = self.placing.take() else {
            return Ok(());
        };
        let started = Instant::now();
        let placed = placing.work.wait().unwrap_or_else(|| {
            let why = io::Error::other("the thread putting a batch into place stopped (a bug)");
            Err(ApplyError::Io { op: "put into place", path: self.root.path().display().to_string(), source: why })
        })?;
        // Waiting until the sync ended is waiting for the disk; after it, for the renames and the index.
        let now = Instant::now();
        let synced = placed.synced.clamp(started, now);
        self.report.sync_wait += synced - started;
        self.report.place_wait += now - synced;
        self.place_spent.add(&placed.spent);
        // The planner finds these in the index now: it need not remember asking for them, and its
        // memory stays bounded by what is in flight, not by the round's size.
        self.planner.forget(&placed.hashes);
        // A file we read chunks from may just have been replaced.
        self.local_file = None;
        Ok(())
    }
}

/// The folder that holds the last path asked about, kept open: sorted paths share parents.
#[derive(Default)]
struct ParentDir(Option<(RelPath, Arc<OwnedFd>)>);

impl ParentDir {
    /// The folder that holds `path`, opened beneath `root` unless it is the one kept.
    fn of(&mut self, root: &RootDir, path: &RelPath) -> io::Result<Arc<OwnedFd>> {
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
struct Target {
    root: Arc<RootDir>,
    staging: Arc<OwnedFd>,
    index: ChunkIndex,
}

/// Makes a batch's staged files durable with one `syncfs`, names each into its final path, sets the
/// metadata of the folders the batch finished and records the batch's chunks in the index; the
/// batch's descriptors are closed here too. Runs on a thread of its own beside the applier (see
/// [`Applier::begin_flush`]): it touches nothing the applier is still working on, since the walk has
/// left the folders whose metadata it sets, and the applier waits for it before linking to a file of
/// the batch or starting the next batch's sync.
fn place(target: Target, batch: Batch) -> Result<Placed, ApplyError> {
    let Target { root, staging, mut index } = target;
    if !batch.staged.is_empty() {
        rustix::fs::syncfs(&*staging).map_err(io_err("sync", root.path().display()))?;
    }
    // Which inode each entry is, durably, before any gets its name: whatever a crash leaves at a
    // final path, ferry knows it as its own.
    let mut placing = Vec::with_capacity(batch.staged.len());
    for staged in &batch.staged {
        let stat = match &staged.unnamed {
            Some(fd) => look_at(fd, "".as_ref()),
            None => look_at(&*staging, staged.tmp.os()),
        };
        placing.push((&staged.path, PlacedStat::placing(&stat.map_err(io_err("look at", &staged.path))?)));
    }
    if !placing.is_empty() {
        index.record_placing(placing)?;
    }
    let synced = Instant::now();
    let mut spent = PlaceTimes::default();
    let mut clock = synced;
    let mut lap = || crate::lap(&mut clock);
    let mut dir_cache = ParentDir::default();
    for staged in &batch.staged {
        let dir = &*dir_cache.of(&root, &staged.path).map_err(|e| ApplyError::Io {
            op: "open folder of",
            path: staged.path.to_string(),
            source: e,
        })?;
        let name = name_of(&staged.path).os();
        if let Some(fd) = &staged.unnamed {
            // A new path takes the file's first name directly; an existing one is replaced by a
            // rename, which is atomic.
            if !staged.replaces {
                match link_unnamed(fd, dir, name.as_encoded_bytes()) {
                    Ok(()) => continue,
                    Err(Errno::EXIST) => {}
                    Err(e) => return Err(io_err("link into place", &staged.path)(e)),
                }
            }
            link_unnamed(fd, &*staging, &staged.tmp).map_err(io_err("name", &staged.path))?;
        }
        rustix::fs::renameat(&*staging, staged.tmp.os(), dir, name)
            .map_err(io_err("rename into place", &staged.path))?;
    }
    spent.naming = lap();
    for folder in &batch.dirs {
        let path = &folder.path;
        let fd =
            root.open_dir(path).map_err(|e| ApplyError::Io { op: "open folder", path: path.to_string(), source: e })?;
        match folder.metadata {
            Some((owner, mode)) => {
                set_metadata(&fd, owner, mode, folder.mtime_ns).map_err(io_err("set metadata of folder", path))?
            }
            None => rustix::fs::futimens(&fd, &times(folder.mtime_ns)).map_err(io_err("set mtime of folder", path))?,
        }
    }
    spent.folders = lap();
    let mut locations = Vec::new();
    for staged in &batch.staged {
        let mut offset = 0u64;
        for chunk in &staged.chunks {
            locations.push((chunk.hash, ChunkLocation { path: staged.path.clone(), offset, len: chunk.len }));
            offset += u64::from(chunk.len);
        }
    }
    // What the disk says of each entry now that it is in place (after every rename of the batch: a
    // rename moves the ctime, of every name of a hard-linked file).
    let mut placed = Vec::with_capacity(batch.staged.len() + batch.touched.len());
    for path in batch.staged.iter().map(|s| &s.path).chain(&batch.touched) {
        let dir = dir_cache.of(&root, path).map_err(|e| ApplyError::Io {
            op: "open folder of",
            path: path.to_string(),
            source: e,
        })?;
        let stat = look_at(&*dir, name_of(path).os()).map_err(io_err("look at what was put in place at", path))?;
        placed.push((path, PlacedStat::of(&stat)));
    }
    if !locations.is_empty() || !placed.is_empty() {
        index.record(locations.iter().map(|(h, l)| (h, l)), placed, false)?;
    }
    let hashes = locations.into_iter().map(|(hash, _)| hash).collect();
    spent.index = lap();
    drop(batch);
    spent.closing = lap();
    Ok(Placed { synced, hashes, spent })
}

/// Work on a thread of its own while the applier goes on: a batch's sync and renames while the next
/// batch is staged ([`place`]), a large file's `fdatasync` while its next piece is written.
enum Background<T> {
    Running(std::thread::JoinHandle<Option<T>>),
    /// No thread could be spawned: the work ran in [`Background::start`].
    Done(T),
}

impl<T: Send + 'static> Background<T> {
    /// Starts `work` on a thread of its own, or runs it here and now when there is no thread to spare.
    fn start(name: &str, work: impl FnOnce() -> T + Send + 'static) -> Self {
        // Shared, so that it can still run here if the thread cannot be spawned.
        let work = Arc::new(std::sync::Mutex::new(Some(work)));
        let theirs = work.clone();
        let take = |work: &std::sync::Mutex<Option<_>>| work.lock().unwrap_or_else(|e| e.into_inner()).take();
        match std::thread::Builder::new().name(name.into()).spawn(move || take(&theirs).map(|work| work())) {
            Ok(thread) => Self::Running(thread),
            Err(_) => Self::Done(take(&work).expect("the thread that was not spawned took nothing")()),
        }
    }

    /// Whether the work has ended (a [`Background::wait`] would not wait).
    fn is_done(&self) -> bool {
        match self {
            Self::Running(thread) => thread.is_finished(),
            Self::Done(_) => true,
        }
    }

    /// Waits for the work's result; `None` if its thread panicked.
    fn wait(self) -> Option<T> {
        match self {
            Self::Running(thread) => thread.join().ok().flatten(),
            Self::Done(result) => Some(result),
        }
    }
}

/// A sync on a thread of its own.
type BackgroundSync = Background<Result<(), Errno>>;

impl BackgroundSync {
    /// Starts syncing `fd` with `sync` (see [`Background::start`]).
    fn sync<F: AsFd + Send + Sync + 'static>(fd: Arc<F>, sync: fn(BorrowedFd<'_>) -> Result<(), Errno>) -> Self {
        Background::start("ferry-sync", move || sync(fd.as_fd()))
    }

    /// Waits for the sync; a thread that panicked counts as a sync that failed.
    fn synced(self) -> Result<(), Errno> {
        self.wait().unwrap_or(Err(Errno::IO))
    }
}

/// Runs `wait` (for the disk, or for the thread that makes small files), adding how long it took to
/// `total`.
fn waiting<T>(total: &mut Duration, wait: impl FnOnce() -> T) -> T {
    let started = Instant::now();
    let result = wait();
    *total += started.elapsed();
    result
}

/// Raises the soft limit on open files to the hard limit (at most 65536); returns the limit in force.
fn raise_fd_limit() -> usize {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    let wanted = limit.maximum.unwrap_or(65536).min(65536);
    if limit.current.is_some_and(|c| c < wanted) {
        limit.current = Some(wanted);
        let _ = setrlimit(Resource::Nofile, limit);
    }
    getrlimit(Resource::Nofile).current.unwrap_or(1024) as usize
}

/// A new unnamed file (`O_TMPFILE`) in `dir`, private until it is linked to a name.
fn open_unnamed(dir: &impl AsFd) -> Result<OwnedFd, Errno> {
    rustix::fs::openat(dir, ".", OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC, Mode::from_raw_mode(0o600))
}

/// Whether `open_unnamed` failed because the filesystem has no `O_TMPFILE`.
fn no_tmpfile(error: Errno) -> bool {
    matches!(error, Errno::OPNOTSUPP | Errno::ISDIR | Errno::INVAL | Errno::NOSYS)
}

/// A new file named `tmp` in the staging folder (where there is no `O_TMPFILE`).
fn create_staged(staging: &impl AsFd, tmp: &[u8]) -> Result<OwnedFd, Errno> {
    rustix::fs::openat(
        staging,
        tmp.os(),
        OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
}

/// Sets a file's or folder's owner (`None`: left as it is), mode and mtime.
fn set_metadata(fd: &impl AsFd, owner: Option<(u32, u32)>, mode: u32, mtime_ns: i64) -> Result<(), Errno> {
    if let Some((uid, gid)) = owner {
        rustix::fs::fchown(fd, Some(rustix::fs::Uid::from_raw(uid)), Some(rustix::fs::Gid::from_raw(gid)))?;
    }
    // After chown, which clears setuid and setgid bits.
    rustix::fs::fchmod(fd, Mode::from_raw_mode(mode))?;
    rustix::fs::futimens(fd, &times(mtime_ns))
}

/// Gives an unnamed (`O_TMPFILE`) file a name in `dir`.
fn link_unnamed(fd: &OwnedFd, dir: impl std::os::fd::AsFd, name: &[u8]) -> Result<(), Errno> {
    match rustix::fs::linkat(fd, "", &dir, name.os(), AtFlags::EMPTY_PATH) {
        // Without CAP_DAC_READ_SEARCH, the /proc path is the documented way.
        Err(Errno::NOENT | Errno::PERM) => {
            let proc_path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(fd));
            rustix::fs::linkat(rustix::fs::CWD, proc_path.as_str(), &dir, name.os(), AtFlags::SYMLINK_FOLLOW)
        }
        other => other,
    }
}

fn name_of(path: &RelPath) -> &[u8] {
    path.file_name().unwrap_or(b".")
}

fn kind_of(file_type: Option<FileType>) -> Option<EntryKind> {
    match file_type? {
        FileType::RegularFile => Some(EntryKind::File),
        FileType::Directory => Some(EntryKind::Dir),
        FileType::Symlink => Some(EntryKind::Symlink),
        _ => None,
    }
}

fn times(mtime_ns: i64) -> Timestamps {
    Timestamps {
        last_access: Timespec { tv_sec: 0, tv_nsec: UTIME_OMIT },
        last_modification: Timespec {
            tv_sec: mtime_ns.div_euclid(1_000_000_000),
            tv_nsec: mtime_ns.rem_euclid(1_000_000_000) as _,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The applier writes what the source handed in last: bytes shared from the source, or its own
    /// buffer once the next chunk is read into it (never a stale shared chunk).
    #[test]
    fn a_chunk_buffer_holds_the_last_chunk_handed_in() {
        let mut buf = ChunkBuf::default();
        buf.owned().extend_from_slice(b"read");
        assert_eq!(&*buf, b"read");
        buf.share(Bytes::from_static(b"shared"));
        assert_eq!(&*buf, b"shared");
        let owned = buf.owned();
        owned.clear();
        owned.extend_from_slice(b"read again");
        assert_eq!(&*buf, b"read again");
    }

    #[test]
    fn a_background_sync_reports_back_what_the_disk_said() {
        let file = Arc::new(tempfile::tempfile().unwrap());
        std::io::Write::write_all(&mut &*file, b"some data").unwrap();
        BackgroundSync::sync(file, |fd| rustix::fs::fdatasync(fd)).synced().unwrap();
        // A socket cannot be synced: the error comes back from the thread to the waiter.
        let (socket, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let socket = Arc::new(OwnedFd::from(socket));
        assert_eq!(BackgroundSync::sync(socket, |fd| rustix::fs::fdatasync(fd)).synced(), Err(Errno::INVAL));
    }

    /// The applying loop applies on while a sync runs and flushes once it is done: `is_done` must
    /// say which, without waiting.
    #[test]
    fn a_background_sync_says_whether_it_is_done_without_waiting() {
        static RELEASED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        fn slow_sync(_: BorrowedFd<'_>) -> Result<(), Errno> {
            while !RELEASED.load(std::sync::atomic::Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(())
        }
        let sync = BackgroundSync::sync(Arc::new(tempfile::tempfile().unwrap()), slow_sync);
        std::thread::sleep(Duration::from_millis(20));
        assert!(!sync.is_done(), "done before the disk answered");
        RELEASED.store(true, std::sync::atomic::Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sync.is_done() {
            assert!(Instant::now() < deadline, "still syncing 10 s after the disk answered");
            std::thread::sleep(Duration::from_millis(1));
        }
        sync.synced().unwrap();
    }
}
