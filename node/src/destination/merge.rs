//! What this node holds, merged with the source's changes: the old side of every step a round applies.

use std::path::Path;

use anyhow::bail;
use ferry_engine::{
    Checked, EntryKind, Keyed, ManifestReader, MergeJoin, Pair, RawEntry, RecordFileError, RecordReader, Step,
};
use ferry_proto::{Change, RoundRef};

use crate::state::TargetState;

/// The paths of the committed manifest by their places in it, for changes that name a path by its
/// place in the source's base round: that round is the one this node holds, so its manifest is the
/// same list. Read forward only, once.
pub(super) struct BasePaths {
    entries: Box<dyn Iterator<Item = Result<RawEntry, RecordFileError>> + Send>,
    /// The place of the next entry `entries` gives.
    next: u64,
}

impl BasePaths {
    pub(super) fn open(state: &TargetState, base: Option<RoundRef>, holds: Option<RoundRef>) -> anyhow::Result<Self> {
        if base.is_none() || base != holds {
            bail!(
                "the source named a path by its place in round {base:?}, but this node holds {holds:?}: a protocol \
                 violation"
            );
        }
        Ok(Self { entries: Box::new(ManifestReader::open(&state.manifest())?.raw()), next: 0 })
    }

    pub(super) fn path_at(&mut self, place: u64) -> anyhow::Result<ferry_engine::RelPath> {
        if place < self.next {
            bail!("the source named place {place} after place {}: changes must come in order", self.next - 1);
        }
        loop {
            let Some(entry) = self.entries.next().transpose()? else {
                bail!("the source named place {place}, past the end of the manifest of the round held here");
            };
            self.next += 1;
            if self.next > place {
                return Ok(entry.path().clone());
            }
        }
    }
}

/// Names each change that gives a place in the base round instead of a path, opening the committed
/// manifest ([`BasePaths`]) when the first such change comes.
pub(super) struct BaseNames {
    state: TargetState,
    base: Option<RoundRef>,
    holds: Option<RoundRef>,
    paths: Option<BasePaths>,
}

impl BaseNames {
    /// For changes against `base` (the source's `Hello`), on a node that holds `holds`.
    pub(super) fn new(state: TargetState, base: Option<RoundRef>, holds: Option<RoundRef>) -> Self {
        Self { state, base, holds, paths: None }
    }

    /// Gives `change` its path (and its entry's) when it came by its place in the base.
    pub(super) fn name(&mut self, change: &mut Change) -> anyhow::Result<()> {
        let Some(place) = change.base.take() else { return Ok(()) };
        let paths = match &mut self.paths {
            Some(paths) => paths,
            None => self.paths.insert(BasePaths::open(&self.state, self.base, self.holds)?),
        };
        change.path = paths.path_at(place)?;
        if let Some(entry) = &mut change.entry {
            entry.path.clone_from(&change.path);
        }
        Ok(())
    }
}

/// An entry ferry holds in the target, as the check found it: listed by the committed manifest (the
/// source's base), or kept after the source removed it (which no change list mentions).
pub(super) enum Held {
    Committed(Checked),
    Kept(Checked),
}

impl Held {
    fn checked(&self) -> &Checked {
        match self {
            Self::Committed(checked) | Self::Kept(checked) => checked,
        }
    }
}

impl Keyed for Held {
    fn key(&self) -> &ferry_engine::RelPath {
        self.checked().key()
    }
}

/// The committed manifest and what the target keeps, in one order (a path in both is the committed
/// one).
pub(super) fn held<'a>(
    committed: impl Iterator<Item = Result<Checked, RecordFileError>> + Send + 'a,
    kept: impl Iterator<Item = Result<Checked, RecordFileError>> + Send + 'a,
) -> impl Iterator<Item = Result<Held, RecordFileError>> + Send + 'a {
    MergeJoin::new(committed, kept).filter_map(|pair| {
        pair.map(|pair| match (pair.old, pair.new) {
            (Some(committed), _) => Some(Held::Committed(committed)),
            (None, kept) => kept.map(Held::Kept),
        })
        .transpose()
    })
}

