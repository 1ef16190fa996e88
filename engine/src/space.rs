//! The disk space a round needs in its target, against what there is: checked before anything is
//! written where the round's steps are known, and as they are made where its list streams.

use std::path::{Path, PathBuf};

use crate::apply::{LARGE_FILE, Planner, Step, partial_name};
use crate::check::CheckReport;
use crate::held::ChunkList;
use crate::human;
use crate::index::ChunkIndex;
use crate::manifest::Entry;
use crate::path::STAGING_DIR;

/// The disk space a round needs in its target, and what there is.
#[derive(Debug, Clone)]
pub struct Space {
    /// Files the round writes.
    pub files: u64,
    /// Their bytes: each is built beside the old version before it replaces it.
    pub needed: u64,
    /// Free bytes for the target (for an unprivileged user), when the round began.
    pub available: u64,
    /// The filesystem's size.
    pub total: u64,
    /// The target's staging folder, where an interrupted round left its large files in progress.
    staging: PathBuf,
    /// The chunk index: its records of those files say what a round keeps of them, and, where
    /// `taken_over`, what the indexing before a first round found in place.
    index: Option<ChunkIndex>,
    taken_over: bool,
    /// The large file counted by [`Space::add_streamed`] whose entry has not come, and its size.
    streamed: Option<(crate::path::RelPath, u64)>,
}

/// May the space preflight leave out the files a destination's first round takes over in place
/// ([`Space::with_index`])? Only where the round adopts its target whole, its check found nothing
/// gone or changed, and the indexing before it found files there; otherwise (every round into an
/// empty target) the preflight looks nothing up for them.
pub fn taken_over(adopt_whole: bool, check: &CheckReport, index: &ChunkIndex) -> bool {
    adopt_whole && !check.entries_differ() && index.has_indexed()
}

/// A round that does not fit its target's free space.
#[derive(Debug, thiserror::Error)]
#[error(
    "not enough space in {}: the round writes {} ({}), which needs {} with the margin, and {} is free; free some space or grow the filesystem, then run the round again",
    target.display(),
    human::counted(space.files, "file"),
    human::bytes(space.needed),
    human::bytes(space.wanted()),
    human::bytes(space.available)
)]
pub struct NoSpace {
    /// The target.
    pub target: PathBuf,
    /// What the round needs, and what there is.
    pub space: Box<Space>,
}

impl Space {
    /// Nothing counted yet, against the free space of `target`'s filesystem now (of the nearest
    /// folder above it that exists, for a target not made yet).
    pub fn at(target: &Path) -> std::io::Result<Self> {
        let mut folder = target;
        let stat = loop {
            match (rustix::fs::statvfs(folder), folder.parent()) {
                (Err(rustix::io::Errno::NOENT), Some(parent)) => folder = parent,
                (stat, _) => break stat?,
            }
        };
        Ok(Self {
            files: 0,
            needed: 0,
            available: stat.f_bavail.saturating_mul(stat.f_frsize),
            total: stat.f_blocks.saturating_mul(stat.f_frsize),
            staging: target.join(STAGING_DIR),
            index: None,
            taken_over: false,
            streamed: None,
        })
    }

    /// Counts with what the target's chunk `index` records: of a large file in progress, only what
    /// its partial file lacks (see [`Space::add_file`]); and, where the round takes its target over
    /// (see [`taken_over`]), nothing of a file the indexing before it found in place with this
    /// content (a pre-filled target; [`IndexedFile`](crate::IndexedFile)), which is not written
    /// again. Without it, every file counts whole.
    pub fn with_index(self, index: &ChunkIndex, taken_over: bool) -> Self {
        Self { index: Some(index.clone()), taken_over, ..self }
    }

    /// Counts `step` if it writes a file's content (a file the target does not hold as the new
    /// manifest has it: new, changed, or found gone or changed in place by the check); says whether
    /// it does.
    pub fn count(&mut self, step: &Step) -> bool {
        let Some(pair) = step.pair().filter(|pair| Planner::writes_content(pair)) else { return false };
        let Some(new) = &pair.new else { return false };
        if pair.old.is_none() && self.in_place(new) {
            return false;
        }
        self.add_file(new)
    }

    /// Did the indexing before a first round find `new`'s content at its path? One lookup per file,
    /// and only where the round takes its target over.
    fn in_place(&self, new: &Entry) -> bool {
        let Some(index) = self.index.as_ref().filter(|_| self.taken_over) else { return false };
        index.indexed(&new.path).ok().flatten().is_some_and(|found| found.held(&new.chunks))
    }

