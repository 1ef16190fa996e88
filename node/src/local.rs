//! `ferry sync --round SRC DEST`: a local round.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use ferry_engine::{
    ApplyOptions, CheckReport, LocalPlan, LocalRoundOptions, LocalRoundReport, Progress, RoundError, ScanOptions,
    local_plan, local_round,
};
use ferry_proto::Refusal;

use crate::refused::Refused;
use crate::{exit, human, meter};

/// A local round, as the command line asked for it.
#[derive(Debug, Clone)]
pub struct LocalSyncOptions {
    /// The source folder.
    pub source: PathBuf,
    /// The target folder.
    pub target: PathBuf,
    /// Explicit state folder, or `None` for the default under the data directory.
    pub state_dir: Option<PathBuf>,
    /// `--data-dir`: the data directory the default state folder goes under (else the default one).
    pub data_dir: Option<PathBuf>,
    /// `--delete`.
    pub delete: bool,
    /// `--numeric-ids`.
    pub numeric_ids: bool,
    /// `--skip-special`.
    pub skip_special: bool,
    /// `--json`.
    pub json: bool,
    /// `--dry-run`: plan only, write nothing.
    pub dry_run: bool,
    /// `--adopt`: paths (relative to the target) or `all`.
    pub adopt: Vec<String>,
    /// How progress is shown while the round runs.
    pub progress: crate::meter::Show,
}

/// The local round's JSON documents carry the schema version every `--json` document carries.
fn print_json<T: serde::Serialize>(report: &T) -> anyhow::Result<()> {
    #[derive(serde::Serialize)]
    struct Versioned<'a, T> {
        schema: u32,
        #[serde(flatten)]
        report: &'a T,
    }
    println!("{}", serde_json::to_string_pretty(&Versioned { schema: crate::helpers::REPORT_SCHEMA, report })?);
    Ok(())
}

/// Where a source/target pair keeps its state when not told: one folder per pair, named by a hash of
/// both canonical paths, so that two pairs never share a scan cache or chunk index.
pub(crate) fn default_state_dir(source: &Path, target: &Path, data_dir: Option<&Path>) -> anyhow::Result<PathBuf> {
    let source = source.canonicalize().with_context(|| format!("source folder {}", source.display()))?;
    let target = target.canonicalize().with_context(|| format!("target folder {}", target.display()))?;
    let mut hasher = blake3::Hasher::new();
    hasher.update(source.as_os_str().as_encoded_bytes());
    hasher.update(b"\0");
    hasher.update(target.as_os_str().as_encoded_bytes());
    let id = &hasher.finalize().to_hex()[..16];
    let data_dir = data_dir.map_or_else(crate::helpers::default_data_dir, Path::to_path_buf);
    Ok(data_dir.join("local").join(id))
}

/// Runs the round and prints its report; returns the exit code.
pub fn run_local_sync(options: &LocalSyncOptions) -> anyhow::Result<i32> {
    if !options.source.is_dir() {
        anyhow::bail!("source folder {} does not exist or is not a folder", options.source.display());
    }
    let state = match &options.state_dir {
        Some(dir) => dir.clone(),
        None if options.dry_run && !options.target.exists() => {
            // Nothing to find in a state folder of a target that does not exist yet.
            std::env::temp_dir().join("ferry-dry-run-no-state")
        }
        None => {
            std::fs::create_dir_all(&options.target)
                .with_context(|| format!("cannot create target folder {}", options.target.display()))?;
            default_state_dir(&options.source, &options.target, options.data_dir.as_deref())?
        }
    };
    tracing::info!(source = %options.source.display(), target = %options.target.display(), state = %state.display(), "local round");
    let (scanned, applied) = (Arc::new(Progress::default()), Arc::new(Progress::default()));
    let round_options = LocalRoundOptions {
        scan: ScanOptions { progress: Some(scanned.clone()), ..ScanOptions::default() },
        apply: ApplyOptions {
            delete: options.delete,
            numeric_ids: options.numeric_ids,
            adopt: crate::adoption::parse(&options.adopt)?,
            progress: Some(applied.clone()),
            ..ApplyOptions::default()
        },
        skip_special: options.skip_special,
    };
    let watching = meter::Watch::start(options.progress, move || {
        if applied.entries() == 0 { meter::scan_line(&scanned) } else { apply_line(&applied, scanned.entries()) }
    });
    let failed = || format!("round {} -> {} failed", options.source.display(), options.target.display());
    if options.dry_run {
        let plan = local_plan(&options.source, &options.target, &state, &round_options);
        drop(watching);
        let plan = plan.with_context(failed)?;
        if options.json {
            print_json(&plan)?;
        } else {
            print_plan(&options.source, &options.target, &plan, options.delete);
        }
        return Ok(exit::OK);
    }
    let report = local_round(&options.source, &options.target, &state, &round_options);
    drop(watching);
    let report = report.map_err(refused_for_space).with_context(failed)?;
    if options.json {
        print_json(&report)?;
    } else {
        print_summary(&options.source, &options.target, &report, options.delete);
    }
    Ok(exit_code(&report))
}

