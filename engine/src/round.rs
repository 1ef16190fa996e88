//! A local round: bring a target folder to the state of a source folder on the same machine, through
//! the same scan and apply the network round uses. It is also how an operator fills a disk to ship.
//!
//! State lives in a folder of its own (never in the source or the target):
//!
//! ```text
//! STATE/source/cache       the quick-check cache of the last scan
//! STATE/source/manifest    the manifest of the last scan
//! STATE/target/manifest    what ferry has written in the target (the last committed round)
//! STATE/target/chunks.redb the chunk index of the target
//! STATE/lock               held while a round runs
//! ```

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::apply::{ApplyError, ApplyOptions, ApplyReport, ChunkBuf, ChunkSource, FetchError, Fetched, apply};
use crate::hash::RootHash;
use crate::index::{ChunkIndex, IndexError};
use crate::manifest::{ChunkRef, Entry, ManifestReader, ManifestWriter, RawEntry, RecordFileError, steps};
use crate::path::RelPath;
use crate::rootdir::RootDir;
use crate::scan::{ScanError, ScanOptions, ScanReport, scan};

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
}

/// What a local round did.
#[derive(Debug, Clone, Serialize)]
pub struct LocalRoundReport {
    /// The scan of the source.
    pub scan: ScanReport,
    /// The apply to the target.
    pub apply: ApplyReport,
    /// The root hash of what the target now holds.
    pub target_root: RootHash,
    /// True when the target now holds exactly the source's manifest.
    pub in_sync: bool,
    /// Wall time.
    #[serde(serialize_with = "crate::serialize_millis")]
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

/// Brings `target` to the state of `source`, keeping state in `state`.
pub fn local_round(
    source: &Path,
    target: &Path,
    state: &Path,
    options: &LocalRoundOptions,
) -> Result<LocalRoundReport, RoundError> {
    let started = Instant::now();
    let _lock = lock_state(state)?;
    let (source_state, target_state) = (state.join("source"), state.join("target"));
    for dir in [&source_state, &target_state] {
        std::fs::create_dir_all(dir).map_err(|e| RoundError::State { path: dir.clone(), source: e })?;
    }
    std::fs::create_dir_all(target).map_err(|e| RoundError::Target { path: target.to_owned(), source: e })?;

    let cache = source_state.join("cache");
    let new_manifest = source_state.join("manifest");
    let scan_report = scan(source, Some(&cache), &new_manifest, &cache, &options.scan)?;

    let committed_path = target_state.join("manifest");
    let old: Box<dyn Iterator<Item = Result<RawEntry, RecordFileError>>> = if committed_path.exists() {
        Box::new(ManifestReader::open(&committed_path)?.raw())
    } else {
        Box::new(std::iter::empty())
    };
    let new = ManifestReader::open(&new_manifest)?.raw();
    let mut index = ChunkIndex::open(&target_state.join("chunks.redb"))?;
    let mut chunk_source =
        LocalChunkSource::new(source).map_err(|e| RoundError::Target { path: source.to_owned(), source: e })?;
    let mut committed = ManifestWriter::create(&committed_path)?;
    let apply_report = apply(target, steps(old, new), &mut chunk_source, &mut index, &mut committed, &options.apply)?;
    let target_root = committed.finish()?;
    Ok(LocalRoundReport {
        in_sync: Some(target_root) == scan_report.root_hash,
        scan: scan_report,
        apply: apply_report,
        target_root,
        duration: started.elapsed(),
    })
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
}
