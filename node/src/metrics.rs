//! Metrics for monitoring: a node_exporter textfile (`metrics_file` in ferry.toml), rewritten after
//! every round this node takes part in, with each job's last round on each side: when, whether it
//! went through, whether it left the trees identical, its bytes and duration, and the import's end.
//! An alert on "no round in sync for 26 hours" is what the operator asleep at 3 a.m. needs
//! (CONFIG.md has the rule).

use std::fmt::Write;
use std::path::Path;
use std::time::UNIX_EPOCH;

use crate::config_dir::ConfigDir;
use crate::history::Record;
use crate::status::Status;

/// Rewrites the metrics file, if ferry.toml names one. Best effort: a file that cannot be written is
/// logged, never a round's failure.
pub(crate) fn refresh(config_dir: &ConfigDir) {
    let Ok(config) = config_dir.load() else { return };
    let Some(path) = config.metrics_file.clone() else { return };
    let written = crate::status::status(config_dir, None).and_then(|status| write_atomically(&path, &render(&status)));
    if let Err(e) = written {
        tracing::warn!("cannot write the metrics file {}: {e:#}", path.display());
    }
}

/// Writes beside the file, then renames over it: node_exporter never reads half a file.
fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path).inspect_err(|_| drop(std::fs::remove_file(&tmp)))?;
    Ok(())
}

/// Every gauge, with its help, in the order the file lists them.
const GAUGES: &[(&str, &str)] = &[
    ("ferry_round_last", "The number of the job's last round on this side."),
    ("ferry_round_last_timestamp_seconds", "When the job's last round on this side ended."),
    (
        "ferry_round_last_success",
        "1 when the job's last round was committed, 0 when it failed, was refused or stopped.",
    ),
    ("ferry_round_last_in_sync", "1 when the job's last round left the destination holding exactly the source's tree."),
    ("ferry_round_last_bytes", "Bytes the job's last committed round put on the wire (sent) or wrote (received)."),
    ("ferry_round_last_duration_seconds", "How long the job's last committed round took."),
    ("ferry_round_last_in_sync_timestamp_seconds", "When the job's last round that left both trees identical ended."),
    ("ferry_import_last_success", "1 when the job's last import succeeded (destination)."),
    ("ferry_import_last_timestamp_seconds", "When the job's last import ended (destination)."),
];

/// The Prometheus text of `status`.
pub(crate) fn render(status: &Status) -> String {
    // (gauge, labels, value)
    let mut samples: Vec<(&str, String, f64)> = Vec::new();
    for job in &status.jobs {
        for (side, records) in [("sent", &job.pushed), ("received", &job.received)] {
            let labels = format!("job=\"{}\",side=\"{side}\"", escape(&job.job));
            let rounds: Vec<&Record> = records.iter().filter(|r| is_round(r)).collect();
            let Some(last) = rounds.last() else { continue };
            let success = matches!(last.event.as_str(), "committed" | "pushed");
            let mut push = |gauge: &'static str, value: f64| samples.push((gauge, labels.clone(), value));
            push("ferry_round_last", last.round as f64);
            push("ferry_round_last_timestamp_seconds", seconds(&last.time));
            push("ferry_round_last_success", f64::from(u8::from(success)));
            push("ferry_round_last_in_sync", f64::from(u8::from(success && last.in_sync == Some(true))));
            if let Some(done) = rounds.iter().rev().find(|r| matches!(r.event.as_str(), "committed" | "pushed")) {
                push("ferry_round_last_bytes", done.bytes.unwrap_or(0) as f64);
                push("ferry_round_last_duration_seconds", done.duration_ms.unwrap_or(0) as f64 / 1000.0);
            }
            if let Some(in_sync) = rounds.iter().rev().find(|r| r.in_sync == Some(true)) {
                push("ferry_round_last_in_sync_timestamp_seconds", seconds(&in_sync.time));
            }
            if side == "received"
                && let Some((record, import)) = records.iter().rev().find_map(|r| r.import.as_ref().map(|i| (r, i)))
            {
                push("ferry_import_last_success", f64::from(u8::from(import.success)));
                push("ferry_import_last_timestamp_seconds", seconds(&record.time));
            }
        }
    }
    let mut out = String::new();
    for (name, help) in GAUGES {
        let mut of_gauge = samples.iter().filter(|(gauge, _, _)| gauge == name).peekable();
        if of_gauge.peek().is_none() {
            continue;
        }
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (_, labels, value) in of_gauge {
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
    }
    debug_assert!(samples.iter().all(|(gauge, _, _)| GAUGES.iter().any(|(name, _)| name == gauge)));
    out
}

/// Whether a history record is a round's end (not an import's).
fn is_round(record: &Record) -> bool {
    matches!(record.event.as_str(), "committed" | "pushed" | "failed" | "refused" | "stopped")
}

/// Seconds since the epoch of an RFC 3339 time (0 when it cannot be read).
fn seconds(time: &str) -> f64 {
    humantime::parse_rfc3339(time).ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map_or(0.0, |d| d.as_secs_f64())
}

/// A label value as the text format wants it.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}