/// A round that does not fit its target ends as a network round does: refused (exit 8).
fn refused_for_space(error: RoundError) -> anyhow::Error {
    match error {
        RoundError::NoSpace(no_space) => Refused::new(Refusal::NoSpace, no_space.to_string()).into(),
        other => other.into(),
    }
}

/// "applying: 4,512 of 20,000 entries, 1.2 GiB written (150.0 MiB/s)". The steps of the merge
/// also count paths removed, so they may pass the scan's entries.
fn apply_line(applied: &Progress, entries: u64) -> String {
    format!(
        "applying: {} of {} entries, {} written ({})",
        human::count(applied.entries().min(entries)),
        human::count(entries),
        human::bytes(applied.bytes()),
        meter::rate(applied)
    )
}

/// 0 only when the target now holds the source's tree; 3 otherwise (entries that failed, or left
/// alone because they are not ferry's).
pub(crate) fn exit_code(report: &LocalRoundReport) -> i32 {
    if report.apply.failure_count > 0 || !report.in_sync { exit::INCOMPLETE } else { exit::OK }
}

fn print_plan(source: &Path, target: &Path, plan: &LocalPlan, delete: bool) {
    println!("dry run: {} -> {}", source.display(), target.display());
    println!(
        "  would write {} ({}; {} to copy from the source after deduplication), {} metadata-only, {}, {}",
        human::counted(plan.files, "file"),
        human::bytes(plan.changed_bytes),
        human::bytes(plan.copy_bytes),
        human::count(plan.metadata),
        human::counted(plan.folders, "folder"),
        human::counted(plan.links, "link"),
    );
    if plan.gone > 0 {
        println!(
            "  {} {} the source no longer has",
            if delete { "would remove (those ferry wrote)" } else { "would keep" },
            human::counted(plan.gone, "path")
        );
    }
    if plan.adopted {
        println!("  the target is new to ferry: what is already in it at the source's paths would be adopted");
    }
    print_check(&plan.check);
    if plan.space_needed > plan.space_available {
        eprintln!(
            "warning: not enough space in {}: the round needs {} with the margin, and {} is free",
            target.display(),
            human::bytes(plan.space_needed),
            human::bytes(plan.space_available)
        );
    }
    println!("  nothing was written");
}

fn print_check(check: &CheckReport) {
    if !check.entries_differ() {
        return;
    }
    eprintln!("warning: the target is not as ferry left it: {}", check.summary());
    for difference in &check.differences {
        eprintln!("  {difference}");
    }
}

pub(crate) fn print_summary(source: &Path, target: &Path, report: &LocalRoundReport, delete: bool) {
    let (scan, apply) = (&report.scan, &report.apply);
    println!("round done in {}: {} -> {}", human::duration(report.duration), source.display(), target.display());
    println!(
        "  checked  {} of the target in {}{}",
        human::counted(report.check.entries, "entry"),
        human::duration(report.check.duration),
        if report.check.is_clean() { ", as ferry left them" } else { "" }
    );
    print_check(&report.check);
    println!(
        "  scanned  {}, {} ({}); read {} ({}), the others unchanged since the last scan",
        human::counted(scan.entries, "entry"),
        human::counted(scan.files, "file"),
        human::bytes(scan.file_bytes),
        human::counted(scan.files_read, "file"),
        human::bytes(scan.bytes_read),
    );
    println!(
        "  applied  {} written ({}), {} metadata-only, {} created, {}, {}, {} removed",
        human::counted(apply.files_written, "file"),
        human::bytes(apply.bytes_written),
        human::count(apply.metadata_updated),
        human::counted(apply.dirs_created, "folder"),
        human::counted(apply.symlinks, "symlink"),
        human::counted(apply.hard_links, "hard link"),
        human::count(apply.deleted),
    );
    println!(
        "  chunks   {} reused from data already in the target ({}), {} copied from the source ({})",
        human::count(apply.chunks_local),
        human::bytes(apply.bytes_local),
        human::count(apply.chunks_fetched),
        human::bytes(apply.bytes_fetched),
    );
    if apply.kept > 0 {
        println!(
            "  kept     {} the source no longer has ({})",
            human::counted(apply.kept, "path"),
            if delete {
                "folders that hold files ferry did not put there"
            } else {
                "run with --delete to remove those ferry put there"
            }
        );
    }
    if scan.changed_while_read_count > 0 {
        eprintln!(
            "warning: {} changed while read and left for the next round, e.g. {}",
            human::counted(scan.changed_while_read_count, "file"),
            scan.changed_while_read.join(", ")
        );
    }
    if scan.skipped_count > 0 {
        eprintln!("warning: {} skipped: {}", human::counted(scan.skipped_count, "path"), scan.skipped.join("; "));
    }
    if apply.failure_count > 0 {
        eprintln!("error: {} could not be applied:", human::counted(apply.failure_count, "entry"));
        for failure in &apply.failures {
            eprintln!("  {failure}");
        }
    }
    println!(
        "  target   {} (root {})",
        if report.in_sync {
            "matches the source"
        } else if Some(report.target_root) == report.scan.root_hash && report.scan.changed_while_read_count == 0 {
            "does not match the source: entries of it are not carried (listed above; --skip-special leaves \
             devices, FIFOs and sockets behind)"
        } else {
            "does not match the source yet: run the round again"
        },
        report.target_root.short()
    );
}
