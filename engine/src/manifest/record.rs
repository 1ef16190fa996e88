//! Record files: length-prefixed postcard records with a trailer (count and root hash), written
//! durably and read back checked; entries read as stored.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::entry::{Entry, EntryKind, Keyed};
use crate::hash::RootHash;
use crate::path::RelPath;

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

pub(super) const MAGIC: &[u8; 8] = b"FERRYRF1";

/// The largest record accepted: an entry with the chunk list of a file of about 100 GiB.
pub const MAX_RECORD_LEN: usize = 64 << 20;

/// How many bytes of records are hashed at once. BLAKE3 hashes a long input many 1 KiB chunks at a
/// time (SIMD); fed record by record (tens of bytes), it compresses one 64-byte block after another,
/// several times slower. 64 KiB keeps the hashed bytes in the L2 cache.
pub(super) const HASH_BLOCK: usize = 64 << 10;

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

    /// Writes the records pushed so far to the file (not synced), so that a reader of the file
    /// being written ([`RecordWriter::open_reader`]) finds them.
    pub fn flush(&mut self) -> Result<(), RecordFileError> {
        self.write_out()
    }

    /// Opens the file being written, for reading what [`RecordWriter::flush`] wrote while the
    /// writer goes on (the same file once it is in place: renaming keeps it).
    pub fn open_reader(&self) -> Result<File, RecordFileError> {
        File::open(&self.tmp_path).map_err(|source| RecordFileError::Io { path: self.tmp_path.clone(), source })
    }

    /// The encoding of the last record [`RecordWriter::push`] appended.
    pub(crate) fn last_pushed(&self) -> &[u8] {
        &self.buf
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
pub(super) enum Finish {
    Sync,
    KeepSame,
    NoSync,
}

/// The trailer of the record file at `path` (a zero byte, the count, the root hash), if it has one.
pub(super) fn trailer_of(path: &Path) -> Option<Vec<u8>> {
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

/// Whether the record file at `path` ends in the trailer of records whose root hash is `root`, as
/// its writer left it: a file cut short, or another one, does not. Reads only the trailer; altered
/// bytes before it are found by [`RecordReader`] at its end.
pub fn ends_as_written(path: &Path, root: &RootHash) -> bool {
    trailer_of(path).is_some_and(|trailer| trailer.ends_with(root.as_bytes()))
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

pub(super) fn encode_varint(mut v: u64, out: &mut [u8; 10]) -> &[u8] {
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
        let file = File::open(path).map_err(|source| RecordFileError::Io { path: path.to_owned(), source })?;
        Self::from_file(file, path)
    }

    /// Reads the record file open as `file` (at `path`, which errors name), from its start.
    pub fn from_file(mut file: File, path: &Path) -> Result<Self, RecordFileError> {
        let io_err = |source| RecordFileError::Io { path: path.to_owned(), source };
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
pub(super) struct Head<'a> {
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
    pub(super) bytes: Vec<u8>,
    /// The manifest it was read from.
    file: Arc<Path>,
}

impl RawEntry {
    /// The entry whose postcard encoding is `bytes`, read from (or written to) `file`.
    pub(crate) fn from_bytes(bytes: &[u8], file: Arc<Path>) -> Option<Self> {
        let head = postcard::take_from_bytes::<Head<'_>>(bytes).ok()?.0;
        let path = RelPath::new(head.path).ok()?;
        Some(Self { path, kind: head.kind, bytes: bytes.to_vec(), file })
    }

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
