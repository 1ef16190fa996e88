//! `ferry-bench`: ferry against `rsync -aH` over ssh on the same generated tree, round by round.
//!
//! ```text
//! cargo build --release -p ferry -p ferry-testkit
//! target/release/ferry-bench --files 20000 [--write bench/runs/DATE-HOST-COMMIT/rounds.md]
//! ```
//!
//! It generates a Backup-NG-like tree, then for each round (initial, no change, one day of changes, a
//! fresh export) runs `ferry sync --round` against a `ferry serve` (two processes, QUIC on loopback)
//! and `rsync -aH --stats` over ssh to an sshd it starts on loopback (rsync and openssh-server are
//! installed with apt-get when missing and this runs as root; without them, only ferry is measured).
//! For each it records wall time, CPU time and peak RSS of each process, bytes on the wire, files per
//! second, and prints a table with the ferry/rsync ratios. After the rounds it times the floor under
//! any tool's such round on the same disk: a local copy of the tree with a `syncfs` (initial), listing
//! every folder and `lstat`ing every entry (no change), and both with a copy of the changed files (one
//! day); and it counts the day's fresh random bytes, which no tool can send in fewer. Under each of
//! ferry's rounds it gives two bounds from its own figures: its CPU time over all cores, and its time
//! after the scan.
//!
//! `--fill-memory DIR` first fills the free memory with the page cache of a file in DIR, kept until the
//! end, so that the tools write into recycled memory (see `MemoryFiller`).
//!
//! More measurements, each on its own:
//! - `--single-file MIB`: one file of MIB MiB of random bytes, the initial round of each tool, in MB/s;
//! - `--read-once MIB`: ferry alone, a first round with the source in a memory cgroup of MIB MiB and
//!   the page cache dropped first: the source's reads from disk against the data, and when the first
//!   chunk left;
//! - `--memory`: ferry alone on trees of `--files` / 10 and `--files` small files (1 M for the target),
//!   the peak RSS of each process in the initial and the no-change round, and how it grows;
//! - `--shaped MBIT`: the same rounds between two network namespaces joined through a third, a router
//!   whose way to the destination `tc tbf` shapes to MBIT Mbit/s (root; it creates and removes them);
//! - `--wan`: ferry's initial round of the tree through the UDP proxy set to a 100 Mbit/s link with 50 ms
//!   of round trip and 1% loss (a 50 ms buffer), its goodput against the link's rate. (rsync's TCP
//!   cannot go through a UDP proxy; `tests/netns/` shapes real links.)

use std::time::{Duration, Instant};

use crate::args::{Args, Result};
use crate::ferry::FerryPair;
use crate::filler::MemoryFiller;
use crate::floors::{Floors, changed_since, copy_floor, durable_copy, stat_floor};
use crate::measure::{Measure, tempfile_in, tree_size};
use crate::memory::memory;
use crate::read_once::read_once;
use crate::render::render;
use crate::rsync::{Net, Rsync};
use crate::single::single_file;
use crate::wan::wan;
use clap::Parser;
use ferry_testkit::{ShapedLink, TreeGenerator, TreeSpec};

mod args;
mod ferry;
mod filler;
mod floors;
mod measure;
mod memory;
mod read_once;
mod render;
mod rsync;
mod single;
mod wan;

