//! What a file holds of a list of chunks, read and hashed again: a file ferry wrote whose metadata
//! changed (the check), a file ferry takes over in place, a partial file resumed (the applier); and
//! the digest of a chunk list by which a record vouches for a file it saw, so that it need not be
//! read again.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;

use rustix::fs::{Mode, OFlags};

use crate::hash::ChunkHash;
use crate::manifest::{ChunkRef, Entry};
use crate::rootdir::NameExt;

/// How many of `chunks`, from the start, `file` holds, and how many bytes they make: the first that
/// differs, or that the file is too short for, ends it. `buf` is room to read into.
pub(crate) fn prefix(file: &File, chunks: &[ChunkRef], buf: &mut Vec<u8>) -> (usize, u64) {
    let len = file.metadata().map_or(0, |m| m.len());
    let (mut kept, mut offset) = (0, 0u64);
    for chunk in chunks {
        let end = offset + u64::from(chunk.len);
        if end > len {
            break;
        }
        buf.resize(chunk.len as usize, 0);
        if file.read_exact_at(buf, offset).is_err() || ChunkHash::of(buf) != chunk.hash {
            break;
        }
        (kept, offset) = (kept + 1, end);
    }
    (kept, offset)
}

/// Does the file `name` in `dir` hold exactly `entry`'s content? Opened without following a
/// symlink; a file of another length, or one that cannot be read, does not.
pub(crate) fn holds(dir: &OwnedFd, name: &[u8], entry: &Entry) -> bool {
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
    let Ok(file) = rustix::fs::openat(dir, name.os(), flags, Mode::empty()).map(File::from) else {
        return false;
    };
    if !file.metadata().is_ok_and(|meta| meta.is_file() && meta.len() == entry.size) {
        return false;
    }
    prefix(&file, &entry.chunks, &mut Vec::new()) == (entry.chunks.len(), entry.size)
}

/// What a file holds of a list of chunks from its start: how many, and their list. For a large
/// file's partial file, found when the entry is planned (so that what lies past them is asked for)
/// and used when it is built.
#[derive(Default)]
pub(crate) struct HeldPrefix {
    pub(crate) kept: usize,
    pub(crate) chunks: ChunkList,
}

/// A digest of a list of chunks (their hashes and lengths, in order), built a chunk at a time, with
/// the bytes they make: what a record of a file's chunks keeps to tell them again.
#[derive(Default, Clone)]
pub(crate) struct ChunkList {
    digest: blake3::Hasher,
    /// How many bytes the chunks pushed so far make.
    pub(crate) len: u64,
}

impl ChunkList {
    /// How many of `chunks`, from the start, make `len` bytes, and their list, if their digest is
    /// `digest` (a partial file's seal).
    pub(crate) fn sealed(chunks: &[ChunkRef], (len, digest): (u64, &[u8; 32])) -> Option<(usize, Self)> {
        let mut list = Self::default();
        let mut kept = 0;
        while list.len < len
            && let Some(chunk) = chunks.get(kept)
        {
            list.push(&chunk.hash, chunk.len);
            kept += 1;
        }
        (list.len == len && list.digest() == *digest).then_some((kept, list))
    }

    /// The digest of `chunks`.
    pub(crate) fn of(chunks: &[ChunkRef]) -> [u8; 32] {
        let mut list = Self::default();
        chunks.iter().for_each(|chunk| list.push(&chunk.hash, chunk.len));
        list.digest()
    }

    pub(crate) fn push(&mut self, hash: &ChunkHash, len: u32) {
        self.digest.update(hash.as_bytes());
        self.digest.update(&len.to_le_bytes());
        self.len += u64::from(len);
    }

    /// The digest of the chunks pushed so far.
    pub(crate) fn digest(&self) -> [u8; 32] {
        *self.digest.finalize().as_bytes()
    }
}
