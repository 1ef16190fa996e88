//! The applier: its state, the walk through the merge, removals, folders left, flushes.

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Statx};
use rustix::io::Errno;

use super::batch::{Batch, Deferred, DoneFolder, Frame, Leave, ParentDir, PlaceTimes, Placing, Target};
use super::building::{Building, PrefixBuild, Streaming};
use super::make::Maker;
use super::options::{ApplyError, ApplyOptions, ApplyReport, io_err};
use super::place::place;
use super::plan::{Needed, Planner, Step};
use super::source::{ChunkBuf, ChunkSource, LARGE_FILE};
use super::sys::{Background, name_of, raise_fd_limit, times, waiting};
use crate::held::HeldPrefix;
use crate::index::{ChunkIndex, look_at};
use crate::manifest::{Entry, EntryKind, ManifestWriter, Pair, RawEntry};
use crate::owner::OwnerMap;
use crate::path::{RelPath, STAGING_DIR};
use crate::rootdir::{NameExt, RootDir};
use crate::scan::FilePrefix;
use crate::spill::SpillQueue;

impl<'a> Applier<'a> {
    /// Starts applying to `target`: takes the staging folder (emptying what a crashed run left, but
    /// partial files).
    pub fn new(
        target: &Path,
        source: &'a mut dyn ChunkSource,
        index: &'a mut ChunkIndex,
        committed: &'a mut ManifestWriter,
        options: &ApplyOptions,
    ) -> Result<Self, ApplyError> {
        let root = RootDir::open(target).map_err(|e| ApplyError::Io {
            op: "open target",
            path: target.display().to_string(),
            source: e,
        })?;
        let (staging, partials) = open_staging(&root)?;
        // Hints into partial files that are gone (removed by hand) would fail the files they were for.
        index.forget_partials_but(&partials)?;
        let maker = Maker::start(&staging);
        // Each file of a batch keeps its descriptor open until the batch's sync, and two batches can be
        // open at once (one syncing, one staging).
        let options =
            ApplyOptions { batch_files: options.batch_files.min(raise_fd_limit() / 4).max(1), ..options.clone() };
        let kept = options.kept.as_deref().map(ManifestWriter::create).transpose()?;
        let planner = Planner::adopting(&options.adopt);
        Ok(Applier {
            root: Arc::new(root),
            staging: Arc::new(staging),
            index,
            source,
            committed: Some(committed),
            owners: OwnerMap::new(options.numeric_ids),
            options,
            report: ApplyReport::default(),
            started: Instant::now(),
            stack: Vec::new(),
            batch: Batch::default(),
            placing: None,
            next_tmp: 0,
            buf: ChunkBuf::default(),
            local_file: None,
            dir_cache: ParentDir::default(),
            previous: None,
            root_mtime: None,
            deferred: SpillQueue::new(),
            no_tmpfile: std::env::var_os("FERRY_NO_TMPFILE").is_some(),
            planner,
            resumes: Default::default(),
            streaming: None,
            prefix_builds: Default::default(),
            building: None,
            spared: Vec::new(),
            maker,
            place_spent: PlaceTimes::default(),
            steps: 0,
            kept,
        })
    }

    /// Applies the next step (steps must come in manifest order). A kept entry ([`Step::Keep`]) is
    /// checked for its place in the order and copied to the new manifest as it is stored (its content
    /// and metadata were checked when it came).
    pub fn step(&mut self, step: Step) -> Result<(), ApplyError> {
        let committed = self.committed.take().expect("committed is only taken for the length of a call");
        let result = match step {
            Step::Apply(pair) => self.step_with(*pair, committed),
            Step::Keep(kept) if kept.kind() == EntryKind::Dir => {
                // A folder opens a frame its contents need: it takes the whole path.
                kept.decode()
                    .map_err(ApplyError::from)
                    .and_then(|entry| self.step_with(Pair { old: Some(entry.clone()), new: Some(entry) }, committed))
            }
            Step::Keep(kept) => self.keep_with(kept, committed),
            Step::Prefix(prefix) => {
                self.committed = Some(committed);
                return self.build_prefix(&prefix);
            }
        };
        self.committed = Some(committed);
        self.steps += 1;
        if let Some(progress) = &self.options.progress {
            progress.set(self.steps, self.report.bytes_written);
        }
        result
    }

