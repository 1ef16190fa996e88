//! Where a source job's state lives on disk.

use std::path::PathBuf;

use ferry_proto::RoundRef;

/// The source's state for a job.
pub(super) struct SourceState {
    pub(super) dir: PathBuf,
}

impl SourceState {
    pub(super) fn cache(&self) -> PathBuf {
        self.dir.join("cache")
    }
    pub(super) fn scanned(&self) -> PathBuf {
        self.dir.join("manifest.scan")
    }
    pub(super) fn base(&self) -> PathBuf {
        self.dir.join("manifest.base")
    }
    pub(super) fn base_round(&self) -> Option<RoundRef> {
        let bytes = std::fs::read(self.dir.join("base.json")).ok()?;
        serde_json::from_slice(&bytes).ok()
    }
    /// The scanned manifest becomes the base of the next round's changes. When the base already holds
    /// the same records (nothing changed), the base stays and the scan's copy goes: nothing to sync.
    /// Else the scan's manifest (not fsynced by the scan) is made durable first, then named the base,
    /// then `base.json` says which round it is.
    pub(super) fn promote(&self, round: RoundRef) -> anyhow::Result<()> {
        if ferry_engine::same_records(&self.scanned(), &self.base()) {
            let _ = std::fs::remove_file(self.scanned());
        } else {
            ferry_engine::sync_record_file(&self.scanned())?;
            std::fs::rename(self.scanned(), self.base())?;
        }
        crate::helpers::write_durably(&self.dir.join("base.json"), &serde_json::to_vec(&round)?)?;
        Ok(())
    }
    pub(super) fn forget_base(&self) {
        let _ = std::fs::remove_file(self.dir.join("base.json"));
    }
}
