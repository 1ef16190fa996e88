//! Planning: the steps of a merge, and which chunks an entry needs from the source.

use super::options::{Adopt, ApplyError};
use crate::hash::ChunkHash;
use crate::index::ChunkIndex;
use crate::manifest::{ChunkRef, Entry, EntryKind, Pair, RawEntry};
use crate::path::RelPath;
use crate::scan::FilePrefix;

/// One chunk the target lacks, found by [`Applier::plan`](crate::Applier::plan).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Needed {
    /// The file, in the new manifest.
    pub path: RelPath,
    /// Where in it.
    pub offset: u64,
    /// The chunk.
    pub chunk: ChunkRef,
}

/// How many chunk hashes a round remembers having asked for and not yet seen flushed into the index,
/// so that a chunk several new files share is asked for once (past this, duplicates may be asked for
/// again: correct, only slower). A transfer holds far fewer in flight; a dry run, which flushes
/// nothing, can reach it.
pub(super) const MAX_REQUESTED: usize = 1 << 18;

/// One path of a round, as [`Applier::step`](crate::Applier::step) takes it.
#[derive(Debug)]
pub enum Step {
    /// A path whose entry appears, changes, goes or stays (both sides decoded).
    Apply(Box<Pair<Entry, Entry>>),
    /// A file or symlink that stays as it was: its stored entry goes to the new manifest as it is,
    /// without being decoded (most of a day's round over a large tree).
    Keep(RawEntry),
    /// The next chunks of a large file whose entry is not listed yet (its source lists them as it
    /// cuts the file). They are built into the file's partial file, where the entry finds them when
    /// it comes. Not an entry of the new manifest.
    Prefix(Box<FilePrefix>),
}

impl From<Pair<Entry, Entry>> for Step {
    fn from(pair: Pair<Entry, Entry>) -> Self {
        Step::Apply(Box::new(pair))
    }
}

impl Step {
    /// The pair, unless the entry is kept as it is.
    pub fn pair(&self) -> Option<&Pair<Entry, Entry>> {
        match self {
            Step::Apply(pair) => Some(pair),
            Step::Keep(_) | Step::Prefix(..) => None,
        }
    }

    /// Whether the round's new manifest has this entry (it stays, appears or changes): counting
    /// these gives each entry's place in that manifest.
    pub fn is_in_new(&self) -> bool {
        match self {
            Step::Apply(pair) => pair.new.is_some(),
            Step::Keep(_) => true,
            Step::Prefix(..) => false,
        }
    }
}

/// Decides which chunks a round must ask the source for: those of new or changed files that the
/// chunk index does not know and that were not asked for already this round. Writes nothing, so a dry
/// run uses it alone.
#[derive(Debug, Default)]
pub struct Planner {
    pub(super) requested: std::collections::HashSet<ChunkHash>,
    /// Paths whose chunks the index's hints must not be trusted for (the round's check found them
    /// missing or changed): their chunks are asked for.
    pub(super) distrusted: std::collections::HashSet<RelPath>,
    /// The index is not asked at all (most of the target is gone).
    pub(super) ignore_index: bool,
    /// What the operator adopted by name (`Adopt::Paths`; nothing otherwise): what is there is not
    /// what ferry wrote, whatever the index says of it.
    pub(super) adopted: Adopt,
}

impl Planner {
    /// A planner for a round that adopts `adopt`: paths adopted by name are not what ferry wrote,
    /// whatever the index says of them (a target adopted whole keeps the index it was indexed into).
    pub fn adopting(adopt: &Adopt) -> Self {
        let adopted = if matches!(adopt, Adopt::Paths(_)) { adopt.clone() } else { Adopt::Nothing };
        Self { adopted, ..Self::default() }
    }

    /// Forgets having asked for `hashes` (they are in the index now).
    pub(super) fn forget<'a>(&mut self, hashes: impl IntoIterator<Item = &'a ChunkHash>) {
        for hash in hashes {
            self.requested.remove(hash);
        }
    }

    /// The chunks `pair` needs from the source.
    pub fn plan(&mut self, index: &ChunkIndex, pair: &Pair<Entry, Entry>) -> Result<Vec<Needed>, ApplyError> {
        self.plan_within(index, pair, None)
    }

    /// The chunks `pair` needs from the source, where the index's hints into the file `partial.0`
    /// hold only for its first `partial.1` bytes (the partial file of a large file that will be cut
    /// there as it is resumed).
    pub(super) fn plan_within(
        &mut self,
        index: &ChunkIndex,
        pair: &Pair<Entry, Entry>,
        partial: Option<&(RelPath, u64)>,
    ) -> Result<Vec<Needed>, ApplyError> {
        let Some(new) = &pair.new else { return Ok(Vec::new()) };
        if !Self::writes_content(pair) {
            return Ok(Vec::new());
        }
        let mut needed = Vec::new();
        let mut offset = 0u64;
        for chunk in &new.chunks {
            if !self.requested.contains(&chunk.hash) && !self.held(index, &chunk.hash, partial)? {
                if self.requested.len() < MAX_REQUESTED {
                    self.requested.insert(chunk.hash);
                }
                needed.push(Needed { path: new.path.clone(), offset, chunk: *chunk });
            }
            offset += u64::from(chunk.len);
        }
        Ok(needed)
    }

    /// Whether any of `chunks` would be asked for (without asking).
    pub(super) fn lacks_any(&self, index: &ChunkIndex, chunks: &[ChunkRef]) -> Result<bool, ApplyError> {
        for chunk in chunks {
            if !self.requested.contains(&chunk.hash) && !self.held(index, &chunk.hash, None)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Does the target seem to hold `hash`, where the check found nothing amiss (and not past the
    /// first `partial.1` bytes of the file `partial.0`)?
    fn held(&self, index: &ChunkIndex, hash: &ChunkHash, partial: Option<&(RelPath, u64)>) -> Result<bool, ApplyError> {
        if self.ignore_index {
            return Ok(false);
        }
        Ok(index.get(hash)?.is_some_and(|location| {
            !self.distrusted.contains(&location.path)
                && !self.adopted.covers(&location.path)
                && partial.is_none_or(|(path, kept)| {
                    location.path != *path || location.offset + u64::from(location.len) <= *kept
                })
        }))
    }

    /// Trusts no hint of the index that points into `paths` (the check found them missing or changed),
    /// or, with `None`, no hint at all: their chunks are asked for instead of waited for in vain.
    pub fn distrust(&mut self, paths: Option<std::collections::HashSet<RelPath>>) {
        match paths {
            Some(paths) => self.distrusted = paths,
            None => self.ignore_index = true,
        }
    }

    /// True when applying `pair` writes a file's content (a new file, or one whose content changed).
    pub fn writes_content(pair: &Pair<Entry, Entry>) -> bool {
        let Some(new) = &pair.new else { return false };
        new.kind == EntryKind::File
            && new.hard_link_to.is_none()
            && !pair.old.as_ref().is_some_and(|old| old.same_content(new) && old.hard_link_to.is_none())
    }
}
