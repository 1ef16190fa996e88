//! Examining one path: the quick check, or reading, cutting and hashing the file.

use std::os::fd::AsFd;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Stat};

use super::links::HardLinks;
use super::options::ScanOptions;
use super::stored::StoredRecord;
use super::times::{exact_mtime_ns, stat_ctime_ns, stat_mtime_ns};
use super::walk::WalkItem;
use crate::chunker::{ReadBuffers, hash_reader_telling};
use crate::manifest::{ChunkRef, Entry, EntryKind};
use crate::rootdir::NameExt;

#[allow(clippy::large_enum_variant)] // one per entry of a batch, moved once
pub(super) enum Outcome {
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
    /// A large file to read in manifest order, by the stage that writes it (see
    /// [`ScanOptions::stream_from`]).
    InOrder {
        entry: Entry,
        stat: Stat,
    },
    /// Changed while being read, or swapped between the walk and the read.
    Changed,
    /// Gone before it could be looked at.
    Vanished,
    /// A kind ferry does not copy (device, FIFO, socket).
    Skipped(String),
    /// Could not be read (permissions, I/O error), or not carried as it is (a time out of range).
    Unreadable(String),
}

/// Looks at `item`: a file is read unless the last scan's record or, for another name of an inode
/// already written (`linked`), that name's entry says what it holds.
pub(super) fn examine(item: &mut WalkItem, options: &ScanOptions, linked: &HardLinks) -> Outcome {
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
    // A manifest keeps nanoseconds in 64 bits: 1677 to 2262. Another time would come out clamped, and
    // the round would call a different tree the same.
    let Some(mtime_ns) = exact_mtime_ns(&stat) else {
        return Outcome::Unreadable(format!(
            "its mtime ({} s from 1970) is outside the years 1677 to 2262 that ferry carries",
            stat.st_mtime
        ));
    };
    let mut entry = Entry {
        path: item.path.clone(),
        kind,
        mode: stat.st_mode & 0o7777,
        uid: stat.st_uid,
        gid: stat.st_gid,
        user: None,
        group: None,
        mtime_ns,
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
        // Another name of a file read already: its content is that one's, and read again it would
        // come from the disk (the chunk reader let its pages go once it sent them).
        EntryKind::File if linked.knows(&stat) => Outcome::Found { entry, stat, was_read: false, bytes_read: 0 },
        EntryKind::File => {
            let Some(stored) = item.cached.as_deref().and_then(StoredRecord::decode) else {
                return read_now_or_in_order(item, entry, stat, options);
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
            read_now_or_in_order(item, entry, stat, options)
        }
    }
}

/// Reads the file now, or leaves it to be read in manifest order when it is that large.
fn read_now_or_in_order(item: &WalkItem, entry: Entry, stat: Stat, options: &ScanOptions) -> Outcome {
    let in_order = options.tee.is_some() && options.stream_from.is_some_and(|from| stat.st_size as u64 >= from);
    if in_order {
        return Outcome::InOrder { entry, stat };
    }
    read_file(item, entry, &stat, options, |_, _| {})
}

/// Reads, cuts and hashes the file `item` names, telling `cut` the chunks named so far as it goes
/// (see [`crate::chunker::hash_reader_telling`]).
pub(super) fn read_file(
    item: &WalkItem,
    mut entry: Entry,
    walked: &Stat,
    options: &ScanOptions,
    cut: impl FnMut(&[ChunkRef], u64),
) -> Outcome {
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
    let read = hash_reader_telling(options.chunker, &file, &mut bufs, cut);
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
    // Moved since the walk looked (the stat compared above): a time out of range is not carried either.
    let Some(mtime_ns) = exact_mtime_ns(&before) else { return Outcome::Changed };
    entry.mtime_ns = mtime_ns;
    entry.size = bytes_read;
    entry.chunks = chunks;
    Outcome::Found { entry, stat: before, was_read: true, bytes_read }
}

thread_local! {
    static READ_BUFFERS: std::cell::RefCell<ReadBuffers> = std::cell::RefCell::new(ReadBuffers::default());
}
