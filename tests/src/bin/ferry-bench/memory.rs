//! `--memory`: peak RSS against the number of files.

use std::path::Path;
use std::time::Instant;

use crate::args::{Args, Result};
use crate::ferry::FerryPair;
use crate::rsync::Net;

/// Peak memory of each ferry process against the number of files: trees of `--files` / 10 and
/// `--files` small files (300 to 700 bytes, each different, 1,000 to a folder), an initial round then
/// a no-change round on each.
pub(crate) fn memory(args: &Args, root: &Path) -> Result<()> {
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
pub(crate) fn small_files(root: &Path, files: usize, seed: u64) -> Result<()> {
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
