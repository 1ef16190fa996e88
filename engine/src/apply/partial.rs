//! Large files built where an interrupted round can find them again.
//!
//! A file of [`LARGE_FILE`](super::LARGE_FILE) bytes or more is built under a name of its own in the staging folder,
//! `partial-` and a hash of its path, not as an unnamed file: its data is synced every
//! [`LARGE_FILE_SYNC`] bytes or [`RECORD_EVERY`], whichever comes first, and the chunks each sync made
//! durable are recorded in the chunk index's partial table. When the round ends early (a deadline, a
//! signal, a lost connection, a killed peer, a chunk that could not come), the file stays there with
//! what it has; a kill of this node loses what arrived since its last sync. The next round's planner
//! finds those chunks in the index and does not ask for them again, and the applier finds the file by
//! its name, checks the chunks it holds against the new entry's from the start (read and hashed
//! again), cuts it where the first one differs and appends the rest. A finished file is named into
//! place like any other, from the staging folder; a round that commits removes every partial file
//! left (their chunks were either used or are no longer wanted).

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::fs::{AtFlags, Mode, OFlags};
use rustix::io::Errno;

use super::applier::Applier;
use super::batch::Unwritten;
use super::make::WRITE_GROUP;
use super::options::{ApplyError, io_err};
use super::source::LARGE_FILE_SYNC;
use super::sys::{BackgroundSync, is_partial, partial_name, waiting};
use crate::hash::ChunkHash;
use crate::manifest::Entry;
use crate::rootdir::NameExt;

/// The longest time between two syncs of a large file being built, and the shortest between two
/// durable records of its chunks in the index: an interruption on a slow link loses little of it, and
/// a fast one does not wait for the index's fsync every [`LARGE_FILE_SYNC`].
pub(super) const RECORD_EVERY: Duration = Duration::from_millis(500);

/// Opens the partial file `name` in the staging folder, creating it if needed. One found there is
/// only reused if it is what ferry would have left: a regular file of this user's with no other name
/// (never a hard link planted to a file elsewhere); anything else is removed and made anew.
fn open_partial(staging: &impl std::os::fd::AsFd, name: &[u8]) -> Result<OwnedFd, Errno> {
    let create = |flags: OFlags| {
        let flags = flags | OFlags::RDWR | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        rustix::fs::openat(staging, name.os(), flags, Mode::from_raw_mode(0o600))
    };
    match create(OFlags::EXCL) {
        Err(Errno::EXIST) => {}
        other => return other,
    }
    if let Ok(fd) = rustix::fs::openat(
        staging,
        name.os(),
        OFlags::RDWR | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
        Mode::empty(),
    ) {
        let stat = rustix::fs::fstat(&fd)?;
        let ours = rustix::fs::FileType::from_raw_mode(stat.st_mode) == rustix::fs::FileType::RegularFile
            && stat.st_nlink == 1
            && stat.st_uid == rustix::process::geteuid().as_raw();
        if ours {
            return Ok(fd);
        }
    }
    tracing::warn!("{} in the staging folder is not a file ferry left there; made anew", name.escape_ascii());
    rustix::fs::unlinkat(staging, name.os(), AtFlags::empty())?;
    create(OFlags::EXCL)
}

/// The chunks written to a partial file and not yet recorded in the index, and the sync that will make
/// the first of them durable.
struct Progress {
    /// Written and being synced: recorded once the sync is done.
    syncing: Vec<(ChunkHash, u64, u32)>,
    sync: Option<BackgroundSync>,
    /// Written (or about to be) since that sync began.
    written: Vec<(ChunkHash, u64, u32)>,
    /// How far the file was when the last sync began, and when.
    synced_to: u64,
    last_sync: Instant,
    /// When chunks were last recorded durably.
    last_durable: Instant,
}

