//! `ferry log JOB`: the job's rounds on this node, sent and received, one line each, oldest first.

use serde::Serialize;

use crate::config_dir::ConfigDir;
use crate::history::{self, Record};
use crate::state::{SourceState, TargetState};

/// The `--json` document.
#[derive(Debug, Serialize)]
pub struct Log {
    /// The version of this document's shape.
    pub schema: u32,
    /// The job.
    pub job: String,
    /// Its rounds, oldest first.
    pub rounds: Vec<LogEntry>,
}

/// One event of the job's history.
#[derive(Debug, Serialize)]
pub struct LogEntry {
    /// `sent` (this node was the source) or `received`.
    pub side: &'static str,
    /// The record as the history holds it.
    #[serde(flatten)]
    pub record: Record,
}

/// The last `last` events of `job` on this node, both sides merged by time.
pub fn log(config_dir: &ConfigDir, job: &str, last: usize) -> anyhow::Result<Log> {
    let config = config_dir.load()?;
    if config.job(job).is_none() {
        anyhow::bail!("no job {job:?} here (ferry job list shows the jobs)");
    }
    let data = config_dir.data_dir(&config);
    let sent = history::read(&SourceState::new(&data, job).history()).into_iter().map(|record| ("sent", record));
    let received =
        history::read(&TargetState::new(&data, job).history()).into_iter().map(|record| ("received", record));
    let mut rounds: Vec<LogEntry> = sent.chain(received).map(|(side, record)| LogEntry { side, record }).collect();
    // RFC 3339 in UTC sorts as time; the sort is stable, so events of one second keep their order.
    rounds.sort_by(|a, b| a.record.time.cmp(&b.record.time));
    let skip = rounds.len().saturating_sub(last);
    rounds.drain(..skip);
    Ok(Log { schema: crate::helpers::REPORT_SCHEMA, job: job.to_owned(), rounds })
}

/// Prints the log for people: one line an event, and why under one that did not commit.
pub fn print(log: &Log) {
    if log.rounds.is_empty() {
        println!("no rounds of job {} on this node yet", log.job);
    }
    for LogEntry { side, record } in &log.rounds {
        let mut line = format!("{}  {side:<8}  round {:>4}  {:<18}", record.time, record.round, record.event);
        if let Some(files) = record.files_written {
            line.push_str(&format!("  {}", crate::human::counted(files, "file")));
        }
        if let Some(bytes) = record.bytes {
            let what = if *side == "sent" { "on the wire" } else { "written" };
            line.push_str(&format!("  {} {what}", crate::human::bytes(bytes)));
        }
        if let Some(ms) = record.duration_ms {
            line.push_str(&format!("  {}", crate::human::duration(std::time::Duration::from_millis(ms))));
        }
        match record.in_sync {
            Some(true) => line.push_str("  in sync"),
            Some(false) => line.push_str("  INCOMPLETE"),
            None => {}
        }
        if let Some(import) = &record.import {
            line.push_str(&format!("  {}", crate::import::result_words(import)));
        }
        println!("{}", line.trim_end());
        if let Some(error) = &record.error {
            println!("    {error}");
        }
    }
}