    /// Counts `new`, a file the round writes; `true`. A large file that an interrupted round left in
    /// progress is built on its partial file where the chunks recorded of it still begin the file,
    /// and those bytes already take their room: only the rest counts (else a file that takes several
    /// nights to arrive on a nearly full disk would be refused the night it could finish). Where they
    /// no longer begin it, it is built anew beside them, and counts whole.
    pub fn add_file(&mut self, new: &Entry) -> bool {
        // Counted when its first chunks came: only what it grew since.
        if let Some((_, size)) = self.streamed.take_if(|(path, _)| *path == new.path) {
            self.needed = self.needed.saturating_add(new.size.saturating_sub(size));
            return true;
        }
        let in_progress = if new.size >= LARGE_FILE { self.in_progress(new) } else { 0 };
        self.files += 1;
        self.needed = self.needed.saturating_add(new.size.saturating_sub(in_progress));
        true
    }

    /// Counts a large file listed as its source reads it, `size` bytes at `path`, when its first
    /// chunks come, before any is written: less what its partial file holds (an interrupted
    /// round's), which it is built on when that still begins it. Its entry, when it comes, adds only
    /// what it grew since.
    pub fn add_streamed(&mut self, path: &crate::path::RelPath, size: u64) -> bool {
        use std::os::unix::ffi::OsStrExt;
        let partial = self.staging.join(std::ffi::OsStr::from_bytes(&partial_name(path)));
        let held = std::fs::symlink_metadata(partial).ok().filter(std::fs::Metadata::is_file).map_or(0, |m| m.len());
        self.files += 1;
        self.needed = self.needed.saturating_add(size.saturating_sub(held));
        self.streamed = Some((path.clone(), size));
        true
    }

    /// How much of `new` its partial file holds, that the round keeps in place.
    fn in_progress(&self, new: &Entry) -> u64 {
        use std::os::unix::ffi::OsStrExt;
        let Some(index) = &self.index else { return 0 };
        let name = partial_name(&new.path);
        let Ok(Some(seal)) = index.partial_seal(&name) else { return 0 };
        let Some((_, kept)) = ChunkList::sealed(&new.chunks, (seal.len, &seal.digest)) else { return 0 };
        // A regular file in the staging folder, itself a folder: nothing is followed.
        if !std::fs::symlink_metadata(&self.staging).is_ok_and(|m| m.is_dir()) {
            return 0;
        }
        let partial = self.staging.join(std::ffi::OsStr::from_bytes(&name));
        let len = std::fs::symlink_metadata(partial).ok().filter(std::fs::Metadata::is_file).map_or(0, |m| m.len());
        kept.len.min(len)
    }

    /// Room kept free beyond the round's own bytes: 2% of the filesystem (at most 1 GiB), plus 1 MiB
    /// for folders and ferry's state.
    pub fn margin(&self) -> u64 {
        (self.total / 50).min(1 << 30) + (1 << 20)
    }

    /// What the round needs with the margin.
    pub fn wanted(&self) -> u64 {
        self.needed.saturating_add(self.margin())
    }

