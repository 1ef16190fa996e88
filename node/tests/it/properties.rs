//! Property: whatever a tree looks like and however it changes, after a round the target is the
//! source (content, kind, mode, owner, mtime in ns, symlink targets, hard-link groups), and files that
//! only the target has are still there.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use ferry_engine::LocalRoundOptions;
use ferry_testkit::{TreeGenerator, TreeSpec};
use proptest::prelude::*;

use crate::util::{Pair, assert_same_tree, is_root, random_bytes, write};

/// Paths a change may touch: few enough that kinds collide (a file becomes a folder, and back).
const PATHS: &[&str] = &["a", "a/x", "a/x/z", "a/y", "b", "b/x", "B", "d e", "h#1", "a.b"];

#[derive(Debug, Clone)]
enum Change {
    File { path: usize, len: usize, seed: u64 },
    Dir { path: usize },
    Symlink { path: usize, to: usize },
    HardLink { path: usize, to: usize },
    Remove { path: usize },
    Chmod { path: usize, mode: u32 },
    Chown { path: usize, uid: u32 },
    Touch { path: usize, secs: i64, nanos: u32 },
}

fn change() -> impl Strategy<Value = Change> {
    let path = 0..PATHS.len();
    prop_oneof![
        4 => (path.clone(), prop_oneof![0usize..100, 0usize..300_000], any::<u64>())
            .prop_map(|(path, len, seed)| Change::File { path, len, seed }),
        2 => path.clone().prop_map(|path| Change::Dir { path }),
        1 => (path.clone(), 0..PATHS.len()).prop_map(|(path, to)| Change::Symlink { path, to }),
        1 => (path.clone(), 0..PATHS.len()).prop_map(|(path, to)| Change::HardLink { path, to }),
        2 => path.clone().prop_map(|path| Change::Remove { path }),
        1 => (path.clone(), prop_oneof![Just(0o600u32), Just(0o755), Just(0o4755), Just(0o1777), Just(0o444)])
            .prop_map(|(path, mode)| Change::Chmod { path, mode }),
        1 => (path.clone(), prop_oneof![Just(0u32), Just(4242), Just(1)]).prop_map(|(path, uid)| Change::Chown { path, uid }),
        1 => (path, 0i64..2_000_000_000, 0u32..1_000_000_000).prop_map(|(path, secs, nanos)| Change::Touch { path, secs, nanos }),
    ]
}

fn remove_any(path: &Path) {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path).unwrap(),
        Ok(_) => std::fs::remove_file(path).unwrap(),
        Err(_) => {}
    }
}

/// Makes every ancestor of `rel` a folder, replacing whatever is in the way.
fn make_parents(root: &Path, rel: &str) {
    let mut at = root.to_path_buf();
    let parts: Vec<&str> = rel.split('/').collect();
    for part in &parts[..parts.len() - 1] {
        at.push(part);
        match std::fs::symlink_metadata(&at) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                remove_any(&at);
                std::fs::create_dir(&at).unwrap();
            }
            Err(_) => std::fs::create_dir(&at).unwrap(),
        }
    }
}

fn apply_change(root: &Path, change: &Change) {
    let at = |i: usize| root.join(PATHS[i]);
    match *change {
        Change::File { path, len, seed } => {
            make_parents(root, PATHS[path]);
            if std::fs::symlink_metadata(at(path)).is_ok_and(|m| !m.is_file()) {
                remove_any(&at(path));
            }
            // Write through an existing hard link on purpose: both names change.
            write(&at(path), &random_bytes(len, seed));
        }
        Change::Dir { path } => {
            make_parents(root, PATHS[path]);
            if !std::fs::symlink_metadata(at(path)).is_ok_and(|m| m.is_dir()) {
                remove_any(&at(path));
                std::fs::create_dir(at(path)).unwrap();
            }
        }
        Change::Symlink { path, to } => {
            make_parents(root, PATHS[path]);
            remove_any(&at(path));
            std::os::unix::fs::symlink(PATHS[to], at(path)).unwrap();
        }
        Change::HardLink { path, to } => {
            if path != to && std::fs::symlink_metadata(at(to)).is_ok_and(|m| m.is_file()) {
                make_parents(root, PATHS[path]);
                if std::fs::symlink_metadata(at(to)).is_ok_and(|m| m.is_file()) {
                    remove_any(&at(path));
                    let _ = std::fs::hard_link(at(to), at(path));
                }
            }
        }
        Change::Remove { path } => remove_any(&at(path)),
        Change::Chmod { path, mode } => {
            if std::fs::symlink_metadata(at(path)).is_ok_and(|m| !m.file_type().is_symlink()) {
                std::fs::set_permissions(at(path), std::fs::Permissions::from_mode(mode)).unwrap();
            }
        }
        Change::Chown { path, uid } => {
            if is_root() && std::fs::symlink_metadata(at(path)).is_ok() {
                std::os::unix::fs::lchown(at(path), Some(uid), Some(uid + 1)).unwrap();
            }
        }
        Change::Touch { path, secs, nanos } => {
            if std::fs::symlink_metadata(at(path)).is_ok() {
                let t = std::time::UNIX_EPOCH + std::time::Duration::new(secs as u64, nanos);
                let times = std::fs::FileTimes::new().set_modified(t);
                if let Ok(file) = std::fs::File::open(at(path)) {
                    let _ = file.set_times(times);
                }
            }
        }
    }
}

