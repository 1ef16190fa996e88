//! The scan, running beside the round: it writes the new manifest and tees its entries to the first
//! connection's list of changes as it goes, so that chunks move while the tree is still being read.
//! The list keeps a bounded window ahead of what the destination has planned ([`Gate`]): what the
//! scan read is still in memory when it is asked for, and the source reads each changed byte once.

use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use std::time::SystemTime;

use anyhow::{Context, anyhow};
use ferry_engine::{Progress, ScanOptions, ScanReport, SettledBefore, Teed, scan};

use crate::meter;

/// Changes the list may go ahead of the destination.
pub(super) const AHEAD_CHANGES: u64 = 16_384;

/// Bytes of changed files the list may go ahead of the chunks read. With the scan's own stages
/// ([`SCAN_BATCH`]), what the source's page cache must hold for the chunks asked for to be read
/// from memory, not from the disk again (`ferry-bench --read-once`); and what keeps the
/// destination's window full (at 8 MiB a first round from a warm cache took twice as long).
pub(super) const AHEAD_BYTES: u64 = 64 << 20;

/// Bytes of a large file listed as it is cut ([`STREAM_FROM`]) that the list may go ahead of the
/// chunks read: a tenth of the memory this node may use, between 16 and 64 MiB. The scan's tee
/// holds a few prefixes more, and all of it must still be in the page cache when it is asked for.
pub(super) fn prefix_ahead_bytes() -> u64 {
    static AHEAD: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *AHEAD.get_or_init(|| crate::memory::limit().map_or(64 << 20, |limit| (limit / 10).clamp(16 << 20, 64 << 20)))
}

/// How long listed changes wait for more before they are sent: fewer, fuller batches (each one
/// compressed frame) while the scan is slower than the list, and no change held for long.
const LIST_LATENCY: Duration = Duration::from_millis(100);

/// Entries the scan examines at a time. Its stages (walk, read, write, the tee) each hold a few
/// batches: 512 entries of mail BLOBs kept about 150 MB between the scan's read and the chunk
/// reader's, which a source limited to 320 MiB of memory did not keep cached (1.9× the reads).
const SCAN_BATCH: usize = 128;

/// Files this large that changed are read in manifest order and listed as they are cut
/// ([`ScanOptions::stream_from`]): the chunks the destination asks for are still in memory, even
/// where the file is not, and move while the file is read.
pub(super) const STREAM_FROM: u64 = 64 << 20;

/// The scan of a round's source tree, on a thread of its own.
pub(super) struct Scanning {
    /// The scan's manifest, as it writes it: for the first connection's list, which takes it.
    tee: Mutex<Option<Receiver<Teed>>>,
    done: tokio::sync::watch::Receiver<Option<Result<Arc<ScanReport>, String>>>,
    cancel: Arc<std::sync::atomic::AtomicBool>,
    /// What the chunk reader trusts without hashing again (the scan's start).
    pub(super) settled: SettledBefore,
}

impl Scanning {
    /// Starts scanning `root` into the job's state (`cache`, `out`), showing progress when asked;
    /// large files are listed as they are cut when the round `streams` them (not a dry run).
    pub(super) fn start(
        root: std::path::PathBuf,
        cache: std::path::PathBuf,
        out: std::path::PathBuf,
        show: meter::Show,
        streams: bool,
    ) -> anyhow::Result<Self> {
        tracing::info!("scanning {}", root.display());
        let started = SystemTime::now();
        // A few batches of the scan's: the tee's reader keeps up, or the scan waits.
        let (tee_tx, tee_rx) = std::sync::mpsc::sync_channel(4);
        let (done_tx, done) = tokio::sync::watch::channel(None);
        let progress = Arc::new(Progress::default());
        let cancel = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let cancelled = cancel.clone();
        let span = tracing::Span::current();
        std::thread::Builder::new()
            .name("ferry-scan".into())
            .spawn(move || {
                let _entered = span.enter();
                let watching = meter::Watch::start(show, {
                    let progress = progress.clone();
                    move || meter::scan_line(&progress)
                });
                let options = ScanOptions {
                    progress: Some(progress),
                    tee: Some(tee_tx),
                    started: Some(started),
                    batch: SCAN_BATCH,
                    cancel: Some(cancelled),
                    stream_from: streams.then_some(STREAM_FROM),
                    ..ScanOptions::default()
                };
                let result = scan(&root, Some(&cache), &out, &cache, &options);
                // The tee closes here: its reader sees the end of the list.
                drop(options);
                drop(watching);
                let result = match result {
                    Ok(report) => {
                        if report.changed_while_read_count > 0 {
                            tracing::warn!(
                                "{} changed while read; left for the next round (e.g. {})",
                                crate::human::counted(report.changed_while_read_count, "file"),
                                report.changed_while_read.join(", ")
                            );
                        }
                        Ok(Arc::new(report))
                    }
                    // Its words name their cause already: not again as an error chain.
                    Err(e) => Err(format!("the scan failed: {e}")),
                };
                let _ = done_tx.send(Some(result));
            })
            .context("cannot start the scan's thread")?;
        Ok(Self { tee: Mutex::new(Some(tee_rx)), done, cancel, settled: SettledBefore::scan_at(started) })
    }

