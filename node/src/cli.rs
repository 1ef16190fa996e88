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
    /// How log lines look on stderr: text for people, or one JSON object a line for log shippers
    /// (its time, level, message, fields and spans).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "FERRY_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// The config folder (identity, ferry.toml). Default: /etc/ferry for root, else ~/.config/ferry.
    #[arg(long, global = true, env = "FERRY_CONFIG_DIR")]
    pub config_dir: Option<PathBuf>,
    /// Where round state lives. Default: the config's `data_dir`, else /var/lib/ferry beside
    /// /etc/ferry, else `data/` in the config folder.
    #[arg(long, global = true, env = "FERRY_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// How log lines look (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Plain lines (coloured on a terminal; with journald priorities in the journal).
    Text,
    /// One JSON object a line.
    Json,
}

/// What to do.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create this node's identity and config; print its node ID.
    #[command(
        after_help = "Example:\n  ferry init            # prints the node ID on the first line; give it to the other node"
    )]
    Init,
    /// Pin a peer: only pinned nodes get past the TLS handshake.
    #[command(after_help = "Example:\n  ferry trust 5xq3...k2a --name dest --addr dest.example.com:7373")]
    Trust(TrustArgs),
    /// Unpin a peer: its next connection is refused. Refused while jobs name it.
    #[command(after_help = "Example:\n  ferry untrust old-mail     # or its node ID")]
    Untrust {
        /// The peer's name or node ID.
        peer: String,
    },
    /// Configure jobs.
    #[command(subcommand)]
    Job(JobCommand),
    /// Run the destination daemon: accepts rounds from trusted peers for their jobs.
    #[command(after_help = "Examples:\n  ferry serve                       # [::]:7373, or the config's `listen`\n  \
                            ferry serve --listen 10.0.0.2:7373\n  \
                            systemctl enable --now ferry.service   # the same, from dist/systemd/ferry.service")]
    Serve(ServeArgs),
    /// Destination: re-read a job's target and report every difference from its last committed round.
    #[command(
        after_help = "Example:\n  ferry verify zimbra   # exit 0: the target matches; exit 5: the differences are listed"
    )]
    Verify {
        /// The job.
        job: String,
        /// One JSON document on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Each job's last round on this node (sent and received), its last import, and what is in progress
    /// (`--json`: the whole history; `ferry log JOB`: every round, one line each).
    #[command(
        after_help = "Examples:\n  ferry status\n  ferry status zimbra --json   # {\"schema\": 1, \"jobs\": [...]}"
    )]
    Status {
        /// Only this job.
        job: Option<String>,
        /// One JSON document on stdout.
        #[arg(long)]
        json: bool,
    },
    /// A job's rounds on this node, sent and received, one line each (how each ended, files, bytes,
    /// duration, import), oldest first.
    #[command(
        after_help = "Examples:\n  ferry log zimbra\n  ferry log zimbra --last 5 --json   # {\"schema\": 1, \"job\": ..., \"rounds\": [...]}"
    )]
    Log {
        /// The job.
        job: String,
        /// Only the newest N.
        #[arg(long, value_name = "N", default_value_t = 20)]
        last: usize,
        /// One JSON document on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Run one incremental round.
    ///
    /// `ferry sync --round JOB` pushes the job's folder to its peer. `ferry sync --round SRC_DIR DEST_DIR`
    /// is a local round on this machine (e.g. to fill a disk that will be shipped), through the same
    /// engine.
    #[command(after_help = "Examples:\n  ferry sync --round zimbra\n  \
                            ferry sync --round /opt/zimbra/backup/ng /mnt/disk/ng\n  \
                            ferry sync --round --delete --json /srv/export /srv/copy")]
    Sync(SyncArgs),
    /// Show a whole migration on a generated tree: several rounds with a day of changes between them,
    /// an import hook, and a check that the target matches after each round.
    #[command(after_help = "Examples:\n  ferry demo\n  ferry demo --files 20000 --rounds 5 --keep")]
    Demo(DemoArgs),
    /// Check ferry.toml, or print the reference of its keys.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Print a shell completion script.
    #[command(after_help = "Example:\n  ferry completions bash > /etc/bash_completion.d/ferry")]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Write man pages (ferry.1, ferry-sync.1, ...) into a folder.
    #[command(after_help = "Example:\n  ferry man /usr/local/share/man/man1")]
    Man {
        /// The folder (created if missing).
        dir: PathBuf,
    },
}

