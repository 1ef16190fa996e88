//! [`ChunkIndex`]: where the destination already has the bytes of a chunk.
//!
//! A crash-safe B-tree on disk (redb) maps a chunk's hash to one place in the target that held those
//! bytes when they were written: path, offset, length. It is a hint, never trusted: every chunk read
//! from it is hashed again before use, so a file changed behind ferry's back costs a fetch, not a wrong
//! byte. Only the pages being used are in memory, whatever the number of chunks.
//!
//! A second table holds what the disk said of each file and symlink ferry put in the target, right
//! after it was put there ([`PlacedStat`]: inode and ctime). The kernel moves a ctime on every change and
//! no user can set it back, so an entry whose inode and ctime still match was not touched since:
//! that is how a round tells what ferry wrote from what someone else changed behind its back (see
//! [`check_target`](crate::check_target)).
//!
//! A third holds the chunks of large files that were being built when a round ended early: they lie
//! in the staging folder (`.ferry-staging/partial-…`) until a later round finishes the file or
//! commits without it (see `apply::partial`).

use std::path::Path;
use std::sync::Arc;

use redb::{Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use rustix::fs::Statx;
use serde::{Deserialize, Serialize};

use crate::hash::ChunkHash;
use crate::path::RelPath;

const CHUNKS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("chunks");
/// Path bytes → [`PlacedStat`] (postcard): what ferry put there, once it was in place.
const PLACED: TableDefinition<&[u8], &[u8]> = TableDefinition::new("placed");
/// Path bytes → the [`PlacedStat`]s (without a ctime) of the inodes about to be put there, recorded
/// durably before they get the name, and forgotten once [`PLACED`] has what is there. Apart from
/// [`PLACED`], and the last [`PLACING_KEPT`] of them, so that rounds stopped before their rename
/// leave the record of what is still there.
const PLACING: TableDefinition<&[u8], &[u8]> = TableDefinition::new("placing");

/// Chunk hash → [`PartialChunk`] (postcard): where in a partial file of the staging folder it lies.
const PARTIAL: TableDefinition<&[u8], &[u8]> = TableDefinition::new("partial");
/// A partial file's name → its [`PartialSeal`] (postcard), recorded with its chunks.
const PARTIAL_SEALS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("partial_seals");
/// Path bytes → [`IndexedFile`] (postcard): a file found in the target before a first round.
const INDEXED: TableDefinition<&[u8], &[u8]> = TableDefinition::new("indexed");

/// How many inodes about to be put at one path are remembered (one per round stopped in between).
const PLACING_KEPT: usize = 4;

/// What the index says of one path: what ferry put there, and what it was about to put there.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recorded {
    /// Put in place, with its ctime then.
    pub placed: Option<PlacedStat>,
    /// About to be put in place by rounds that may have stopped before or after the rename.
    pub placing: Vec<PlacedStat>,
}

impl Recorded {
    /// The record that speaks for `stat`: an inode being put in place if that is what is there,
    /// else what was put in place.
    pub fn for_stat(&self, stat: &Statx) -> Option<PlacedStat> {
        self.placing.iter().rev().find(|p| p.same_inode(stat)).copied().or(self.placed)
    }
}

/// redb's page cache. Pages beyond it are read again through the kernel's page cache: a lookup costs
/// a few microseconds more, and the destination's memory stays within its budget with millions of
/// chunks.
const CACHE_BYTES: usize = 16 << 20;

/// Where a chunk's bytes are in the target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkLocation {
    /// The file.
    pub path: RelPath,
    /// Where in the file.
    pub offset: u64,
    /// How many bytes.
    pub len: u32,
}

/// Where a chunk lies in a partial file of the staging folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct PartialChunk {
    /// The partial file's name in the staging folder (one component).
    name: Vec<u8>,
    offset: u64,
    len: u32,
}

/// What a partial file was when its chunks were last recorded: the disk's inode and ctime for it, how
/// far the chunks recorded reach from its start, synced, and a digest of their list. A later round
/// that finds the same inode and ctime (nothing wrote to it since) and a new entry whose first chunks
/// give the same digest keeps those bytes without reading them again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartialSeal {
    /// The file's inode.
    pub ino: u64,
    /// Its ctime, in nanoseconds since the Unix epoch, when the chunks were recorded.
    pub ctime_ns: i64,
    /// Its first `len` bytes are the recorded chunks, durable.
    pub len: u64,
    /// BLAKE3 over those chunks' hashes and lengths, in file order.
    pub digest: [u8; 32],
}

