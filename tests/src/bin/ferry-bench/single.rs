//! `--single-file MIB`: one large file, the initial round of each tool.

use std::io::Write;
use std::path::Path;

use crate::args::{Args, Result};
use crate::ferry::FerryPair;
use crate::floors::disk_floor;
use crate::render::single_file_bounds;
use crate::rsync::{Net, Rsync};

/// Writes `source`/blob, `mib` MiB (rounded up to 8) of random bytes from `seed`, synced; returns
/// its size.
pub(crate) fn write_blob(source: &Path, mib: u64, seed: u64) -> Result<u64> {
    use rand::{RngExt, SeedableRng};
    std::fs::create_dir_all(source)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut file = std::io::BufWriter::new(std::fs::File::create(source.join("blob"))?);
    let mut block = vec![0u8; 8 << 20];
    for _ in 0..mib.div_ceil(8) {
        rng.fill(&mut block[..]);
        file.write_all(&block)?;
    }
    file.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(mib.div_ceil(8) * (8 << 20))
}

/// One large file of random bytes, the initial round of each tool.
pub(crate) fn single_file(args: &Args, root: &Path, source: &Path, mib: u64) -> Result<()> {
    let bytes = write_blob(source, mib, args.seed)?;
    let net = Net { one_core_each: args.one_core_each, ..Net::loopback() };
    let mut ferry = FerryPair::start(&args.ferry, root, source, &net)?;
    ferry.congestion.clone_from(&args.congestion);
    ferry.logs.clone_from(&args.logs);
    let rsync =
        if !args.no_rsync { Rsync::start(root, &net).map_err(|e| eprintln!("no rsync: {e}")).ok() } else { None };
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
        args.extra_flags(),
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