    /// The chunks of `pair` that the target does not seem to have and that have not been asked for
    /// yet this round. Called before [`Applier::step`] for the same pair, to ask the source ahead.
    /// A large file's chunks in what an interrupted round left of it count only as far as that
    /// still begins the file: the rest of the partial file is cut off when the file is built.
    pub fn plan(&mut self, pair: &Pair<Entry, Entry>) -> Result<Vec<Needed>, ApplyError> {
        let resumed = match &pair.new {
            // Built from its first chunks this round: its partial file, open and growing, is not
            // read and hashed again to plan it (the building goes on from where it is).
            Some(new) if self.streaming.as_ref().is_some_and(|s| s.built && s.file.path == new.path) => None,
            Some(new) if new.size >= LARGE_FILE && Planner::writes_content(pair) => self.plan_resumed(new),
            _ => None,
        };
        self.planner.plan_within(self.index, pair, resumed.as_ref())
    }

    /// The chunks a [`Step::Prefix`] needs from the source: those it adds, once the file's building
    /// has begun. It begins with the first prefix that lacks a chunk (a file that only grew, or
    /// was touched, is not copied here before its entry says so), unless what an earlier round
    /// left of the file is longer than the file so far (its entry resumes that, as it would have).
    pub fn plan_prefix(&mut self, prefix: &FilePrefix) -> Result<Vec<Needed>, ApplyError> {
        let mut streaming = match self.streaming.take() {
            Some(streaming) if streaming.file.path == prefix.path && streaming.file.size == prefix.offset => streaming,
            _ => Streaming { file: Entry::new(prefix.path.clone(), EntryKind::File), built: false },
        };
        streaming.add(&prefix.chunks);
        let (build, needed) = if streaming.built {
            let part = Entry { chunks: prefix.chunks.clone(), ..Entry::new(prefix.path.clone(), EntryKind::File) };
            let mut needed = self.planner.plan_within(self.index, &Pair { old: None, new: Some(part) }, None)?;
            needed.iter_mut().for_each(|need| need.offset += prefix.offset);
            (PrefixBuild::Continue, needed)
        } else if self.partial_len(&prefix.path) >= streaming.file.size
            || !self.planner.lacks_any(self.index, &prefix.chunks)?
        {
            (PrefixBuild::Skip, Vec::new())
        } else {
            // As any large file: from what an earlier round left of it.
            let first = Entry { chunks: std::mem::take(&mut streaming.file.chunks), ..streaming.file.clone() };
            let needed = self.plan(&Pair { old: None, new: Some(first.clone()) })?;
            streaming.built = true;
            (PrefixBuild::Begin(Box::new(first)), needed)
        };
        self.streaming = Some(streaming);
        self.prefix_builds.push_back(build);
        Ok(needed)
    }

    /// See [`Planner::distrust`].
    pub fn distrust(&mut self, paths: Option<std::collections::HashSet<RelPath>>) {
        self.planner.distrust(paths);
    }

    /// Makes everything staged so far durable and visible, and records its chunks in the index,
    /// durably: after a crash, what was written here is found in the index and not fetched again.
    pub fn flush_batch(&mut self) -> Result<(), ApplyError> {
        self.keep_building();
        self.flush()?;
        waiting(&mut self.report.sync_wait, || self.index.sync())?;
        Ok(())
    }

    /// Like [`Applier::flush_batch`], without waiting for the disk: finishes the flush the previous
    /// call began (its batch renamed into place and its chunks recorded in the index, durably), then
    /// begins syncing what is staged now, on another thread, and returns while the next batch is
    /// staged. Everything applied before the *previous* call is durable and visible when this returns.
    pub fn begin_flush(&mut self) -> Result<(), ApplyError> {
        let settled = self.placing.is_some();
        self.settle()?;
        if settled {
            waiting(&mut self.report.sync_wait, || self.index.sync())?;
        }
        self.start_sync()
    }

