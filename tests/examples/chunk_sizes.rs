//! Measures chunk-size choices on a generated Backup-NG-like tree: the table of sizes in DESIGN.md comes from it.
//!
//! `cargo run --release -p ferry-testkit --example chunk_sizes -- [FILES]`
//!
//! For each min/avg/max it reports: chunks per tree (what the manifest, the chunk index and the wire
//! requests cost), bytes of chunks a day of changes adds that the previous day did not have, bytes
//! that ten small edits inside a 64 MiB file put into new chunks, and chunking+hashing throughput.

use std::collections::HashSet;
use std::path::Path;
use std::time::Instant;

use ferry_engine::{ChunkHash, ChunkerConfig, ReadBuffers, hash_reader};
use ferry_testkit::{TreeGenerator, TreeSpec};
use rand::{RngExt, SeedableRng};

fn chunk_tree(root: &Path, config: ChunkerConfig, bufs: &mut ReadBuffers) -> (Vec<(ChunkHash, u64)>, u64) {
    let mut chunks = Vec::new();
    let mut bytes = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for child in std::fs::read_dir(&dir).expect("read_dir") {
            let child = child.expect("dir entry");
            let kind = child.file_type().expect("file type");
            if kind.is_dir() {
                stack.push(child.path());
            } else if kind.is_file() {
                let file = std::fs::File::open(child.path()).expect("open");
                let (named, read) = hash_reader(config, &file, bufs).expect("read");
                chunks.extend(named.iter().map(|c| (c.hash, c.len as u64)));
                bytes += read;
            }
        }
    }
    (chunks, bytes)
}

fn chunk_bytes(data: &[u8], config: ChunkerConfig, bufs: &mut ReadBuffers) -> Vec<(ChunkHash, u64)> {
    let (named, _) = hash_reader(config, data, bufs).expect("in memory");
    named.iter().map(|c| (c.hash, c.len as u64)).collect()
}

fn new_bytes(before: &[(ChunkHash, u64)], after: &[(ChunkHash, u64)]) -> u64 {
    let known: HashSet<ChunkHash> = before.iter().map(|c| c.0).collect();
    let mut seen = HashSet::new();
    after.iter().filter(|c| !known.contains(&c.0) && seen.insert(c.0)).map(|c| c.1).sum()
}

fn main() {
    let files: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let dir = tempfile::tempdir().expect("temp dir");
    let (day0, day1) = (dir.path().join("day0"), dir.path().join("day1"));
    let spec = TreeSpec::with_files(files, 7);
    TreeGenerator::create(&day0, spec.clone()).expect("generate");
    let mut tree = TreeGenerator::create(&day1, spec).expect("generate");
    let changes = tree.next_day().expect("mutate");

    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let mut big = vec![0u8; 64 << 20];
    rng.fill(&mut big[..]);
    let mut edited = big.clone();
    for _ in 0..10 {
        let at = rng.random_range(0..edited.len() - 100);
        let insert: Vec<u8> = (0..rng.random_range(1..100)).map(|_| rng.random()).collect();
        edited.splice(at..at + 10, insert);
    }

    println!(
        "tree: about {files} files; a day of changes wrote {} bytes into {} files",
        changes.bytes_written,
        changes.files_added + changes.files_rewritten
    );
    println!(
        "{:>16}  {:>10}  {:>12}  {:>14}  {:>16}  {:>10}",
        "min/avg/max", "chunks", "tree bytes", "day: new bytes", "10 edits in 64M", "MB/s"
    );
    let mut bufs = ReadBuffers::default();
    for (min, avg, max) in [(4, 16, 64), (8, 32, 128), (16, 64, 256), (32, 128, 512), (64, 256, 1024)] {
        let config = ChunkerConfig::new(min << 10, avg << 10, max << 10).expect("valid sizes");
        let (before, _) = chunk_tree(&day0, config, &mut bufs);
        let started = Instant::now();
        let (after, bytes) = chunk_tree(&day1, config, &mut bufs);
        let tree_rate = bytes as f64 / started.elapsed().as_secs_f64() / 1e6;
        let edit_cost = new_bytes(&chunk_bytes(&big, config, &mut bufs), &chunk_bytes(&edited, config, &mut bufs));
        println!(
            "{:>16}  {:>10}  {:>12}  {:>14}  {:>16}  {:>10.0}",
            format!("{min}K/{avg}K/{max}K"),
            after.len(),
            bytes,
            new_bytes(&before, &after),
            edit_cost,
            tree_rate
        );
    }
}
