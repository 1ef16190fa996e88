//! A list of changes that streams: the source sends it while it scans, and the round plans and
//! applies each change as it comes instead of waiting for the list's end. What it does not have yet
//! the transfer does not wait for: it applies what arrived, and tells the source how far it planned
//! (`Passed`), which lets the list go on.

use std::path::Path;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail};
use ferry_engine::{FilePrefix, Step};
use ferry_proto::{Change, ChangesEnd, DestinationEnd, DestinationEvent, DestinationInput, Refusal};
use tokio::sync::mpsc;

use super::merge::BaseNames;
use super::transfer::{Next, Steps};
use super::window::Window;
use crate::refused::Refused;
use ferry_engine::Space;

/// Steps made on a thread of their own from a list that streams, handed over in batches: a batch
/// goes when it is full or when the list has nothing more for now ([`Flush`]).
pub(super) struct Streamed {
    rx: Receiver<Vec<Placed>>,
    batch: std::collections::VecDeque<Placed>,
}

/// A step with its place in the new manifest, or why there is none.
type Placed = anyhow::Result<(u64, Step)>;

/// Steps made and not yet handed over, and where they go: shared by the thread making them and the
/// list it reads, which hands them over before it waits for the source.
#[derive(Clone)]
pub(super) struct Flush {
    pending: Arc<Mutex<Vec<Placed>>>,
    tx: std::sync::mpsc::SyncSender<Vec<Placed>>,
    window: Arc<Window>,
}

impl Flush {
    /// Steps per batch at most.
    const BATCH: usize = 512;

    fn push(&self, step: Placed) -> bool {
        let full = match self.pending.lock() {
            Ok(mut pending) => {
                pending.push(step);
                pending.len() >= Self::BATCH
            }
            Err(_) => return false,
        };
        !full || self.now()
    }

    /// Hands over the steps made so far; `false` once the transfer is gone.
    pub(super) fn now(&self) -> bool {
        let Ok(mut pending) = self.pending.lock() else { return false };
        if pending.is_empty() {
            return true;
        }
        let sent = self.tx.send(std::mem::take(&mut *pending)).is_ok();
        self.window.changed.notify_all();
        sent
    }
}

impl Streamed {
    /// A batch channel and its [`Flush`], which the list the steps are made from takes first.
    pub(super) fn channel(window: Arc<Window>) -> (Self, Flush) {
        // About a window's worth of entries waits here at most.
        let (tx, rx) = std::sync::mpsc::sync_channel(super::transfer::WINDOW_ENTRIES / Flush::BATCH);
        let flush = Flush { pending: Arc::default(), tx, window };
        (Self { rx, batch: std::collections::VecDeque::new() }, flush)
    }

    /// Makes `steps` on a thread of its own, handing them over through `flush`.
    pub(super) fn start(
        steps: impl Iterator<Item = anyhow::Result<(u64, Step)>> + Send + 'static,
        flush: Flush,
    ) -> anyhow::Result<()> {
        let span = tracing::Span::current();
        std::thread::Builder::new().name("ferry-merge".into()).spawn(move || {
            let _entered = span.enter();
            for step in steps {
                let failed = step.is_err();
                if !flush.push(step) || failed {
                    break;
                }
            }
            flush.now();
        })?;
        Ok(())
    }
}

impl Steps for Streamed {
    fn try_next(&mut self) -> Next<anyhow::Result<(u64, Step)>> {
        if self.batch.is_empty() {
            match self.rx.try_recv() {
                Ok(batch) => self.batch = batch.into(),
                Err(TryRecvError::Empty) => return Next::Later,
                Err(TryRecvError::Disconnected) => return Next::End,
            }
        }
        self.batch.pop_front().map_or(Next::Later, Next::Item)
    }

    fn streams(&self) -> bool {
        true
    }
}

/// What one thread leaves for another to take.
pub(super) type Slot<T> = Arc<Mutex<Option<T>>>;

/// The changes of a list that streams, as they come from the control stream: paths named by their
/// place in the base made whole. The list's end goes to `end`.
pub(super) struct Incoming {
    inbox: mpsc::Receiver<DestinationEvent>,
    /// The first event, before the inbox.
    first: Option<DestinationEvent>,
    batch: std::vec::IntoIter<Change>,
    names: BaseNames,
    end: Slot<ChangesEnd>,
    ended: bool,
    /// Hands the steps made so far over before waiting for the source.
    flush: Flush,
    /// The large file whose first chunks came last ([`ferry_proto::Message::Prefix`]): its place,
    /// path and the bytes listed.
    prefixed: Option<(u64, ferry_engine::RelPath, u64)>,
    /// The round's space preflight, which counts such a file when its first chunks come.
    room: Room,
}

impl Incoming {
    pub(super) fn new(
        first: DestinationEvent,
        inbox: mpsc::Receiver<DestinationEvent>,
        names: BaseNames,
        (flush, room): (Flush, Room),
        end: Slot<ChangesEnd>,
    ) -> Self {
        let (first, batch) = (Some(first), Vec::new().into_iter());
        Self { inbox, first, batch, names, end, ended: false, flush, prefixed: None, room }
    }

