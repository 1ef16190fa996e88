//! Writes the benchmark's Backup-NG-like tree (the one `ferry-bench` generates) to a new folder, for
//! measurements that need the tree alone, such as `tests/profile/local-rounds.sh`.
//!
//! `cargo run --release -p ferry-testkit --example generate_tree -- DIR [FILES] [SEED]`

use std::path::PathBuf;

use ferry_testkit::{TreeGenerator, TreeSpec};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: generate_tree DIR [FILES] [SEED]";
    let dir = PathBuf::from(args.first().ok_or(usage)?);
    let files = args.get(1).map_or(Ok(200_000), |a| a.parse()).map_err(|_| usage)?;
    let seed = args.get(2).map_or(Ok(1), |a| a.parse()).map_err(|_| usage)?;
    if dir.exists() {
        return Err(format!("{} exists already: the tree is written to a new folder", dir.display()).into());
    }
    TreeGenerator::create(&dir, TreeSpec::with_files(files, seed))?;
    println!("wrote a tree of {files} files (seed {seed}) to {}", dir.display());
    Ok(())
}
