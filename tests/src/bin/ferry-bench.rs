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
//! - `--memory`: ferry alone on trees of `--files` / 10 and `--files` small files (1 M for the target),
//!   the peak RSS of each process in the initial and the no-change round, and how it grows;
//! - `--shaped MBIT`: the same rounds between two network namespaces joined through a third, a router
//!   whose way to the destination `tc tbf` shapes to MBIT Mbit/s (root; it creates and removes them);
//! - `--wan`: ferry's initial round of the tree through the UDP proxy set to a 100 Mbit/s link with 50 ms
//!   of round trip and 1% loss (a 50 ms buffer), its goodput against the link's rate. (rsync's TCP
//!   cannot go through a UDP proxy; `tests/netns/` shapes real links.)

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_testkit::{ShapedLink, TreeGenerator, TreeSpec};

fn main() {
    if let Err(e) = run() {
        eprintln!("ferry-bench: {e}");
        std::process::exit(1);
    }
}

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

struct Args {
    files: usize,
    seed: u64,
    write: Option<PathBuf>,
    work: Option<PathBuf>,
    ferry: PathBuf,
    rsync: bool,
    single_file: Option<u64>,
    memory: bool,
    /// `--shaped MBIT`: run the rounds between two network namespaces joined through a router
    /// namespace, its way to the destination shaped by `tc tbf` to this rate.
    shaped: Option<u32>,
    wan: bool,
    /// `--wan`'s random loss, percent.
    loss: f64,
    /// `ferry sync --congestion`.
    congestion: String,
    /// `--bwlimit RATE`: both tools' own bandwidth limit in the rounds (`ferry sync --bwlimit`, `rsync
    /// --bwlimit`; the same syntax, 1024-based).
    bwlimit: Option<String>,
    /// `--logs DIR`: keep both nodes' logs there, and each round's `--json` report (appended, run after
    /// run).
    logs: Option<PathBuf>,
    /// `--rsync-first`: in each round, rsync's before ferry's (the first tool after the generator can
    /// pay for the machine's memory; see `--fill-memory`).
    rsync_first: bool,
    /// `--fill-memory DIR`: fill the page cache with a file in DIR before the run (see [`MemoryFiller`]).
    fill_memory: Option<PathBuf>,
}

impl Args {
    /// `--fill-memory DIR` as given, for the command lines the reports print (empty without it).
    fn fill_memory_flag(&self) -> String {
        self.fill_memory.as_ref().map_or(String::new(), |dir| format!(" --fill-memory {}", dir.display()))
    }
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        files: 20_000,
        seed: 1,
        write: None,
        work: None,
        ferry: std::env::current_exe()?.with_file_name("ferry"),
        rsync: true,
        single_file: None,
        memory: false,
        shaped: None,
        wan: false,
        loss: 1.0,
        congestion: "cubic".into(),
        bwlimit: None,
        logs: None,
        rsync_first: false,
        fill_memory: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--files" => args.files = value()?.parse()?,
            "--seed" => args.seed = value()?.parse()?,
            "--write" => args.write = Some(value()?.into()),
            "--work" => args.work = Some(value()?.into()),
            "--ferry" => args.ferry = value()?.into(),
            "--no-rsync" => args.rsync = false,
            "--single-file" => args.single_file = Some(value()?.parse()?),
            "--memory" => args.memory = true,
            "--shaped" => args.shaped = Some(value()?.parse()?),
            "--wan" => args.wan = true,
            "--loss" => args.loss = value()?.parse()?,
            "--congestion" => args.congestion = value()?,
            "--bwlimit" => args.bwlimit = Some(value()?),
            "--logs" => args.logs = Some(value()?.into()),
            "--rsync-first" => args.rsync_first = true,
            "--fill-memory" => args.fill_memory = Some(value()?.into()),
            "-h" | "--help" => {
                println!(
                    "ferry-bench [--files N] [--seed S] [--write FILE.md] [--work DIR] [--ferry PATH] [--no-rsync] \
                     [--congestion cubic|lossy|bbr] [--bwlimit RATE] [--logs DIR] [--rsync-first] [--fill-memory DIR] [--shaped MBIT] [--single-file MIB | --memory | --wan [--loss PERCENT]]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} (see --help)").into()),
        }
    }
    Ok(args)
}

/// What one tool did in one round.
#[derive(Debug, Clone, Default)]
struct Measure {
    wall: Duration,
    /// CPU seconds of the sending side (`ferry sync`; local `rsync` with its `ssh`).
    cpu_send: f64,
    /// CPU seconds of the receiving side (`ferry serve`; the remote `rsync --server` processes).
    cpu_recv: f64,
    /// ferry only: of `wall`, the source's scan (its report's `scan_ms`).
    scan: Option<Duration>,
    /// ferry only: how long the destination waited for its disk's syncs (from its log).
    sync_wait: Option<Duration>,
    /// ferry only: how long the destination's check of its target took (from its log; it runs
    /// beside the exchange of changes).
    check: Option<Duration>,
    /// Peak RSS in KiB of each side.
    rss_send: u64,
    rss_recv: u64,
    /// Bytes on the wire: ferry's UDP payloads both ways; rsync's own count of bytes both ways (ssh's
    /// encryption and TCP/IP headers not included, which favours rsync).
    wire: u64,
}

