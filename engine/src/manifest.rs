//! Manifests: the sorted entries of a tree at one round, stored as a stream of records with a root hash.
//!
//! A manifest file never has to fit in memory: [`RecordWriter`] appends entries one by one and
//! [`RecordReader`] reads them back one by one, checking the trailer (count and root hash) at the end,
//! so a truncated or altered file is an error, not a smaller tree. Two sorted manifests are compared in
//! one pass with [`MergeJoin`]; [`diff`] keeps only what changed, comparing entries as stored.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::hash::{ChunkHash, RootHash};
use crate::path::RelPath;

/// What an entry is. Postcard encodes the variant's index: never reorder, only append.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    /// A folder.
    Dir,
    /// A regular file.
    File,
    /// A symbolic link, stored verbatim and never followed.
    Symlink,
}

/// One chunk of a file: its name and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    /// The BLAKE3 hash of the chunk's bytes.
    pub hash: ChunkHash,
    /// Its length in bytes.
    pub len: u32,
}

/// One path of a tree with everything needed to recreate it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Where it is in the tree.
    pub path: RelPath,
    /// File, folder or symlink.
    pub kind: EntryKind,
    /// Permission bits, including setuid, setgid and sticky (`0o7777` at most).
    pub mode: u32,
    /// Numeric owner on the source.
    pub uid: u32,
    /// Numeric group on the source.
    pub gid: u32,
    /// Owner's name on the source, when it has one: used to map owners by name.
    pub user: Option<String>,
    /// Group's name on the source, when it has one.
    pub group: Option<String>,
    /// Modification time in nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    /// Size in bytes (files), 0 otherwise.
    pub size: u64,
    /// The file's chunks in order (files and hard links), empty otherwise.
    pub chunks: Vec<ChunkRef>,
    /// The link's target bytes (symlinks).
    pub link_target: Option<Vec<u8>>,
    /// For the second and later paths of a hard-link group: the group's first path (in manifest order).
    pub hard_link_to: Option<RelPath>,
}

impl Entry {
    /// A file whose content equals `other`'s (same chunks)?
    pub fn same_content(&self, other: &Entry) -> bool {
        self.kind == other.kind
            && self.size == other.size
            && self.chunks == other.chunks
            && self.link_target == other.link_target
    }
}

/// A manifest entry that breaks the rules a peer's manifest must follow.
#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    /// Entries must be strictly sorted.
    #[error("entry {path} is out of order (after {previous})")]
    OutOfOrder {
        /// The offending entry.
        path: RelPath,
        /// The entry before it.
        previous: RelPath,
    },
    /// The chunk lengths do not add up to the size, or a non-file has chunks.
    #[error("entry {0}: size and chunk list disagree")]
    BadChunks(RelPath),
    /// A symlink without a target, or a non-symlink with one.
    #[error("entry {0}: link target does not match its kind")]
    BadLink(RelPath),
    /// A hard link that does not point to an earlier file.
    #[error("entry {0}: hard link must point to an earlier path and be a file")]
    BadHardLink(RelPath),
    /// Mode bits beyond `0o7777`.
    #[error("entry {0}: mode has bits beyond 0o7777")]
    BadMode(RelPath),
    /// The root must be a folder.
    #[error("the root of a tree must be a folder")]
    RootNotDir,
}

/// Manifests are strictly sorted: `path` must come after `previous`.
pub(crate) fn check_order(path: &RelPath, previous: Option<&RelPath>) -> Result<(), EntryError> {
    match previous {
        Some(previous) if previous >= path => {
            Err(EntryError::OutOfOrder { path: path.clone(), previous: previous.clone() })
        }
        _ => Ok(()),
    }
}

impl Entry {
    /// An entry of `kind` at `path` with everyday metadata and no content: mode 0644 (0755 for a
    /// folder), owner and group 0 without names, mtime 0. Tests and tools start from it and set what
    /// matters to them.
    pub fn new(path: RelPath, kind: EntryKind) -> Entry {
        Entry {
            path,
            kind,
            mode: if kind == EntryKind::Dir { 0o755 } else { 0o644 },
            uid: 0,
            gid: 0,
            user: None,
            group: None,
            mtime_ns: 0,
            size: 0,
            chunks: Vec::new(),
            link_target: None,
            hard_link_to: None,
        }
    }

