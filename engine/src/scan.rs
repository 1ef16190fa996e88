//! The source side: walk a tree in sorted order, reuse what the last scan knew, read and chunk the rest.
//!
//! The walk is depth-first with each folder's children sorted by name, which is manifest order, so the
//! new manifest is written as it goes and last scan's cache is merged in one pass: memory depends on
//! the depth and width of folders and on the batch size, not on the number of files. Batches of entries
//! are stat'ed, read and hashed in parallel (rayon) and written out in order.
//!
//! A file whose size, mtime, ctime and inode match the last scan's record is not read: its chunk list is
//! reused, and when the record describes the file exactly, the record's stored bytes are copied to the
//! new cache and manifest without being decoded. A file that changes while it is read (its `fstat`
//! before and after differ) or that is swapped for something else between the walk and the read is
//! never recorded torn: its previous version (if any) stays in the manifest, and it is reported so that
//! the next round picks it up.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rayon::prelude::*;
use rustix::fs::{AtFlags, FileType, Mode, OFlags, Stat};
use serde::{Deserialize, Serialize};

use crate::chunker::{ChunkerConfig, ReadBuffers, hash_reader};
use crate::hash::RootHash;
use crate::manifest::{ChunkRef, Entry, EntryKind, Keyed, ManifestWriter, RecordFileError, RecordReader, RecordWriter};
use crate::owner::OwnerNames;
use crate::path::{RelPath, STAGING_DIR};
use crate::rootdir::NameExt;

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
}