    /// Whether the batch [`Applier::begin_flush`] handed to the disk last is still syncing or being
    /// put into place: a `begin_flush` now would wait for it.
    pub fn is_syncing(&self) -> bool {
        self.placing.as_ref().is_some_and(|p| !p.work.is_done())
    }

    /// Ends the apply: closes every folder, flushes, runs the deletions, syncs.
    pub fn finish(mut self) -> Result<ApplyReport, ApplyError> {
        let committed = self.committed.take().expect("committed is only taken for the length of a call");
        while let Some(frame) = self.stack.pop() {
            self.leave(frame, committed)?;
        }
        self.flush()?;
        self.delete_deferred()?;
        if !self.batch.gone.is_empty() {
            // The records of what the deletions removed.
            self.flush()?;
        }
        self.remove_partials()?;
        // Every file found in place by the indexing before a first round has been taken over or
        // replaced by now.
        self.index.forget_indexed()?;
        let shown = self.root.path().display().to_string();
        waiting(&mut self.report.sync_wait, || rustix::fs::syncfs(self.root.fd())).map_err(io_err("sync", &shown))?;
        waiting(&mut self.report.sync_wait, || self.index.sync())?;
        if let Some(kept) = self.kept.take() {
            kept.finish()?;
        }
        let _ = rustix::fs::unlinkat(self.root.fd(), STAGING_DIR, AtFlags::REMOVEDIR);
        // Creating and removing the staging folder moved the target's own mtime: put it back.
        if let Some(mtime_ns) = self.root_mtime {
            rustix::fs::futimens(self.root.fd(), &times(mtime_ns)).map_err(io_err("set mtime of", &shown))?;
        }
        self.report.duration = self.started.elapsed();
        let spent = &self.place_spent;
        tracing::debug!(
            "putting batches into place (on their own thread, after each sync): {:.2} s naming files, {:.2} s \
             setting folders' metadata, {:.2} s recording chunks in the index, {:.2} s closing",
            spent.naming.as_secs_f64(),
            spent.folders.as_secs_f64(),
            spent.index.as_secs_f64(),
            spent.closing.as_secs_f64()
        );
        Ok(std::mem::take(&mut self.report))
    }
}

impl Drop for Applier<'_> {
    /// An apply that stopped early still waits for the batch being put into place, so that nothing
    /// goes on touching the target or the index once the applier is gone.
    fn drop(&mut self) {
        if let Some(placing) = self.placing.take() {
            let _ = placing.work.wait();
        }
    }
}