/// `ferry config`.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Check a config file: every problem with its line, column and key. Exits 1 if there is an error.
    #[command(after_help = "Examples:\n  ferry config check\n  ferry config check /tmp/ferry.toml.new")]
    Check {
        /// The file (default: ferry.toml in the config folder).
        file: Option<PathBuf>,
    },
    /// Print every key of ferry.toml with its default and meaning (Markdown; CONFIG.md is this output).
    #[command(after_help = "Example:\n  ferry config reference | less")]
    Reference,
}

/// `ferry sync`.
#[derive(Debug, Args)]
pub struct SyncArgs {
    /// Run one round now (the only mode so far).
    #[arg(long, required = true)]
    pub round: bool,
    /// The job (network round), or the source folder (local round).
    pub job_or_source: PathBuf,
    /// The target folder, for a local round (created if missing).
    pub target: Option<PathBuf>,
    /// Remove from the target what the source removed (only what ferry wrote; never other files).
    #[arg(long)]
    pub delete: bool,
    /// Keep owners' numbers as they are instead of mapping them by user and group name.
    #[arg(long)]
    pub numeric_ids: bool,
    /// Leave devices, FIFOs and sockets of the source behind on purpose: without it, a round that
    /// meets one does not call the target matching (exit 3).
    #[arg(long)]
    pub skip_special: bool,
    /// Local rounds: where this pair's state (scan cache, chunk index, last manifest) lives. Default: a
    /// folder per source/target pair in `local/` under the data directory (`--data-dir`, else
    /// /var/lib/ferry for root, else ~/.local/share/ferry).
    #[arg(long, env = "FERRY_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Print one JSON report on stdout instead of the summary.
    #[arg(long)]
    pub json: bool,
    /// Network rounds: which import the destination runs once the round is committed (default: full
    /// when the destination has an import command).
    #[arg(long, value_enum)]
    pub import: Option<ImportChoice>,
    /// Network rounds: return once the round is committed, without waiting for the import.
    #[arg(long)]
    pub no_wait: bool,
    /// Network rounds: when the destination is busy with this job (a round or an import), wait for
    /// it instead of giving up.
    #[arg(long)]
    pub wait: bool,
    /// Network rounds: at most this many bytes per second on the network, e.g. 512K, 20M, off (a bare
    /// number is KiB/s, as in rsync), or a timetable in rclone's syntax (local time), e.g.
    /// "Mon-Fri 08:00,512K 19:00,20M 23:00,off" or "08:00,0 22:00,off" (0 pauses the transfer).
    /// Overrides the job's and the peer's `bwlimit` in ferry.toml; SIGHUP re-reads those while the
    /// round runs.
    #[arg(long, value_name = "RATE|TIMETABLE", value_parser = parse_timetable)]
    pub bwlimit: Option<ferry_engine::Timetable>,
    /// Network rounds: stop cleanly after this long (e.g. 8h, 90m), keeping what arrived for the next
    /// round; exits 6.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub max_duration: Option<std::time::Duration>,
    /// Scan and compare only, then print what the round would write (and, for a network round, send,
    /// and when it would be done under the bandwidth timetable). Nothing is written to the target, and
    /// a local round's state folder is left as it was.
    #[arg(short = 'n', long)]
    pub dry_run: bool,
    /// Let the round replace what is at PATH (relative to the target, or `all`) although ferry did
    /// not put it there or it was replaced since: a round otherwise leaves such an entry alone and
    /// says so (exit 3). Repeat for several paths. Local rounds; on a network round's destination,
    /// `ferry job adopt`.
    #[arg(long, value_name = "PATH|all")]
    pub adopt: Vec<String>,
    /// Network rounds: when the connection drops, keep trying to reconnect for this long (with
    /// backoff) and go on where the round was [default: 10m].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub reconnect_grace: Option<std::time::Duration>,
    /// Network rounds: try to yield to other traffic on the link (a delay-based congestion controller,
    /// after LEDBAT): the round slows down when the link's queue fills. On a shaped 20 Mbit/s link a
    /// TCP flow that starts during such a round keeps 19 Mbit/s of it (`tests/netns/low-priority.sh`).
    /// A round that starts while the link is already full cannot tell and takes its share.
    #[arg(long, conflicts_with = "congestion")]
    pub low_priority: bool,
    /// Network rounds: the congestion controller. cubic (the default) is fair and wastes nothing; for a
    /// link with random loss (radio, a bad line), lossy (cubic that ignores a loss while the link's
    /// queue is empty) keeps most of its rate, and bbr too (quinn's experimental BBR), but bbr resends
    /// much more on links with small buffers [default: cubic].
    #[arg(long, value_enum, value_name = "CONTROLLER")]
    pub congestion: Option<crate::net::Congestion>,
    /// How often a run without a terminal (cron, systemd) logs its progress, with the rate and (network
    /// rounds) an estimate of the time left. On a terminal, a live bar shows it instead; -q hides both
    /// [default: 1m].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub progress_interval: Option<std::time::Duration>,
}