    /// Checks the entry on its own and against the previous one (manifests are strictly sorted).
    pub fn validate(&self, previous: Option<&RelPath>) -> Result<(), EntryError> {
        check_order(&self.path, previous)?;
        if self.path.is_root() && self.kind != EntryKind::Dir {
            return Err(EntryError::RootNotDir);
        }
        if self.mode & !0o7777 != 0 {
            return Err(EntryError::BadMode(self.path.clone()));
        }
        let total: u64 = self.chunks.iter().map(|c| u64::from(c.len)).sum();
        let chunks_ok = match self.kind {
            EntryKind::File => total == self.size && self.chunks.iter().all(|c| c.len > 0),
            _ => self.chunks.is_empty() && self.size == 0,
        };
        if !chunks_ok {
            return Err(EntryError::BadChunks(self.path.clone()));
        }
        if (self.kind == EntryKind::Symlink) != self.link_target.is_some()
            || self.link_target.as_ref().is_some_and(|t| t.is_empty() || t.contains(&0))
        {
            return Err(EntryError::BadLink(self.path.clone()));
        }
        if let Some(leader) = &self.hard_link_to
            && (self.kind != EntryKind::File || *leader >= self.path || leader.is_root())
        {
            return Err(EntryError::BadHardLink(self.path.clone()));
        }
        Ok(())
    }
}

/// Failure to read or write a record file (a manifest or a scan cache).
#[derive(Debug, thiserror::Error)]
pub enum RecordFileError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The bytes are not a record file of this version, or it was cut short or altered.
    #[error("{path}: corrupt record file: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
}

const MAGIC: &[u8; 8] = b"FERRYRF1";
/// The largest record accepted: an entry with the chunk list of a file of about 100 GiB.
pub const MAX_RECORD_LEN: usize = 64 << 20;

/// How many bytes of records are hashed at once. BLAKE3 hashes a long input many 1 KiB chunks at a
/// time (SIMD); fed record by record (tens of bytes), it compresses one 64-byte block after another,
/// several times slower. 64 KiB keeps the hashed bytes in the L2 cache.
const HASH_BLOCK: usize = 64 << 10;

/// Writes records of type `T` to a file, hashing them as it goes. The file appears at its final path
/// only when [`RecordWriter::finish`] has written and fsynced all of it.
pub struct RecordWriter<T> {
    file: File,
    tmp_path: PathBuf,
    path: PathBuf,
    hasher: blake3::Hasher,
    count: u64,
    /// Records encoded and not yet hashed and written.
    out: Vec<u8>,
    buf: Vec<u8>,
    _marker: std::marker::PhantomData<fn(&T)>,
}

impl<T: Serialize> RecordWriter<T> {
    /// Starts writing the file that will be at `path`.
    pub fn create(path: &Path) -> Result<Self, RecordFileError> {
        let mut tmp_name = path.file_name().unwrap_or_default().to_owned();
        tmp_name.push(".tmp");
        let tmp_path = path.with_file_name(tmp_name);
        let io_err = |source| RecordFileError::Io { path: tmp_path.clone(), source };
        let mut file = File::create(&tmp_path).map_err(io_err)?;
        file.write_all(MAGIC).map_err(io_err)?;
        Ok(Self {
            file,
            tmp_path,
            path: path.to_owned(),
            hasher: blake3::Hasher::new(),
            count: 0,
            out: Vec::with_capacity(HASH_BLOCK + 4096),
            buf: Vec::with_capacity(4096),
            _marker: std::marker::PhantomData,
        })
    }

    /// Appends one record.
    pub fn push(&mut self, record: &T) -> Result<(), RecordFileError> {
        self.buf.clear();
        let body = postcard::to_extend(record, std::mem::take(&mut self.buf))
            .map_err(|e| RecordFileError::Corrupt { path: self.path.clone(), reason: format!("cannot encode: {e}") })?;
        let result = self.push_bytes(&body);
        self.buf = body;
        result
    }

    /// Appends one record already encoded: the caller vouches that `body` is a `T` as postcard
    /// encodes it.
    pub(crate) fn push_bytes(&mut self, body: &[u8]) -> Result<(), RecordFileError> {
        let mut len = [0u8; 10];
        self.out.extend_from_slice(encode_varint(body.len() as u64, &mut len));
        self.out.extend_from_slice(body);
        self.count += 1;
        if self.out.len() >= HASH_BLOCK {
            self.write_out()?;
        }
        Ok(())
    }

    /// Hashes and writes the records encoded so far.
    fn write_out(&mut self) -> Result<(), RecordFileError> {
        self.hasher.update(&self.out);
        self.file.write_all(&self.out).map_err(|source| RecordFileError::Io { path: self.tmp_path.clone(), source })?;
        self.out.clear();
        Ok(())
    }

    /// Writes the trailer, fsyncs and renames the file into place; returns the root hash.
    pub fn finish(self) -> Result<RootHash, RecordFileError> {
        self.finish_with(Finish::Sync)
    }

    /// Like [`RecordWriter::finish`], but when the file already at the final path holds the same
    /// records (its trailer has the same count and root hash), keeps that one and drops this one:
    /// nothing to write or sync. A scan's cache of a tree that did not change.
    pub fn finish_or_keep(self) -> Result<RootHash, RecordFileError> {
        self.finish_with(Finish::KeepSame)
    }

