//! The transfer: planning entries, asking for their chunks, applying them as they come, flushing.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use ferry_engine::{Applier, ChunkHash, Step, lap};
use ferry_proto::{DestinationEnd, DestinationInput, NeedChunk};

use super::window::{WINDOW_MAX, Waiting, Window};

/// Applied chunk bytes that make a flush due before its time (so that a fast transfer does not wait
/// for the clock to free memory).
pub(super) const FLUSH_BYTES: u64 = 16 << 20;

/// How often a flush begins. What was applied is durable by the next one, so a crash of this node
/// costs at most about twice this of the transfer.
pub(super) const FLUSH_EVERY: Duration = Duration::from_millis(250);

/// How many entries wait for their chunks at most.
pub(super) const WINDOW_ENTRIES: usize = 20_000;

/// What the transfer gets from its steps.
pub(super) enum Next<T> {
    /// The next one.
    Item(T),
    /// None for now: the list has not come that far.
    Later,
    /// No more.
    End,
}

/// The transfer's steps: each with its place in the new manifest.
pub(super) trait Steps {
    /// The next step, without waiting for the network.
    fn try_next(&mut self) -> Next<anyhow::Result<(u64, Step)>>;
    /// Whether the list streams (the source waits for the word that the transfer passed its
    /// changes).
    fn streams(&self) -> bool;
}

/// Steps from a list that is whole: the manifests on disk, read ahead.
pub(super) struct Whole<I>(pub(super) I);

impl<I: Iterator<Item = anyhow::Result<(u64, Step)>>> Steps for Whole<I> {
    fn try_next(&mut self) -> Next<anyhow::Result<(u64, Step)>> {
        self.0.next().map_or(Next::End, Next::Item)
    }

    fn streams(&self) -> bool {
        false
    }
}

/// How the transfer ended.
pub(super) enum TransferEnd {
    /// Every entry was applied.
    Complete,
    /// The source stopped the round (its deadline) after sending what it had started.
    Stopped(String),
    /// The connection or the source failed; what arrived was applied.
    Cut(String),
}

