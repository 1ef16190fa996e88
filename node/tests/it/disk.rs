//! Broken disks under a real daemon: EIO on sync (strace's fault injection, since the binary makes
//! its system calls directly), a read-only target, a disk that fills in the middle of a round, a full
//! or damaged state folder on either node, a disk that is not mounted. Each round fails with a
//! message that names the fault and the place (and how to go on, where the operator must act), the
//! target keeps its previous state (every file whole, old or new), and the next round succeeds once
//! the fault is gone.

use std::path::Path;
use std::time::Duration;

use ferry_testkit::{compare_trees, snapshot};

use crate::network::Setup;
use crate::util::{Tmpfs, assert_same_tree, may_mount, no_staging_leftovers, random_bytes, strace, write};

/// `files` random files of `size` bytes under `dir`, named by `seed`.
fn files(dir: &Path, count: usize, size: usize, seed: u64) {
    for i in 0..count {
        write(&dir.join(format!("d{}/f-{seed}-{i:03}", i % 3)), &random_bytes(size, seed * 1000 + i as u64));
    }
}

/// Every file in `target` is whole: byte for byte the source's file of the same path, or of the
/// earlier state `before` (files of a failed round never show up half written).
fn every_file_whole(target: &Path, source: &Path, before: &ferry_testkit::Snapshot) {
    let now = snapshot(target, &[]).unwrap();
    let source_now = snapshot(source, &[]).unwrap();
    for (path, node) in now.iter() {
        let matches_source = source_now.get(path).is_some_and(|s| s.kind == node.kind);
        let matches_before = before.get(path).is_some_and(|b| b.kind == node.kind);
        let is_dir = node.kind == ferry_testkit::NodeKind::Dir;
        assert!(
            is_dir || matches_source || matches_before,
            "{} is neither the old nor the new file",
            String::from_utf8_lossy(path)
        );
    }
}

#[test]
fn eio_on_sync_fails_the_round_keeps_the_old_state_and_the_next_round_succeeds() {
    let Some(strace) = strace("no EIO injection") else { return };
    let mut setup = Setup::new();
    let (source, target) = (setup.path("export"), setup.path("migration"));
    files(&source, 12, 100_000, 1);
    setup.job("zimbra", &source, &target);
    assert_eq!(setup.source.sync("zimbra")["in_sync"], true);
    let before = snapshot(&target, &[]).unwrap();

    // New and changed files, and a disk that fails its syncs.
    files(&source, 12, 120_000, 2);
    write(&source.join("d0/f-1-000"), &random_bytes(50_000, 77));
    let strace = strace.to_str().unwrap();
    let wrapper = |calls: &'static str| {
        [
            strace.to_owned(),
            "-f".into(),
            "-qq".into(),
            "-o".into(),
            "/dev/null".into(),
            "-e".into(),
            format!("trace={calls}"),
            "-e".into(),
            format!("inject={calls}:error=EIO"),
        ]
    };
    // First EIO from every syncfs (the sync of a batch of files before they are named into place),
    // then from every fsync and fdatasync (the state files: markers, the round record, manifests).
    for (calls, expected) in [("syncfs", "sync "), ("fsync,fdatasync", "cannot write ")] {
        let wrapper = wrapper(calls);
        let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
        setup.restart_daemon(&wrapper, &[]);
        let out = setup.source.run(&["sync", "--round", "zimbra", "--reconnect-grace", "5s"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(ferry::exit::ERROR), "{stderr}");
        println!("EIO from {calls}: {stderr}");
        assert!(stderr.contains("Input/output error"), "{stderr}");
        assert!(stderr.contains(expected) && stderr.contains("migration"), "not what and where: {stderr}");
        // Nothing whose sync failed was named into place: the target is still the first round's.
        // (The target folder's own mtime moved: the staging folder was made in it. The next round
        // that completes puts it back.)
        let mut after = snapshot(&target, &[]).unwrap();
        let mut before = before.clone();
        before.remove(&Vec::new());
        after.remove(&Vec::new());
        let target_dirs = |path: &[u8]| target.join(String::from_utf8_lossy(path).as_ref()).is_dir();
        if let Err(differences) = compare_trees(&before, &after, target_dirs) {
            panic!("a round whose sync failed changed the target: {differences}");
        }
    }

    // The disk is well again.
    setup.restart_daemon(&[], &[]);
    assert_eq!(setup.source.sync("zimbra")["in_sync"], true);
    assert_same_tree(&source, &target, |_| false);
    assert!(no_staging_leftovers(&target));
}