/// The old manifest merged with the changes: every path once, with its old and new entry. `delta`:
/// the changes are against the committed manifest (an unlisted path is unchanged: a file or symlink
/// is kept as it is stored, undecoded); otherwise they are the whole new manifest. A kept entry that
/// no change names is not the source's: it is kept again, or removed under `delete`.
pub(super) fn patch<'a>(
    old: impl Iterator<Item = Result<Held, RecordFileError>> + Send + 'a,
    changes: impl Iterator<Item = anyhow::Result<Change>> + Send + 'a,
    delta: bool,
) -> impl Iterator<Item = anyhow::Result<Step>> + Send + 'a {
    let steps = MergeJoin::new(old.map(|held| held.map_err(anyhow::Error::from)), changes).map(move |pair| {
        let pair = pair?;
        let pair = match (pair.old, pair.new) {
            (Some(Held::Kept(kept)), None) => Pair { old: kept.on_disk()?, new: None },
            // A folder is decoded here, off the applying thread: the applier needs it whole.
            (Some(Held::Committed(old)), None) if delta && old.found.is_none() && old.raw.kind() != EntryKind::Dir => {
                return Ok(Step::Keep(old.raw));
            }
            // Unchanged at the source, not as ferry left it here: back to what the source has.
            (Some(Held::Committed(old)), None) => {
                Pair { new: if delta { Some(old.raw.decode()?) } else { None }, old: old.on_disk()? }
            }
            (old, Some(change)) => {
                let old = old.map(|held| match held {
                    Held::Committed(checked) | Held::Kept(checked) => checked,
                });
                let committed = old.as_ref().map(|o| o.raw.decode()).transpose()?;
                let old = old.as_ref().map(Checked::on_disk).transpose()?.flatten();
                let new = match change.entry {
                    Some(mut entry) => {
                        if change.content_as_before {
                            let Some(previous) = committed.as_ref().filter(|o| o.kind == EntryKind::File) else {
                                bail!("{}: sent as unchanged content, but this node has no such file", change.path);
                            };
                            entry.size = previous.size;
                            entry.chunks.clone_from(&previous.chunks);
                        }
                        if entry.path != change.path {
                            bail!("{}: change and entry disagree on the path", change.path);
                        }
                        Some(entry)
                    }
                    None => None,
                };
                Pair { old, new }
            }
            (None, None) => unreachable!("a merged pair has one side"),
        };
        Ok(Step::Apply(Box::new(pair)))
    });
    // Gone at the source and not ferry's here (missing, or someone else's): nothing to do.
    steps.filter(|step| !matches!(step, Ok(Step::Apply(pair)) if pair.old.is_none() && pair.new.is_none()))
}

/// The changes in the file at `path`, as [`patch`] takes them.
pub(super) fn changes_in(path: &Path) -> anyhow::Result<impl Iterator<Item = anyhow::Result<Change>> + Send + use<>> {
    Ok(RecordReader::<Change>::open(path)?.map(|change| change.map_err(anyhow::Error::from)))
}

/// Each step with the place its entry has in the round's new manifest, which is how a need names
/// its file: the steps are that manifest's entries in order, with the removed ones among them.
pub(super) fn placed(
    steps: impl Iterator<Item = anyhow::Result<Step>>,
) -> impl Iterator<Item = anyhow::Result<(u64, Step)>> {
    let mut places = 0u64;
    steps.map(move |step| {
        let step = step?;
        let place = places;
        places += u64::from(step.is_in_new());
        Ok((place, step))
    })
}

#[cfg(test)]
mod tests {
    use super::super::space;
    use super::*;
    use ferry_engine::{ChunkHash, ChunkRef, Entry, ManifestWriter, RecordWriter};
    use std::path::Path;