impl Default for ScanOptions {
    fn default() -> Self {
        Self { chunker: ChunkerConfig::DEFAULT, batch: 512, after_read: None }
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
pub struct SettledBefore(i64);

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
    fn changed(&mut self, path: &RelPath) {
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

    /// Adds the paths `other` skipped to this report's.
    fn absorb_skips(&mut self, other: ScanReport) {
        self.skipped_count += other.skipped_count;
        self.skipped_special += other.skipped_special;
        let room = 100usize.saturating_sub(self.skipped.len());
        self.skipped.extend(other.skipped.into_iter().take(room));
    }

    fn skip(&mut self, path: &RelPath, why: impl std::fmt::Display) {
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
    /// Writing the new manifest or cache failed.
    #[error(transparent)]
    Output(#[from] RecordFileError),
    /// The scan's threads could not be started.
    #[error("cannot start the scan's threads: {0}")]
    Threads(io::Error),
}

/// Scans `root`, writing its manifest to `manifest_out` and the quick-check cache for next time to
/// `cache_out`. `cache_in` is the last scan's cache, if any (a damaged one is ignored with a warning).
///
/// The manifest is whole at `manifest_out` but not fsynced: it is a working file until the caller
/// keeps it ([`crate::sync_record_file`]). The cache is durable; when it holds the same records as the
/// one already at `cache_out` (nothing changed), that one is kept and nothing is written.
pub fn scan(
    root: &Path,
    cache_in: Option<&Path>,
    manifest_out: &Path,
    cache_out: &Path,
    options: &ScanOptions,
) -> Result<ScanReport, ScanError> {
    let started = Instant::now();
    let settled_before = SettledBefore::scan_at(SystemTime::now());
    // Anything modified after that may change again without its timestamps moving: such records are
    // not trusted next time.
    let racy_after_ns = settled_before.0;
    let root_fd = rustix::fs::open(root, OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| ScanError::OpenRoot { path: root.display().to_string(), source: e.into() })?;
    let walker = Walker::new(Arc::new(root_fd), cache_in);
    let mut manifest = ManifestWriter::create(manifest_out)?;
    let mut cache = RecordWriter::<CacheRecord>::create(cache_out)?;
    let mut report = ScanReport { settled_before, ..ScanReport::default() };
    let mut names = OwnerNames::default();
    let mut hard_links: HashMap<(u64, u64), (RelPath, Vec<ChunkRef>)> = HashMap::new();

    // Three stages, each on its own thread, so that they overlap: the walk (listing folders, reading
    // the last scan's cache), the examination of each entry (stat, and reading what changed; in
    // parallel), and here the writing of the new manifest and cache. Batches keep manifest order.
    // When a stage stops (an error here), the channel it held closes and the stages before it stop.
    let (walked_tx, walked_rx) = std::sync::mpsc::sync_channel::<Vec<WalkItem>>(2);
    let (examined_tx, examined_rx) = std::sync::mpsc::sync_channel::<Vec<(WalkItem, Outcome)>>(2);
    let written = std::thread::scope(|scope| {
        let thread = |name: &str| std::thread::Builder::new().name(name.into());
        let walk = thread("ferry-walk")
            .spawn_scoped(scope, move || walk_in_batches(walker, options.batch, &walked_tx))
            .map_err(ScanError::Threads)?;
        thread("ferry-examine")
            .spawn_scoped(scope, move || {
                for batch in walked_rx {
                    let outcomes: Vec<(WalkItem, Outcome)> = batch
                        .into_par_iter()
                        .map(|mut item| {
                            let outcome = examine(&mut item, options);
                            (item, outcome)
                        })
                        .collect();
                    if examined_tx.send(outcomes).is_err() {
                        break;
                    }
                }
            })
            .map_err(ScanError::Threads)?;
        let mut state = WriteState {
            report: &mut report,
            names: &mut names,
            hard_links: &mut hard_links,
            manifest: &mut manifest,
            cache: &mut cache,
            cache_in: cache_in.unwrap_or(Path::new("")),
            racy_after_ns,
        };
        let written =
            examined_rx.into_iter().flatten().try_for_each(|(item, outcome)| write_outcome(item, outcome, &mut state));
        // The walk's own findings (folders it could not list) join the report.
        let walked = walk.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        report.absorb_skips(walked);
        written
    });
    written?;
    report.root_hash = Some(manifest.finish_unsynced()?);
    cache.finish_or_keep()?;
    report.duration = started.elapsed();
    Ok(report)
}

/// The walk's stage: hands out batches of `batch` items in manifest order until the tree is walked or
/// the next stage stops listening. Returns what it had to skip.
fn walk_in_batches(mut walker: Walker, batch: usize, out: &std::sync::mpsc::SyncSender<Vec<WalkItem>>) -> ScanReport {
    let mut report = ScanReport::default();
    loop {
        let mut items = Vec::with_capacity(batch);
        while items.len() < batch {
            match walker.next_item(&mut report) {
                Some(item) => items.push(item),
                None => break,
            }
        }
        if items.is_empty() || out.send(items).is_err() {
            return report;
        }
    }
}

/// What the writing stage keeps from one entry to the next.
struct WriteState<'a> {
    report: &'a mut ScanReport,
    names: &'a mut OwnerNames,
    /// The first path seen of each inode with more than one link, and its chunks.
    hard_links: &'a mut HashMap<(u64, u64), (RelPath, Vec<ChunkRef>)>,
    manifest: &'a mut ManifestWriter,
    cache: &'a mut RecordWriter<CacheRecord>,
    /// The last scan's cache (for errors).
    cache_in: &'a Path,
    racy_after_ns: i64,
}

/// Were both times before `racy_after_ns`? Then a record of them is trusted next time.
fn settled(racy_after_ns: i64, mtime_ns: i64, ctime_ns: i64) -> bool {
    mtime_ns < racy_after_ns && ctime_ns < racy_after_ns
}

/// Records what examining `item` found: in the manifest and the cache, or in the report.
fn write_outcome(item: WalkItem, outcome: Outcome, state: &mut WriteState<'_>) -> Result<(), ScanError> {
    let report = &mut *state.report;
    let record = match outcome {
        Outcome::Kept { stat } => return keep_stored(item, stat, state),
        Outcome::Found { mut entry, stat, was_read, bytes_read } => {
            if was_read {
                report.files_read += 1;
                report.bytes_read += bytes_read;
            }
            entry.user = state.names.user(entry.uid);
            entry.group = state.names.group(entry.gid);
            if entry.kind == EntryKind::File && stat.st_nlink > 1 {
                let key = (stat.st_dev, stat.st_ino);
                match state.hard_links.get(&key) {
                    Some((leader, chunks)) => {
                        entry.hard_link_to = Some(leader.clone());
                        entry.chunks.clone_from(chunks);
                    }
                    None => {
                        state.hard_links.insert(key, (entry.path.clone(), entry.chunks.clone()));
                    }
                }
            }
            let ctime_ns = stat_ctime_ns(&stat);
            let trusted = settled(state.racy_after_ns, entry.mtime_ns, ctime_ns);
            Some(CacheRecord { entry, ino: stat.st_ino, ctime_ns, trusted })
        }
        Outcome::Changed => {
            report.changed(&item.path);
            tracing::warn!("{} changed while it was read; it is left for the next round", item.path);
            item.cached_record()
                .filter(|c| c.entry.kind == EntryKind::File)
                .map(|c| CacheRecord { trusted: false, ..c })
        }
        Outcome::Vanished => None,
        Outcome::Skipped(why) => {
            report.skip(&item.path, why);
            report.skipped_special += 1;
            None
        }
        Outcome::Unreadable(why) => {
            report.skip(&item.path, &why);
            item.cached_record().map(|c| CacheRecord { trusted: false, ..c })
        }
    };
    if let Some(record) = record {
        report.entries += 1;
        if record.entry.kind == EntryKind::File {
            report.files += 1;
            report.file_bytes += record.entry.size;
        }
        state.manifest.push(&record.entry)?;
        state.cache.push(&record)?;
    }
    Ok(())
}

/// Records a file found as the last scan left it ([`Outcome::Kept`]): its stored record is copied to
/// the new cache, and the entry that begins it to the manifest, without decoding its chunks or
/// encoding them again. Only when the record is exactly what a new one would be: the owner's names
/// are looked up anew (a renamed user changes the entry, not the file) and the record must still be
/// trusted; otherwise it is decoded and written as any other found file.
fn keep_stored(item: WalkItem, stat: Stat, state: &mut WriteState<'_>) -> Result<(), ScanError> {
    let bytes = item.cached.as_deref().unwrap_or_default();
    if let Some(stored) = StoredRecord::decode(bytes)
        && stored.entry.user == state.names.user_name(stored.entry.uid)
        && stored.entry.group == state.names.group_name(stored.entry.gid)
        && settled(state.racy_after_ns, stored.entry.mtime_ns, stored.ctime_ns)
    {
        let report = &mut *state.report;
        report.entries += 1;
        report.files += 1;
        report.file_bytes += stored.entry.size;
        state.manifest.push_bytes(&bytes[..stored.entry_len])?;
        state.cache.push_bytes(bytes)?;
        return Ok(());
    }
    // Examining the file decoded this record; only a bug could make the whole of it undecodable.
    let Some(record) = item.cached_record() else {
        return Err(ScanError::Output(RecordFileError::Corrupt {
            path: state.cache_in.to_owned(),
            reason: format!("undecodable record for {}", item.path),
        }));
    };
    let outcome = Outcome::Found { entry: record.entry, stat, was_read: false, bytes_read: 0 };
    write_outcome(item, outcome, state)
}

fn to_ns(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i64,
        Err(e) => -(e.duration().as_nanos() as i64),
    }
}

pub(crate) fn stat_mtime_ns(stat: &Stat) -> i64 {
    stat.st_mtime.saturating_mul(1_000_000_000).saturating_add(stat.st_mtime_nsec as i64)
}

fn stat_ctime_ns(stat: &Stat) -> i64 {
    stat.st_ctime.saturating_mul(1_000_000_000).saturating_add(stat.st_ctime_nsec as i64)
}

/// One path found by the walk, not yet examined.
struct WalkItem {
    /// The folder that holds it (for the root: the root itself, with an empty name).
    parent: Arc<OwnedFd>,
    name: Vec<u8>,
    path: RelPath,
    /// The last scan's record of this path, as it is stored ([`StoredRecord`] reads it).
    cached: Option<Vec<u8>>,
}

impl WalkItem {
    /// The last scan's record of this path, decoded whole.
    fn cached_record(&self) -> Option<CacheRecord> {
        postcard::from_bytes(self.cached.as_deref()?).ok()
    }
}

/// The fields of a stored [`CacheRecord`] that tell whether its file changed, read in place: the
/// chunk list is stepped over, not collected. Postcard encodes a struct's fields in order, so the
/// record's bytes begin with its entry's, as a manifest stores it.
struct StoredRecord<'a> {
    entry: StoredEntry<'a>,
    /// How many of the record's bytes are its entry's.
    entry_len: usize,
    ino: u64,
    ctime_ns: i64,
    trusted: bool,
}

/// [`Entry`]'s fields, in its order and with its encodings, borrowed.
#[derive(Deserialize)]
struct StoredEntry<'a> {
    /// Stepped over: the walk matched it already.
    #[serde(borrow)]
    _path: &'a [u8],
    kind: EntryKind,
    mode: u32,
    uid: u32,
    gid: u32,
    #[serde(borrow)]
    user: Option<&'a str>,
    #[serde(borrow)]
    group: Option<&'a str>,
    mtime_ns: i64,
    size: u64,
    _chunks: SteppedOver,
    #[serde(borrow)]
    link_target: Option<&'a [u8]>,
    #[serde(borrow)]
    hard_link_to: Option<&'a [u8]>,
}

