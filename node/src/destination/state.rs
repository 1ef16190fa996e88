//! Where a destination job's state lives on disk.

use std::path::{Path, PathBuf};

use anyhow::Context;
use ferry_proto::RoundRef;

/// The paths of a job's state on the destination.
pub(crate) struct TargetState {
    pub(crate) dir: PathBuf,
}

impl TargetState {
    pub(crate) fn new(data_dir: &Path, job: &str) -> Self {
        Self { dir: data_dir.join("jobs").join(job).join("target") }
    }
    pub(crate) fn manifest(&self) -> PathBuf {
        self.dir.join("manifest")
    }
    pub(super) fn round_file(&self) -> PathBuf {
        self.dir.join("round.json")
    }
    pub(crate) fn history(&self) -> PathBuf {
        self.dir.join("history.jsonl")
    }
    pub(crate) fn import_marker(&self) -> PathBuf {
        self.dir.join("import.running")
    }
    pub(crate) fn round_marker(&self) -> PathBuf {
        self.dir.join("round.running")
    }
    /// What a check begun before the round found.
    pub(super) fn early_findings(&self) -> PathBuf {
        self.dir.join("findings.early")
    }
    /// What the round's check of the target found.
    pub(super) fn findings(&self) -> PathBuf {
        self.dir.join("findings")
    }
    /// The device and inode of the target folder ferry last filled.
    pub(super) fn identity(&self) -> PathBuf {
        self.dir.join("identity")
    }
    /// The last committed round.
    pub(crate) fn holds(&self) -> anyhow::Result<Option<RoundRef>> {
        match std::fs::read(self.round_file()) {
            Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).context("round.json is damaged")?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
    pub(super) fn set_holds(&self, round: RoundRef) -> anyhow::Result<()> {
        crate::helpers::write_durably(&self.round_file(), &serde_json::to_vec(&round)?)
            .with_context(|| format!("cannot record the round in {}", self.round_file().display()))
    }
}
