//! The placing thread's work: a synced batch linked and renamed into place, recorded, its folders finished.

use std::time::Instant;

use rustix::io::Errno;

use super::batch::{Batch, ParentDir, PlaceTimes, Placed, Target};
use super::options::{ApplyError, io_err};
use crate::index::{ChunkLocation, PlacedStat, look_at};
use crate::rootdir::NameExt;

use super::sys::{link_unnamed, name_of, set_metadata, times};

/// Makes a batch's staged files durable with one `syncfs`, names each into its final path, sets the
/// metadata of the folders the batch finished and records the batch's chunks in the index; the
/// batch's descriptors are closed here too. Runs on a thread of its own beside the applier (see
/// [`Applier::begin_flush`]): it touches nothing the applier is still working on, since the walk has
/// left the folders whose metadata it sets, and the applier waits for it before linking to a file of
/// the batch or starting the next batch's sync.
pub(super) fn place(target: Target, batch: Batch) -> Result<Placed, ApplyError> {
    let Target { root, staging, mut index } = target;
    if !batch.staged.is_empty() {
        rustix::fs::syncfs(&*staging).map_err(io_err("sync", root.path().display()))?;
    }
    // Which inode each entry is, durably, before any gets its name: whatever a crash leaves at a
    // final path, ferry knows it as its own.
    let mut placing = Vec::with_capacity(batch.staged.len());
    for staged in &batch.staged {
        let stat = match &staged.unnamed {
            Some(fd) => look_at(fd, "".as_ref()),
            None => look_at(&*staging, staged.tmp.os()),
        };
        placing.push((&staged.path, PlacedStat::placing(&stat.map_err(io_err("look at", &staged.path))?)));
    }
    if !placing.is_empty() {
        index.record_placing(placing)?;
    }
    let synced = Instant::now();
    let mut spent = PlaceTimes::default();
    let mut clock = synced;
    let mut lap = || crate::timing::lap(&mut clock);
    let mut dir_cache = ParentDir::default();
    for staged in &batch.staged {
        let dir = &*dir_cache.of(&root, &staged.path).map_err(|e| ApplyError::Io {
            op: "open folder of",
            path: staged.path.to_string(),
            source: e,
        })?;
        let name = name_of(&staged.path).os();
        if let Some(fd) = &staged.unnamed {
            // A new path takes the file's first name directly; an existing one is replaced by a
            // rename, which is atomic.
            if !staged.replaces {
                match link_unnamed(fd, dir, name.as_encoded_bytes()) {
                    Ok(()) => continue,
                    Err(Errno::EXIST) => {}
                    Err(e) => return Err(io_err("link into place", &staged.path)(e)),
                }
            }
            link_unnamed(fd, &*staging, &staged.tmp).map_err(io_err("name", &staged.path))?;
        }
        rustix::fs::renameat(&*staging, staged.tmp.os(), dir, name)
            .map_err(io_err("rename into place", &staged.path))?;
    }
    spent.naming = lap();
    for folder in &batch.dirs {
        let path = &folder.path;
        let fd =
            root.open_dir(path).map_err(|e| ApplyError::Io { op: "open folder", path: path.to_string(), source: e })?;
        match folder.metadata {
            Some((owner, mode)) => {
                set_metadata(&fd, owner, mode, folder.mtime_ns).map_err(io_err("set metadata of folder", path))?
            }
            None => rustix::fs::futimens(&fd, &times(folder.mtime_ns)).map_err(io_err("set mtime of folder", path))?,
        }
    }
    spent.folders = lap();
    let mut locations = Vec::new();
    let files = batch.staged.iter().map(|s| (&s.path, &s.chunks)).chain(batch.touched.iter().map(|(p, c)| (p, c)));
    for (path, chunks) in files {
        let mut offset = 0u64;
        for chunk in chunks {
            locations.push((chunk.hash, ChunkLocation { path: path.clone(), offset, len: chunk.len }));
            offset += u64::from(chunk.len);
        }
    }
    // What the disk says of each entry now that it is in place (after every rename of the batch: a
    // rename moves the ctime, of every name of a hard-linked file).
    let mut placed = Vec::with_capacity(batch.staged.len() + batch.touched.len());
    for path in batch.staged.iter().map(|s| &s.path).chain(batch.touched.iter().map(|(path, _)| path)) {
        let dir = dir_cache.of(&root, path).map_err(|e| ApplyError::Io {
            op: "open folder of",
            path: path.to_string(),
            source: e,
        })?;
        let stat = look_at(&*dir, name_of(path).os()).map_err(io_err("look at what was put in place at", path))?;
        placed.push((path, PlacedStat::of(&stat)));
    }
    if !locations.is_empty() || !placed.is_empty() || !batch.gone.is_empty() {
        index.record(locations.iter().map(|(h, l)| (h, l)), placed, &batch.gone, false)?;
    }
    let hashes = locations.into_iter().map(|(hash, _)| hash).collect();
    spent.index = lap();
    drop(batch);
    spent.closing = lap();
    Ok(Placed { synced, hashes, spent })
}