    fn next_change(&mut self) -> anyhow::Result<Option<Change>> {
        loop {
            if let Some(mut change) = self.batch.next() {
                self.names.name(&mut change)?;
                return Ok(Some(change));
            }
            if self.ended {
                return Ok(None);
            }
            let next = match self.first.take() {
                Some(first) => Some(first),
                None => match self.inbox.try_recv() {
                    Ok(event) => Some(event),
                    Err(mpsc::error::TryRecvError::Disconnected) => None,
                    Err(mpsc::error::TryRecvError::Empty) => {
                        if !self.flush.now() {
                            bail!("the transfer ended");
                        }
                        self.inbox.blocking_recv()
                    }
                },
            };
            match next {
                Some(DestinationEvent::Changes(batch)) => self.batch = batch.into_iter(),
                Some(DestinationEvent::Prefix(prefix)) => {
                    let step = self.prefix(prefix)?;
                    if !self.flush.push(Ok(step)) {
                        bail!("the transfer ended");
                    }
                }
                Some(DestinationEvent::ChangesEnd(end)) => {
                    self.ended = true;
                    *self.end.lock().map_err(|_| anyhow!("lock poisoned"))? = Some(end);
                }
                Some(DestinationEvent::Ended(DestinationEnd::Stopped(why))) => {
                    bail!("the source stopped while it sent its list: {why}")
                }
                Some(DestinationEvent::Ended(end)) => bail!("the list of changes was cut: {end:?}"),
                Some(other) => bail!("unexpected {other:?} while receiving changes"),
                None => bail!("the connection closed while receiving changes"),
            }
        }
    }

    /// The step that builds a large file's next chunks. It goes to the transfer at once, ahead of
    /// the steps the merge has yet to make of the entries before the file (they have no chunk the
    /// source has not listed before it).
    fn prefix(&mut self, prefix: FilePrefix) -> anyhow::Result<(u64, Step)> {
        let listed = match &self.prefixed {
            Some((place, path, listed)) if *place == prefix.place && *path == prefix.path => *listed,
            _ => 0,
        };
        if prefix.offset != listed {
            bail!(
                "the source sent chunks of {} from {}, but those before ended at {listed}",
                prefix.path,
                prefix.offset
            );
        }
        if listed == 0 {
            self.room.fits(|space| space.add_streamed(&prefix.path, prefix.size))?;
        }
        let bytes = prefix.chunks.iter().map(|chunk| u64::from(chunk.len)).sum::<u64>();
        let listed = listed.checked_add(bytes).ok_or_else(|| anyhow!("{}: chunks past 16 EiB", prefix.path))?;
        self.prefixed = Some((prefix.place, prefix.path.clone(), listed));
        Ok((prefix.place, Step::Prefix(Box::new(prefix))))
    }
}

/// The space preflight of a list that streams: what its steps write counted as they are made, and
/// a large file listed as it is read when its first chunks come. A round that would not fit is
/// refused once it is seen not to.
#[derive(Clone)]
pub(super) struct Room {
    space: Arc<Mutex<Space>>,
    target: std::path::PathBuf,
    window: Arc<Window>,
    /// Why the round was refused for want of space, once it was.
    refused: Slot<String>,
}

impl Room {
    pub(super) fn new(
        (target, index, taken_over): (&Path, &ferry_engine::ChunkIndex, bool),
        window: Arc<Window>,
        refused: Slot<String>,
    ) -> anyhow::Result<Self> {
        let space = Arc::new(Mutex::new(super::space::at(target, index, taken_over)?));
        Ok(Self { space, target: target.to_owned(), window, refused })
    }

    /// Counts what `count` adds, if anything, and refuses the round once it no longer fits.
    fn fits(&self, count: impl FnOnce(&mut Space) -> bool) -> anyhow::Result<()> {
        let mut space = self.space.lock().map_err(|_| anyhow!("lock poisoned"))?;
        if !count(&mut space) {
            return Ok(());
        }
        if let Some(reason) = space.refusal(&self.target) {
            let reason = format!("{reason} (seen while the list came: what arrived before is kept)");
            tracing::warn!("{reason}");
            *self.refused.lock().map_err(|_| anyhow!("lock poisoned"))? = Some(reason.clone());
            self.window.input(DestinationInput::Refuse { refusal: Refusal::NoSpace, reason: reason.clone() })?;
            return Err(Refused::new(Refusal::NoSpace, reason).into());
        }
        Ok(())
    }
}

/// The steps made from a list that streams, the space of what they write counted as they are made
/// ([`Room`]). Steps, not changes, are counted: a file the target holds as the source has it is
/// not written (a whole list, when the source does not know the round this node holds), and one
/// the check found missing or changed is, though no change names it.
pub(super) struct Fitting<I> {
    steps: I,
    room: Room,
}

impl<I> Fitting<I> {
    pub(super) fn new(steps: I, room: Room) -> Self {
        Self { steps, room }
    }
}

impl<I: Iterator<Item = anyhow::Result<(u64, Step)>>> Iterator for Fitting<I> {
    type Item = anyhow::Result<(u64, Step)>;

    fn next(&mut self) -> Option<Self::Item> {
        let placed = self.steps.next()?;
        Some(placed.and_then(|(place, step)| {
            self.room.fits(|space| space.count(&step))?;
            Ok((place, step))
        }))
    }
}

impl Iterator for Incoming {
    type Item = anyhow::Result<Change>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_change().transpose()
    }
}