/// [`CacheRecord`]'s fields after its entry.
#[derive(Deserialize)]
struct StoredTail {
    ino: u64,
    ctime_ns: i64,
    trusted: bool,
}

/// A sequence of [`ChunkRef`]s, checked but not kept.
struct SteppedOver;

impl<'de> Deserialize<'de> for SteppedOver {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = SteppedOver;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a list of chunks")
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<SteppedOver, A::Error> {
                while seq.next_element::<ChunkRef>()?.is_some() {}
                Ok(SteppedOver)
            }
        }
        deserializer.deserialize_seq(Visitor)
    }
}

impl<'a> StoredRecord<'a> {
    /// Reads a record as [`RecordWriter`] stored it; `None` when it is not a whole [`CacheRecord`].
    fn decode(bytes: &'a [u8]) -> Option<Self> {
        let (entry, rest) = postcard::take_from_bytes::<StoredEntry<'a>>(bytes).ok()?;
        let entry_len = bytes.len() - rest.len();
        let (tail, rest) = postcard::take_from_bytes::<StoredTail>(rest).ok()?;
        rest.is_empty().then_some(Self {
            entry,
            entry_len,
            ino: tail.ino,
            ctime_ns: tail.ctime_ns,
            trusted: tail.trusted,
        })
    }