    /// Like [`RecordWriter::finish`] without the fsyncs: the file is whole at its final path for
    /// this boot, and [`sync_record_file`] makes it durable when it must survive a crash.
    pub fn finish_unsynced(self) -> Result<RootHash, RecordFileError> {
        self.finish_with(Finish::NoSync)
    }

    fn finish_with(mut self, how: Finish) -> Result<RootHash, RecordFileError> {
        self.write_out()?;
        let root = RootHash::from(self.hasher.finalize());
        let io_err = |source| RecordFileError::Io { path: self.tmp_path.clone(), source };
        let mut trailer = vec![0u8];
        trailer.extend_from_slice(&self.count.to_le_bytes());
        trailer.extend_from_slice(root.as_bytes());
        if how == Finish::KeepSame && trailer_of(&self.path).is_some_and(|old| old == trailer) {
            drop(self.file);
            std::fs::remove_file(&self.tmp_path).map_err(io_err)?;
            return Ok(root);
        }
        self.file.write_all(&trailer).map_err(io_err)?;
        if how != Finish::NoSync {
            self.file.sync_all().map_err(io_err)?;
        }
        drop(self.file);
        std::fs::rename(&self.tmp_path, &self.path).map_err(io_err)?;
        if how != Finish::NoSync {
            sync_parent(&self.path).map_err(|source| RecordFileError::Io { path: self.path.clone(), source })?;
        }
        Ok(root)
    }

    /// How many records so far.
    pub fn count(&self) -> u64 {
        self.count
    }
}

impl RecordWriter<Entry> {
    /// Appends an entry as it was read, without encoding it again.
    pub fn push_raw(&mut self, entry: &RawEntry) -> Result<(), RecordFileError> {
        self.push_bytes(&entry.bytes)
    }
}

/// How [`RecordWriter`] puts its file in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Finish {
    Sync,
    KeepSame,
    NoSync,
}

/// The trailer of the record file at `path` (a zero byte, the count, the root hash), if it has one.
fn trailer_of(path: &Path) -> Option<Vec<u8>> {
    use std::io::{Seek, SeekFrom};
    const LEN: usize = 1 + 8 + 32;
    let mut file = File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    if len < (MAGIC.len() + LEN) as u64 {
        return None;
    }
    file.seek(SeekFrom::End(-(LEN as i64))).ok()?;
    let mut trailer = vec![0u8; LEN];
    file.read_exact(&mut trailer).ok()?;
    Some(trailer)
}

/// Whether the record files at `a` and `b` hold the same records: their trailers (count and root
/// hash) match. Reads only the trailers.
pub fn same_records(a: &Path, b: &Path) -> bool {
    trailer_of(a).is_some_and(|ta| trailer_of(b).is_some_and(|tb| ta == tb))
}

/// Makes a record file put in place by [`RecordWriter::finish_unsynced`] durable: its bytes, then its
/// name in its folder.
pub fn sync_record_file(path: &Path) -> Result<(), RecordFileError> {
    let io_err = |source| RecordFileError::Io { path: path.to_owned(), source };
    File::open(path).and_then(|f| f.sync_all()).map_err(io_err)?;
    sync_parent(path).map_err(io_err)
}

/// Fsyncs the folder that holds `path`, so that a rename into it is durable.
pub(crate) fn sync_parent(path: &Path) -> io::Result<()> {
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    File::open(parent)?.sync_all()
}

fn encode_varint(mut v: u64, out: &mut [u8; 10]) -> &[u8] {
    let mut i = 0;
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out[i] = byte;
            return &out[..=i];
        }
        out[i] = byte | 0x80;
        i += 1;
    }
}

/// Reads the records of a file written by [`RecordWriter`], one at a time, and checks its trailer.
pub struct RecordReader<T> {
    file: File,
    /// Shared with the raw entries read (their errors name the file).
    path: Arc<Path>,
    hasher: blake3::Hasher,
    count: u64,
    /// Bytes read from the file: `block[..hashed]` are hashed, `block[..pos]` are parsed.
    block: Vec<u8>,
    pos: usize,
    hashed: usize,
    /// Where the last record's bytes are in `block`.
    record: std::ops::Range<usize>,
    done: Option<RootHash>,
    _marker: std::marker::PhantomData<fn() -> T>,
}

