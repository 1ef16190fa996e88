//! The destination's window: the chunks asked for and in flight, where their bytes wait (memory, the
//! spill file, the file being built), and the data streams that fill it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry_engine::{ChunkBuf, ChunkHash, ChunkRef, ChunkSource, Entry, FetchError, Fetched, LARGE_FILE, Step};
use ferry_proto::window::{Arrival, WindowEnd};
use ferry_proto::{DestinationEnd, DestinationEvent, DestinationInput, DestinationRound, Message, Transmit};
use tokio::sync::mpsc;

use crate::net::FrameReader;

/// How many chunk bytes a round holds in memory at most: asked for and not yet applied, or applied and
/// not yet flushed (48 MiB is about a bandwidth-delay product of 1 Gbit/s at 400 ms).
pub(super) const WINDOW_MAX: u64 = 48 << 20;

/// The round's machine and the chunks of the window in flight, shared between the network tasks and
/// the round thread. What the machine says for the control stream goes to `outbox`.
pub(super) struct Window {
    pub(super) outbox: mpsc::UnboundedSender<Transmit>,
    /// Told when the machine's next timeout moved, so that the task keeping its timers looks again.
    pub(super) timer_moved: tokio::sync::Notify,
    pub(super) state: Mutex<WindowState>,
    pub(super) changed: Condvar,
    /// Bytes read from the control and data streams, whole messages or not: under a slow limit one
    /// message takes longer than the stall timeout, and its bytes show that the source is alive.
    pub(super) bytes_arrived: Arc<AtomicU64>,
}

/// Where an arrived chunk waits: in memory, or (past [`WINDOW_MAX`] in memory, which only a file
/// larger than the window reaches) in the spill file.
pub(super) enum Stored {
    Memory(Bytes),
    Spilled {
        offset: u64,
        len: u32,
    },
    /// Written into a large file being built (see `ChunkSource::written`).
    Written {
        file: Arc<std::fs::File>,
        offset: u64,
        len: u32,
    },
}

/// The spill file: created on first use, emptied when nothing in it is waiting any more.
#[derive(Default)]
pub(super) struct Spill {
    pub(super) dir: PathBuf,
    pub(super) file: Option<std::fs::File>,
    pub(super) end: u64,
    pub(super) waiting: usize,
}

impl Spill {
    pub(super) fn put(&mut self, data: &[u8]) -> std::io::Result<Stored> {
        use std::os::unix::fs::FileExt;
        if self.file.is_none() {
            std::fs::create_dir_all(&self.dir)?;
            self.file = Some(tempfile::tempfile_in(&self.dir)?);
        }
        let Some(file) = &self.file else { unreachable!("created above") };
        file.write_all_at(data, self.end)?;
        let stored = Stored::Spilled { offset: self.end, len: data.len() as u32 };
        self.end += data.len() as u64;
        self.waiting += 1;
        Ok(stored)
    }

    pub(super) fn release(&mut self) {
        self.waiting = self.waiting.saturating_sub(1);
        if self.waiting == 0 && self.end > 0 {
            if let Some(file) = &self.file {
                let _ = file.set_len(0);
            }
            self.end = 0;
        }
    }
}

pub(super) struct WindowState {
    /// The round: the order of messages, what was asked for, what will not come, what came unasked,
    /// whether the source stopped or stalled.
    pub(super) round: DestinationRound,
    /// Why no more chunks will come, once the machine says so.
    pub(super) end: Option<DestinationEnd>,
    pub(super) chunks: HashMap<ChunkHash, Stored>,
    /// Bytes of `chunks` in memory.
    pub(super) memory: u64,
    pub(super) spill: Spill,
    /// Set when the data streams fail, or the source floods the window.
    pub(super) error: Option<String>,
}