    /// The quick check: is the regular file of `stat` unchanged since this trusted record was
    /// made? Then its content is the record's chunks and it is not read again.
    fn unchanged(&self, stat: &Stat) -> bool {
        self.trusted
            && self.entry.kind == EntryKind::File
            && self.entry.size == stat.st_size as u64
            && self.entry.mtime_ns == stat_mtime_ns(stat)
            && self.ctime_ns == stat_ctime_ns(stat)
            && self.ino == stat.st_ino
    }

    /// Beyond [`StoredRecord::unchanged`], does the record describe the file exactly as a new one
    /// would (its mode and owner ids, one link, no hard-link leader)? Then it stands as it is.
    fn describes(&self, stat: &Stat) -> bool {
        let entry = &self.entry;
        self.unchanged(stat)
            && stat.st_nlink == 1
            && entry.mode == stat.st_mode & 0o7777
            && entry.uid == stat.st_uid
            && entry.gid == stat.st_gid
            && entry.link_target.is_none()
            && entry.hard_link_to.is_none()
    }
}

struct Frame {
    fd: Arc<OwnedFd>,
    path: RelPath,
    children: std::vec::IntoIter<(Vec<u8>, FileType)>,
}

struct Walker {
    stack: Vec<Frame>,
    root: Option<Arc<OwnedFd>>,
    cache: Option<RecordReader<CacheRecord>>,
    /// The cache's next record, read ahead: its path, and its bytes.
    next_cached: Option<(RelPath, Vec<u8>)>,
    /// Room for folder listings ([`read_children`]).
    listing: Vec<u8>,
}