impl<T: DeserializeOwned> RecordReader<T> {
    /// Opens a record file.
    pub fn open(path: &Path) -> Result<Self, RecordFileError> {
        let io_err = |source| RecordFileError::Io { path: path.to_owned(), source };
        let mut file = File::open(path).map_err(io_err)?;
        let mut magic = [0u8; 8];
        file.read_exact(&mut magic).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => {
                RecordFileError::Corrupt { path: path.to_owned(), reason: "bad magic".into() }
            }
            _ => io_err(e),
        })?;
        if &magic != MAGIC {
            return Err(RecordFileError::Corrupt { path: path.to_owned(), reason: "bad magic".into() });
        }
        Ok(Self {
            file,
            path: path.into(),
            hasher: blake3::Hasher::new(),
            count: 0,
            block: Vec::new(),
            pos: 0,
            hashed: 0,
            record: 0..0,
            done: None,
            _marker: std::marker::PhantomData,
        })
    }

    /// The root hash, once every record has been read.
    pub fn root_hash(&self) -> Option<RootHash> {
        self.done
    }

    fn corrupt(&self, reason: impl Into<String>) -> RecordFileError {
        RecordFileError::Corrupt { path: self.path.to_path_buf(), reason: reason.into() }
    }

    /// The next record, or `None` after the last one (whose trailer was checked).
    pub fn next_record(&mut self) -> Result<Option<T>, RecordFileError> {
        if !self.read_bytes()? {
            return Ok(None);
        }
        postcard::from_bytes(&self.block[self.record.clone()])
            .map(Some)
            .map_err(|e| self.corrupt(format!("undecodable record: {e}")))
    }

    /// Makes `block[pos..]` hold at least `n` bytes (fewer only at the end of the file): hashes the
    /// parsed records, moves what is left to the front, and reads a block more.
    fn fill(&mut self, n: usize) -> Result<(), RecordFileError> {
        if self.block.len() - self.pos >= n {
            return Ok(());
        }
        self.hasher.update(&self.block[self.hashed..self.pos]);
        self.block.drain(..self.pos);
        (self.pos, self.hashed) = (0, 0);
        let want = n.max(HASH_BLOCK * 16);
        while self.block.len() < want {
            let have = self.block.len();
            self.block.resize(want, 0);
            let read = self.file.read(&mut self.block[have..]);
            self.block.truncate(have + *read.as_ref().unwrap_or(&0));
            match read {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => return Err(RecordFileError::Io { path: self.path.to_path_buf(), source }),
            }
        }
        Ok(())
    }

    /// Takes `n` bytes from `block[pos..]`, or says the file was cut short.
    fn take(&mut self, n: usize) -> Result<std::ops::Range<usize>, RecordFileError> {
        self.fill(n)?;
        if self.block.len() - self.pos < n {
            return Err(self.corrupt("cut short"));
        }
        self.pos += n;
        Ok(self.pos - n..self.pos)
    }

    /// Reads the next record's bytes (at `record` in `block`); `false` after the last one (whose
    /// trailer was checked).
    fn read_bytes(&mut self) -> Result<bool, RecordFileError> {
        if self.done.is_some() {
            return Ok(false);
        }
        let mut len: u64 = 0;
        let mut n = 0;
        loop {
            let at = self.take(1)?.start;
            let b = self.block[at];
            len |= u64::from(b & 0x7f) << (7 * n);
            n += 1;
            if b & 0x80 == 0 {
                break;
            }
            if n == 10 {
                return Err(self.corrupt("bad length"));
            }
        }
        if len == 0 {
            // The records end before the trailer's marker: all of them are hashed now.
            self.hasher.update(&self.block[self.hashed..self.pos - 1]);
            let root = RootHash::from(self.hasher.finalize());
            self.hashed = self.pos;
            let trailer = self.take(40)?;
            let trailer = &self.block[trailer];
            let count = u64::from_le_bytes(trailer[..8].try_into().unwrap_or_default());
            if count != self.count || root.as_bytes()[..] != trailer[8..] {
                return Err(self.corrupt("trailer does not match the records"));
            }
            let more = self
                .file
                .read(&mut [0u8; 1])
                .map_err(|source| RecordFileError::Io { path: self.path.to_path_buf(), source })?;
            if self.block.len() > self.pos || more != 0 {
                return Err(self.corrupt("bytes after the trailer"));
            }
            self.done = Some(root);
            return Ok(false);
        }
        if len as usize > MAX_RECORD_LEN {
            return Err(self.corrupt(format!("record of {len} bytes is over the limit")));
        }
        self.record = self.take(len as usize)?;
        self.count += 1;
        Ok(true)
    }
}

impl<T: DeserializeOwned> RecordReader<T> {
    /// The next record's bytes with its path and kind decoded, for records whose encoding begins
    /// with an [`Entry`] (entries, and the scan's cache records); `None` after the last one (whose
    /// trailer was checked).
    pub(crate) fn next_headed(&mut self) -> Result<Option<Headed<'_>>, RecordFileError> {
        if !self.read_bytes()? {
            return Ok(None);
        }
        let bytes = &self.block[self.record.clone()];
        let head = postcard::take_from_bytes::<Head<'_>>(bytes)
            .map_err(|e| self.corrupt(format!("undecodable record: {e}")))?
            .0;
        let path = RelPath::new(head.path).map_err(|e| self.corrupt(format!("undecodable record: {e}")))?;
        Ok(Some(Headed { path, kind: head.kind, bytes }))
    }
}

