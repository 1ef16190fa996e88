//! The destination's window of chunks in flight, as bookkeeping without I/O: which chunks were asked
//! for, which the source cannot send, how many bytes came unasked, whether the source stopped, and
//! when it counts as stalled. The time is passed in; nothing here reads a clock.
//!
//! Where an arrived chunk's bytes wait (memory, a spill file, the file being built) is the driver's:
//! the ledger says only whether to keep it.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use ferry_engine::ChunkHash;

/// How many bytes of chunks it did not ask for a destination drops before it ends the round: a few
/// late duplicates are normal, a stream of them is not.
pub const UNWANTED_MAX: u64 = 64 << 20;

/// What the window says of a chunk that arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// Asked for and not arrived before: keep it.
    Keep,
    /// Not asked for (or already in): drop it. Its bytes count against [`UNWANTED_MAX`].
    Drop,
}

/// Why no more chunks will come this round, as far as the window can tell.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowEnd {
    /// The source sent more than [`UNWANTED_MAX`] of chunks this node did not ask for.
    #[error("the source sent {:.1} MiB of chunks this node did not ask for", *.0 as f64 / f64::from(1 << 20))]
    Flooded(u64),
    /// The source stopped (its deadline) after its last batch had come.
    #[error("the source stopped before sending this chunk")]
    Stopped,
}

/// The window's bookkeeping: chunks wanted, missing, and the unwanted budget.
#[derive(Debug, Default)]
pub struct Ledger {
    /// Asked for and not arrived yet: only those are kept when they come.
    wanted: HashSet<ChunkHash>,
    /// The needs sent and not answered yet, by number (they count from 0, in the order sent: a chunk
    /// batch names its chunks by them).
    asked: HashMap<u64, ChunkHash>,
    /// The number of the next need.
    next_need: u64,
    /// The source said it cannot send these, or they arrived damaged.
    missing: HashSet<ChunkHash>,
    unwanted_bytes: u64,
    /// Chunk batches received.
    batches: u64,
    /// The source stopped after sending this many batches.
    stopped_after: Option<u64>,
    /// Notices that the source's bandwidth limit pauses it.
    pauses: u64,
}

impl Ledger {
    /// Records that `hashes` were asked for, in this order: the next needs' numbers.
    pub fn want(&mut self, hashes: impl IntoIterator<Item = ChunkHash>) {
        for hash in hashes {
            self.wanted.insert(hash);
            self.asked.insert(self.next_need, hash);
            self.next_need += 1;
        }
    }

    /// The hash need `number` asked for, if it was sent and is not answered yet; it is answered now.
    pub fn answer(&mut self, number: u64) -> Option<ChunkHash> {
        self.asked.remove(&number)
    }

    /// `len` bytes came that answer no need sent (or one answered already): they count against the
    /// unwanted budget.
    pub fn unasked(&mut self, len: u64) {
        self.unwanted_bytes += len;
    }

    /// Whether `hash` was asked for and has not come (nor been given up) yet.
    pub fn is_wanted(&self, hash: &ChunkHash) -> bool {
        self.wanted.contains(hash)
    }

    /// Whether chunks asked for are still to come.
    pub fn waiting(&self) -> bool {
        !self.wanted.is_empty()
    }

    /// Whether `hash` will not come: the source cannot send it, or it arrived damaged.
    pub fn is_missing(&self, hash: &ChunkHash) -> bool {
        self.missing.contains(hash)
    }

    /// A chunk of `len` bytes arrived whole and checked; `held` says, when asked (only for a chunk not
    /// wanted), whether the driver already holds it (a duplicate of one kept earlier, which costs
    /// nothing against the budget).
    pub fn arrive(&mut self, hash: &ChunkHash, len: u64, held: impl FnOnce() -> bool) -> Arrival {
        if self.wanted.remove(hash) {
            Arrival::Keep
        } else {
            if !held() {
                self.unwanted_bytes += len;
            }
            Arrival::Drop
        }
    }

    /// A chunk arrived damaged (its bytes do not hash to its name): it counts as missing when it was
    /// asked for. Returns whether it was.
    pub fn damaged(&mut self, hash: &ChunkHash) -> bool {
        let wanted = self.wanted.remove(hash);
        if wanted {
            self.missing.insert(*hash);
        }
        wanted
    }

