//! A local round: bring a target folder to the state of a source folder on the same machine, through
//! the same scan and apply the network round uses. It is also how an operator fills a disk to ship.
//!
//! State lives in a folder of its own (never in the source or the target):
//!
//! ```text
//! STATE/source/cache       the quick-check cache of the last scan
//! STATE/source/manifest    the manifest of the last scan
//! STATE/target/manifest    what ferry has written in the target (the last committed round)
//! STATE/target/chunks.redb the chunk index of the target, with what the disk said of each entry
//!                          ferry put there
//! STATE/target/findings    what the round's check of the target found
//! STATE/target/identity    the device and inode of the target folder ferry last filled
//! STATE/lock               held while a round runs
//! ```
//!
//! Each round first checks the target against the committed manifest ([`check_target`]): what is
//! missing is made again, what someone else changed is left alone (unless adopted) and keeps the
//! round from being in sync. A dry run ([`local_plan`]) writes nothing, not even in `STATE`.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::apply::{
    Adopt, ApplyError, ApplyOptions, ApplyReport, ChunkBuf, ChunkSource, FetchError, Fetched, Planner, Step, apply,
};
use crate::check::{
    CheckError, CheckOptions, CheckReport, Checked, Finding, FolderIdentity, check_target, checked_steps, held_entries,
    with_findings,
};
use crate::hash::RootHash;
use crate::index::{ChunkIndex, IndexError};
use crate::manifest::{ChunkRef, Entry, EntryKind, ManifestReader, ManifestWriter, RecordFileError, RecordReader};
use crate::path::RelPath;
use crate::rootdir::RootDir;
use crate::scan::{ScanError, ScanOptions, ScanReport, scan};
use crate::space::{NoSpace, Space};

/// Reads the chunks the target lacks straight from the source tree. A file changed since the scan
/// yields chunks that fail `apply`'s hash check: its entry fails, and the next round picks it up.
pub struct LocalChunkSource {
    root: RootDir,
    open: Option<(RelPath, File)>,
}

impl LocalChunkSource {
    /// A chunk source reading from the tree at `root`.
    pub fn new(root: &Path) -> io::Result<Self> {
        Ok(Self { root: RootDir::open(root)?, open: None })
    }
}

impl ChunkSource for LocalChunkSource {
    fn fetch(
        &mut self,
        entry: &Entry,
        offset: u64,
        chunk: &ChunkRef,
        out: &mut ChunkBuf,
    ) -> Result<Fetched, FetchError> {
        if self.open.as_ref().is_none_or(|(p, _)| *p != entry.path) {
            let file = self
                .root
                .open_file(&entry.path)
                .map_err(|e| FetchError(format!("cannot open the source file: {e}")))?;
            self.open = Some((entry.path.clone(), file));
        }
        let Some((_, file)) = &self.open else { unreachable!("opened above") };
        let out = out.owned();
        out.resize(chunk.len as usize, 0);
        // No hash check here: the file may have changed since its scan, and `apply` checks the chunk.
        file.read_exact_at(out, offset).map_err(|e| FetchError(format!("cannot read the source file: {e}")))?;
        Ok(Fetched::Unchecked)
    }
}

/// Options of a local round.
#[derive(Debug, Clone, Default)]
pub struct LocalRoundOptions {
    /// How to scan the source.
    pub scan: ScanOptions,
    /// How to apply to the target.
    pub apply: ApplyOptions,
    /// Devices, FIFOs and sockets in the source are left behind on purpose: they do not keep the
    /// target from matching.
    pub skip_special: bool,
}

/// What a local round did.
#[derive(Debug, Clone, Serialize)]
pub struct LocalRoundReport {
    /// The scan of the source.
    pub scan: ScanReport,
    /// The check of the target against what ferry had put there.
    pub check: CheckReport,
    /// The target was adopted whole: a first round, or a target folder that is not the one ferry
    /// last filled.
    pub adopted: bool,
    /// The apply to the target.
    pub apply: ApplyReport,
    /// The root hash of what the target now holds.
    pub target_root: RootHash,
    /// True when the target now holds exactly the source's manifest and the scan left nothing out
    /// (see [`ScanReport::not_carried`]).
    pub in_sync: bool,
    /// Wall time.
    #[serde(serialize_with = "crate::timing::serialize_millis")]
    pub duration: Duration,
}

