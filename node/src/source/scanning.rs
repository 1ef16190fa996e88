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

/// How long listed changes wait for more before they are sent: fewer, fuller batches (each one
/// compressed frame) while the scan is slower than the list, and no change held for long.
const LIST_LATENCY: Duration = Duration::from_millis(100);

/// Entries the scan examines at a time. Its stages (walk, read, write, the tee) each hold a few
/// batches: 512 entries of mail BLOBs kept about 150 MB between the scan's read and the chunk
/// reader's, which a source limited to 320 MiB of memory did not keep cached (1.9× the reads).
const SCAN_BATCH: usize = 128;

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
    /// Starts scanning `root` into the job's state (`cache`, `out`), showing progress when asked.
    pub(super) fn start(
        root: std::path::PathBuf,
        cache: std::path::PathBuf,
        out: std::path::PathBuf,
        show: meter::Show,
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
}

#[derive(Default)]
struct GateState {
    /// Listed and not passed: (place, changed bytes), in order.
    ahead: std::collections::VecDeque<(u64, u64)>,
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
            state.ahead.push_back((place, bytes));
            state.bytes += bytes;
        }
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
        });
    }

    /// The chunk reader read the chunks of the oldest list of needs not read yet.
    pub(super) fn read(&self) {
        self.moved(|state| {
            state.unread.pop_front();
        });
    }

    fn moved(&self, change: impl FnOnce(&mut GateState)) {
        if let Ok(mut state) = self.state.lock() {
            change(&mut state);
            let passed = state.unread.front().map_or(state.planned, |first| state.planned.min(*first));
            while state.ahead.front().is_some_and(|(at, _)| *at < passed) {
                let Some((_, bytes)) = state.ahead.pop_front() else { break };
                state.bytes -= bytes;
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
    pub(super) fn wait_for_room(&self) {
        let Ok(mut state) = self.state.lock() else { return };
        while !state.open && (state.ahead.len() as u64 > AHEAD_CHANGES / 2 || state.bytes > AHEAD_BYTES / 2) {
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
    pub(super) fn is_full(&self) -> bool {
        self.state
            .lock()
            .is_ok_and(|state| !state.open && (state.ahead.len() as u64 >= AHEAD_CHANGES || state.bytes >= AHEAD_BYTES))
    }
}

/// The entries a [`Teed`] stream carries, in order (the manifest file, which comes first, is the
/// caller's: [`teed_manifest`]). When the scan has had nothing more for [`LIST_LATENCY`], it calls
/// `before_waiting` (the list sends what it has); when that says no, the entries end there.
pub(super) struct TeedEntries<F> {
    rx: Receiver<Teed>,
    batch: std::vec::IntoIter<ferry_engine::RawEntry>,
    before_waiting: F,
}

impl<F: FnMut() -> bool> TeedEntries<F> {
    pub(super) fn new(rx: Receiver<Teed>, before_waiting: F) -> Self {
        Self { rx, batch: Vec::new().into_iter(), before_waiting }
    }
}

impl<F: FnMut() -> bool> Iterator for TeedEntries<F> {
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
            if let Teed::Entries(entries) = teed {
                self.batch = entries.into_iter();
            }
        }
    }
}

/// Takes the manifest file from the start of a tee: the first thing a scan tees.
pub(super) fn teed_manifest(rx: &Receiver<Teed>) -> anyhow::Result<(std::fs::File, std::path::PathBuf)> {
    match rx.recv() {
        Ok(Teed::Manifest(file, path)) => Ok((file, path)),
        Ok(Teed::Entries(_)) => Err(anyhow!("the scan teed entries before its manifest")),
        Err(_) => Err(anyhow!("the scan ended before it began its manifest")),
    }
}
