//! Large files built where an interrupted round can find them again.
//!
//! A file of [`LARGE_FILE`](super::LARGE_FILE) bytes or more is built under a name of its own in the staging folder,
//! `partial-` and a hash of its path, not as an unnamed file: its data is synced every
//! [`LARGE_FILE_SYNC`] bytes or [`RECORD_EVERY`], whichever comes first, and the chunks each sync made
//! durable are recorded in the chunk index's partial table. When the round ends early (a deadline, a
//! signal, a lost connection, a killed peer, a chunk that could not come), the file stays there with
//! what it has; a kill of this node loses what arrived since its last sync. The next round's planner
//! finds those chunks in the index and does not ask for them again, and the applier finds the file by
//! its name and keeps what it holds of the new entry's chunks from the start. Where the index's seal
//! for it ([`PartialSeal`]) still holds (the same inode and ctime: nothing wrote to it since its
//! chunks were recorded) and the new entry begins with the chunks recorded, those bytes are kept
//! without being read; otherwise they are read and hashed again, up to the first that differs. The
//! file is cut there and the rest appended. A finished file is named into
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
use super::building::{Building, PrefixBuild, Progress, Recorded, inode_of};
use super::make::WRITE_GROUP;
use super::options::{ApplyError, io_err};
use super::source::LARGE_FILE_SYNC;
use super::sys::{BackgroundSync, is_partial, partial_name, waiting};
use crate::held::{ChunkList, HeldPrefix};
use crate::index::PartialSeal;
use crate::manifest::Entry;
use crate::path::RelPath;
use crate::rootdir::NameExt;
use crate::scan::FilePrefix;

/// The longest time between two syncs of a large file being built, and the shortest between two
/// durable records of its chunks in the index: an interruption on a slow link loses little of it, and
/// a fast one does not wait for the index's fsync every [`LARGE_FILE_SYNC`].
pub(super) const RECORD_EVERY: Duration = Duration::from_millis(500);

/// Opens the partial file `name` in the staging folder, creating it if needed. One found there is
/// only reused if it is what ferry would have left (see [`open_left`]); anything else is removed and
/// made anew.
fn open_partial(staging: &impl std::os::fd::AsFd, name: &[u8]) -> Result<OwnedFd, Errno> {
    let create = |flags: OFlags| {
        let flags = flags | OFlags::RDWR | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        rustix::fs::openat(staging, name.os(), flags, Mode::from_raw_mode(0o600))
    };
    match create(OFlags::EXCL) {
        Err(Errno::EXIST) => {}
        other => return other,
    }
    if let Some(fd) = open_left(staging, name, OFlags::RDWR) {
        return Ok(fd);
    }
    tracing::warn!("{} in the staging folder is not a file ferry left there; made anew", name.escape_ascii());
    rustix::fs::unlinkat(staging, name.os(), AtFlags::empty())?;
    create(OFlags::EXCL)
}

/// The partial file `name` in the staging folder, opened with `access`, if it is what ferry would
/// have left there: a regular file of this user's with no other name (never a hard link planted to a
/// file elsewhere).
fn open_left(staging: &impl std::os::fd::AsFd, name: &[u8], access: OFlags) -> Option<OwnedFd> {
    let flags = access | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK;
    let fd = rustix::fs::openat(staging, name.os(), flags, Mode::empty()).ok()?;
    let stat = rustix::fs::fstat(&fd).ok()?;
    let ours = rustix::fs::FileType::from_raw_mode(stat.st_mode) == rustix::fs::FileType::RegularFile
        && stat.st_nlink == 1
        && stat.st_uid == rustix::process::geteuid().as_raw();
    ours.then_some(fd)
}

/// What the name of a partial file moved aside ends with (see `Applier::set_aside`).
const ASIDE_SUFFIX: &[u8] = b"-was";