fn run() -> Result<()> {
    let args = parse_args()?;
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
    let net = link.as_ref().map_or_else(Net::loopback, Net::across);
    let mut ferry = FerryPair::start(&args.ferry, &root, &source, &net)?;
    ferry.congestion.clone_from(&args.congestion);
    ferry.logs.clone_from(&args.logs);
    ferry.bwlimit.clone_from(&args.bwlimit);
    if args.wan {
        return wan(&args, &ferry, files, bytes);
    }
    let rsync = if args.rsync {
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

/// What any tool must at least do in a round, measured on the same tree and disk in the same run.
#[derive(Default)]
struct Floors {
    /// The initial round: the tree copied on the same disk, and the sync after it.
    initial: Option<(Duration, Duration)>,
    /// The no-change round: listing and `lstat`ing the tree.
    no_change: Option<Duration>,
    /// The day: listing and `lstat`ing the tree, then copying the changed files (how many: the last
    /// field) over the initial copy, and the sync after it.
    day: Option<(Duration, Duration, Duration, usize)>,
    /// The day's fresh random content, which no tool can send in fewer bytes.
    day_random_bytes: Option<u64>,
}

/// The floor under the initial round of any tool that makes what it writes durable: the tree copied
/// to `replica` on the same disk, with no network, hashing or comparison (folders, then files on as
/// many threads as there are cores, the kernel moving their bytes, then hard links and symlinks),
/// and one `syncfs` after it. How long the copy took, and the sync.
fn copy_floor(source: &Path, replica: &Path) -> Result<(Duration, Duration)> {
    use std::collections::HashMap;
    use std::os::unix::fs::MetadataExt;
    let started = Instant::now();
    let (mut files, mut links, mut symlinks) = (Vec::new(), Vec::new(), Vec::new());
    let mut first_link: HashMap<(u64, u64), PathBuf> = HashMap::new();
    std::fs::create_dir(replica)?;
    walk(source, |rel, entry, kind| {
        if kind.is_dir() {
            std::fs::create_dir(replica.join(rel))?;
        } else if kind.is_symlink() {
            symlinks.push(rel.to_owned());
        } else if kind.is_file() {
            let meta = entry.metadata()?;
            if meta.nlink() > 1 {
                if let Some(first) = first_link.get(&(meta.dev(), meta.ino())) {
                    links.push((first.clone(), rel.to_owned()));
                    return Ok(());
                }
                first_link.insert((meta.dev(), meta.ino()), rel.to_owned());
            }
            files.push(rel.to_owned());
        }
        Ok(())
    })?;
    copy_files(source, replica, &files)?;
    for (first, rel) in links {
        std::fs::hard_link(replica.join(first), replica.join(rel))?;
    }
    for rel in symlinks {
        std::os::unix::fs::symlink(std::fs::read_link(source.join(&rel))?, replica.join(rel))?;
    }
    let copy = started.elapsed();
    let sync = sync_filesystem(replica)?;
    eprintln!("copy floor: {} files in {:.2} s, sync {:.2} s", files.len(), copy.as_secs_f64(), sync.as_secs_f64());
    Ok((copy, sync))
}

/// The regular files under `root` whose inode changed at or after `since` (relative paths).
fn changed_since(root: &Path, since: std::time::SystemTime) -> Result<Vec<PathBuf>> {
    use std::os::unix::fs::MetadataExt;
    let since = since.duration_since(std::time::UNIX_EPOCH)?;
    let mut changed = Vec::new();
    walk(root, |rel, entry, kind| {
        if kind.is_file() {
            let meta = entry.metadata()?;
            if Duration::new(meta.ctime() as u64, meta.ctime_nsec() as u32) >= since {
                changed.push(rel.to_owned());
            }
        }
        Ok(())
    })?;
    Ok(changed)
}

/// Calls `visit` with every entry under `root` (its path relative to `root`, the entry, its type), a
/// folder before what is in it.
fn walk(
    root: &Path,
    mut visit: impl FnMut(&Path, &std::fs::DirEntry, std::fs::FileType) -> std::io::Result<()>,
) -> Result<()> {
    let mut stack = vec![PathBuf::new()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(root.join(&dir))? {
            let entry = entry?;
            let rel = dir.join(entry.file_name());
            let kind = entry.file_type()?;
            visit(&rel, &entry, kind)?;
            if kind.is_dir() {
                stack.push(rel);
            }
        }
    }
    Ok(())
}

/// Copies `files` from `source` over their copies in `replica` (making each folder they need once),
/// then syncs the filesystem. How long the copy took, and the sync.
fn durable_copy(source: &Path, replica: &Path, files: &[PathBuf]) -> Result<(Duration, Duration)> {
    let started = Instant::now();
    let folders: std::collections::BTreeSet<&Path> = files.iter().filter_map(|rel| rel.parent()).collect();
    for folder in folders {
        std::fs::create_dir_all(replica.join(folder))?;
    }
    copy_files(source, replica, files)?;
    let copy = started.elapsed();
    Ok((copy, sync_filesystem(replica)?))
}

/// Copies `files` from `source` to `replica` on as many threads as there are cores (`std::fs::copy`:
/// the kernel moves the bytes with `copy_file_range`).
fn copy_files(source: &Path, replica: &Path, files: &[PathBuf]) -> Result<()> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let next = AtomicUsize::new(0);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| -> std::io::Result<()> {
                    while let Some(rel) = files.get(next.fetch_add(1, Ordering::Relaxed)) {
                        std::fs::copy(source.join(rel), replica.join(rel))?;
                    }
                    Ok(())
                })
            })
            .collect();
        for worker in workers {
            worker.join().map_err(|_| "a copying thread panicked")??;
        }
        Ok(())
    })
}

/// `syncfs` of the filesystem holding `path`, timed.
fn sync_filesystem(path: &Path) -> Result<Duration> {
    let started = Instant::now();
    rustix::fs::syncfs(std::fs::File::open(path)?)?;
    Ok(started.elapsed())
}

/// The floor under any tool's round with no change: listing every folder and `lstat`ing every entry in
/// it (each relative to its open folder, on as many threads as there are cores besides the one that
/// lists), and nothing else: no comparison, no output.
fn stat_floor(root: &Path) -> Result<Duration> {
    use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags};
    use std::os::fd::OwnedFd;
    use std::sync::{Arc, Mutex};
    let open = |dir: &OwnedFd, name: &std::ffi::CStr| {
        rustix::fs::openat(dir, name, OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())
    };
    let started = Instant::now();
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let (tx, rx) = std::sync::mpsc::sync_channel::<(Arc<OwnedFd>, Vec<std::ffi::CString>)>(64);
    let rx = Arc::new(Mutex::new(rx));
    let stats = std::thread::scope(|scope| -> Result<u64> {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                let rx = rx.clone();
                scope.spawn(move || {
                    let mut stats = 0u64;
                    loop {
                        let Some((dir, names)) = rx.lock().ok().and_then(|rx| rx.recv().ok()) else { break };
                        for name in names {
                            stats += u64::from(rustix::fs::statat(&*dir, &*name, AtFlags::SYMLINK_NOFOLLOW).is_ok());
                        }
                    }
                    stats
                })
            })
            .collect();
        let root = rustix::fs::open(root, OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?;
        let mut folders = vec![Arc::new(root)];
        while let Some(dir) = folders.pop() {
            let mut names = Vec::new();
            for entry in Dir::read_from(&*dir)? {
                let entry = entry?;
                let name = entry.file_name();
                if name == c"." || name == c".." {
                    continue;
                }
                if entry.file_type() == FileType::Directory {
                    folders.push(Arc::new(open(&dir, name)?));
                }
                names.push(name.to_owned());
            }
            tx.send((dir, names))?;
        }
        drop(tx);
        Ok(workers.into_iter().map(|w| w.join().unwrap_or(0)).sum())
    })?;
    let took = started.elapsed();
    eprintln!("stat floor: {stats} entries in {:.2} s", took.as_secs_f64());
    Ok(took)
}

