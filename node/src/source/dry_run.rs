//! `sync --dry-run`: what a round would send, and how long that would take.

use std::time::{Duration, Instant};

use anyhow::bail;
use serde::Serialize;
use tracing::Instrument;

use super::connection::{Driven, drive};
use super::options::PushOptions;
use super::prepare::Prepared;
use super::prepare::{prepare, timetable};
use super::progress::Counters;
use super::report::print_json;
use super::session::connect;
use crate::config_dir::ConfigDir;
use crate::helpers::REPORT_SCHEMA;
use crate::net::{self};

/// What `sync --round JOB --dry-run` found (`--json` prints it).
#[derive(Debug, Clone, Serialize)]
pub struct DryRunReport {
    /// [`REPORT_SCHEMA`].
    pub schema: u32,
    /// The job.
    pub job: String,
    /// Entries in the tree.
    pub entries: u64,
    /// Changes the round would send.
    pub changes: u64,
    /// Files the destination would write.
    pub files: u64,
    /// Bytes of the files whose content changed (before deduplication).
    pub changed_bytes: u64,
    /// Chunk bytes the destination lacks (after deduplication).
    pub need_bytes: u64,
    /// The estimate of everything the round would put on the network, both directions.
    pub bytes_on_wire: u64,
    /// Seconds the transfer would take under the bandwidth timetable, when the limits decide it.
    pub seconds: Option<u64>,
    /// When it would be done (local time, RFC 3339), when the limits decide it.
    pub done_at: Option<String>,
    /// The schedule in words ("done Thu 04:10 at the current schedule", "paused for good", ...).
    pub schedule: String,
    /// Disk space the round needs on the destination (with the margin) and what is free there.
    pub space_needed: u64,
    /// Free space on the destination.
    pub space_available: u64,
    /// Wall time of the dry run, in milliseconds.
    pub duration_ms: u64,
}

/// `sync --round JOB --dry-run`: scans, exchanges manifests, lets the destination plan, and sizes what
/// it asks for (read and compressed here, not sent). Nothing is written on the destination.
pub async fn dry_run(config_dir: &ConfigDir, options: &PushOptions) -> anyhow::Result<DryRunReport> {
    let span = tracing::info_span!("dry-run", job = %options.job, round = tracing::field::Empty);
    dry_run_in_span(config_dir, options).instrument(span).await
}

pub(super) async fn dry_run_in_span(config_dir: &ConfigDir, options: &PushOptions) -> anyhow::Result<DryRunReport> {
    let started = Instant::now();
    let options = PushOptions { dry_run: true, ..options.clone() };
    let prepared = prepare(config_dir, &options).await?;
    let timetable = timetable(config_dir, &options, &prepared.job.name)?;
    let Prepared { client, peer, addr, identity, .. } = &prepared;
    let connection = connect(client, peer, addr, identity, &options).await?;
    // A dry run moves no chunks; its list of changes is what it puts on the network. A pause does not
    // hold it: the operator asked for the plan now, and the list is all it sends.
    let limiter = crate::limit::Limiter::new(timetable.clone());
    let sent = std::sync::Arc::new(Counters::default());
    let driven = drive(&prepared, &options, &limiter, &sent, &connection, None, None).await;
    let stats = connection.stats();
    let (plan, changes, changed_bytes, payload) = match driven {
        Ok(Driven::Planned { plan, changes, changed_bytes, payload }) => (plan, changes, changed_bytes, payload),
        Ok(Driven::Committed(_)) => bail!("{} committed a dry run", prepared.peer.name),
        Err(e) => {
            net::close_sent(&connection, net::close::ERROR, b"the dry run failed").await;
            prepared.scan.stop().await;
            return Err(e);
        }
    };
    connection.close(net::close::DONE.into(), b"dry run over");
    // What this connection carried (the manifest exchange and the requests, which the real round
    // repeats) plus the chunk payload with QUIC's framing and acknowledgements (about 3%, measured).
    let bytes_on_wire = stats.udp_tx.bytes + stats.udp_rx.bytes + payload + payload * 3 / 100;
    let chunk_wire = payload + payload * 3 / 100;
    let (seconds, done_at, schedule) = finish_time(&timetable, chunk_wire);
    Ok(DryRunReport {
        schema: REPORT_SCHEMA,
        job: prepared.job.name.clone(),
        entries: prepared.scan.done().await?.entries,
        changes,
        files: plan.files,
        changed_bytes,
        need_bytes: plan.need_bytes,
        bytes_on_wire,
        seconds,
        done_at,
        schedule,
        space_needed: plan.space_needed,
        space_available: plan.space_available,
        duration_ms: started.elapsed().as_millis() as u64,
    })
}

/// When sending `bytes` from now would be done under `timetable`.
pub(super) fn finish_time(timetable: &ferry_engine::Timetable, bytes: u64) -> (Option<u64>, Option<String>, String) {
    let now = jiff::ZonedDateTime::now();
    let at = |seconds: u64| now.checked_add(jiff::SignedDuration::from_secs(seconds as i64)).ok();
    match timetable.time_to_send(bytes, crate::limit::second_of_week_now()) {
        ferry_engine::SendTime::Limited { seconds } => {
            let done = at(seconds);
            let when = done.as_ref().map(|d| d.strftime("%a %H:%M").to_string()).unwrap_or_default();
            let schedule = format!(
                "done {when} at the current schedule ({})",
                crate::human::duration(Duration::from_secs(seconds))
            );
            (Some(seconds), done.map(|d| d.to_string()), schedule)
        }
        ferry_engine::SendTime::AtLinkSpeed { after: 0 } => {
            (None, None, "no bandwidth limit now: as fast as the link allows".to_owned())
        }
        ferry_engine::SendTime::AtLinkSpeed { after } => {
            let when = at(after).map(|d| d.strftime("%a %H:%M").to_string()).unwrap_or_default();
            (None, None, format!("not done before {when}; from then on there is no limit and the link decides"))
        }
        ferry_engine::SendTime::Never => (None, None, "never: the timetable pauses the transfer for good".to_owned()),
    }
}

/// Prints a dry run's report: one JSON object, or a summary for people.
pub fn print_dry_run(report: &DryRunReport, json: bool) {
    if json {
        return print_json(report);
    }
    println!(
        "dry run of {}: {}, {} to write ({} of changed files, {} after deduplication)",
        report.job,
        crate::human::counted(report.changes, "change"),
        crate::human::counted(report.files, "file"),
        crate::human::bytes(report.changed_bytes),
        crate::human::bytes(report.need_bytes)
    );
    println!("  needs {} on the wire, {}", crate::human::bytes(report.bytes_on_wire), report.schedule);
    println!(
        "  destination space: needs {}, {} free{}",
        crate::human::bytes(report.space_needed),
        crate::human::bytes(report.space_available),
        if report.space_needed > report.space_available { ": THE ROUND WOULD BE REFUSED" } else { "" }
    );
    println!("  nothing was written");
}