/// A record as it is stored, with the path and kind that begin it decoded ([`RecordReader::next_headed`]).
pub(crate) struct Headed<'a> {
    pub(crate) path: RelPath,
    pub(crate) kind: EntryKind,
    pub(crate) bytes: &'a [u8],
}

impl RecordReader<Entry> {
    /// The next entry as it is stored, with only its path and kind decoded, or `None` after the last
    /// one (whose trailer was checked).
    pub fn next_raw(&mut self) -> Result<Option<RawEntry>, RecordFileError> {
        let file = self.path.clone();
        Ok(self.next_headed()?.map(|Headed { path, kind, bytes }| RawEntry { path, kind, bytes: bytes.to_vec(), file }))
    }

    /// The entries as they are stored (see [`RecordReader::next_raw`]).
    pub fn raw(mut self) -> impl Iterator<Item = Result<RawEntry, RecordFileError>> {
        std::iter::from_fn(move || self.next_raw().transpose())
    }
}

/// The first fields of an encoded [`Entry`] (postcard encodes a struct's fields in order).
#[derive(Deserialize)]
struct Head<'a> {
    #[serde(borrow)]
    path: &'a [u8],
    kind: EntryKind,
}

/// A manifest entry as it is stored: its encoded bytes, with its path and kind decoded. A pass that
/// keeps most entries as they were (a day's round over a large tree) compares and copies these
/// instead of decoding and encoding every entry.
#[derive(Debug, Clone)]
pub struct RawEntry {
    path: RelPath,
    kind: EntryKind,
    bytes: Vec<u8>,
    /// The manifest it was read from.
    file: Arc<Path>,
}

impl RawEntry {
    /// Its path.
    pub fn path(&self) -> &RelPath {
        &self.path
    }

    /// Its kind.
    pub fn kind(&self) -> EntryKind {
        self.kind
    }

    /// Stored with the same bytes as `other` (the encoding is canonical: the same entry)?
    pub(crate) fn same_bytes(&self, other: &RawEntry) -> bool {
        self.bytes == other.bytes
    }

    /// The whole entry.
    pub fn decode(&self) -> Result<Entry, RecordFileError> {
        postcard::from_bytes(&self.bytes).map_err(|e| RecordFileError::Corrupt {
            path: self.file.to_path_buf(),
            reason: format!("undecodable record for {}: {e}", self.path),
        })
    }
}

impl Keyed for RawEntry {
    fn key(&self) -> &RelPath {
        &self.path
    }
}

impl<T: DeserializeOwned> Iterator for RecordReader<T> {
    type Item = Result<T, RecordFileError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_record().transpose()
    }
}

/// A manifest file: sorted [`Entry`] records.
pub type ManifestWriter = RecordWriter<Entry>;
/// Reads a manifest file.
pub type ManifestReader = RecordReader<Entry>;

/// Something with a path, so that sorted streams of it can be merged.
pub trait Keyed {
    /// The sort key.
    fn key(&self) -> &RelPath;
}

impl Keyed for Entry {
    fn key(&self) -> &RelPath {
        &self.path
    }
}

/// One step of a [`MergeJoin`]: the item at a path on each side, when there is one.
#[derive(Debug, Clone, PartialEq)]
pub struct Pair<A, B> {
    /// The item from the left (older) stream.
    pub old: Option<A>,
    /// The item from the right (newer) stream.
    pub new: Option<B>,
}

impl<A: Keyed, B: Keyed> Pair<A, B> {
    /// The path both sides share.
    pub fn path(&self) -> &RelPath {
        match (&self.new, &self.old) {
            (Some(n), _) => n.key(),
            (None, Some(o)) => o.key(),
            (None, None) => unreachable!("a Pair always has one side"),
        }
    }
}

/// Merges two streams sorted by path into a stream of pairs, one per path.
pub struct MergeJoin<L: Iterator, R: Iterator> {
    left: std::iter::Peekable<L>,
    right: std::iter::Peekable<R>,
}

impl<A, B, E, L, R> MergeJoin<L, R>
where
    L: Iterator<Item = Result<A, E>>,
    R: Iterator<Item = Result<B, E>>,
{
    /// Merges `left` (older) with `right` (newer).
    pub fn new(left: L, right: R) -> Self {
        Self { left: left.peekable(), right: right.peekable() }
    }
}