/// Creates `.ferry-staging` at the top of the target (emptying what a crashed run left in it, but
/// the partial files of large files, which the round may resume); returns it and those files' names.
pub(super) fn open_staging(root: &RootDir) -> Result<(OwnedFd, Vec<Vec<u8>>), ApplyError> {
    let shown = root.path().join(STAGING_DIR).display().to_string();
    match rustix::fs::mkdirat(root.fd(), STAGING_DIR, Mode::from_raw_mode(0o700)) {
        Ok(()) | Err(Errno::EXIST) => {}
        Err(e) => return Err(io_err("create", &shown)(e)),
    }
    let fd = rustix::fs::openat(
        root.fd(),
        STAGING_DIR,
        OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(io_err("open (must be a folder, not a symlink)", &shown))?;
    let (mut leftovers, mut partials) = (Vec::new(), Vec::new());
    let mut dir = rustix::fs::Dir::read_from(&fd).map_err(io_err("list", &shown))?;
    while let Some(entry) = dir.read() {
        let entry = entry.map_err(io_err("list", &shown))?;
        let name = entry.file_name().to_bytes();
        if super::sys::is_partial(name) {
            partials.push(name.to_vec());
        } else if name != b"." && name != b".." {
            leftovers.push(name.to_vec());
        }
    }
    for name in leftovers {
        tracing::debug!("removing leftover staging file {}", name.escape_ascii());
        rustix::fs::unlinkat(&fd, name.os(), AtFlags::empty()).map_err(io_err("clean", &shown))?;
    }
    Ok((fd, partials))
}

/// Applies a new manifest to a target, one pair at a time (see the module's documentation).
pub struct Applier<'a> {
    pub(super) root: Arc<RootDir>,
    pub(super) staging: Arc<OwnedFd>,
    pub(super) index: &'a mut ChunkIndex,
    pub(super) source: &'a mut dyn ChunkSource,
    pub(super) committed: Option<&'a mut ManifestWriter>,
    pub(super) owners: OwnerMap,
    pub(super) options: ApplyOptions,
    pub(super) report: ApplyReport,
    pub(super) started: Instant,
    pub(super) stack: Vec<Frame>,
    pub(super) batch: Batch,
    /// The batch before `batch`, on its way to the disk and its final paths; in place before the next
    /// sync.
    pub(super) placing: Option<Placing>,
    pub(super) next_tmp: u64,
    pub(super) buf: ChunkBuf,
    pub(super) local_file: Option<(RelPath, File)>,
    pub(super) dir_cache: ParentDir,
    pub(super) previous: Option<RelPath>,
    /// The mtime the target's top folder must end with.
    pub(super) root_mtime: Option<i64>,
    /// Deletions put off until everything new is in place.
    pub(super) deferred: SpillQueue<Deferred>,
    /// The target's filesystem has no `O_TMPFILE`.
    pub(super) no_tmpfile: bool,
    /// Chunks asked for this round (see `plan`).
    pub(super) planner: Planner,
    /// What the partial files of large files planned and not yet applied hold of them (see
    /// `plan_resumed`), by path.
    pub(super) resumes: std::collections::HashMap<RelPath, HeldPrefix>,
    /// The large file whose first chunks were planned last ([`Step::Prefix`]).
    pub(super) streaming: Option<Streaming>,
    /// What applying each prefix planned and not yet applied does.
    pub(super) prefix_builds: std::collections::VecDeque<PrefixBuild>,
    /// The large file being built between the steps of its prefixes and its entry.
    pub(super) building: Option<Building>,
    /// The partial files of large files built from prefixes whose entry did not come.
    pub(super) spared: Vec<Vec<u8>>,
    /// Makes the small files of the batch being staged (`None`: they are made here).
    pub(super) maker: Option<Maker>,
    /// How long putting the batches into place took, by part.
    pub(super) place_spent: PlaceTimes,
    /// Entries stepped through so far (what [`ApplyOptions::progress`] shows).
    pub(super) steps: u64,
    /// What the source removed and the target keeps (see [`ApplyOptions::kept`]).
    pub(super) kept: Option<ManifestWriter>,
}