fn main() {
    if let Err(e) = run() {
        eprintln!("ferry-bench: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let args = Args::parse();
    if !args.ferry.exists() {
        return Err(format!("no ferry binary at {} (cargo build --release -p ferry)", args.ferry.display()).into());
    }
    let work = match &args.work {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            tempfile_in(dir)?
        }
        None => tempfile_in(&std::env::temp_dir())?,
    };
    let root = work.path().to_owned();
    let source = root.join("source");
    // Kept until the end of the run: closing it frees the file, and its pages go back to free memory.
    let _filler = args.fill_memory.as_deref().map(MemoryFiller::fill).transpose()?;
    if let Some(mib) = args.read_once {
        return read_once(&args, &root, &source, mib);
    }
    if let Some(mib) = args.single_file {
        return single_file(&args, &root, &source, mib);
    }
    if args.memory {
        return memory(&args, &root);
    }
    let started = Instant::now();
    let mut tree = TreeGenerator::create(&source, TreeSpec::with_files(args.files, args.seed))?;
    let (files, bytes) = tree_size(&source)?;
    eprintln!("generated {files} files, {} MiB, in {:.1} s", bytes >> 20, started.elapsed().as_secs_f64());

    // Kept until the end of the run: dropping it removes the namespaces.
    let link = match args.shaped {
        Some(mbit) => Some(
            ShapedLink::create(mbit, Duration::from_millis(50))?
                .ok_or("--shaped: cannot create network namespaces here (root is needed)")?,
        ),
        None => None,
    };
    let net = Net { one_core_each: args.one_core_each, ..link.as_ref().map_or_else(Net::loopback, Net::across) };
    let mut ferry = FerryPair::start(&args.ferry, &root, &source, &net)?;
    ferry.congestion.clone_from(&args.congestion);
    ferry.logs.clone_from(&args.logs);
    ferry.bwlimit.clone_from(&args.bwlimit);
    if args.wan {
        return wan(&args, &ferry, files, bytes);
    }
    let rsync = if !args.no_rsync {
        match Rsync::start(&root, &net) {
            Ok(mut rsync) => {
                rsync.bwlimit.clone_from(&args.bwlimit);
                Some(rsync)
            }
            Err(e) => {
                eprintln!("rsync over ssh is not available ({e}); measuring ferry alone");
                None
            }
        }
    } else {
        None
    };

    let mut rows: Vec<(String, Measure, Option<Measure>)> = Vec::new();
    let mut floors = Floors::default();
    let replica = root.join("floor-copy");
    let mut day_began = std::time::SystemTime::now();
    for round in ["initial", "no change", "one day of changes", "fresh export"] {
        match round {
            "one day of changes" => {
                day_began = std::time::SystemTime::now();
                floors.day_random_bytes = Some(tree.next_day()?.new_random_bytes);
            }
            "fresh export" => {
                tree.fresh_export()?;
            }
            _ => {}
        }
        // Each tool starts with nothing dirty in the page cache: ferry's syncs must not pay for the
        // other tool's (or the generator's) unwritten data.
        rustix::fs::sync();
        let ferry_round = || -> Result<Measure> {
            let f = ferry.round()?;
            rustix::fs::sync();
            Ok(f)
        };
        let rsync_round = || -> Result<Option<Measure>> {
            let r = rsync.as_ref().map(|rsync| rsync.round(&source)).transpose()?;
            rustix::fs::sync();
            Ok(r)
        };
        let (f, r) = if args.rsync_first {
            let r = rsync_round()?;
            (ferry_round()?, r)
        } else {
            let f = ferry_round()?;
            (f, rsync_round()?)
        };
        eprintln!("{round}: ferry {:.2} s, rsync {:?}", f.wall.as_secs_f64(), r.as_ref().map(|r| r.wall));
        rows.push((round.to_owned(), f, r));
        // Right after both tools' rounds: the same warm caches.
        match round {
            "initial" => floors.initial = Some(copy_floor(&source, &replica)?),
            "no change" => floors.no_change = Some(stat_floor(&source)?),
            "one day of changes" => {
                let changed = changed_since(&source, day_began)?;
                rustix::fs::sync();
                let stat = stat_floor(&source)?;
                let (copy, sync) = durable_copy(&source, &replica, &changed)?;
                floors.day = Some((stat, copy, sync, changed.len()));
            }
            _ => {}
        }
    }
    drop(ferry);

    let table = render(&args, files, bytes, &rows, &floors);
    print!("{table}");
    if let Some(path) = &args.write {
        std::fs::write(path, table)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