/// One large file of random bytes, the initial round of each tool.
fn single_file(args: &Args, root: &Path, source: &Path, mib: u64) -> Result<()> {
    use rand::{RngExt, SeedableRng};
    std::fs::create_dir_all(source)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(args.seed);
    let mut file = std::io::BufWriter::new(std::fs::File::create(source.join("blob"))?);
    let mut block = vec![0u8; 8 << 20];
    for _ in 0..mib.div_ceil(8) {
        rng.fill(&mut block[..]);
        file.write_all(&block)?;
    }
    file.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    let bytes = mib.div_ceil(8) * (8 << 20);
    let mut ferry = FerryPair::start(&args.ferry, root, source, &Net::loopback())?;
    ferry.congestion.clone_from(&args.congestion);
    ferry.logs.clone_from(&args.logs);
    let rsync = if args.rsync {
        Rsync::start(root, &Net::loopback()).map_err(|e| eprintln!("no rsync: {e}")).ok()
    } else {
        None
    };
    rustix::fs::sync();
    let f = ferry.round()?;
    rustix::fs::sync();
    let r = match &rsync {
        Some(rsync) => Some(rsync.round(source)?),
        None => None,
    };
    let mut out = format!(
        "One file of {} MiB of random bytes, initial round (`ferry-bench --single-file {mib}{}`):\n\n\
         | tool | wall s | of which scan s | MB/s | CPU send/recv s | RSS send/recv MiB | wire bytes |\n\
         |---|---:|---:|---:|---:|---:|---:|\n",
        bytes >> 20,
        args.fill_memory_flag(),
    );
    for (tool, m) in [("ferry", Some(&f)), ("rsync", r.as_ref())] {
        let Some(m) = m else { continue };
        out.push_str(&format!(
            "| {tool} | {:.2} | {} | {:.0} | {:.2} / {:.2} | {} / {} | {} |\n",
            m.wall.as_secs_f64(),
            m.scan.map_or(String::new(), |d| format!("{:.2}", d.as_secs_f64())),
            bytes as f64 / m.wall.as_secs_f64() / 1e6,
            m.cpu_send,
            m.cpu_recv,
            m.rss_send >> 10,
            m.rss_recv >> 10,
            m.wire
        ));
    }
    // The floors: reading the file once from the page cache, and writing it durably on this disk.
    let (read, write) = disk_floor(&source.join("blob"), &root.join("floor"))?;
    out.push_str(&format!(
        "\nOn the same disk in the same run: reading the file (cached) {:.0} MB/s; copying it and syncing \
         the copy (`cp` + fsync, what any durable transfer must at least do) {:.0} MB/s.\n",
        bytes as f64 / read.as_secs_f64() / 1e6,
        bytes as f64 / write.as_secs_f64() / 1e6
    ));
    out.push('\n');
    out.push_str(&single_file_bounds(&f, bytes, std::thread::available_parallelism().map_or(2, |n| n.get())));
    print!("{out}");
    if let Some(path) = &args.write {
        std::fs::write(path, out)?;
    }
    Ok(())
}

/// The bounds under ferry's round of one file of `bytes`, from its own figures, as rates.
fn single_file_bounds(ferry: &Measure, bytes: u64, cores: usize) -> String {
    let rate = |took: Duration| bytes as f64 / took.as_secs_f64().max(1e-9) / 1e6;
    let bounds = Bounds::of(ferry, cores);
    let mut text = format!(
        "Bounds under ferry's round, from its figures: its two processes used {:.2} CPU-seconds, at least \
         {:.2} s on {cores} cores, so at most {:.0} MB/s without using less CPU",
        bounds.cpu,
        bounds.on_cores.as_secs_f64(),
        rate(bounds.on_cores),
    );
    if let Some((scan, after_scan)) = bounds.after_scan {
        text.push_str(&format!(
            "; after its {:.2} s scan the round took {:.2} s, {:.0} MB/s (what hiding the scan entirely would \
             leave)",
            scan.as_secs_f64(),
            after_scan.as_secs_f64(),
            rate(after_scan),
        ));
    }
    text + ".\n"
}

/// How long reading `file` takes, and copying it to `copy` with an fsync of the copy.
fn disk_floor(file: &Path, copy: &Path) -> Result<(Duration, Duration)> {
    let started = Instant::now();
    std::io::copy(&mut std::fs::File::open(file)?, &mut std::io::sink())?;
    let read = started.elapsed();
    rustix::fs::sync();
    let started = Instant::now();
    std::fs::copy(file, copy)?;
    std::fs::File::open(copy)?.sync_all()?;
    let write = started.elapsed();
    std::fs::remove_file(copy)?;
    Ok((read, write))
}

/// Peak memory of each ferry process against the number of files: trees of `--files` / 10 and
/// `--files` small files (300 to 700 bytes, each different, 1,000 to a folder), an initial round then
/// a no-change round on each.
fn memory(args: &Args, root: &Path) -> Result<()> {
    let large = args.files;
    let mut rows = Vec::new();
    for files in [large / 10, large] {
        let dir = root.join(format!("memory-{files}"));
        let source = dir.join("source");
        let started = Instant::now();
        small_files(&source, files, args.seed)?;
        eprintln!("generated {files} small files in {:.1} s", started.elapsed().as_secs_f64());
        let mut ferry = FerryPair::start(&args.ferry, &dir, &source, &Net::loopback())?;
        ferry.congestion.clone_from(&args.congestion);
        ferry.logs.clone_from(&args.logs);
        for round in ["initial", "no change"] {
            rustix::fs::sync();
            let m = ferry.round()?;
            eprintln!(
                "{files} files, {round}: {:.1} s, RSS {} / {} MiB",
                m.wall.as_secs_f64(),
                m.rss_send >> 10,
                m.rss_recv >> 10
            );
            rows.push((files, round, m));
        }
        drop(ferry);
        // Not deleted before the next tree: on an ext4 without a journal, inodes freed less than a
        // minute ago are skipped one by one when new ones are allocated.
    }
    let mut out = format!(
        "Peak RSS of each ferry process against the tree's size (`ferry-bench --memory --files {large}`): \
         small files of 300 to 700 bytes, each different, 1,000 to a folder.\n\n\
         | files | round | wall s | files/s | RSS send MiB | RSS recv MiB |\n|---:|---|---:|---:|---:|---:|\n"
    );
    for (files, round, m) in &rows {
        out.push_str(&format!(
            "| {files} | {round} | {:.1} | {:.0} | {} | {} |\n",
            m.wall.as_secs_f64(),
            *files as f64 / m.wall.as_secs_f64(),
            m.rss_send >> 10,
            m.rss_recv >> 10
        ));
    }
    let peak = |files: usize, send: bool| {
        rows.iter()
            .filter(|(f, _, _)| *f == files)
            .map(|(_, _, m)| if send { m.rss_send } else { m.rss_recv })
            .max()
            .unwrap_or(0)
    };
    for (side, send) in [("sending", true), ("receiving", false)] {
        let (small, big) = (peak(large / 10, send), peak(large, send));
        out.push_str(&format!(
            "\n{side} side: peak {} MiB at {} files, {} MiB at {large} files ({:.2}x).",
            small >> 10,
            large / 10,
            big >> 10,
            big as f64 / small.max(1) as f64
        ));
    }
    out.push('\n');
    print!("{out}");
    if let Some(path) = &args.write {
        std::fs::write(path, out)?;
    }
    // Both nodes' copies of both trees go when `run` returns, which takes minutes at a million files:
    // a benchmark started before this command ends shares the disk with the deletion.
    eprintln!(
        "removing the trees ({} files on each side); the disk is busy until this command ends",
        large + large / 10
    );
    Ok(())
}