impl Applier<'_> {
    pub(super) fn fail(&mut self, path: &RelPath, why: impl std::fmt::Display) {
        tracing::warn!("{path}: {why}");
        self.report.failure_count += 1;
        if self.report.failures.len() < 100 {
            self.report.failures.push(format!("{path}: {why}"));
        }
    }

    pub(super) fn step_with(
        &mut self,
        pair: Pair<Entry, Entry>,
        committed: &mut ManifestWriter,
    ) -> Result<(), ApplyError> {
        let path = pair.path().clone();
        if let Some(new) = &pair.new {
            new.validate(self.previous.as_ref())?;
        }
        self.previous = Some(path.clone());
        if let Some(new) = pair.new.as_ref().filter(|n| n.path.is_root()) {
            self.root_mtime = Some(new.mtime_ns);
        }
        self.leave_until_inside(&path, committed)?;
        let forced_delete = matches!(self.stack.last().map(|f| &f.leave), Some(Leave::Replace { .. } | Leave::Delete));
        if matches!(self.stack.last().map(|f| &f.leave), Some(Leave::Failed)) {
            // Inside a folder that could not be applied: leave everything as it was.
            if let Some(old) = &pair.old {
                committed.push(old)?;
            }
            return Ok(());
        }
        if forced_delete && pair.new.is_some() {
            self.fail(&path, "is listed inside a path that is no longer a folder");
            return Ok(());
        }
        match (pair.old, pair.new) {
            (None, None) => Ok(()),
            (Some(old), None) => self.remove(old, forced_delete),
            (old, Some(new)) if old.as_ref() == Some(&new) => {
                committed.push(&new)?;
                if new.kind == EntryKind::Dir {
                    self.stack.push(Frame { path, leave: Leave::Keep(new), dirty: false });
                }
                Ok(())
            }
            (old, Some(new)) => self.place(old, new, committed),
        }
    }

    pub(super) fn keep_with(&mut self, kept: RawEntry, committed: &mut ManifestWriter) -> Result<(), ApplyError> {
        let path = kept.path();
        crate::manifest::check_order(path, self.previous.as_ref())?;
        self.previous = Some(path.clone());
        self.leave_until_inside(path, committed)?;
        match self.stack.last().map(|f| &f.leave) {
            Some(Leave::Replace { .. } | Leave::Delete) => {
                self.fail(path, "is listed inside a path that is no longer a folder");
                Ok(())
            }
            // Inside a folder that could not be applied, the entry is kept as well.
            _ => Ok(committed.push_raw(&kept)?),
        }
    }

    /// Leaves (finishes) every open folder that `path` is not inside.
    pub(super) fn leave_until_inside(
        &mut self,
        path: &RelPath,
        committed: &mut ManifestWriter,
    ) -> Result<(), ApplyError> {
        while let Some(top) = self.stack.last() {
            if top.path.is_ancestor_of(path) {
                break;
            }
            let frame = self.stack.pop().expect("stack has a top");
            self.leave(frame, committed)?;
        }
        Ok(())
    }

    pub(super) fn mark_parent_dirty(&mut self, path: &RelPath) {
        if let (Some(parent), Some(top)) = (path.parent(), self.stack.last_mut())
            && top.path == parent
        {
            top.dirty = true;
        }
    }

    /// The folder that holds `path`, opened beneath the root (cached: sorted paths share parents).
    pub(super) fn parent_dir(&mut self, path: &RelPath) -> io::Result<Arc<OwnedFd>> {
        self.dir_cache.of(&self.root, path)
    }

    /// Like `parent_dir`, for operations whose failure stops the round.
    pub(super) fn parent_dir_or_fail(&mut self, path: &RelPath) -> Result<Arc<OwnedFd>, ApplyError> {
        self.parent_dir(path).map_err(|e| ApplyError::Io { op: "open folder of", path: path.to_string(), source: e })
    }

    /// What is at `path` in the target now (`None`: nothing).
    pub(super) fn current_kind(&mut self, path: &RelPath) -> io::Result<Option<FileType>> {
        Ok(self.current_stat(path)?.map(|stat| FileType::from_raw_mode(stat.stx_mode.into())))
    }

    /// The `lstat` of what is at `path` in the target now (`None`: nothing).
    pub(super) fn current_stat(&mut self, path: &RelPath) -> io::Result<Option<Statx>> {
        if path.is_root() {
            return Ok(Some(look_at(self.root.fd(), "".as_ref())?));
        }
        let dir = self.parent_dir(path)?;
        match look_at(&*dir, name_of(path).os()) {
            Ok(stat) => Ok(Some(stat)),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// May a round replace what is at `path`, which the old manifest does not list as ferry's? Yes
    /// when the operator adopted it, or when ferry put it there itself (a round that stopped before
    /// its commit) and nothing changed it since.
    pub(super) fn may_replace_unlisted(&mut self, path: &RelPath, stat: &Statx) -> Result<bool, ApplyError> {
        if self.options.adopt.covers(path) {
            return Ok(true);
        }
        let recorded = self.index.placed([path])?.pop().unwrap_or_default();
        Ok(recorded.for_stat(stat).is_some_and(|r| r.matches(stat)))
    }

    /// The source no longer has `old`. Inside a folder being replaced or removed (`forced`) it goes now;
    /// with `delete` it goes at the end of the round, once everything new is in place (so that a
    /// renamed file's chunks are still there to be copied); otherwise it is kept.
    pub(super) fn remove(&mut self, old: Entry, forced: bool) -> Result<(), ApplyError> {
        if forced {
            if old.kind == EntryKind::Dir {
                let path = old.path.clone();
                self.stack.push(Frame { path, leave: Leave::Delete, dirty: false });
                return Ok(());
            }
            if self.unlink_if_ours(&old.path, old.kind)? {
                self.mark_parent_dirty(&old.path);
            }
            return Ok(());
        }
        if !self.options.delete {
            self.report.kept += 1;
            // Still ferry's: a later round with `delete` removes it.
            if let Some(kept) = &mut self.kept {
                kept.push(&old)?;
            }
            return Ok(());
        }
        let parent_mtime_ns = match self.stack.last() {
            Some(Frame { path, leave: Leave::Keep(entry) | Leave::Update(entry), .. })
                if Some(path) == old.path.parent().as_ref() =>
            {
                Some(entry.mtime_ns)
            }
            _ => None,
        };
        self.deferred.push(Deferred { path: old.path, kind: old.kind, parent_mtime_ns }).map_err(|e| ApplyError::Io {
            op: "queue deletions in",
            path: "a temporary file".into(),
            source: e,
        })
    }

    /// Removes a file or symlink if what is there is still of the kind ferry wrote.
    pub(super) fn unlink_if_ours(&mut self, path: &RelPath, kind: EntryKind) -> Result<bool, ApplyError> {
        let current = match self.current_kind(path) {
            Ok(kind) => kind,
            Err(_) => return Ok(false), // its folder is gone or not a folder: nothing of ours to remove
        };
        let ours = match kind {
            EntryKind::File => current == Some(FileType::RegularFile),
            EntryKind::Symlink => current == Some(FileType::Symlink),
            EntryKind::Dir => false,
        };
        if !ours {
            return Ok(false);
        }
        self.unlink(path)?;
        Ok(true)
    }

    /// The deletions `remove` put off, in manifest order: files first, each folder once it is left
    /// (and only if empty of destination-only content); parents get their mtimes back.
    pub(super) fn delete_deferred(&mut self) -> Result<(), ApplyError> {
        let deferred = std::mem::replace(&mut self.deferred, SpillQueue::new());
        if deferred.is_empty() {
            return Ok(());
        }
        let queue_err =
            |e| ApplyError::Io { op: "read queued deletions from", path: "a temporary file".into(), source: e };
        let mut dirs: Vec<Deferred> = Vec::new();
        for item in deferred.drain().map_err(queue_err)? {
            let item = item.map_err(queue_err)?;
            while let Some(top) = dirs.last() {
                if top.path.is_ancestor_of(&item.path) {
                    break;
                }
                let dir = dirs.pop().expect("dirs has a top");
                self.remove_deferred_dir(&dir)?;
            }
            if item.kind == EntryKind::Dir {
                dirs.push(item);
            } else if self.unlink_if_ours(&item.path, item.kind)? {
                self.restore_parent_mtime(&item)?;
            } else {
                // Gone already, or not ours: no manifest lists the path any more, nor its record.
                self.batch.gone.push(item.path);
            }
        }
        while let Some(dir) = dirs.pop() {
            self.remove_deferred_dir(&dir)?;
        }
        Ok(())
    }

    pub(super) fn remove_deferred_dir(&mut self, dir: &Deferred) -> Result<(), ApplyError> {
        if self.rmdir(&dir.path)? {
            self.report.deleted += 1;
            self.restore_parent_mtime(dir)
        } else {
            tracing::info!("kept folder {}: it holds files ferry did not write", dir.path);
            self.report.kept += 1;
            Ok(())
        }
    }

    pub(super) fn restore_parent_mtime(&mut self, item: &Deferred) -> Result<(), ApplyError> {
        let Some(mtime_ns) = item.parent_mtime_ns else { return Ok(()) };
        if item.path.parent().is_some_and(|p| p.is_root()) {
            self.root_mtime = Some(mtime_ns);
        }
        let dir = self.parent_dir_or_fail(&item.path)?;
        rustix::fs::futimens(&*dir, &times(mtime_ns)).map_err(io_err("set mtime of the folder of", &item.path))
    }

    pub(super) fn leave(&mut self, frame: Frame, committed: &mut ManifestWriter) -> Result<(), ApplyError> {
        match frame.leave {
            Leave::Keep(entry) if frame.dirty => {
                self.batch.dirs.push(DoneFolder { path: frame.path, mtime_ns: entry.mtime_ns, metadata: None });
            }
            Leave::Keep(_) | Leave::Failed => {}
            Leave::Update(entry) => {
                let metadata = Some((self.owner_of(&entry), entry.mode));
                self.batch.dirs.push(DoneFolder { path: frame.path, mtime_ns: entry.mtime_ns, metadata });
            }
            Leave::Delete => {
                if self.rmdir(&frame.path)? {
                    self.report.deleted += 1;
                } else {
                    tracing::info!("kept folder {}: it holds files ferry did not write", frame.path);
                    self.report.kept += 1;
                }
            }
            Leave::Replace { old, new } => {
                if !self.rmdir(&frame.path)? {
                    self.fail(&frame.path, "was a folder and holds files ferry did not write; not replaced");
                    committed.push(&old)?;
                } else if self.place_non_dir(None, &new, None)? {
                    self.report.deleted += 1;
                    committed.push(&new)?;
                }
            }
        }
        Ok(())
    }

    /// Removes an empty folder; `Ok(false)` when it still holds something.
    pub(super) fn rmdir(&mut self, path: &RelPath) -> Result<bool, ApplyError> {
        self.dir_cache = ParentDir::default();
        let dir = match self.parent_dir(path) {
            Ok(dir) => dir,
            Err(_) => return Ok(false),
        };
        match rustix::fs::unlinkat(&*dir, name_of(path).os(), AtFlags::REMOVEDIR) {
            Ok(()) => {
                self.mark_parent_dirty(path);
                Ok(true)
            }
            Err(Errno::NOTEMPTY | Errno::EXIST | Errno::NOENT | Errno::NOTDIR) => Ok(false),
            Err(e) => Err(io_err("remove folder", path)(e)),
        }
    }

    /// Makes the staged files durable with one sync (after the batch already syncing, if any), renames
    /// them into place, then sets the metadata of the folders that are done and records the new chunks'
    /// places in the index.
    pub(super) fn flush(&mut self) -> Result<(), ApplyError> {
        self.settle()?;
        self.start_sync()?;
        self.settle()
    }

    /// Hands the current batch to a thread of its own that syncs it and puts it into place (the batch
    /// before it must be settled).
    pub(super) fn start_sync(&mut self) -> Result<(), ApplyError> {
        debug_assert!(self.placing.is_none(), "one batch is put into place at a time");
        self.collect_made()?;
        let mut batch = std::mem::take(&mut self.batch);
        let paths = std::mem::take(&mut batch.by_path);
        let target = Target { root: self.root.clone(), staging: self.staging.clone(), index: self.index.clone() };
        if batch.staged.is_empty() && batch.touched.is_empty() {
            // Folders' metadata only: nothing to wait for.
            let placed = place(target, batch)?;
            self.place_spent.add(&placed.spent);
            return Ok(());
        }
        let work = Background::start("ferry-place", move || place(target, batch));
        self.placing = Some(Placing { paths, work });
        Ok(())
    }

    /// Waits for the batch being synced and put into place, if any.
    pub(super) fn settle(&mut self) -> Result<(), ApplyError> {
        let Some(placing) = self.placing.take() else {
            return Ok(());
        };
        let started = Instant::now();
        let placed = placing.work.wait().unwrap_or_else(|| {
            let why = io::Error::other("the thread putting a batch into place stopped (a bug)");
            Err(ApplyError::Io { op: "put into place", path: self.root.path().display().to_string(), source: why })
        })?;
        // Waiting until the sync ended is waiting for the disk; after it, for the renames and the index.
        let now = Instant::now();
        let synced = placed.synced.clamp(started, now);
        self.report.sync_wait += synced - started;
        self.report.place_wait += now - synced;
        self.place_spent.add(&placed.spent);
        // The planner finds these in the index now: it need not remember asking for them, and its
        // memory stays bounded by what is in flight, not by the round's size.
        self.planner.forget(&placed.hashes);
        // A file we read chunks from may just have been replaced.
        self.local_file = None;
        Ok(())
    }
}