/// A file that was in the target before ferry's first round into it, as the indexing of what was
/// there read it: its inode, ctime and size then, and a digest of its chunk list. A file taken over
/// in place that is still that inode with that ctime is known to hold those chunks without being
/// read again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexedFile {
    /// The file's inode.
    pub ino: u64,
    /// Its ctime, in nanoseconds since the Unix epoch, as the indexing saw it.
    pub ctime_ns: i64,
    /// Its size.
    pub size: u64,
    /// BLAKE3 over its chunks' hashes and lengths, in order.
    pub digest: [u8; 32],
}

impl IndexedFile {
    /// What a scan's cache record says of a regular file it read, unless the record is not to be
    /// trusted (the file changed too close to the scan to be sure).
    pub fn of(record: &crate::scan::CacheRecord) -> Option<Self> {
        let entry = &record.entry;
        (record.trusted && entry.kind == crate::manifest::EntryKind::File).then(|| Self {
            ino: record.ino,
            ctime_ns: record.ctime_ns,
            size: entry.size,
            digest: crate::held::ChunkList::of(&entry.chunks),
        })
    }

    /// Whether the file held `chunks` when the indexing read it.
    pub fn held(&self, chunks: &[crate::manifest::ChunkRef]) -> bool {
        crate::held::ChunkList::of(chunks) == self.digest
    }

    /// Whether `stat` is still that file (the same inode, ctime and size) and it holds `chunks`.
    pub fn vouches_for(&self, stat: &Statx, chunks: &[crate::manifest::ChunkRef]) -> bool {
        (stat.stx_ino, nanos(&stat.stx_ctime), stat.stx_size) == (self.ino, self.ctime_ns, self.size)
            && self.held(chunks)
    }
}

/// What the disk said of an entry right after ferry put it in place (or found it as recorded).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacedStat {
    /// Its inode.
    pub ino: u64,
    /// When that inode was made (where the filesystem says): a freed inode number given to a new
    /// file is another file.
    pub btime_ns: Option<i64>,
    /// Its ctime, in nanoseconds since the Unix epoch; `None` while it is being put in place (the
    /// inode is recorded, durably, before the file gets its name, so that a crash right after the
    /// rename cannot leave a file of ferry's that ferry does not know as its own).
    pub ctime_ns: Option<i64>,
}

fn nanos(t: &rustix::fs::StatxTimestamp) -> i64 {
    t.tv_sec * 1_000_000_000 + i64::from(t.tv_nsec)
}

impl PlacedStat {
    /// The inode, birth time and ctime of `stat`.
    pub fn of(stat: &Statx) -> Self {
        let born = stat.stx_mask & rustix::fs::StatxFlags::BTIME.bits() != 0;
        Self {
            ino: stat.stx_ino,
            btime_ns: born.then(|| nanos(&stat.stx_btime)),
            ctime_ns: Some(nanos(&stat.stx_ctime)),
        }
    }

    /// The inode of `stat`, about to be put in place.
    pub fn placing(stat: &Statx) -> Self {
        Self { ctime_ns: None, ..Self::of(stat) }
    }

    /// Is `stat` the very inode ferry put there (not a new file given its number)?
    pub fn same_inode(&self, stat: &Statx) -> bool {
        let now = Self::of(stat);
        self.ino == now.ino && (self.btime_ns.is_none() || now.btime_ns.is_none() || self.btime_ns == now.btime_ns)
    }

    /// Is `stat` the inode ferry put there, with its ctime unmoved when that was recorded?
    pub fn matches(&self, stat: &Statx) -> bool {
        self.same_inode(stat) && self.ctime_ns.is_none_or(|c| Some(c) == Self::of(stat).ctime_ns)
    }
}

/// `lstat` of `name` in `dir` (`""` with `EMPTY_PATH`: `dir` itself), with the birth time.
pub(crate) fn look_at(dir: impl std::os::fd::AsFd, name: &std::ffi::OsStr) -> rustix::io::Result<Statx> {
    use rustix::fs::{AtFlags, StatxFlags};
    let flags = if name.is_empty() { AtFlags::EMPTY_PATH } else { AtFlags::SYMLINK_NOFOLLOW };
    rustix::fs::statx(dir, name, flags, StatxFlags::BASIC_STATS | StatxFlags::BTIME)
}

/// The chunk index could not be opened, read or written.
#[derive(Debug, thiserror::Error)]
#[error("chunk index {path}: {source}")]
pub struct IndexError {
    path: String,
    #[source]
    source: redb::Error,
}