impl Applier<'_> {
    /// Builds a large file in its partial file, resuming what an earlier round left there, and stages
    /// it. `Ok(false)`: the entry failed (already reported); what it had is kept for the next round.
    pub(super) fn stage_large_file(&mut self, new: &Entry, replaces: bool) -> Result<bool, ApplyError> {
        let name = partial_name(&new.path);
        let shown = format!("{}/{} (being built for {})", crate::path::STAGING_DIR, name.escape_ascii(), new.path);
        let file = File::from(open_partial(&*self.staging, &name).map_err(io_err("create", &shown))?);
        let io = |op: &'static str| {
            let path = shown.clone();
            move |e: std::io::Error| ApplyError::Io { op, path, source: e }
        };
        // Shared with the chunk source (see `ChunkSource::written`) and the thread that syncs it.
        let shared = Arc::new(file.try_clone().map_err(io("duplicate"))?);
        let (kept, mut offset) = self.resumable(&file, new);
        file.set_len(offset).map_err(io("cut"))?;
        (&file).seek(SeekFrom::Start(offset)).map_err(io("seek"))?;
        if offset > 0 {
            tracing::info!(
                "{}: {} MiB of it arrived before, in a round that did not finish; the rest follows",
                new.path,
                offset >> 20
            );
        }
        let now = Instant::now();
        let mut progress = Progress {
            syncing: Vec::new(),
            sync: None,
            written: Vec::new(),
            synced_to: offset,
            last_sync: now,
            last_durable: now,
        };
        let mut unwritten = Unwritten::default();
        for chunk in &new.chunks[kept..] {
            let fetched = match self.get_chunk(new, offset, chunk) {
                Ok(fetched) => fetched,
                Err(why) => {
                    if let Err(e) = self.keep_partial(&file, &shared, &name, &mut progress, &mut unwritten, &shown) {
                        tracing::warn!("cannot keep what arrived of {} for the next round: {e}", new.path);
                    }
                    self.fail(&new.path, why);
                    return Ok(false);
                }
            };
            unwritten.push(self.buf.take(), chunk.hash, offset, fetched);
            progress.written.push((chunk.hash, offset, chunk.len));
            offset += u64::from(chunk.len);
            let sync_due =
                offset - progress.synced_to >= LARGE_FILE_SYNC || progress.last_sync.elapsed() >= RECORD_EVERY;
            if unwritten.len >= WRITE_GROUP as u64 || sync_due {
                self.write_or_keep(&mut unwritten, (&file, &shared), &name, &mut progress, &shown)?;
            }
            if sync_due {
                // One sync at a time: the one of the piece before this one must be done.
                self.record_synced(&name, &mut progress, &shown)?;
                progress.sync = Some(BackgroundSync::sync(shared.clone(), |fd| rustix::fs::fdatasync(fd)));
                progress.syncing = std::mem::take(&mut progress.written);
                progress.synced_to = offset;
                progress.last_sync = Instant::now();
            }
        }
        self.write_or_keep(&mut unwritten, (&file, &shared), &name, &mut progress, &shown)?;
        if let Some(sync) = progress.sync.take() {
            waiting(&mut self.report.sync_wait, || sync.synced()).map_err(io_err("sync", &shown))?;
        }
        self.set_file_metadata(&file, new).map_err(io_err("set metadata of", &shown))?;
        self.report.files_written += 1;
        self.report.bytes_written += new.size;
        self.stage(name, None, new, new.chunks.clone(), replaces)?;
        Ok(true)
    }

    /// How many of `new`'s chunks, from the start, the partial `file` already holds, and how many
    /// bytes they make: each is read and hashed again, and the first that differs ends it.
    fn resumable(&mut self, file: &File, new: &Entry) -> (usize, u64) {
        let (kept, offset) = crate::held::prefix(file, &new.chunks, self.buf.owned());
        self.report.chunks_local += kept as u64;
        self.report.bytes_local += offset;
        (kept, offset)
    }

    /// Waits for the sync under way, if any, and records the chunks it made durable in the index.
    fn record_synced(&mut self, name: &[u8], progress: &mut Progress, shown: &str) -> Result<(), ApplyError> {
        if let Some(sync) = progress.sync.take() {
            waiting(&mut self.report.sync_wait, || sync.synced()).map_err(io_err("sync", shown))?;
            let synced = std::mem::take(&mut progress.syncing);
            let durable = progress.last_durable.elapsed() >= RECORD_EVERY;
            waiting(&mut self.report.sync_wait, || self.index.record_partial(name, synced, durable))?;
            if durable {
                progress.last_durable = Instant::now();
            }
        }
        Ok(())
    }

    /// Writes the chunks gathered for the partial file; when that fails (a full disk), what was
    /// written before them is still made durable and recorded for the next round, and the error
    /// ends the round.
    fn write_or_keep(
        &mut self,
        unwritten: &mut Unwritten,
        (file, shared): (&File, &Arc<File>),
        name: &[u8],
        progress: &mut Progress,
        shown: &str,
    ) -> Result<(), ApplyError> {
        // They are the last of the chunks written since the last sync began, one piece each.
        let group = unwritten.pieces.len();
        let Err(e) = self.write_unwritten(unwritten, file, Some(shared), shown) else { return Ok(()) };
        progress.written.truncate(progress.written.len().saturating_sub(group));
        if let Err(kept) = self.keep_partial(file, shared, name, progress, &mut Unwritten::default(), shown) {
            tracing::warn!("cannot keep what arrived of {shown} for the next round: {kept}");
        }
        Err(e)
    }

    /// Makes what was written of a partial file durable and records it, for the round after this one.
    fn keep_partial(
        &mut self,
        file: &File,
        shared: &Arc<File>,
        name: &[u8],
        progress: &mut Progress,
        unwritten: &mut Unwritten,
        shown: &str,
    ) -> Result<(), ApplyError> {
        self.write_unwritten(unwritten, file, Some(shared), shown)?;
        self.record_synced(name, progress, shown)?;
        waiting(&mut self.report.sync_wait, || rustix::fs::fdatasync(file)).map_err(io_err("sync", shown))?;
        let written = std::mem::take(&mut progress.written);
        waiting(&mut self.report.sync_wait, || self.index.record_partial(name, written, true))?;
        Ok(())
    }

    /// Removes every partial file from the staging folder and forgets their chunks: called once a
    /// round has applied everything, when none of them is wanted any more.
    pub(super) fn remove_partials(&mut self) -> Result<(), ApplyError> {
        let shown = self.root.path().join(crate::path::STAGING_DIR).display().to_string();
        let mut names = Vec::new();
        let mut dir = rustix::fs::Dir::read_from(&*self.staging).map_err(io_err("list", &shown))?;
        while let Some(entry) = dir.read() {
            let entry = entry.map_err(io_err("list", &shown))?;
            if is_partial(entry.file_name().to_bytes()) {
                names.push(entry.file_name().to_bytes().to_vec());
            }
        }
        if names.is_empty() {
            return Ok(());
        }
        self.index.forget_partials()?;
        for name in names {
            tracing::debug!("removing partial file {} (the round no longer needs it)", name.escape_ascii());
            rustix::fs::unlinkat(&*self.staging, name.os(), AtFlags::empty()).map_err(io_err("clean", &shown))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;
    use crate::path::RelPath;

    #[test]
    fn a_partial_name_is_one_plain_component_kept_apart_from_other_staged_names() {
        let name = partial_name(&RelPath::new(&b"server/2026/backup.tgz"[..]).unwrap());
        assert!(is_partial(&name) && !is_partial(b"t17"));
        assert!(RelPath::staged(&name).is_some());
        assert_ne!(name, partial_name(&RelPath::new(&b"server/2026/backup.tg"[..]).unwrap()));
    }

    #[test]
    fn a_partial_file_is_reused_but_a_planted_hard_link_is_not_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let staging = rustix::fs::open(dir.path(), OFlags::DIRECTORY | OFlags::RDONLY, Mode::empty()).unwrap();
        let write = |name: &[u8], data: &[u8]| {
            let file = File::from(open_partial(&staging, name).unwrap());
            file.write_all_at(data, 0).unwrap();
        };
        write(b"partial-a", b"what arrived");
        let kept = File::from(open_partial(&staging, b"partial-a").unwrap());
        assert_eq!(kept.metadata().unwrap().len(), 12, "ferry's own partial file is reused as it is");

        std::fs::write(dir.path().join("elsewhere"), b"not ferry's").unwrap();
        std::fs::hard_link(dir.path().join("elsewhere"), dir.path().join("partial-b")).unwrap();
        write(b"partial-b", b"overwritten?");
        assert_eq!(std::fs::read(dir.path().join("elsewhere")).unwrap(), b"not ferry's");
        assert_eq!(std::fs::read(dir.path().join("partial-b")).unwrap(), b"overwritten?");
    }
}
