//! The command line.

use std::path::PathBuf;

use clap::Parser;

pub(crate) type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// ferry against `rsync -aH` over ssh on the same generated tree, round by round; or, with one of
/// `--single-file`, `--memory` or `--wan`, one measurement of its own.
#[derive(Debug, Parser)]
#[command(name = "ferry-bench")]
pub(crate) struct Args {
    /// Files in the generated tree.
    #[arg(long, default_value_t = 20_000)]
    pub(crate) files: usize,
    /// The generator's seed.
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,
    /// Also write the report to FILE (Markdown), e.g. `bench/runs/DATE-HOST-COMMIT/rounds.md`.
    #[arg(long, value_name = "FILE")]
    pub(crate) write: Option<PathBuf>,
    /// Where the trees go (a scratch folder is made inside it); default: the temporary folder.
    #[arg(long, value_name = "DIR")]
    pub(crate) work: Option<PathBuf>,
    /// The ferry binary to measure; default: `ferry` beside this one.
    #[arg(long, value_name = "PATH", default_value_os_t = default_ferry())]
    pub(crate) ferry: PathBuf,
    /// Measure ferry alone.
    #[arg(long)]
    pub(crate) no_rsync: bool,
    /// One file of MIB MiB of random bytes, the initial round of each tool, in MB/s.
    #[arg(long, value_name = "MIB", conflicts_with_all = ["memory", "wan"])]
    pub(crate) single_file: Option<u64>,
    /// ferry alone, a first round of `--files` files (or with `--single-file`, of that one file) with
    /// the source in a memory cgroup of MIB MiB (root, cgroup v1; the page cache dropped first): its
    /// reads from disk against the data, and when its first chunk left.
    #[arg(long, value_name = "MIB", conflicts_with_all = ["memory", "wan"])]
    pub(crate) read_once: Option<u64>,
    /// ferry alone on trees of `--files` / 10 and `--files` small files: the peak RSS of each process.
    #[arg(long, conflicts_with = "wan")]
    pub(crate) memory: bool,
    /// Run the rounds between two network namespaces joined through a router namespace, its way to the
    /// destination shaped by `tc tbf` to MBIT Mbit/s (root).
    #[arg(long, value_name = "MBIT")]
    pub(crate) shaped: Option<u32>,
    /// ferry's initial round through the UDP proxy set to a 100 Mbit/s link with 50 ms of round trip.
    #[arg(long)]
    pub(crate) wan: bool,
    /// `--wan`'s random loss, percent.
    #[arg(long, default_value_t = 1.0, value_name = "PERCENT")]
    pub(crate) loss: f64,
    /// `ferry sync --congestion`.
    #[arg(long, default_value = "cubic", value_parser = ["cubic", "lossy", "bbr"])]
    pub(crate) congestion: String,
    /// Both tools' own bandwidth limit in the rounds (`ferry sync --bwlimit`, `rsync --bwlimit`; the
    /// same syntax, 1024-based).
    #[arg(long, value_name = "RATE")]
    pub(crate) bwlimit: Option<String>,
    /// Keep both nodes' logs in DIR, and each round's `--json` report (appended, run after run).
    #[arg(long, value_name = "DIR")]
    pub(crate) logs: Option<PathBuf>,
    /// In each round, rsync's before ferry's (the first tool after the generator can pay for the
    /// machine's memory; see `--fill-memory`).
    #[arg(long)]
    pub(crate) rsync_first: bool,
    /// Fill the page cache with a file in DIR before the run, as on a server that has been up a while.
    #[arg(long, value_name = "DIR")]
    pub(crate) fill_memory: Option<PathBuf>,
    /// The rounds with each side on a CPU of its own (the source's processes on CPU 0, the
    /// destination's on CPU 1; `taskset`), as between two machines: what one side does beside the
    /// other no longer takes the other's core.
    #[arg(long)]
    pub(crate) one_core_each: bool,
}

impl Args {
    /// `--fill-memory DIR` and `--one-core-each` as given, for the command lines the reports print
    /// (empty without them).
    pub(crate) fn extra_flags(&self) -> String {
        let fill = self.fill_memory.as_ref().map_or(String::new(), |dir| format!(" --fill-memory {}", dir.display()));
        if self.one_core_each { fill + " --one-core-each" } else { fill }
    }
}

/// `ferry` beside this binary (both are built into the same folder).
fn default_ferry() -> PathBuf {
    std::env::current_exe().map_or_else(|_| PathBuf::from("ferry"), |exe| exe.with_file_name("ferry"))
}