impl<A, B, E, L, R> Iterator for MergeJoin<L, R>
where
    A: Keyed,
    B: Keyed,
    L: Iterator<Item = Result<A, E>>,
    R: Iterator<Item = Result<B, E>>,
{
    type Item = Result<Pair<A, B>, E>;

    fn next(&mut self) -> Option<Self::Item> {
        use std::cmp::Ordering;
        let order = match (self.left.peek(), self.right.peek()) {
            (None, None) => return None,
            (Some(Err(_)), _) => return self.left.next().map(|r| r.map(|_| unreachable!())),
            (_, Some(Err(_))) => return self.right.next().map(|r| r.map(|_| unreachable!())),
            (Some(Ok(_)), None) => Ordering::Less,
            (None, Some(Ok(_))) => Ordering::Greater,
            (Some(Ok(l)), Some(Ok(r))) => l.key().cmp(r.key()),
        };
        let take_left = |s: &mut Self| s.left.next().and_then(Result::ok);
        let take_right = |s: &mut Self| s.right.next().and_then(Result::ok);
        Some(Ok(match order {
            Ordering::Less => Pair { old: take_left(self), new: None },
            Ordering::Greater => Pair { old: None, new: take_right(self) },
            Ordering::Equal => Pair { old: take_left(self), new: take_right(self) },
        }))
    }
}

/// The entries that differ between two sorted manifests (added, removed or changed), read as stored
/// (see [`RecordReader::raw`]): an entry stored with the same bytes on both sides is unchanged and
/// skipped without being decoded.
pub fn diff<L, R>(old: L, new: R) -> impl Iterator<Item = Result<Pair<Entry, Entry>, RecordFileError>>
where
    L: Iterator<Item = Result<RawEntry, RecordFileError>>,
    R: Iterator<Item = Result<RawEntry, RecordFileError>>,
{
    MergeJoin::new(old, new).filter_map(|pair| match pair {
        Ok(Pair { old: Some(o), new: Some(n) }) if o.bytes == n.bytes => None,
        // Equal entries are equal bytes (the encoding is canonical); compared decoded, in case one was not.
        Ok(pair) => decoded(pair).map(|p| (p.old != p.new).then_some(p)).transpose(),
        Err(e) => Some(Err(e)),
    })
}