/// A local round that could not run to its end.
#[derive(Debug, thiserror::Error)]
pub enum RoundError {
    /// The state folder could not be prepared.
    #[error("state folder {path}: {source}")]
    State {
        /// The folder or file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Another round holds the lock.
    #[error("another round is running with state folder {0} (its lock is held)")]
    Busy(PathBuf),
    /// The target folder could not be created or opened.
    #[error("target folder {path}: {source}")]
    Target {
        /// The folder.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Scanning failed.
    #[error(transparent)]
    Scan(#[from] ScanError),
    /// Applying failed; every file in the target is still either old or complete and new.
    #[error(transparent)]
    Apply(#[from] ApplyError),
    /// Reading or writing a manifest failed.
    #[error(transparent)]
    Manifest(#[from] RecordFileError),
    /// The chunk index failed.
    #[error(transparent)]
    Index(#[from] IndexError),
    /// The check of the target failed.
    #[error(transparent)]
    Check(#[from] CheckError),
    /// The round does not fit the target's free space: nothing was written.
    #[error(transparent)]
    NoSpace(#[from] NoSpace),
    /// The target lies inside the source: each round would copy the last one's copy again.
    #[error("the target {target} is inside the source {source_dir}: choose a target outside it")]
    Nested {
        /// The source folder.
        source_dir: PathBuf,
        /// The target folder.
        target: PathBuf,
    },
    /// The target looks like a disk that is not mounted (see [`FolderIdentity::looks_unmounted`]):
    /// nothing was written.
    #[error("{0} Nothing was written. To fill it anew, run the round with --adopt all.")]
    Unmounted(String),
}

/// Holds the state folder's lock for as long as it lives.
#[derive(Debug)]
pub struct StateLock(#[allow(dead_code)] File);

/// Takes the state folder's lock, or says that another round holds it.
pub fn lock_state(state: &Path) -> Result<StateLock, RoundError> {
    let state_err = |source| RoundError::State { path: state.to_owned(), source };
    std::fs::create_dir_all(state).map_err(state_err)?;
    let file = File::create(state.join("lock")).map_err(state_err)?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(StateLock(file)),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(RoundError::Busy(state.to_owned())),
        Err(e) => Err(state_err(e.into())),
    }
}

/// Refuses a target inside the source (or the same folder): the scan would read the target too.
fn refuse_nested(source: &Path, target: &Path) -> Result<(), RoundError> {
    let canonical = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_owned());
    let (source_c, mut target_c) = (canonical(source), canonical(target));
    if !target.exists() {
        // Not made yet: its nearest folder that exists decides.
        let mut missing = Vec::new();
        let mut at = target.to_owned();
        while !at.exists() {
            match (at.file_name().map(|n| n.to_owned()), at.parent()) {
                (Some(name), Some(parent)) => {
                    missing.push(name);
                    at = parent.to_owned();
                }
                _ => break,
            }
        }
        target_c = canonical(&at);
        target_c.extend(missing.iter().rev());
    }
    if target_c.starts_with(&source_c) {
        return Err(RoundError::Nested { source_dir: source.to_owned(), target: target.to_owned() });
    }
    Ok(())
}

/// A round does not fill a target that looks like a disk that is not mounted (see
/// [`FolderIdentity::looks_unmounted`]) unless it adopts the target whole (`--adopt all`).
fn refuse_unmounted(target_state: &Path, target: &Path, options: &LocalRoundOptions) -> Result<(), RoundError> {
    if options.apply.adopt == Adopt::All {
        return Ok(());
    }
    match FolderIdentity::read(&target_state.join("identity"), target).looks_unmounted() {
        Some(why) => Err(RoundError::Unmounted(why)),
        None => Ok(()),
    }
}

/// The state of the target side: the committed manifest, whether this round adopts the target
/// whole, and the identity to record.
struct TargetSide {
    committed: PathBuf,
    /// What the source removed and the target keeps (see [`crate::held_entries`]).
    kept: PathBuf,
    findings: PathBuf,
    identity: FolderIdentity,
    adopt_whole: bool,
}

impl TargetSide {
    fn new(target_state: &Path, target: &Path) -> Self {
        let committed = target_state.join("manifest");
        let identity = FolderIdentity::read(&target_state.join("identity"), target);
        // Adopted whole: the first round (a pre-filled target), or a target folder that is not the
        // one ferry filled.
        let adopt_whole = !committed.exists() || identity.changed;
        Self {
            committed,
            kept: target_state.join("kept"),
            findings: target_state.join("findings"),
            identity,
            adopt_whole,
        }
    }

    fn old(&self) -> Result<impl Iterator<Item = Result<Checked, RecordFileError>> + Send + use<>, RecordFileError> {
        // What the target keeps is on the old side too: gone from the source, it is kept again or,
        // with `delete`, removed.
        Ok(with_findings(held_entries(&self.committed, &self.kept)?, RecordReader::<Finding>::open(&self.findings)?))
    }

    fn record_identity(&self) -> Result<(), RoundError> {
        self.identity.record().map_err(|e| RoundError::State { path: self.committed.clone(), source: e })
    }
}

/// Brings `target` to the state of `source`, keeping state in `state`.
pub fn local_round(
    source: &Path,
    target: &Path,
    state: &Path,
    options: &LocalRoundOptions,
) -> Result<LocalRoundReport, RoundError> {
    let started = Instant::now();
    refuse_nested(source, target)?;
    let _lock = lock_state(state)?;
    let (source_state, target_state) = (state.join("source"), state.join("target"));
    for dir in [&source_state, &target_state] {
        std::fs::create_dir_all(dir).map_err(|e| RoundError::State { path: dir.clone(), source: e })?;
    }
    refuse_unmounted(&target_state, target, options)?;
    std::fs::create_dir_all(target).map_err(|e| RoundError::Target { path: target.to_owned(), source: e })?;

    let cache = source_state.join("cache");
    let new_manifest = source_state.join("manifest");
    let scan_report = scan(source, Some(&cache), &new_manifest, &cache, &options.scan)?;

    let side = TargetSide::new(&target_state, target);
    let mut index = ChunkIndex::open(&target_state.join("chunks.redb"))?;
    let check_options = CheckOptions { adopt: side.adopt_whole, read_only: false };
    let check = check_target(target, (&side.committed, &side.kept), &mut index, &side.findings, check_options)?;
    // Before anything is written: does the round fit? (One more pass over both manifests.)
    let steps = checked_steps(side.old()?, ManifestReader::open(&new_manifest)?.raw());
    let space = space_of(steps, target, &index)?;
    if let Some(no_space) = space.refusal(target) {
        return Err(no_space.into());
    }
    let new = ManifestReader::open(&new_manifest)?.raw();
    let mut chunk_source =
        LocalChunkSource::new(source).map_err(|e| RoundError::Target { path: source.to_owned(), source: e })?;
    let mut committed = ManifestWriter::create(&side.committed)?;
    let apply_options = ApplyOptions {
        adopt: if side.adopt_whole { Adopt::All } else { options.apply.adopt.clone() },
        kept: Some(side.kept.clone()),
        ..options.apply.clone()
    };
    let steps = checked_steps(side.old()?, new);
    let apply_report = apply(target, steps, &mut chunk_source, &mut index, &mut committed, &apply_options)?;
    let target_root = committed.finish()?;
    side.record_identity()?;
    let _ = std::fs::remove_file(&side.findings);
    Ok(LocalRoundReport {
        in_sync: Some(target_root) == scan_report.root_hash && scan_report.whole(options.skip_special),
        scan: scan_report,
        check,
        adopted: side.adopt_whole,
        apply: apply_report,
        target_root,
        duration: started.elapsed(),
    })
}

/// The space `steps` need in `target`. A local round does not index what is in its target before
/// its first round, so every file it writes counts (see [`Space::count`]), but what `index` records
/// of a large file in progress.
fn space_of(
    steps: impl Iterator<Item = Result<Step, RecordFileError>>,
    target: &Path,
    index: &ChunkIndex,
) -> Result<Space, RoundError> {
    let space = Space::at(target).map_err(|e| RoundError::Target { path: target.to_owned(), source: e })?;
    let mut space = space.with_index(index, false);
    for step in steps {
        space.count(&step?);
    }
    Ok(space)
}

/// What a local round would do (`--dry-run`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct LocalPlan {
    /// Entries in the source.
    pub entries: u64,
    /// Files the round would write.
    pub files: u64,
    /// Their bytes (before deduplication).
    pub changed_bytes: u64,
    /// Bytes it would copy from the source (after deduplication against the target).
    pub copy_bytes: u64,
    /// Files whose metadata only would change.
    pub metadata: u64,
    /// Folders it would create.
    pub folders: u64,
    /// Symlinks and hard links it would make.
    pub links: u64,
    /// Paths the source no longer has that would be removed (`delete`) or kept.
    pub gone: u64,
    /// The check of the target.
    pub check: CheckReport,
    /// The target would be adopted whole.
    pub adopted: bool,
    /// The space the round needs in the target's filesystem, its margin included.
    pub space_needed: u64,
    /// The space free there now.
    pub space_available: u64,
    /// Wall time.
    #[serde(serialize_with = "crate::timing::serialize_millis")]
    pub duration: Duration,
}

/// Plans a local round without writing anything: not in the target, not in `state` (its scan cache
/// and chunk index are read; what the plan needs to write goes to a temporary folder).
pub fn local_plan(
    source: &Path,
    target: &Path,
    state: &Path,
    options: &LocalRoundOptions,
) -> Result<LocalPlan, RoundError> {
    let started = Instant::now();
    refuse_nested(source, target)?;
    refuse_unmounted(&state.join("target"), target, options)?;
    let scratch = tempfile::tempdir().map_err(|e| RoundError::State { path: std::env::temp_dir(), source: e })?;
    let scratch_err = |e| RoundError::State { path: scratch.path().to_owned(), source: e };
    let (source_state, target_state) = (state.join("source"), state.join("target"));
    let new_manifest = scratch.path().join("manifest");
    let cache = source_state.join("cache");
    let cache = cache.exists().then_some(cache);
    let scan_report = scan(source, cache.as_deref(), &new_manifest, &scratch.path().join("cache"), &options.scan)?;

    // The index, copied: opening it writes.
    let index_path = scratch.path().join("chunks.redb");
    if target_state.join("chunks.redb").exists() {
        std::fs::copy(target_state.join("chunks.redb"), &index_path).map_err(scratch_err)?;
    }
    let mut index = ChunkIndex::open(&index_path)?;
    let mut side = TargetSide::new(&target_state, target);
    side.findings = scratch.path().join("findings");
    let check_options = CheckOptions { adopt: side.adopt_whole, read_only: true };
    let check = check_target(target, (&side.committed, &side.kept), &mut index, &side.findings, check_options)?;
    let mut plan = LocalPlan { entries: scan_report.entries, adopted: side.adopt_whole, ..LocalPlan::default() };
    let mut planner = Planner::default();
    planner.distrust(crate::check::stale_paths(&check, &side.findings)?);
    let space = Space::at(target).map_err(|e| RoundError::Target { path: target.to_owned(), source: e })?;
    let mut space = space.with_index(&index, false);
    for step in checked_steps(side.old()?, ManifestReader::open(&new_manifest)?.raw()) {
        let step = step?;
        space.count(&step);
        let Step::Apply(pair) = step else { continue };
        let Some(new) = &pair.new else {
            plan.gone += u64::from(pair.old.is_some());
            continue;
        };
        if pair.old.as_ref() == Some(new) {
            continue;
        }
        match new.kind {
            EntryKind::Dir => plan.folders += u64::from(pair.old.is_none()),
            EntryKind::Symlink => plan.links += 1,
            EntryKind::File if new.hard_link_to.is_some() => plan.links += 1,
            EntryKind::File if Planner::writes_content(&pair) => {
                plan.files += 1;
                plan.changed_bytes += new.size;
                plan.copy_bytes += planner.plan(&index, &pair)?.iter().map(|n| u64::from(n.chunk.len)).sum::<u64>();
            }
            EntryKind::File => plan.metadata += 1,
        }
    }
    plan.check = check;
    (plan.space_needed, plan.space_available) = (space.wanted(), space.available);
    plan.duration = started.elapsed();
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::Step;
    use crate::hash::ChunkHash;
    use crate::manifest::MergeJoin;

    /// A chunk source that has every chunk at hand, as the network round's window has what arrived.
    struct Holding(LocalChunkSource);

    impl ChunkSource for Holding {
        fn fetch(
            &mut self,
            entry: &Entry,
            offset: u64,
            chunk: &ChunkRef,
            out: &mut ChunkBuf,
        ) -> Result<Fetched, FetchError> {
            self.0.fetch(entry, offset, chunk, out)
        }

        fn holds(&mut self, _: &ChunkHash) -> bool {
            true
        }
    }

    /// A first local round of a file `a`, then a copy of it as `b` applied with a source that holds
    /// its chunks or not.
    fn copy_applied(holding: bool) -> ApplyReport {
        let dir = tempfile::tempdir().unwrap();
        let (source, target, state) = (dir.path().join("source"), dir.path().join("target"), dir.path().join("state"));
        std::fs::create_dir(&source).unwrap();
        let mut bytes = vec![0u8; 300_000];
        blake3::Hasher::new().finalize_xof().fill(&mut bytes);
        std::fs::write(source.join("a"), &bytes).unwrap();
        local_round(&source, &target, &state, &LocalRoundOptions::default()).unwrap();

        std::fs::write(source.join("b"), &bytes).unwrap();
        let (cache, manifest) = (state.join("source/cache"), state.join("source/manifest.2"));
        scan(&source, Some(&cache), &manifest, &state.join("source/cache.2"), &ScanOptions::default()).unwrap();
        let old = ManifestReader::open(&state.join("target/manifest")).unwrap();
        let new = ManifestReader::open(&manifest).unwrap();
        let mut index = ChunkIndex::open(&state.join("target/chunks.redb")).unwrap();
        let mut committed = ManifestWriter::create(&state.join("target/manifest.2")).unwrap();
        let (mut local, mut held) =
            (LocalChunkSource::new(&source).unwrap(), Holding(LocalChunkSource::new(&source).unwrap()));
        let chunks: &mut dyn ChunkSource = if holding { &mut held } else { &mut local };
        let report = apply(
            &target,
            MergeJoin::new(old, new).map(|p| p.map(Step::from)),
            chunks,
            &mut index,
            &mut committed,
            &ApplyOptions::default(),
        )
        .unwrap();
        committed.finish().unwrap();
        assert_eq!(std::fs::read(target.join("b")).unwrap(), bytes);
        report
    }

    #[test]
    fn a_chunk_the_source_holds_is_taken_from_it_and_others_from_the_target() {
        let from_target = copy_applied(false);
        assert!(from_target.chunks_local > 1, "{from_target:?}");
        assert_eq!(from_target.chunks_fetched, 0, "{from_target:?}");
        let held = copy_applied(true);
        assert_eq!(held.chunks_fetched, from_target.chunks_local, "{held:?}");
        assert_eq!(held.chunks_local, 0, "{held:?}");
    }

    /// One round's steps through an applier planned ahead of it as the network round's transfer
    /// plans (every step planned, then every step applied; `stop`: the round ends before the
    /// last), with a source that counts what it hands in (one that is never cut). The needs asked
    /// for, and the chunks fetched.
    fn planned_ahead(
        (source, target, state): (&Path, &Path, &Path),
        steps: Vec<Step>,
        stop: bool,
    ) -> (Vec<crate::apply::Needed>, u64) {
        std::fs::create_dir_all(target).unwrap();
        std::fs::create_dir_all(state).unwrap();
        let mut index = ChunkIndex::open(&state.join("chunks.redb")).unwrap();
        let mut committed = ManifestWriter::create(&state.join("committed")).unwrap();
        let mut counting = Cut { inner: LocalChunkSource::new(source).unwrap(), left: usize::MAX };
        let options = ApplyOptions::default();
        let mut applier = crate::Applier::new(target, &mut counting, &mut index, &mut committed, &options).unwrap();
        let mut needs = Vec::new();
        for step in &steps {
            needs.extend(match step {
                Step::Prefix(prefix) => applier.plan_prefix(prefix).unwrap(),
                step => step.pair().map_or_else(Vec::new, |pair| applier.plan(pair).unwrap()),
            });
        }
        let last = steps.len() - usize::from(stop);
        for step in steps.into_iter().take(last) {
            applier.step(step).unwrap();
        }
        if stop {
            applier.flush_batch().unwrap();
            drop(applier);
        } else {
            applier.finish().unwrap();
        }
        (needs, (usize::MAX - counting.left) as u64)
    }

    /// A large file listed as its source cut it is built from its prefixes, each chunk asked for
    /// and fetched once; a round that ends before its entry keeps what the prefixes brought, and
    /// the next one asks for the rest only.
    #[test]
    fn a_large_file_is_built_from_its_prefixes_and_a_round_cut_before_its_entry_keeps_them() {
        let dir = tempfile::tempdir().unwrap();
        let (source, state) = (dir.path().join("source"), dir.path().join("state"));
        for folder in [&source, &state] {
            std::fs::create_dir_all(folder).unwrap();
        }
        let mut bytes = vec![0u8; 30 << 20];
        blake3::Hasher::new().finalize_xof().fill(&mut bytes);
        std::fs::write(source.join("large"), &bytes).unwrap();
        scan(&source, None, &state.join("manifest"), &state.join("cache"), &ScanOptions::default()).unwrap();
        let entries: Vec<Entry> =
            ManifestReader::open(&state.join("manifest")).unwrap().collect::<Result<_, _>>().unwrap();
        let (root, file) = (entries[0].clone(), entries[1].clone());
        // Three prefixes of a third of the chunks each, then the entry.
        let third = file.chunks.len() / 3;
        let mut offset = 0;
        let prefixes: Vec<crate::FilePrefix> = (0..3)
            .map(|i| {
                let chunks = file.chunks[i * third..(i + 1) * third].to_vec();
                let prefix = crate::FilePrefix { place: 1, path: file.path.clone(), offset, chunks, size: file.size };
                offset += prefix.chunks.iter().map(|c| u64::from(c.len)).sum::<u64>();
                prefix
            })
            .collect();
        let pair = |entry: &Entry| Step::from(crate::Pair { old: None, new: Some(entry.clone()) });
        let steps = |target: &str| {
            let mut steps = vec![pair(&root)];
            steps.extend(prefixes.iter().map(|prefix| Step::Prefix(Box::new(prefix.clone()))));
            steps.push(pair(&file));
            (dir.path().join(target), steps)
        };

        let (target, all) = steps("whole");
        let (needs, fetched) = planned_ahead((&source, &target, &state.join("whole")), all, false);
        assert_eq!(std::fs::read(target.join("large")).unwrap(), bytes);
        assert_eq!((needs.len(), fetched), (file.chunks.len(), file.chunks.len() as u64), "each chunk once");
        assert!(needs.windows(2).all(|w| w[0].offset < w[1].offset), "in the file's order");

        // Cut after the prefixes (the source stopped while it read the file's end).
        let (target, cut) = steps("cut");
        let (_, fetched) = planned_ahead((&source, &target, &state.join("cut")), cut, true);
        assert_eq!(fetched, 3 * third as u64);
        assert!(!target.join("large").exists());
        let (needs, fetched) =
            planned_ahead((&source, &target, &state.join("cut")), vec![pair(&root), pair(&file)], false);
        assert_eq!(std::fs::read(target.join("large")).unwrap(), bytes);
        assert_eq!((needs.len(), fetched), (file.chunks.len() - 3 * third, (file.chunks.len() - 3 * third) as u64));
    }

    /// A source that hands in `left` chunks and then fails, as a connection that was cut.
    struct Cut {
        inner: LocalChunkSource,
        left: usize,
    }

    impl ChunkSource for Cut {
        fn fetch(
            &mut self,
            entry: &Entry,
            offset: u64,
            chunk: &ChunkRef,
            out: &mut ChunkBuf,
        ) -> Result<Fetched, FetchError> {
            self.left = self.left.checked_sub(1).ok_or_else(|| FetchError("the connection was cut".into()))?;
            self.inner.fetch(entry, offset, chunk, out)
        }
    }

    /// A sparse file arrives sparse, as a small file and as a large one: its runs of zeros are holes.
    #[test]
    fn a_sparse_file_stays_sparse() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let (source, target, state) = (dir.path().join("source"), dir.path().join("target"), dir.path().join("state"));
        std::fs::create_dir(&source).unwrap();
        let sizes = [("small", 3u64 << 20), ("large", 40 << 20)];
        for (name, size) in sizes {
            let file = File::create(source.join(name)).unwrap();
            file.set_len(size).unwrap();
            file.write_all_at(b"a few bytes in the middle", size / 2).unwrap();
        }
        assert!(local_round(&source, &target, &state, &LocalRoundOptions::default()).unwrap().in_sync);
        for (name, size) in sizes {
            assert!(std::fs::read(target.join(name)).unwrap() == std::fs::read(source.join(name)).unwrap());
            let allocated = std::fs::metadata(target.join(name)).unwrap().blocks() * 512;
            assert!(allocated < 2 << 20, "{name}: {allocated} bytes allocated of {size}");
        }
    }

    /// What the source removed is kept without `delete`, and stays ferry's: a later round with
    /// `delete` removes it, however many rounds kept it; what someone put in its place meanwhile stays.
    #[test]
    fn what_rounds_kept_a_later_round_with_delete_removes_unless_it_was_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let (source, target, state) = (dir.path().join("source"), dir.path().join("target"), dir.path().join("state"));
        std::fs::create_dir_all(source.join("old/deep")).unwrap();
        for name in ["a", "b", "old/deep/c", "theirs"] {
            std::fs::write(source.join(name), name.as_bytes()).unwrap();
        }
        let round = |delete: bool| {
            let options = LocalRoundOptions {
                apply: ApplyOptions { delete, ..ApplyOptions::default() },
                ..LocalRoundOptions::default()
            };
            local_round(&source, &target, &state, &options).unwrap()
        };
        assert!(round(false).in_sync);
        for name in ["a", "theirs"] {
            std::fs::remove_file(source.join(name)).unwrap();
        }
        std::fs::remove_dir_all(source.join("old")).unwrap();
        let kept = round(false);
        assert!(kept.in_sync && kept.apply.kept == 5, "{:?}", kept.apply);
        // Another round without delete keeps them again; meanwhile the administrator puts a file of
        // their own where ferry's was.
        assert_eq!(round(false).apply.kept, 5);
        std::fs::remove_file(target.join("theirs")).unwrap();
        std::fs::write(target.join("theirs"), b"the administrator's").unwrap();
        let deleted = round(true);
        assert!(!target.join("a").exists() && !target.join("old").exists(), "{:?}", deleted.apply);
        assert_eq!(std::fs::read(target.join("theirs")).unwrap(), b"the administrator's");
        assert_eq!(deleted.apply.deleted, 4, "{:?}", deleted.apply);
        assert!(target.join("b").exists());
        // Nothing is kept any more: the next round with delete has nothing to remove.
        assert_eq!(round(true).apply.deleted, 0);
        // A file the source made a folder: its record goes with it, the folder's file gets one.
        std::fs::remove_file(source.join("b")).unwrap();
        std::fs::create_dir(source.join("b")).unwrap();
        std::fs::write(source.join("b/inner"), b"inner").unwrap();
        assert!(round(true).in_sync);
        // No record is left of a path no manifest lists (removed by ferry, or not ferry's to remove).
        let index = ChunkIndex::open(&state.join("target/chunks.redb")).unwrap();
        let paths: Vec<RelPath> =
            ["a", "old/deep/c", "theirs", "b", "b/inner"].map(|p| RelPath::new(p.as_bytes().to_vec()).unwrap()).into();
        let recorded: Vec<bool> = index.placed(&paths).unwrap().iter().map(|r| r.placed.is_some()).collect();
        assert_eq!(recorded, [false, false, false, false, true]);
    }

    #[test]
    fn a_large_file_cut_off_is_resumed_from_what_arrived_and_its_partial_file_removed_at_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let (source, target, state) = (dir.path().join("source"), dir.path().join("target"), dir.path().join("state"));
        std::fs::create_dir_all(&source).unwrap();
        std::fs::create_dir_all(&target).unwrap();
        std::fs::create_dir_all(&state).unwrap();
        let mut bytes = vec![0u8; 24 << 20];
        blake3::Hasher::new().update(b"big").finalize_xof().fill(&mut bytes);
        std::fs::write(source.join("big"), &bytes).unwrap();
        let manifest = state.join("manifest");
        scan(&source, None, &manifest, &state.join("cache"), &ScanOptions::default()).unwrap();
        let entry = RelPath::new(&b"big"[..]).unwrap();
        let found = ManifestReader::open(&manifest).unwrap().map(Result::unwrap).find(|e| e.path == entry);
        let chunks = found.unwrap().chunks;
        assert!(chunks.len() > 8, "{} chunks", chunks.len());
        let mut index = ChunkIndex::open(&state.join("chunks.redb")).unwrap();
        let steps = || {
            let empty = std::iter::empty::<Result<Entry, RecordFileError>>();
            MergeJoin::new(empty, ManifestReader::open(&manifest).unwrap()).map(|p| p.map(Step::from))
        };

        // The first attempt gets half the chunks, then the source is gone: no commit, no finish.
        let half = chunks.len() / 2;
        let mut cut = Cut { inner: LocalChunkSource::new(&source).unwrap(), left: half };
        let mut committed = ManifestWriter::create(&state.join("manifest.1")).unwrap();
        {
            let mut applier =
                crate::apply::Applier::new(&target, &mut cut, &mut index, &mut committed, &ApplyOptions::default())
                    .unwrap();
            for step in steps() {
                applier.step(step.unwrap()).unwrap();
            }
        }
        assert!(!target.join("big").exists(), "nothing at the final path");
        let arrived: u64 = chunks[..half].iter().map(|c| u64::from(c.len)).sum();
        // What arrived is durable, and the index knows where.
        for chunk in &chunks[..half] {
            let location = index.get(&chunk.hash).unwrap().expect("every chunk that arrived is in the index");
            assert!(location.path.as_bytes().starts_with(b".ferry-staging/partial-"), "{location:?}");
        }
        assert_eq!(index.get(&chunks[half].hash).unwrap(), None);

        // The next attempt asks the source only for the rest.
        let step =
            steps().map(Result::unwrap).find(|s| s.pair().is_some_and(|p| p.new.as_ref().unwrap().path == entry));
        let planned = Planner::default().plan(&index, step.unwrap().pair().unwrap());
        let asked: u64 = planned.unwrap().iter().map(|n| u64::from(n.chunk.len)).sum();
        assert_eq!(asked, bytes.len() as u64 - arrived);
        let mut local = LocalChunkSource::new(&source).unwrap();
        let mut committed = ManifestWriter::create(&state.join("manifest.2")).unwrap();
        let report = apply(&target, steps(), &mut local, &mut index, &mut committed, &ApplyOptions::default()).unwrap();
        assert_eq!((report.bytes_local, report.bytes_fetched), (arrived, bytes.len() as u64 - arrived), "{report:?}");
        assert_eq!(std::fs::read(target.join("big")).unwrap(), bytes);
        assert!(!target.join(crate::STAGING_DIR).exists(), "the partial file is gone with the staging folder");
        let location = index.get(&chunks[0].hash).unwrap().unwrap();
        assert_eq!(location.path.as_bytes(), b"big", "the index points at the file in place");
    }
}
