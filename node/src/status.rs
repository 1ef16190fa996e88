//! `ferry status`: the rounds this node took part in, and what is in progress.

use serde::Serialize;

use crate::config_dir::ConfigDir;
use crate::history::{self, Marker, Record};
use crate::state::{SourceState, TargetState};

/// One job's state on this node.
#[derive(Debug, Serialize)]
pub struct JobStatus {
    /// The job.
    pub job: String,
    /// The folder.
    pub path: String,
    /// The peer.
    pub peer: String,
    /// As a destination: rounds committed here, imports run.
    pub received: Vec<Record>,
    /// As a source: rounds pushed from here.
    pub pushed: Vec<Record>,
    /// A round being received now (or left by a daemon that stopped).
    pub round_running: Option<Marker>,
    /// An import running now (or interrupted by a daemon that stopped).
    pub import_running: Option<Marker>,
    /// What the next round is asked to adopt on this destination (`ferry job adopt`).
    pub adopting: Vec<String>,
}

/// The `--json` document.
#[derive(Debug, Serialize)]
pub struct Status {
    /// The version of this document's shape.
    pub schema: u32,
    /// The jobs.
    pub jobs: Vec<JobStatus>,
}

/// Gathers the status of `job` (or every job).
pub fn status(config_dir: &ConfigDir, job: Option<&str>) -> anyhow::Result<Status> {
    let config = config_dir.load()?;
    let data = config_dir.data_dir(&config);
    if let Some(name) = job
        && config.job(name).is_none()
    {
        anyhow::bail!("no job {name:?} here");
    }
    let jobs = config
        .jobs
        .iter()
        .filter(|j| job.is_none_or(|name| name == j.name))
        .map(|j| {
            let (source, target) = (SourceState::new(&data, &j.name), TargetState::new(&data, &j.name));
            JobStatus {
                job: j.name.clone(),
                path: j.path.display().to_string(),
                peer: j.peer.clone(),
                received: history::read(&target.history()),
                pushed: history::read(&source.history()),
                round_running: history::read_marker(&target.round_marker()),
                import_running: history::read_marker(&target.import_marker()),
                adopting: crate::adoption::pending_paths(&target),
            }
        })
        .collect();
    Ok(Status { schema: crate::helpers::REPORT_SCHEMA, jobs })
}

/// Prints the status for people: each job's last round on each side, its last import and what runs
/// now (`ferry log JOB` has every round).
pub fn print(status: &Status) {
    if status.jobs.is_empty() {
        println!("no jobs (ferry job add NAME --path DIR --peer PEER)");
    }
    for job in &status.jobs {
        println!("job {} ({}, peer {})", job.job, job.path, job.peer);
        let is_import = |r: &&Record| matches!(r.event.as_str(), "imported" | "import-interrupted");
        let last_round = |records: &[Record]| records.iter().rev().find(|r| !is_import(r)).cloned();
        let last_import = job.received.iter().rev().find(is_import).cloned();
        let shown: Vec<Record> =
            [last_round(&job.received), last_import, last_round(&job.pushed)].into_iter().flatten().collect();
        for record in &shown {
            print_record(record);
        }
        let earlier = job.received.len() + job.pushed.len() - shown.len();
        if earlier > 0 {
            println!("  ({earlier} earlier records: ferry log {})", job.job);
        }
        if let Some(marker) = &job.round_running {
            println!("  round {} in progress since {} (from {})", marker.round, marker.since, marker.what.join(" "));
        }
        if let Some(marker) = &job.import_running {
            println!("  import of round {} running since {}: {}", marker.round, marker.since, marker.what.join(" "));
        }
        if !job.adopting.is_empty() {
            println!("  the next round adopts what is at: {} (ferry job adopt)", job.adopting.join(", "));
        }
        if job.received.is_empty() && job.pushed.is_empty() {
            println!("  no rounds yet");
        }
    }
}

/// One record on one line (and its error on the next).
fn print_record(record: &Record) {
    let import = record.import.as_ref().map(|i| format!(" {}", crate::import::result_words(i))).unwrap_or_default();
    println!(
        "  {}  {:<18} round {:>4}  {}{}{}{}",
        record.time,
        record.event,
        record.round,
        record.root_hash.as_deref().map(|h| format!("root {} ", &h[..8.min(h.len())])).unwrap_or_default(),
        record.files_written.map(|f| format!("{} ", crate::human::counted(f, "file"))).unwrap_or_default(),
        record.in_sync.map(|s| if s { "in sync" } else { "INCOMPLETE" }).unwrap_or_default(),
        import
    );
    if let Some(error) = &record.error {
        println!("    {error}");
    }
}
