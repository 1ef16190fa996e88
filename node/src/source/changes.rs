//! The list of changes: the diff of two manifests in batches, and where each changed byte falls in it.

use std::cell::RefCell;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::anyhow;
use ferry_engine::{EntryKind, FilePrefix, ManifestReader, RawEntry, RecordFileError, diff_numbered};
use ferry_proto::{Change, NeedChunk};
use tokio::sync::mpsc;

use super::scanning::{AHEAD_BYTES, Gate, prefix_ahead_bytes};

/// Diffs the base (or nothing) against the new manifest's entries and hands out changes in batches
/// through `list`. A path the base has goes by its place there (the destination holds the same
/// manifest). Records where each changed byte falls in `positions`.
pub(super) fn send_changes(
    base: Option<&Path>,
    new: impl Iterator<Item = Result<RawEntry, RecordFileError>>,
    list: &RefCell<Lister>,
    positions: &Mutex<Positions>,
) -> anyhow::Result<()> {
    // Compared as stored: an entry whose bytes did not change is not decoded (most of a day's tree).
    let old: Box<dyn Iterator<Item = Result<RawEntry, RecordFileError>>> = match base {
        Some(path) => Box::new(ManifestReader::open(path)?.raw()),
        None => Box::new(std::iter::empty()),
    };
    for item in diff_numbered(old, new) {
        let (places, pair) = item?;
        let (base, at) = (places.old, places.new);
        let path = pair.path().clone();
        let (change, bytes) = match (pair.old, pair.new) {
            (Some(old), Some(mut new)) if new.kind == EntryKind::File && old.same_content(&new) => {
                (new.size, new.chunks) = (0, Vec::new());
                (Change { path, entry: Some(new), content_as_before: true, base }, 0)
            }
            (_, new) => {
                let mut bytes = 0;
                if let Some(entry) = new.as_ref().filter(|e| e.kind == EntryKind::File && e.hard_link_to.is_none()) {
                    // A file listed as it was cut is in the list's positions, and its prefixes'
                    // bytes were counted at the gate.
                    let prefixed = list.borrow_mut().prefixed(at);
                    if prefixed == 0 {
                        positions.lock().map_err(|_| anyhow!("lock poisoned"))?.push(&path, entry.size);
                    }
                    bytes = entry.size.saturating_sub(prefixed);
                }
                (Change { path, entry: new, content_as_before: false, base }, bytes)
            }
        };
        list.borrow_mut().push(change, at, bytes)?;
    }
    list.borrow_mut().flush()
}

/// What the list sends, in order.
#[derive(Debug)]
pub(super) enum Listed {
    /// A batch of changes.
    Changes(Vec<Change>),
    /// The next chunks of a large file being cut, before its change.
    Prefix(FilePrefix),
}

/// The list of changes on its way to the control loop, in batches; streamed, it waits at the
/// [`Gate`] rather than go too far ahead of the destination.
pub(super) struct Lister {
    pub(super) tx: mpsc::Sender<Listed>,
    pub(super) batch: Vec<Change>,
    pub(super) gate: Option<Arc<Gate>>,
    /// The large file listed as it is cut: its place and the bytes of its prefixes.
    prefixed: Option<(u64, u64)>,
}

impl Lister {
    pub(super) fn new(tx: mpsc::Sender<Listed>, gate: Option<Arc<Gate>>) -> Self {
        Self { tx, batch: Vec::with_capacity(BATCH), gate, prefixed: None }
    }

    /// Lists the next chunks of a large file the scan is cutting, after what is listed before it;
    /// `positions` learns where its bytes fall.
    pub(super) fn prefix(&mut self, prefix: FilePrefix, positions: &Mutex<Positions>) -> anyhow::Result<()> {
        let Some(gate) = self.gate.clone() else { return Ok(()) };
        self.flush()?;
        let ahead = prefix_ahead_bytes();
        if gate.is_full(ahead) {
            gate.wait_for_room(ahead);
        }
        let bytes: u64 = prefix.chunks.iter().map(|chunk| u64::from(chunk.len)).sum();
        match &mut self.prefixed {
            Some((place, listed)) if *place == prefix.place && prefix.offset > 0 => *listed += bytes,
            _ => {
                positions.lock().map_err(|_| anyhow!("lock poisoned"))?.push(&prefix.path, prefix.size);
                self.prefixed = Some((prefix.place, bytes));
            }
        }
        tracing::debug!("{}: {} listed from {} as it is read", prefix.path, crate::human::bytes(bytes), prefix.offset);
        gate.listed_prefix(&prefix);
        self.tx.blocking_send(Listed::Prefix(prefix)).map_err(|_| anyhow!("connection closed"))
    }

    /// The bytes listed as prefixes of the file at `place` (0 when none were), forgotten: its
    /// change comes.
    fn prefixed(&mut self, place: u64) -> u64 {
        match self.prefixed.take() {
            Some((at, bytes)) if at == place => bytes,
            _ => 0,
        }
    }

    /// Lists the change at `place` (its place in the new manifest), whose content is `bytes` new
    /// bytes.
    fn push(&mut self, change: Change, place: u64, bytes: u64) -> anyhow::Result<()> {
        if let Some(gate) = self.gate.clone() {
            // Whatever waits here must be on its way first: the destination moves the gate only
            // for what it has.
            if gate.is_full(AHEAD_BYTES) {
                self.flush()?;
                gate.wait_for_room(AHEAD_BYTES);
            }
            gate.listed(place, bytes);
        }
        self.batch.push(change);
        if self.batch.len() == BATCH {
            self.flush()?;
        }
        Ok(())
    }

    /// Sends the changes listed so far.
    pub(super) fn flush(&mut self) -> anyhow::Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch = std::mem::replace(&mut self.batch, Vec::with_capacity(BATCH));
        self.tx.blocking_send(Listed::Changes(batch)).map_err(|_| anyhow!("connection closed"))
    }
}

/// Changes per batch of the list.
const BATCH: usize = 1024;

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

/// Follows the chunks read through [`Positions`], forward only (they grow while the list streams).
pub(super) struct PositionCursor {
    pub(super) positions: Arc<Mutex<Positions>>,
    pub(super) at: usize,
}

impl PositionCursor {
    /// How far into the changed bytes the round is once `need` is read, if its file is found in the
    /// next few thousand (a need for a file that is not there, which should not happen, costs a
    /// bounded search and moves nothing).
    pub(super) fn advance(&mut self, need: &NeedChunk) -> Option<u64> {
        let key = path_key(&need.path);
        let positions = self.positions.lock().ok()?;
        let mut ahead = positions.files.get(self.at..)?.iter().take(4096);
        let found = ahead.position(|(k, _)| *k == key)?;
        self.at += found;
        Some(positions.files[self.at].1 + need.offset + u64::from(need.len))
    }
}
