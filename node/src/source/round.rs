//! One round, over one or more connections: open, send the changes, serve chunks, commit.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::connection::{Driven, Finished, drive};
use super::options::PushOptions;
use super::outcome::{Lost, StoppedAtDeadline, StoppedBySignal, Unreachable, deadline_error, stopped_error};
use super::prepare::{Prepared, prepare, timetable};
use super::progress::Counters;
use super::report::PushReport;
use super::session::{connect, is_lost};
use super::stop::StopRequest;
use crate::config_dir::ConfigDir;
use crate::helpers::REPORT_SCHEMA;
use crate::net::{self};

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

pub(super) async fn push_once(
    config_dir: &ConfigDir,
    options: &PushOptions,
    stop: &mut StopRequest,
) -> anyhow::Result<PushReport> {
    let started = Instant::now();
    let deadline = options.max_duration.map(|d| started + d);
    // SIGHUP re-reads the job's and the peer's limits (from now on, not only during the transfer).
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    // A stop during the export hook ends the round there: nothing was sent.
    let prepared = tokio::select! {
        prepared = prepare(config_dir, options) => prepared?,
        signal = stop.requested() => return Err(stopped_error(signal, &Counters::default()).into()),
    };
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
        let attempt = attempt(&prepared, options, &limiter, &sent, &mut totals, deadline, stop).await;
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
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    signal = stop.requested() => break Err(stopped_error(signal, &sent).into()),
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
            Err(e) => break Err(e),
        }
    };
    follow.abort();
    reload.abort();
    if result.is_err() {
        prepared.scan.stop().await;
    }
    let finished = result?;
    let scanned = prepared.scan.done().await?;
    let new_root = scanned.root_hash.ok_or_else(|| anyhow::anyhow!("the scan produced no root hash"))?;
    let Prepared { job, peer, state, folder, .. } = prepared;
    if let Err(e) = folder.record() {
        tracing::warn!("cannot record which folder {} is in {}: {e}", job.path.display(), state.identity().display());
    }
    let committed = finished.committed;
    // The destination holds the scanned tree: the base of the next round's changes. In sync only if the
    // scan left nothing of the tree out and no file changed while it was read.
    let holds_tree = committed.round.root == new_root;
    let not_carried = scanned.not_carried(options.skip_special);
    let in_sync = holds_tree && scanned.whole(options.skip_special);
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
        payload_bytes: sent.payload_bytes.load(Ordering::Relaxed),
        list_bytes: sent.list_bytes.load(Ordering::Relaxed),
        need_bytes: sent.need_bytes.load(Ordering::Relaxed),
        bytes_on_wire: totals.bytes_on_wire,
        bytes_lost: totals.bytes_lost,
        path_mtu: totals.path_mtu,
        connections: totals.attempts,
        failures: committed.failures,
        failure_count: committed.failure_count,
        import: finished.import,
        notices: finished.notices,
        check: finished.checked,
        skipped: scanned.skipped.clone(),
        skipped_count: not_carried,
        changed_while_read: scanned.changed_while_read.clone(),
        changed_while_read_count: scanned.changed_while_read_count,
        duration_ms: started.elapsed().as_millis() as u64,
        scan_ms: scanned.duration.as_millis() as u64,
        first_byte_ms: sent.first_batch.get().map(|at| at.duration_since(started).as_millis() as u64),
        disk_read_bytes: disk_read_bytes(),
    };
    crate::history::append(&state.history(), &report.history_record(&peer.name))?;
    Ok(report)
}

/// Bytes this process read from storage so far, as the kernel counts them.
fn disk_read_bytes() -> Option<u64> {
    let io = std::fs::read_to_string("/proc/self/io").ok()?;
    io.lines().find_map(|line| line.strip_prefix("read_bytes:")).and_then(|n| n.trim().parse().ok())
}

/// One connection's worth of a round (see [`drive`]). A lost connection comes back as [`Lost`].
pub(super) async fn attempt(
    prepared: &Prepared,
    options: &PushOptions,
    limiter: &crate::limit::Limiter,
    sent: &Arc<Counters>,
    totals: &mut Totals,
    deadline: Option<Instant>,
    stop: &mut StopRequest,
) -> anyhow::Result<Finished> {
    if deadline.is_some_and(|d| Instant::now() >= d) {
        return Err(deadline_error(options, sent).into());
    }
    if let Some(signal) = stop.signal() {
        return Err(stopped_error(signal, sent).into());
    }
    let Prepared { client, peer, addr, identity, .. } = prepared;
    let connection = connect(client, peer, addr, identity, options).await?;
    let result = drive(prepared, options, limiter, sent, &connection, deadline, Some(stop)).await;
    totals.add(&connection);
    match result {
        Ok(Driven::Committed(finished)) => {
            connection.close(net::close::DONE.into(), b"round over");
            Ok(finished)
        }
        Ok(Driven::Planned { .. }) => unreachable!("a round that is not a dry run plans nothing"),
        Err(e) => {
            let stopped =
                e.downcast_ref::<StoppedAtDeadline>().is_some() || e.downcast_ref::<StoppedBySignal>().is_some();
            if !stopped && is_lost(&connection) {
                return Err(Lost(format!("lost {} in the middle of the round: {e:#}", prepared.peer.name)).into());
            }
            net::close_sent(&connection, net::close::ERROR, b"the source gave up").await;
            Err(e)
        }
    }
}
