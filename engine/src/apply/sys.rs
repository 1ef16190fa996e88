//! Putting a synced batch into place, syncing in the background, and the system calls apply uses.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timespec, Timestamps, UTIME_OMIT};
use rustix::io::Errno;

use crate::manifest::EntryKind;
use crate::path::RelPath;
use crate::rootdir::NameExt;

/// Work on a thread of its own while the applier goes on: a batch's sync and renames while the next
/// batch is staged ([`place`]), a large file's `fdatasync` while its next piece is written.
pub(super) enum Background<T> {
    Running(std::thread::JoinHandle<Option<T>>),
    /// No thread could be spawned: the work ran in [`Background::start`].
    Done(T),
}

impl<T: Send + 'static> Background<T> {
    /// Starts `work` on a thread of its own, or runs it here and now when there is no thread to spare.
    pub(super) fn start(name: &str, work: impl FnOnce() -> T + Send + 'static) -> Self {
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
    pub(super) fn is_done(&self) -> bool {
        match self {
            Self::Running(thread) => thread.is_finished(),
            Self::Done(_) => true,
        }
    }

    /// Waits for the work's result; `None` if its thread panicked.
    pub(super) fn wait(self) -> Option<T> {
        match self {
            Self::Running(thread) => thread.join().ok().flatten(),
            Self::Done(result) => Some(result),
        }
    }
}

/// A sync on a thread of its own.
pub(super) type BackgroundSync = Background<Result<(), Errno>>;

impl BackgroundSync {
    /// Starts syncing `fd` with `sync` (see [`Background::start`]).
    pub(super) fn sync<F: AsFd + Send + Sync + 'static>(
        fd: Arc<F>,
        sync: fn(BorrowedFd<'_>) -> Result<(), Errno>,
    ) -> Self {
        Background::start("ferry-sync", move || sync(fd.as_fd()))
    }

    /// Waits for the sync; a thread that panicked counts as a sync that failed.
    pub(super) fn synced(self) -> Result<(), Errno> {
        self.wait().unwrap_or(Err(Errno::IO))
    }
}

/// Runs `wait` (for the disk, or for the thread that makes small files), adding how long it took to
/// `total`.
pub(super) fn waiting<T>(total: &mut Duration, wait: impl FnOnce() -> T) -> T {
    let started = Instant::now();
    let result = wait();
    *total += started.elapsed();
    result
}

/// Raises the soft limit on open files to the hard limit (at most 65536); returns the limit in force.
pub(super) fn raise_fd_limit() -> usize {
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
pub(super) fn open_unnamed(dir: &impl AsFd) -> Result<OwnedFd, Errno> {
    rustix::fs::openat(dir, ".", OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC, Mode::from_raw_mode(0o600))
}

/// Whether `open_unnamed` failed because the filesystem has no `O_TMPFILE`.
pub(super) fn no_tmpfile(error: Errno) -> bool {
    matches!(error, Errno::OPNOTSUPP | Errno::ISDIR | Errno::INVAL | Errno::NOSYS)
}

/// A new file named `tmp` in the staging folder (where there is no `O_TMPFILE`).
pub(super) fn create_staged(staging: &impl AsFd, tmp: &[u8]) -> Result<OwnedFd, Errno> {
    rustix::fs::openat(
        staging,
        tmp.os(),
        OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
}

/// Sets a file's or folder's owner (`None`: left as it is), mode and mtime.
pub(super) fn set_metadata(fd: &impl AsFd, owner: Option<(u32, u32)>, mode: u32, mtime_ns: i64) -> Result<(), Errno> {
    if let Some((uid, gid)) = owner {
        rustix::fs::fchown(fd, Some(rustix::fs::Uid::from_raw(uid)), Some(rustix::fs::Gid::from_raw(gid)))?;
    }
    // After chown, which clears setuid and setgid bits.
    rustix::fs::fchmod(fd, Mode::from_raw_mode(mode))?;
    rustix::fs::futimens(fd, &times(mtime_ns))
}

/// Gives an unnamed (`O_TMPFILE`) file a name in `dir`.
pub(super) fn link_unnamed(fd: &OwnedFd, dir: impl std::os::fd::AsFd, name: &[u8]) -> Result<(), Errno> {
    match rustix::fs::linkat(fd, "", &dir, name.os(), AtFlags::EMPTY_PATH) {
        // Without CAP_DAC_READ_SEARCH, the /proc path is the documented way.
        Err(Errno::NOENT | Errno::PERM) => {
            let proc_path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(fd));
            rustix::fs::linkat(rustix::fs::CWD, proc_path.as_str(), &dir, name.os(), AtFlags::SYMLINK_FOLLOW)
        }
        other => other,
    }
}

/// What a name in the staging folder starts with when it is a partial file (see `partial`).
const PARTIAL_PREFIX: &[u8] = b"partial-";

/// The name of the partial file for `path` in the staging folder.
pub(crate) fn partial_name(path: &RelPath) -> Vec<u8> {
    let hash = blake3::hash(path.as_bytes());
    [PARTIAL_PREFIX, hash.to_hex()[..32].as_bytes()].concat()
}

/// Whether a name in the staging folder is a partial file's (kept when a round starts).
pub(super) fn is_partial(name: &[u8]) -> bool {
    name.starts_with(PARTIAL_PREFIX)
}

pub(super) fn name_of(path: &RelPath) -> &[u8] {
    path.file_name().unwrap_or(b".")
}

pub(super) fn kind_of(file_type: Option<FileType>) -> Option<EntryKind> {
    match file_type? {
        FileType::RegularFile => Some(EntryKind::File),
        FileType::Directory => Some(EntryKind::Dir),
        FileType::Symlink => Some(EntryKind::Symlink),
        _ => None,
    }
}

/// What is at a path, in words, for messages.
pub(super) fn file_type_words(file_type: FileType) -> &'static str {
    match file_type {
        FileType::RegularFile => "file",
        FileType::Directory => "folder",
        FileType::Symlink => "symlink",
        FileType::Fifo => "FIFO",
        FileType::Socket => "socket",
        FileType::CharacterDevice => "character device",
        FileType::BlockDevice => "block device",
        FileType::Unknown => "entry of an unknown kind",
    }
}

pub(super) fn times(mtime_ns: i64) -> Timestamps {
    Timestamps {
        last_access: Timespec { tv_sec: 0, tv_nsec: UTIME_OMIT },
        last_modification: Timespec {
            tv_sec: mtime_ns.div_euclid(1_000_000_000),
            tv_nsec: mtime_ns.rem_euclid(1_000_000_000) as _,
        },
    }
}
