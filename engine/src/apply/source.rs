//! Where chunks come from: the caller's `ChunkSource`, and the buffer it fills.

use std::fs::File;
use std::sync::Arc;

use bytes::Bytes;

use crate::hash::ChunkHash;
use crate::manifest::{ChunkRef, Entry};

/// A chunk the source could not provide.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct FetchError(pub String);

/// A chunk's bytes as a [`ChunkSource`] hands them to the applier: read into the applier's buffer, or
/// shared from where the source keeps them, without a copy.
#[derive(Debug, Default)]
pub struct ChunkBuf {
    pub(super) owned: Vec<u8>,
    pub(super) shared: Option<Bytes>,
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
    pub(super) fn take(&mut self) -> Bytes {
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
pub(super) const LARGE_FILE_SYNC: u64 = 32 << 20;

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