/// `files` small files under `root`, 1,000 to a folder, each with different contents.
fn small_files(root: &Path, files: usize, seed: u64) -> Result<()> {
    use rand::{RngExt, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut body = vec![0u8; 700];
    for i in 0..files {
        let dir = root.join(format!("accounts/{:04}/msg", i / 1000));
        if i % 1000 == 0 {
            std::fs::create_dir_all(&dir)?;
        }
        let len = 300 + (i * 7919) % 400;
        rng.fill(&mut body[..len]);
        std::fs::write(dir.join(format!("{i}.msg")), &body[..len])?;
    }
    Ok(())
}

/// ferry's initial round through a 100 Mbit/s link with 50 ms of round trip and 1% loss, and an
/// Ethernet MTU: the link drops datagrams of more than 1472 bytes, as a WAN path would.
fn wan(args: &Args, ferry: &FerryPair, files: u64, bytes: u64) -> Result<()> {
    const RATE: u64 = 100_000_000 / 8;
    let proxy = ferry_testkit::UdpProxy::start(ferry.daemon_addr.parse()?)?;
    proxy.set(ferry_testkit::Impairment {
        rate: Some(RATE),
        delay: Duration::from_millis(25),
        loss: args.loss / 100.0,
        queue: Duration::from_millis(50),
        max_datagram: Some(1472),
        ..ferry_testkit::Impairment::default()
    });
    ferry.point_at(&proxy.addr().to_string())?;
    rustix::fs::sync();
    // What reached the destination each second: where the link sat idle, or was not full.
    let done = std::sync::atomic::AtomicBool::new(false);
    let (m, per_second) = std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let mut per_second = Vec::new();
            let mut last = proxy.bytes().0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_secs(1));
                let now = proxy.bytes().0;
                per_second.push((now - last) * 8 / 1_000_000);
                last = now;
            }
            per_second
        });
        let m = ferry.round();
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        (m, sampler.join().unwrap_or_default())
    });
    let m = m?;
    let per_second: Vec<String> = per_second.iter().map(u64::to_string).collect();
    let goodput = bytes as f64 * 8.0 / m.wall.as_secs_f64() / 1e6;
    // The link is idle while the source scans (reads and hashes) its tree: goodput after the scan.
    let after_scan = m.wall.saturating_sub(m.scan.unwrap_or_default());
    let transfer_goodput = bytes as f64 * 8.0 / after_scan.as_secs_f64() / 1e6;
    let (up, down) = proxy.bytes();
    let out = format!(
        "ferry's initial round through the UDP proxy as a 100 Mbit/s link, 50 ms RTT, {}% loss, 50 ms buffer \
         (`ferry-bench --wan --loss {} --congestion {} --files {}`): {files} files, {} MiB in {:.1} s: goodput {goodput:.1} Mbit/s, \
         {:.0}% of the link; after the scan ({:.1} s): {transfer_goodput:.1} Mbit/s, {:.0}% of the link; \
         {} bytes through the proxy (to the destination {up}, back {down}), bytes_on_wire {}.\n\
         Mbit/s to the destination, second by second: {}.\n",
        args.loss,
        args.loss,
        args.congestion,
        args.files,
        bytes >> 20,
        m.wall.as_secs_f64(),
        goodput,
        m.scan.unwrap_or_default().as_secs_f64(),
        transfer_goodput,
        up + down,
        m.wire,
        per_second.join(" ")
    );
    print!("{out}");
    if let Some(path) = &args.write {
        std::fs::write(path, out)?;
    }
    Ok(())
}

/// A file that fills the machine's free memory with page cache, so that the tools write into memory
/// the kernel takes back from that cache rather than into free pages.
///
/// On a virtual machine whose balloon reports free pages to its host (`virtio_balloon` with
/// `page_reporting`, as here), a free page, once reported, costs a fault on the host the next time it
/// is written: writing 4 GiB into the page cache took 8 s of system time then, against 1.2 s
/// when the same memory had just been used. Whichever tool
/// wrote first after the generator paid for it. A server that has been up for a while has its memory
/// full of cache; this is that state.
struct MemoryFiller {
    /// Unnamed (removed as soon as created), so that nothing is left on the disk however the run
    /// ends; its pages stay cached while it is open.
    _file: std::fs::File,
}

impl MemoryFiller {
    /// Writes a file in `dir` as large as the free memory less 2 GiB (at most what `dir`'s disk has
    /// free less 2 GiB), and syncs it, so that its pages are clean cache the kernel can drop at once.
    fn fill(dir: &Path) -> Result<Self> {
        let meminfo = std::fs::read_to_string("/proc/meminfo")?;
        let free_kib: u64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemFree:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or("--fill-memory: no MemFree in /proc/meminfo")?;
        let disk = rustix::fs::statvfs(dir)?;
        let room = disk.f_bavail * disk.f_frsize;
        let size = (free_kib << 10).min(room).saturating_sub(2 << 30);
        let started = Instant::now();
        let mut file = tempfile::tempfile_in(dir)?;
        let block = vec![0u8; 8 << 20];
        let mut written = 0;
        while written < size {
            let n = block.len().min((size - written) as usize);
            file.write_all(&block[..n])?;
            written += n as u64;
        }
        file.sync_all()?;
        eprintln!(
            "filled the page cache with {:.1} GiB (an unnamed file in {}) in {:.1} s",
            size as f64 / f64::from(1 << 30),
            dir.display(),
            started.elapsed().as_secs_f64()
        );
        Ok(Self { _file: file })
    }
}

fn tempfile_in(dir: &Path) -> Result<tempfile::TempDir> {
    Ok(tempfile::Builder::new().prefix("ferry-bench-").tempdir_in(dir)?)
}

fn tree_size(root: &Path) -> Result<(u64, u64)> {
    let (mut files, mut bytes) = (0, 0);
    walk(root, |_, entry, kind| {
        if kind.is_file() {
            files += 1;
            bytes += entry.metadata()?.len();
        }
        Ok(())
    })?;
    Ok((files, bytes))
}

/// CPU seconds of this process's waited-for children (`cutime + cstime` in `/proc/self/stat`).
fn children_cpu() -> f64 {
    proc_stat_times("self", 13).unwrap_or(0.0)
}

