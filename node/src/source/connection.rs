//! One connection of a round, driven: [`SourceRound`] decides what is said and when; this loop reads
//! the control stream, the list of changes, the chunk reader and the clock, feeds them to it, and does
//! what it asks (send, read chunks, stop the senders).

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, anyhow};
use ferry_engine::ManifestReader;
use ferry_proto::{
    ChangesEnd, ChunkAt, Committed, Hello, Message, PAUSE_NOTICE, PROTOCOL_VERSION, Plan, RoundOptions, SourceConfig,
    SourceEnd, SourceEvent, SourceInput, SourcePhase, SourceRound, Transmit,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::changes::{Listed, Lister, PositionCursor, Positions, send_changes};
use super::chunk_reader::{Outgoing, SourceChunks, async_channel, estimate_chunks, read_chunks};
use super::needs::{NeedError, Needs};
use super::options::PushOptions;
use super::outcome::{deadline_error, max_duration_text, stopped_error};
use super::prepare::Prepared;
use super::progress::{Counters, spawn_progress};
use super::scanning::{Gate, TeedEntries, teed_manifest};
use super::session::{Closed, closed_error, why_closed};
use super::stop::StopRequest;
use crate::limit::Limiter;
use crate::net::{self, FrameReader};
use crate::refused::Refused;

/// What a connection came to, when the round ended well on it.
pub(super) enum Driven {
    /// Committed.
    Committed(Finished),
    /// A dry run's plan, with the bytes the chunks asked for would weigh.
    Planned { plan: Plan, changes: u64, changed_bytes: u64, payload: u64 },
}

/// A committed round, as one attempt saw it end.
pub(super) struct Finished {
    pub(super) committed: Committed,
    pub(super) changes: u64,
    pub(super) changed_bytes: u64,
    pub(super) import: Option<ferry_proto::ImportResult>,
    pub(super) notices: Vec<String>,
    /// What the destination's check of its target found.
    pub(super) checked: Option<ferry_proto::Checked>,
}

/// How long a source whose side of the round failed waits for the destination to receive why
/// (`Failed`) before it closes the connection.
const FAILED_READ_WITHIN: std::time::Duration = std::time::Duration::from_secs(2);

/// Runs a round on `connection` until it ends. `sent` counts the chunks over all of a round's
/// connections; `deadline` is the round's (`--max-duration`).
pub(super) async fn drive(
    prepared: &Prepared,
    options: &PushOptions,
    limiter: &Limiter,
    sent: &Arc<Counters>,
    connection: &quinn::Connection,
    deadline: Option<Instant>,
    mut stop: Option<&mut StopRequest>,
) -> anyhow::Result<Driven> {
    let Prepared { peer, addr, identity, state, job, .. } = prepared;
    let closed = |why: Closed| closed_error(why, peer, addr, identity);
    // With TLS 1.3 the server checks this node's certificate after the client considers the handshake
    // done: a refusal shows up on the first stream operations.
    let (mut send, recv) = match connection.open_bi().await {
        Ok(streams) => streams,
        Err(_) => return Err(closed(why_closed(connection).await)),
    };
    let mut reader = FrameReader::new(recv);
    let base = state.usable_base();
    let hello = Hello {
        version: PROTOCOL_VERSION,
        job: job.name.clone(),
        base,
        delete: options.delete,
        numeric_ids: options.numeric_ids,
        source: prepared.source_id,
    };
    let words = format!("the source's deadline (--max-duration {})", max_duration_text(options));
    let mut machine = SourceRound::new(SourceConfig {
        hello,
        options: RoundOptions { import: options.import },
        dry_run: options.dry_run,
        wait_for_import: options.wait_for_import,
        deadline: deadline.map(|at| (at, words)),
    });
    let mut list: Option<List> = None;
    let mut gate: Option<Arc<Gate>> = None;
    let mut transfer: Option<Transfer> = None;
    let mut dry_run_needs: Option<Needs> = None;
    let (mut changes, mut changed_bytes, mut payload) = (0u64, 0u64, 0u64);
    let mut notices = Vec::new();
    let mut checked = None;
    let mut reading = true;
    let mut pause_tick = tokio::time::interval(PAUSE_NOTICE);
    pause_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut list_paused_since: Option<Instant> = None;
    let mut stopped_by: Option<&'static str> = None;
    let end = 'round: loop {
        let mut busy = false;
        while let Some(transmit) = machine.poll_transmit() {
            busy = true;
            let written = match transmit {
                Transmit::Message(message @ Message::Changes(_)) => {
                    net::send_limited(&mut send, &message, limiter).await.map(|bytes| {
                        sent.list_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
                    })
                }
                Transmit::Message(message) => net::send(&mut send, &message).await,
                Transmit::Finish => {
                    let _ = send.finish();
                    Ok(())
                }
            };
            if written.is_err() {
                let why = why_closed(connection).await;
                machine.handle(SourceInput::Closed { refusal: why.refusal, reason: why.text }, Instant::now());
                break;
            }
        }
        while let Some(event) = machine.poll() {
            busy = true;
            match event {
                SourceEvent::Welcomed { holds } => {
                    tracing::Span::current().record("round", holds.map_or(1, |h| h.round + 1));
                    match List::start(prepared, base, holds, options.dry_run).await {
                        Ok((started, needs_from)) => {
                            gate.clone_from(&started.gate);
                            if !options.dry_run {
                                transfer = Some(Transfer::start(
                                    prepared,
                                    limiter,
                                    sent,
                                    connection,
                                    started.positions.clone(),
                                    needs_from,
                                ));
                            }
                            list = Some(started);
                        }
                        Err(e) => machine.handle(SourceInput::ReadFailed(format!("{e:#}")), Instant::now()),
                    }
                }
                SourceEvent::Read(chunks) if options.dry_run => {
                    // A dry run sizes what it would send (read and compressed here, not sent).
                    let (root, settled) = (job.path.clone(), prepared.scan.settled);
                    let (manifest, looked_up) = (state.scanned(), dry_run_needs.take());
                    let sized = tokio::task::spawn_blocking(move || -> Result<_, NeedError> {
                        let mut needs = match looked_up {
                            Some(needs) => needs,
                            None => Needs::open(&manifest)?,
                        };
                        let chunks: Vec<_> = needs.resolve_all(chunks)?.into_iter().map(|(_, need)| need).collect();
                        Ok((estimate_chunks(&root, settled, &chunks)?, needs))
                    })
                    .await
                    .context("sizing chunks panicked")?;
                    match sized {
                        Ok((bytes, needs)) => (payload, dry_run_needs) = (payload + bytes, Some(needs)),
                        Err(NeedError::Read(e)) => return Err(e),
                        Err(bad) => machine.handle(SourceInput::BadNeed(bad.to_string()), Instant::now()),
                    }
                }
                SourceEvent::Read(chunks) => {
                    // The destination planned up to the last chunk's file; the list goes on once they are read.
                    if let (Some(gate), Some(first), Some(last)) = (&gate, chunks.first(), chunks.last()) {
                        gate.asked(first.place, last.place);
                    }
                    let Some(transfer) = &transfer else { unreachable!("chunks are asked for once welcomed") };
                    if transfer.needs.send(chunks).await.is_err() {
                        machine.handle(SourceInput::ReadFailed("the chunk reader stopped".into()), Instant::now());
                    }
                }
                SourceEvent::Passed(place) => {
                    if let Some(gate) = &gate {
                        gate.passed(place);
                    }
                }
                SourceEvent::PrefixPlanned(_) => {
                    if let Some(gate) = &gate {
                        gate.prefix_planned();
                    }
                }
                SourceEvent::Notice(text) => {
                    tracing::warn!("{}: {text}", peer.name);
                    notices.push(text);
                }
                SourceEvent::Checked(check) => checked = Some(check),
                SourceEvent::ImportStarted { round, command } => {
                    tracing::info!("{} imports round {round}: {}", peer.name, command.join(" "));
                }
                SourceEvent::StopSending => {
                    // Finish the batches on the wire, then tell the destination how many there were.
                    let batches = match transfer.take() {
                        Some(transfer) => transfer.stop().await,
                        None => 0,
                    };
                    let cause = stopped_by.unwrap_or("deadline reached");
                    tracing::info!("{cause}: stopping after {batches} chunk batches");
                    machine.handle(SourceInput::SendingStopped { batches }, Instant::now());
                }
                SourceEvent::Ended(end) => break 'round end,
            }
        }
        if busy {
            continue;
        }
        let paused = limiter.is_paused() && !options.dry_run;
        let listing = list.is_some() && machine.phase() == SourcePhase::Listing;
        if listing {
            log_list_pause(paused, &mut list_paused_since, options.progress_interval);
        }
        let timeout = machine.poll_timeout();
        tokio::select! {
            message = reader.next(), if reading => match message {
                Ok(Some(message)) => {
                    if matches!(message, Message::Need(_)) {
                        sent.need_bytes.fetch_add(reader.last_len() as u64, Ordering::Relaxed);
                    }
                    machine.handle(SourceInput::Message(message), Instant::now())
                }
                end => {
                    reading = false;
                    let why = match machine.phase() {
                        // Committed is committed: the import's news end with the stream.
                        SourcePhase::Importing => {
                            if let Err(e) = &end {
                                tracing::warn!("lost {} while waiting for the import: {e:#}; see `ferry status` on it", peer.name);
                            }
                            Closed { refusal: None, text: "the destination finished".into() }
                        }
                        // After `Stop` the destination applies what arrived, then closes the connection.
                        SourcePhase::Stopping => {
                            let until = machine.poll_timeout().unwrap_or_else(Instant::now);
                            let _ = tokio::time::timeout_at(until.into(), connection.closed()).await;
                            Closed { refusal: None, text: "the destination closed".into() }
                        }
                        _ => why_closed(connection).await,
                    };
                    machine.handle(SourceInput::Closed { refusal: why.refusal, reason: why.text }, Instant::now());
                }
            },
            batch = next_batch(&mut list), if listing && !paused => match batch {
                Some(Listed::Changes(batch)) => {
                    changes += batch.len() as u64;
                    machine.handle(SourceInput::Changes(batch), Instant::now());
                }
                Some(Listed::Prefix(prefix)) => machine.handle(SourceInput::Prefix(prefix), Instant::now()),
                None => {
                    let Some(mut done) = list.take() else { unreachable!("listing") };
                    let end = match done.end(prepared).await {
                        Ok(end) => end,
                        Err(e) => {
                            machine.handle(SourceInput::ReadFailed(format!("{e:#}")), Instant::now());
                            continue;
                        }
                    };
                    match end.base {
                        Some(base) if changes == 0 => tracing::info!("0 changes sent (the tree is as in round {})", base.round),
                        Some(base) => tracing::info!("{changes} changes sent (against round {})", base.round),
                        None => tracing::info!("{changes} changes sent (the whole manifest: no round held in common)"),
                    }
                    if let Some(gate) = &gate {
                        gate.finish();
                    }
                    changed_bytes = done.positions.lock().map_err(|_| anyhow!("lock poisoned"))?.total;
                    sent.changed.store(changed_bytes, Ordering::Relaxed);
                    if let Some(transfer) = &mut transfer {
                        transfer.show_progress(sent, connection, limiter, options);
                    }
                    machine.handle(SourceInput::ChangesEnd(end), Instant::now());
                }
            },
            report = next_report(&mut transfer) => match report {
                FromReader::Missing(missing) => {
                    let chunks = crate::human::counted(missing.len() as u64, "chunk");
                    tracing::warn!("{chunks} could not be read (files changed since the scan)");
                    machine.handle(SourceInput::Unreadable(missing), Instant::now());
                }
                FromReader::Failed(why) => machine.handle(SourceInput::ReadFailed(why), Instant::now()),
                FromReader::BadNeed(what) => machine.handle(SourceInput::BadNeed(what), Instant::now()),
            },
            _ = pause_tick.tick() => {
                machine.handle(SourceInput::Paused(paused), Instant::now());
                // A streamed list waits for the scan or for the destination: it is not stalled.
                if listing && !paused && list.as_ref().is_some_and(|list| list.gate.is_some()) {
                    machine.handle(SourceInput::Scanning, Instant::now());
                }
            }
            signal = stop_requested(&mut stop), if stopped_by.is_none() => {
                stopped_by = Some(signal);
                machine.stop(format!("{signal} (the operator stopped the round)"), Instant::now());
            }
            () = sleep_until(timeout) => machine.handle_timeout(Instant::now()),
        }
    };
    // A list given up opens its gate as it goes (see `List`'s `Drop`).
    drop(list);
    if let Some(transfer) = transfer {
        transfer.stop().await;
    }
    match end {
        SourceEnd::Committed { committed, import } => {
            Ok(Driven::Committed(Finished { committed, changes, changed_bytes, import, notices, checked }))
        }
        SourceEnd::Planned(plan) => Ok(Driven::Planned { plan, changes, changed_bytes, payload }),
        SourceEnd::Deadline { .. } => match stopped_by {
            Some(signal) => Err(stopped_error(signal, sent).into()),
            None => Err(deadline_error(options, sent).into()),
        },
        SourceEnd::Refused { refusal, reason } => {
            Err(Refused::new(refusal, format!("{} refused the round: {reason}", peer.name)).into())
        }
        SourceEnd::PeerFailed(reason) => Err(anyhow!("{} failed the round: {reason}", peer.name)),
        SourceEnd::Failed(why) => {
            // `Failed` is on its way to the destination, for its operator. Closing the connection
            // before it ended its round with it (it then ends its stream) would drop it, or have
            // the destination tell of the close instead.
            let _ = send.finish();
            if reading {
                let _ = tokio::time::timeout(FAILED_READ_WITHIN, async {
                    while let Ok(Some(message)) = reader.next().await {
                        tracing::debug!("after the round failed here: {message:?}");
                    }
                })
                .await;
            }
            Err(anyhow!("the round failed on this node (the destination keeps what arrived whole): {why}"))
        }
        SourceEnd::Violation(what) => {
            net::close_sent(connection, ferry_proto::Refusal::ProtocolViolation.code(), what.as_bytes()).await;
            Err(anyhow!("{} broke the protocol: {what}", peer.name))
        }
        SourceEnd::Closed { refusal, reason } => Err(closed(Closed { refusal, text: reason })),
    }
}