impl SyncArgs {
    /// The options given that only a network round has: a local round refuses them rather than
    /// ignore them.
    pub fn network_only(&self) -> Vec<&'static str> {
        let given = [
            ("--import", self.import.is_some()),
            ("--no-wait", self.no_wait),
            ("--wait", self.wait),
            ("--bwlimit", self.bwlimit.is_some()),
            ("--max-duration", self.max_duration.is_some()),
            ("--reconnect-grace", self.reconnect_grace.is_some()),
            ("--low-priority", self.low_priority),
            ("--congestion", self.congestion.is_some()),
        ];
        given.into_iter().filter(|(_, given)| *given).map(|(name, _)| name).collect()
    }
}

fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{e} (write e.g. 8h, 90m, 30s)"))
}

fn parse_timetable(text: &str) -> Result<ferry_engine::Timetable, String> {
    ferry_engine::Timetable::parse(text).map_err(|e| e.to_string())
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

/// `ferry trust`.
#[derive(Debug, Args)]
pub struct TrustArgs {
    /// The peer's node ID, as its `ferry init` printed it.
    pub node_id: String,
    /// A name for it, used by jobs.
    #[arg(long)]
    pub name: String,
    /// Where to reach it (HOST:PORT), for a peer this node sends to.
    #[arg(long)]
    pub addr: Option<String>,
    /// Source: the bandwidth limit or timetable for rounds sent to this peer (as `sync --bwlimit`;
    /// a job's own limit wins). An empty string removes it.
    #[arg(long, value_name = "RATE|TIMETABLE")]
    pub bwlimit: Option<String>,
    /// Destination: the most this peer may send here (a rate or a timetable). An empty string
    /// removes it.
    #[arg(long, value_name = "RATE|TIMETABLE")]
    pub receive_bwlimit: Option<String>,
}

/// `ferry job`.
#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// Add or replace a job: on the source, the folder to send and to whom; on the destination, the
    /// target folder and the peer allowed to write it.
    #[command(after_help = "Examples:\n  source: ferry job add zimbra --path /opt/zimbra/backup/ng --peer dest\n  \
                            destination: ferry job add zimbra --path /srv/migration/ng --peer source")]
    Add {
        /// The job's name (the same on both nodes).
        name: String,
        /// The folder.
        #[arg(long)]
        path: PathBuf,
        /// The peer's name.
        #[arg(long)]
        peer: String,
        /// Hooks and limits.
        #[command(flatten)]
        import: ImportArgs,
    },
    /// Change a job's settings.
    #[command(
        after_help = "Example (destination):\n  ferry job set zimbra --import-cmd 'zxsuite backup doExternalRestore {target}' \\\n    \
                            --import-provisioning-cmd 'zxsuite backup doExternalRestore {target} provisioning_only TRUE'"
    )]
    Set {
        /// The job's name.
        name: String,
        /// A new folder.
        #[arg(long)]
        path: Option<PathBuf>,
        /// A new peer.
        #[arg(long)]
        peer: Option<String>,
        /// Hooks and limits.
        #[command(flatten)]
        import: ImportArgs,
    },
    /// Destination: let the next round of a job replace what is at PATH in its target (relative to it,
    /// or `all`) although ferry did not put it there or it was replaced since (the administrator's
    /// copy, a symlink): a round otherwise leaves such an entry alone and says so (exit 3). Kept until
    /// a round that applies it commits.
    #[command(after_help = "Example (destination):\n  ferry job adopt zimbra accounts/a1/items/7\n  \
                            ferry job adopt zimbra all     # whatever is at a path the source has")]
    Adopt {
        /// The job's name.
        name: String,
        /// Paths relative to the job's folder, or `all`.
        #[arg(required = true, value_name = "PATH|all")]
        paths: Vec<String>,
    },
    /// List the jobs.
    #[command(after_help = "Example:\n  ferry job list        # name, peer and folder of each job, tab-separated")]
    List,
    /// Remove a job from ferry.toml (refused while a round of it, or its import, runs here). Its state
    /// (manifests, chunk index, history) stays, so that a job added again under the name goes on from
    /// it, unless --purge.
    #[command(after_help = "Example:\n  ferry job remove zimbra            # the state stays\n  \
                            ferry job remove zimbra --purge    # the state goes too (the target's files stay)")]
    Remove {
        /// The job's name.
        name: String,
        /// Remove the job's state too (never the files of its folder).
        #[arg(long)]
        purge: bool,
    },
}

