//! One round, over one or more connections: open, send the changes, serve chunks, commit.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use ferry_engine::ChunkHash;
use ferry_proto::{Committed, Hello, Message, NeedChunk, PROTOCOL_VERSION, RoundOptions};
use tokio::sync::mpsc;

use super::changes::{ListPause, PAUSE_NOTICE, PositionCursor, send_all_changes};
use super::chunk_reader::{Outgoing, SourceChunks, async_channel, read_chunks};
use super::options::PushOptions;
use super::outcome::{Lost, StoppedAtDeadline, Unreachable, deadline_error, max_duration_text};
use super::prepare::{Prepared, prepare, timetable};
use super::progress::{Counters, spawn_progress};
use super::report::PushReport;
use super::session::{Closed, Session, closed_error, connect, is_lost, why_closed};
use crate::config_dir::ConfigDir;
use crate::helpers::REPORT_SCHEMA;
use crate::net::{self, FrameReader};
use crate::refused::Refused;

/// Connects, says `Hello` and waits for `Welcome`.
pub(super) async fn open_session(prepared: &Prepared, options: &PushOptions) -> anyhow::Result<Session> {
    let Prepared { client, peer, addr, identity, state, job, .. } = prepared;
    let connection = connect(client, peer, addr, identity, options).await?;
    let refused = |why: Closed| closed_error(why, peer, addr, identity);
    // With TLS 1.3 the server checks this node's certificate after the client considers the handshake
    // done: a refusal shows up on the first stream operations.
    let (mut send, recv) = match connection.open_bi().await {
        Ok(streams) => streams,
        Err(_) => return Err(refused(why_closed(&connection).await)),
    };
    let mut reader = FrameReader::new(recv);
    let base = state.base_round().filter(|_| state.base().exists());
    let hello = Hello {
        version: PROTOCOL_VERSION,
        job: job.name.clone(),
        base,
        delete: options.delete,
        numeric_ids: options.numeric_ids,
    };
    let mut opening = vec![Message::Hello(hello), Message::RoundOptions(RoundOptions { import: options.import })];
    if options.dry_run {
        opening.push(Message::DryRun);
    }
    for message in &opening {
        if net::send(&mut send, message).await.is_err() {
            return Err(refused(why_closed(&connection).await));
        }
    }
    let holds = loop {
        match reader.next().await {
            Ok(Some(Message::Welcome { holds })) => break holds,
            Ok(Some(Message::Notice { text })) => tracing::warn!("{}: {text}", peer.name),
            Ok(Some(Message::Refused { refusal, reason })) => {
                return Err(Refused::new(refusal, format!("{} refused the round: {reason}", peer.name)).into());
            }
            Ok(Some(Message::Failed { reason })) => bail!("{} failed the round: {reason}", peer.name),
            Ok(Some(other)) => bail!("{} answered {other:?} instead of Welcome", peer.name),
            Ok(None) | Err(_) => return Err(refused(why_closed(&connection).await)),
        }
    };
    tracing::Span::current().record("round", holds.map_or(1, |h| h.round + 1));
    Ok(Session { connection, send, reader, base, holds })
}

/// What the attempts of a round added up to.
#[derive(Default)]
pub(super) struct Totals {
    pub(super) bytes_on_wire: u64,
    pub(super) bytes_lost: u64,
    pub(super) path_mtu: u16,
    pub(super) attempts: u64,
}

impl Totals {
    pub(super) fn add(&mut self, connection: &quinn::Connection) {
        let stats = connection.stats();
        self.bytes_on_wire += stats.udp_tx.bytes + stats.udp_rx.bytes;
        self.bytes_lost += stats.path.lost_bytes;
        self.path_mtu = stats.path.current_mtu;
    }
}

/// A committed round, as one attempt saw it end.
pub(super) struct Finished {
    pub(super) committed: Committed,
    pub(super) changes: u64,
    pub(super) changed_bytes: u64,
    pub(super) import: Option<ferry_proto::ImportResult>,
    pub(super) notices: Vec<String>,
}