impl IndexError {
    /// Whether the index's file is damaged (cut short, altered), not only unreadable for now.
    pub fn is_damaged(&self) -> bool {
        matches!(self.source, redb::Error::Corrupted(_))
    }
}

/// The destination's persistent map from chunk hash to a place that holds its bytes.
///
/// A clone is another handle on the same index: one thread can record chunks while another looks
/// them up (a lookup sees what the last finished insert recorded; redb runs one write at a time).
#[derive(Clone)]
pub struct ChunkIndex {
    db: Arc<Database>,
    path: Arc<str>,
}

impl std::fmt::Debug for ChunkIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkIndex").field("path", &self.path).finish()
    }
}

impl ChunkIndex {
    /// Opens the index at `path`, creating it if needed.
    pub fn open(path: &Path) -> Result<Self, IndexError> {
        let shown = path.display().to_string();
        let err = |e: redb::Error| IndexError { path: shown.clone(), source: e };
        let db = Database::builder().set_cache_size(CACHE_BYTES).create(path).map_err(|e| err(e.into()))?;
        let txn = db.begin_write().map_err(|e| err(e.into()))?;
        txn.open_table(CHUNKS).map_err(|e| err(e.into()))?;
        txn.open_table(PLACED).map_err(|e| err(e.into()))?;
        txn.open_table(PLACING).map_err(|e| err(e.into()))?;
        txn.open_table(PARTIAL).map_err(|e| err(e.into()))?;
        txn.open_table(PARTIAL_SEALS).map_err(|e| err(e.into()))?;
        txn.open_table(INDEXED).map_err(|e| err(e.into()))?;
        txn.commit().map_err(|e| err(e.into()))?;
        Ok(Self { db: Arc::new(db), path: shown.into() })
    }

    fn err(&self, e: impl Into<redb::Error>) -> IndexError {
        IndexError { path: self.path.to_string(), source: e.into() }
    }

    /// A write transaction; `durable`: its commit fsyncs (else it becomes durable with the next one
    /// that does; losing it in a crash only costs refetching).
    fn write(&self, durable: bool) -> Result<redb::WriteTransaction, IndexError> {
        let mut txn = self.db.begin_write().map_err(|e| self.err(e))?;
        if !durable {
            txn.set_durability(Durability::None).map_err(|e| self.err(redb::Error::from(e)))?;
        }
        Ok(txn)
    }