    /// Why the round cannot go on in `target`, if it cannot.
    pub fn refusal(&self, target: &Path) -> Option<NoSpace> {
        (self.wanted() > self.available).then(|| NoSpace { target: target.to_owned(), space: Box::new(self.clone()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::ChunkHash;
    use crate::manifest::{ChunkRef, Entry, EntryKind, Pair};
    use crate::path::RelPath;
    use std::os::unix::ffi::OsStrExt;

    fn file(name: &str, size: u64, seed: u8) -> Entry {
        Entry {
            size,
            chunks: vec![ChunkRef { hash: ChunkHash::of(&[seed]), len: size as u32 }],
            ..Entry::new(RelPath::new(name.as_bytes()).unwrap(), EntryKind::File)
        }
    }

    #[test]
    fn only_files_whose_content_the_round_writes_count() {
        let dir = tempfile::tempdir().unwrap();
        // A target not made yet: the free space of the folder it will be made in.
        let mut space = Space::at(&dir.path().join("not/made/yet")).unwrap();
        assert!(space.available > 0 && space.total >= space.available);
        let steps = [
            Pair { old: None, new: Some(file("new", 100, 1)) },
            Pair { old: Some(file("changed", 50, 1)), new: Some(file("changed", 70, 2)) },
            Pair { old: Some(file("same", 30, 3)), new: Some(Entry { mode: 0o600, ..file("same", 30, 3) }) },
            Pair { old: Some(file("gone", 40, 4)), new: None },
        ];
        let counted: Vec<bool> = steps.into_iter().map(|pair| space.count(&Step::from(pair))).collect();
        assert_eq!(counted, [true, true, false, false]);
        assert_eq!((space.files, space.needed), (2, 170));

        let full = Space { available: space.wanted() - 1, ..space.clone() };
        let refusal = full.refusal(Path::new("/srv/migration")).expect("does not fit").to_string();
        assert!(refusal.contains("/srv/migration") && refusal.contains("2 files (170 B)"), "{refusal}");
        assert!(Space { available: space.wanted(), ..space }.refusal(Path::new("/srv")).is_none());
    }

    #[test]
    fn a_file_listed_as_it_is_read_counts_once_less_what_its_partial_file_holds() {
        let target = tempfile::tempdir().unwrap();
        let mut space = Space::at(target.path()).unwrap();
        let large = file("server/backup.tgz", 300, 5);
        std::fs::create_dir_all(target.path().join(STAGING_DIR)).unwrap();
        let partial = target.path().join(STAGING_DIR).join(std::ffi::OsStr::from_bytes(&partial_name(&large.path)));
        std::fs::write(partial, [0; 40]).unwrap();
        assert!(space.add_streamed(&large.path, 250));
        assert_eq!((space.files, space.needed), (1, 210), "what an earlier round left is not counted");
        // Its entry: only what it grew since its first chunks came; another file whole.
        space.add_file(&large);
        assert_eq!((space.files, space.needed), (1, 260));
        space.add_file(&file("other", 70, 6));
        assert_eq!((space.files, space.needed), (2, 330));
    }

    #[test]
    fn a_large_file_in_progress_counts_only_what_its_partial_file_lacks() {
        let (target, state) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let staging = target.path().join(STAGING_DIR);
        std::fs::create_dir(&staging).unwrap();
        let index = ChunkIndex::open(&state.path().join("chunks.redb")).unwrap();
        // A file of 40 chunks of 1 MiB, of which the first 30 arrived in a round that did not finish.
        let large = |name: &str, seed: u8| Entry {
            size: 40 << 20,
            chunks: (0..40).map(|i| ChunkRef { hash: ChunkHash::of(&[seed, i]), len: 1 << 20 }).collect(),
            ..Entry::new(RelPath::new(name.as_bytes()).unwrap(), EntryKind::File)
        };
        let arrived = |entry: &Entry, symlink: bool| {
            let name = partial_name(&entry.path);
            let path = staging.join(std::str::from_utf8(&name).unwrap());
            if symlink {
                std::fs::File::create(target.path().join("elsewhere")).unwrap().set_len(30 << 20).unwrap();
                std::os::unix::fs::symlink(target.path().join("elsewhere"), &path).unwrap();
            } else {
                // Sparse: its length is what counts.
                std::fs::File::create(&path).unwrap().set_len(30 << 20).unwrap();
            }
            let digest = ChunkList::of(&entry.chunks[..30]);
            let seal = crate::index::PartialSeal { ino: 1, ctime_ns: 1, len: 30 << 20, digest };
            index.clone().record_partial(&name, [], Some(seal), false).unwrap();
        };
        arrived(&large("archive", 1), false);
        arrived(&large("changed", 2), false);
        arrived(&large("linked", 4), true);

        let count = |space: &mut Space| {
            // "changed" is another file now: what arrived no longer begins it.
            for entry in [large("archive", 1), large("changed", 3), large("linked", 4), large("new", 5)] {
                assert!(space.count(&Step::from(Pair { old: None, new: Some(entry) })));
            }
        };
        let mut space = Space::at(target.path()).unwrap().with_index(&index, false);
        count(&mut space);
        // The archive's 30 MiB are in place already; the changed file is built anew beside what
        // arrived of it, and a symlink is not a partial file.
        assert_eq!((space.files, space.needed), (4, (10 << 20) + 3 * (40 << 20)));
        let mut whole = Space::at(target.path()).unwrap();
        count(&mut whole);
        assert_eq!(whole.needed, 4 * (40 << 20), "without the index, every file counts whole");
    }
}
