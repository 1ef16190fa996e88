//! Round history (one JSON line per event) and "in progress" markers, kept on both nodes for
//! `ferry status`.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use ferry_proto::{ImportResult, RoundRef};
use serde::{Deserialize, Serialize};

/// One line of `history.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    /// What happened: `committed`, `pushed`, `imported`, `import-interrupted`; on both nodes also
    /// `failed`, `refused` and `stopped` (a deadline or a signal) for a round that ended without a
    /// commit.
    pub event: String,
    /// The round.
    pub round: u64,
    /// When, as RFC 3339.
    pub time: String,
    /// The round's root hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_hash: Option<String>,
    /// The peer on the other end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// Files written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files_written: Option<u64>,
    /// Bytes written (destination) or put on the wire (source).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    /// Entries that failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failures: Option<u64>,
    /// The round left both trees identical.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_sync: Option<bool>,
    /// How an import ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub import: Option<ImportResult>,
    /// How long it took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// Why a round did not end with a commit (`failed`, `refused`, `stopped`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

impl Record {
    pub(crate) fn new(event: &str, round: u64) -> Self {
        Self {
            event: event.to_owned(),
            round,
            time: now(),
            root_hash: None,
            peer: None,
            files_written: None,
            bytes: None,
            failures: None,
            in_sync: None,
            import: None,
            duration_ms: None,
            error: None,
        }
    }

    /// The destination committed a round.
    pub fn committed(round: RoundRef, peer: &str, report: &ferry_engine::ApplyReport, in_sync: bool) -> Self {
        Self {
            root_hash: Some(round.root.to_string()),
            peer: Some(peer.to_owned()),
            files_written: Some(report.files_written),
            bytes: Some(report.bytes_written),
            failures: Some(report.failure_count),
            in_sync: Some(in_sync),
            duration_ms: Some(report.duration.as_millis() as u64),
            ..Self::new("committed", round.round)
        }
    }

    /// An import ended.
    pub fn imported(result: &ImportResult) -> Self {
        Self {
            import: Some(result.clone()),
            duration_ms: Some(result.duration_ms),
            ..Self::new("imported", result.round)
        }
    }

    /// An import was found interrupted.
    pub fn import_interrupted(round: u64) -> Self {
        Self::new("import-interrupted", round)
    }
}

/// Appends a record and syncs it.
pub fn append(path: &Path, record: &Record) -> anyhow::Result<()> {
    let mut line = serde_json::to_vec(record)?;
    line.push(b'\n');
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    file.write_all(&line).and_then(|()| file.sync_data()).with_context(|| format!("cannot write {}", path.display()))
}

/// Every record of a history file (a damaged line is skipped).
pub fn read(path: &Path) -> Vec<Record> {
    std::fs::read_to_string(path)
        .map(|text| text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect())
        .unwrap_or_default()
}

/// Something in progress, as a file that says what and since when.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Marker {
    /// The round.
    pub round: u64,
    /// Since when, RFC 3339.
    pub since: String,
    /// What runs (the import command, or the peer).
    pub what: Vec<String>,
    /// The process.
    pub pid: u32,
}

impl Marker {
    /// A marker for now.
    pub fn now(round: u64, what: Vec<String>) -> Self {
        Self { round, since: now(), what, pid: std::process::id() }
    }
}

/// Writes a marker durably.
pub fn write_marker(path: &Path, marker: &Marker) -> anyhow::Result<()> {
    crate::helpers::write_durably(path, &serde_json::to_vec(marker)?)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// The marker at `path`, if any.
pub fn read_marker(path: &Path) -> Option<Marker> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// Removes a marker when dropped.
pub struct MarkerGuard(pub PathBuf);

impl Drop for MarkerGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