/// The transfer, streamed: entries are planned ahead and their chunks asked for while at most
/// `WINDOW_MAX` bytes (and `WINDOW_ENTRIES` entries) are in memory, asked for and not yet flushed; each entry is
/// applied, in order, as soon as its chunks are in; every `FLUSH_EVERY` what was applied begins its way
/// to the disk (`begin_flush`), and its chunks leave memory once it is durable, at the next flush. A stop or a
/// cut keeps everything applied so far. Each step comes with its place in the new manifest
/// ([`super::merge::placed`]), by which its needs name it.
///
/// While the list streams, the steps it has not made yet are not waited for ([`Next::Later`]): the
/// transfer applies what arrived, and tells the source the place it planned up to (`Passed`) when it
/// has planned all it had or asked for nothing, so that the source's list goes on.
pub(super) fn transfer(
    applier: &mut Applier<'_>,
    steps: &mut impl Steps,
    window: &Window,
) -> anyhow::Result<TransferEnd> {
    let mut waiting: VecDeque<Waiting> = VecDeque::new();
    let mut outstanding = 0u64;
    let mut planned_all = false;
    // The place after the last step planned, and the last one the source was told of.
    let (mut next_place, mut told) = (0u64, 0u64);
    let (mut applied, mut applied_bytes): (Vec<ChunkHash>, u64) = (Vec::new(), 0);
    // Applied before the last flush began, durable once the next one begins.
    let (mut syncing, mut syncing_bytes): (Vec<ChunkHash>, u64) = (Vec::new(), 0);
    let mut last_flush = Instant::now();
    let mut building = Building::default();
    let mut spent = Spent::default();
    let mut cut = None;
    let end = loop {
        // Plan ahead and ask.
        let (mut needs, mut prefixes) = (Vec::new(), Vec::new());
        let mut clock = Instant::now();
        let mut later = false;
        while !planned_all && outstanding < WINDOW_MAX && waiting.len() < WINDOW_ENTRIES {
            let step = match steps.try_next() {
                Next::Item(step) => step,
                Next::Later => {
                    later = true;
                    break;
                }
                Next::End => {
                    planned_all = true;
                    break;
                }
            };
            let (place, step) = match step {
                Ok(step) => step,
                // A list cut short: the machine says why (a stop, a cut), and what arrived is applied.
                Err(e) => match ended(window) {
                    Some(end) => {
                        planned_all = true;
                        cut = Some(end);
                        break;
                    }
                    None => return Err(e),
                },
            };
            let planned = match &step {
                Step::Prefix(prefix) => {
                    prefixes.push(place);
                    applier.plan_prefix(prefix)?
                }
                step => {
                    next_place = place + 1;
                    match step.pair() {
                        Some(pair) => applier.plan(pair)?,
                        None => Vec::new(),
                    }
                }
            };
            let (mut hashes, mut bytes) = (Vec::new(), 0u64);
            for need in planned {
                bytes += u64::from(need.chunk.len);
                hashes.push(need.chunk.hash);
                needs.push(NeedChunk {
                    path: need.path,
                    place,
                    offset: need.offset,
                    len: need.chunk.len,
                    hash: need.chunk.hash,
                });
            }
            outstanding += bytes;
            waiting.push_back(Waiting { step, hashes, ready: 0, bytes });
        }
        for part in needs.chunks(4096) {
            window.input(DestinationInput::Need(part.to_vec()))?;
        }
        // After the needs they made: the source's list waits for these.
        for place in prefixes.drain(..) {
            window.input(DestinationInput::PrefixPlanned(place))?;
        }
        if steps.streams() && next_place > told && (needs.is_empty() || later || planned_all) {
            window.input(DestinationInput::Passed(next_place))?;
            told = next_place;
        }
        spent.planning += lap(&mut clock);
        if let Some(end) = cut.take().or_else(|| ended(window)) {
            break end;
        }
        // Apply what is ready, in order. A large file is applied as its chunks arrive: the applier
        // writes each one as soon as it is in (and waits for the next), so that the file is written
        // and synced while the rest of it is on the way, and its chunks do not pile up here.
        // The loop yields when a flush is due: while chunks come as fast as they are applied, what was
        // applied must still become durable and leave the window, and more be asked for, or the
        // window runs dry and the link idles (for seconds, on the WAN bench).
        // A due flush waits for the batch before it to be durable; while that one is still syncing,
        // the loop applies on instead of waiting (the window still bounds what is applied).
        let mut progressed = false;
        let flush_due = |last_flush: Instant, applied_bytes: u64| {
            last_flush.elapsed() > FLUSH_EVERY || applied_bytes >= FLUSH_BYTES
        };
        while (!flush_due(last_flush, applied_bytes) || applier.is_syncing())
            && waiting.front_mut().is_some_and(|w| window.can_apply(w))
        {
            let Some(entry) = waiting.pop_front() else { break };
            applied_bytes += entry.bytes;
            building.applied(&entry, &mut applied);
            applier.step(entry.step)?;
            progressed = true;
        }
        spent.applying += lap(&mut clock);
        // A large file's wait ends early when the data streams fail or nothing comes for the stall
        // deadline: the round is cut there, not counted complete without that file.
        if let Some(error) = window.error() {
            // The machine's end (a stop, the source's failure, a stall) says it in its own words.
            break ended(window).unwrap_or_else(|| TransferEnd::Cut(format!("receiving chunks failed: {error}")));
        }
        // Applied chunks stay in memory (and count) until they are durable in the target: the flush
        // begun here makes what the previous one began durable, while the disk syncs this one.
        let idle = !waiting.front_mut().is_some_and(|w| window.can_apply(w));
        if flush_due(last_flush, applied_bytes) && (idle || !applier.is_syncing()) {
            applier.begin_flush()?;
            window.forget(&syncing);
            outstanding -= syncing_bytes;
            syncing = std::mem::take(&mut applied);
            syncing_bytes = std::mem::take(&mut applied_bytes);
            last_flush = Instant::now();
            spent.flushing += lap(&mut clock);
        }
        if planned_all && waiting.is_empty() {
            break TransferEnd::Complete;
        }
        // Wait for chunks (or steps), unless some are ready (the loop above yielded) or there is room
        // to plan more.
        let ready = waiting.front_mut().is_some_and(|w| window.can_apply(w));
        let room = !planned_all && outstanding < WINDOW_MAX && waiting.len() < WINDOW_ENTRIES;
        if ready || (progressed && room && !later) {
            continue;
        }
        if progressed {
            // Applying is the round moving: the machine's stall timer starts again.
            window.input(DestinationInput::Applied)?;
        }
        let state = window.state.lock().map_err(|_| anyhow!("window lock poisoned"))?;
        if state.error.is_some() {
            drop(state);
            continue;
        }
        let _ = window
            .changed
            .wait_timeout(state, Duration::from_millis(200))
            .map_err(|_| anyhow!("window lock poisoned"))?;
        spent.waiting += lap(&mut clock);
    };
    // What arrived before a stop or a cut: the entries whose chunks are all in, then durable; and
    // of a large file listed as it was cut, what came of the chunks listed next (its building
    // writes them up to the first that did not, and keeps them for the next round).
    while waiting.front_mut().is_some_and(|w| matches!(w.step, Step::Prefix(_)) || window.holds_all(w)) {
        let Some(entry) = waiting.pop_front() else { break };
        applier.step(entry.step)?;
    }
    let mut clock = Instant::now();
    applier.flush_batch()?;
    spent.flushing += lap(&mut clock);
    tracing::debug!(
        "transfer: {:.2} s planning (reading the manifests, looking chunks up), {:.2} s applying, {:.2} s flushing \
         (waiting for a batch's files to be made and synced, naming them into place), {:.2} s waiting for chunks",
        spent.planning.as_secs_f64(),
        spent.applying.as_secs_f64(),
        spent.flushing.as_secs_f64(),
        spent.waiting.as_secs_f64()
    );
    Ok(end)
}

