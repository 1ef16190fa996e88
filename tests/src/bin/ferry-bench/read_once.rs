//! `--read-once MIB`: the source's reads from storage in a first round of a tree (or one file) larger than the
//! memory it may use (a cgroup v1 memory limit of MIB MiB, with the page cache dropped first, as on
//! a store larger than the machine's memory), against the data; and how soon the first chunk left.

use std::path::{Path, PathBuf};

use ferry_testkit::{TreeGenerator, TreeSpec};

use crate::args::{Args, Result};
use crate::ferry::FerryPair;
use crate::measure::storage_reads;
use crate::rsync::Net;
use crate::single::write_blob;

/// A memory cgroup of its own (cgroup v1), removed when dropped.
pub(crate) struct MemoryLimit(PathBuf);

impl MemoryLimit {
    fn create(limit: u64) -> Result<Self> {
        let path = Path::new("/sys/fs/cgroup/memory").join(format!("ferry-bench-{}", std::process::id()));
        std::fs::create_dir_all(&path).map_err(|e| format!("cannot make {} (cgroup v1, root): {e}", path.display()))?;
        std::fs::write(path.join("memory.limit_in_bytes"), limit.to_string())?;
        Ok(Self(path))
    }

    /// A shell line that puts itself into the group, then runs the command after it.
    pub(crate) fn enter_and_exec(&self) -> String {
        format!("echo $$ > {}/cgroup.procs && exec \"$@\"", self.0.display())
    }
}

impl Drop for MemoryLimit {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// The first round of a generated tree of `--files` files (or of one file of `--single-file` MiB),
/// its source in a memory cgroup of `mib` MiB, the page cache dropped first.
pub(crate) fn read_once(args: &Args, root: &Path, source: &Path, mib: u64) -> Result<()> {
    let what = match args.single_file {
        Some(size) => {
            write_blob(source, size, args.seed)?;
            format!("one file of {size} MiB")
        }
        None => {
            TreeGenerator::create(source, TreeSpec::with_files(args.files, args.seed))?;
            format!("{} files", args.files)
        }
    };
    let data = file_bytes(source)?;
    let limit = MemoryLimit::create(mib << 20)?;
    let mut ferry = FerryPair::start(&args.ferry, root, source, &Net::loopback())?;
    ferry.congestion.clone_from(&args.congestion);
    ferry.logs.clone_from(&args.logs);
    ferry.cgroups = Some(limit.enter_and_exec());
    rustix::fs::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "1").map_err(|e| format!("cannot drop the page cache (root): {e}"))?;
    let m = ferry.round()?;
    // The kernel's count of what the source read from storage (its report's `disk_read_bytes`, or
    // for a build from before it, the last sample of the same count).
    let read = m.disk_read.ok_or("no count of the source's reads")?;
    // The floor: reading every file once, in this process, from a cold cache (the data, and the
    // folders and inodes any tool must read to find it).
    rustix::fs::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "1")?;
    let before = own_storage_reads()?;
    read_every_file(source)?;
    let floor = own_storage_reads()? - before;
    let seconds = |d: Option<std::time::Duration>| d.map_or("-".to_owned(), |d| format!("{:.2}", d.as_secs_f64()));
    let out = format!(
        "First round of {what} ({data} bytes of file data), the source limited to {mib} MiB of memory \
         (`ferry-bench --read-once {mib} {}`); the floor: reading every file once from a cold \
         cache, in one process:\n\n\
         | wall s | scan s | first chunk s | source's peak RSS MiB | source's reads from storage | of the data | floor | of the floor |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|\n\
         | {:.2} | {} | {} | {} | {read} | {:.3}× | {floor} | {:.3}× |\n",
        args.single_file.map_or_else(|| format!("--files {}", args.files), |size| format!("--single-file {size}")),
        m.wall.as_secs_f64(),
        seconds(m.scan),
        seconds(m.first_byte),
        m.rss_send >> 10,
        read as f64 / data as f64,
        read as f64 / floor as f64,
    );
    print!("{out}");
    if let Some(path) = &args.write {
        std::fs::write(path, out)?;
    }
    Ok(())
}

/// What this process read from storage so far.
fn own_storage_reads() -> Result<u64> {
    Ok(storage_reads(std::process::id()).ok_or("no read_bytes in /proc/self/io")?)
}

/// Reads every regular file beneath `root` once, folders in name order.
fn read_every_file(root: &Path) -> Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    let mut folders = vec![root.to_owned()];
    while let Some(folder) = folders.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&folder)?.collect::<std::io::Result<_>>()?;
        entries.sort_by_key(std::fs::DirEntry::file_name);
        for entry in entries.iter().rev() {
            let kind = entry.file_type()?;
            if kind.is_dir() {
                folders.push(entry.path());
            } else if kind.is_file() {
                let mut file = std::fs::File::open(entry.path())?;
                while std::io::Read::read(&mut file, &mut buf)? > 0 {}
            }
        }
    }
    Ok(())
}

/// The bytes of the regular files beneath `root`, each inode once (hard links are read once).
fn file_bytes(root: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let (mut total, mut seen) = (0, std::collections::HashSet::new());
    let mut folders = vec![root.to_owned()];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                folders.push(entry.path());
            } else if kind.is_file() {
                let metadata = entry.metadata()?;
                if seen.insert((metadata.dev(), metadata.ino())) {
                    total += metadata.len();
                }
            }
        }
    }
    Ok(total)
}