pub(super) async fn receive_chunks(
    connection: quinn::Connection,
    window: Arc<Window>,
    limiter: Option<crate::limit::Limiter>,
) {
    loop {
        let stream = match connection.accept_uni().await {
            Ok(stream) => stream,
            Err(e) => return window.fail(format!("the connection ended: {e}")),
        };
        let window = window.clone();
        let limiter = limiter.clone();
        tokio::spawn(async move {
            let mut reader = FrameReader::counting(stream, window.bytes_arrived.clone());
            let mut decompressor = match zstd::bulk::Decompressor::new() {
                Ok(d) => d,
                Err(e) => {
                    window.fail(format!("zstd: {e}"));
                    return;
                }
            };
            loop {
                match reader.next().await {
                    Ok(Some(Message::ChunkBatch(batch))) => {
                        if let Some(limiter) = &limiter {
                            // The payload and about the few bytes that name each chunk.
                            let cost = batch.payload.len() as u64 + 4 * batch.chunks.len() as u64;
                            if let Err(e) = limiter.acquire(cost).await {
                                return window.fail(format!("{e:#}"));
                            }
                        }
                        let expected = window.answer(&batch);
                        match ferry_proto::batch::decode_batch(batch, &expected, &mut decompressor) {
                            Ok(decoded) => window.arrive(decoded),
                            Err(e) => return window.fail(e.to_string()),
                        }
                    }
                    Ok(None) => return,
                    Ok(Some(other)) => return window.fail(format!("unexpected message on a data stream: {other:?}")),
                    Err(e) => return window.fail(format!("{e:#}")),
                }
            }
        });
    }
}

impl Window {
    /// The window of `round`, whose chunks beyond the memory budget wait in a file in `dir`.
    /// `bytes_arrived` counts what the control stream brought (the data streams add theirs).
    pub(super) fn new(
        round: DestinationRound,
        dir: PathBuf,
        outbox: mpsc::UnboundedSender<Transmit>,
        bytes_arrived: Arc<AtomicU64>,
    ) -> Self {
        let state = WindowState {
            round,
            end: None,
            chunks: HashMap::new(),
            memory: 0,
            spill: Spill { dir, ..Spill::default() },
            error: None,
        };
        Self {
            outbox,
            timer_moved: tokio::sync::Notify::new(),
            state: Mutex::new(state),
            changed: Condvar::new(),
            bytes_arrived,
        }
    }

    /// Feeds the machine; returns what the round thread must hear (changes, their end).
    pub(super) fn input(&self, input: DestinationInput) -> anyhow::Result<Vec<DestinationEvent>> {
        let mut state = self.state.lock().map_err(|_| anyhow::anyhow!("window lock poisoned"))?;
        let timeout = state.round.poll_timeout();
        // What the source said may end a wait for a chunk (it is missing, the round is over).
        let from_source = matches!(input, DestinationInput::Message(_));
        state.round.handle(input, Instant::now());
        if state.round.poll_timeout() != timeout {
            self.timer_moved.notify_one();
        }
        if from_source {
            self.changed.notify_all();
        }
        self.drain(&mut state)
    }

    /// Time passed: the machine looks at its timers, with the bytes that arrived since.
    pub(super) fn timeout(&self) -> anyhow::Result<Vec<DestinationEvent>> {
        let mut state = self.state.lock().map_err(|_| anyhow::anyhow!("window lock poisoned"))?;
        let now = Instant::now();
        state.round.handle(DestinationInput::BytesArrived(self.bytes_arrived.load(Ordering::Relaxed)), now);
        state.round.handle_timeout(now);
        self.drain(&mut state)
    }

    /// When the machine wants [`Self::timeout`] next.
    pub(super) fn poll_timeout(&self) -> Option<Instant> {
        self.state.lock().ok()?.round.poll_timeout()
    }

    /// Reads the machine.
    pub(super) fn round<T>(&self, read: impl FnOnce(&DestinationRound) -> T) -> anyhow::Result<T> {
        let state = self.state.lock().map_err(|_| anyhow::anyhow!("window lock poisoned"))?;
        Ok(read(&state.round))
    }

    /// Why no more chunks will come, once the machine says so.
    pub(super) fn end(&self) -> Option<DestinationEnd> {
        self.state.lock().ok()?.end.clone()
    }

    /// Sends what the machine has for the control stream, records its end, and returns the rest.
    fn drain(&self, state: &mut WindowState) -> anyhow::Result<Vec<DestinationEvent>> {
        let mut sent = Ok(());
        while let Some(transmit) = state.round.poll_transmit() {
            if self.outbox.send(transmit).is_err() {
                sent = Err(anyhow::anyhow!("the connection closed"));
            }
        }
        let mut events = Vec::new();
        while let Some(event) = state.round.poll() {
            match event {
                DestinationEvent::Ended(end) => {
                    let why = match &end {
                        DestinationEnd::Stopped(_) => WindowEnd::Stopped.to_string(),
                        DestinationEnd::Cut(why) => why.clone(),
                        DestinationEnd::Violation(error) => error.to_string(),
                    };
                    state.error.get_or_insert(why);
                    state.end = Some(end);
                    self.changed.notify_all();
                }
                other => events.push(other),
            }
        }
        match sent {
            // Once the machine ended, what it could not send is moot: its end says why.
            Err(_) if state.end.is_some() => Ok(events),
            sent => sent.map(|()| events),
        }
    }