impl Walker {
    fn new(root: Arc<OwnedFd>, cache_in: Option<&Path>) -> Self {
        let cache = cache_in.filter(|p| p.exists()).and_then(|p| match RecordReader::open(p) {
            Ok(reader) => Some(reader),
            Err(e) => {
                tracing::warn!("ignoring the scan cache ({e}); every file will be read");
                None
            }
        });
        Self {
            stack: Vec::new(),
            root: Some(root),
            cache,
            next_cached: None,
            listing: Vec::with_capacity(LISTING_BUFFER),
        }
    }

    /// The last scan's record for `path` as it is stored, if any. The cache is sorted, as the walk is.
    fn cached(&mut self, path: &RelPath) -> Option<Vec<u8>> {
        loop {
            if self.next_cached.is_none() {
                match self.cache.as_mut()?.next_headed() {
                    Ok(Some(record)) => self.next_cached = Some((record.path, record.bytes.to_vec())),
                    Ok(None) => {
                        self.cache = None;
                        return None;
                    }
                    Err(e) => {
                        tracing::warn!("scan cache unreadable from here on ({e}); the rest will be read");
                        self.cache = None;
                        return None;
                    }
                }
            }
            let (key, _) = self.next_cached.as_ref()?;
            match key.cmp(path) {
                std::cmp::Ordering::Less => self.next_cached = None,
                std::cmp::Ordering::Equal => return self.next_cached.take().map(|(_, bytes)| bytes),
                std::cmp::Ordering::Greater => return None,
            }
        }
    }

    fn push_dir(&mut self, fd: Arc<OwnedFd>, path: RelPath, report: &mut ScanReport) {
        let children = match read_children(&fd, &mut self.listing) {
            Ok(children) => children,
            Err(e) => {
                report.skip(&path, format_args!("cannot list folder: {e}"));
                Vec::new()
            }
        };
        self.stack.push(Frame { fd, path, children: children.into_iter() });
    }

    fn next_item(&mut self, report: &mut ScanReport) -> Option<WalkItem> {
        if let Some(root) = self.root.take() {
            let path = RelPath::root();
            let cached = self.cached(&path);
            self.push_dir(root.clone(), path.clone(), report);
            return Some(WalkItem { parent: root, name: Vec::new(), path, cached });
        }
        loop {
            let frame = self.stack.last_mut()?;
            let Some((name, file_type)) = frame.children.next() else {
                self.stack.pop();
                continue;
            };
            if frame.path.is_root() && name == STAGING_DIR.as_bytes() {
                report.skip(
                    &RelPath::root(),
                    format_args!("holds {STAGING_DIR}, a name ferry keeps for its own use; not copied"),
                );
                continue;
            }
            let parent = frame.fd.clone();
            let path = match frame.path.join(&name) {
                Ok(path) => path,
                Err(e) => {
                    let shown = RelPath::new(frame.path.as_bytes().to_vec()).unwrap_or_default();
                    report.skip(&shown, e);
                    continue;
                }
            };
            let cached = self.cached(&path);
            let is_dir = match file_type {
                FileType::Directory => true,
                FileType::Unknown => rustix::fs::statat(&*parent, name.os(), AtFlags::SYMLINK_NOFOLLOW)
                    .is_ok_and(|s| FileType::from_raw_mode(s.st_mode) == FileType::Directory),
                _ => false,
            };
            if is_dir {
                match rustix::fs::openat(
                    &*parent,
                    name.os(),
                    OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
                    Mode::empty(),
                ) {
                    Ok(fd) => self.push_dir(Arc::new(fd), path.clone(), report),
                    Err(e) => report.skip(&path, format_args!("cannot open folder: {e}")),
                }
            }
            return Some(WalkItem { parent, name, path, cached });
        }
    }
}

