//! `ferry verify JOB`: re-read the target and compare it with the last committed round.

use anyhow::{Context, bail};
use ferry_engine::{Entry, EntryKind, ManifestReader, MergeJoin, Pair, RelPath, ScanOptions, scan};
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
    /// Folders whose mtime differs and that hold files only the target has (the import's `map_*`):
    /// adding those files moved it, so it is listed here, not as a difference.
    pub folder_mtimes_moved: Vec<String>,
}

/// Re-hashes the target of `job` and lists what differs from its last committed manifest: content,
/// kind, mode, mtime, symlink targets, hard links and owners (by name, when run as root). Files only
/// the target has (the import's) are not differences, and neither is the mtime of a folder they are
/// in (adding them moved it): such folders are listed apart.
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
        folder_mtimes_moved: Vec::new(),
    };
    let can_chown = rustix::process::geteuid().is_root();
    // Folders whose mtime differs, until it is known whether files only the target has are in them
    // (they come after the folder, in manifest order).
    let mut moved = std::collections::BTreeMap::<RelPath, bool>::new();
    let pairs = MergeJoin::new(ManifestReader::open(&state.manifest())?, ManifestReader::open(&manifest)?);
    for pair in pairs {
        let Pair { old: committed, new: found } = pair?;
        let Some(want) = committed else {
            if let Some(parent) = found.and_then(|only_here| only_here.path.parent())
                && let Some(explained) = moved.get_mut(&parent)
            {
                *explained = true;
            }
            continue;
        };
        report.checked += 1;
        let path = want.path.to_string();
        match found {
            None => report.differences.push(format!("{path}: missing")),
            Some(got) if got.kind == EntryKind::Dir && want.kind == EntryKind::Dir && got.mtime_ns != want.mtime_ns => {
                moved.insert(want.path.clone(), false);
                if let Some(what) = difference(&want, &Entry { mtime_ns: want.mtime_ns, ..got }, can_chown) {
                    report.differences.push(format!("{path}: {what}"));
                }
            }
            Some(got) => {
                if let Some(what) = difference(&want, &got, can_chown) {
                    report.differences.push(format!("{path}: {what}"));
                }
            }
        }
    }
    for (folder, explained) in moved {
        let shown = if folder.as_bytes().is_empty() { ".".to_owned() } else { folder.to_string() };
        if explained {
            report.folder_mtimes_moved.push(shown);
        } else {
            report.differences.push(format!("{shown}: mtime differs"));
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
    if want.mtime_ns != got.mtime_ns {
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