    /// What each chunk of `batch` must hash to: the hash its need asked for, or `None` for a chunk
    /// that answers no need sent (or one answered already). The needs are answered now.
    pub(super) fn answer(&self, batch: &ferry_proto::ChunkBatch) -> Vec<Option<ChunkHash>> {
        match self.state.lock() {
            Ok(mut state) => batch.numbered().map(|(need, _)| state.round.answer(need)).collect(),
            Err(_) => vec![None; batch.chunks.len()],
        }
    }

    pub(super) fn arrive(&self, decoded: ferry_proto::batch::Decoded) {
        let ferry_proto::batch::Decoded { good, bad, unasked } = decoded;
        if let Ok(mut guard) = self.state.lock() {
            // Its fields apart: the ledger asks about `chunks` only for a chunk it did not want.
            let state = &mut *guard;
            let now = Instant::now();
            if unasked > 0 {
                state.round.unasked(unasked, now);
            }
            let damaged = bad.iter().filter(|h| state.round.damaged(h)).count();
            if damaged > 0 {
                let damaged = crate::human::counted(damaged as u64, "chunk");
                tracing::warn!("{damaged} arrived damaged (hash mismatch); their files are left for the next round");
            }
            for (hash, data) in good {
                let chunks = &state.chunks;
                if state.round.arrive(&hash, data.len() as u64, || chunks.contains_key(&hash), now) == Arrival::Keep {
                    let stored = if state.memory + data.len() as u64 <= WINDOW_MAX {
                        state.memory += data.len() as u64;
                        Stored::Memory(data)
                    } else {
                        match state.spill.put(&data) {
                            Ok(stored) => stored,
                            Err(e) => {
                                state.error = Some(format!("cannot keep a chunk in the spill file: {e}"));
                                break;
                            }
                        }
                    };
                    state.chunks.insert(hash, stored);
                }
            }
            state.round.handle(DestinationInput::BatchReceived, now);
            // A flood ends the round in the machine; the source hears it on the control stream.
            let _ = self.drain(state);
            self.changed.notify_all();
        }
    }

    /// Drops chunks that are now in the target and its index.
    pub(super) fn forget(&self, hashes: &[ChunkHash]) {
        if let Ok(mut state) = self.state.lock() {
            for hash in hashes {
                match state.chunks.remove(hash) {
                    Some(Stored::Memory(data)) => state.memory -= data.len() as u64,
                    Some(Stored::Spilled { .. }) => state.spill.release(),
                    Some(Stored::Written { .. }) | None => {}
                }
                state.round.forget(hash);
            }
        }
    }

    /// Whether `waiting` can be applied now: once its chunks are in, or, a large file (or the next
    /// chunks of one listed as it is cut), as they arrive.
    pub(super) fn can_apply(&self, waiting: &mut Waiting) -> bool {
        waiting.bytes >= LARGE_FILE || matches!(waiting.step, Step::Prefix(_)) || self.holds_all(waiting)
    }

    /// True when every one of `waiting`'s chunks has arrived or is known missing. Resumes where the
    /// last call stopped (a chunk that arrived stays until its entry is applied), so that a file of
    /// many chunks costs one look per chunk, not one per arrival.
    pub(super) fn holds_all(&self, waiting: &mut Waiting) -> bool {
        let Ok(state) = self.state.lock() else { return false };
        while let Some(hash) = waiting.hashes.get(waiting.ready) {
            if !(state.chunks.contains_key(hash) || state.round.ledger().is_missing(hash)) {
                return false;
            }
            waiting.ready += 1;
        }
        true
    }

    pub(super) fn fail(&self, error: String) {
        if let Ok(mut state) = self.state.lock() {
            state.error = Some(error);
            self.changed.notify_all();
        }
    }