    /// Where the bytes of `hash` may be found: in the target, else in a partial file.
    pub fn get(&self, hash: &ChunkHash) -> Result<Option<ChunkLocation>, IndexError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        for (table, decode) in CHUNK_TABLES {
            let table = txn.open_table(table).map_err(|e| self.err(e))?;
            // An undecodable value is a stale hint, not an error: the chunk will be fetched.
            let value = table.get(&hash.as_bytes()[..]).map_err(|e| self.err(e))?;
            if let Some(location) = value.and_then(|value| decode(value.value())) {
                return Ok(Some(location));
            }
        }
        Ok(None)
    }

    /// Records chunks written and synced to the partial file `name` of the staging folder:
    /// `(hash, offset, len)`, and what the file is now (`seal`; `None` forgets what it was).
    /// `durable`: fsync before returning (else with the next durable write).
    pub fn record_partial(
        &mut self,
        name: &[u8],
        chunks: impl IntoIterator<Item = (ChunkHash, u64, u32)>,
        seal: Option<PartialSeal>,
        durable: bool,
    ) -> Result<(), IndexError> {
        let txn = self.write(durable)?;
        {
            let mut table = txn.open_table(PARTIAL).map_err(|e| self.err(e))?;
            let mut buf = Vec::new();
            for (hash, offset, len) in chunks {
                buf.clear();
                let partial = PartialChunk { name: name.to_vec(), offset, len };
                buf = postcard::to_extend(&partial, buf).unwrap_or_default();
                table.insert(&hash.as_bytes()[..], &buf[..]).map_err(|e| self.err(e))?;
            }
            let mut seals = txn.open_table(PARTIAL_SEALS).map_err(|e| self.err(e))?;
            match seal.and_then(|seal| postcard::to_stdvec(&seal).ok()) {
                Some(value) => seals.insert(name, &value[..]).map(drop),
                None => seals.remove(name).map(drop),
            }
            .map_err(|e| self.err(e))?;
        }
        txn.commit().map_err(|e| self.err(e))
    }

    /// What the partial file `name` was when its chunks were last recorded, if that is known.
    pub fn partial_seal(&self, name: &[u8]) -> Result<Option<PartialSeal>, IndexError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(PARTIAL_SEALS).map_err(|e| self.err(e))?;
        let value = table.get(name).map_err(|e| self.err(e))?;
        Ok(value.and_then(|value| postcard::from_bytes(value.value()).ok()))
    }

    /// Forgets the chunks of every partial file whose name is not in `present` (the staging folder's):
    /// one removed by hand leaves hints that the planner would trust and the applier could not read.
    /// Reads only the seals (one per partial file) unless one is gone.
    pub fn forget_partials_but(&mut self, present: &[Vec<u8>]) -> Result<(), IndexError> {
        let gone: Vec<Vec<u8>> = {
            let txn = self.db.begin_read().map_err(|e| self.err(e))?;
            let seals = txn.open_table(PARTIAL_SEALS).map_err(|e| self.err(e))?;
            if present.is_empty() {
                // Chunks recorded before seals were kept have none: all go with the last file.
                let partial = txn.open_table(PARTIAL).map_err(|e| self.err(e))?;
                let recorded =
                    !partial.is_empty().map_err(|e| self.err(e))? || !seals.is_empty().map_err(|e| self.err(e))?;
                return if recorded { self.forget_partials() } else { Ok(()) };
            }
            let mut gone = Vec::new();
            for seal in seals.iter().map_err(|e| self.err(e))? {
                let name = seal.map_err(|e| self.err(e))?.0.value().to_vec();
                if !present.contains(&name) {
                    gone.push(name);
                }
            }
            gone
        };
        if gone.is_empty() {
            return Ok(());
        }
        let txn = self.write(false)?;
        {
            let mut partial = txn.open_table(PARTIAL).map_err(|e| self.err(e))?;
            partial
                .retain(|_, value| {
                    postcard::from_bytes::<PartialChunk>(value).is_ok_and(|chunk| !gone.contains(&chunk.name))
                })
                .map_err(|e| self.err(e))?;
            let mut seals = txn.open_table(PARTIAL_SEALS).map_err(|e| self.err(e))?;
            for name in &gone {
                seals.remove(&name[..]).map_err(|e| self.err(e))?;
            }
        }
        txn.commit().map_err(|e| self.err(e))
    }

    /// Gives the chunks recorded of the partial file `from`, and its seal, to `to` (the file is about
    /// to be renamed so), forgetting what `to` had. Durable before it returns; a page of records at a
    /// time, so that a file of millions of chunks costs no more memory than a few.
    pub fn rename_partial(&mut self, from: &[u8], to: &[u8]) -> Result<(), IndexError> {
        use std::ops::Bound;
        const PAGE: usize = 4096;
        let txn = self.write(true)?;
        {
            let mut table = txn.open_table(PARTIAL).map_err(|e| self.err(e))?;
            let mut after: Option<Vec<u8>> = None;
            loop {
                let (mut page, mut last) = (Vec::new(), None);
                {
                    let bounds = match &after {
                        Some(key) => (Bound::Excluded(&key[..]), Bound::Unbounded),
                        None => (Bound::Unbounded, Bound::Unbounded),
                    };
                    for item in table.range::<&[u8]>(bounds).map_err(|e| self.err(e))?.take(PAGE) {
                        let (key, value) = item.map_err(|e| self.err(e))?;
                        let key = key.value().to_vec();
                        if let Ok(chunk) = postcard::from_bytes::<PartialChunk>(value.value())
                            && (chunk.name == from || chunk.name == to)
                        {
                            page.push((key.clone(), chunk));
                        }
                        last = Some(key);
                    }
                }
                let Some(last) = last else { break };
                for (key, mut chunk) in page {
                    if chunk.name == to {
                        table.remove(&key[..]).map_err(|e| self.err(e))?;
                        continue;
                    }
                    chunk.name = to.to_vec();
                    let value = postcard::to_stdvec(&chunk).unwrap_or_default();
                    table.insert(&key[..], &value[..]).map_err(|e| self.err(e))?;
                }
                after = Some(last);
            }
            let mut seals = txn.open_table(PARTIAL_SEALS).map_err(|e| self.err(e))?;
            let seal = seals.remove(from).map_err(|e| self.err(e))?.map(|value| value.value().to_vec());
            match seal {
                Some(seal) => seals.insert(to, &seal[..]).map(drop),
                None => seals.remove(to).map(drop),
            }
            .map_err(|e| self.err(e))?;
        }
        txn.commit().map_err(|e| self.err(e))
    }

    /// Forgets every chunk of every partial file (their files are being removed).
    pub fn forget_partials(&mut self) -> Result<(), IndexError> {
        let txn = self.write(false)?;
        for table in [PARTIAL, PARTIAL_SEALS] {
            txn.delete_table(table).map_err(|e| self.err(e))?;
            txn.open_table(table).map_err(|e| self.err(e))?;
        }
        txn.commit().map_err(|e| self.err(e))
    }

    /// Records files found in the target by the indexing before a first round (durability as for
    /// [`ChunkIndex::insert`]).
    pub fn record_indexed<'a>(
        &mut self,
        files: impl IntoIterator<Item = (&'a RelPath, IndexedFile)>,
        durable: bool,
    ) -> Result<(), IndexError> {
        let txn = self.write(durable)?;
        {
            let mut table = txn.open_table(INDEXED).map_err(|e| self.err(e))?;
            for (path, file) in files {
                let value = postcard::to_stdvec(&file).unwrap_or_default();
                table.insert(path.as_bytes(), &value[..]).map_err(|e| self.err(e))?;
            }
        }
        txn.commit().map_err(|e| self.err(e))
    }

    /// What the indexing before a first round found at `path`, if it found a file there.
    pub fn indexed(&self, path: &RelPath) -> Result<Option<IndexedFile>, IndexError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(INDEXED).map_err(|e| self.err(e))?;
        let value = table.get(path.as_bytes()).map_err(|e| self.err(e))?;
        Ok(value.and_then(|value| postcard::from_bytes(value.value()).ok()))
    }

    /// Whether the indexing before a first round recorded any file (an index that cannot be read
    /// recorded none).
    pub fn has_indexed(&self) -> bool {
        let txn = self.db.begin_read();
        let table = txn.ok().and_then(|txn| txn.open_table(INDEXED).ok());
        table.is_some_and(|table| table.is_empty().is_ok_and(|empty| !empty))
    }

    /// Forgets what the indexing before a first round found (that round has applied everything).
    pub fn forget_indexed(&mut self) -> Result<(), IndexError> {
        if !self.has_indexed() {
            return Ok(());
        }
        let txn = self.write(false)?;
        txn.delete_table(INDEXED).map_err(|e| self.err(e))?;
        txn.open_table(INDEXED).map_err(|e| self.err(e))?;
        txn.commit().map_err(|e| self.err(e))
    }

    /// Records where chunks now are. `durable`: fsync before returning; otherwise the batch becomes
    /// durable with the next durable one (losing it in a crash only costs refetching).
    pub fn insert<'a>(
        &mut self,
        items: impl IntoIterator<Item = (&'a ChunkHash, &'a ChunkLocation)>,
        durable: bool,
    ) -> Result<(), IndexError> {
        self.record(items, [], [], durable)
    }

    /// Records where chunks now are and what the disk said of the entries just put in place, and
    /// forgets what it said of the paths ferry removed (`gone`, first: a path removed and placed again
    /// keeps its new record), in one transaction (durability as for [`ChunkIndex::insert`]).
    pub fn record<'a>(
        &mut self,
        chunks: impl IntoIterator<Item = (&'a ChunkHash, &'a ChunkLocation)>,
        placed: impl IntoIterator<Item = (&'a RelPath, PlacedStat)>,
        gone: impl IntoIterator<Item = &'a RelPath>,
        durable: bool,
    ) -> Result<(), IndexError> {
        let txn = self.write(durable)?;
        {
            let mut table = txn.open_table(CHUNKS).map_err(|e| self.err(e))?;
            let mut buf = Vec::new();
            for (hash, location) in chunks {
                buf.clear();
                buf = postcard::to_extend(location, buf).unwrap_or_default();
                table.insert(&hash.as_bytes()[..], &buf[..]).map_err(|e| self.err(e))?;
            }
            let mut table = txn.open_table(PLACED).map_err(|e| self.err(e))?;
            let mut placing = txn.open_table(PLACING).map_err(|e| self.err(e))?;
            for path in gone {
                table.remove(path.as_bytes()).map_err(|e| self.err(e))?;
                placing.remove(path.as_bytes()).map_err(|e| self.err(e))?;
            }
            for (path, stat) in placed {
                buf.clear();
                buf = postcard::to_extend(&stat, buf).unwrap_or_default();
                table.insert(path.as_bytes(), &buf[..]).map_err(|e| self.err(e))?;
                placing.remove(path.as_bytes()).map_err(|e| self.err(e))?;
            }
        }
        txn.commit().map_err(|e| self.err(e))
    }

    /// Records, durably, the inodes about to be put in place at `paths`, before they get those names
    /// (see [`Recorded::placing`]).
    pub fn record_placing<'a>(
        &mut self,
        placing: impl IntoIterator<Item = (&'a RelPath, PlacedStat)>,
    ) -> Result<(), IndexError> {
        let txn = self.write(true)?;
        {
            let mut table = txn.open_table(PLACING).map_err(|e| self.err(e))?;
            let mut buf = Vec::new();
            for (path, stat) in placing {
                let mut list: Vec<PlacedStat> = match table.get(path.as_bytes()).map_err(|e| self.err(e))? {
                    Some(value) => postcard::from_bytes(value.value()).unwrap_or_default(),
                    None => Vec::new(),
                };
                list.retain(|p| *p != stat);
                list.push(stat);
                let excess = list.len().saturating_sub(PLACING_KEPT);
                list.drain(..excess);
                buf.clear();
                buf = postcard::to_extend(&list, buf).unwrap_or_default();
                table.insert(path.as_bytes(), &buf[..]).map_err(|e| self.err(e))?;
            }
        }
        txn.commit().map_err(|e| self.err(e))
    }

    /// What the index says of each of `paths`.
    pub fn placed<'a>(&self, paths: impl IntoIterator<Item = &'a RelPath>) -> Result<Vec<Recorded>, IndexError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let (placed, placing) =
            (txn.open_table(PLACED).map_err(|e| self.err(e))?, txn.open_table(PLACING).map_err(|e| self.err(e))?);
        // An undecodable record is no record: the entry is checked as if ferry had never seen it.
        let mut found = Vec::new();
        for path in paths {
            let placed = placed.get(path.as_bytes()).map_err(|e| self.err(e))?;
            let placing = placing.get(path.as_bytes()).map_err(|e| self.err(e))?;
            found.push(Recorded {
                placed: placed.and_then(|v| postcard::from_bytes(v.value()).ok()),
                placing: placing.and_then(|v| postcard::from_bytes(v.value()).ok()).unwrap_or_default(),
            });
        }
        Ok(found)
    }

    /// Forgets a hint that turned out wrong: `location`, where [`ChunkIndex::get`] said `hash` was.
    /// A hint recorded since (the chunk's file was just named into place) stays.
    pub fn remove(&mut self, hash: &ChunkHash, location: &ChunkLocation) -> Result<(), IndexError> {
        let txn = self.write(false)?;
        let key = &hash.as_bytes()[..];
        for (table, decode) in CHUNK_TABLES {
            let mut table = txn.open_table(table).map_err(|e| self.err(e))?;
            let stale = match table.get(key).map_err(|e| self.err(e))? {
                Some(value) => decode(value.value()).is_none_or(|found| found == *location),
                None => false,
            };
            if stale {
                table.remove(key).map_err(|e| self.err(e))?;
            }
        }
        txn.commit().map_err(|e| self.err(e))
    }

    /// Makes everything inserted so far durable.
    pub fn sync(&mut self) -> Result<(), IndexError> {
        self.insert(std::iter::empty(), true)
    }
}

