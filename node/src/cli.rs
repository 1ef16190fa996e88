//! The command line, as clap parses it. Raw flags only: `main.rs` turns them into validated options.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// ferry: move only what is new, from a source tree to a target tree, in rounds.
#[derive(Debug, Parser)]
#[command(name = "ferry", version, about, long_about = None)]
pub struct Cli {
    /// More log output (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only errors and the final summary.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// What to do.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one incremental round.
    ///
    /// Local round: `ferry sync --round SRC_DIR DEST_DIR` brings DEST_DIR to SRC_DIR's state on this
    /// machine (e.g. to fill a disk that will be shipped), through the same engine as network rounds.
    #[command(after_help = "Examples:\n  ferry sync --round /opt/zimbra/backup/ng /mnt/disk/ng\n  \
                            ferry sync --round --delete --json /srv/export /srv/copy")]
    Sync(SyncArgs),
    /// Show a whole migration on a generated tree: several rounds with a day of changes between them,
    /// an import hook, and a check that the target matches after each round.
    Demo(DemoArgs),
}

/// `ferry sync`.
#[derive(Debug, Args)]
pub struct SyncArgs {
    /// Run one round now (the only mode so far).
    #[arg(long, required = true)]
    pub round: bool,
    /// The source folder.
    pub source: PathBuf,
    /// The target folder (created if missing).
    pub target: PathBuf,
    /// Remove from the target what the source removed (only what ferry wrote; never other files).
    #[arg(long)]
    pub delete: bool,
    /// Keep owners' numbers as they are instead of mapping them by user and group name.
    #[arg(long)]
    pub numeric_ids: bool,
    /// Where this pair's state (scan cache, chunk index, last manifest) lives. Default: a folder per
    /// source/target pair under the data directory (/var/lib/ferry for root, else
    /// ~/.local/share/ferry).
    #[arg(long, env = "FERRY_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Print one JSON report on stdout instead of the summary.
    #[arg(long)]
    pub json: bool,
}

/// `ferry demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// About how many files the generated tree has.
    #[arg(long, default_value_t = 3000)]
    pub files: usize,
    /// How many rounds (the first copies everything, each later one follows a day of changes).
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// Seed of the generated tree.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Keep the demo's folder (source, target, state, import log) instead of removing it.
    #[arg(long)]
    pub keep: bool,
}
