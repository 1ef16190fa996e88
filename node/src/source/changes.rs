//! The list of changes: the diff of two manifests in batches, and where each changed byte falls in it.

use std::path::Path;
use std::sync::Arc;

use anyhow::anyhow;
use ferry_engine::{EntryKind, ManifestReader, RawEntry, RecordFileError, diff_numbered};
use ferry_proto::{Change, NeedChunk};
use tokio::sync::mpsc;

/// Diffs the base (or nothing) against the new manifest and hands out changes in batches. A path
/// the base has goes by its place there (the destination holds the same manifest). Returns where
/// each changed byte falls.
pub(super) fn send_changes(
    base: Option<&Path>,
    new: &Path,
    tx: &mpsc::Sender<Vec<Change>>,
) -> anyhow::Result<Positions> {
    let mut positions = Positions::default();
    // Compared as stored: an entry whose bytes did not change is not decoded (most of a day's tree).
    let old: Box<dyn Iterator<Item = Result<RawEntry, RecordFileError>>> = match base {
        Some(path) => Box::new(ManifestReader::open(path)?.raw()),
        None => Box::new(std::iter::empty()),
    };
    let mut batch = Vec::with_capacity(1024);
    for item in diff_numbered(old, ManifestReader::open(new)?.raw()) {
        let (base, pair) = item?;
        let path = pair.path().clone();
        let change = match (pair.old, pair.new) {
            (Some(old), Some(mut new)) if new.kind == EntryKind::File && old.same_content(&new) => {
                (new.size, new.chunks) = (0, Vec::new());
                Change { path, entry: Some(new), content_as_before: true, base }
            }
            (_, new) => {
                if let Some(entry) = new.as_ref().filter(|e| e.kind == EntryKind::File && e.hard_link_to.is_none()) {
                    positions.push(&path, entry.size);
                }
                Change { path, entry: new, content_as_before: false, base }
            }
        };
        batch.push(change);
        if batch.len() == 1024 {
            tx.blocking_send(std::mem::replace(&mut batch, Vec::with_capacity(1024)))
                .map_err(|_| anyhow!("connection closed"))?;
        }
    }
    if !batch.is_empty() {
        tx.blocking_send(batch).map_err(|_| anyhow!("connection closed"))?;
    }
    Ok(positions)
}

/// Where each file whose content changed starts in the round's changed bytes, in manifest order: the
/// destination asks for chunks in that order, so the chunks read tell how far the round is (for the
/// progress line's ETA). 16 bytes a file: a hash of its path and the bytes before it.
#[derive(Debug, Default)]
pub(super) struct Positions {
    pub(super) files: Vec<(u64, u64)>,
    pub(super) total: u64,
}

impl Positions {
    pub(super) fn push(&mut self, path: &ferry_engine::RelPath, size: u64) {
        self.files.push((path_key(path), self.total));
        self.total += size;
    }
}

pub(super) fn path_key(path: &ferry_engine::RelPath) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    path.hash(&mut hasher);
    hasher.finish()
}

/// Follows the chunks read through [`Positions`], forward only.
pub(super) struct PositionCursor {
    pub(super) positions: Arc<Positions>,
    pub(super) at: usize,
}

impl PositionCursor {
    /// How far into the changed bytes the round is once `need` is read, if its file is found in the
    /// next few thousand (a need for a file that is not there, which should not happen, costs a
    /// bounded search and moves nothing).
    pub(super) fn advance(&mut self, need: &NeedChunk) -> Option<u64> {
        let key = path_key(&need.path);
        let mut ahead = self.positions.files.get(self.at..)?.iter().take(4096);
        let found = ahead.position(|(k, _)| *k == key)?;
        self.at += found;
        Some(self.positions.files[self.at].1 + need.offset + u64::from(need.len))
    }
}
