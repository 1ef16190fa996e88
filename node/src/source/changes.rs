//! The list of changes: sent under the bandwidth limit, and where each changed byte falls in it.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use ferry_engine::{EntryKind, ManifestReader, RawEntry, RecordFileError, diff};
use ferry_proto::{Change, ChangesEnd, Message, NeedChunk};
use tokio::sync::mpsc;

use super::options::PushOptions;
use super::outcome::deadline_error;
use super::prepare::Prepared;
use super::progress::Counters;
use super::session::Session;
use crate::net::{self};

/// What a bandwidth pause (rate 0) does to the list of changes.
pub(super) enum ListPause<'a> {
    /// The list waits between its messages, telling the destination every second, until the pause
    /// ends or `deadline` (`--max-duration`) passes.
    Holds { deadline: Option<Instant>, options: &'a PushOptions, sent: &'a Counters },
    /// The list goes on (a dry run: the operator asked for its plan now).
    LetsThrough,
}

impl ListPause<'_> {
    /// Waits while `limiter` pauses the round, sending `Paused` every second, and saying so in the log
    /// every `--progress-interval` (a log without it would look hung for the hours of a pause).
    pub(super) async fn wait(&self, session: &mut Session, limiter: &crate::limit::Limiter) -> anyhow::Result<()> {
        let ListPause::Holds { deadline, options, sent } = self else { return Ok(()) };
        let mut told: Option<Instant> = None;
        while limiter.is_paused() {
            match told {
                None => {
                    tracing::info!("the bandwidth limit pauses the round: the list of changes waits for it to open");
                    told = Some(Instant::now());
                }
                Some(at) if at.elapsed() >= options.progress_interval => {
                    tracing::info!("paused by the bandwidth limit: the list of changes still waits");
                    told = Some(Instant::now());
                }
                Some(_) => {}
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                let error = deadline_error(options, sent);
                let reason = format!("{error}, paused by the bandwidth limit");
                let _ = net::send(&mut session.send, &Message::Failed { reason }).await;
                return Err(error.into());
            }
            net::send(&mut session.send, &Message::Paused).await?;
            tokio::time::sleep(PAUSE_NOTICE).await;
        }
        if told.is_some() {
            tracing::info!("the bandwidth limit opened: the list of changes goes on");
        }
        Ok(())
    }
}

/// Sends the changes since what the destination holds (all of them when this node no longer has
/// that manifest). Returns how many, and where each file whose content changed starts in those bytes.
pub(super) async fn send_all_changes(
    prepared: &Prepared,
    session: &mut Session,
    limiter: &crate::limit::Limiter,
    pause: ListPause<'_>,
) -> anyhow::Result<(u64, Positions)> {
    let state = &prepared.state;
    let delta_base = session.base.filter(|b| Some(*b) == session.holds);
    if let Some(base) = delta_base.filter(|b| b.root == prepared.new_root) {
        // The tree is what the destination holds: no changes, and no need to read both manifests
        // through to find none.
        let end = ChangesEnd { base: delta_base, root: prepared.new_root, entries: prepared.scanned.entries };
        net::send(&mut session.send, &Message::ChangesEnd(end)).await?;
        tracing::info!("0 changes sent (the tree is as in round {})", base.round);
        return Ok((0, Positions::default()));
    }
    let (changes_tx, mut changes_rx) = mpsc::channel::<Vec<Change>>(4);
    let base_path = delta_base.map(|_| state.base());
    let scanned_path = state.scanned();
    let differ = tokio::task::spawn_blocking(move || send_changes(base_path.as_deref(), &scanned_path, &changes_tx));
    let mut change_count = 0u64;
    while let Some(batch) = changes_rx.recv().await {
        change_count += batch.len() as u64;
        pause.wait(session, limiter).await?;
        net::send_limited(&mut session.send, &Message::Changes(batch), limiter).await?;
    }
    let positions = differ.await.context("the diff panicked")??;
    let end = ChangesEnd { base: delta_base, root: prepared.new_root, entries: prepared.scanned.entries };
    net::send(&mut session.send, &Message::ChangesEnd(end)).await?;
    match delta_base {
        Some(base) => tracing::info!("{change_count} changes sent (against round {})", base.round),
        None => tracing::info!("{change_count} changes sent (the whole manifest: no round held in common)"),
    }
    Ok((change_count, positions))
}

/// Diffs the base (or nothing) against the new manifest and hands out changes in batches.
/// Returns the bytes of the files whose content changed.
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
    for pair in diff(old, ManifestReader::open(new)?.raw()) {
        let pair = pair?;
        let path = pair.path().clone();
        let change = match (pair.old, pair.new) {
            (Some(old), Some(mut new)) if new.kind == EntryKind::File && old.same_content(&new) => {
                new.chunks.clear();
                Change { path, entry: Some(new), chunks_as_before: true }
            }
            (_, new) => {
                if let Some(entry) = new.as_ref().filter(|e| e.kind == EntryKind::File && e.hard_link_to.is_none()) {
                    positions.push(&path, entry.size);
                }
                Change { path, entry: new, chunks_as_before: false }
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

/// How often a paused round tells the destination that it is paused (see `Message::Paused`).
pub(super) const PAUSE_NOTICE: Duration = Duration::from_secs(1);
