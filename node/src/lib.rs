//! The `ferry` binary's library: the command line, and the commands it runs.
//!
//! It owns the CLI (clap), where state lives on disk, the human and JSON reports, and `ferry demo`.
//! Sync logic belongs to `ferry-engine`; this crate only wires it to the operator.

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod chunks;
pub mod cli;
pub mod commands;
pub mod config;
pub mod config_check;
pub mod config_dir;
mod demo;
mod destination;
pub mod history;
mod human;
mod hystart;
mod import;
mod ledbat;
mod limit;
mod local;
mod lossy;
mod net;
mod refused;
mod source;
pub mod status;
pub mod verify;

pub use demo::{DemoOptions, run_demo};
pub use destination::{Daemon, serve};
pub use local::{LocalSyncOptions, run_local_sync};
pub use net::Congestion;
pub use refused::Refused;
pub use source::{
    DryRunReport, PushOptions, PushReport, REPORT_SCHEMA, StoppedAtDeadline, Unreachable, dry_run, print_dry_run,
    print_push_report, push,
};

/// Exit codes, stable and documented in README.md.
pub mod exit {
    /// The round completed and the target matches the source.
    pub const OK: i32 = 0;
    /// An error stopped the command (message on stderr).
    pub const ERROR: i32 = 1;
    /// The command line was wrong.
    pub const USAGE: i32 = 2;
    /// The round ran to its end, but some entries could not be applied (listed on stderr); rerun after
    /// fixing what the messages say.
    pub const INCOMPLETE: i32 = 3;
    /// The round was committed, but the destination's import failed (its output's tail is printed).
    pub const IMPORT_FAILED: i32 = 4;
    /// `ferry verify` found differences between the target and its last committed round.
    pub const DIFFERENCES: i32 = 5;
    /// `--max-duration` ran out: the round stopped cleanly; the files that arrived whole are kept, and the next round
    /// goes on from there.
    pub const DEADLINE: i32 = 6;
    /// The peer could not be reached (or was lost and did not come back within `--reconnect-grace`).
    pub const UNREACHABLE: i32 = 7;
    /// The peer refused the round: it does not trust this node, the job is not this node's, it is busy
    /// with the job, or the target lacks space.
    pub const REFUSED: i32 = 8;

    /// Every code, by name, in order (README.md's table is checked against it).
    pub const ALL: [(&str, i32); 9] = [
        ("OK", OK),
        ("ERROR", ERROR),
        ("USAGE", USAGE),
        ("INCOMPLETE", INCOMPLETE),
        ("IMPORT_FAILED", IMPORT_FAILED),
        ("DIFFERENCES", DIFFERENCES),
        ("DEADLINE", DEADLINE),
        ("UNREACHABLE", UNREACHABLE),
        ("REFUSED", REFUSED),
    ];
}

/// An error and its causes on one line, like `{:#}`, but without repeating a cause whose text the
/// message before it already holds (many errors print their source in their own message too).
pub fn describe(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let cause = cause.to_string();
        if text.contains(&cause) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&cause);
    }
    text
}

/// Writes `bytes` to `path` durably: into `NAME.tmp` beside it, fsynced, renamed into place, and the
/// folder fsynced. A crash leaves the old file or the new one, never a part of one.
pub(crate) fn write_durably(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp_name = path.file_name().unwrap_or_default().to_owned();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    std::fs::write(&tmp, bytes)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)?;
    let folder = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    std::fs::File::open(folder)?.sync_all()
}

/// `tokio::spawn`, in the current tracing span: the task's log lines keep the job and round.
pub(crate) fn spawn_in_span<F>(future: F) -> tokio::task::JoinHandle<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::spawn(tracing::Instrument::in_current_span(future))
}

/// No bandwidth limit.
pub fn unlimited() -> ferry_engine::Timetable {
    ferry_engine::Timetable::parse("off").expect("\"off\" is a valid timetable")
}

/// The default folder for ferry's state: `/var/lib/ferry` for root, else `$XDG_DATA_HOME/ferry` or
/// `~/.local/share/ferry`.
pub fn default_data_dir() -> std::path::PathBuf {
    config::default_dir("/var/lib/ferry", "XDG_DATA_HOME", ".local/share")
}
