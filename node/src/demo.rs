//! `ferry demo`: a whole incremental migration on a generated tree, with nothing to set up.
//!
//! Two nodes with fresh identities in a temporary folder, pinned to each other; the destination daemon
//! on loopback; rounds pushed over QUIC with a day of changes between them; the destination's import
//! hook (a stand-in script) run by its daemon after each committed round; a full comparison of the two
//! trees after each.

use std::time::Instant;

use anyhow::{Context, bail};
use ferry_certs::Identity;
use ferry_treegen::{TreeGenerator, TreeSpec, compare_trees, snapshot};

use crate::config::{Config, JobConfig, PeerConfig};
use crate::config_dir::ConfigDir;
use crate::destination::Daemon;
use crate::human;
use crate::source::{PushOptions, push};

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
echo "round $round: $accounts accounts, $blobs blobs"
"#;

/// Runs the demo, printing a table as it goes; fails if any round leaves the target different.
pub fn run_demo(options: &DemoOptions) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new().prefix("ferry-demo-").tempdir().context("cannot create a temporary folder")?;
    let root = dir.path();
    let (source, target) = (root.join("source"), root.join("target"));
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
    let (source_node, dest_node) =
        (ConfigDir::new(Some(root.join("source-node"))), ConfigDir::new(Some(root.join("dest-node"))));
    let (source_id, _) = Identity::load_or_create(source_node.path())?;
    let (dest_id, _) = Identity::load_or_create(dest_node.path())?;
    dest_node.save(&Config {
        peers: vec![PeerConfig::new("source", source_id.node_id(), None)],
        jobs: vec![JobConfig {
            name: "zimbra".into(),
            path: target.clone(),
            peer: "source".into(),
            // The destination's own import hook, run by its daemon after each committed round.
            import_cmd: Some(format!("sh '{}' {{target}} {{round}}", hook.display())),
            import_provisioning_cmd: None,
            import_timeout: Some("10m".into()),
            ..JobConfig::default()
        }],
        ..Config::default()
    })?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let daemon = runtime.block_on(async {
        Daemon::bind(dest_node.clone(), Some("127.0.0.1:0".into()), crate::destination::STALL_TIMEOUT)
    })?;
    let addr = daemon.local_addr()?;
    source_node.save(&Config {
        peers: vec![PeerConfig::new("dest", dest_id.node_id(), Some(addr.to_string()))],
        jobs: vec![JobConfig {
            name: "zimbra".into(),
            path: source.clone(),
            peer: "dest".into(),
            ..JobConfig::default()
        }],
        ..Config::default()
    })?;
    println!(
        "source node {} pushes to destination node {} at {addr} (QUIC, pinned TLS 1.3)",
        source_id.node_id().short(),
        dest_id.node_id().short()
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = runtime.spawn(daemon.run(async {
        let _ = stopped.await;
    }));

    println!();
    println!(
        "{:>5}  {:>7}  {:>7}  {:>10}  {:>10}  {:>10}  {:>9}  {:>6}  {:>6}  {:>8}  {:<8}  import",
        "round", "files", "written", "changed", "new data", "on wire", "resent", "dedup", "zstd", "time", "verified"
    );
    // The import never deletes, nor does ferry without --delete: paths the source had in an earlier
    // round may remain in the target.
    let mut earlier = ferry_treegen::Snapshot::new();
    let push_options = PushOptions {
        job: "zimbra".into(),
        delete: false,
        numeric_ids: false,
        skip_special: false,
        import: ferry_proto::ImportMode::Default,
        wait_for_import: true,
        wait_if_busy: false,
        bwlimit: None,
        max_duration: None,
        dry_run: false,
        reconnect_grace: std::time::Duration::from_secs(60),
        congestion: crate::net::Congestion::Cubic,
        progress_interval: std::time::Duration::from_secs(60),
        progress: crate::meter::Show::choose(false, std::time::Duration::from_secs(60)),
    };
    for round in 1..=options.rounds {
        if round > 1 {
            tree.next_day().context("cannot apply a day of changes to the source tree")?;
        }
        let report =
            runtime.block_on(push(&source_node, &push_options)).with_context(|| format!("round {round} failed"))?;
        let want = snapshot(&source, &[]).context("cannot read the source tree")?;
        let got = snapshot(&target, &[]).context("cannot read the target tree")?;
        let verified = compare_trees(&want, &got, |p| earlier.contains_key(p));
        let import = match &report.import {
            Some(result) if result.success => result.tail.join(" / "),
            Some(result) => bail!("the import of round {} failed: {}", report.round, result.tail.join(" / ")),
            None => bail!("the destination ran no import"),
        };
        let ratio = |a: u64, b: u64| if b == 0 { "-".to_owned() } else { format!("{:.2}x", a as f64 / b as f64) };
        println!(
            "{:>5}  {:>7}  {:>7}  {:>10}  {:>10}  {:>10}  {:>9}  {:>6}  {:>6}  {:>8}  {:<8}  {}",
            report.round,
            human::count(report.entries),
            human::count(report.files_changed),
            human::bytes(report.changed_bytes),
            human::bytes(report.chunk_bytes),
            human::bytes(report.bytes_on_wire),
            human::bytes(report.bytes_lost),
            ratio(report.changed_bytes, report.chunk_bytes),
            ratio(report.chunk_bytes, report.bytes_on_wire),
            human::duration(std::time::Duration::from_millis(report.duration_ms)),
            if verified.is_ok() && report.in_sync { "yes" } else { "NO" },
            import
        );
        if let Err(differences) = verified {
            bail!("round {round} left the target different from the source: {differences}");
        }
        earlier.extend(want);
    }
    let _ = stop.send(());
    runtime.block_on(server).context("the daemon panicked")??;
    println!();
    println!(
        "columns: changed = bytes of changed files; new data = chunks the destination lacked; dedup = changed / new data;"
    );
    println!(
        "zstd = new data / bytes on the wire (both directions, QUIC's own bytes included); resent = bytes QUIC lost and sent again"
    );
    println!(
        "every round left the target identical to the source (content, modes, owners, mtimes, links), keeping what the source deleted"
    );
    if options.keep {
        let kept = dir.keep();
        println!("kept the demo folder: {}", kept.display());
    }
    Ok(())
}