impl Applier<'_> {
    /// Builds a large file in its partial file, resuming what an earlier round left there, and stages
    /// it. `Ok(false)`: the entry failed (already reported); what it had is kept for the next round.
    pub(super) fn stage_large_file(&mut self, new: &Entry, replaces: bool) -> Result<bool, ApplyError> {
        // Another file built meanwhile (its entry before the one streaming, asked for again) leaves
        // that one open.
        let going_on = self.building.take_if(|b| b.path == new.path).map(|b| {
            let written = b.progress.written_from_start();
            let begins = ChunkList::sealed(&new.chunks, (written.len, &written.digest()));
            (b, begins.map(|(count, _)| count))
        });
        let (building, from) = match going_on {
            Some((b, Some(from))) => (b, from),
            other => {
                if let Some((b, _)) = other {
                    self.keep(b);
                }
                self.begin_building(new)?
            }
        };
        let Some(mut building) = self.build(building, new, &new.chunks[from..], true)? else { return Ok(false) };
        if let Some(sync) = building.progress.sync.take() {
            waiting(&mut self.report.sync_wait, || sync.synced()).map_err(io_err("sync", &building.shown))?;
        }
        self.set_file_metadata(&building.file, new).map_err(io_err("set metadata of", &building.shown))?;
        self.report.files_written += 1;
        self.report.bytes_written += new.size;
        self.stage(building.name, None, new, new.chunks.clone(), replaces)?;
        Ok(true)
    }

    /// Builds the next chunks of a large file whose entry has not come (see [`crate::Step::Prefix`])
    /// in its partial file, as planned, and leaves the file open for the rest.
    pub(super) fn build_prefix(&mut self, prefix: &FilePrefix) -> Result<(), ApplyError> {
        match self.prefix_builds.pop_front() {
            Some(PrefixBuild::Begin(first)) => {
                // One whose entry never came (it changed while its source read it) is left as it is.
                self.keep_building();
                tracing::info!("{}: built as the source reads it", first.path);
                let (building, from) = self.begin_building(&first)?;
                self.building = self.build(building, &first, &first.chunks[from..], false)?;
            }
            Some(PrefixBuild::Continue) => {
                // None when a chunk of it could not come: its entry will not either.
                if let Some(building) = self.building.take_if(|b| b.path == prefix.path && b.offset == prefix.offset) {
                    let file = Entry::new(prefix.path.clone(), crate::manifest::EntryKind::File);
                    self.building = self.build(building, &file, &prefix.chunks, false)?;
                }
            }
            Some(PrefixBuild::Skip) | None => {}
        }
        Ok(())
    }

    /// Makes what the large file being built holds durable and records it (the round ends, or
    /// another file is built), so that the next round finds it: its entry did not come, and a round
    /// that commits spares its partial file.
    pub(super) fn keep_building(&mut self) {
        if let Some(building) = self.building.take() {
            self.spared.push(building.name.clone());
            self.keep(building);
        }
    }

    fn keep(&mut self, mut b: Building) {
        let kept = self.keep_partial(&b.file, &b.shared, &b.name, &mut b.progress, &mut Unwritten::default(), &b.shown);
        if let Err(e) = kept {
            tracing::warn!("cannot keep what arrived of {} for the next round: {e}", b.path);
        }
    }

    /// Writes `chunks` (of `new`, whose path the chunk source is told) to the partial file `b` at
    /// its end. `None`: a chunk could not come; what arrived is kept for the next round, and the
    /// entry failed (reported when it is `whole`, not only the file's first chunks).
    fn build(
        &mut self,
        mut b: Building,
        new: &Entry,
        chunks: &[crate::manifest::ChunkRef],
        whole: bool,
    ) -> Result<Option<Building>, ApplyError> {
        let mut unwritten = Unwritten::default();
        for chunk in chunks {
            let fetched = match self.get_chunk(new, b.offset, chunk) {
                Ok(fetched) => fetched,
                Err(why) => {
                    match self.keep_partial(&b.file, &b.shared, &b.name, &mut b.progress, &mut unwritten, &b.shown) {
                        Ok(()) => tracing::info!(
                            "{}: {} arrived, kept for the next round",
                            new.path,
                            crate::human::bytes(b.progress.recorded.len)
                        ),
                        Err(e) => tracing::warn!("cannot keep what arrived of {} for the next round: {e}", new.path),
                    }
                    if whole {
                        self.fail(&new.path, why);
                    } else {
                        tracing::info!("{}: {why}", new.path);
                    }
                    return Ok(None);
                }
            };
            unwritten.push(self.buf.take(), chunk.hash, b.offset, fetched);
            b.progress.written.push((chunk.hash, b.offset, chunk.len));
            b.offset += u64::from(chunk.len);
            let progress = &mut b.progress;
            let sync_due =
                b.offset - progress.synced_to >= LARGE_FILE_SYNC || progress.last_sync.elapsed() >= RECORD_EVERY;
            if unwritten.len >= WRITE_GROUP as u64 || sync_due {
                self.write_or_keep(&mut unwritten, (&b.file, &b.shared), &b.name, &mut b.progress, &b.shown)?;
            }
            if sync_due {
                // One sync at a time: the one of the piece before this one must be done.
                self.record_synced((&b.file, &b.name), &mut b.progress, &b.shown)?;
                let progress = &mut b.progress;
                progress.sync = Some(BackgroundSync::sync(b.shared.clone(), |fd| rustix::fs::fdatasync(fd)));
                progress.syncing = std::mem::take(&mut progress.written);
                progress.synced_to = b.offset;
                progress.last_sync = Instant::now();
            }
        }
        self.write_or_keep(&mut unwritten, (&b.file, &b.shared), &b.name, &mut b.progress, &b.shown)?;
        Ok(Some(b))
    }

    /// Opens the partial file of `new` and keeps what an earlier round left there of it: the file,
    /// and how many of `new`'s chunks it holds.
    fn begin_building(&mut self, new: &Entry) -> Result<(Building, usize), ApplyError> {
        let name = partial_name(&new.path);
        let shown = format!("{}/{} (being built for {})", crate::path::STAGING_DIR, name.escape_ascii(), new.path);
        let file = File::from(open_partial(&*self.staging, &name).map_err(io_err("create", &shown))?);
        let io = |op: &'static str| {
            let path = shown.clone();
            move |e: std::io::Error| ApplyError::Io { op, path, source: e }
        };
        let shared = Arc::new(file.try_clone().map_err(io("duplicate"))?);
        let HeldPrefix { kept, chunks: recorded } = match self.resumes.remove(&new.path) {
            Some(planned) => planned,
            None => self.resumable(&file, self.seal_of(&name), new),
        };
        self.report.chunks_local += kept as u64;
        self.report.bytes_local += recorded.len;
        let offset = recorded.len;
        file.set_len(offset).map_err(io("cut"))?;
        (&file).seek(SeekFrom::Start(offset)).map_err(io("seek"))?;
        if offset > 0 {
            tracing::info!(
                "{}: {} of {} arrived before, in a round that did not finish; the rest follows",
                new.path,
                crate::human::bytes(offset),
                crate::human::bytes(new.size)
            );
        }
        let now = Instant::now();
        let progress = Progress {
            syncing: Vec::new(),
            sync: None,
            written: Vec::new(),
            synced_to: offset,
            last_sync: now,
            last_durable: now,
            recorded,
        };
        Ok((Building { path: new.path.clone(), name, shown, file, shared, progress, offset }, kept))
    }

    /// How long the partial file of `path` is (0 without one).
    pub(super) fn partial_len(&self, path: &RelPath) -> u64 {
        open_left(&*self.staging, &partial_name(path), OFlags::RDONLY)
            .and_then(|fd| rustix::fs::fstat(&fd).ok())
            .map_or(0, |stat| stat.st_size as u64)
    }

    /// Finds what an interrupted round left of `new`, a large file about to be planned, for when it
    /// is built: the partial file's path in the target and how much of it will be kept, if there is
    /// one.
    pub(super) fn plan_resumed(&mut self, new: &Entry) -> Option<(RelPath, u64)> {
        let name = partial_name(&new.path);
        let file = File::from(open_left(&*self.staging, &name, OFlags::RDONLY)?);
        let seal = self.seal_of(&name);
        if seal.is_some_and(|seal| self.set_aside(&name, &seal, new)) {
            self.resumes.insert(new.path.clone(), HeldPrefix::default());
            return Some((RelPath::staged(&name)?, 0));
        }
        let resume = self.resumable(&file, seal, new);
        let kept = resume.chunks.len;
        self.resumes.insert(new.path.clone(), resume);
        Some((RelPath::staged(&name)?, kept))
    }

    /// Moves the partial file `name` aside (to `name`-was) where the chunks recorded of it (its
    /// `seal`) no longer begin `new` (the source's file changed since they arrived): `new` is then
    /// built anew, its chunks read from there wherever they still are, rather than cut at the first
    /// difference and the chunks past it asked for again. A file set aside before (the source's
    /// file changed again) is replaced when this one holds as much: it was built from that one's
    /// chunks as far as it got. One file aside at most, so staging never holds more than twice the
    /// file.
    fn set_aside(&mut self, name: &[u8], seal: &PartialSeal, new: &Entry) -> bool {
        if seal.len == 0 || Recorded::sealed(&new.chunks, (seal.len, &seal.digest)).is_some() {
            return false;
        }
        let aside = [name, ASIDE_SUFFIX].concat();
        if rustix::fs::statat(&*self.staging, aside.os(), AtFlags::SYMLINK_NOFOLLOW).is_ok()
            && self.seal_of(&aside).map_or(0, |before| before.len) > seal.len
        {
            return false;
        }
        // The index first: a crash before the rename leaves records of a file not there, forgotten
        // as the next round starts, and the file itself read again.
        if let Err(e) = self.index.rename_partial(name, &aside) {
            tracing::warn!("cannot move what arrived of {} aside: {e}", new.path);
            return false;
        }
        if let Err(e) = rustix::fs::renameat(&*self.staging, name.os(), &*self.staging, aside.os()) {
            tracing::warn!("cannot move what arrived of {} aside: {e}", new.path);
            let _ = self.index.rename_partial(&aside, name);
            return false;
        }
        // A descriptor kept open for reading chunks by the old name is the file moved aside now.
        self.local_file = None;
        tracing::info!(
            "{}: the {} that arrived before no longer begin the file (it changed at the source); kept aside, \
             the file is built anew from what it still shares with them",
            new.path,
            crate::human::bytes(seal.len)
        );
        true
    }

    /// What the index says the partial file `name` was when its chunks were last recorded.
    fn seal_of(&self, name: &[u8]) -> Option<PartialSeal> {
        self.index.partial_seal(name).unwrap_or_else(|e| {
            tracing::debug!("the chunk index does not say what {} was: {e}", name.escape_ascii());
            None
        })
    }

    /// How many of `new`'s chunks, from the start, the partial `file` already holds, and what they
    /// make. Those its `seal` vouches for are not read; otherwise each is read and hashed again, and
    /// the first that differs ends it.
    fn resumable(&mut self, file: &File, seal: Option<PartialSeal>, new: &Entry) -> HeldPrefix {
        // Nothing wrote to it since (its ctime would have moved), and it is still as long.
        let unmoved = |seal: &PartialSeal| {
            inode_of(file)
                .is_some_and(|(ino, ctime_ns, len)| (ino, ctime_ns) == (seal.ino, seal.ctime_ns) && len >= seal.len)
        };
        if let Some((kept, recorded)) =
            seal.filter(unmoved).and_then(|seal| Recorded::sealed(&new.chunks, (seal.len, &seal.digest)))
        {
            return HeldPrefix { kept, chunks: recorded };
        }
        let (kept, _) = crate::held::prefix(file, &new.chunks, self.buf.owned());
        let mut recorded = Recorded::default();
        new.chunks[..kept].iter().for_each(|chunk| recorded.push(&chunk.hash, chunk.len));
        HeldPrefix { kept, chunks: recorded }
    }

    /// Waits for the sync under way, if any, and records the chunks it made durable in the index.
    fn record_synced(
        &mut self,
        (file, name): (&File, &[u8]),
        progress: &mut Progress,
        shown: &str,
    ) -> Result<(), ApplyError> {
        if let Some(sync) = progress.sync.take() {
            waiting(&mut self.report.sync_wait, || sync.synced()).map_err(io_err("sync", shown))?;
            let synced = std::mem::take(&mut progress.syncing);
            synced.iter().for_each(|(hash, _, len)| progress.recorded.push(hash, *len));
            let seal = progress.recorded.seal(file);
            let durable = progress.last_durable.elapsed() >= RECORD_EVERY;
            waiting(&mut self.report.sync_wait, || self.index.record_partial(name, synced, seal, durable))?;
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
        self.record_synced((file, name), progress, shown)?;
        waiting(&mut self.report.sync_wait, || rustix::fs::fdatasync(file)).map_err(io_err("sync", shown))?;
        let written = std::mem::take(&mut progress.written);
        written.iter().for_each(|(hash, _, len)| progress.recorded.push(hash, *len));
        let seal = progress.recorded.seal(file);
        waiting(&mut self.report.sync_wait, || self.index.record_partial(name, written, seal, true))?;
        Ok(())
    }

    /// Removes every partial file from the staging folder and forgets their chunks: called once a
    /// round has applied everything, when none of them is wanted any more but those spared (see
    /// [`Self::keep_building`]).
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
        // The partial file of one whose entry did not come (it changed while its source read it):
        // the next round reads it again, most likely beginning as it did.
        names.retain(|name| !self.spared.contains(name));
        if names.is_empty() {
            return Ok(());
        }
        self.index.forget_partials_but(&self.spared)?;
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