    fn file(path: &str, size: u64, seed: u8) -> Entry {
        Entry {
            mtime_ns: 1,
            size,
            chunks: vec![ChunkRef { hash: ChunkHash::of(&[seed]), len: size as u32 }],
            ..Entry::new(ferry_engine::RelPath::new(path.as_bytes().to_vec()).unwrap(), EntryKind::File)
        }
    }

    /// Writes `entries` as a manifest at `path`; its root.
    fn manifest_of(path: &Path, entries: impl IntoIterator<Item = Entry>) -> ferry_engine::RootHash {
        let mut writer = ManifestWriter::create(path).unwrap();
        for entry in entries {
            writer.push(&entry).unwrap();
        }
        writer.finish().unwrap()
    }

    /// Writes `changes` as a list of changes at `path`.
    fn changes_of(path: &Path, changes: impl IntoIterator<Item = Change>) {
        let mut writer = RecordWriter::<Change>::create(path).unwrap();
        for change in changes {
            writer.push(&change).unwrap();
        }
        writer.finish().unwrap();
    }

    /// The committed manifest at `manifest`, with the check having found everything as ferry left it.
    fn as_found(manifest: &Path) -> impl Iterator<Item = Result<Held, RecordFileError>> + Send + use<> {
        ManifestReader::open(manifest).unwrap().raw().map(|raw| raw.map(|raw| Held::Committed(Checked::from(raw))))
    }

    #[test]
    fn an_entry_the_check_found_missing_or_changed_is_applied_again_though_the_source_did_not_change_it() {
        let dir = tempfile::tempdir().unwrap();
        let (manifest, changes) = (dir.path().join("manifest"), dir.path().join("changes"));
        manifest_of(&manifest, [file("a", 100, 1), file("b", 200, 2), file("c", 300, 3), file("d", 400, 4)]);
        changes_of(&changes, []);
        let found = |path: &str| match path {
            "a" => Some(ferry_engine::Found::Missing),
            "b" => Some(ferry_engine::Found::Changed("edited".into())),
            "c" => Some(ferry_engine::Found::Foreign("replaced".into())),
            _ => None,
        };
        let checked = ManifestReader::open(&manifest)
            .unwrap()
            .raw()
            .map(|raw| raw.map(|raw| Held::Committed(Checked { found: found(&raw.path().to_string()), raw })));
        let steps: Vec<Step> = patch(checked, changes_in(&changes).unwrap(), true).map(Result::unwrap).collect();
        let described: Vec<String> = steps
            .iter()
            .map(|step| match step {
                Step::Keep(raw) => format!("keep {}", raw.path()),
                Step::Prefix(prefix) => unreachable!("the merge makes no prefix step: {}", prefix.path),
                Step::Apply(pair) => format!(
                    "{}: old {:?}, new size {:?}",
                    pair.path(),
                    pair.old.as_ref().map(|o| o.size),
                    pair.new.as_ref().map(|n| n.size)
                ),
            })
            .collect();
        // a is made again, b written again whole (its old content unknown), c is the administrator's
        // now (the apply leaves it alone), d stays.
        assert_eq!(
            described,
            [
                "a: old None, new size Some(100)",
                "b: old Some(0), new size Some(200)",
                "c: old None, new size Some(300)",
                "keep d"
            ]
        );
    }