/// Reads a value of one of the chunk tables as a location (`None`: a stale hint).
type Decode = fn(&[u8]) -> Option<ChunkLocation>;

/// A table keyed by chunk hash.
type ChunkTable = TableDefinition<'static, &'static [u8], &'static [u8]>;

/// The tables that say where a chunk is, in the order they are asked, each with how its values read.
const CHUNK_TABLES: [(ChunkTable, Decode); 2] =
    [(CHUNKS, |value| postcard::from_bytes(value).ok()), (PARTIAL, partial_location)];

/// A value of the partial table as a location (`None`: undecodable, a stale hint).
fn partial_location(value: &[u8]) -> Option<ChunkLocation> {
    let partial = postcard::from_bytes::<PartialChunk>(value).ok()?;
    Some(ChunkLocation { path: RelPath::staged(&partial.name)?, offset: partial.offset, len: partial.len })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.redb");
        let hash = ChunkHash::of(b"abc");
        let location = ChunkLocation { path: RelPath::new(&b"a/b"[..]).unwrap(), offset: 7, len: 3 };
        {
            let mut index = ChunkIndex::open(&path).unwrap();
            assert_eq!(index.get(&hash).unwrap(), None);
            index.insert([(&hash, &location)], false).unwrap();
            index.sync().unwrap();
        }
        let mut index = ChunkIndex::open(&path).unwrap();
        assert_eq!(index.get(&hash).unwrap(), Some(location.clone()));
        let elsewhere = ChunkLocation { offset: 8, ..location.clone() };
        index.remove(&hash, &elsewhere).unwrap();
        assert_eq!(index.get(&hash).unwrap(), Some(location.clone()), "a hint recorded since stays");
        index.remove(&hash, &location).unwrap();
        assert_eq!(index.get(&hash).unwrap(), None);
    }

    #[test]
    fn chunks_of_partial_files_are_found_in_the_staging_folder_until_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.redb");
        let (a, b) = (ChunkHash::of(b"a"), ChunkHash::of(b"b"));
        {
            let mut index = ChunkIndex::open(&path).unwrap();
            let seal = PartialSeal { ino: 12, ctime_ns: 34, len: 2, digest: [5; 32] };
            index.record_partial(b"partial-1", [(a, 0, 1), (b, 1, 1)], Some(seal), true).unwrap();
            // A name that is not one plain component is no hint.
            index.record_partial(b"../x", [(ChunkHash::of(b"c"), 0, 1)], None, true).unwrap();
        }
        let mut index = ChunkIndex::open(&path).unwrap();
        let staged = RelPath::staged(b"partial-1").unwrap();
        assert_eq!(staged.as_bytes(), b".ferry-staging/partial-1");
        assert_eq!(index.get(&b).unwrap(), Some(ChunkLocation { path: staged, offset: 1, len: 1 }));
        assert_eq!(index.get(&ChunkHash::of(b"c")).unwrap(), None);
        assert_eq!(index.partial_seal(b"partial-1").unwrap().map(|seal| seal.len), Some(2));
        // The target's copy of a chunk comes first.
        let placed = ChunkLocation { path: RelPath::new(&b"f"[..]).unwrap(), offset: 9, len: 1 };
        index.insert([(&a, &placed)], false).unwrap();
        assert_eq!(index.get(&a).unwrap(), Some(placed.clone()));
        index.remove(&a, &placed).unwrap();
        let partial = ChunkLocation { path: RelPath::staged(b"partial-1").unwrap(), offset: 0, len: 1 };
        assert_eq!(index.get(&a).unwrap(), Some(partial.clone()), "then the partial file's copy");
        index.remove(&a, &partial).unwrap();
        assert_eq!(index.get(&a).unwrap(), None);
        index.forget_partials().unwrap();
        assert_eq!(index.get(&b).unwrap(), None);
        assert_eq!(index.partial_seal(b"partial-1").unwrap(), None);
    }

    #[test]
    fn chunks_of_partial_files_that_are_gone_are_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let mut index = ChunkIndex::open(&dir.path().join("index.redb")).unwrap();
        let (a, b) = (ChunkHash::of(b"a"), ChunkHash::of(b"b"));
        let seal = PartialSeal { ino: 12, ctime_ns: 34, len: 1, digest: [5; 32] };
        index.record_partial(b"partial-1", [(a, 0, 1)], Some(seal), true).unwrap();
        index.record_partial(b"partial-2", [(b, 0, 1)], Some(seal), true).unwrap();
        index.forget_partials_but(&[b"partial-1".to_vec(), b"partial-2".to_vec()]).unwrap();
        assert!(index.get(&a).unwrap().is_some() && index.get(&b).unwrap().is_some(), "both are there");
        index.forget_partials_but(&[b"partial-1".to_vec()]).unwrap();
        assert!(index.get(&a).unwrap().is_some() && index.partial_seal(b"partial-1").unwrap().is_some());
        assert_eq!((index.get(&b).unwrap(), index.partial_seal(b"partial-2").unwrap()), (None, None));
        index.forget_partials_but(&[]).unwrap();
        assert_eq!((index.get(&a).unwrap(), index.partial_seal(b"partial-1").unwrap()), (None, None));
    }

    #[test]
    fn chunks_of_a_partial_file_renamed_are_found_under_its_new_name() {
        let dir = tempfile::tempdir().unwrap();
        let mut index = ChunkIndex::open(&dir.path().join("index.redb")).unwrap();
        let seal = PartialSeal { ino: 12, ctime_ns: 34, len: 1, digest: [5; 32] };
        // More chunks than a page, and some of a file already under the new name, which go.
        let chunks: Vec<_> = (0..5000u64).map(|i| (ChunkHash::of(&i.to_le_bytes()), i, 1)).collect();
        index.record_partial(b"partial-1", chunks.clone(), Some(seal), true).unwrap();
        let (other, stale) = (ChunkHash::of(b"other"), ChunkHash::of(b"stale"));
        index.record_partial(b"partial-2", [(other, 0, 1)], Some(seal), true).unwrap();
        index.record_partial(b"partial-1-was", [(stale, 0, 1)], None, true).unwrap();
        index.rename_partial(b"partial-1", b"partial-1-was").unwrap();
        let was = RelPath::staged(b"partial-1-was").unwrap();
        for (hash, offset, _) in [chunks[0], chunks[4097], chunks[4999]] {
            assert_eq!(index.get(&hash).unwrap(), Some(ChunkLocation { path: was.clone(), offset, len: 1 }));
        }
        assert_eq!(index.get(&stale).unwrap(), None);
        assert_eq!(index.get(&other).unwrap().map(|l| l.path), RelPath::staged(b"partial-2"));
        assert_eq!(index.partial_seal(b"partial-1").unwrap(), None);
        assert_eq!(index.partial_seal(b"partial-1-was").unwrap(), Some(seal));
    }

    #[test]
    fn placed_records_survive_reopen_and_are_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.redb");
        let (a, b) = (RelPath::new(&b"a"[..]).unwrap(), RelPath::new(&b"d/b"[..]).unwrap());
        {
            let mut index = ChunkIndex::open(&path).unwrap();
            let first = PlacedStat { ino: 1, btime_ns: None, ctime_ns: Some(10) };
            index.record([], [(&a, first), (&b, first)], [], false).unwrap();
            // Two rounds stopped before their rename of a.
            index.record_placing([(&a, PlacedStat { ino: 2, btime_ns: Some(5), ctime_ns: None })]).unwrap();
            index.record_placing([(&a, PlacedStat { ino: 4, btime_ns: Some(6), ctime_ns: None })]).unwrap();
            index.record_placing([(&b, PlacedStat { ino: 3, btime_ns: None, ctime_ns: None })]).unwrap();
            // In place: b's record replaces what was being placed.
            index.record([], [(&b, PlacedStat { ino: 3, btime_ns: None, ctime_ns: Some(30) })], [], true).unwrap();
        }
        let first = PlacedStat { ino: 1, btime_ns: None, ctime_ns: Some(10) };
        let index = ChunkIndex::open(&path).unwrap();
        let unknown = RelPath::new(&b"c"[..]).unwrap();
        let placing_a = vec![
            PlacedStat { ino: 2, btime_ns: Some(5), ctime_ns: None },
            PlacedStat { ino: 4, btime_ns: Some(6), ctime_ns: None },
        ];
        assert_eq!(
            index.placed([&a, &unknown, &b]).unwrap(),
            vec![
                // The round stopped: what was there keeps its record beside what was being placed.
                Recorded { placed: Some(first), placing: placing_a },
                Recorded::default(),
                Recorded { placed: Some(PlacedStat { ino: 3, btime_ns: None, ctime_ns: Some(30) }), placing: vec![] },
            ]
        );
    }

    #[test]
    fn a_file_found_by_the_indexing_is_vouched_for_until_it_changes_and_then_forgotten() {
        use crate::manifest::{ChunkRef, Entry, EntryKind};
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"what was there").unwrap();
        let chunks = vec![ChunkRef { hash: ChunkHash::of(b"what was there"), len: 14 }];
        let stat = || look_at(rustix::fs::CWD, file.as_os_str()).unwrap();
        let ctime_ns = nanos(&stat().stx_ctime);
        let entry =
            Entry { size: 14, chunks: chunks.clone(), ..Entry::new(RelPath::new(&b"f"[..]).unwrap(), EntryKind::File) };
        let record = crate::scan::CacheRecord { entry, ino: stat().stx_ino, ctime_ns, trusted: true };
        assert!(IndexedFile::of(&crate::scan::CacheRecord { trusted: false, ..record.clone() }).is_none());
        let found = IndexedFile::of(&record).unwrap();
        assert!(found.vouches_for(&stat(), &chunks));
        let other = vec![ChunkRef { hash: ChunkHash::of(b"something else"), len: 14 }];
        assert!(!found.vouches_for(&stat(), &other), "another chunk list");
        // Written to since, with the same length: its ctime moved.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&file, b"what is there!").unwrap();
        assert!(!found.vouches_for(&stat(), &chunks), "a file changed since the indexing");

        let mut index = ChunkIndex::open(&dir.path().join("index.redb")).unwrap();
        let path = RelPath::new(&b"f"[..]).unwrap();
        assert!(!index.has_indexed());
        index.record_indexed([(&path, found)], true).unwrap();
        assert!(index.has_indexed());
        assert_eq!(index.indexed(&path).unwrap(), Some(found));
        index.forget_indexed().unwrap();
        assert_eq!((index.indexed(&path).unwrap(), index.has_indexed()), (None, false));
    }
}