/// Both sides of `pair`, decoded.
fn decoded(pair: Pair<RawEntry, RawEntry>) -> Result<Pair<Entry, Entry>, RecordFileError> {
    Ok(Pair {
        old: pair.old.as_ref().map(RawEntry::decode).transpose()?,
        new: pair.new.as_ref().map(RawEntry::decode).transpose()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn entry(path: &str, kind: EntryKind, content: &[u8]) -> Entry {
        let chunks = if kind == EntryKind::File && !content.is_empty() {
            vec![ChunkRef { hash: ChunkHash::of(content), len: content.len() as u32 }]
        } else {
            vec![]
        };
        Entry {
            mode: 0o644,
            mtime_ns: 1,
            size: if kind == EntryKind::File { content.len() as u64 } else { 0 },
            chunks,
            link_target: (kind == EntryKind::Symlink).then(|| content.to_vec()),
            ..Entry::new(RelPath::new(path.as_bytes()).unwrap(), kind)
        }
    }

    fn write(dir: &Path, name: &str, entries: &[Entry]) -> (PathBuf, RootHash) {
        let path = dir.join(name);
        let mut w = ManifestWriter::create(&path).unwrap();
        for e in entries {
            w.push(e).unwrap();
        }
        let root = w.finish().unwrap();
        (path, root)
    }

    #[test]
    fn round_trip_and_root_hash() {
        let dir = tempfile::tempdir().unwrap();
        let entries = vec![
            entry("", EntryKind::Dir, b""),
            entry("a", EntryKind::File, b"hello"),
            entry("b", EntryKind::Symlink, b"a"),
        ];
        let (path, root) = write(dir.path(), "m", &entries);
        let mut reader = ManifestReader::open(&path).unwrap();
        let read: Vec<Entry> = reader.by_ref().collect::<Result<_, _>>().unwrap();
        assert_eq!(read, entries);
        assert_eq!(reader.root_hash(), Some(root));
        let (_, other) = write(dir.path(), "m2", &entries[..2]);
        assert_ne!(root, other);
    }

    /// The same records: the file in place stays (same inode, no write) and the new one goes; other
    /// records replace it. An unsynced file reads back whole.
    #[test]
    fn a_writer_keeps_the_file_in_place_when_its_records_are_the_same() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let entries = vec![entry("", EntryKind::Dir, b""), entry("a", EntryKind::File, b"hello")];
        let (path, root) = write(dir.path(), "m", &entries);
        let inode = std::fs::metadata(&path).unwrap().ino();
        let rewrite = |entries: &[Entry]| {
            let mut w = ManifestWriter::create(&path).unwrap();
            entries.iter().for_each(|e| w.push(e).unwrap());
            w.finish_or_keep().unwrap()
        };
        assert_eq!(rewrite(&entries), root);
        assert_eq!(std::fs::metadata(&path).unwrap().ino(), inode, "rewritten though the same");
        assert!(!dir.path().join("m.tmp").exists());
        let changed = vec![entries[0].clone(), entry("a", EntryKind::File, b"hello!")];
        let new_root = rewrite(&changed);
        assert_ne!(new_root, root);
        assert_ne!(std::fs::metadata(&path).unwrap().ino(), inode, "kept though changed");
        assert_eq!(ManifestReader::open(&path).unwrap().collect::<Result<Vec<_>, _>>().unwrap(), changed);

        let unsynced = dir.path().join("u");
        let mut w = ManifestWriter::create(&unsynced).unwrap();
        changed.iter().for_each(|e| w.push(e).unwrap());
        assert_eq!(w.finish_unsynced().unwrap(), new_root);
        sync_record_file(&unsynced).unwrap();
        assert!(same_records(&unsynced, &path));
        assert!(!same_records(&unsynced, &dir.path().join("absent")));
        let (other, _) = write(dir.path(), "o", &entries);
        assert!(!same_records(&unsynced, &other));
    }

    #[test]
    fn truncated_or_altered_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let entries = vec![entry("", EntryKind::Dir, b""), entry("a", EntryKind::File, b"hello")];
        let (path, _) = write(dir.path(), "m", &entries);
        let bytes = std::fs::read(&path).unwrap();
        for cut in [bytes.len() - 1, bytes.len() - 41, 12] {
            std::fs::write(&path, &bytes[..cut]).unwrap();
            let result: Result<Vec<Entry>, _> = ManifestReader::open(&path).unwrap().collect();
            assert!(matches!(result, Err(RecordFileError::Corrupt { .. })), "cut at {cut}: {result:?}");
        }
        let mut altered = bytes.clone();
        let i = altered.len() - 45;
        altered[i] ^= 1;
        std::fs::write(&path, &altered).unwrap();
        let result: Result<Vec<Entry>, _> = ManifestReader::open(&path).unwrap().collect();
        assert!(result.is_err());
    }

    /// Records across many read blocks (and one larger than a block) read back whole, with the root
    /// the writer computed; a file cut anywhere is an error.
    #[test]
    fn a_manifest_larger_than_the_read_block_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut entries = vec![entry("", EntryKind::Dir, b"")];
        for i in 0..40_000u32 {
            entries.push(entry(&format!("f{i:06}"), EntryKind::File, &i.to_le_bytes()));
        }
        let mut big = entry("g", EntryKind::File, b"x");
        big.chunks = vec![ChunkRef { hash: ChunkHash::of(b"x"), len: 1 }; 100_000];
        big.size = 100_000;
        entries.push(big);
        let (path, root) = write(dir.path(), "m", &entries);
        assert!(std::fs::metadata(&path).unwrap().len() > 3 << 20);
        let mut reader = ManifestReader::open(&path).unwrap();
        let read: Vec<Entry> = reader.by_ref().collect::<Result<_, _>>().unwrap();
        assert!(read == entries);
        assert_eq!(reader.root_hash(), Some(root));
        let mut raw = ManifestReader::open(&path).unwrap();
        let count = std::iter::from_fn(|| raw.next_raw().unwrap()).count();
        assert_eq!((count, raw.root_hash()), (entries.len(), Some(root)));
        let bytes = std::fs::read(&path).unwrap();
        for cut in [1 << 20, (1 << 20) + 1, bytes.len() / 2, bytes.len() - 41] {
            std::fs::write(&path, &bytes[..cut]).unwrap();
            let result: Result<Vec<Entry>, _> = ManifestReader::open(&path).unwrap().collect();
            assert!(matches!(result, Err(RecordFileError::Corrupt { .. })), "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        std::fs::write(&path, &longer).unwrap();
        let result: Result<Vec<Entry>, _> = ManifestReader::open(&path).unwrap().collect();
        assert!(
            matches!(&result, Err(RecordFileError::Corrupt { reason, .. }) if reason.contains("after the trailer"))
        );
    }

    #[test]
    fn diff_finds_changes() {
        let dir = tempfile::tempdir().unwrap();
        let a =
            vec![entry("", EntryKind::Dir, b""), entry("a", EntryKind::File, b"1"), entry("b", EntryKind::File, b"2")];
        let b =
            vec![entry("", EntryKind::Dir, b""), entry("a", EntryKind::File, b"1"), entry("c", EntryKind::File, b"3")];
        let (old, _) = write(dir.path(), "old", &a);
        let (new, _) = write(dir.path(), "new", &b);
        let changes = diff(ManifestReader::open(&old).unwrap().raw(), ManifestReader::open(&new).unwrap().raw());
        let changes: Vec<Pair<Entry, Entry>> = changes.map(Result::unwrap).collect();
        let paths: Vec<String> = changes.iter().map(|p| p.path().to_string()).collect();
        assert_eq!(paths, ["b", "c"]);
        assert!(changes[0].new.is_none() && changes[1].old.is_none());
    }

    #[test]
    fn raw_entries_copy_to_the_same_manifest_and_decode_to_the_entries() {
        let dir = tempfile::tempdir().unwrap();
        let mut named = entry("a/x", EntryKind::File, b"hello");
        named.user = Some("zimbra".into());
        named.hard_link_to = Some(RelPath::new(&b"a/b"[..]).unwrap());
        let entries = vec![
            entry("", EntryKind::Dir, b""),
            entry("a", EntryKind::Dir, b""),
            entry("a/b", EntryKind::Symlink, b"../x"),
            named,
        ];
        let (path, root) = write(dir.path(), "m", &entries);
        let raw: Vec<RawEntry> = ManifestReader::open(&path).unwrap().raw().collect::<Result<_, _>>().unwrap();
        let heads: Vec<(String, EntryKind)> = raw.iter().map(|r| (r.path().to_string(), r.kind())).collect();
        let expected: Vec<(String, EntryKind)> = entries.iter().map(|e| (e.path.to_string(), e.kind)).collect();
        assert_eq!(heads, expected);
        let decoded: Vec<Entry> = raw.iter().map(|r| r.decode().unwrap()).collect();
        assert_eq!(decoded, entries);
        let copy = dir.path().join("copy");
        let mut writer = ManifestWriter::create(&copy).unwrap();
        for r in &raw {
            writer.push_raw(r).unwrap();
        }
        assert_eq!(writer.finish().unwrap(), root);
        assert_eq!(std::fs::read(&copy).unwrap(), std::fs::read(&path).unwrap());
        // An entry whose head reads but whose rest does not: the error names the manifest and the entry.
        let mut broken = raw[3].clone();
        broken.bytes.truncate(broken.bytes.len() - 4);
        match broken.decode() {
            Err(RecordFileError::Corrupt { path: file, reason }) => {
                assert_eq!(file, path);
                assert!(reason.contains("a/x"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        // The raw reader checks the trailer like the decoding one.
        let mut bytes = std::fs::read(&path).unwrap();
        let i = bytes.len() - 45;
        bytes[i] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(ManifestReader::open(&path).unwrap().raw().any(|r| r.is_err()));
    }

    #[test]
    fn diff_finds_what_comparing_decoded_entries_finds() {
        let dir = tempfile::tempdir().unwrap();
        let mut touched = entry("a", EntryKind::File, b"1");
        touched.mtime_ns = 2;
        let a = vec![
            entry("", EntryKind::Dir, b""),
            entry("a", EntryKind::File, b"1"),
            entry("b", EntryKind::File, b"2"),
            entry("d", EntryKind::Dir, b""),
            entry("d/e", EntryKind::File, b"4"),
        ];
        let b = vec![
            entry("", EntryKind::Dir, b""),
            touched,
            entry("c", EntryKind::File, b"3"),
            entry("d", EntryKind::Dir, b""),
            entry("d/e", EntryKind::File, b"4"),
        ];
        let (old, _) = write(dir.path(), "old", &a);
        let (new, _) = write(dir.path(), "new", &b);
        let raw = diff(ManifestReader::open(&old).unwrap().raw(), ManifestReader::open(&new).unwrap().raw());
        let raw: Vec<Pair<Entry, Entry>> = raw.collect::<Result<_, _>>().unwrap();
        let ok = |v: Vec<Entry>| v.into_iter().map(Ok::<_, ()>);
        let decoded: Vec<Pair<Entry, Entry>> =
            MergeJoin::new(ok(a), ok(b)).map(Result::unwrap).filter(|p| p.old != p.new).collect();
        assert_eq!(raw, decoded);
        assert_eq!(raw.iter().map(|p| p.path().to_string()).collect::<Vec<_>>(), ["a", "b", "c"]);
    }

    #[test]
    fn validation() {
        let mut e = entry("a", EntryKind::File, b"xyz");
        assert!(e.validate(None).is_ok());
        assert!(e.validate(Some(&RelPath::new(&b"b"[..]).unwrap())).is_err());
        e.size = 4;
        assert!(matches!(e.validate(None), Err(EntryError::BadChunks(_))));
        let mut l = entry("a", EntryKind::File, b"xyz");
        l.hard_link_to = Some(RelPath::new(&b"b"[..]).unwrap());
        assert!(matches!(l.validate(None), Err(EntryError::BadHardLink(_))));
        let mut m = entry("a", EntryKind::Dir, b"");
        m.mode = 0o170000;
        assert!(m.validate(None).is_err());
        assert!(matches!(entry("", EntryKind::File, b"x").validate(None), Err(EntryError::RootNotDir)));
    }
}
