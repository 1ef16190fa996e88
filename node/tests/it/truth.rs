//! A round's word is the disk's: each round checks the target against what ferry put there, and
//! "matches", `in_sync` and exit 0 hold only when the disk, compared independently, agrees. Local
//! rounds through the binary, network rounds between two real nodes.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Output;

use crate::network::{Node, Setup};
use crate::util::{assert_same_tree, sentinel, write};

/// A local round through the binary: its exit code, its JSON report (when it printed one) and stderr.
fn local(dir: &Path, extra: &[&str]) -> (i32, serde_json::Value, String) {
    let out = std::process::Command::new(crate::util::ferry_bin())
        .args(["sync", "--round", "--json", "--state-dir"])
        .arg(dir.join("state"))
        .arg(dir.join("src"))
        .arg(dir.join("dst"))
        .args(extra)
        .output()
        .unwrap();
    let json = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out.status.code().unwrap_or(-1), json, String::from_utf8_lossy(&out.stderr).into_owned())
}

fn source_tree(dir: &Path) {
    for i in 0..6 {
        write(
            &dir.join(format!("src/accounts/a{}/items/{i}", i % 2)),
            &crate::util::random_bytes(20_000 + i * 997, i as u64),
        );
    }
    write(&dir.join("src/backupstat"), b"{\"scan\": 1}");
    std::os::unix::fs::symlink("backupstat", dir.join("src/current")).unwrap();
}

/// Puts back `path`'s mtime after `change`: an edit no quick check on size and mtime can see.
fn behind_the_mtime(path: &Path, change: impl FnOnce()) {
    let mtime = std::fs::metadata(path).unwrap().modified().unwrap();
    change();
    std::fs::File::options().write(true).open(path).unwrap().set_modified(mtime).unwrap();
}

