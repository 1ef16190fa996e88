//! `ferry verify JOB`: re-read the target and compare it with the last committed round.

use anyhow::{Context, bail};
use ferry_engine::{Entry, ManifestReader, MergeJoin, Pair, ScanOptions, scan};
use serde::Serialize;

use crate::config_dir::ConfigDir;
use crate::state::TargetState;

/// What `verify` found.
#[derive(Debug, Serialize)]
pub struct VerifyReport {
    /// The version of this document's shape.
    pub schema: u32,
    /// The job.
    pub job: String,
    /// The round checked.
    pub round: u64,
    /// Entries checked.
    pub checked: u64,
    /// Every difference, as `path: what`.
    pub differences: Vec<String>,
}

/// Re-hashes the target of `job` and lists what differs from its last committed manifest: content,
/// kind, mode, mtime (not of folders, which the import's own files move), symlink targets, hard links
/// and owners (by name, when run as root). Files only the target has (the import's) are not
/// differences.
pub fn verify(config_dir: &ConfigDir, job: &str) -> anyhow::Result<VerifyReport> {
    let config = config_dir.load()?;
    let job_config = config.job(job).with_context(|| format!("no job {job:?} here"))?;
    let state = TargetState::new(&config_dir.data_dir(&config), job);
    let Some(holds) = state.holds()? else { bail!("job {job} has no committed round on this node to verify against") };
    let scratch = tempfile::Builder::new().prefix("ferry-verify-").tempdir()?;
    let (manifest, cache) = (scratch.path().join("manifest"), scratch.path().join("cache"));
    scan(&job_config.path, None, &manifest, &cache, &ScanOptions::default())
        .with_context(|| format!("cannot read {}", job_config.path.display()))?;
    let mut report = VerifyReport {
        schema: crate::helpers::REPORT_SCHEMA,
        job: job.to_owned(),
        round: holds.round,
        checked: 0,
        differences: Vec::new(),
    };
    let can_chown = rustix::process::geteuid().is_root();
    let pairs = MergeJoin::new(ManifestReader::open(&state.manifest())?, ManifestReader::open(&manifest)?);
    for pair in pairs {
        let Pair { old: committed, new: found } = pair?;
        let Some(want) = committed else { continue };
        report.checked += 1;
        let path = want.path.to_string();
        match found {
            None => report.differences.push(format!("{path}: missing")),
            Some(got) => {
                if let Some(what) = difference(&want, &got, can_chown) {
                    report.differences.push(format!("{path}: {what}"));
                }
            }
        }
    }
    Ok(report)
}

fn difference(want: &Entry, got: &Entry, owners: bool) -> Option<String> {
    if want.kind != got.kind {
        return Some(format!("is a {}, should be a {}", got.kind, want.kind));
    }
    if want.size != got.size || want.chunks != got.chunks {
        return Some(format!("content differs ({} bytes, should be {})", got.size, want.size));
    }
    if want.link_target != got.link_target {
        return Some("symlink target differs".into());
    }
    if want.mode != got.mode {
        return Some(format!("mode {:o}, should be {:o}", got.mode, want.mode));
    }
    // A folder's mtime moves whenever the import adds its own files there: not a difference.
    if want.mtime_ns != got.mtime_ns && want.kind != ferry_engine::EntryKind::Dir {
        return Some("mtime differs".into());
    }
    if want.hard_link_to != got.hard_link_to {
        return Some("hard links differ".into());
    }
    let owner_differs = match (&want.user, &got.user) {
        (Some(a), Some(b)) => a != b,
        _ => want.uid != got.uid,
    };
    if owners && owner_differs {
        return Some(format!(
            "owner {}, should be {}",
            got.user.clone().unwrap_or(got.uid.to_string()),
            want.user.clone().unwrap_or(want.uid.to_string())
        ));
    }
    None
}
