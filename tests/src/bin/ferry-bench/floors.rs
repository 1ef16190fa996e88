//! The floors: what any tool must at least do in each round, on the same tree and disk.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::args::Result;

/// What any tool must at least do in a round, measured on the same tree and disk in the same run.
#[derive(Default)]
pub(crate) struct Floors {
    /// The initial round: the tree copied on the same disk, and the sync after it.
    pub(crate) initial: Option<(Duration, Duration)>,
    /// The no-change round: listing and `lstat`ing the tree.
    pub(crate) no_change: Option<Duration>,
    /// The day: listing and `lstat`ing the tree, then copying the changed files (how many: the last
    /// field) over the initial copy, and the sync after it.
    pub(crate) day: Option<(Duration, Duration, Duration, usize)>,
    /// The day's fresh random content, which no tool can send in fewer bytes.
    pub(crate) day_random_bytes: Option<u64>,
}

/// The floor under the initial round of any tool that makes what it writes durable: the tree copied
/// to `replica` on the same disk, with no network, hashing or comparison (folders, then files on as
/// many threads as there are cores, the kernel moving their bytes, then hard links and symlinks),
/// and one `syncfs` after it. How long the copy took, and the sync.
pub(crate) fn copy_floor(source: &Path, replica: &Path) -> Result<(Duration, Duration)> {
    use std::collections::HashMap;
    use std::os::unix::fs::MetadataExt;
    let started = Instant::now();
    let (mut files, mut links, mut symlinks) = (Vec::new(), Vec::new(), Vec::new());
    let mut first_link: HashMap<(u64, u64), PathBuf> = HashMap::new();
    std::fs::create_dir(replica)?;
    walk(source, |rel, entry, kind| {
        if kind.is_dir() {
            std::fs::create_dir(replica.join(rel))?;
        } else if kind.is_symlink() {
            symlinks.push(rel.to_owned());
        } else if kind.is_file() {
            let meta = entry.metadata()?;
            if meta.nlink() > 1 {
                if let Some(first) = first_link.get(&(meta.dev(), meta.ino())) {
                    links.push((first.clone(), rel.to_owned()));
                    return Ok(());
                }
                first_link.insert((meta.dev(), meta.ino()), rel.to_owned());
            }
            files.push(rel.to_owned());
        }
        Ok(())
    })?;
    copy_files(source, replica, &files)?;
    for (first, rel) in links {
        std::fs::hard_link(replica.join(first), replica.join(rel))?;
    }
    for rel in symlinks {
        std::os::unix::fs::symlink(std::fs::read_link(source.join(&rel))?, replica.join(rel))?;
    }
    let copy = started.elapsed();
    let sync = sync_filesystem(replica)?;
    eprintln!("copy floor: {} files in {:.2} s, sync {:.2} s", files.len(), copy.as_secs_f64(), sync.as_secs_f64());
    Ok((copy, sync))
}

/// The regular files under `root` whose inode changed at or after `since` (relative paths).
pub(crate) fn changed_since(root: &Path, since: std::time::SystemTime) -> Result<Vec<PathBuf>> {
    use std::os::unix::fs::MetadataExt;
    let since = since.duration_since(std::time::UNIX_EPOCH)?;
    let mut changed = Vec::new();
    walk(root, |rel, entry, kind| {
        if kind.is_file() {
            let meta = entry.metadata()?;
            if Duration::new(meta.ctime() as u64, meta.ctime_nsec() as u32) >= since {
                changed.push(rel.to_owned());
            }
        }
        Ok(())
    })?;
    Ok(changed)
}

/// Calls `visit` with every entry under `root` (its path relative to `root`, the entry, its type), a
/// folder before what is in it.
pub(crate) fn walk(
    root: &Path,
    mut visit: impl FnMut(&Path, &std::fs::DirEntry, std::fs::FileType) -> std::io::Result<()>,
) -> Result<()> {
    let mut stack = vec![PathBuf::new()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(root.join(&dir))? {
            let entry = entry?;
            let rel = dir.join(entry.file_name());
            let kind = entry.file_type()?;
            visit(&rel, &entry, kind)?;
            if kind.is_dir() {
                stack.push(rel);
            }
        }
    }
    Ok(())
}

