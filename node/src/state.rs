//! Where a job's state lives on disk, on either side: every path of it is named here and nowhere else.
//!
//! `DATA/jobs/JOB/source/` holds what the source keeps between rounds (its scan cache, the manifest of
//! the last round the destination committed, its history); `DATA/jobs/JOB/target/` what the
//! destination keeps (the committed manifest and round, the chunk index with ferry's records of what
//! it placed, the check's findings, markers of a round or an import in progress, its history).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use ferry_proto::RoundRef;

/// Where a job's state lives: its source side and its target side.
pub(crate) fn job_dir(data_dir: &Path, job: &str) -> PathBuf {
    data_dir.join("jobs").join(job)
}

/// The source's state for a job.
pub(crate) struct SourceState {
    pub(crate) dir: PathBuf,
}

impl SourceState {
    pub(crate) fn new(data_dir: &Path, job: &str) -> Self {
        Self { dir: job_dir(data_dir, job).join("source") }
    }
    /// The quick check's cache of the last scan.
    pub(crate) fn cache(&self) -> PathBuf {
        self.dir.join("cache")
    }
    /// This round's scan.
    pub(crate) fn scanned(&self) -> PathBuf {
        self.dir.join("manifest.scan")
    }
    /// The manifest of the last round the destination committed: what changes are counted against.
    pub(crate) fn base(&self) -> PathBuf {
        self.dir.join("manifest.base")
    }
    fn base_file(&self) -> PathBuf {
        self.dir.join("base.json")
    }
    pub(crate) fn history(&self) -> PathBuf {
        self.dir.join("history.jsonl")
    }
    /// The device and inode of the source folder the last committed round read.
    pub(crate) fn identity(&self) -> PathBuf {
        self.dir.join("identity")
    }
    pub(crate) fn export_log(&self) -> PathBuf {
        self.dir.join("export.log")
    }
    /// Which source this is for the job ([`ferry_proto::Hello::source`]): a random number made the
    /// first time and kept here with this folder's device and inode, so that a second data folder, a
    /// copy of this one (new inodes) or a copy of this node's identity elsewhere is another source,
    /// and this one started again is the same.
    pub(crate) fn source_id(&self) -> anyhow::Result<u64> {
        let path = self.dir.join("source-id");
        let folder = std::fs::metadata(&self.dir).with_context(|| format!("cannot look at {}", self.dir.display()))?;
        let here = format!("{:x} {:x}", folder.dev(), folder.ino());
        let kept = std::fs::read_to_string(&path).ok().and_then(|text| {
            let (id, made_in) = text.trim().split_once(' ').map_or((text.trim(), None), |(id, at)| (id, Some(at)));
            Some((u64::from_str_radix(id, 16).ok()?, made_in.map(str::to_owned)))
        });
        let id = match kept {
            Some((id, Some(made_in))) if made_in == here => return Ok(id),
            // Kept before the folder was: this folder's from now on.
            Some((id, None)) => id,
            Some((_, Some(_))) => {
                tracing::info!(
                    "{} was copied from another data folder: it is another source of the job (a new source id)",
                    self.dir.display()
                );
                random_id()?
            }
            None => random_id()?,
        };
        let mut file = tempfile::NamedTempFile::new_in(&self.dir)
            .with_context(|| format!("cannot write in {}", self.dir.display()))?;
        std::io::Write::write_all(&mut file, format!("{id:016x} {here}\n").as_bytes())?;
        file.as_file().sync_all()?;
        file.persist(&path).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(id)
    }
    /// Which round [`Self::base`] is.
    pub(crate) fn base_round(&self) -> Option<RoundRef> {
        let bytes = std::fs::read(self.base_file()).ok()?;
        serde_json::from_slice(&bytes).ok()
    }
    /// Which round [`Self::base`] is, when it is there as that round left it. A base cut short or
    /// replaced (its trailer does not end in the round's root) is set aside, with a warning: the
    /// round then lists the whole manifest (a few bytes per file), as when the destination holds
    /// no round in common, instead of failing on it every night.
    pub(crate) fn usable_base(&self) -> Option<RoundRef> {
        let round = self.base_round()?;
        let base = self.base();
        if !base.exists() {
            return None;
        }
        if ferry_engine::ends_as_written(&base, &round.root) {
            return Some(round);
        }
        self.set_base_aside(&format!("it does not end as round {} left it", round.round));
        None
    }
    /// Moves a damaged base aside (to `manifest.base.damaged`, for whoever wants to look at it),
    /// saying why: the next round lists the whole manifest.
    pub(crate) fn set_base_aside(&self, why: &str) {
        let (base, aside) = (self.base(), self.dir.join("manifest.base.damaged"));
        match std::fs::rename(&base, &aside) {
            Ok(()) => tracing::warn!(
                "{} is damaged ({why}); set aside as {}: the next list of changes is the whole manifest",
                base.display(),
                aside.display()
            ),
            Err(e) => tracing::warn!("{} is damaged ({why}) and cannot be set aside: {e}", base.display()),
        }
    }
    /// The scanned manifest becomes the base of the next round's changes. When the base already holds
    /// the same records (nothing changed), the base stays and the scan's copy goes: nothing to sync.
    /// Else the scan's manifest (not fsynced by the scan) is made durable first, then named the base,
    /// then `base.json` says which round it is.
    pub(crate) fn promote(&self, round: RoundRef) -> anyhow::Result<()> {
        if ferry_engine::same_records(&self.scanned(), &self.base()) {
            let _ = std::fs::remove_file(self.scanned());
        } else {
            ferry_engine::sync_record_file(&self.scanned())?;
            std::fs::rename(self.scanned(), self.base())?;
        }
        crate::helpers::write_durably(&self.base_file(), &serde_json::to_vec(&round)?)?;
        Ok(())
    }
    pub(crate) fn forget_base(&self) {
        let _ = std::fs::remove_file(self.base_file());
    }
}