    /// A batch of chunks was received whole.
    pub fn batch_received(&mut self) {
        self.batches += 1;
    }

    /// The source says it cannot send the chunks of these needs (by number); only needs sent and not
    /// answered count (a list of others would only grow the set).
    pub fn source_missing(&mut self, needs: impl IntoIterator<Item = u64>) {
        for need in needs {
            if let Some(hash) = self.answer(need)
                && self.wanted.remove(&hash)
            {
                self.missing.insert(hash);
            }
        }
    }

    /// Chunk batches received so far.
    pub fn batches(&self) -> u64 {
        self.batches
    }

    /// The source's bandwidth limit pauses it: not stalled.
    pub fn paused(&mut self) {
        self.pauses += 1;
    }

    /// The source stopped after sending `batches` batches.
    pub fn stopped(&mut self, batches: u64) {
        self.stopped_after = Some(batches);
    }

    /// Drops what is known of `hash` once its chunk is in the target and its index.
    pub fn forget(&mut self, hash: &ChunkHash) {
        self.missing.remove(hash);
    }

    /// Why no more wanted chunks will come, if the window can tell: the source flooded it, or stopped
    /// and its last batch is in.
    pub fn end(&self) -> Option<WindowEnd> {
        if self.unwanted_bytes > UNWANTED_MAX {
            return Some(WindowEnd::Flooded(self.unwanted_bytes));
        }
        if self.stopped_after.is_some_and(|after| self.batches >= after) {
            return Some(WindowEnd::Stopped);
        }
        None
    }

    /// What moves while the source is alive, besides bytes on the data streams: chunks it cannot send
    /// and notices that it is paused. Feed it to a [`StallTimer`] with the bytes.
    pub fn events(&self) -> u64 {
        self.missing.len() as u64 + self.pauses
    }
}

/// Says when nothing has moved for `timeout`: the driver observes a progress count (bytes arrived,
/// events) with the time, and asks when the next check is due.
#[derive(Debug, Clone)]
pub struct StallTimer {
    timeout: Duration,
    last: Option<(Instant, u64)>,
}

impl StallTimer {
    /// A timer that calls a peer stalled after `timeout` without progress.
    pub fn new(timeout: Duration) -> Self {
        Self { timeout, last: None }
    }

    /// Takes the progress count seen at `now`; returns true when it has not moved for the timeout
    /// ([`Self::deadline`] has come). The first observation starts the clock.
    pub fn observe(&mut self, progress: u64, now: Instant) -> bool {
        match self.last {
            Some((since, seen)) if seen == progress => now.saturating_duration_since(since) >= self.timeout,
            _ => {
                self.last = Some((now, progress));
                false
            }
        }
    }

    /// Starts the clock again at `now`: the driver saw progress of its own (entries applied).
    pub fn restart(&mut self, progress: u64, now: Instant) {
        self.last = Some((now, progress));
    }