/// Room for the folder entries one `getdents64` returns: at least one of the longest name.
const LISTING_BUFFER: usize = 32 << 10;

/// The names and types in the folder `fd` (opened for this), sorted by name. `buf` is room for the
/// kernel's listing, reused from one folder to the next.
fn read_children(fd: &OwnedFd, buf: &mut Vec<u8>) -> io::Result<Vec<(Vec<u8>, FileType)>> {
    let mut dir = rustix::fs::RawDir::new(fd, buf.spare_capacity_mut());
    let mut children = Vec::new();
    while let Some(entry) = dir.next() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        children.push((name.to_vec(), entry.file_type()));
    }
    children.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    Ok(children)
}

#[allow(clippy::large_enum_variant)] // one per entry of a batch, moved once
enum Outcome {
    /// A regular file as the last scan recorded it: its stored record stands.
    Kept {
        stat: Stat,
    },
    Found {
        entry: Entry,
        stat: Stat,
        was_read: bool,
        bytes_read: u64,
    },
    /// Changed while being read, or swapped between the walk and the read.
    Changed,
    /// Gone before it could be looked at.
    Vanished,
    /// A kind ferry does not copy (device, FIFO, socket).
    Skipped(String),
    /// Could not be read (permissions, I/O error).
    Unreadable(String),
}

fn examine(item: &mut WalkItem, options: &ScanOptions) -> Outcome {
    let stat = if item.name.is_empty() {
        rustix::fs::fstat(&*item.parent)
    } else {
        rustix::fs::statat(&*item.parent, item.name.os(), AtFlags::SYMLINK_NOFOLLOW)
    };
    let stat = match stat {
        Ok(stat) => stat,
        Err(rustix::io::Errno::NOENT) => return Outcome::Vanished,
        Err(e) => return Outcome::Unreadable(format!("cannot stat: {e}")),
    };
    let kind = match FileType::from_raw_mode(stat.st_mode) {
        FileType::Directory => EntryKind::Dir,
        FileType::RegularFile => EntryKind::File,
        FileType::Symlink => EntryKind::Symlink,
        other => return Outcome::Skipped(format!("{other:?} is not copied")),
    };
    let mut entry = Entry {
        path: item.path.clone(),
        kind,
        mode: stat.st_mode & 0o7777,
        uid: stat.st_uid,
        gid: stat.st_gid,
        user: None,
        group: None,
        mtime_ns: stat_mtime_ns(&stat),
        size: 0,
        chunks: Vec::new(),
        link_target: None,
        hard_link_to: None,
    };
    match kind {
        EntryKind::Dir => Outcome::Found { entry, stat, was_read: false, bytes_read: 0 },
        EntryKind::Symlink => match rustix::fs::readlinkat(&*item.parent, item.name.os(), Vec::new()) {
            Ok(target) => {
                entry.link_target = Some(target.into_bytes());
                Outcome::Found { entry, stat, was_read: false, bytes_read: 0 }
            }
            Err(rustix::io::Errno::NOENT) => Outcome::Vanished,
            Err(e) => Outcome::Unreadable(format!("cannot read link: {e}")),
        },
        EntryKind::File => {
            let Some(stored) = item.cached.as_deref().and_then(StoredRecord::decode) else {
                return read_file(item, entry, &stat, options);
            };
            if stored.describes(&stat) {
                return Outcome::Kept { stat };
            }
            // A hard link's record names its group's first path, which may have moved; decoded whole.
            if stored.unchanged(&stat)
                && let Some(cached) = item.cached_record()
            {
                entry.size = cached.entry.size;
                entry.chunks = cached.entry.chunks;
                return Outcome::Found { entry, stat, was_read: false, bytes_read: 0 };
            }
            read_file(item, entry, &stat, options)
        }
    }
}

