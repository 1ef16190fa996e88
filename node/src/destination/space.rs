//! The disk space a round needs on the destination ([`Space`]), from its steps or its changes.

use std::path::Path;

use anyhow::Context;
use ferry_engine::{ChunkIndex, EntryKind, RecordReader, Space, Step};
use ferry_proto::Change;

/// The space the round's `steps` need in `target`, whose chunk index is `index` (see
/// [`Space::with_index`] for `taken_over`).
pub(super) fn of_round(
    steps: impl Iterator<Item = anyhow::Result<Step>>,
    (target, index): (&Path, &ChunkIndex),
    taken_over: bool,
) -> anyhow::Result<Space> {
    let mut space = at(target, index, taken_over)?;
    for step in steps {
        space.count(&step?);
    }
    Ok(space)
}

/// Like [`of_round`], for changes against the committed manifest of a target the check found as
/// ferry left it: a file whose content changed is one the round writes. (The one case this misses, a
/// hard link whose content did not change becoming a file of its own, is rare and small beside the
/// margin.)
pub(super) fn of_changes(
    changes: RecordReader<Change>,
    (target, index): (&Path, &ChunkIndex),
) -> anyhow::Result<Space> {
    let mut space = at(target, index, false)?;
    for change in changes {
        let change = change?;
        if let Some(entry) = &change.entry
            && entry.kind == EntryKind::File
            && entry.hard_link_to.is_none()
            && !change.content_as_before
        {
            space.add_file(entry);
        }
    }
    Ok(space)
}

/// Nothing counted yet, against the free space in `target` now, with what `index` records of it
/// (see [`Space::with_index`]).
pub(super) fn at(target: &Path, index: &ChunkIndex, taken_over: bool) -> anyhow::Result<Space> {
    let space = Space::at(target).with_context(|| format!("cannot read the free space of {}", target.display()))?;
    Ok(space.with_index(index, taken_over))
}