/// The chunks of the large file built from its prefixes ([`Step::Prefix`]) so far. They stay in
/// the window (read back from the file being built, costing no memory) until the file's entry is
/// applied: the index learns of them only as the file's syncs go, and a later part of the file
/// that shares one reads it from there.
#[derive(Default)]
struct Building {
    path: Option<ferry_engine::RelPath>,
    hashes: Vec<ChunkHash>,
}

impl Building {
    /// `entry` is applied: its chunks join `applied` (forgotten once durable), or the building
    /// file's, which join them with its entry.
    fn applied(&mut self, entry: &super::window::Waiting, applied: &mut Vec<ChunkHash>) {
        match &entry.step {
            Step::Prefix(prefix) => {
                // Another file: the last one's entry did not come (it changed while it was read).
                if self.path.as_ref() != Some(&prefix.path) {
                    applied.append(&mut self.hashes);
                    self.path = Some(prefix.path.clone());
                }
                self.hashes.extend_from_slice(&entry.hashes);
            }
            step => {
                let new = step.pair().and_then(|pair| pair.new.as_ref());
                if new.is_some_and(|new| Some(&new.path) == self.path.as_ref()) {
                    applied.append(&mut self.hashes);
                    self.path = None;
                }
                applied.extend_from_slice(&entry.hashes);
            }
        }
    }
}

/// Where the transfer's thread spent its time, for the debug log: in which part of its loop.
#[derive(Default)]
pub(super) struct Spent {
    pub(super) planning: Duration,
    pub(super) applying: Duration,
    pub(super) flushing: Duration,
    pub(super) waiting: Duration,
}

/// How the machine says the transfer ended, if it did: the source stopped, failed, stalled, broke
/// the protocol or lost the connection.
pub(super) fn ended(window: &Window) -> Option<TransferEnd> {
    Some(match window.end()? {
        DestinationEnd::Stopped(reason) => TransferEnd::Stopped(reason),
        DestinationEnd::Cut(why) => TransferEnd::Cut(why),
        DestinationEnd::Violation(error) => TransferEnd::Cut(error.to_string()),
    })
}
