//! What `sync --round JOB` was asked to do.

use std::time::Duration;

/// What `sync --round JOB` was asked to do.
#[derive(Debug, Clone)]
pub struct PushOptions {
    /// The job.
    pub job: String,
    /// `--delete`.
    pub delete: bool,
    /// `--numeric-ids`.
    pub numeric_ids: bool,
    /// `--skip-special`.
    pub skip_special: bool,
    /// `--import`.
    pub import: ferry_proto::ImportMode,
    /// Wait for the import's result (not `--no-wait`).
    pub wait_for_import: bool,
    /// `--wait`: when the destination is busy with this job, wait instead of giving up.
    pub wait_if_busy: bool,
    /// `--bwlimit`: the most bytes per second this round puts on the network for chunk data and the
    /// list of changes, fixed or by the time of the week. `None`: the job's or the peer's limit in
    /// ferry.toml, if any.
    pub bwlimit: Option<ferry_engine::Timetable>,
    /// `--max-duration`: stop cleanly after this long.
    pub max_duration: Option<Duration>,
    /// `--dry-run`: plan only.
    pub dry_run: bool,
    /// `--reconnect-grace`: how long to keep reconnecting after the connection is lost.
    pub reconnect_grace: Duration,
    /// `--low-priority`: a delay-based congestion controller that yields to other traffic.
    pub congestion: crate::net::Congestion,
    /// `--progress-interval`: how often a run without a terminal (cron, systemd) logs its progress.
    pub progress_interval: Duration,
    /// How progress is shown: a bar, log lines every `progress_interval`, or nothing (`-q`).
    pub progress: crate::meter::Show,
}