#[test]
fn a_wiped_target_is_found_missing_and_filled_again() {
    let dir = tempfile::tempdir().unwrap();
    source_tree(dir.path());
    let (code, first, err) = local(dir.path(), &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(first["in_sync"], true);
    std::fs::remove_dir_all(dir.path().join("dst")).unwrap();

    let (code, report, err) = local(dir.path(), &[]);
    assert_eq!(code, 0, "{err}");
    assert!(report["check"]["missing"].as_u64().unwrap() >= 9, "{report}");
    assert_eq!(report["in_sync"], true);
    assert_same_tree(&dir.path().join("src"), &dir.path().join("dst"), |_| false);
}

#[test]
fn entries_changed_behind_ferrys_back_are_put_right_and_never_called_in_sync_before() {
    let dir = tempfile::tempdir().unwrap();
    source_tree(dir.path());
    assert_eq!(local(dir.path(), &[]).0, 0);
    let dst = dir.path().join("dst");
    // A byte changed in place with the mtime put back, a chmod, a chown, a deleted file, a removed folder.
    behind_the_mtime(&dst.join("accounts/a0/items/0"), || {
        use std::os::unix::fs::FileExt;
        std::fs::File::options().write(true).open(dst.join("accounts/a0/items/0")).unwrap().write_at(b"X", 5).unwrap();
    });
    std::fs::set_permissions(dst.join("accounts/a0/items/2"), std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .unwrap();
    std::fs::remove_file(dst.join("accounts/a0/items/4")).unwrap();
    std::fs::remove_dir_all(dst.join("accounts/a1")).unwrap();
    // A chown moves the ctime as a chmod does (root only can give a file away).
    let chowned = crate::util::is_root();
    if chowned {
        std::os::unix::fs::lchown(dst.join("backupstat"), Some(4321), Some(4321)).unwrap();
    }

    let (code, report, err) = local(dir.path(), &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(report["check"]["changed"], if chowned { 3 } else { 2 }, "{report}");
    assert!(report["check"]["missing"].as_u64().unwrap() >= 5, "{report}");
    // The chmod'ed and chown'ed files hold what ferry wrote (read and hashed): their metadata is put
    // back, and they are not written again; the edited one is.
    assert_eq!(report["apply"]["metadata_updated"], if chowned { 2 } else { 1 }, "{report}");
    let differences = report["check"]["differences"].to_string();
    assert!(differences.contains("items/2: its owner, mode or times changed"), "{differences}");
    assert!(differences.contains("items/0: was changed in place"), "{differences}");
    assert_same_tree(&dir.path().join("src"), &dst, |_| false);

    // A round with nothing to put right finds nothing.
    let (code, report, _) = local(dir.path(), &[]);
    assert_eq!(code, 0);
    assert_eq!(report["check"]["missing"].as_u64().unwrap() + report["check"]["changed"].as_u64().unwrap(), 0);
}

#[test]
fn what_someone_else_put_at_a_path_of_ferrys_stays_until_adopted_and_the_round_says_so() {
    let dir = tempfile::tempdir().unwrap();
    source_tree(dir.path());
    assert_eq!(local(dir.path(), &[]).0, 0);
    let dst = dir.path().join("dst");
    // The administrator puts a symlink where ferry's file was.
    std::fs::remove_file(dst.join("backupstat")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", dst.join("backupstat")).unwrap();

    for round in 0..2 {
        let (code, report, err) = local(dir.path(), &[]);
        assert!(matches!(code, ferry::exit::INCOMPLETE), "{report} {err}");
        assert_eq!(report["in_sync"], false);
        // Found the first time; no longer ferry's the second (and still in the way).
        assert_eq!(report["check"]["foreign"], if round == 0 { 1 } else { 0 }, "{report}");
        let failures = report["apply"]["failures"].to_string();
        assert!(failures.contains("backupstat") && failures.contains("--adopt backupstat"), "{failures}");
        assert!(std::fs::symlink_metadata(dst.join("backupstat")).unwrap().file_type().is_symlink());
    }
    let (code, report, err) = local(dir.path(), &["--adopt", "backupstat"]);
    assert_eq!(code, 0, "{report} {err}");
    assert_same_tree(&dir.path().join("src"), &dst, |_| false);
}

#[test]
fn delete_never_removes_a_file_the_administrator_put_in_place_of_ferrys() {
    let dir = tempfile::tempdir().unwrap();
    source_tree(dir.path());
    assert_eq!(local(dir.path(), &[]).0, 0);
    let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
    // Their own copy: another inode, the same bytes and mtime.
    let theirs = dst.join("accounts/a1/items/1");
    let copy = dir.path().join("copy");
    std::fs::copy(&theirs, &copy).unwrap();
    behind_the_mtime(&copy, || {});
    std::fs::rename(&copy, &theirs).unwrap();
    let inode = std::fs::metadata(&theirs).unwrap().ino();
    std::fs::remove_file(src.join("accounts/a1/items/1")).unwrap();
    std::fs::remove_file(src.join("accounts/a1/items/3")).unwrap();

    let (_, report, err) = local(dir.path(), &["--delete"]);
    assert_eq!(report["check"]["foreign"], 1, "{report} {err}");
    assert_eq!(std::fs::metadata(&theirs).unwrap().ino(), inode, "the administrator's file was removed");
    assert!(!dst.join("accounts/a1/items/3").exists(), "ferry's own file was not removed");
}

#[test]
fn a_destination_only_file_is_not_overwritten_when_the_source_gains_its_name() {
    let dir = tempfile::tempdir().unwrap();
    source_tree(dir.path());
    assert_eq!(local(dir.path(), &[]).0, 0);
    let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
    write(&dst.join("map_x"), b"the import's own record");
    write(&src.join("map_x"), b"the source's file of that name");

    let (code, report, err) = local(dir.path(), &[]);
    assert!(matches!(code, ferry::exit::INCOMPLETE), "{report} {err}");
    assert_eq!(std::fs::read(dst.join("map_x")).unwrap(), b"the import's own record");
    let (code, _, err) = local(dir.path(), &["--adopt", "map_x"]);
    assert_eq!(code, 0, "{err}");
    assert_same_tree(&src, &dst, |_| false);
}

#[test]
fn a_prefilled_target_is_adopted_and_converges_on_type_changes() {
    let dir = tempfile::tempdir().unwrap();
    source_tree(dir.path());
    let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
    // Filled before ferry, as `rsync -aH` or `cp -a` would.
    let copied = std::process::Command::new("cp").arg("-a").arg(&src).arg(&dst).status().unwrap();
    assert!(copied.success());
    let (code, report, err) = local(dir.path(), &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(report["adopted"], true);
    // A file becomes a folder, a folder a symlink, a symlink a file.
    std::fs::remove_file(src.join("backupstat")).unwrap();
    write(&src.join("backupstat/inner"), b"now a folder");
    std::fs::remove_dir_all(src.join("accounts/a1")).unwrap();
    std::os::unix::fs::symlink("a0", src.join("accounts/a1")).unwrap();
    std::fs::remove_file(src.join("current")).unwrap();
    write(&src.join("current"), b"now a file");

    let (code, report, err) = local(dir.path(), &["--delete"]);
    assert_eq!(code, 0, "{report} {err}");
    assert_eq!(report["in_sync"], true);
    assert_same_tree(&src, &dst, |_| false);
}

#[test]
fn a_local_dry_run_writes_nothing_not_even_its_state() {
    let dir = tempfile::tempdir().unwrap();
    source_tree(dir.path());
    // Before any round: no target, no state folder afterwards.
    let (code, plan, err) = local(dir.path(), &["--dry-run"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(plan["files"], 7, "{plan}");
    assert!(!dir.path().join("dst").exists() && !dir.path().join("state").exists());

    assert_eq!(local(dir.path(), &[]).0, 0);
    let (src, dst, state) = (dir.path().join("src"), dir.path().join("dst"), dir.path().join("state"));
    write(&src.join("accounts/a0/items/new"), &crate::util::random_bytes(5000, 77));
    std::fs::remove_file(dst.join("backupstat")).unwrap();
    let (target_before, state_before) = (sentinel(&dst), sentinel(&state));
    let (code, plan, err) = local(dir.path(), &["-n"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!((plan["files"].as_u64(), plan["check"]["missing"].as_u64()), (Some(2), Some(1)), "{plan}");
    assert_eq!(sentinel(&dst), target_before, "the dry run changed the target");
    assert_eq!(sentinel(&state), state_before, "the dry run changed the state folder");
}

#[test]
fn a_local_round_refuses_what_it_cannot_honour() {
    let dir = tempfile::tempdir().unwrap();
    source_tree(dir.path());
    for option in [&["--bwlimit", "1M"][..], &["--max-duration", "1h"], &["--import", "full"], &["--low-priority"]] {
        let (code, _, err) = local(dir.path(), option);
        assert_eq!(code, ferry::exit::USAGE, "{option:?}: {err}");
        assert!(err.contains(option[0]), "{option:?}: {err}");
    }
    assert!(!dir.path().join("dst").exists(), "a refused round wrote its target");
    // A target inside its source would nest a copy deeper every round.
    let out = std::process::Command::new(crate::util::ferry_bin())
        .args(["sync", "--round", "--state-dir"])
        .arg(dir.path().join("state"))
        .arg(dir.path().join("src"))
        .arg(dir.path().join("src/copy"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(ferry::exit::ERROR));
    assert!(String::from_utf8_lossy(&out.stderr).contains("inside the source"));
    assert!(!dir.path().join("src/copy").exists());
}

/// Two nodes on loopback with a job `zimbra` from a source tree to `migration`.
fn network_job() -> (Setup, std::path::PathBuf, std::path::PathBuf) {
    let setup = Setup::new();
    let (source, target) = (setup.path("export"), setup.path("migration"));
    source_tree(setup.dir.path());
    std::fs::rename(setup.path("src"), &source).unwrap();
    setup.job("zimbra", &source, &target);
    (setup, source, target)
}

fn sync_json(setup: &Setup, job: &str) -> (Output, serde_json::Value) {
    let out = setup.source.run(&["sync", "--round", job, "--json"]);
    let json = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out, json)
}

#[test]
fn a_network_round_checks_the_target_and_puts_back_what_was_removed() {
    let (setup, source, target) = network_job();
    assert_eq!(setup.source.sync("zimbra")["in_sync"], true);

    // Everything in the target goes, the source gains one file.
    for entry in std::fs::read_dir(&target).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() { std::fs::remove_dir_all(&path).unwrap() } else { std::fs::remove_file(&path).unwrap() }
    }
    write(&source.join("accounts/a0/items/new"), b"one new item");
    let (out, report) = sync_json(&setup, "zimbra");
    assert!(out.status.success(), "{:?} {report} {}", out.status, String::from_utf8_lossy(&out.stderr));
    assert_eq!(report["in_sync"], true, "{report}");
    assert!(report["notices"].to_string().contains("missing"), "{report}");
    // The report says what the destination's check found: every entry of the last round missing
    // but the target folder itself, whose mtime moved.
    let check = &report["check"];
    assert_eq!(
        (check["missing"].as_u64().unwrap() + 1, check["folders"].as_u64()),
        (check["entries"].as_u64().unwrap(), Some(1)),
        "{report}"
    );
    assert_same_tree(&source, &target, |_| false);

    // Replaced by someone else: left alone, not in sync, exit 3, and said.
    std::fs::remove_file(target.join("backupstat")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", target.join("backupstat")).unwrap();
    let (out, report) = sync_json(&setup, "zimbra");
    assert_eq!(out.status.code(), Some(ferry::exit::INCOMPLETE), "{report}");
    assert_eq!(report["in_sync"], false, "{report}");
    assert!(report["failures"].to_string().contains("backupstat"), "{report}");
}

#[test]
fn a_chmod_of_the_whole_network_target_sends_nothing_again() {
    let (setup, source, target) = network_job();
    assert_eq!(setup.source.sync("zimbra")["in_sync"], true);
    // What an administrator does to a migration folder: every file's mode (and ctime) changes.
    let files = crate::util::regular_files(&target);
    for (path, _) in &files {
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o640)).unwrap();
    }
    let (out, report) = sync_json(&setup, "zimbra");
    assert!(out.status.success(), "{report}");
    assert_eq!(report["check"]["changed"], files.len(), "{report}");
    assert_eq!((report["chunk_bytes"].as_u64(), report["in_sync"].as_bool()), (Some(0), Some(true)), "{report}");
    assert_same_tree(&source, &target, |_| false);
    let (_, report) = sync_json(&setup, "zimbra");
    assert_eq!(report["check"]["changed"], 0, "the modes put back are recorded: {report}");
}

/// On a network round's destination the operator adopts with `ferry job adopt`: the next round
/// replaces what is there, once; what is replaced after it is left alone again.
#[test]
fn what_someone_else_put_in_a_network_target_is_replaced_once_adopted_on_the_destination() {
    let (setup, source, target) = network_job();
    assert_eq!(setup.source.sync("zimbra")["in_sync"], true);
    let theirs = |path: &Path| {
        std::fs::remove_file(path).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", path).unwrap();
    };
    theirs(&target.join("backupstat"));
    let (out, report) = sync_json(&setup, "zimbra");
    assert_eq!(out.status.code(), Some(ferry::exit::INCOMPLETE), "{report}");
    assert!(report["failures"].to_string().contains("ferry job adopt JOB backupstat"), "{report}");
    // Adoption is asked for on the destination, of a job and a path inside its target.
    for bad in [&["job", "adopt", "zimbra", "../etc"][..], &["job", "adopt", "nojob", "backupstat"]] {
        let out = setup.dest.run(bad);
        assert!(!out.status.success(), "{bad:?} taken: {}", String::from_utf8_lossy(&out.stdout));
    }
    let out = setup.source.run(&["sync", "--round", "zimbra", "--adopt", "backupstat"]);
    assert_eq!(out.status.code(), Some(ferry::exit::USAGE));
    assert!(String::from_utf8_lossy(&out.stderr).contains("ferry job adopt"));
    assert!(setup.dest.ok(&["job", "adopt", "zimbra", "backupstat"]).contains("backupstat"));
    let adopting = |setup: &Setup| {
        let status: serde_json::Value = serde_json::from_str(&setup.dest.ok(&["status", "--json"])).unwrap();
        status["jobs"][0]["adopting"].clone()
    };
    assert_eq!(adopting(&setup), serde_json::json!(["backupstat"]));

    let (out, report) = sync_json(&setup, "zimbra");
    assert!(out.status.success(), "{report} {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(report["in_sync"], true, "{report}");
    assert_same_tree(&source, &target, |_| false);
    assert_eq!(adopting(&setup), serde_json::json!([]));
    // Taken by the round: the next replacement is the administrator's again.
    theirs(&target.join("backupstat"));
    let (out, report) = sync_json(&setup, "zimbra");
    assert_eq!(out.status.code(), Some(ferry::exit::INCOMPLETE), "{report}");
    assert!(std::fs::symlink_metadata(target.join("backupstat")).unwrap().file_type().is_symlink());
}

/// Rounds without `--delete` keep what the source removed; the destination remembers it as its own,
/// so that the first round with `--delete`, nights later, removes it (and no more than it).
#[test]
fn what_nights_without_delete_kept_a_round_with_delete_removes() {
    let (setup, source, target) = network_job();
    assert_eq!(setup.source.sync("zimbra")["in_sync"], true);
    std::fs::remove_file(source.join("accounts/a0/items/0")).unwrap();
    std::fs::remove_dir_all(source.join("accounts/a1")).unwrap();
    write(&source.join("accounts/a0/items/new"), b"a new item");
    for _ in 0..2 {
        let report = setup.source.sync("zimbra");
        assert_eq!(report["in_sync"], true, "{report}");
        assert!(target.join("accounts/a0/items/0").exists() && target.join("accounts/a1/items/1").exists());
    }
    std::fs::write(target.join("map_zimbra"), b"the import's own file").unwrap();
    let out = setup.source.run(&["sync", "--round", "zimbra", "--delete", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!target.join("accounts/a0/items/0").exists() && !target.join("accounts/a1").exists());
    assert_eq!(std::fs::read(target.join("map_zimbra")).unwrap(), b"the import's own file");
    assert_same_tree(&source, &target, |p| p == b"map_zimbra");
}

#[test]
fn a_round_that_brings_nothing_new_runs_no_import() {
    let (setup, source, _) = network_job();
    let calls = setup.path("calls.log");
    let script = setup.path("import.sh");
    std::fs::write(&script, format!("#!/bin/sh\necho \"$*\" >> '{}'\n", calls.display())).unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    setup.dest.ok(&["job", "set", "zimbra", "--import-cmd", &format!("{} {{round}}", script.display())]);
    let imports = || std::fs::read_to_string(&calls).unwrap_or_default().lines().count();

    assert_eq!(setup.source.sync("zimbra")["import"]["success"], true);
    assert_eq!(imports(), 1);
    // Nothing changed: no import, and the report says why.
    let report = setup.source.sync("zimbra");
    assert_eq!(imports(), 1, "{report}");
    assert!(report["notices"].to_string().contains("import skipped: nothing changed"), "{report}");
    // Unless asked for.
    let out = setup.source.run(&["sync", "--round", "zimbra", "--import", "full"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(imports(), 2);
    // Something new: the import runs.
    write(&source.join("accounts/a1/items/new"), b"new");
    setup.source.sync("zimbra");
    assert_eq!(imports(), 3);
}

#[test]
fn overlapping_destination_jobs_and_a_config_no_command_could_load_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (source, dest) = (Node::init(dir.path(), "source"), Node::init(dir.path(), "dest"));
    dest.ok(&["trust", &source.id, "--name", "source"]);
    let target = dir.path().join("migration");
    dest.ok(&["job", "add", "a", "--path", target.to_str().unwrap(), "--peer", "source"]);
    for (name, path) in [("b", target.join("inner")), ("c", target.clone()), ("d", dir.path().to_owned())] {
        let out = dest.run(&["job", "add", name, "--path", path.to_str().unwrap(), "--peer", "source"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(ferry::exit::ERROR), "{name}: {stderr}");
        assert!(stderr.contains("overlaps the folder of job \"a\""), "{stderr}");
    }
    assert!(!dest.ok(&["job", "list"]).contains(" b"), "a refused job was saved");
    // Beside it, not inside: fine.
    dest.ok(&["job", "add", "e", "--path", dir.path().join("migration-2").to_str().unwrap(), "--peer", "source"]);
    // A change every later command would refuse to load is not written.
    let out = dest.run(&["trust", &source.id, "--name", "source", "--addr", "nonsense"]);
    assert!(!out.status.success());
    dest.ok(&["job", "list"]);
}

#[test]
fn a_target_restored_from_a_copy_is_adopted_whole_without_rewriting_it() {
    let dir = tempfile::tempdir().unwrap();
    source_tree(dir.path());
    assert_eq!(local(dir.path(), &[]).0, 0);
    let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
    // The target folder restored from a copy: every inode is new, every byte and mtime as it was.
    std::fs::rename(&dst, dir.path().join("dst.old")).unwrap();
    assert!(
        std::process::Command::new("cp")
            .arg("-a")
            .arg(dir.path().join("dst.old"))
            .arg(&dst)
            .status()
            .unwrap()
            .success()
    );
    let (code, report, err) = local(dir.path(), &[]);
    assert_eq!(code, 0, "{report} {err}");
    assert_eq!(report["adopted"], true);
    assert_eq!(report["apply"]["files_written"], 0, "{report}");
    assert_same_tree(&src, &dst, |_| false);
    // From then on it is ferry's: a change of the administrator's is found again.
    std::fs::remove_file(dst.join("backupstat")).unwrap();
    std::os::unix::fs::symlink("elsewhere", dst.join("backupstat")).unwrap();
    let (code, report, _) = local(dir.path(), &[]);
    assert!(matches!(code, ferry::exit::INCOMPLETE), "{report}");
    assert_eq!(report["check"]["foreign"], 1, "{report}");
}

/// A destination job pointed at another folder (`ferry job set --path`): the next round fills the new
/// folder (it is not the one ferry filled) before it says the target matches.
#[test]
fn a_destination_job_moved_to_an_empty_folder_is_filled_before_it_matches() {
    let (setup, source, target) = network_job();
    assert_eq!(setup.source.sync("zimbra")["in_sync"], true);
    let moved = setup.path("migration-moved");
    setup.dest.ok(&["job", "set", "zimbra", "--path", moved.to_str().unwrap()]);
    let (out, report) = sync_json(&setup, "zimbra");
    assert!(out.status.success(), "{report} {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(report["in_sync"], true, "{report}");
    assert_same_tree(&source, &moved, |_| false);
    // The old folder is left as it was.
    assert_same_tree(&source, &target, |_| false);
}

#[test]
fn a_tree_with_entries_the_round_does_not_carry_never_matches_unless_told_to_leave_them() {
    let dir = tempfile::tempdir().unwrap();
    source_tree(dir.path());
    let fifo = dir.path().join("src/accounts/a0/pipe");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let (code, report, err) = local(dir.path(), &[]);
    assert!(matches!(code, ferry::exit::INCOMPLETE), "{report} {err}");
    assert_eq!(report["in_sync"], false);
    assert_eq!(
        (report["scan"]["skipped_count"].as_u64(), report["scan"]["skipped_special"].as_u64()),
        (Some(1), Some(1))
    );
    assert!(err.contains("accounts/a0/pipe"), "{err}");
    let (code, report, err) = local(dir.path(), &["--skip-special"]);
    assert_eq!(code, 0, "{report} {err}");
    assert_eq!(report["in_sync"], true);

    // A network round says the same, and how many.
    let (setup, source, _) = network_job();
    assert!(std::process::Command::new("mkfifo").arg(source.join("pipe")).status().unwrap().success());
    let (out, report) = sync_json(&setup, "zimbra");
    assert!(matches!(out.status.code(), Some(ferry::exit::INCOMPLETE)), "{report}");
    assert_eq!((report["in_sync"].as_bool(), report["skipped_count"].as_u64()), (Some(false), Some(1)), "{report}");
    let out = setup.source.run(&["sync", "--round", "zimbra", "--skip-special", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// A file that keeps changing while the source reads it (an export still writing it) is left for
/// the next round, and the round does not call the target a match: exit 3, `in_sync` false, the
/// file named. Once it settles, the next round matches.
#[test]
fn a_file_that_changes_while_the_source_reads_it_keeps_the_round_from_matching() {
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};
    let (setup, source, target) = network_job();
    assert_eq!(sync_json(&setup, "zimbra").1["in_sync"], true);
    let growing = source.join("accounts/a1/growing");
    write(&growing, &crate::util::random_bytes(4 << 20, 9));
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, growing) = (stop.clone(), growing.clone());
        std::thread::spawn(move || {
            let mut file = std::fs::OpenOptions::new().append(true).open(growing).unwrap();
            while !stop.load(Ordering::Relaxed) {
                file.write_all(b"x").unwrap();
                std::thread::sleep(std::time::Duration::from_micros(100));
            }
        })
    };
    let (out, report) = sync_json(&setup, "zimbra");
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(ferry::exit::INCOMPLETE), "{report} {stderr}");
    assert_eq!(report["in_sync"], false, "{report}");
    assert_eq!(report["changed_while_read"], serde_json::json!(["accounts/a1/growing"]), "{report}");
    assert!(!target.join("accounts/a1/growing").exists());

    let (out, report) = sync_json(&setup, "zimbra");
    assert!(out.status.success() && report["in_sync"] == true, "{report}");
    assert_same_tree(&source, &target, |_| false);
}

/// A network dry run counts what its check found as the round does: a chunk of a file edited in the
/// target since is asked for, not counted as held there.
#[test]
fn a_dry_run_asks_for_what_the_round_sends_after_a_file_was_edited_in_the_target() {
    let setup = Setup::new();
    let (source, target) = (setup.path("export"), setup.path("migration"));
    let original = crate::util::random_bytes(1 << 20, 41);
    write(&source.join("store/a"), &original);
    setup.job("zimbra", &source, &target);
    assert_eq!(setup.source.sync("zimbra")["in_sync"], true);
    // Someone edits the target's copy in place; the source gains a second copy of the original.
    write(&target.join("store/a"), &crate::util::random_bytes(1 << 20, 42));
    write(&source.join("store/b"), &original);

    let plan: serde_json::Value =
        serde_json::from_str(&setup.source.ok(&["sync", "--round", "zimbra", "--dry-run", "--json"])).unwrap();
    let need = plan["need_bytes"].as_u64().unwrap();
    let real = setup.source.sync("zimbra");
    assert_eq!(real["in_sync"], true, "{real}");
    assert!(real["chunk_bytes"].as_u64().unwrap() >= 1 << 20, "{real}");
    assert_eq!(real["chunk_bytes"].as_u64().unwrap(), need, "the plan asked for what the round sent: {plan}");
    assert_same_tree(&source, &target, |_| false);
}