/// Two nodes whose target lives on a tmpfs of `size`, after a first round of `count` files of
/// `bytes`; `None` (and a loud skip) without root.
struct OnTmpfs {
    setup: Setup,
    disk: Tmpfs,
    source: std::path::PathBuf,
    target: std::path::PathBuf,
    /// The target after the first round.
    before: ferry_testkit::Snapshot,
}

fn on_tmpfs(what: &str, size: &str, count: usize, bytes: usize) -> Option<OnTmpfs> {
    if !may_mount(what) {
        return None;
    }
    let setup = Setup::new();
    let source = setup.path("export");
    let disk = Tmpfs::mount(&setup.path("disk"), size);
    let target = disk.0.join("migration");
    files(&source, count, bytes, 1);
    setup.job("zimbra", &source, &target);
    assert_eq!(setup.source.sync("zimbra")["in_sync"], true);
    let before = snapshot(&target, &[]).unwrap();
    Some(OnTmpfs { setup, disk, source, target, before })
}

#[test]
fn a_read_only_target_fails_the_round_clearly_and_the_next_one_succeeds() {
    let Some(OnTmpfs { setup, disk, source, target, before }) = on_tmpfs("the read-only test", "64m", 6, 100_000)
    else {
        return;
    };

    files(&source, 6, 100_000, 2);
    disk.set_read_only(true);
    let out = setup.source.run(&["sync", "--round", "zimbra"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(ferry::exit::ERROR), "{stderr}");
    println!("{stderr}");
    assert!(stderr.contains("Read-only file system"), "{stderr}");
    assert!(compare_trees(&before, &snapshot(&target, &[]).unwrap(), |_| false).is_ok());

    disk.set_read_only(false);
    assert_eq!(setup.source.sync("zimbra")["in_sync"], true);
    assert_same_tree(&source, &target, |_| false);
}

#[test]
fn a_disk_that_fills_mid_round_fails_it_cleanly_and_the_next_round_finishes() {
    let Some(OnTmpfs { setup, disk, source, target, before }) = on_tmpfs("the full-disk test", "40m", 2, 100_000)
    else {
        return;
    };

    // 24 MiB to send at 4 MiB/s: it fits when the round starts (the preflight lets it through), and
    // two seconds in, something else takes all the room left.
    files(&source, 24, 1 << 20, 2);
    let round = setup
        .source
        .ferry()
        .args(["sync", "--round", "zimbra", "--bwlimit", "4M"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let filler = disk.0.join("filler");
    {
        use std::io::Write;
        let mut file = std::fs::File::create(&filler).unwrap();
        let block = vec![7u8; 1 << 20];
        while file.write_all(&block).is_ok() {}
    }
    let out = round.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(ferry::exit::ERROR), "{stderr}");
    println!("{stderr}");
    assert!(stderr.contains("No space left on device"), "{stderr}");
    every_file_whole(&target, &source, &before);

    std::fs::remove_file(&filler).unwrap();
    assert_eq!(setup.source.sync("zimbra")["in_sync"], true);
    assert_same_tree(&source, &target, |_| false);
    assert!(no_staging_leftovers(&target));
}

#[test]
fn a_whole_list_against_a_fuller_target_counts_only_what_the_round_writes() {
    let Some(OnTmpfs { setup, disk: _disk, source, target, before }) =
        on_tmpfs("the whole-list space test", "8m", 5, 1 << 20)
    else {
        return;
    };
    // The source forgets the round the destination holds (its state lost, or the destination's
    // `Committed` never reached it): the next round lists the whole tree, 5 MiB of files on a
    // filesystem with less than that free. The destination holds them all: nothing is written, so
    // the round fits.
    let state = setup.source.config.join("data/jobs/zimbra/source");
    for name in ["manifest.base", "base.json"] {
        std::fs::remove_file(state.join(name)).unwrap();
    }
    let free = rustix::fs::statvfs(&target).unwrap();
    assert!(free.f_bavail * free.f_frsize < 5 << 20, "the test needs a target fuller than its files");
    let report = setup.source.sync("zimbra");
    assert_eq!(report["in_sync"], true, "{report}");
    assert_eq!(report["chunk_bytes"], 0, "{report}");
    assert!(compare_trees(&before, &snapshot(&target, &[]).unwrap(), |_| false).is_ok());

    // Files the check finds gone are written again, though the source changed nothing: with room
    // for fewer of them than that, the round is refused before it writes any.
    for i in 0..3 {
        std::fs::remove_file(target.join(format!("d{i}/f-1-{i:03}"))).unwrap();
    }
    let filler = target.parent().unwrap().join("filler");
    write(&filler, &vec![7; 4 << 20]);
    let out = setup.source.run(&["sync", "--round", "zimbra"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(ferry::exit::REFUSED), "{stderr}");
    assert!(stderr.contains("not enough space") && stderr.contains("3 files (3.0 MiB)"), "{stderr}");
    std::fs::remove_file(&filler).unwrap();
    assert_eq!(setup.source.sync("zimbra")["in_sync"], true);
    assert_same_tree(&source, &target, |_| false);
}

#[test]
fn a_prefilled_target_without_room_for_a_second_copy_is_taken_over_in_place() {
    if !may_mount("the pre-filled target test") {
        return;
    }
    let setup = Setup::new();
    let source = setup.path("export");
    let disk = Tmpfs::mount(&setup.path("disk"), "8m");
    let target = disk.0.join("migration");
    files(&source, 5, 1 << 20, 1);
    // A shipped copy: the same bytes already at the same paths, with a copy's modes and mtimes, and
    // less room left than another copy of them would take.
    for i in 0..5 {
        let path = format!("d{}/f-1-{i:03}", i % 3);
        std::fs::create_dir_all(target.join(&path).parent().unwrap()).unwrap();
        std::fs::copy(source.join(&path), target.join(&path)).unwrap();
    }
    let free = rustix::fs::statvfs(&target).unwrap();
    assert!(free.f_bavail * free.f_frsize < 5 << 20, "the test needs a target fuller than its files");
    setup.job("zimbra", &source, &target);
    // The copy was made well before the round, not within the second before it, when what the
    // indexing sees of a file cannot be trusted.
    std::thread::sleep(std::time::Duration::from_millis(1100));

    let report = setup.source.sync("zimbra");
    assert_eq!(report["in_sync"], true, "{report}");
    assert_eq!(report["chunk_bytes"], 0, "{report}");
    assert_same_tree(&source, &target, |_| false);
    assert!(no_staging_leftovers(&target));
    let report = setup.source.sync("zimbra");
    assert_eq!((report["in_sync"].as_bool(), report["check"]["changed"].as_u64()), (Some(true), Some(0)), "{report}");
}

/// Fills the filesystem of `dir` but for about `room` bytes, with a file whose path it returns.
fn fill_but(dir: &Path, room: u64) -> std::path::PathBuf {
    use std::io::Write;
    let filler = dir.join("filler");
    let mut file = std::fs::File::create(&filler).unwrap();
    let block = vec![7u8; 4096];
    while file.write_all(&block).is_ok() {}
    let len = file.metadata().unwrap().len();
    file.set_len(len.saturating_sub(room)).unwrap();
    filler
}

/// A job's state folder (`--data-dir`, here on a tmpfs of 8 MiB under the node's config) that
/// fills: on the source, with no room at all (the scan cannot begin its manifest) and with a little
/// (it fails halfway through a list of 6000 changes); on the destination, with a little (its new
/// manifest cannot be written). Each round fails saying which file and why, once; the destination
/// records the source's reason, not a lost connection; the next round, with room, finishes.
#[test]
fn a_full_disk_under_either_node_s_state_fails_the_round_saying_where_and_the_next_one_finishes() {
    if !may_mount("the full state folder test") {
        return;
    }
    let setup = Setup::new();
    let (source, target) = (setup.path("export"), setup.path("migration"));
    let source_state = Tmpfs::mount(&setup.source.config.join("data"), "8m");
    let dest_state = Tmpfs::mount(&setup.dest.config.join("data/jobs"), "8m");
    files(&source, 30, 1000, 1);
    setup.job("zimbra", &source, &target);
    assert_eq!(setup.source.sync("zimbra")["in_sync"], true);
    let before = snapshot(&target, &[]).unwrap();
    files(&source, 6000, 100, 2);

    for room in [0, 150_000] {
        let filler = fill_but(&source_state.0, room);
        let out = setup.source.run(&["sync", "--round", "zimbra"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        println!("{stderr}");
        assert_eq!(out.status.code(), Some(ferry::exit::ERROR), "{stderr}");
        assert!(
            stderr.contains("the scan failed: cannot keep the scan's records in the job's state folder"),
            "{stderr}"
        );
        assert_eq!(stderr.matches("No space left on device").count(), 1, "{stderr}");
        every_file_whole(&target, &source, &before);
        if room > 0 {
            let status = setup.dest.ok(&["status"]);
            assert!(status.contains("the source gave up: the scan failed"), "{status}");
        }
        std::fs::remove_file(&filler).unwrap();
    }

    let filler = fill_but(&dest_state.0, 150_000);
    let out = setup.source.run(&["sync", "--round", "zimbra"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stderr}");
    assert_eq!(out.status.code(), Some(ferry::exit::ERROR), "{stderr}");
    assert!(stderr.contains("dest failed the round") && stderr.contains("No space left on device"), "{stderr}");
    every_file_whole(&target, &source, &before);
    std::fs::remove_file(&filler).unwrap();

    assert_eq!(setup.source.sync("zimbra")["in_sync"], true);
    assert_same_tree(&source, &target, |_| false);
}

/// Cuts the file at `path` to half its length.
fn cut_in_half(path: &Path) {
    let len = std::fs::metadata(path).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(path).unwrap().set_len(len / 2).unwrap();
}

/// The source's copy of the last round's manifest (`manifest.base`, what its changes are counted
/// against) is only a copy: cut short, it is set aside and the round lists the whole manifest;
/// altered within (its trailer whole), the round that reads it fails saying so and sets it aside,
/// and the next one lists the whole manifest. Neither fails every night after.
#[test]
fn a_damaged_base_on_the_source_is_set_aside_and_the_whole_list_sent() {
    let setup = Setup::new();
    let (source, target) = (setup.path("export"), setup.path("migration"));
    files(&source, 30, 1000, 1);
    setup.job("zimbra", &source, &target);
    assert_eq!(setup.source.sync("zimbra")["in_sync"], true);
    let state = setup.source.config.join("data/jobs/zimbra/source");
    let (base, aside) = (state.join("manifest.base"), state.join("manifest.base.damaged"));

    cut_in_half(&base);
    files(&source, 30, 1000, 2);
    let out = setup.source.run(&["sync", "--round", "zimbra", "--json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("is damaged") && stderr.contains("the whole manifest: no round held in common"),
        "{stderr}"
    );
    assert!(aside.exists());
    assert_same_tree(&source, &target, |_| false);

    // Altered within: a byte of a record in the middle.
    let mut bytes = std::fs::read(&base).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    std::fs::write(&base, &bytes).unwrap();
    files(&source, 30, 1000, 3);
    let out = setup.source.run(&["sync", "--round", "zimbra"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stderr}");
    assert!(!out.status.success() && stderr.contains("is damaged; set aside: run the round again"), "{stderr}");
    assert!(!base.exists());
    assert_eq!(setup.source.sync("zimbra")["in_sync"], true);
    assert_same_tree(&source, &target, |_| false);
    let out = setup.source.run(&["sync", "--round", "zimbra"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.contains("0 changes sent (the tree is as in round"), "{stderr}");
}

/// The destination's committed manifest is what it knows it put in the target, and its chunk index
/// holds its records of what it placed: either cut short, no round is merged against them. A
/// damaged manifest stops the source before its export; each says how to go on, and the target is
/// untouched. Taking the target over as it is (the job added again) sends only what it lacks.
#[test]
fn damaged_destination_state_stops_rounds_saying_how_to_take_the_target_over() {
    let setup = Setup::new();
    let (source, target) = (setup.path("export"), setup.path("migration"));
    files(&source, 30, 100_000, 1);
    setup.job("zimbra", &source, &target);
    assert_eq!(setup.source.sync("zimbra")["in_sync"], true);
    let state = setup.dest.config.join("data/jobs/zimbra/target");

    for (seed, (file, says)) in
        [("manifest", "is damaged or gone"), ("chunks.redb", "the chunk index is damaged")].into_iter().enumerate()
    {
        let before = snapshot(&target, &[]).unwrap();
        cut_in_half(&state.join(file));
        files(&source, 3, 100_000, 2 + seed as u64);
        let out = setup.source.run(&["sync", "--round", "zimbra"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        println!("{stderr}");
        assert!(!out.status.success(), "{stderr}");
        assert!(stderr.contains(says) && stderr.contains("`ferry job remove zimbra --purge`"), "{stderr}");
        if file == "manifest" {
            assert!(!stderr.contains("scanning"), "the source went on with its export and scan: {stderr}");
        }
        assert!(compare_trees(&before, &snapshot(&target, &[]).unwrap(), |_| false).is_ok());

        setup.dest.ok(&["job", "remove", "zimbra", "--purge"]);
        setup.dest.ok(&["job", "add", "zimbra", "--path", target.to_str().unwrap(), "--peer", "source"]);
        let report = setup.source.sync("zimbra");
        assert_eq!(report["in_sync"], true, "{report}");
        assert_same_tree(&source, &target, |_| false);
        let sent = report["chunk_bytes"].as_u64().unwrap();
        assert!(sent < 4 * 100_000, "{sent} bytes of chunks sent for the 3 new files: {report}");
    }
}

/// A destination stopped between naming a round's manifest into place and recording the round
/// (here: `round.json` put back as the round before left it, `round.json.next` as the commit writes
/// it first, and the source's base as it was, since it never heard of the commit) holds the new
/// round: the next round is counted and merged against it, not the source's changes since round 1.
#[test]
fn a_commit_stopped_before_its_round_was_recorded_is_found_by_the_next_round() {
    let setup = Setup::new();
    let (source, target) = (setup.path("export"), setup.path("migration"));
    files(&source, 30, 1000, 1);
    setup.job("zimbra", &source, &target);
    assert_eq!(setup.source.sync("zimbra")["in_sync"], true);
    let state = setup.dest.config.join("data/jobs/zimbra/target");
    let first = std::fs::read(state.join("round.json")).unwrap();
    // The source never heard of the commit: its base stays round 1's.
    let source_state = setup.source.config.join("data/jobs/zimbra/source");
    let base: Vec<_> =
        ["manifest.base", "base.json"].map(|name| (name, std::fs::read(source_state.join(name)).unwrap())).into();
    files(&source, 30, 1000, 2);
    assert_eq!(setup.source.sync("zimbra")["round"], 2);
    std::fs::rename(state.join("round.json"), state.join("round.json.next")).unwrap();
    std::fs::write(state.join("round.json"), first).unwrap();
    base.iter().for_each(|(name, bytes)| std::fs::write(source_state.join(name), bytes).unwrap());

    files(&source, 30, 1000, 3);
    let report = setup.source.sync("zimbra");
    assert_eq!((report["round"].as_u64(), report["in_sync"].as_bool()), (Some(3), Some(true)), "{report}");
    assert_same_tree(&source, &target, |_| false);
    assert!(!state.join("round.json.next").exists());
    let verified = setup.dest.ok(&["verify", "zimbra"]);
    assert!(verified.contains("of round 3 checked: the target matches"), "{verified}");
}

/// The target's disk is not mounted (a reboot whose mount failed): its folder is missing, or an
/// empty mount point, on the filesystem above. The round refuses before the source's export rather
/// than fill that filesystem with the whole tree, writes nothing, and says how to fill it anyway. A
/// job its operator moves to an empty disk is filled.
#[test]
fn a_target_whose_disk_is_not_mounted_is_not_filled_unless_asked() {
    if !may_mount("the unmounted-disk test") {
        return;
    }
    let setup = Setup::new();
    let source = setup.path("export");
    let disk = Tmpfs::mount(&setup.path("disk"), "16m");
    let target = disk.0.join("migration");
    files(&source, 10, 1000, 1);
    setup.job("zimbra", &source, &target);
    assert_eq!(setup.source.sync("zimbra")["in_sync"], true);
    let status = std::process::Command::new("umount").arg(&disk.0).status().unwrap();
    assert!(status.success());
    files(&source, 10, 1000, 2);

    // Missing (the disk was mounted above it), then an empty mount point made by hand.
    for made in [false, true] {
        if made {
            std::fs::create_dir(&target).unwrap();
        }
        let out = setup.source.run(&["sync", "--round", "zimbra"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        println!("{stderr}");
        assert!(!out.status.success(), "{stderr}");
        let what = if made { "is empty" } else { "is missing" };
        assert!(stderr.contains(what) && stderr.contains("is its disk mounted?"), "{stderr}");
        assert!(stderr.contains("`ferry job adopt zimbra all`") && !stderr.contains("scanning"), "{stderr}");
        assert_eq!(target.exists(), made, "the round made the target folder");
        if made {
            assert_eq!(std::fs::read_dir(&target).unwrap().count(), 0, "the round wrote into the mount point");
        }
    }

    setup.dest.ok(&["job", "adopt", "zimbra", "all"]);
    assert_eq!(setup.source.sync("zimbra")["in_sync"], true);
    assert_same_tree(&source, &target, |_| false);

    // The job moved by its operator to an empty disk of its own is filled as asked.
    let bigger = Tmpfs::mount(&setup.path("bigger"), "16m");
    setup.dest.ok(&["job", "set", "zimbra", "--path", bigger.0.to_str().unwrap()]);
    assert_eq!(setup.source.sync("zimbra")["in_sync"], true);
    assert_same_tree(&source, &bigger.0, |_| false);
}

/// The source's export disk is not mounted: its folder is an empty mount point. Listed, that tree
/// would tell the destination every file went (and, with `--delete`, remove them); the round is not
/// started, and says why.
#[test]
fn a_source_whose_disk_is_not_mounted_is_not_read_as_an_empty_tree() {
    if !may_mount("the unmounted-source test") {
        return;
    }
    let setup = Setup::new();
    let target = setup.path("migration");
    let disk = Tmpfs::mount(&setup.path("export"), "16m");
    files(&disk.0, 10, 1000, 1);
    setup.job("zimbra", &disk.0, &target);
    assert_eq!(setup.source.sync("zimbra")["in_sync"], true);
    let before = snapshot(&target, &[]).unwrap();
    assert!(std::process::Command::new("umount").arg(&disk.0).status().unwrap().success());

    let out = setup.source.run(&["sync", "--round", "zimbra", "--delete"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stderr}");
    assert_eq!(out.status.code(), Some(ferry::exit::ERROR), "{stderr}");
    assert!(
        stderr.contains("the source folder") && stderr.contains("is empty") && !stderr.contains("scanning"),
        "{stderr}"
    );
    assert!(compare_trees(&before, &snapshot(&target, &[]).unwrap(), |_| false).is_ok());
}