/// CPU seconds of `pid` itself (`utime + stime`).
fn process_cpu(pid: u32) -> f64 {
    proc_stat_times(&pid.to_string(), 11).unwrap_or(0.0)
}

/// Two consecutive times from `/proc/PID/stat`, starting at field `first` (0-based after the name).
fn proc_stat_times(pid: &str, first: usize) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = rustix::param::clock_ticks_per_second() as f64;
    Some((fields.get(first)?.parse::<f64>().ok()? + fields.get(first + 1)?.parse::<f64>().ok()?) / ticks)
}

/// Peak RSS (VmHWM) of a process, KiB.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Waits for `child`, sampling the peak RSS of it and its descendants; returns the output and the
/// largest peak seen.
fn wait_sampling(mut child: Child) -> Result<(std::process::Output, u64)> {
    let pid = child.id();
    let mut peak = 0;
    let stdout = child.stdout.take();
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        if let Some(mut stdout) = stdout {
            let _ = std::io::Read::read_to_end(&mut stdout, &mut out);
        }
        out
    });
    loop {
        peak = peak.max(peak_rss(pid)).max(descendants(pid).into_iter().map(peak_rss).max().unwrap_or(0));
        if child.try_wait()?.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = child.wait()?;
    let stdout = reader.join().map_err(|_| "reader panicked")?;
    Ok((std::process::Output { status, stdout, stderr: Vec::new() }, peak))
}

fn descendants(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut stack = vec![pid];
    while let Some(p) = stack.pop() {
        let children = std::fs::read_to_string(format!("/proc/{p}/task/{p}/children")).unwrap_or_default();
        for child in children.split_whitespace().filter_map(|c| c.parse().ok()) {
            out.push(child);
            stack.push(child);
        }
    }
    out
}

/// Two ferry nodes: a daemon and the source's config.
struct FerryPair {
    bin: PathBuf,
    /// The daemon's log (its stderr).
    daemon_log: PathBuf,
    net: Net,
    source_node: PathBuf,
    daemon: Child,
    daemon_addr: String,
    daemon_id: String,
    congestion: String,
    /// `ferry sync --bwlimit`, if any.
    bwlimit: Option<String>,
    /// Where to keep the nodes' logs (`--logs`); otherwise the source's go nowhere.
    logs: Option<PathBuf>,
}

impl FerryPair {
    fn start(bin: &Path, root: &Path, source: &Path, net: &Net) -> Result<Self> {
        let (src, dst) = (root.join("ferry-source"), root.join("ferry-dest"));
        let ferry = |node: &Path, args: &[&str]| -> Result<String> {
            let out = Command::new(bin).arg("--config-dir").arg(node).args(args).output()?;
            if !out.status.success() {
                return Err(format!("ferry {args:?}: {}", String::from_utf8_lossy(&out.stderr)).into());
            }
            Ok(String::from_utf8(out.stdout)?)
        };
        let src_id = ferry(&src, &["init"])?.lines().next().unwrap_or_default().to_owned();
        let dst_id = ferry(&dst, &["init"])?.lines().next().unwrap_or_default().to_owned();
        ferry(&dst, &["trust", &src_id, "--name", "source"])?;
        let target = root.join("ferry-target");
        ferry(&dst, &["job", "add", "bench", "--path", &target.to_string_lossy(), "--peer", "source"])?;
        let mut daemon = net
            .dest_command(bin)
            .arg("--config-dir")
            .arg(&dst)
            .args(["serve", "--listen", &format!("{}:0", net.dest_host)])
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(root.join("ferry-dest.log"))?)
            .spawn()?;
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(daemon.stdout.take().ok_or("no daemon stdout")?),
            &mut line,
        )?;
        let addr = line.split_whitespace().nth(2).ok_or("the daemon did not say where it listens")?.to_owned();
        ferry(&src, &["trust", &dst_id, "--name", "dest", "--addr", &addr])?;
        ferry(&src, &["job", "add", "bench", "--path", &source.to_string_lossy(), "--peer", "dest"])?;
        Ok(Self {
            bin: bin.to_owned(),
            daemon_log: root.join("ferry-dest.log"),
            net: net.clone(),
            source_node: src,
            daemon,
            daemon_addr: addr,
            daemon_id: dst_id,
            congestion: "cubic".into(),
            bwlimit: None,
            logs: None,
        })
    }

    /// The destination's wait for its syncs in the last round, from its log line "applied N files (B) in
    /// S s, W s of it waiting for the disk's syncs".
    fn last_sync_wait(&self) -> Option<Duration> {
        let log = std::fs::read_to_string(&self.daemon_log).ok()?;
        let line = log.lines().rev().find(|l| l.ends_with("s of it waiting for the disk's syncs"))?;
        let seconds = line.rsplit(", ").next()?.split_whitespace().next()?.parse().ok()?;
        Some(Duration::from_secs_f64(seconds))
    }

    /// The destination's check of its target in the last round, from its log line "checked N entries
    /// of PATH in M ms" (absent from builds before the check).
    fn last_check(&self) -> Option<Duration> {
        let log = std::fs::read_to_string(&self.daemon_log).ok()?;
        let line = log.lines().rev().find(|l| l.contains(" checked ") && l.ends_with(" ms"))?;
        let ms = line.rsplit(" in ").next()?.split_whitespace().next()?.parse().ok()?;
        Some(Duration::from_millis(ms))
    }

    /// Where `ferry sync` writes its log: appended to `--logs DIR`/ferry-source.log, or nowhere.
    fn source_log(&self) -> Result<Stdio> {
        let Some(dir) = &self.logs else { return Ok(Stdio::null()) };
        std::fs::create_dir_all(dir)?;
        let file = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("ferry-source.log"))?;
        Ok(file.into())
    }

    /// Sends the source's rounds to `addr` (a proxy in front of the daemon).
    fn point_at(&self, addr: &str) -> Result<()> {
        let out = Command::new(&self.bin)
            .arg("--config-dir")
            .arg(&self.source_node)
            .args(["trust", &self.daemon_id, "--name", "dest", "--addr", addr])
            .output()?;
        if !out.status.success() {
            return Err(format!("ferry trust: {}", String::from_utf8_lossy(&out.stderr)).into());
        }
        Ok(())
    }

    fn round(&self) -> Result<Measure> {
        let daemon = self.daemon.id();
        // Reset the daemon's peak RSS to its current RSS, so that each round shows its own peak.
        let _ = std::fs::write(format!("/proc/{daemon}/clear_refs"), "5");
        let (cpu_children, cpu_daemon) = (children_cpu(), process_cpu(daemon));
        let started = Instant::now();
        let child = self
            .net
            .source_command(&self.bin)
            .arg("--config-dir")
            .arg(&self.source_node)
            .args(["sync", "--round", "bench", "--json", "--congestion", &self.congestion])
            .args(self.bwlimit.iter().flat_map(|rate| ["--bwlimit", rate.as_str()]))
            .stdout(Stdio::piped())
            .stderr(self.source_log()?)
            .spawn()?;
        let (out, rss_send) = wait_sampling(child)?;
        let wall = started.elapsed();
        if !out.status.success() {
            return Err(format!("ferry sync failed: {:?}", out.status).into());
        }
        let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        if let Some(dir) = &self.logs {
            // One line per round, for what the table leaves out (chunk bytes, path MTU, failures).
            let mut reports =
                std::fs::OpenOptions::new().create(true).append(true).open(dir.join("ferry-reports.jsonl"))?;
            writeln!(reports, "{report}")?;
        }
        let wire = report["bytes_on_wire"].as_u64().ok_or("no bytes_on_wire in ferry's report")?;
        let scan = report["scan_ms"].as_u64().map(Duration::from_millis);
        Ok(Measure {
            wall,
            scan,
            sync_wait: self.last_sync_wait(),
            check: self.last_check(),
            cpu_send: children_cpu() - cpu_children,
            cpu_recv: process_cpu(daemon) - cpu_daemon,
            rss_send,
            rss_recv: peak_rss(daemon),
            wire,
        })
    }
}

