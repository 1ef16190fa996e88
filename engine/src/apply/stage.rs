//! Making entries: files, symlinks and hard links staged, chunks gathered, small files handed to the maker.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use rustix::fs::{AtFlags, FileType, Mode};
use rustix::io::Errno;

use super::applier::Applier;
use super::batch::{Frame, Leave, Staged, Unwritten};
use super::make::{Job, WRITE_GROUP, write_pieces};
use super::options::{ApplyError, io_err};
use super::source::{Fetched, LARGE_FILE};
use super::sys::{
    create_staged, file_type_words, kind_of, link_unnamed, name_of, no_tmpfile, open_unnamed, set_metadata, times,
    waiting,
};
use crate::hash::ChunkHash;
use crate::index::{ChunkLocation, look_at};
use crate::manifest::{ChunkRef, Entry, EntryKind, ManifestWriter};
use crate::path::RelPath;
use crate::rootdir::NameExt;

impl Applier<'_> {
    pub(super) fn place(
        &mut self,
        old: Option<Entry>,
        new: Entry,
        committed: &mut ManifestWriter,
    ) -> Result<(), ApplyError> {
        let path = new.path.clone();
        let current = match self.current_stat(&path) {
            Ok(stat) => stat,
            Err(e) => {
                self.fail(&path, format_args!("cannot reach its folder: {e}"));
                if new.kind == EntryKind::Dir {
                    self.stack.push(Frame { path, leave: Leave::Failed, dirty: false });
                }
                return Ok(());
            }
        };
        // Something ferry does not know as its own is in the way of a file or symlink: it stays, unless
        // ferry put it there itself in a round that did not commit, or the operator adopted it.
        let theirs = match &current {
            Some(stat) if old.is_none() && FileType::from_raw_mode(stat.stx_mode.into()) != FileType::Directory => {
                !self.may_replace_unlisted(&path, stat)?
            }
            _ => false,
        };
        let current = current.map(|stat| FileType::from_raw_mode(stat.stx_mode.into()));
        if theirs {
            let what = match current {
                Some(FileType::Symlink) => "a symlink",
                _ => "a file",
            };
            self.fail(
                &path,
                format_args!(
                    "holds {what} that ferry did not put there or that changed since it did; left as it is \
                     (move it aside, or adopt it: a local round's --adopt {path}, or on a network round's \
                     destination `ferry job adopt JOB {path}`)"
                ),
            );
            if new.kind == EntryKind::Dir {
                self.stack.push(Frame { path, leave: Leave::Failed, dirty: false });
            }
            return Ok(());
        }
        let adopted = old.is_none() && current.is_some();
        let old_kind = old.as_ref().map(|o| o.kind);
        if new.kind == EntryKind::Dir {
            match current {
                Some(FileType::Directory) => {}
                None => self.mkdir(&path)?,
                Some(_) if adopted || old_kind.is_some_and(|k| k != EntryKind::Dir) => {
                    self.unlink(&path)?;
                    self.mkdir(&path)?;
                }
                Some(other) => {
                    self.fail(
                        &path,
                        format_args!(
                            "holds a {} that ferry did not write; not replaced by a folder",
                            file_type_words(other)
                        ),
                    );
                    self.stack.push(Frame { path, leave: Leave::Failed, dirty: false });
                    return Ok(());
                }
            }
            committed.push(&new)?;
            self.stack.push(Frame { path, leave: Leave::Update(new), dirty: false });
            return Ok(());
        }
        if current == Some(FileType::Directory) {
            match old {
                Some(old) if old.kind == EntryKind::Dir => {
                    // Its old contents come next in the stream and are removed first; see `leave`.
                    self.stack.push(Frame { path, leave: Leave::Replace { old, new }, dirty: false });
                }
                _ => {
                    self.fail(&path, "is a folder that ferry did not write; not replaced");
                    self.stack.push(Frame { path, leave: Leave::Failed, dirty: false });
                }
            }
            return Ok(());
        }
        let current_kind = kind_of(current);
        if let Some(found) = current
            && current_kind != Some(new.kind)
            && !adopted
            && old_kind != current_kind
        {
            let found = file_type_words(found);
            self.fail(&path, format_args!("holds a {found} that ferry did not write; not replaced by a {}", new.kind));
            return Ok(());
        }
        match self.place_non_dir(old.as_ref(), &new, current)? {
            true => committed.push(&new)?,
            false => {
                if let Some(old) = old.filter(|o| Some(o.kind) == kind_of(current)) {
                    committed.push(&old)?;
                }
            }
        }
        Ok(())
    }

    /// Puts a file or symlink at its path, where `current` is there now. `Ok(false)`: that entry failed
    /// (already reported).
    pub(super) fn place_non_dir(
        &mut self,
        old: Option<&Entry>,
        new: &Entry,
        current: Option<FileType>,
    ) -> Result<bool, ApplyError> {
        let replaces = current.is_some();
        if new.kind == EntryKind::Symlink {
            return self.stage_symlink(new, replaces);
        }
        if let Some(leader) = &new.hard_link_to {
            return self.stage_hard_link(new, leader, replaces);
        }
        let same_content = old.is_some_and(|o| o.same_content(new) && o.hard_link_to.is_none());
        if same_content && current == Some(FileType::RegularFile) {
            return self.update_in_place(new, Vec::new());
        }
        // A file ferry adopts (a pre-filled target) that holds this content already (read and
        // hashed): its metadata is put right and its chunks recorded where they lie, not a second
        // copy written beside it. Only where adopted: a change of metadata is recorded with its
        // batch, so a file of ferry's own (placed by a round that stopped before its commit) would
        // no longer be known as ferry's after a kill between the two; it is rebuilt instead.
        if old.is_none()
            && current == Some(FileType::RegularFile)
            && self.options.adopt.covers(&new.path)
            && self.holds_in_place(new)
        {
            return self.update_in_place(new, new.chunks.clone());
        }
        self.stage_file(new, replaces)
    }

    pub(super) fn tmp_name(&mut self) -> Vec<u8> {
        self.next_tmp += 1;
        format!("t{}", self.next_tmp).into_bytes()
    }

    pub(super) fn mkdir(&mut self, path: &RelPath) -> Result<(), ApplyError> {
        let dir = self.parent_dir_or_fail(path)?;
        // Private until its contents are in place; its real mode is set when it is left.
        rustix::fs::mkdirat(&*dir, name_of(path).os(), Mode::from_raw_mode(0o700))
            .map_err(io_err("create folder", path))?;
        self.report.dirs_created += 1;
        self.mark_parent_dirty(path);
        Ok(())
    }

    pub(super) fn unlink(&mut self, path: &RelPath) -> Result<(), ApplyError> {
        let dir = self.parent_dir_or_fail(path)?;
        rustix::fs::unlinkat(&*dir, name_of(path).os(), AtFlags::empty()).map_err(io_err("remove", path))?;
        self.batch.gone.push(path.clone());
        self.report.deleted += 1;
        self.mark_parent_dirty(path);
        Ok(())
    }

    pub(super) fn owner_of(&mut self, entry: &Entry) -> Option<(u32, u32)> {
        self.owners.resolve(entry.uid, entry.gid, entry.user.as_deref(), entry.group.as_deref())
    }

    pub(super) fn stage(
        &mut self,
        tmp: Vec<u8>,
        unnamed: Option<OwnedFd>,
        entry: &Entry,
        chunks: Vec<ChunkRef>,
        replaces: bool,
    ) -> Result<(), ApplyError> {
        self.batch.bytes += entry.size;
        self.batch.by_path.insert(entry.path.clone(), self.batch.staged.len());
        let is_file = entry.kind == EntryKind::File;
        self.batch.staged.push(Staged { tmp, unnamed, path: entry.path.clone(), chunks, is_file, replaces });
        self.mark_parent_dirty(&entry.path);
        if self.batch.staged.len() >= self.options.batch_files || self.batch.bytes >= self.options.batch_bytes {
            self.settle()?;
            self.start_sync()?;
        }
        Ok(())
    }

    pub(super) fn stage_symlink(&mut self, new: &Entry, replaces: bool) -> Result<bool, ApplyError> {
        let target = new.link_target.as_deref().unwrap_or_default();
        let tmp = self.tmp_name();
        let shown = || format!("{} (staged for {})", tmp.escape_ascii(), new.path);
        rustix::fs::symlinkat(target.os(), &self.staging, tmp.os()).map_err(io_err("create symlink", shown()))?;
        if let Some((uid, gid)) = self.owner_of(new) {
            rustix::fs::chownat(
                &self.staging,
                tmp.os(),
                Some(rustix::fs::Uid::from_raw(uid)),
                Some(rustix::fs::Gid::from_raw(gid)),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(io_err("set owner of", shown()))?;
        }
        rustix::fs::utimensat(&self.staging, tmp.os(), &times(new.mtime_ns), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(io_err("set mtime of", shown()))?;
        self.report.symlinks += 1;
        self.stage(tmp, None, new, Vec::new(), replaces)?;
        Ok(true)
    }

    pub(super) fn stage_hard_link(
        &mut self,
        new: &Entry,
        leader: &RelPath,
        replaces: bool,
    ) -> Result<bool, ApplyError> {
        if self.placing.as_ref().is_some_and(|p| p.paths.contains_key(leader)) {
            // The leader is staged but not in place yet: link to it once it is.
            self.settle()?;
        }
        if self.batch.by_path.contains_key(leader) {
            // The leader may still be on the maker's thread.
            self.collect_made()?;
        }
        let tmp = self.tmp_name();
        let linked = if let Some(&i) = self.batch.by_path.get(leader) {
            if !self.batch.staged[i].is_file {
                Err(Errno::PERM)
            } else {
                // The leader may have no name yet: give it its staging name first.
                if let Some(fd) = self.batch.staged[i].unnamed.take() {
                    let leader_tmp = self.batch.staged[i].tmp.clone();
                    link_unnamed(&fd, &self.staging, &leader_tmp).map_err(io_err("name", &new.path))?;
                }
                let leader_tmp = self.batch.staged[i].tmp.clone();
                rustix::fs::linkat(&self.staging, leader_tmp.os(), &self.staging, tmp.os(), AtFlags::empty())
            }
        } else {
            if self.already_linked(&new.path, leader) {
                // Same inode already (the entry changed only in metadata, which the leader carries).
                return Ok(true);
            }
            let dir = match self.parent_dir(leader) {
                Ok(dir) => dir,
                Err(e) => {
                    self.fail(&new.path, format_args!("hard link to {leader}: {e}"));
                    return Ok(false);
                }
            };
            let name = name_of(leader);
            match rustix::fs::statat(&*dir, name.os(), AtFlags::SYMLINK_NOFOLLOW) {
                Ok(stat) if FileType::from_raw_mode(stat.st_mode) == FileType::RegularFile => {
                    rustix::fs::linkat(&*dir, name.os(), &self.staging, tmp.os(), AtFlags::empty())
                }
                Ok(_) => Err(Errno::PERM),
                Err(e) => Err(e),
            }
        };
        if let Err(e) = linked {
            self.fail(&new.path, format_args!("cannot hard-link to {leader}: {e}"));
            return Ok(false);
        }
        self.report.hard_links += 1;
        self.stage(tmp, None, new, Vec::new(), replaces)?;
        Ok(true)
    }

    /// Are `path` and `leader` already two names of one regular file?
    pub(super) fn already_linked(&mut self, path: &RelPath, leader: &RelPath) -> bool {
        let mut stat = |p: &RelPath| {
            let dir = self.parent_dir(p).ok()?;
            rustix::fs::statat(&*dir, name_of(p).os(), AtFlags::SYMLINK_NOFOLLOW).ok()
        };
        match (stat(path), stat(leader)) {
            (Some(a), Some(b)) => {
                FileType::from_raw_mode(a.st_mode) == FileType::RegularFile
                    && (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
            }
            _ => false,
        }
    }

    pub(super) fn set_file_metadata(&mut self, fd: &impl std::os::fd::AsFd, entry: &Entry) -> Result<(), Errno> {
        let owner = self.owner_of(entry);
        set_metadata(fd, owner, entry.mode, entry.mtime_ns)
    }

    /// Does the file at `new`'s path hold `new`'s content? Not read again where the indexing
    /// before this first round read it and it has not changed since (its inode, ctime and size).
    fn holds_in_place(&mut self, new: &Entry) -> bool {
        let Ok(dir) = self.parent_dir(&new.path) else { return false };
        let name = name_of(&new.path);
        let indexed = self.index.indexed(&new.path).ok().flatten();
        // The same inode with the same ctime is the same regular file, and the same chunk list the
        // same size.
        let vouched = indexed
            .is_some_and(|indexed| look_at(&*dir, name.os()).is_ok_and(|stat| indexed.vouches_for(&stat, &new.chunks)));
        vouched || crate::held::holds(&dir, name, new)
    }

    /// Puts `new`'s metadata on the file at its path, and records `chunks` (its own, or none) there.
    pub(super) fn update_in_place(&mut self, new: &Entry, chunks: Vec<ChunkRef>) -> Result<bool, ApplyError> {
        let file = match self.root.open_file(&new.path) {
            Ok(file) => file,
            Err(e) => {
                self.fail(&new.path, format_args!("cannot open to update its metadata: {e}"));
                return Ok(false);
            }
        };
        self.set_file_metadata(&file, new).map_err(io_err("set metadata of", &new.path))?;
        self.report.metadata_updated += 1;
        self.batch.touched.push((new.path.clone(), chunks));
        Ok(true)
    }

    pub(super) fn stage_file(&mut self, new: &Entry, replaces: bool) -> Result<bool, ApplyError> {
        if new.size >= LARGE_FILE {
            return self.stage_large_file(new, replaces);
        }
        let tmp = self.tmp_name();
        let shown = format!("{} (staged for {})", tmp.escape_ascii(), new.path);
        if self.maker.is_some() {
            return self.give_file(new, tmp, shown, replaces);
        }
        let (fd, unnamed) = match self.create_unnamed(&new.path) {
            Some(fd) => (fd, true),
            None => {
                let fd = create_staged(&self.staging, &tmp).map_err(io_err("create", &shown))?;
                (fd, false)
            }
        };
        let file = File::from(fd);
        let mut offset = 0u64;
        let mut unwritten = Unwritten::default();
        for chunk in &new.chunks {
            let fetched = match self.get_chunk(new, offset, chunk) {
                Ok(fetched) => fetched,
                Err(why) => {
                    drop(file);
                    if !unnamed {
                        let _ = rustix::fs::unlinkat(&self.staging, tmp.os(), AtFlags::empty());
                    }
                    self.fail(&new.path, why);
                    return Ok(false);
                }
            };
            unwritten.push(self.buf.take(), chunk.hash, offset, fetched);
            offset += u64::from(chunk.len);
            if unwritten.len >= WRITE_GROUP as u64 {
                self.write_unwritten(&mut unwritten, &file, None, &shown)?;
            }
        }
        self.write_unwritten(&mut unwritten, &file, None, &shown)?;
        self.set_file_metadata(&file, new).map_err(io_err("set metadata of", &shown))?;
        self.report.files_written += 1;
        self.report.bytes_written += new.size;
        let unnamed = unnamed.then(|| OwnedFd::from(file));
        self.stage(tmp, unnamed, new, new.chunks.clone(), replaces)?;
        Ok(true)
    }

    /// Writes the chunks gathered in `unwritten` to the end of `file` (see [`write_pieces`]),
    /// then hands those that came from the source back to it (a large file's, `shared`).
    pub(super) fn write_unwritten(
        &mut self,
        unwritten: &mut Unwritten,
        file: &File,
        shared: Option<&Arc<File>>,
        shown: &str,
    ) -> Result<(), ApplyError> {
        let Unwritten { pieces, fetched, .. } = std::mem::take(unwritten);
        write_pieces(file, &pieces).map_err(|e| ApplyError::Io { op: "write", path: shown.to_owned(), source: e })?;
        if let Some(shared) = shared {
            for (hash, offset) in fetched {
                self.source.written(&hash, shared, offset);
            }
        }
        Ok(())
    }

    /// Stages a small file made by the maker: its bytes are gathered (and checked) here, the file is
    /// created, written and given its metadata on the maker's thread, and collected before the batch
    /// is synced.
    pub(super) fn give_file(
        &mut self,
        new: &Entry,
        tmp: Vec<u8>,
        shown: String,
        replaces: bool,
    ) -> Result<bool, ApplyError> {
        let mut pieces = Vec::with_capacity(new.chunks.len());
        let mut offset = 0u64;
        for chunk in &new.chunks {
            if let Err(why) = self.get_chunk(new, offset, chunk) {
                // Nothing was created: the entry fails and the round goes on.
                self.fail(&new.path, why);
                return Ok(false);
            }
            pieces.push(self.buf.take());
            offset += u64::from(chunk.len);
        }
        let dir = if self.no_tmpfile { None } else { self.parent_dir(&new.path).ok() };
        let job = Job {
            slot: self.batch.staged.len(),
            dir,
            tmp: tmp.clone(),
            pieces,
            owner: self.owner_of(new),
            mode: new.mode,
            mtime_ns: new.mtime_ns,
            shown,
        };
        let maker = self.maker.as_mut().expect("give_file is called with a maker");
        maker.give(job);
        self.report.files_written += 1;
        self.report.bytes_written += new.size;
        self.stage(tmp, None, new, new.chunks.clone(), replaces)?;
        Ok(true)
    }

    /// Waits for the maker's files of the batch being staged and puts each in its place there.
    pub(super) fn collect_made(&mut self) -> Result<(), ApplyError> {
        let Some(maker) = self.maker.as_mut() else { return Ok(()) };
        while maker.pending() > 0 {
            let (slot, made) = waiting(&mut self.report.make_wait, || maker.collect())?;
            self.no_tmpfile |= made.no_tmpfile;
            self.batch.staged[slot].unnamed = made.unnamed;
        }
        Ok(())
    }

    /// An unnamed file in the folder that will hold `path`, or `None` where `O_TMPFILE` is not
    /// available (then the file is built under a name in the staging folder).
    pub(super) fn create_unnamed(&mut self, path: &RelPath) -> Option<OwnedFd> {
        if self.no_tmpfile {
            return None;
        }
        let dir = self.parent_dir(path).ok()?;
        match open_unnamed(&*dir) {
            Ok(fd) => Some(fd),
            Err(e) => {
                if no_tmpfile(e) {
                    tracing::debug!("O_TMPFILE is not supported here; files are built in the staging folder");
                    self.no_tmpfile = true;
                }
                None
            }
        }
    }

    /// Puts a chunk's verified bytes into `self.buf`: from the chunk source if it holds them at hand,
    /// else from the target if the index knows where they are and they still hash right, else from
    /// the chunk source. Returns whether the chunk came from the chunk source (`false`: the target).
    pub(super) fn get_chunk(&mut self, entry: &Entry, offset: u64, chunk: &ChunkRef) -> Result<bool, String> {
        // What was asked for and arrived needs no index lookup: in a first round that is every chunk,
        // and the lookup was an eighth of the applying thread's time.
        if !self.source.holds(&chunk.hash) {
            // A wrong hint is forgotten and the index asked once more: the chunk's file may have just
            // been named into place from the staging folder, where the hint was.
            let mut tried = None;
            while let Some(location) = self.index.get(&chunk.hash).map_err(|e| e.to_string())? {
                if tried.as_ref() == Some(&location) {
                    break;
                }
                if self.read_local(&location, &chunk.hash) {
                    self.report.chunks_local += 1;
                    self.report.bytes_local += u64::from(chunk.len);
                    return Ok(false);
                }
                let _ = self.index.remove(&chunk.hash, &location);
                tried = Some(location);
            }
        }
        let fetched = self.source.fetch(entry, offset, chunk, &mut self.buf).map_err(|e| e.to_string())?;
        if self.buf.len() != chunk.len as usize
            || (fetched == Fetched::Unchecked && ChunkHash::of(&self.buf) != chunk.hash)
        {
            return Err(format!(
                "chunk {} at offset {offset} does not match its hash: the source changed since it was \
                 scanned, or the data was damaged on the way; left for the next round",
                chunk.hash.short()
            ));
        }
        self.report.chunks_fetched += 1;
        self.report.bytes_fetched += u64::from(chunk.len);
        Ok(true)
    }

    pub(super) fn read_local(&mut self, location: &ChunkLocation, hash: &ChunkHash) -> bool {
        if self.local_file.as_ref().is_none_or(|(p, _)| *p != location.path) {
            self.local_file = self.root.open_file(&location.path).ok().map(|f| (location.path.clone(), f));
        }
        let Some((_, file)) = &self.local_file else { return false };
        let buf = self.buf.owned();
        buf.resize(location.len as usize, 0);
        file.read_exact_at(buf, location.offset).is_ok() && ChunkHash::of(buf) == *hash
    }
}
