//! `ferry demo`: a whole incremental migration on a generated tree, with nothing to set up.
//!
//! Today it runs local rounds (source and target folders on this machine, through the same engine the
//! network round uses); each round is followed by a sample import hook and a full comparison of the
//! two trees.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use ferry_engine::{LocalRoundOptions, local_round};
use ferry_testkit::{TreeGenerator, TreeSpec, compare_trees, snapshot};

use crate::human;

/// What `ferry demo` runs.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// About how many files in the generated tree.
    pub files: usize,
    /// How many rounds.
    pub rounds: u32,
    /// The generator's seed.
    pub seed: u64,
    /// Keep the demo folder.
    pub keep: bool,
}

const IMPORT_HOOK: &str = r#"#!/bin/sh
# A stand-in for `zxsuite backup doExternalRestore TARGET`: it only counts what it would import.
target="$1"; round="$2"
accounts=$(ls "$target/accounts" | wc -l)
blobs=$(find "$target/items" -type f | wc -l)
echo "round $round: imported $accounts accounts, $blobs message blobs from $target"
"#;

/// Runs the demo, printing a table as it goes; fails if any round leaves the target different.
pub fn run_demo(options: &DemoOptions) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new().prefix("ferry-demo-").tempdir().context("cannot create a temporary folder")?;
    let root = dir.path();
    let (source, target, state) = (root.join("source"), root.join("target"), root.join("state"));
    let hook = root.join("import-hook.sh");
    std::fs::write(&hook, IMPORT_HOOK).context("cannot write the sample import hook")?;

    println!("ferry demo in {}", root.display());
    let started = Instant::now();
    let mut tree = TreeGenerator::create(&source, TreeSpec::with_files(options.files, options.seed))
        .context("cannot generate the source tree")?;
    println!(
        "generated a Backup-NG-like tree of about {} files in {}",
        options.files,
        human::duration(started.elapsed())
    );
    println!();
    println!(
        "{:>5}  {:>8}  {:>9}  {:>10}  {:>10}  {:>10}  {:>9}  {:<8}  import",
        "round", "files", "written", "read", "copied", "reused", "time", "verified"
    );
    // What the source deleted stays in the target (the import never deletes; nor does ferry without
    // --delete): paths the source had in an earlier round may remain.
    let mut earlier = ferry_testkit::Snapshot::new();
    for round in 1..=options.rounds {
        if round > 1 {
            tree.next_day().context("cannot apply a day of changes to the source tree")?;
        }
        let report = local_round(&source, &target, &state, &LocalRoundOptions::default())
            .with_context(|| format!("round {round} failed"))?;
        let want = snapshot(&source, &[]).context("cannot read the source tree")?;
        let got = snapshot(&target, &[]).context("cannot read the target tree")?;
        let verified = compare_trees(&want, &got, |p| earlier.contains_key(p));
        let import = run_hook(&hook, &target, round)?;
        println!(
            "{:>5}  {:>8}  {:>9}  {:>10}  {:>10}  {:>10}  {:>9}  {:<8}  {}",
            round,
            human::count(report.scan.files),
            human::count(report.apply.files_written),
            human::bytes(report.scan.bytes_read),
            human::bytes(report.apply.bytes_fetched),
            human::bytes(report.apply.bytes_local),
            human::duration(report.duration),
            if verified.is_ok() && report.in_sync { "yes" } else { "NO" },
            import
        );
        if let Err(differences) = verified {
            bail!("round {round} left the target different from the source: {differences}");
        }
        earlier.extend(want);
    }
    println!();
    println!(
        "every round left the target identical to the source (content, modes, owners, mtimes, links), \
         keeping what the source deleted"
    );
    if options.keep {
        let kept = dir.keep();
        println!("kept the demo folder: {}", kept.display());
    }
    Ok(())
}

fn run_hook(hook: &Path, target: &Path, round: u32) -> anyhow::Result<String> {
    let output = Command::new("sh")
        .arg(hook)
        .arg(target)
        .arg(round.to_string())
        .output()
        .context("cannot run the sample import hook")?;
    if !output.status.success() {
        bail!("the import hook failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}