impl Drop for FerryPair {
    fn drop(&mut self) {
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
        // Appended, like the source's: `--memory` runs two pairs.
        if let Some(dir) = &self.logs {
            let append = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("ferry-dest.log"));
            if let (Ok(mut from), Ok(mut to)) = (std::fs::File::open(&self.daemon_log), append) {
                let _ = std::io::copy(&mut from, &mut to);
            }
        }
    }
}

/// An sshd on loopback and the rsync command that goes through it.
struct Rsync {
    sshd: Child,
    port: u16,
    key: PathBuf,
    target: PathBuf,
    wrapper: PathBuf,
    remote_usage: PathBuf,
    net: Net,
    /// `rsync --bwlimit`, if any.
    bwlimit: Option<String>,
}

/// Where each side runs: both on loopback, or each in its own network namespace.
#[derive(Clone)]
struct Net {
    source_ns: Option<String>,
    dest_ns: Option<String>,
    /// The destination's address, as the source reaches it.
    dest_host: String,
}

impl Net {
    fn loopback() -> Self {
        Self { source_ns: None, dest_ns: None, dest_host: "127.0.0.1".into() }
    }

    /// Each side in its own namespace of `link`.
    fn across(link: &ShapedLink) -> Self {
        Self {
            source_ns: Some(link.source_ns().to_owned()),
            dest_ns: Some(link.dest_ns().to_owned()),
            dest_host: ShapedLink::DEST_ADDR.into(),
        }
    }

    fn command(ns: Option<&str>, program: impl AsRef<std::ffi::OsStr>) -> Command {
        match ns {
            Some(ns) => ShapedLink::exec(ns, program),
            None => Command::new(program),
        }
    }

    fn source_command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        Self::command(self.source_ns.as_deref(), program)
    }

    fn dest_command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        Self::command(self.dest_ns.as_deref(), program)
    }
}

impl Rsync {
    fn start(root: &Path, net: &Net) -> Result<Self> {
        install_if_missing()?;
        let dir = root.join("ssh");
        std::fs::create_dir_all(&dir)?;
        for key in ["host_key", "client_key"] {
            let status = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(dir.join(key))
                .stdout(Stdio::null())
                .status()?;
            if !status.success() {
                return Err("ssh-keygen failed".into());
            }
        }
        std::fs::copy(dir.join("client_key.pub"), dir.join("authorized_keys"))?;
        let port = free_tcp_port()?;
        let config = dir.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress {}\nHostKey {}\nAuthorizedKeysFile {}\nPermitRootLogin prohibit-password\n\
                 PasswordAuthentication no\nStrictModes no\nUsePAM no\nPidFile {}\n",
                net.dest_host,
                dir.join("host_key").display(),
                dir.join("authorized_keys").display(),
                dir.join("sshd.pid").display()
            ),
        )?;
        std::fs::create_dir_all("/run/sshd")?;
        let sshd = net
            .dest_command("/usr/sbin/sshd")
            .arg("-D")
            .arg("-f")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        // The remote rsync runs under a wrapper that records its CPU time and peak RSS.
        let wrapper = dir.join("usage.py");
        let remote_usage = dir.join("remote-usage");
        std::fs::write(
            &wrapper,
            format!(
                "import resource, subprocess, sys\nrc = subprocess.call(sys.argv[1:])\n\
                 u = resource.getrusage(resource.RUSAGE_CHILDREN)\n\
                 open({:?}, 'w').write(f'{{u.ru_utime + u.ru_stime}} {{u.ru_maxrss}}')\nsys.exit(rc)\n",
                remote_usage.display().to_string()
            ),
        )?;
        let rsync = Self {
            sshd,
            port,
            key: dir.join("client_key"),
            target: root.join("rsync-target"),
            wrapper,
            remote_usage,
            net: net.clone(),
            bwlimit: None,
        };
        // Wait for sshd to answer (slow to start on a loaded machine).
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let answered = rsync.ssh_command().arg("true").stderr(Stdio::null()).status();
            if answered.is_ok_and(|s| s.success()) {
                return Ok(rsync);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Err("sshd did not answer within 30 s".into())
    }

    fn ssh_args(&self) -> Vec<String> {
        vec![
            "-p".into(),
            self.port.to_string(),
            "-i".into(),
            self.key.display().to_string(),
            "-o".into(),
            "StrictHostKeyChecking=no".into(),
            "-o".into(),
            "UserKnownHostsFile=/dev/null".into(),
            "-o".into(),
            "BatchMode=yes".into(),
            "-o".into(),
            "LogLevel=ERROR".into(),
        ]
    }

    fn ssh_command(&self) -> Command {
        let mut command = self.net.source_command("ssh");
        command.args(self.ssh_args()).arg(format!("{}@{}", user(), self.net.dest_host));
        command
    }

    fn round(&self, source: &Path) -> Result<Measure> {
        let _ = std::fs::remove_file(&self.remote_usage);
        let cpu_children = children_cpu();
        let started = Instant::now();
        let child = self
            .net
            .source_command("rsync")
            .args(["-aH", "--stats", "-e", &format!("ssh {}", self.ssh_args().join(" "))])
            .args(self.bwlimit.iter().map(|rate| format!("--bwlimit={rate}")))
            .arg(format!("--rsync-path=python3 {} rsync", self.wrapper.display()))
            .arg(format!("{}/", source.display()))
            .arg(format!("{}@{}:{}/", user(), self.net.dest_host, self.target.display()))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let (out, rss_send) = wait_sampling(child)?;
        let wall = started.elapsed();
        if !out.status.success() {
            return Err(format!("rsync failed: {:?}", out.status).into());
        }
        let stats = String::from_utf8_lossy(&out.stdout);
        let number = |label: &str| -> u64 {
            stats
                .lines()
                .find_map(|l| l.strip_prefix(label))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.replace(',', "").parse().ok())
                .unwrap_or(0)
        };
        let usage = std::fs::read_to_string(&self.remote_usage).unwrap_or_default();
        let mut usage = usage.split_whitespace();
        Ok(Measure {
            wall,
            cpu_send: children_cpu() - cpu_children,
            cpu_recv: usage.next().and_then(|v| v.parse().ok()).unwrap_or(0.0),
            rss_send,
            rss_recv: usage.next().and_then(|v| v.parse().ok()).unwrap_or(0),
            wire: number("Total bytes sent:") + number("Total bytes received:"),
            scan: None,
            sync_wait: None,
            check: None,
        })
    }
}

