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

/// One gauge: its help, and its samples as (labels, value).
struct Gauge {
    name: &'static str,
    help: &'static str,
    samples: Vec<(String, f64)>,
}

/// The Prometheus text of `status`.
pub(crate) fn render(status: &Status) -> String {
    let mut gauges = [
        Gauge {
            name: "ferry_round_last",
            help: "The number of the job's last round on this side.",
            samples: Vec::new(),
        },
        Gauge {
            name: "ferry_round_last_timestamp_seconds",
            help: "When the job's last round on this side ended.",
            samples: Vec::new(),
        },
        Gauge {
            name: "ferry_round_last_success",
            help: "1 when the job's last round was committed, 0 when it failed, was refused or stopped.",
            samples: Vec::new(),
        },
        Gauge {
            name: "ferry_round_last_in_sync",
            help: "1 when the job's last round left the destination holding exactly the source's tree.",
            samples: Vec::new(),
        },
        Gauge {
            name: "ferry_round_last_bytes",
            help: "Bytes the job's last committed round put on the wire (sent) or wrote (received).",
            samples: Vec::new(),
        },
        Gauge {
            name: "ferry_round_last_duration_seconds",
            help: "How long the job's last committed round took.",
            samples: Vec::new(),
        },
        Gauge {
            name: "ferry_round_last_in_sync_timestamp_seconds",
            help: "When the job's last round that left both trees identical ended.",
            samples: Vec::new(),
        },
        Gauge {
            name: "ferry_import_last_success",
            help: "1 when the job's last import succeeded (destination).",
            samples: Vec::new(),
        },
        Gauge {
            name: "ferry_import_last_timestamp_seconds",
            help: "When the job's last import ended (destination).",
            samples: Vec::new(),
        },
    ];
    for job in &status.jobs {
        for (side, records) in [("sent", &job.pushed), ("received", &job.received)] {
            let labels = format!("job=\"{}\",side=\"{side}\"", escape(&job.job));
            let rounds: Vec<&Record> = records.iter().filter(|r| is_round(r)).collect();
            let Some(last) = rounds.last() else { continue };
            let success = matches!(last.event.as_str(), "committed" | "pushed");
            let mut push = |gauge: usize, value: f64| gauges[gauge].samples.push((labels.clone(), value));
            push(0, last.round as f64);
            push(1, seconds(&last.time));
            push(2, f64::from(u8::from(success)));
            push(3, f64::from(u8::from(success && last.in_sync == Some(true))));
            if let Some(done) = rounds.iter().rev().find(|r| matches!(r.event.as_str(), "committed" | "pushed")) {
                push(4, done.bytes.unwrap_or(0) as f64);
                push(5, done.duration_ms.unwrap_or(0) as f64 / 1000.0);
            }
            if let Some(in_sync) = rounds.iter().rev().find(|r| r.in_sync == Some(true)) {
                push(6, seconds(&in_sync.time));
            }
            if side == "received"
                && let Some(import) = records.iter().rev().find_map(|r| r.import.as_ref().map(|i| (r, i)))
            {
                push(7, f64::from(u8::from(import.1.success)));
                push(8, seconds(&import.0.time));
            }
        }
    }
    let mut out = String::new();
    for gauge in gauges.iter().filter(|g| !g.samples.is_empty()) {
        let _ = writeln!(out, "# HELP {} {}\n# TYPE {} gauge", gauge.name, gauge.help, gauge.name);
        for (labels, value) in &gauge.samples {
            let _ = writeln!(out, "{}{{{labels}}} {value}", gauge.name);
        }
    }
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