fn read_file(item: &WalkItem, mut entry: Entry, walked: &Stat, options: &ScanOptions) -> Outcome {
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
    let fd = match rustix::fs::openat(&*item.parent, item.name.os(), flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::NOENT) => return Outcome::Vanished,
        // ELOOP: it became a symlink since the walk; never followed.
        Err(rustix::io::Errno::LOOP) => return Outcome::Changed,
        Err(e) => return Outcome::Unreadable(format!("cannot open: {e}")),
    };
    let before = match rustix::fs::fstat(&fd) {
        Ok(stat) => stat,
        Err(e) => return Outcome::Unreadable(format!("cannot stat: {e}")),
    };
    if before.st_ino != walked.st_ino
        || before.st_dev != walked.st_dev
        || FileType::from_raw_mode(before.st_mode) != FileType::RegularFile
    {
        return Outcome::Changed;
    }
    let file = std::fs::File::from(fd);
    // Taken out, not borrowed: while `hash_reader` waits for its other half, rayon may run another
    // file's read on this thread.
    let mut bufs = READ_BUFFERS.take();
    let read = hash_reader(options.chunker, &file, &mut bufs);
    READ_BUFFERS.set(bufs);
    let (chunks, bytes_read) = match read {
        Ok(read) => read,
        Err(e) => return Outcome::Unreadable(format!("read error: {e}")),
    };
    if let Some(hook) = &options.after_read {
        hook(&item.path);
    }
    let after = match rustix::fs::fstat(file.as_fd()) {
        Ok(stat) => stat,
        Err(e) => return Outcome::Unreadable(format!("cannot stat: {e}")),
    };
    let unchanged = after.st_size == before.st_size
        && stat_mtime_ns(&after) == stat_mtime_ns(&before)
        && stat_ctime_ns(&after) == stat_ctime_ns(&before)
        && bytes_read == before.st_size as u64;
    if !unchanged {
        return Outcome::Changed;
    }
    entry.mode = before.st_mode & 0o7777;
    entry.uid = before.st_uid;
    entry.gid = before.st_gid;
    entry.mtime_ns = stat_mtime_ns(&before);
    entry.size = bytes_read;
    entry.chunks = chunks;
    Outcome::Found { entry, stat: before, was_read: true, bytes_read }
}