impl Drop for Rsync {
    fn drop(&mut self) {
        let _ = self.sshd.kill();
        let _ = self.sshd.wait();
    }
}

fn user() -> String {
    std::env::var("USER").ok().filter(|u| !u.is_empty()).unwrap_or_else(|| "root".into())
}

fn free_tcp_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn install_if_missing() -> Result<()> {
    let have = |program: &str| Command::new("sh").args(["-c", &format!("command -v {program}")]).output();
    let missing = ["rsync", "ssh", "/usr/sbin/sshd"]
        .iter()
        .any(|p| have(p).map(|o| !o.status.success() || o.stdout.is_empty()).unwrap_or(true));
    if !missing {
        return Ok(());
    }
    if !rustix::process::geteuid().is_root() {
        return Err("rsync or openssh-server is missing, and installing them needs root".into());
    }
    eprintln!("installing rsync and openssh-server with apt-get");
    let ok = Command::new("sh")
        .args([
            "-c",
            "apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q rsync openssh-server openssh-client >/dev/null",
        ])
        .status()?
        .success();
    if ok { Ok(()) } else { Err("apt-get install rsync openssh-server failed".into()) }
}

/// This machine's default TCP congestion control, which rsync's ssh uses (network namespaces start with
/// the host's).
fn tcp_congestion_control() -> String {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control")
        .map_or_else(|_| "unknown".to_owned(), |name| name.trim().to_owned())
}