/// A job's hooks and limits.
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// Run after each committed round (destination): e.g. 'zxsuite backup doExternalRestore {target}'.
    /// Split into words like a shell would, never run through one; {target}, {job}, {round} are
    /// replaced. An empty string removes it.
    #[arg(long)]
    pub import_cmd: Option<String>,
    /// The provisioning-only variant, run for `sync --import provisioning-only`.
    #[arg(long)]
    pub import_provisioning_cmd: Option<String>,
    /// How long an import may run before it is killed (e.g. 12h, 90m). Default 24h.
    #[arg(long)]
    pub import_timeout: Option<String>,
    /// The user the import runs as (destination; default: the daemon's user).
    #[arg(long)]
    pub import_user: Option<String>,
    /// Run before each round's scan (source): e.g. 'zxsuite backup doSmartScan'. {source} and {job}
    /// are replaced; the round fails if it fails. An empty string removes it.
    #[arg(long)]
    pub export_cmd: Option<String>,
    /// The user the export command runs as (source; default: the user running `sync`).
    #[arg(long)]
    pub export_user: Option<String>,
    /// The job's bandwidth limit or timetable (source; as `sync --bwlimit`). An empty string removes it.
    #[arg(long, value_name = "RATE|TIMETABLE")]
    pub bwlimit: Option<String>,
}

/// Which import `sync` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ImportChoice {
    /// The full import (the default when the destination has one).
    Full,
    /// The provisioning-only import.
    ProvisioningOnly,
    /// No import this round.
    None,
}

/// `ferry serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Where to listen (default: the config's `listen`, else `[::]:7373`).
    #[arg(long)]
    pub listen: Option<String>,
    /// End a round whose source sends nothing for this long (while it should be sending changes or
    /// chunks); the files that arrived whole are kept. The deadline is this node's: a stalled peer cannot hold a job.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "2m")]
    pub stall_timeout: std::time::Duration,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    /// Every command an operator runs shows examples under its help.
    #[test]
    fn every_command_has_examples() {
        fn check(command: &clap::Command, path: &str) {
            let path = format!("{path} {}", command.get_name());
            if command.has_subcommands() {
                for sub in command.get_subcommands().filter(|s| s.get_name() != "help") {
                    check(sub, &path);
                }
                return;
            }
            let after = command.get_after_help().map(ToString::to_string).unwrap_or_default();
            assert!(after.starts_with("Example"), "`{path} --help` shows no example");
        }
        Cli::command().debug_assert();
        check(&Cli::command(), "");
    }
}
