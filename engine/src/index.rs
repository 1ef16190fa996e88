//! [`ChunkIndex`]: where the destination already has the bytes of a chunk.
//!
//! A crash-safe B-tree on disk (redb) maps a chunk's hash to one place in the target that held those
//! bytes when they were written: path, offset, length. It is a hint, never trusted: every chunk read
//! from it is hashed again before use, so a file changed behind ferry's back costs a fetch, not a wrong
//! byte. Only the pages being used are in memory, whatever the number of chunks.

use std::path::Path;
use std::sync::Arc;

use redb::{Database, Durability, ReadableDatabase, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::hash::ChunkHash;
use crate::path::RelPath;

const CHUNKS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("chunks");

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

/// The chunk index could not be opened, read or written.
#[derive(Debug, thiserror::Error)]
#[error("chunk index {path}: {source}")]
pub struct IndexError {
    path: String,
    #[source]
    source: redb::Error,
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
        txn.commit().map_err(|e| err(e.into()))?;
        Ok(Self { db: Arc::new(db), path: shown.into() })
    }

    fn err(&self, e: impl Into<redb::Error>) -> IndexError {
        IndexError { path: self.path.to_string(), source: e.into() }
    }

    /// Where the bytes of `hash` may be found.
    pub fn get(&self, hash: &ChunkHash) -> Result<Option<ChunkLocation>, IndexError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(CHUNKS).map_err(|e| self.err(e))?;
        let Some(value) = table.get(&hash.as_bytes()[..]).map_err(|e| self.err(e))? else {
            return Ok(None);
        };
        // An undecodable value is a stale hint, not an error: the chunk will be fetched.
        Ok(postcard::from_bytes(value.value()).ok())
    }

    /// Records where chunks now are. `durable`: fsync before returning; otherwise the batch becomes
    /// durable with the next durable one (losing it in a crash only costs refetching).
    pub fn insert<'a>(
        &mut self,
        items: impl IntoIterator<Item = (&'a ChunkHash, &'a ChunkLocation)>,
        durable: bool,
    ) -> Result<(), IndexError> {
        let mut txn = self.db.begin_write().map_err(|e| self.err(e))?;
        if !durable {
            txn.set_durability(Durability::None).map_err(|e| self.err(redb::Error::from(e)))?;
        }
        {
            let mut table = txn.open_table(CHUNKS).map_err(|e| self.err(e))?;
            let mut buf = Vec::new();
            for (hash, location) in items {
                buf.clear();
                buf = postcard::to_extend(location, buf).unwrap_or_default();
                table.insert(&hash.as_bytes()[..], &buf[..]).map_err(|e| self.err(e))?;
            }
        }
        txn.commit().map_err(|e| self.err(e))
    }

    /// Forgets a hint that turned out wrong.
    pub fn remove(&mut self, hash: &ChunkHash) -> Result<(), IndexError> {
        let mut txn = self.db.begin_write().map_err(|e| self.err(e))?;
        txn.set_durability(Durability::None).map_err(|e| self.err(redb::Error::from(e)))?;
        txn.open_table(CHUNKS).map_err(|e| self.err(e))?.remove(&hash.as_bytes()[..]).map_err(|e| self.err(e))?;
        txn.commit().map_err(|e| self.err(e))
    }

    /// Makes everything inserted so far durable.
    pub fn sync(&mut self) -> Result<(), IndexError> {
        self.insert(std::iter::empty(), true)
    }
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
        assert_eq!(index.get(&hash).unwrap(), Some(location));
        index.remove(&hash).unwrap();
        assert_eq!(index.get(&hash).unwrap(), None);
    }
}