fn render(args: &Args, files: u64, bytes: u64, rows: &[(String, Measure, Option<Measure>)], floors: &Floors) -> String {
    let mut out = Vec::new();
    let machine = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let _ = writeln!(out, "# ferry benchmarks\n");
    let _ = writeln!(
        out,
        "Made by `ferry-bench --files {} --seed {}{}{}{}{}` on {machine} ({cores} cores), {}; \
         {files} files, {:.1} MiB. ferry: `ferry sync --round` against `ferry serve` (QUIC). rsync: \
         `rsync -aH --stats` over ssh to an sshd on the destination's side, over TCP with this machine's \
         congestion control ({}).{}\n",
        args.files,
        args.seed,
        args.shaped.map_or(String::new(), |mbit| format!(" --shaped {mbit}")),
        args.bwlimit.as_ref().map_or(String::new(), |rate| format!(" --bwlimit {rate}")),
        if args.rsync_first { " --rsync-first" } else { "" },
        args.fill_memory_flag(),
        args.shaped.map_or("loopback".to_owned(), |mbit| format!(
            "between two network namespaces joined through a router namespace, its way to the destination \
             shaped by `tc tbf` to {mbit} Mbit/s with a 50 ms queue"
        )),
        bytes as f64 / 1048576.0,
        tcp_congestion_control(),
        args.bwlimit.as_ref().map_or(String::new(), |rate| format!(
            " Both tools limited themselves to {rate} (1024-based, per second: `ferry sync --bwlimit {rate}`, \
             `rsync --bwlimit={rate}`)."
        )),
    );
    let _ = writeln!(
        out,
        "In each round {} went first. Before each tool's round the harness runs sync(2), so that neither pays \
         for the other's unwritten data; ferry makes every file durable (fsync/syncfs) before it counts as done, rsync does not. \
         Wire bytes: ferry counts its UDP payloads both ways (QUIC headers and acknowledgements included); \
         rsync counts its own protocol bytes both ways (ssh's encryption and TCP/IP headers not included), \
         which favours rsync. Dest. sync wait: of the round, how long ferry's destination waited for its disk's \
         syncs (from its log). Dest. check: how long its check of the target took (from its log; it runs beside \
         the exchange of changes). CPU: seconds of the sending side / the receiving side. RSS: peak MiB of the \
         sending side / the receiving side.\n",
        if args.rsync_first { "rsync" } else { "ferry" }
    );
    if args.fill_memory.is_some() {
        let _ = writeln!(
            out,
            "Before the run a file filled the free memory with page cache (`--fill-memory`), so that both \
             tools wrote into memory taken back from that cache, as on a server that has been up a while.\n"
        );
    }
    let _ = writeln!(
        out,
        "| round | tool | wall s | of which scan s | dest. sync wait s | dest. check s | files/s | CPU send/recv s | RSS send/recv MiB | wire bytes | wall ratio | wire ratio |"
    );
    let _ = writeln!(out, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let line = |out: &mut Vec<u8>, round: &str, tool: &str, m: &Measure, ratio: Option<(f64, f64)>| {
        let _ = writeln!(
            out,
            "| {round} | {tool} | {:.2} | {} | {} | {} | {:.0} | {:.2} / {:.2} | {:.0} / {:.0} | {} | {} | {} |",
            m.wall.as_secs_f64(),
            m.scan.map_or(String::new(), |d| format!("{:.2}", d.as_secs_f64())),
            m.sync_wait.map_or(String::new(), |d| format!("{:.1}", d.as_secs_f64())),
            m.check.map_or(String::new(), |d| format!("{:.2}", d.as_secs_f64())),
            files as f64 / m.wall.as_secs_f64().max(1e-9),
            m.cpu_send,
            m.cpu_recv,
            m.rss_send as f64 / 1024.0,
            m.rss_recv as f64 / 1024.0,
            m.wire,
            ratio.map_or(String::new(), |r| format!("{:.2}", r.0)),
            ratio.map_or(String::new(), |r| format!("{:.3}", r.1)),
        );
    };
    for (round, f, r) in rows {
        let ratio = r
            .as_ref()
            .map(|r| (f.wall.as_secs_f64() / r.wall.as_secs_f64().max(1e-9), f.wire as f64 / (r.wire as f64).max(1.0)));
        line(&mut out, round, "ferry", f, ratio);
        if let Some(r) = r {
            line(&mut out, round, "rsync", r, None);
        }
    }
    let _ = writeln!(out, "\nRatios are ferry / rsync (below 1: ferry is faster or sends less).");
    let fresh = rows.iter().find(|(r, _, _)| r == "fresh export").map(|(_, f, _)| f.wire as f64 / bytes as f64);
    if let Some(fresh) = fresh {
        let _ = writeln!(out, "Fresh export: ferry put {:.2}% of the tree's bytes on the wire.", fresh * 100.0);
    }
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    // rsync's round: its wall time and wire bytes.
    let rsync = |round: &str| rows.iter().find(|(r, _, _)| r == round).and_then(|(_, _, r)| r.as_ref());
    let of_rsync = |round: &str, took: Duration| {
        rsync(round).map_or(String::new(), |r| {
            format!(", {:.2}× rsync's round", took.as_secs_f64() / r.wall.as_secs_f64().max(1e-9))
        })
    };
    let _ = writeln!(
        out,
        "\nFloors, measured on the same tree and disk right after both tools' round (what any tool must at least \
         do, with no network, hashing or comparison):\n"
    );
    if let Some((copy, sync)) = floors.initial {
        let _ = writeln!(
            out,
            "- Initial: copying the tree on the same disk (folders, then files on {threads} threads with \
             `copy_file_range`, then links) took {:.2} s{}, and one `syncfs` after it {:.2} s more: {:.2} s{} \
             for a tool that makes every file durable.",
            copy.as_secs_f64(),
            of_rsync("initial", copy),
            sync.as_secs_f64(),
            (copy + sync).as_secs_f64(),
            of_rsync("initial", copy + sync),
        );
    }
    if let Some(floor) = floors.no_change {
        let _ = writeln!(
            out,
            "- No change: listing every folder and `lstat`ing every entry (one thread lists, {threads} stat) took \
             {:.2} s{}.",
            floor.as_secs_f64(),
            of_rsync("no change", floor),
        );
    }
    if let Some((stat, copy, sync, files)) = floors.day {
        let _ = writeln!(
            out,
            "- One day of changes: listing and `lstat`ing the tree took {:.2} s, then copying the {files} files \
             the day changed over the initial copy {:.2} s and one `syncfs` {:.2} s: {:.2} s{}.",
            stat.as_secs_f64(),
            copy.as_secs_f64(),
            sync.as_secs_f64(),
            (stat + copy + sync).as_secs_f64(),
            of_rsync("one day of changes", stat + copy + sync),
        );
    }
    if let Some(random) = floors.day_random_bytes {
        let _ = writeln!(
            out,
            "- One day of changes: the day wrote {random} bytes of fresh random content (new BLOBs and archives), \
             which no tool can send in fewer bytes{}.",
            rsync("one day of changes").map_or(String::new(), |r| format!(
                ": {:.3}× rsync's wire bytes",
                random as f64 / (r.wire as f64).max(1.0)
            )),
        );
    }
    let bounds: Vec<String> =
        rows.iter().filter_map(|(round, f, _)| ferry_bound(round, f, threads, &of_rsync)).collect();
    if !bounds.is_empty() {
        let _ = writeln!(
            out,
            "\nBounds under ferry's own rounds, from its figures above: its two processes' CPU time spread over \
             all {threads} cores (its round cannot be shorter without using less CPU), and its round after the \
             scan (what hiding the scan entirely, by streaming it into the transfer, would leave if the rest \
             took as long). Neither is a measurement of a faster ferry:\n"
        );
        for bound in bounds {
            let _ = writeln!(out, "{bound}");
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What ferry's own figures of a round bound it by.
struct Bounds {
    /// Both processes' CPU-seconds.
    cpu: f64,
    /// `cpu` spread over all the cores: the round cannot be shorter without using less CPU.
    on_cores: Duration,
    /// The scan, and the round after it (what hiding the scan entirely would leave); `None` without a
    /// scan time.
    after_scan: Option<(Duration, Duration)>,
}

impl Bounds {
    fn of(ferry: &Measure, cores: usize) -> Self {
        let cpu = ferry.cpu_send + ferry.cpu_recv;
        Self {
            cpu,
            on_cores: Duration::from_secs_f64(cpu / cores.max(1) as f64),
            after_scan: ferry.scan.map(|scan| (scan, ferry.wall.saturating_sub(scan))),
        }
    }
}

/// The line of one of ferry's rounds under "Bounds" (`None` for a round without a scan time).
/// `of_rsync` gives the ratio to rsync's round, if it ran.
fn ferry_bound(
    round: &str,
    ferry: &Measure,
    cores: usize,
    of_rsync: &dyn Fn(&str, Duration) -> String,
) -> Option<String> {
    let bounds = Bounds::of(ferry, cores);
    let (scan, after_scan) = bounds.after_scan?;
    Some(format!(
        "- {}: {:.2} CPU-seconds, at least {:.2} s on {cores} cores{}; {:.2} s after its {:.2} s scan{}.",
        capitalized(round),
        bounds.cpu,
        bounds.on_cores.as_secs_f64(),
        of_rsync(round, bounds.on_cores),
        after_scan.as_secs_f64(),
        scan.as_secs_f64(),
        of_rsync(round, after_scan),
    ))
}

fn capitalized(text: &str) -> String {
    let mut chars = text.chars();
    chars.next().map_or_else(String::new, |first| first.to_uppercase().chain(chars).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measure(wall: f64, scan: Option<f64>, cpu_send: f64, cpu_recv: f64) -> Measure {
        Measure {
            wall: Duration::from_secs_f64(wall),
            cpu_send,
            cpu_recv,
            scan: scan.map(Duration::from_secs_f64),
            ..Measure::default()
        }
    }

    #[test]
    fn a_bound_spreads_both_processes_cpu_over_the_cores_and_takes_the_scan_off_the_wall_time() {
        let rsync = |round: &str, took: Duration| format!(" [{round} {:.2}×]", took.as_secs_f64() / 4.0);
        let bound = ferry_bound("one day of changes", &measure(2.0, Some(0.5), 1.5, 1.0), 2, &rsync).unwrap();
        assert_eq!(
            bound,
            "- One day of changes: 2.50 CPU-seconds, at least 1.25 s on 2 cores [one day of changes 0.31×]; \
             1.50 s after its 0.50 s scan [one day of changes 0.38×]."
        );
    }

    #[test]
    fn a_single_files_bounds_are_rates() {
        let bounds = single_file_bounds(&measure(10.0, Some(2.0), 6.0, 4.0), 4_000_000_000, 2);
        assert_eq!(
            bounds,
            "Bounds under ferry's round, from its figures: its two processes used 10.00 CPU-seconds, at least \
             5.00 s on 2 cores, so at most 800 MB/s without using less CPU; after its 2.00 s scan the round \
             took 8.00 s, 500 MB/s (what hiding the scan entirely would leave).\n"
        );
    }

    #[test]
    fn rsync_has_no_bound_of_ferrys() {
        assert_eq!(ferry_bound("initial", &measure(20.0, None, 10.0, 9.0), 2, &|_, _| String::new()), None);
    }
}
