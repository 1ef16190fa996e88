//! What a network round shows of its progress while it scans and while chunks flow.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::meter::{Meter, Show};

/// Progress while chunks flow: a bar on a terminal, a log line every interval otherwise (cron,
/// systemd), with the rate and an estimate of the time left; nothing with `-q`.
pub(super) fn spawn_progress(
    counters: Arc<Counters>,
    connection: quinn::Connection,
    limiter: crate::limit::Limiter,
    show: Show,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> tokio::task::JoinHandle<()> {
    crate::helpers::spawn_in_span(async move {
        let started = Instant::now();
        let mut meter = Meter::new(show);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(show.period()) => {}
                _ = &mut stop => break,
            }
            if show == Show::Off {
                continue;
            }
            let stats = connection.stats();
            let secs = started.elapsed().as_secs_f64().max(0.001);
            let (sent, covered, changed) = (
                counters.sent_bytes.load(Ordering::Relaxed),
                counters.covered.load(Ordering::Relaxed),
                counters.changed.load(Ordering::Relaxed),
            );
            // A rate and a time left would be the pause's average, not what comes when it ends.
            let line = if limiter.is_paused() {
                format!(
                    "paused by the bandwidth limit: sent {} of chunks, {} on the wire so far",
                    crate::human::bytes(sent),
                    crate::human::bytes(stats.udp_tx.bytes),
                )
            } else if show == Show::Bar {
                format!("{} on the wire", crate::human::bytes(stats.udp_tx.bytes))
            } else {
                format!(
                    "sent {} of chunks, {} on the wire, {}/s{}",
                    crate::human::bytes(sent),
                    crate::human::bytes(stats.udp_tx.bytes),
                    crate::human::bytes((stats.udp_tx.bytes as f64 / secs) as u64),
                    eta(covered, changed, started.elapsed())
                )
            };
            meter.toward(covered, changed, line);
        }
        meter.finish();
    })
}

/// "; 40% of the changed data, about 1h 20m left": how far the chunks read are into the changed files,
/// and that pace kept up. Empty until there is something to go by.
pub(super) fn eta(covered: u64, changed: u64, elapsed: Duration) -> String {
    if covered == 0 || changed == 0 || elapsed < Duration::from_secs(3) {
        return String::new();
    }
    let done = (covered as f64 / changed as f64).min(1.0);
    let left = elapsed.as_secs_f64() * (1.0 - done) / done;
    format!(
        "; {:.0}% of the changed data, about {} left",
        done * 100.0,
        crate::human::duration(Duration::from_secs(left.round() as u64))
    )
}

#[derive(Default)]
pub(super) struct Counters {
    pub(super) chunks: AtomicU64,
    pub(super) bytes: AtomicU64,
    /// Chunk bytes handed to the data streams (the two above count what was read).
    pub(super) sent_bytes: AtomicU64,
    /// How far into the changed bytes the chunks sent have gone (see [`Positions`]).
    pub(super) covered: AtomicU64,
    /// The changed bytes of the round.
    pub(super) changed: AtomicU64,
    /// Chunk data as it went on the data streams (compressed where it paid).
    pub(super) payload_bytes: AtomicU64,
    /// The frames of the list of changes sent, and of the destination's requests for chunks received.
    pub(super) list_bytes: AtomicU64,
    pub(super) need_bytes: AtomicU64,
    /// When the first chunk batch went to QUIC.
    pub(super) first_batch: std::sync::OnceLock<std::time::Instant>,
}