    /// The scan's manifest as it is written, for the one list that streams it (the first
    /// connection's; a later one waits for the scan and reads the manifest whole).
    pub(super) fn take_tee(&self) -> Option<Receiver<Teed>> {
        self.tee.lock().ok()?.take()
    }

    /// Stops the scan (a round that ended without it) and waits for it: nothing writes the job's
    /// state once the round lets go of it.
    pub(super) async fn stop(&self) {
        self.cancel.store(true, std::sync::atomic::Ordering::Relaxed);
        drop(self.take_tee());
        let _ = self.done().await;
    }

    /// Waits for the scan to end.
    pub(super) async fn done(&self) -> anyhow::Result<Arc<ScanReport>> {
        let mut done = self.done.clone();
        let result = done.wait_for(Option::is_some).await.map_err(|_| anyhow!("the scan's thread ended early"))?;
        match result.as_ref() {
            Some(Ok(report)) => Ok(report.clone()),
            Some(Err(why)) => Err(anyhow!("{why}")),
            None => unreachable!("waited for"),
        }
    }
}

impl Drop for Scanning {
    fn drop(&mut self) {
        // A round that ends without waiting for its scan (an early error) does not leave it running.
        self.cancel.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// How far the list may go: the changes listed and not yet passed, with their places and changed
/// bytes. A change is passed once the destination planned it (`Passed`, or a need for a later
/// entry) and the chunk reader has read every chunk asked for before it. The list waits
/// ([`Gate::wait_for_room`]) while more than [`AHEAD_CHANGES`] or [`AHEAD_BYTES`] are not passed.
#[derive(Default)]
pub(super) struct Gate {
    state: Mutex<GateState>,
    moved: Condvar,
    /// One past the place of the last change listed: the destination can name no entry beyond.
    reach: std::sync::atomic::AtomicU64,
    /// The large file listed last as it was cut: its place, path and chunks listed (from the
    /// first). Needs of that place are looked up there first: they may come after its entry is
    /// listed, or after the entry that took its place (it changed while it was cut, and has none).
    prefix: Mutex<Option<(u64, ferry_engine::RelPath, Vec<ferry_engine::ChunkRef>)>>,
}

#[derive(Default)]
struct GateState {
    /// Listed and not passed: (place, changed bytes, whether a prefix), in order.
    ahead: std::collections::VecDeque<(u64, u64, bool)>,
    /// Lists of needs received and read so far.
    asked: u64,
    read: u64,
    /// For each prefix the destination said it planned and that has not passed: the lists of
    /// needs received by then, which must be read for it to pass.
    prefixes_planned: std::collections::VecDeque<u64>,
    bytes: u64,
    /// Every entry before this place is planned by the destination.
    planned: u64,
    /// The first place of each list of needs received and not yet read, in order.
    unread: std::collections::VecDeque<u64>,
    /// No more waiting: the list runs free (its connection ended, or the round stops).
    open: bool,
}

impl Gate {
    /// A change at `place` with `bytes` of changed content was listed.
    pub(super) fn listed(&self, place: u64, bytes: u64) {
        self.reach.fetch_max(place + 1, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut state) = self.state.lock() {
            state.ahead.push_back((place, bytes, false));
            state.bytes += bytes;
        }
    }

    /// The next chunks of the file that will be at `place` were listed ([`ferry_engine::FilePrefix`]).
    /// They pass once the destination said it planned them ([`Gate::prefix_planned`]) and the
    /// chunk reader read what it asked for up to there.
    pub(super) fn listed_prefix(&self, listed: &ferry_engine::FilePrefix) {
        let (place, bytes) = (listed.place, listed.chunks.iter().map(|chunk| u64::from(chunk.len)).sum());
        if let Ok(mut prefix) = self.prefix.lock() {
            match prefix.as_mut() {
                Some((at, _, chunks)) if *at == place && listed.offset > 0 => chunks.extend_from_slice(&listed.chunks),
                _ => *prefix = Some((place, listed.path.clone(), listed.chunks.clone())),
            }
        }
        if let Ok(mut state) = self.state.lock() {
            state.ahead.push_back((place, bytes, true));
            state.bytes += bytes;
        }
    }

    /// The destination planned the prefix that came last.
    pub(super) fn prefix_planned(&self) {
        self.moved(|state| state.prefixes_planned.push_back(state.asked));
    }

    /// The file listed last as it was cut, when it is at `place`: its path, and its chunks listed
    /// from the `from`th on.
    pub(super) fn prefix_at(
        &self,
        place: u64,
        from: usize,
    ) -> Option<(ferry_engine::RelPath, Vec<ferry_engine::ChunkRef>)> {
        let prefix = self.prefix.lock().ok()?;
        let (_, path, chunks) = prefix.as_ref().filter(|(at, ..)| *at == place)?;
        Some((path.clone(), chunks.get(from..).unwrap_or_default().to_vec()))
    }

    /// The destination planned every entry before `place`.
    pub(super) fn passed(&self, place: u64) {
        self.moved(|state| state.planned = state.planned.max(place));
    }

    /// The destination asked for chunks of the entries from `first` to `last`: planned up to
    /// `last`, and not passed from `first` on until the chunk reader has read them ([`Gate::read`]).
    pub(super) fn asked(&self, first: u64, last: u64) {
        self.moved(|state| {
            state.planned = state.planned.max(last);
            state.unread.push_back(first);
            state.asked += 1;
        });
    }

    /// The chunk reader read the chunks of the oldest list of needs not read yet.
    pub(super) fn read(&self) {
        self.moved(|state| {
            state.unread.pop_front();
            state.read += 1;
        });
    }

    fn moved(&self, change: impl FnOnce(&mut GateState)) {
        if let Ok(mut state) = self.state.lock() {
            change(&mut state);
            let passed = state.unread.front().map_or(state.planned, |first| state.planned.min(*first));
            // A prefix is planned before its place is, and read once the needs that came before
            // the word that it was planned are.
            while let Some(&(at, bytes, prefix)) = state.ahead.front() {
                let gone = match prefix {
                    false => at < passed,
                    true => state.prefixes_planned.front().is_some_and(|asked| state.read >= *asked),
                };
                if !gone {
                    break;
                }
                state.ahead.pop_front();
                state.bytes -= bytes;
                if prefix {
                    state.prefixes_planned.pop_front();
                }
            }
            self.moved.notify_all();
        }
    }

    /// Lets the list run on without waiting, from now on.
    pub(super) fn open(&self) {
        if let Ok(mut state) = self.state.lock() {
            state.open = true;
            self.moved.notify_all();
        }
    }

    /// Waits, once the list is as far ahead as it may go, until half of that is passed (so that
    /// the list goes on in batches, not a change at a time).
    pub(super) fn wait_for_room(&self, ahead_bytes: u64) {
        let Ok(mut state) = self.state.lock() else { return };
        while !state.open && (state.ahead.len() as u64 > AHEAD_CHANGES / 2 || state.bytes > ahead_bytes / 2) {
            match self.moved.wait(state) {
                Ok(next) => state = next,
                Err(_) => return,
            }
        }
    }

    /// The list is whole (and the manifest written): needs may name any entry, and nothing waits.
    pub(super) fn finish(&self) {
        self.reach.store(u64::MAX, std::sync::atomic::Ordering::Relaxed);
        self.open();
    }

    /// One past the last place the list has named.
    pub(super) fn reach(&self) -> u64 {
        self.reach.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the list waits now.
    pub(super) fn is_full(&self, ahead_bytes: u64) -> bool {
        self.state
            .lock()
            .is_ok_and(|state| !state.open && (state.ahead.len() as u64 >= AHEAD_CHANGES || state.bytes >= ahead_bytes))
    }
}

/// The entries a [`Teed`] stream carries, in order (the manifest file, which comes first, is the
/// caller's: [`teed_manifest`]). When the scan has had nothing more for [`LIST_LATENCY`], it calls
/// `before_waiting` (the list sends what it has); when that says no, the entries end there.
pub(super) struct TeedEntries<F, P> {
    rx: Receiver<Teed>,
    batch: std::vec::IntoIter<ferry_engine::RawEntry>,
    before_waiting: F,
    /// Given each prefix teed (see [`Teed::Prefix`]) when it comes, after the entries before it;
    /// when it says no, the entries end there.
    prefix: P,
}

impl<F: FnMut() -> bool, P: FnMut(ferry_engine::FilePrefix) -> bool> TeedEntries<F, P> {
    pub(super) fn new(rx: Receiver<Teed>, before_waiting: F, prefix: P) -> Self {
        Self { rx, batch: Vec::new().into_iter(), before_waiting, prefix }
    }
}

impl<F: FnMut() -> bool, P: FnMut(ferry_engine::FilePrefix) -> bool> Iterator for TeedEntries<F, P> {
    type Item = Result<ferry_engine::RawEntry, ferry_engine::RecordFileError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(entry) = self.batch.next() {
                return Some(Ok(entry));
            }
            let teed = match self.rx.try_recv() {
                Ok(teed) => teed,
                Err(TryRecvError::Disconnected) => return None,
                Err(TryRecvError::Empty) => match self.rx.recv_timeout(LIST_LATENCY) {
                    Ok(teed) => teed,
                    Err(RecvTimeoutError::Disconnected) => return None,
                    Err(RecvTimeoutError::Timeout) => {
                        if !(self.before_waiting)() {
                            return None;
                        }
                        self.rx.recv().ok()?
                    }
                },
            };
            match teed {
                Teed::Entries(entries) => self.batch = entries.into_iter(),
                Teed::Prefix(prefix) => {
                    if !(self.prefix)(prefix) {
                        return None;
                    }
                }
                Teed::Manifest(..) => {}
            }
        }
    }
}

/// Takes the manifest file from the start of a tee: the first thing a scan tees.
pub(super) fn teed_manifest(rx: &Receiver<Teed>) -> anyhow::Result<(std::fs::File, std::path::PathBuf)> {
    match rx.recv() {
        Ok(Teed::Manifest(file, path)) => Ok((file, path)),
        Ok(Teed::Entries(_) | Teed::Prefix(_)) => Err(anyhow!("the scan teed entries before its manifest")),
        Err(_) => Err(anyhow!("the scan ended before it began its manifest")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_engine::{ChunkHash, ChunkRef, FilePrefix, RelPath};

    fn prefix(offset: u64, mib: u32) -> FilePrefix {
        let chunks = (0..mib).map(|i| ChunkRef { hash: ChunkHash::of(&[i as u8]), len: 1 << 20 }).collect::<Vec<_>>();
        FilePrefix { place: 1, path: RelPath::new(&b"large"[..]).unwrap(), offset, chunks, size: 16 << 20 }
    }

    #[test]
    fn a_prefix_passes_once_planned_and_read_and_its_chunks_are_found_by_place() {
        let gate = Gate::default();
        gate.listed(0, 1 << 20);
        gate.listed_prefix(&prefix(0, 8));
        gate.listed_prefix(&prefix(8 << 20, 8));
        assert!(gate.is_full(17 << 20));
        // The destination asks for the first prefix's chunks and says it planned it.
        gate.asked(1, 1);
        gate.prefix_planned();
        assert!(gate.is_full(16 << 20) && !gate.is_full(17 << 20), "the change before it passed");
        // Needs asked for after that word do not hold it back; those before it do, until read.
        gate.asked(1, 1);
        assert!(gate.is_full(16 << 20));
        gate.read();
        assert!(gate.is_full(8 << 20) && !gate.is_full(9 << 20), "the first prefix passed");
        gate.prefix_planned();
        assert!(gate.is_full(8 << 20), "planned, but its needs are not read");
        gate.read();
        assert!(!gate.is_full(1), "all passed");

        let (path, chunks) = gate.prefix_at(1, 6).unwrap();
        assert_eq!((path.to_string(), chunks.len()), ("large".into(), 10));
        assert!(gate.prefix_at(2, 0).is_none());
        // Listing the file's entry (or another at its place) leaves its prefix to needs in flight.
        gate.listed(1, 0);
        assert!(gate.prefix_at(1, 0).is_some());
    }
}