    /// Why the data streams failed, if they did.
    pub(super) fn error(&self) -> Option<String> {
        self.state.lock().map_or_else(|_| Some("window lock poisoned".into()), |state| state.error.clone())
    }

    /// Waits until `hash`, if it was asked for and has not come yet, arrives or cannot come any more
    /// (missing, the data streams failed, the source stopped; the machine calls a silent source
    /// stalled).
    pub(super) fn wait_for<'a>(
        &'a self,
        mut state: std::sync::MutexGuard<'a, WindowState>,
        hash: &ChunkHash,
    ) -> Result<std::sync::MutexGuard<'a, WindowState>, FetchError> {
        let poisoned = || FetchError("window lock poisoned".into());
        while state.round.ledger().is_wanted(hash) && state.error.is_none() {
            if let Some(end @ WindowEnd::Stopped) = state.round.ledger().end() {
                return Err(FetchError(end.to_string()));
            }
            state = self.changed.wait_timeout(state, Duration::from_millis(200)).map_err(|_| poisoned())?.0;
        }
        Ok(state)
    }
}

/// Serves `Applier` the window's chunks. A large file is applied as its chunks arrive: a chunk asked
/// for and not yet arrived is waited for.
pub(super) struct WindowSource {
    pub(super) window: Arc<Window>,
}

impl ChunkSource for WindowSource {
    fn fetch(&mut self, _: &Entry, _: u64, chunk: &ChunkRef, out: &mut ChunkBuf) -> Result<Fetched, FetchError> {
        let state = self.window.state.lock().map_err(|_| FetchError("window lock poisoned".into()))?;
        let state = self.window.wait_for(state, &chunk.hash)?;
        if let Some(error) = &state.error {
            return Err(FetchError(format!("receiving chunks failed: {error}")));
        }
        let stored = state.chunks.get(&chunk.hash).ok_or_else(|| {
            FetchError(if state.round.ledger().is_missing(&chunk.hash) {
                "the source could not send this chunk (the file changed since its scan)".into()
            } else {
                // Not asked for: the chunk index said the target held it, and it was not there.
                "a chunk the target was expected to hold was not there (changed or removed since); \
                 the next round asks the source for it"
                    .into()
            })
        })?;
        match stored {
            // Hashed by `decode_batch` as it arrived, and held in memory since: shared, not copied.
            Stored::Memory(data) => {
                out.share(data.clone());
                Ok(Fetched::Verified)
            }
            Stored::Spilled { offset, len } => {
                let file = state.spill.file.as_ref().ok_or_else(|| FetchError("the spill file is gone".into()))?;
                read_back(file, *offset, *len, out.owned())
                    .map_err(|e| FetchError(format!("reading the spill file: {e}")))
            }
            Stored::Written { file, offset, len } => read_back(file, *offset, *len, out.owned())
                .map_err(|e| FetchError(format!("reading back a chunk of a file being built: {e}"))),
        }
    }

    fn written(&mut self, hash: &ChunkHash, file: &Arc<std::fs::File>, offset: u64) {
        let Ok(mut state) = self.window.state.lock() else { return };
        let state = &mut *state;
        let Some(stored) = state.chunks.get_mut(hash) else { return };
        let len = match stored {
            Stored::Memory(data) => {
                state.memory -= data.len() as u64;
                data.len() as u32
            }
            Stored::Spilled { len, .. } => {
                let len = *len;
                state.spill.release();
                len
            }
            Stored::Written { .. } => return,
        };
        *stored = Stored::Written { file: file.clone(), offset, len };
    }

    fn holds(&mut self, hash: &ChunkHash) -> bool {
        self.window.state.lock().is_ok_and(|state| state.chunks.contains_key(hash))
    }
}

/// Reads a chunk back from a file it was written to: the applier checks it again.
pub(super) fn read_back(file: &std::fs::File, offset: u64, len: u32, out: &mut Vec<u8>) -> std::io::Result<Fetched> {
    use std::os::unix::fs::FileExt;
    out.resize(len as usize, 0);
    file.read_exact_at(out, offset)?;
    Ok(Fetched::Unchecked)
}

/// An entry waiting for the chunks it asked for.
pub(super) struct Waiting {
    pub(super) step: Step,
    pub(super) hashes: Vec<ChunkHash>,
    /// How many of `hashes`, from the start, are known to be in (see [`Window::holds_all`]).
    pub(super) ready: usize,
    pub(super) bytes: u64,
}