    #[test]
    fn the_space_of_changes_is_the_space_of_the_merged_round() {
        let dir = tempfile::tempdir().unwrap();
        let (manifest, changes) = (dir.path().join("manifest"), dir.path().join("changes"));
        manifest_of(&manifest, [file("a", 100, 1), file("b", 200, 2), file("c", 300, 3), file("e", 500, 5)]);
        // a: new content; b: only its mtime (chunks as before); c: unchanged; d: new; e: removed.
        let mut b = file("b", 200, 2);
        b.mtime_ns = 2;
        b.chunks.clear();
        let listed = [
            Change { path: file("a", 0, 0).path, entry: Some(file("a", 150, 9)), content_as_before: false, base: None },
            Change { path: b.path.clone(), entry: Some(b), content_as_before: true, base: None },
            Change { path: file("d", 0, 0).path, entry: Some(file("d", 400, 4)), content_as_before: false, base: None },
            Change { path: file("e", 0, 0).path, entry: None, content_as_before: false, base: None },
        ];
        changes_of(&changes, listed);

        // Only c, which no change lists, is kept as it is stored.
        let merged = patch(as_found(&manifest), changes_in(&changes).unwrap(), true);
        let kept: Vec<String> = merged
            .map(Result::unwrap)
            .filter_map(|step| match step {
                Step::Keep(raw) => Some(raw.path().to_string()),
                Step::Apply(_) | Step::Prefix(_) => None,
            })
            .collect();
        assert_eq!(kept, ["c"]);
        let merged = patch(as_found(&manifest), changes_in(&changes).unwrap(), true);
        let index = ferry_engine::ChunkIndex::open(&dir.path().join("chunks.redb")).unwrap();
        let by_pairs = space::of_round(merged, (dir.path(), &index), false).unwrap();
        let by_changes = space::of_changes(RecordReader::open(&changes).unwrap(), (dir.path(), &index)).unwrap();
        assert_eq!((by_pairs.files, by_pairs.needed), (2, 550));
        assert_eq!((by_changes.files, by_changes.needed), (by_pairs.files, by_pairs.needed));
    }

    /// A removed entry has no place in the new manifest: the entries after it are placed as the
    /// source's manifest has them.
    #[test]
    fn places_count_the_entries_the_new_manifest_has() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = dir.path().join("manifest");
        manifest_of(&manifest, [file("a", 1, 1), file("b", 1, 2), file("c", 1, 3)]);
        let changes = dir.path().join("changes");
        let gone = Change { path: file("b", 0, 0).path, entry: None, content_as_before: false, base: None };
        let new =
            Change { path: file("bb", 0, 0).path, entry: Some(file("bb", 5, 9)), content_as_before: false, base: None };
        changes_of(&changes, [gone, new]);
        let steps = patch(as_found(&manifest), changes_in(&changes).unwrap(), true);
        let placed: Vec<(u64, String)> = placed(steps)
            .map(|step| step.map(|(place, step)| (place, step.pair().map_or("kept".into(), |p| p.path().to_string()))))
            .collect::<anyhow::Result<_>>()
            .unwrap();
        // a (0), b removed (no place of its own: the next entry's), bb (1), c (2).
        assert_eq!(placed, [(0, "kept".into()), (1, "b".into()), (1, "bb".into()), (2, "kept".into())]);
    }

    #[test]
    fn a_place_in_the_base_round_is_read_from_the_manifest_held_and_only_from_that_round() {
        let dir = tempfile::tempdir().unwrap();
        let state = TargetState::new(dir.path(), "zimbra");
        std::fs::create_dir_all(&state.dir).unwrap();
        let root = manifest_of(&state.manifest(), [file("a", 1, 1), file("b", 1, 2), file("c", 1, 3), file("d", 1, 4)]);
        let held = Some(RoundRef { round: 3, root });
        let mut paths = BasePaths::open(&state, held, held).unwrap();
        assert_eq!(paths.path_at(1).unwrap().to_string(), "b");
        assert_eq!(paths.path_at(3).unwrap().to_string(), "d");
        // Backwards, or past the end: the source broke the protocol.
        assert!(paths.path_at(2).is_err());
        let mut paths = BasePaths::open(&state, held, held).unwrap();
        assert!(paths.path_at(4).is_err());
        // A place in a round this node does not hold (another root, or none) is refused.
        let other = Some(RoundRef { round: 3, root: ferry_engine::RootHash::from_bytes([9; 32]) });
        assert!(BasePaths::open(&state, other, held).is_err());
        assert!(BasePaths::open(&state, None, held).is_err());
        assert!(BasePaths::open(&state, held, None).is_err());
    }
}