/// Copies `files` from `source` over their copies in `replica` (making each folder they need once),
/// then syncs the filesystem. How long the copy took, and the sync.
pub(crate) fn durable_copy(source: &Path, replica: &Path, files: &[PathBuf]) -> Result<(Duration, Duration)> {
    let started = Instant::now();
    let folders: std::collections::BTreeSet<&Path> = files.iter().filter_map(|rel| rel.parent()).collect();
    for folder in folders {
        std::fs::create_dir_all(replica.join(folder))?;
    }
    copy_files(source, replica, files)?;
    let copy = started.elapsed();
    Ok((copy, sync_filesystem(replica)?))
}

/// Copies `files` from `source` to `replica` on as many threads as there are cores (`std::fs::copy`:
/// the kernel moves the bytes with `copy_file_range`).
pub(crate) fn copy_files(source: &Path, replica: &Path, files: &[PathBuf]) -> Result<()> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let next = AtomicUsize::new(0);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| -> std::io::Result<()> {
                    while let Some(rel) = files.get(next.fetch_add(1, Ordering::Relaxed)) {
                        std::fs::copy(source.join(rel), replica.join(rel))?;
                    }
                    Ok(())
                })
            })
            .collect();
        for worker in workers {
            worker.join().map_err(|_| "a copying thread panicked")??;
        }
        Ok(())
    })
}

/// `syncfs` of the filesystem holding `path`, timed.
pub(crate) fn sync_filesystem(path: &Path) -> Result<Duration> {
    let started = Instant::now();
    rustix::fs::syncfs(std::fs::File::open(path)?)?;
    Ok(started.elapsed())
}

/// The floor under any tool's round with no change: listing every folder and `lstat`ing every entry in
/// it (each relative to its open folder, on as many threads as there are cores besides the one that
/// lists), and nothing else: no comparison, no output.
pub(crate) fn stat_floor(root: &Path) -> Result<Duration> {
    use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags};
    use std::os::fd::OwnedFd;
    use std::sync::{Arc, Mutex};
    let open = |dir: &OwnedFd, name: &std::ffi::CStr| {
        rustix::fs::openat(dir, name, OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())
    };
    let started = Instant::now();
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let (tx, rx) = std::sync::mpsc::sync_channel::<(Arc<OwnedFd>, Vec<std::ffi::CString>)>(64);
    let rx = Arc::new(Mutex::new(rx));
    let stats = std::thread::scope(|scope| -> Result<u64> {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                let rx = rx.clone();
                scope.spawn(move || {
                    let mut stats = 0u64;
                    loop {
                        let Some((dir, names)) = rx.lock().ok().and_then(|rx| rx.recv().ok()) else { break };
                        for name in names {
                            stats += u64::from(rustix::fs::statat(&*dir, &*name, AtFlags::SYMLINK_NOFOLLOW).is_ok());
                        }
                    }
                    stats
                })
            })
            .collect();
        let root = rustix::fs::open(root, OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?;
        let mut folders = vec![Arc::new(root)];
        while let Some(dir) = folders.pop() {
            let mut names = Vec::new();
            for entry in Dir::read_from(&*dir)? {
                let entry = entry?;
                let name = entry.file_name();
                if name == c"." || name == c".." {
                    continue;
                }
                if entry.file_type() == FileType::Directory {
                    folders.push(Arc::new(open(&dir, name)?));
                }
                names.push(name.to_owned());
            }
            tx.send((dir, names))?;
        }
        drop(tx);
        Ok(workers.into_iter().map(|w| w.join().unwrap_or(0)).sum())
    })?;
    let took = started.elapsed();
    eprintln!("stat floor: {stats} entries in {:.2} s", took.as_secs_f64());
    Ok(took)
}

/// How long reading `file` takes, and copying it to `copy` with an fsync of the copy.
pub(crate) fn disk_floor(file: &Path, copy: &Path) -> Result<(Duration, Duration)> {
    let started = Instant::now();
    std::io::copy(&mut std::fs::File::open(file)?, &mut std::io::sink())?;
    let read = started.elapsed();
    rustix::fs::sync();
    let started = Instant::now();
    std::fs::copy(file, copy)?;
    std::fs::File::open(copy)?.sync_all()?;
    let write = started.elapsed();
    std::fs::remove_file(copy)?;
    Ok((read, write))
}