fn target_only(path: &[u8]) -> bool {
    path == b"map_server1" || path.starts_with(b"only-here")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn rounds_make_the_target_equal_the_source(
        rounds in proptest::collection::vec(proptest::collection::vec(change(), 1..12), 1..4),
    ) {
        let pair = Pair::new();
        // What the import writes on the destination: never touched.
        write(&pair.target().join("map_server1"), b"import map");
        write(&pair.target().join("only-here/id_mapper"), b"ids");
        let mut options = LocalRoundOptions::default();
        options.apply.delete = true;
        options.apply.batch_files = 3; // exercise many syncs and renames
        for changes in &rounds {
            for change in changes {
                apply_change(&pair.source(), change);
            }
            let report = pair.round(&options);
            prop_assert_eq!(report.apply.failure_count, 0, "{:?}", report.apply.failures);
            assert_same_tree(&pair.source(), &pair.target(), target_only);
            prop_assert!(report.in_sync);
        }
        prop_assert_eq!(std::fs::read(pair.target().join("map_server1")).unwrap(), b"import map");
    }
}

#[test]
fn generated_tree_through_days_and_a_fresh_export() {
    let pair = Pair::new();
    std::fs::remove_dir(pair.source()).unwrap();
    let mut tree = TreeGenerator::create(&pair.source(), TreeSpec::with_files(2000, 21)).unwrap();
    write(&pair.target().join("map_server1"), b"import map");
    let mut kept = ferry_testkit::Snapshot::new();
    let allowed = |kept: &ferry_testkit::Snapshot, p: &[u8]| target_only(p) || kept.contains_key(p);
    for day in 0..4 {
        match day {
            0 => {}
            3 => {
                tree.fresh_export().unwrap();
            }
            _ => {
                tree.next_day().unwrap();
            }
        }
        let report = pair.round(&LocalRoundOptions::default());
        assert_eq!(report.apply.failure_count, 0, "{:?}", report.apply.failures);
        // The round ends with a sync of the target: its wait is counted, and is part of the round.
        assert!(!report.apply.sync_wait.is_zero() && report.apply.sync_wait <= report.apply.duration, "{report:?}");
        assert_same_tree(&pair.source(), &pair.target(), |p| allowed(&kept, p));
        if day < 3 {
            // A round's last batch is named into place on a thread of its own after its sync, and the
            // round waits for it: that wait is counted apart from the sync's.
            let waits = report.apply.sync_wait + report.apply.place_wait;
            assert!(!report.apply.place_wait.is_zero() && waits <= report.apply.duration, "{report:?}");
        }
        if day == 0 {
            // The first round's small files are made on a thread of their own; waiting for them counts.
            assert!(!report.apply.make_wait.is_zero() && report.apply.make_wait <= report.apply.duration, "{report:?}");
        }
        if day == 3 {
            // Same bytes, new mtimes: nothing to copy, only metadata to set, and no file to make.
            assert_eq!(report.apply.chunks_fetched, 0);
            assert!(report.apply.metadata_updated > 1000);
            assert!(report.apply.make_wait.is_zero(), "{report:?}");
        }
        kept.extend(ferry_testkit::snapshot(&pair.source(), &[]).unwrap());
    }
}

/// A batch is renamed into place only after its sync, which runs while the next batch is staged; a
/// hard link whose leader is in the batch still syncing waits for it, and links to the new file (not
/// to the old one still at that path).
#[test]
fn hard_links_to_files_of_the_batch_still_syncing() {
    let pair = Pair::new();
    let src = pair.source();
    let mut options = LocalRoundOptions::default();
    options.apply.batch_files = 1; // each file its own batch: every leader is still syncing
    for round in 0..2u64 {
        for i in 0..20u64 {
            let leader = src.join(format!("d{i:02}/a"));
            // Round 1 replaces each leader with a new file (new inode), so the link must move too.
            let _ = std::fs::remove_file(&leader);
            let _ = std::fs::remove_file(src.join(format!("d{i:02}/b")));
            write(&leader, &random_bytes(3000 + i as usize, round * 100 + i));
            std::fs::hard_link(&leader, src.join(format!("d{i:02}/b"))).unwrap();
        }
        let report = pair.round(&options);
        assert_eq!(report.apply.failure_count, 0, "{:?}", report.apply.failures);
        assert_eq!(report.apply.hard_links, 20);
        assert_same_tree(&src, &pair.target(), |_| false);
    }
}

/// Small files are made on a thread beside the applier; a hard link whose leader is in the same batch
/// waits for the leader to be made, then links to it (one inode in the target, as in the source).
#[test]
fn hard_links_to_files_of_the_batch_being_made() {
    use std::os::unix::fs::MetadataExt;
    let pair = Pair::new();
    let src = pair.source();
    for i in 0..200u64 {
        let leader = src.join(format!("d{:02}/a{i:03}", i % 7));
        write(&leader, &random_bytes(100 + i as usize * 37, i));
        std::fs::hard_link(&leader, src.join(format!("d{:02}/b{i:03}", i % 7))).unwrap();
    }
    let report = pair.round(&LocalRoundOptions::default());
    assert_eq!(report.apply.failure_count, 0, "{:?}", report.apply.failures);
    assert_eq!((report.apply.files_written, report.apply.hard_links), (200, 200));
    assert_same_tree(&src, &pair.target(), |_| false);
    for i in 0..200u64 {
        let dir = pair.target().join(format!("d{:02}", i % 7));
        let (a, b) = (dir.join(format!("a{i:03}")), dir.join(format!("b{i:03}")));
        assert_eq!(std::fs::metadata(a).unwrap().ino(), std::fs::metadata(b).unwrap().ino());
    }
}