    /// When the peer will count as stalled if nothing moves before.
    pub fn deadline(&self) -> Option<Instant> {
        self.last.map(|(since, _)| since + self.timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(n: u8) -> ChunkHash {
        ChunkHash::from_bytes([n; 32])
    }

    #[test]
    fn only_chunks_asked_for_are_kept_and_each_once() {
        let mut ledger = Ledger::default();
        ledger.want([hash(1), hash(2)]);
        assert_eq!(ledger.arrive(&hash(1), 100, || false), Arrival::Keep);
        assert_eq!(ledger.arrive(&hash(1), 100, || true), Arrival::Drop, "a duplicate of a kept chunk");
        assert_eq!(ledger.arrive(&hash(3), 100, || false), Arrival::Drop, "never asked for");
        assert!(ledger.is_wanted(&hash(2)));
        assert!(!ledger.is_wanted(&hash(1)));
        assert_eq!(ledger.end(), None);
    }

    #[test]
    fn a_flood_of_chunks_not_asked_for_ends_the_window_but_duplicates_of_kept_ones_do_not() {
        let mut ledger = Ledger::default();
        ledger.want([hash(1)]);
        ledger.arrive(&hash(1), 1 << 20, || false);
        for _ in 0..100 {
            ledger.arrive(&hash(1), 1 << 20, || true);
        }
        assert_eq!(ledger.end(), None, "late duplicates of what was kept cost nothing");
        for _ in 0..64 {
            ledger.arrive(&hash(9), 1 << 20, || false);
        }
        assert_eq!(ledger.end(), None, "exactly the budget is allowed");
        ledger.arrive(&hash(9), 1, || false);
        assert_eq!(ledger.end(), Some(WindowEnd::Flooded(UNWANTED_MAX + 1)));
    }

    #[test]
    fn missing_counts_only_for_chunks_asked_for() {
        let mut ledger = Ledger::default();
        ledger.want([hash(1), hash(2)]);
        // Needs 0 and 1 were sent; 7 never was.
        ledger.source_missing([0, 7]);
        assert!(ledger.is_missing(&hash(1)));
        assert_eq!(ledger.events(), 1, "a need never sent");
        assert!(ledger.damaged(&hash(2)));
        assert!(ledger.is_missing(&hash(2)));
        assert!(!ledger.damaged(&hash(8)));
        assert_eq!(ledger.events(), 2);
        ledger.forget(&hash(1));
        assert!(!ledger.is_missing(&hash(1)));
    }

    #[test]
    fn needs_are_numbered_in_the_order_sent_and_each_is_answered_once() {
        let mut ledger = Ledger::default();
        ledger.want([hash(1), hash(2)]);
        ledger.want([hash(3)]);
        assert_eq!(ledger.answer(2), Some(hash(3)));
        assert_eq!(ledger.answer(2), None, "answered already");
        assert_eq!(ledger.answer(0), Some(hash(1)));
        assert_eq!(ledger.answer(3), None, "never sent");
        ledger.unasked(1 << 20);
        assert_eq!(ledger.end(), None);
        ledger.unasked(UNWANTED_MAX);
        assert!(matches!(ledger.end(), Some(WindowEnd::Flooded(_))));
    }

    #[test]
    fn a_stopped_source_ends_the_window_once_its_last_batch_is_in() {
        let mut ledger = Ledger::default();
        ledger.want([hash(1)]);
        ledger.batch_received();
        ledger.stopped(2);
        assert_eq!(ledger.end(), None, "one batch is still on its way");
        ledger.batch_received();
        assert_eq!(ledger.end(), Some(WindowEnd::Stopped));
    }

    #[test]
    fn the_stall_timer_fires_only_after_the_timeout_without_progress() {
        let start = Instant::now();
        let mut timer = StallTimer::new(Duration::from_secs(120));
        assert_eq!(timer.deadline(), None);
        assert!(!timer.observe(0, start));
        assert_eq!(timer.deadline(), Some(start + Duration::from_secs(120)));
        assert!(!timer.observe(0, start + Duration::from_secs(119)), "before the deadline");
        assert!(timer.observe(0, start + Duration::from_secs(120)), "at the deadline");
        // Progress moves the deadline.
        let mut timer = StallTimer::new(Duration::from_secs(120));
        timer.observe(0, start);
        assert!(!timer.observe(5, start + Duration::from_secs(100)));
        assert!(!timer.observe(5, start + Duration::from_secs(200)));
        assert!(timer.observe(5, start + Duration::from_secs(220)));
    }

    #[test]
    fn a_pause_longer_than_the_stall_timeout_is_not_a_stall_while_its_notices_come() {
        let start = Instant::now();
        let mut ledger = Ledger::default();
        let mut timer = StallTimer::new(Duration::from_secs(3));
        timer.observe(ledger.events(), start);
        // Paused for 10 s, a notice every second, no bytes at all.
        for second in 1..=10 {
            ledger.paused();
            assert!(!timer.observe(ledger.events(), start + Duration::from_secs(second)));
        }
        // The notices stop: stalled three seconds later.
        assert!(!timer.observe(ledger.events(), start + Duration::from_millis(12_999)));
        assert!(timer.observe(ledger.events(), start + Duration::from_secs(13)));
    }
}
