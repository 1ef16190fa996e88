//! What a file holds of a list of chunks, read and hashed again: a file ferry wrote whose metadata
//! changed (the check), a file ferry takes over in place, a partial file resumed (the applier).

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