pub(super) async fn push_once(config_dir: &ConfigDir, options: &PushOptions) -> anyhow::Result<PushReport> {
    let started = Instant::now();
    let deadline = options.max_duration.map(|d| started + d);
    // SIGHUP re-reads the job's and the peer's limits (from now on, not only during the transfer).
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let prepared = prepare(config_dir, options).await?;
    let limiter = crate::limit::Limiter::new(timetable(config_dir, options, &prepared.job.name)?);
    if limiter.rate() != ferry_engine::Rate::UNLIMITED {
        tracing::info!("bandwidth limit {}", crate::limit::describe_rate(limiter.rate()));
    }
    let follow = limiter.follow("bandwidth limit");
    let reload = {
        let (limiter, config_dir, options, job) =
            (limiter.clone(), config_dir.clone(), options.clone(), prepared.job.name.clone());
        crate::helpers::spawn_in_span(async move {
            let Some(hangup) = hangup.as_mut() else { return };
            while hangup.recv().await.is_some() {
                if options.bwlimit.is_some() {
                    tracing::warn!("SIGHUP: --bwlimit on the command line wins over ferry.toml; the limit stays");
                    continue;
                }
                match timetable(&config_dir, &options, &job) {
                    Ok(timetable) => {
                        limiter.set_timetable(timetable);
                        tracing::info!(
                            "SIGHUP: re-read ferry.toml; bandwidth limit now {}",
                            crate::limit::describe_rate(limiter.rate())
                        );
                    }
                    Err(e) => tracing::warn!("SIGHUP: cannot re-read the limits, keeping the current one: {e:#}"),
                }
            }
        })
    };
    let sent = Arc::new(Counters::default());
    let mut totals = Totals::default();
    let mut lost_since: Option<Instant> = None;
    let first_backoff = Duration::from_millis(250);
    let mut backoff = first_backoff;
    let result = loop {
        totals.attempts += 1;
        let attempt = attempt(&prepared, options, &limiter, &sent, &mut totals, deadline).await;
        match attempt {
            Ok(finished) => break Ok(finished),
            Err(e)
                if e.downcast_ref::<Lost>().is_some()
                    || (totals.attempts > 1 && e.downcast_ref::<Unreachable>().is_some()) =>
            {
                if e.downcast_ref::<Lost>().is_some() {
                    // It was connected: the grace period starts now.
                    lost_since = Some(Instant::now());
                    backoff = first_backoff;
                }
                let since = *lost_since.get_or_insert_with(Instant::now);
                if since.elapsed() + backoff > options.reconnect_grace {
                    break Err(Unreachable(format!(
                        "lost {} and could not reconnect within {} (--reconnect-grace): {e:#}; the files that arrived whole are kept, run the round again",
                        prepared.peer.name,
                        humantime::format_duration(options.reconnect_grace)
                    ))
                    .into());
                }
                if deadline.is_some_and(|d| Instant::now() + backoff >= d) {
                    break Err(deadline_error(options, &sent).into());
                }
                tracing::warn!(
                    "{e:#}; reconnecting to {} in {:.1} s (giving up {} s after the loss)",
                    prepared.peer.name,
                    backoff.as_secs_f64(),
                    options.reconnect_grace.as_secs()
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
            Err(e) => break Err(e),
        }
    };
    follow.abort();
    reload.abort();
    let finished = result?;
    let Prepared { job, peer, state, scanned, new_root, .. } = prepared;
    let committed = finished.committed;
    // The destination holds the scanned tree: the base of the next round's changes. In sync only if the
    // scan left nothing of the tree out.
    let holds_tree = committed.round.root == new_root;
    let not_carried = scanned.not_carried(options.skip_special);
    let in_sync = holds_tree && not_carried == 0;
    if holds_tree {
        state.promote(committed.round)?;
    } else {
        state.forget_base();
    }
    let report = PushReport {
        schema: REPORT_SCHEMA,
        job: job.name,
        round: committed.round.round,
        root_hash: committed.round.root.to_string(),
        in_sync,
        entries: scanned.entries,
        changes: finished.changes,
        files_changed: committed.files_written,
        changed_bytes: finished.changed_bytes,
        bytes_read: scanned.bytes_read,
        chunks_sent: sent.chunks.load(Ordering::Relaxed),
        chunk_bytes: sent.bytes.load(Ordering::Relaxed),
        bytes_on_wire: totals.bytes_on_wire,
        bytes_lost: totals.bytes_lost,
        path_mtu: totals.path_mtu,
        connections: totals.attempts,
        failures: committed.failures,
        failure_count: committed.failure_count,
        import: finished.import,
        notices: finished.notices,
        skipped: scanned.skipped.clone(),
        skipped_count: not_carried,
        duration_ms: started.elapsed().as_millis() as u64,
        scan_ms: scanned.duration.as_millis() as u64,
    };
    crate::history::append(&state.history(), &report.history_record(&peer.name))?;
    Ok(report)
}

/// What the chunk reader tells the control loop.
pub(super) enum FromReader {
    /// Chunks that could not be read as the scan saw them.
    Missing(Vec<ChunkHash>),
    /// Reading failed for good.
    Failed(String),
}

/// One connection's worth of a round: open, send the changes, serve chunks until the commit (or the
/// deadline), wait for the import. A lost connection comes back as [`Lost`].
pub(super) async fn attempt(
    prepared: &Prepared,
    options: &PushOptions,
    limiter: &crate::limit::Limiter,
    sent: &Arc<Counters>,
    totals: &mut Totals,
    deadline: Option<Instant>,
) -> anyhow::Result<Finished> {
    if deadline.is_some_and(|d| Instant::now() >= d) {
        return Err(deadline_error(options, sent).into());
    }
    let mut session = open_session(prepared, options).await?;
    let connection = session.connection.clone();
    let result = serve_round(prepared, options, limiter, sent, &mut session, deadline).await;
    totals.add(&connection);
    match result {
        Ok(finished) => {
            connection.close(net::close::DONE.into(), b"round over");
            Ok(finished)
        }
        Err(e) => {
            if e.downcast_ref::<StoppedAtDeadline>().is_none() && is_lost(&connection) {
                return Err(Lost(format!("lost {} in the middle of the round: {e:#}", prepared.peer.name)).into());
            }
            connection.close(net::close::ERROR.into(), b"the source gave up");
            Err(e)
        }
    }
}

pub(super) async fn serve_round(
    prepared: &Prepared,
    options: &PushOptions,
    limiter: &crate::limit::Limiter,
    sent: &Arc<Counters>,
    session: &mut Session,
    deadline: Option<Instant>,
) -> anyhow::Result<Finished> {
    let peer = &prepared.peer;
    let pause = ListPause::Holds { deadline, options, sent };
    let (changes, positions) = send_all_changes(prepared, session, limiter, pause).await?;
    let changed_bytes = positions.total;
    sent.changed.store(changed_bytes, Ordering::Relaxed);
    let positions = Arc::new(positions);
    let connection = session.connection.clone();

    // The chunk reader: a blocking task reading what the destination asks for, in order.
    // Bounded: a destination that asks faster than this node reads waits (QUIC's flow control then
    // slows it down) instead of queueing without end here.
    let (needs_tx, mut needs_rx) = mpsc::channel::<Vec<NeedChunk>>(16);
    let (reader_tx, mut from_reader) = mpsc::unbounded_channel::<FromReader>();
    let (batches_tx, batches_rx) = async_channel();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader_task = {
        let (root, settled) = (prepared.job.path.clone(), prepared.scanned.settled_before);
        let (counters, stop, limiter) = (sent.clone(), stop.clone(), limiter.clone());
        let mut cursor = PositionCursor { positions, at: 0 };
        tokio::task::spawn_blocking(move || {
            while let Some(chunks) = needs_rx.blocking_recv() {
                // Under a limit, smaller batches: an interruption loses at most the batches on the
                // wire, and each should take a fraction of a second.
                let batch_bytes = limiter.rate().bytes_per_second().map_or(ferry_proto::batch::BATCH_BYTES, |bps| {
                    (bps as usize / 16).clamp(64 << 10, ferry_proto::batch::BATCH_BYTES)
                });
                let read = SourceChunks::open(&root, settled).and_then(|mut reader| {
                    read_chunks(&mut reader, chunks, &batches_tx, &counters, &mut cursor, &stop, batch_bytes)
                });
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
    let senders: Vec<_> = (0..4)
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
                    counters.covered.fetch_max(covered, Ordering::Relaxed);
                }
                let _ = stream.finish();
                anyhow::Ok(())
            })
        })
        .collect();
    drop(batches_rx);
    let (stop_progress, stop_rx) = tokio::sync::oneshot::channel();
    let progress =
        spawn_progress(sent.clone(), connection.clone(), limiter.clone(), options.progress_interval, stop_rx);
    let deadline_sleep = async {
        match deadline {
            Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline_sleep);
    // While the limit pauses the chunks, the destination hears every second that the round is alive:
    // its stall timer would otherwise end the round two minutes into a timetable's pause.
    let mut pause_notice = tokio::time::interval(PAUSE_NOTICE);
    pause_notice.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut notices = Vec::new();
    let outcome: anyhow::Result<Committed> = loop {
        tokio::select! {
            _ = pause_notice.tick() => {
                if limiter.is_paused() {
                    net::send(&mut session.send, &Message::Paused).await?;
                }
            }
            message = session.reader.next() => match message {
                Ok(Some(Message::Need(chunks))) => {
                    if needs_tx.send(chunks).await.is_err() {
                        break Err(anyhow!("the chunk reader stopped"));
                    }
                }
                Ok(Some(Message::Done)) => {}
                Ok(Some(Message::Notice { text })) => {
                    tracing::warn!("{}: {text}", peer.name);
                    notices.push(text);
                }
                Ok(Some(Message::Committed(committed))) => break Ok(committed),
                Ok(Some(Message::Failed { reason })) => break Err(anyhow!("{} failed the round: {reason}", peer.name)),
                Ok(Some(Message::Refused { refusal, reason })) => {
                    break Err(Refused::new(refusal, format!("{} refused the round: {reason}", peer.name)).into());
                }
                Ok(Some(other)) => break Err(anyhow!("unexpected {other:?} from {}", peer.name)),
                Ok(None) | Err(_) => {
                    break Err(anyhow!("{} ended the round before committing it: {}", peer.name, why_closed(&connection).await));
                }
            },
            Some(report) = from_reader.recv() => match report {
                FromReader::Missing(missing) => {
                    tracing::warn!("{} chunks could not be read (files changed since the scan)", missing.len());
                    net::send(&mut session.send, &Message::Missing(missing)).await?;
                }
                FromReader::Failed(why) => {
                    let _ = net::send(&mut session.send, &Message::Failed { reason: why.clone() }).await;
                    break Err(anyhow!("reading the source failed: {why}"));
                }
            },
            () = &mut deadline_sleep => {
                // Finish the batches on the wire, tell the destination how many there were, and let it
                // keep them.
                stop.store(true, Ordering::Relaxed);
                drop(needs_tx);
                for sender in senders {
                    let _ = sender.await;
                }
                let batches = batches_sent.load(Ordering::Relaxed);
                tracing::info!("deadline reached: stopping after {batches} chunk batches");
                let reason = format!("the source's deadline (--max-duration {})", max_duration_text(options));
                let stopping = Message::Stop { reason, batches };
                if net::send(&mut session.send, &stopping).await.is_ok() {
                    let _ = session.send.finish();
                    // The destination applies what arrived, then closes.
                    let _ = tokio::time::timeout(Duration::from_secs(120), connection.closed()).await;
                }
                let _ = stop_progress.send(());
                let _ = progress.await;
                let _ = reader_task.await;
                return Err(deadline_error(options, sent).into());
            }
        }
    };
    stop.store(true, Ordering::Relaxed);
    drop(needs_tx);
    for sender in senders {
        let _ = sender.await;
    }
    let _ = stop_progress.send(());
    let _ = progress.await;
    let _ = reader_task.await;
    let committed = outcome?;
    let _ = session.send.finish();
    // The destination runs its import now, if it has one; wait for its result unless told not to.
    let mut import = None;
    if options.wait_for_import {
        loop {
            match session.reader.next().await {
                Ok(Some(Message::ImportStarted { round, command })) => {
                    tracing::info!("{} imports round {round}: {}", peer.name, command.join(" "));
                }
                Ok(Some(Message::ImportDone(result))) => {
                    import = Some(result);
                    break;
                }
                Ok(Some(Message::Notice { text })) => {
                    tracing::info!("{}: {text}", peer.name);
                    notices.push(text);
                }
                Ok(Some(other)) => bail!("unexpected {other:?} from {} after the commit", peer.name),
                Ok(None) => break,
                // Committed is committed: no reconnection (it would start another round).
                Err(e) => {
                    tracing::warn!(
                        "lost {} while waiting for the import of round {}: {e:#}; see `ferry status` on it",
                        peer.name,
                        committed.round.round
                    );
                    break;
                }
            }
        }
    }
    Ok(Finished { committed, changes, changed_bytes, import, notices })
}