/// The destination's state for a job.
#[derive(Clone)]
pub(crate) struct TargetState {
    pub(crate) dir: PathBuf,
}

impl TargetState {
    pub(crate) fn new(data_dir: &Path, job: &str) -> Self {
        Self { dir: job_dir(data_dir, job).join("target") }
    }
    /// The committed manifest: what ferry put in the target, as its last round left it.
    pub(crate) fn manifest(&self) -> PathBuf {
        self.dir.join("manifest")
    }
    /// What the source removed and the target keeps (not deleted), still ferry's (see
    /// `ferry_engine::held_entries`); rewritten by each round that applies.
    pub(crate) fn kept(&self) -> PathBuf {
        self.dir.join("kept")
    }
    /// The manifest being written by a round, renamed over [`Self::manifest`] at the commit.
    pub(crate) fn next_manifest(&self) -> PathBuf {
        self.dir.join("manifest.next")
    }
    /// The list of changes as it arrives from the source.
    pub(crate) fn incoming_changes(&self) -> PathBuf {
        self.dir.join("incoming-changes")
    }
    fn round_file(&self) -> PathBuf {
        self.dir.join("round.json")
    }
    fn next_round_file(&self) -> PathBuf {
        self.dir.join("round.json.next")
    }
    /// The chunk index, with ferry's records of what it placed.
    pub(crate) fn chunk_index(&self) -> PathBuf {
        self.dir.join("chunks.redb")
    }
    /// Says that the files in the target before the first round were indexed.
    pub(crate) fn existing_indexed(&self) -> PathBuf {
        self.dir.join("existing.indexed")
    }
    pub(crate) fn history(&self) -> PathBuf {
        self.dir.join("history.jsonl")
    }
    pub(crate) fn import_log(&self) -> PathBuf {
        self.dir.join("import.log")
    }
    pub(crate) fn import_marker(&self) -> PathBuf {
        self.dir.join("import.running")
    }
    pub(crate) fn round_marker(&self) -> PathBuf {
        self.dir.join("round.running")
    }
    /// What a check begun before the round found.
    pub(crate) fn early_findings(&self) -> PathBuf {
        self.dir.join("findings.early")
    }
    /// What the round's check of the target found.
    pub(crate) fn findings(&self) -> PathBuf {
        self.dir.join("findings")
    }
    /// What the operator lets the next round replace although ferry did not put it there
    /// (`ferry job adopt`; see `crate::adoption`).
    pub(crate) fn adopt(&self) -> PathBuf {
        self.dir.join("adopt.json")
    }
    /// The device and inode of the target folder ferry last filled.
    pub(crate) fn identity(&self) -> PathBuf {
        self.dir.join("identity")
    }
    /// The last committed round: the round `round.json` names, whose manifest is in place as that
    /// round left it (its trailer is read). A round stopped between naming its manifest into place
    /// and recording itself (a kill, a full disk) is found by `round.json.next`, written before the
    /// rename ([`Self::will_hold`]), and is the one held. A committed manifest cut short or replaced
    /// is an error that says how to go on, never a round merged against it.
    pub(crate) fn holds(&self) -> anyhow::Result<Option<RoundRef>> {
        let manifest = self.manifest();
        let recorded = read_round(&self.round_file())?;
        if let Some(next) = read_round(&self.next_round_file()).ok().flatten()
            && recorded != Some(next)
            && ferry_engine::ends_as_written(&manifest, &next.root)
        {
            return Ok(Some(next));
        }
        match recorded {
            Some(round) if !ferry_engine::ends_as_written(&manifest, &round.root) => anyhow::bail!(
                "{} is damaged or gone (it does not end as round {} left it): this node cannot tell what it put in \
                 the target. {}",
                manifest.display(),
                round.round,
                self.take_over()
            ),
            recorded => Ok(recorded),
        }
    }
    /// Opens the chunk index. A damaged one (cut short, altered) is an error that says how to go on:
    /// it also holds ferry's records of what it placed, which the next round's check needs.
    pub(crate) fn open_index(&self) -> anyhow::Result<ferry_engine::ChunkIndex> {
        ferry_engine::ChunkIndex::open(&self.chunk_index()).map_err(|e| {
            let damaged = e.is_damaged();
            let e = anyhow::Error::from(e);
            if damaged { e.context(format!("the chunk index is damaged. {}", self.take_over())) } else { e }
        })
    }
    /// How the operator goes on from damaged state: the job is added again, and its first round
    /// takes the target over.
    fn take_over(&self) -> String {
        let job = self.dir.parent().and_then(Path::file_name).map_or("JOB".into(), |name| name.to_string_lossy());
        format!(
            "To take the target over as it is (its files are read once; those that match the source's stay and \
             are not sent): `ferry job remove {job} --purge` and `ferry job add {job} ...` again on this node"
        )
    }
    /// Names the round whose manifest is about to replace the committed one, before it does: see
    /// [`Self::holds`].
    pub(crate) fn will_hold(&self, round: RoundRef) -> anyhow::Result<()> {
        crate::helpers::write_durably(&self.next_round_file(), &serde_json::to_vec(&round)?)
            .with_context(|| format!("cannot write {}", self.next_round_file().display()))
    }
    /// Records `round` as the last committed one.
    pub(crate) fn set_holds(&self, round: RoundRef) -> anyhow::Result<()> {
        crate::helpers::write_durably(&self.round_file(), &serde_json::to_vec(&round)?)
            .with_context(|| format!("cannot record the round in {}", self.round_file().display()))?;
        let _ = std::fs::remove_file(self.next_round_file());
        Ok(())
    }
    /// Records the round [`Self::holds`] found, where it is not what `round.json` says (a commit cut
    /// short), and forgets a `round.json.next` whose manifest never took the place.
    pub(crate) fn settle_holds(&self, holds: Option<RoundRef>) -> anyhow::Result<()> {
        match holds {
            Some(round) if read_round(&self.round_file())? != holds => {
                tracing::warn!(
                    "round {} was committed here, but the daemon stopped before it recorded it (round.json.next): \
                     recorded now",
                    round.round
                );
                self.set_holds(round)
            }
            _ => {
                let _ = std::fs::remove_file(self.next_round_file());
                Ok(())
            }
        }
    }
}

/// The round recorded in `path` (`round.json`, or `round.json.next`), if there is one.
fn read_round(path: &Path) -> anyhow::Result<Option<RoundRef>> {
    match std::fs::read(path) {
        Ok(bytes) => {
            let shown = || format!("{} is damaged", path.display());
            Ok(Some(serde_json::from_slice(&bytes).with_context(shown)?))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow::Error::from(e).context(format!("cannot read {}", path.display()))),
    }
}

fn random_id() -> anyhow::Result<u64> {
    let mut bytes = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| anyhow::anyhow!("no random numbers from the system"))?;
    Ok(u64::from_le_bytes(bytes))
}