/// Says in the log when the bandwidth limit holds the list of changes, again every `interval` (a
/// log without it would look hung for the hours of a pause), and when it lets the list go on.
fn log_list_pause(paused: bool, since: &mut Option<Instant>, interval: std::time::Duration) {
    match (paused, *since) {
        (true, None) => {
            tracing::info!("the bandwidth limit pauses the round: the list of changes waits for it to open");
            *since = Some(Instant::now());
        }
        (true, Some(told)) if told.elapsed() >= interval => {
            tracing::info!("paused by the bandwidth limit: the list of changes still waits");
            *since = Some(Instant::now());
        }
        (false, Some(_)) => {
            tracing::info!("the bandwidth limit opened: the list of changes goes on");
            *since = None;
        }
        _ => {}
    }
}

async fn stop_requested(stop: &mut Option<&mut StopRequest>) -> &'static str {
    match stop {
        Some(stop) => stop.requested().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// The list of changes on its way, made on a thread of its own: streamed from the scan as it writes
/// the manifest (the first connection), or from the manifest written (a later one).
struct List {
    /// Batches of changes (and prefixes of large files), until the list is complete.
    batches: mpsc::Receiver<Listed>,
    differ: Option<JoinHandle<anyhow::Result<()>>>,
    /// The round the changes are against.
    base: Option<ferry_proto::RoundRef>,
    /// Where each changed byte falls, as the list grows.
    positions: Arc<Mutex<Positions>>,
    /// Streamed: how far ahead of the destination the list may go.
    gate: Option<Arc<Gate>>,
}

/// Where the chunk reader looks needs up: the manifest written, or the one the scan is writing.
enum NeedsFrom {
    Written(std::path::PathBuf),
    Streamed(std::fs::File, std::path::PathBuf, Arc<Gate>),
}

impl NeedsFrom {
    /// The list's gate, when it streams.
    fn gate(&self) -> Option<Arc<Gate>> {
        match self {
            NeedsFrom::Written(_) => None,
            NeedsFrom::Streamed(_, _, gate) => Some(gate.clone()),
        }
    }

    fn open(self) -> anyhow::Result<Needs> {
        match self {
            NeedsFrom::Written(path) => Needs::open(&path),
            NeedsFrom::Streamed(file, path, gate) => Needs::streamed(file, &path, gate),
        }
    }
}

impl List {
    /// The changes since what the destination holds (all of them when this node no longer has that
    /// manifest), or none when the tree is what it holds; and where needs are looked up.
    async fn start(
        prepared: &Prepared,
        base: Option<ferry_proto::RoundRef>,
        holds: Option<ferry_proto::RoundRef>,
        dry_run: bool,
    ) -> anyhow::Result<(Self, NeedsFrom)> {
        let delta_base = base.filter(|b| Some(*b) == holds);
        let base_path = delta_base.map(|_| prepared.state.base());
        let positions = Arc::new(Mutex::new(Positions::default()));
        let (changes_tx, changes_rx) = mpsc::channel::<Listed>(4);
        let list =
            |differ, gate| Self { batches: changes_rx, differ, base: delta_base, positions: positions.clone(), gate };
        if let Some(tee) = prepared.scan.take_tee() {
            let teed = tokio::task::spawn_blocking(move || teed_manifest(&tee).map(|m| (tee, m)))
                .await
                .context("the scan's tee panicked")?;
            let (tee, (file, path)) = match teed {
                Ok(teed) => teed,
                // A scan that cannot begin its manifest (the state folder's disk full) says why itself.
                Err(e) => return Err(prepared.scan.done().await.err().unwrap_or(e)),
            };
            let gate = Arc::new(Gate::default());
            if dry_run {
                // A dry run's destination plans once the list is whole: nothing to wait for.
                gate.open();
            }
            let (lister_gate, into) = (gate.clone(), positions.clone());
            let differ = tokio::task::spawn_blocking(move || {
                let lister = RefCell::new(Lister::new(changes_tx, Some(lister_gate)));
                // What is listed goes out whenever the scan has nothing more for now.
                let entries = TeedEntries::new(
                    tee,
                    || lister.borrow_mut().flush().is_ok(),
                    |prefix| lister.borrow_mut().prefix(prefix, &into).is_ok(),
                );
                send_changes(base_path.as_deref(), entries, &lister, &into)
            });
            let needs = NeedsFrom::Streamed(file, path, gate.clone());
            return Ok((list(Some(differ), Some(gate)), needs));
        }
        // A later connection: the scan is over (or ends first), and its manifest is read whole.
        let scanned = prepared.scan.done().await?;
        let needs = NeedsFrom::Written(prepared.state.scanned());
        if delta_base.is_some_and(|b| Some(b.root) == scanned.root_hash) {
            // No need to read both manifests through to find no change.
            drop(changes_tx);
            return Ok((list(None, None), needs));
        }
        let (scanned_path, into) = (prepared.state.scanned(), positions.clone());
        let differ = tokio::task::spawn_blocking(move || {
            let lister = RefCell::new(Lister::new(changes_tx, None));
            send_changes(base_path.as_deref(), ManifestReader::open(&scanned_path)?.raw(), &lister, &into)
        });
        Ok((list(Some(differ), None), needs))
    }

    /// Once the last batch is out: the list's end, with the scan's root hash.
    async fn end(&mut self, prepared: &Prepared) -> anyhow::Result<ChangesEnd> {
        if let Some(differ) = self.differ.take() {
            differ.await.context("the diff panicked")?.map_err(|e| damaged_base(e, &prepared.state))?;
        }
        let scanned = prepared.scan.done().await?;
        let root = scanned.root_hash.ok_or_else(|| anyhow!("the scan produced no root hash"))?;
        Ok(ChangesEnd { base: self.base, root, entries: scanned.entries })
    }
}

/// A list that failed on a base altered within (its trailer whole, a record not): the base goes
/// aside, so that the next round lists the whole manifest rather than fail on it again.
fn damaged_base(e: anyhow::Error, state: &crate::state::SourceState) -> anyhow::Error {
    let base = state.base();
    let corrupt = e.chain().any(|cause| {
        matches!(cause.downcast_ref(), Some(ferry_engine::RecordFileError::Corrupt { path, .. }) if *path == base)
    });
    if !corrupt {
        return e;
    }
    state.set_base_aside("it does not read back as it was written");
    e.context("the copy of the last round's manifest this node keeps is damaged; set aside: run the round again")
}

impl Drop for List {
    fn drop(&mut self) {
        // A list given up (its connection ended) must not keep its thread waiting for the destination.
        if let Some(gate) = &self.gate {
            gate.open();
        }
    }
}

async fn next_batch(list: &mut Option<List>) -> Option<Listed> {
    match list.as_mut() {
        Some(list) => list.batches.recv().await,
        None => std::future::pending().await,
    }
}

async fn next_report(transfer: &mut Option<Transfer>) -> FromReader {
    match transfer.as_mut() {
        Some(transfer) => match transfer.from_reader.recv().await {
            Some(report) => report,
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// What the chunk reader tells the control loop.
pub(super) enum FromReader {
    /// Needs (by number) whose chunks could not be read as the scan saw them.
    Missing(Vec<u64>),
    /// Reading failed for good.
    Failed(String),
    /// The destination asked for something the round does not have, or out of order.
    BadNeed(String),
}

/// The chunk reader (a blocking task reading what the destination asks for, in order), four senders
/// on data streams, and the progress line.
struct Transfer {
    needs: mpsc::Sender<Vec<ChunkAt>>,
    from_reader: mpsc::UnboundedReceiver<FromReader>,
    stop: Arc<AtomicBool>,
    senders: Vec<JoinHandle<anyhow::Result<()>>>,
    reader: JoinHandle<()>,
    batches_sent: Arc<AtomicU64>,
    progress: Option<(tokio::sync::oneshot::Sender<()>, JoinHandle<()>)>,
}

impl Transfer {
    fn start(
        prepared: &Prepared,
        limiter: &Limiter,
        sent: &Arc<Counters>,
        connection: &quinn::Connection,
        positions: Arc<Mutex<Positions>>,
        needs_from: NeedsFrom,
    ) -> Self {
        // Bounded: a destination that asks faster than this node reads waits (QUIC's flow control then
        // slows it down) instead of queueing without end here.
        let (needs, mut needs_rx) = mpsc::channel::<Vec<ChunkAt>>(16);
        let (reader_tx, from_reader) = mpsc::unbounded_channel::<FromReader>();
        let (batches_tx, batches_rx) = async_channel();
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (root, settled) = (prepared.job.path.clone(), prepared.scan.settled);
            let (counters, stop, limiter) = (sent.clone(), stop.clone(), limiter.clone());
            let mut cursor = PositionCursor { positions, at: 0 };
            let gate = needs_from.gate();
            tokio::task::spawn_blocking(move || {
                let mut needs = match needs_from.open() {
                    Ok(needs) => needs,
                    Err(e) => {
                        let _ = reader_tx.send(FromReader::Failed(format!("{e:#}")));
                        return;
                    }
                };
                while let Some(chunks) = needs_rx.blocking_recv() {
                    let asked = !chunks.is_empty();
                    let chunks = match needs.resolve_all(chunks) {
                        Ok(chunks) => chunks,
                        Err(NeedError::Read(e)) => {
                            let _ = reader_tx.send(FromReader::Failed(format!("{e:#}")));
                            return;
                        }
                        Err(bad) => {
                            let _ = reader_tx.send(FromReader::BadNeed(bad.to_string()));
                            return;
                        }
                    };
                    // Under a limit, smaller batches: an interruption loses at most the batches on the
                    // wire, and each should take a fraction of a second.
                    let batch_bytes =
                        limiter.rate().bytes_per_second().map_or(ferry_proto::batch::BATCH_BYTES, |bps| {
                            (bps as usize / 16).clamp(64 << 10, ferry_proto::batch::BATCH_BYTES)
                        });
                    let read = SourceChunks::open(&root, settled).and_then(|mut reader| {
                        read_chunks(&mut reader, chunks, &batches_tx, &counters, &mut cursor, &stop, batch_bytes)
                    });
                    // Read (and in memory until sent): the list may go that much further.
                    if let (Some(gate), true) = (&gate, asked) {
                        gate.read();
                    }
                    match read {
                        Ok(missing) if missing.is_empty() => {}
                        Ok(missing) => {
                            let _ = reader_tx.send(FromReader::Missing(missing));
                        }
                        Err(e) => {
                            let _ = reader_tx.send(FromReader::Failed(format!("{e:#}")));
                            return;
                        }
                    }
                }
            })
        };
        let batches_sent = Arc::new(AtomicU64::new(0));
        let senders = (0..4)
            .map(|_| {
                let (connection, rx, limiter, stop, count, counters) = (
                    connection.clone(),
                    batches_rx.clone(),
                    limiter.clone(),
                    stop.clone(),
                    batches_sent.clone(),
                    sent.clone(),
                );
                crate::helpers::spawn_in_span(async move {
                    let mut stream = connection.open_uni().await?;
                    while !stop.load(Ordering::Relaxed) {
                        let Ok(Outgoing { batch, covered }) = rx.recv().await else { break };
                        let bytes = batch.declared_len();
                        net::send_batch_limited(&mut stream, &batch, &limiter).await?;
                        count.fetch_add(1, Ordering::Relaxed);
                        counters.sent_bytes.fetch_add(bytes, Ordering::Relaxed);
                        counters.payload_bytes.fetch_add(batch.payload.len() as u64, Ordering::Relaxed);
                        let _ = counters.first_batch.set(Instant::now());
                        counters.covered.fetch_max(covered, Ordering::Relaxed);
                    }
                    let _ = stream.finish();
                    anyhow::Ok(())
                })
            })
            .collect();
        Self { needs, from_reader, stop, senders, reader, batches_sent, progress: None }
    }

    /// Shows the transfer's progress line from now on (once the list is whole: the scan's line is
    /// shown until then).
    fn show_progress(
        &mut self,
        sent: &Arc<Counters>,
        connection: &quinn::Connection,
        limiter: &Limiter,
        options: &PushOptions,
    ) {
        if self.progress.is_none() {
            let (stop_progress, stop_rx) = tokio::sync::oneshot::channel();
            let progress = spawn_progress(sent.clone(), connection.clone(), limiter.clone(), options.progress, stop_rx);
            self.progress = Some((stop_progress, progress));
        }
    }

    /// Stops reading and sending once the batches being sent are out; returns how many went out.
    async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        drop(self.needs);
        for sender in self.senders {
            let _ = sender.await;
        }
        if let Some((stop_progress, progress)) = self.progress {
            let _ = stop_progress.send(());
            let _ = progress.await;
        }
        let _ = self.reader.await;
        self.batches_sent.load(Ordering::Relaxed)
    }
}