thread_local! {
    static READ_BUFFERS: std::cell::RefCell<ReadBuffers> = std::cell::RefCell::new(ReadBuffers::default());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::ChunkHash;

    fn record(user: Option<&str>, chunks: usize, links: bool) -> CacheRecord {
        let entry = Entry {
            path: RelPath::new(&b"accounts/0001/meta.json"[..]).unwrap(),
            kind: EntryKind::File,
            mode: 0o4751,
            uid: 1001,
            gid: 70_000,
            user: user.map(str::to_owned),
            group: Some("zimbra".into()),
            mtime_ns: -1_234_567_890_123,
            size: 300_000 * chunks as u64,
            chunks: (0..chunks)
                .map(|i| ChunkRef { hash: ChunkHash::of(&i.to_le_bytes()), len: 300_000 + i as u32 })
                .collect(),
            link_target: links.then(|| b"../elsewhere".to_vec()),
            hard_link_to: links.then(|| RelPath::new(&b"accounts/0000/meta.json"[..]).unwrap()),
        };
        CacheRecord { entry, ino: u64::MAX - 3, ctime_ns: 1_700_000_000_123_456_789, trusted: true }
    }

    #[test]
    fn a_stored_record_reads_as_the_record_it_stores() {
        for (user, chunks, links) in [(Some("zimbra"), 3, true), (None, 0, false), (Some(""), 1, false)] {
            let original = record(user, chunks, links);
            let bytes = postcard::to_allocvec(&original).unwrap();
            let stored = StoredRecord::decode(&bytes).unwrap();
            let entry = &original.entry;
            assert_eq!(&bytes[..stored.entry_len], &postcard::to_allocvec(entry).unwrap()[..]);
            assert_eq!(stored.entry.kind, entry.kind);
            assert_eq!((stored.entry.mode, stored.entry.uid, stored.entry.gid), (entry.mode, entry.uid, entry.gid));
            assert_eq!(stored.entry.user, entry.user.as_deref());
            assert_eq!(stored.entry.group, entry.group.as_deref());
            assert_eq!((stored.entry.mtime_ns, stored.entry.size), (entry.mtime_ns, entry.size));
            assert_eq!(stored.entry.link_target, entry.link_target.as_deref());
            assert_eq!(stored.entry.hard_link_to, entry.hard_link_to.as_ref().map(RelPath::as_bytes));
            assert_eq!((stored.ino, stored.ctime_ns, stored.trusted), (original.ino, original.ctime_ns, true));
            // Cut short or followed by more, it is not a record.
            assert!(StoredRecord::decode(&bytes[..bytes.len() - 1]).is_none());
            assert!(StoredRecord::decode(&[&bytes[..], &[0]].concat()).is_none());
        }
    }

    /// Scans `root` against the cache at `cache_in`, into `out`: the new manifest's root hash and the
    /// report.
    fn scan_into(root: &Path, cache_in: &Path, out: &Path) -> (RootHash, ScanReport) {
        std::fs::create_dir_all(out).unwrap();
        let report =
            scan(root, Some(cache_in), &out.join("manifest"), &out.join("cache"), &ScanOptions::default()).unwrap();
        (report.root_hash.unwrap(), report)
    }

    #[test]
    fn an_unchanged_file_keeps_its_records_and_its_owners_name_is_looked_up_again() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("tree");
        std::fs::create_dir_all(root.join("a")).unwrap();
        for i in 0..50 {
            std::fs::write(root.join(format!("a/f{i}")), vec![i as u8; 1000 + i]).unwrap();
        }
        // Records of files changed within the last second are not trusted; let the tree age.
        std::thread::sleep(Duration::from_millis(1100));
        let first = dir.path().join("first");
        let (first_root, report) = scan_into(&root, &dir.path().join("none"), &first);
        assert_eq!(report.files_read, 50);

        // Kept as stored: the same manifest and the same cache, byte for byte, nothing read.
        let second = dir.path().join("second");
        let (second_root, report) = scan_into(&root, &first.join("cache"), &second);
        assert_eq!((second_root, report.files_read, report.files), (first_root, 0, 50));
        assert_eq!(std::fs::read(second.join("cache")).unwrap(), std::fs::read(first.join("cache")).unwrap());
        assert_eq!(std::fs::read(second.join("manifest")).unwrap(), std::fs::read(first.join("manifest")).unwrap());

        // A cache whose records name another owner (a user renamed since): the files are not read
        // again, but their entries carry the name the system gives now.
        let renamed = dir.path().join("renamed-cache");
        let mut writer = RecordWriter::<CacheRecord>::create(&renamed).unwrap();
        for record in RecordReader::<CacheRecord>::open(&first.join("cache")).unwrap() {
            let mut record = record.unwrap();
            if record.entry.kind == EntryKind::File {
                record.entry.user = Some("someone-renamed".into());
            }
            writer.push(&record).unwrap();
        }
        writer.finish().unwrap();
        let third = dir.path().join("third");
        let (third_root, report) = scan_into(&root, &renamed, &third);
        assert_eq!((third_root, report.files_read), (first_root, 0));
        assert_eq!(std::fs::read(third.join("cache")).unwrap(), std::fs::read(first.join("cache")).unwrap());
        for entry in RecordReader::<Entry>::open(&third.join("manifest")).unwrap() {
            assert_ne!(entry.unwrap().user.as_deref(), Some("someone-renamed"));
        }

        // A file changed in place with its size and mtime restored: its ctime moved, so it is read.
        let path = root.join("a/f7");
        let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
        std::fs::write(&path, vec![0xee; 1007]).unwrap();
        std::fs::File::options().write(true).open(&path).unwrap().set_modified(mtime).unwrap();
        let fourth = dir.path().join("fourth");
        let (fourth_root, report) = scan_into(&root, &first.join("cache"), &fourth);
        assert_eq!(report.files_read, 1);
        assert_ne!(fourth_root, first_root);
    }
}
