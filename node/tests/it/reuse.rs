//! Only what is new is copied: renamed, duplicated and shifted data is found in the target, and an
//! unchanged tree is not even read.

use std::time::Duration;

use ferry_engine::LocalRoundOptions;
use ferry_testkit::{TreeGenerator, TreeSpec};

use crate::util::{Pair, assert_same_tree, random_bytes, regular_files, write};

#[test]
fn renamed_folder_duplicated_file_and_inserted_bytes_cost_few_chunks() {
    for delete in [false, true] {
        let pair = Pair::new();
        let src = pair.source();
        for i in 0..20 {
            write(&src.join(format!("mail/m{i}")), &random_bytes(100_000, i));
        }
        let big = random_bytes(4 << 20, 99);
        write(&src.join("big.bin"), &big);
        let mut options = LocalRoundOptions::default();
        options.apply.delete = delete;
        let first = pair.round(&options);
        assert_eq!(first.apply.chunks_local, 0);
        assert!(first.apply.chunks_fetched > 40);

        std::fs::rename(src.join("mail"), src.join("a-renamed-mail")).unwrap();
        std::fs::copy(src.join("big.bin"), src.join("big-copy.bin")).unwrap();
        let mut shifted = b"a few bytes inserted at the start".to_vec();
        shifted.extend_from_slice(&big);
        write(&src.join("big.bin"), &shifted);

        let second = pair.round(&options);
        let apply = &second.apply;
        assert!(
            apply.chunks_fetched <= 3 && apply.bytes_fetched < 600_000,
            "delete={delete}: {} chunks ({} bytes) fetched, {} local",
            apply.chunks_fetched,
            apply.bytes_fetched,
            apply.chunks_local
        );
        assert!(apply.chunks_local > 60, "{} local chunks", apply.chunks_local);
        assert_eq!(apply.files_written, 22);
        assert_same_tree(&src, &pair.target(), |p| !delete && p.starts_with(b"mail"));
        assert_eq!(pair.target().join("mail").exists(), !delete);
    }
}

#[test]
fn unchanged_tree_of_100k_files_is_not_read_again() {
    let pair = Pair::in_memory();
    std::fs::remove_dir(pair.source()).unwrap();
    let mut spec = TreeSpec::with_files(100_000, 5);
    spec.max_blob = 64 << 10; // the file count matters here, not the bytes
    TreeGenerator::create(&pair.source(), spec).unwrap();
    // Files written within the last second are re-read next time whatever their stat says (their
    // timestamps could still move without changing); let the tree age past that.
    std::thread::sleep(Duration::from_millis(1100));

    let first = pair.round(&LocalRoundOptions::default());
    assert!(first.scan.files > 95_000, "{} files", first.scan.files);
    // Each file's inode read once: a further name of a hard-linked file is not read again.
    assert_eq!(first.scan.files_read, inodes_of_files(&pair.source()), "files: {}", first.scan.files);
    assert!(first.scan.files_read < first.scan.files, "the generator makes hard links");
    assert!(first.in_sync);

    let second = pair.round(&LocalRoundOptions::default());
    assert_eq!(second.scan.files, first.scan.files);
    assert_eq!(second.scan.files_read, 0, "an unchanged file was read");
    assert_eq!(second.scan.bytes_read, 0);
    assert_eq!(second.apply.files_written + second.apply.metadata_updated + second.apply.dirs_created, 0);
    assert_eq!(second.target_root, first.target_root);
    assert!(second.in_sync);
}

/// The inodes of the regular files under `dir`, counted once each.
fn inodes_of_files(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let inodes: std::collections::HashSet<u64> = regular_files(dir).iter().map(|(_, meta)| meta.ino()).collect();
    inodes.len() as u64
}
