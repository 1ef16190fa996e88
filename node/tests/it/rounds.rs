//! Rounds that do not go to plan, with real processes: kill -9 of either node under a bandwidth limit,
//! deadlines, dry runs, a full disk, hooks, pauses and reloads.

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use ferry_testkit::{TreeGenerator, TreeSpec, UdpProxy};
use rand::{RngExt, SeedableRng};

use crate::network::{Daemon, Setup};
use crate::util::{assert_same_tree, is_root, may_mount, random_bytes};

/// `files` files of `size` random (incompressible) bytes each.
pub(crate) fn random_tree(dir: &Path, files: usize, size: usize, seed: u64) -> u64 {
    for i in 0..files {
        crate::util::write(&dir.join(format!("d{}/blob-{i:03}", i % 4)), &random_bytes(size, seed + i as u64));
    }
    (files * size) as u64
}

/// How many files are in `target`, each asserted to be its file in `source` whole.
fn kept_whole(source: &Path, target: &Path) -> usize {
    let files = walk(target);
    for entry in &files {
        let relative = entry.strip_prefix(target).unwrap();
        assert_eq!(std::fs::read(entry).unwrap(), std::fs::read(source.join(relative)).unwrap(), "{entry:?}");
    }
    files.len()
}

fn kill9(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn status_json(node: &crate::network::Node, job: &str) -> serde_json::Value {
    serde_json::from_str(&node.ok(&["status", job, "--json"])).unwrap()
}

#[test]
fn kill_loop_of_both_nodes_under_a_bandwidth_limit_loses_only_what_was_in_flight() {
    let mut setup = Setup::new();
    let (source, target) = (setup.path("export"), setup.path("migration"));
    // 48 MiB in 192 files at 4 MiB/s: about 12 s for a clean round.
    let tree_bytes = random_tree(&source, 192, 256 << 10, 1);
    setup.job("zimbra", &source, &target);
    // Everything between the nodes goes through a proxy that counts it and outlives both of them.
    let proxy = UdpProxy::start(setup.daemon.addr.parse().unwrap()).unwrap();
    setup.source.ok(&["trust", &setup.dest.id, "--name", "dest", "--addr", &proxy.addr().to_string()]);
    let start_sync = |setup: &Setup| -> Child {
        setup
            .source
            .ferry()
            .args(["sync", "--round", "zimbra", "--bwlimit", "4M", "--json"])
            .stdout(Stdio::piped())
            .stderr(crate::network::debug_log("sync"))
            .spawn()
            .unwrap()
    };

    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let mut sync = start_sync(&setup);
    let mut kills = (0, 0);
    for i in 0..6 {
        std::thread::sleep(Duration::from_millis(rng.random_range(1500..3000)));
        if sync.try_wait().unwrap().is_some() {
            break;
        }
        eprintln!("before kill {i}: {:?} bytes, target {} files", proxy.bytes(), walk(&target).len());
        if i % 2 == 0 {
            // The source dies; the next one starts over from its scan and the destination's index.
            kill9(&mut sync);
            kills.0 += 1;
            sync = start_sync(&setup);
        } else {
            // The daemon dies; the source notices the restarted one's reset and reconnects by itself.
            kill9(&mut setup.daemon.child);
            kills.1 += 1;
            setup.daemon = Daemon::start(&setup.dest);
            proxy.set_upstream(setup.daemon.addr.parse().unwrap());
        }
    }
    assert!(kills.0 >= 2 && kills.1 >= 2, "the round ended before the kills: {kills:?}");
    assert!(kills.0 + kills.1 >= 5, "the round ended before the kills: {kills:?}");
    let deadline = Instant::now() + Duration::from_secs(120);
    while sync.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the last sync did not finish");
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = sync.wait_with_output().unwrap();
    assert!(out.status.success());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["in_sync"], true, "{report}");
    assert!(report["connections"].as_u64().unwrap() >= 2, "the daemon's restart made the source reconnect: {report}");
    assert_same_tree(&source, &target, |_| false);
    assert!(crate::util::no_staging_leftovers(&target));

    // Every byte over every attempt: within a small margin of one clean round (the data, plus QUIC's
    // framing and acknowledgements, about 4%, plus what was in flight at each kill).
    let (up, down) = proxy.bytes();
    let total = up + down;
    eprintln!("kill loop: {kills:?} kills, {total} bytes through the proxy for a {tree_bytes}-byte tree");
    assert!(total < tree_bytes + tree_bytes / 4, "{total} bytes on the wire for {tree_bytes}");

    // Both nodes' history shows the round.
    let dest = status_json(&setup.dest, "zimbra");
    let received = dest["jobs"][0]["received"].as_array().unwrap();
    assert!(received.iter().any(|r| r["event"] == "committed" && r["round"] == 1), "{dest}");
    assert!(dest["jobs"][0]["round_running"].is_null(), "{dest}");
    let src = status_json(&setup.source, "zimbra");
    let pushed = src["jobs"][0]["pushed"].as_array().unwrap();
    assert_eq!(pushed.len(), 1, "{src}");
    assert_eq!(pushed[0]["root_hash"], report["root_hash"]);
}

#[test]
fn a_deadline_stops_cleanly_and_the_next_round_resumes_without_resending() {
    let setup = Setup::new();
    let (source, target) = (setup.path("export"), setup.path("migration"));
    let tree_bytes = random_tree(&source, 64, 256 << 10, 2);
    setup.job("zimbra", &source, &target);

    let started = Instant::now();
    let out = setup.source.run(&["sync", "--round", "zimbra", "--bwlimit", "4M", "--max-duration", "2s"]);
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(ferry::exit::DEADLINE), "{stderr}");
    assert!(stderr.contains("stopped at the deadline") && stderr.contains("run the round again"), "{stderr}");
    assert!(took < Duration::from_secs(20), "{took:?}");
    // What is at a final path is whole: every file there is the source's file.
    let kept = kept_whole(&source, &target);
    assert!(kept > 0, "nothing was kept");
    assert!(crate::util::no_staging_leftovers(&target));

    let second = setup.source.sync("zimbra");
    assert_eq!(second["in_sync"], true);
    assert_same_tree(&source, &target, |_| false);
    let resent = second["chunk_bytes"].as_u64().unwrap();
    let kept_bytes = kept as u64 * (256 << 10);
    assert!(resent <= tree_bytes - kept_bytes + (2 << 20), "{resent} sent again, {kept_bytes} were kept");
}

/// SIGTERM stops a round as its deadline would: the batches on the wire finish, what arrived whole is
/// kept at its final path, the round ends with its own exit code and is recorded as stopped, and the
/// next round sends only the rest.
#[test]
fn a_signal_stops_the_round_cleanly_and_the_next_round_goes_on() {
    use std::io::BufRead;
    let setup = Setup::new();
    let (source, target) = (setup.path("export"), setup.path("migration"));
    let tree_bytes = random_tree(&source, 64, 256 << 10, 4);
    setup.job("zimbra", &source, &target);

    let mut child = setup
        .source
        .ferry()
        .args(["sync", "--round", "zimbra", "--bwlimit", "4M", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Once the list is sent and chunks flow, a second in: SIGTERM.
    let stderr = child.stderr.take().unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let mut log = String::new();
    let started = Instant::now();
    while !log.contains("changes sent") {
        let line = lines_rx.recv_timeout(Duration::from_secs(30)).expect("the round did not start sending");
        log.push_str(&line);
        log.push('\n');
    }
    std::thread::sleep(Duration::from_secs(1));
    let killed = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(killed.success());
    let out = child.wait_with_output().unwrap();
    reader.join().unwrap();
    log.extend(lines_rx.try_iter().map(|line| line + "\n"));
    assert_eq!(out.status.code(), Some(ferry::exit::STOPPED), "{log}");
    assert!(log.contains("SIGTERM: stopping the round cleanly") && log.contains("stopped by SIGTERM"), "{log}");
    assert!(started.elapsed() < Duration::from_secs(30), "{:?}", started.elapsed());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((report["outcome"].as_str(), report["exit_code"].as_i64()), (Some("stopped"), Some(9)), "{report}");

    // What is at a final path is whole, and some of it arrived.
    let kept = kept_whole(&source, &target);
    assert!(kept > 0 && kept < 64, "{kept} files kept");
    assert!(crate::util::no_staging_leftovers(&target));
    let status: serde_json::Value = serde_json::from_slice(&setup.source.run(&["status", "--json"]).stdout).unwrap();
    let pushed = status["jobs"][0]["pushed"].as_array().unwrap();
    assert_eq!(pushed.last().unwrap()["event"], "stopped", "{status}");
    let status: serde_json::Value = serde_json::from_slice(&setup.dest.run(&["status", "--json"]).stdout).unwrap();
    let received = status["jobs"][0]["received"].as_array().unwrap();
    assert_eq!(received.last().unwrap()["event"], "stopped", "{status}");
    assert!(received.last().unwrap()["error"].as_str().unwrap().contains("SIGTERM"), "{status}");

    let second = setup.source.sync("zimbra");
    assert_eq!(second["in_sync"], true);
    assert_same_tree(&source, &target, |_| false);
    let resent = second["chunk_bytes"].as_u64().unwrap();
    let kept_bytes = kept as u64 * (256 << 10);
    assert!(resent <= tree_bytes - kept_bytes + (2 << 20), "{resent} sent again, {kept_bytes} were kept");
}

/// A round with no change writes none of the source's state files again: its base manifest and its
/// scan cache stay the same files (nothing to write or fsync), and the next change still goes.
#[test]
fn a_round_with_no_change_keeps_the_sources_state_files() {
    use std::os::unix::fs::MetadataExt;
    let setup = Setup::new();
    let (source, target) = (setup.path("export"), setup.path("migration"));
    random_tree(&source, 4, 64 << 10, 21);
    setup.job("zimbra", &source, &target);
    let state = setup.source.config.join("data/jobs/zimbra/source");
    let inode = |name: &str| std::fs::metadata(state.join(name)).unwrap().ino();
    assert_eq!(setup.source.sync("zimbra")["in_sync"], true);
    // Files written within the last second are not trusted in the cache until a scan sees them older:
    // the second round's scan rewrites the cache for that.
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(setup.source.sync("zimbra")["in_sync"], true);
    let (base, cache) = (inode("manifest.base"), inode("cache"));
    let third = setup.source.sync("zimbra");
    assert_eq!(third["in_sync"], true);
    assert_eq!((inode("manifest.base"), inode("cache")), (base, cache), "state files written again");
    assert!(!state.join("manifest.scan").exists());
    let based_on: serde_json::Value = serde_json::from_slice(&std::fs::read(state.join("base.json")).unwrap()).unwrap();
    assert_eq!(based_on["round"], third["round"], "base.json names the round");

    crate::util::write(&source.join("d0/blob-000"), b"changed");
    assert_eq!(setup.source.sync("zimbra")["in_sync"], true);
    assert_ne!(inode("manifest.base"), base);
    assert_same_tree(&source, &target, |_| false);
}

/// A round that begins in a pause waits with its list of changes, and `--max-duration` still ends it
/// at the deadline, with its own exit code; the destination's job is free again at once.
#[test]
fn a_deadline_ends_a_round_whose_list_waits_for_a_pause() {
    let setup = Setup::new();
    let (source, target) = (setup.path("export"), setup.path("migration"));
    random_tree(&source, 4, 64 << 10, 3);
    setup.job("zimbra", &source, &target);
    let started = Instant::now();
    let out = setup.source.run(&[
        "sync",
        "--round",
        "zimbra",
        "--bwlimit",
        "0",
        "--max-duration",
        "3s",
        "--progress-interval",
        "1s",
    ]);
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(ferry::exit::DEADLINE), "{stderr}");
    assert!(stderr.contains("the list of changes waits") && !stderr.contains("changes sent"), "{stderr}");
    // The log says every progress interval that the round is still paused, not only once.
    assert!(stderr.matches("the list of changes still waits").count() >= 1, "{stderr}");
    assert!(took >= Duration::from_secs(3) && took < Duration::from_secs(15), "{took:?}");
    assert!(walk(&target).is_empty(), "data moved during the pause");
    assert_eq!(setup.source.sync("zimbra")["in_sync"], true);
    assert_same_tree(&source, &target, |_| false);
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().is_some_and(|n| n == ferry_engine::STAGING_DIR) {
            continue;
        }
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

#[test]
fn a_dry_run_writes_nothing_and_estimates_the_wire_within_ten_percent() {
    let setup = Setup::new();
    let (source, target) = (setup.path("export"), setup.path("migration"));
    TreeGenerator::create(&source, TreeSpec::with_files(2000, 5)).unwrap();
    setup.job("zimbra", &source, &target);

    let out = setup.source.run(&["sync", "--round", "zimbra", "--dry-run", "--json", "--bwlimit", "1M"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["schema"], ferry::REPORT_SCHEMA);
    assert_eq!(std::fs::read_dir(&target).unwrap().count(), 0, "a dry run wrote to the target");
    let estimate = plan["bytes_on_wire"].as_u64().unwrap();
    let need = plan["need_bytes"].as_u64().unwrap();
    assert!(plan["files"].as_u64().unwrap() > 1000, "{plan}");
    // At 1 MiB/s, about one second per MiB on the wire.
    let seconds = plan["seconds"].as_u64().unwrap();
    assert!(seconds.abs_diff(estimate >> 20) <= 2 + (estimate >> 20) / 20, "{plan}");
    let human = setup.source.ok(&["sync", "--round", "zimbra", "--dry-run", "--bwlimit", "1M"]);
    assert!(human.contains("on the wire") && human.contains("at the current schedule"), "{human}");
    // A pause holds a round's list of changes, not a dry run's: the operator asked for the plan now.
    let started = Instant::now();
    let paused = setup.source.ok(&["sync", "--round", "zimbra", "--dry-run", "--bwlimit", "0"]);
    assert!(paused.contains("on the wire") && started.elapsed() < Duration::from_secs(20), "{paused}");

    let real = setup.source.sync("zimbra");
    let wire = real["bytes_on_wire"].as_u64().unwrap();
    assert_eq!(real["chunk_bytes"].as_u64().unwrap(), need, "the plan asked for what the round sent");
    let error = estimate.abs_diff(wire) as f64 / wire as f64;
    eprintln!("dry run: estimate {estimate}, real {wire} ({:.1}%)", error * 100.0);
    assert!(error <= 0.10, "estimate {estimate} vs {wire} on the wire");
}

#[test]
fn the_space_preflight_refuses_a_round_that_does_not_fit_and_loses_nothing() {
    if !may_mount("the space preflight test") {
        return;
    }
    let setup = Setup::new();
    let (source, mount) = (setup.path("export"), setup.path("small"));
    let _tmpfs = crate::util::Tmpfs::mount(&mount, "8m");
    let target = mount.join("migration");
    // A first round that fits, then one that does not.
    random_tree(&source, 4, 256 << 10, 3);
    setup.job("zimbra", &source, &target);
    assert_eq!(setup.source.sync("zimbra")["in_sync"], true);
    let before = ferry_testkit::snapshot(&target, &[]).unwrap();
    crate::util::write(&source.join("big/blob"), &random_bytes(12 << 20, 4));

    let plan: serde_json::Value =
        serde_json::from_str(&setup.source.ok(&["sync", "--round", "zimbra", "--dry-run", "--json"])).unwrap();
    assert!(plan["space_needed"].as_u64() > plan["space_available"].as_u64(), "{plan}");
    let out = setup.source.run(&["sync", "--round", "zimbra"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(ferry::exit::REFUSED), "{stderr}");
    assert!(stderr.contains("not enough space") && stderr.contains("free"), "{stderr}");
    // The list streams: what came before the change that does not fit may be in place (here the
    // folder that holds it, made as the round began, and the top folder's mtime with it). Nothing
    // that was there is lost or changed, and the file that does not fit is not written.
    let (mut before, mut after) = (before, ferry_testkit::snapshot(&target, &[]).unwrap());
    before.remove(&b""[..]);
    after.remove(&b""[..]);
    let made = |path: &[u8]| path == b"big" || path.starts_with(b".ferry-staging");
    let compared = ferry_testkit::compare_trees(&before, &after, made);
    assert!(compared.is_ok(), "the refused round changed the target: {compared:?}");
    assert!(!target.join("big/blob").exists());
    // The destination's history says so, with why.
    let status: serde_json::Value = serde_json::from_slice(&setup.dest.run(&["status", "--json"]).stdout).unwrap();
    let last = status["jobs"][0]["received"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["event"], "refused", "{status}");
    assert!(last["error"].as_str().unwrap().contains("not enough space"), "{status}");
    // Room made: the round goes through.
    std::fs::remove_file(source.join("big/blob")).unwrap();
    crate::util::write(&source.join("big/blob"), &random_bytes(2 << 20, 4));
    assert_eq!(setup.source.sync("zimbra")["in_sync"], true);
    assert_same_tree(&source, &target, |_| false);
}

#[test]
fn the_export_hook_runs_before_the_scan_and_a_failing_one_stops_the_round() {
    let setup = Setup::new();
    let (source, target) = (setup.path("export"), setup.path("migration"));
    std::fs::create_dir_all(&source).unwrap();
    setup.job("zimbra", &source, &target);
    setup.source.ok(&["job", "set", "zimbra", "--export-cmd", "sh -c 'echo round > {source}/EXPORTED'"]);
    assert_eq!(setup.source.sync("zimbra")["in_sync"], true);
    assert_eq!(std::fs::read(target.join("EXPORTED")).unwrap(), b"round\n");

    setup.source.ok(&["job", "set", "zimbra", "--export-cmd", "sh -c 'echo smartscan failed >&2; exit 2'"]);
    let out = setup.source.run(&["sync", "--round", "zimbra"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(ferry::exit::ERROR), "{stderr}");
    assert!(stderr.contains("export command") && stderr.contains("smartscan failed"), "{stderr}");
    let dest = status_json(&setup.dest, "zimbra");
    assert_eq!(dest["jobs"][0]["received"].as_array().unwrap().len(), 1, "no round was started: {dest}");

    if is_root() {
        setup.source.ok(&["job", "set", "zimbra", "--export-cmd", ""]);
        setup.dest.ok(&["job", "set", "zimbra", "--import-cmd", "id -un", "--import-user", "nobody"]);
        // Something new, or there would be nothing to import.
        std::fs::write(source.join("new-item"), b"new").unwrap();
        let report = setup.source.sync("zimbra");
        assert_eq!(report["import"]["tail"], serde_json::json!(["nobody"]), "{report}");
    } else {
        eprintln!("SKIPPED: the import-as-user part needs root");
    }
}

/// Through a 100 Mbit/s link the destination acknowledges about every 8th packet, as the source asks
/// (on loopback the kernel batches datagrams and so acknowledgements anyway): what comes back is about
/// 1% of what goes, where acknowledging every 2nd packet takes 2%.
#[test]
fn the_destination_acknowledges_every_eighth_packet_on_a_link() {
    let setup = Setup::new();
    let (source, target) = (setup.path("export"), setup.path("migration"));
    random_tree(&source, 16, 1 << 20, 11);
    setup.job("zimbra", &source, &target);
    let proxy = UdpProxy::start(setup.daemon.addr.parse().unwrap()).unwrap();
    proxy.set(ferry_testkit::Impairment {
        rate: Some(100_000_000 / 8),
        delay: Duration::from_millis(5),
        queue: Duration::from_millis(50),
        max_datagram: Some(1472),
        ..ferry_testkit::Impairment::default()
    });
    setup.source.ok(&["trust", &setup.dest.id, "--name", "dest", "--addr", &proxy.addr().to_string()]);
    assert_eq!(setup.source.sync("zimbra")["in_sync"], true);
    let (forward, back) = proxy.bytes();
    eprintln!("{back} bytes back for {forward} forward: {:.2}%", back as f64 * 100.0 / forward as f64);
    assert!(forward > 16 << 20, "{forward} bytes to the destination");
    assert!(back * 100 < forward * 14 / 10, "{back} bytes back for {forward} forward");
    assert_same_tree(&source, &target, |_| false);
}

/// A first round's list of changes goes before any chunk: on a store of millions of files, tens of
/// megabytes or more that the operator's limit must hold too.
#[test]
fn the_list_of_changes_counts_against_the_bandwidth_limit() {
    let setup = Setup::new();
    let (source, quick, limited) = (setup.path("export"), setup.path("quick"), setup.path("limited"));
    list_only_tree(&source);
    setup.job("quick", &source, &quick);
    setup.job("limited", &source, &limited);
    let report = setup.source.sync("quick");
    let wire = report["bytes_on_wire"].as_u64().unwrap();
    assert!(wire > 250_000, "the list is {wire} bytes on the wire");

    let started = Instant::now();
    let out = setup.source.run(&["sync", "--round", "limited", "--bwlimit", "64K", "--json"]);
    let took = started.elapsed().as_secs_f64();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // At 64 KiB/s, less the bucket's tenth of a second and the destination's share of the bytes
    // (acknowledgements, its answers): well over half of wire / rate. Unlimited, it takes under a second.
    let least = 0.6 * wire as f64 / 65536.0;
    assert!(took >= least, "{wire} bytes of changes in {took:.1} s under 64K (at least {least:.1} s)");
    assert_same_tree(&source, &limited, |_| false);
}

/// Under a slow limit one message of the list (1024 changes) takes longer than the destination's stall
/// timeout (2 minutes; 3 s here): its timer counts bytes, which come every second, not whole messages.
/// (Before, such a message went unlimited when it would take over a minute, and failed the round
/// when it took less than that but more than the stall timeout.)
#[test]
fn a_list_message_slower_than_the_stall_timeout_keeps_the_round() {
    // The first message alone is about 190 kB: about 4 s at 48 KiB/s; the round over 5 s, held to
    // the limit.
    slow_round_against_a_short_stall_timeout("3s", list_only_tree, "48K", Duration::from_secs(5));
}

/// Under a slow limit one chunk batch (at least 64 KiB) takes longer than the destination's stall
/// timeout (2 s here): its timers count the bytes on the data streams, not whole batches. (Before,
/// the round failed with "no chunk arrived for 2 s".)
#[test]
fn a_chunk_batch_slower_than_the_stall_timeout_keeps_the_round() {
    // 256 KiB at 20 KiB/s, less the bucket's burst: over 10 s, held to the limit.
    let tree = |source: &Path| {
        random_tree(source, 1, 256 << 10, 11);
    };
    slow_round_against_a_short_stall_timeout("2s", tree, "20K", Duration::from_secs(10));
}

/// Runs one round of the tree `make` writes under `--bwlimit rate`, against a daemon whose stall
/// timeout is `stall`: it must complete on one connection, and take more than `least` (held to the
/// limit, not let through).
fn slow_round_against_a_short_stall_timeout(stall: &str, make: impl Fn(&Path), rate: &str, least: Duration) {
    let mut setup = Setup::new();
    setup.restart_daemon(&[], &["--stall-timeout", stall]);
    let (source, target) = (setup.path("export"), setup.path("migration"));
    make(&source);
    setup.job("zimbra", &source, &target);
    let started = Instant::now();
    let out = setup.source.run(&["sync", "--round", "zimbra", "--bwlimit", rate, "--json"]);
    let took = started.elapsed();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["connections"], 1, "{report}");
    assert!(took > least, "the round took {took:?} under {rate}");
    assert_same_tree(&source, &target, |_| false);
}

/// Empty files with long random names: a round of them is nothing but its list of changes (about
/// 190 bytes a file on the wire once compressed, 1024 changes to a message: about 450 kB).
fn list_only_tree(source: &Path) {
    const LETTERS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(17);
    for i in 0..2400 {
        let name: String = (0..250).map(|_| LETTERS[rng.random_range(0..LETTERS.len())] as char).collect();
        crate::util::write(&source.join(format!("folder-{:02}/{name}", i % 25)), b"");
    }
}

#[test]
fn a_paused_job_holds_its_transfer_until_sighup_reloads_the_limit() {
    let setup = Setup::new();
    let (source, target) = (setup.path("export"), setup.path("migration"));
    random_tree(&source, 8, 256 << 10, 5);
    setup.job("zimbra", &source, &target);
    let started = Instant::now();
    let out = paused_round_resumed_by_sighup(&setup, &target, Duration::from_secs(4));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["in_sync"], true);
    assert_eq!(report["connections"], 1, "the paused connection stayed up: {report}");
    assert!(started.elapsed() < Duration::from_secs(30));
    assert!(String::from_utf8_lossy(&out.stderr).contains("SIGHUP"));
    assert_same_tree(&source, &target, |_| false);
}

#[test]
fn a_pause_window_in_the_timetable_holds_the_transfer_until_it_closes() {
    let setup = Setup::new();
    let (source, target) = (setup.path("export"), setup.path("migration"));
    random_tree(&source, 8, 256 << 10, 8);
    setup.job("zimbra", &source, &target);
    // Paused for the rest of this minute, unlimited from the next one (local time, as the operator
    // writes it). With less than 10 s left in this minute, wait for the next one first.
    let mut now = jiff::ZonedDateTime::now();
    if now.second() > 50 {
        std::thread::sleep(Duration::from_secs(61 - now.second() as u64));
        now = jiff::ZonedDateTime::now();
    }
    let opens = now.checked_add(jiff::SignedDuration::from_secs(60 - now.second() as i64)).unwrap();
    let timetable = format!("{},0 {},off", now.strftime("%H:%M"), opens.strftime("%H:%M"));
    let started = Instant::now();
    let sync = spawn_round(&setup, &["--bwlimit", &timetable]);
    // From the clock's own fraction of a second: with whole seconds, the window seemed to open up to
    // a second later than it does, and a round that resumed at once looked early.
    let into_minute = Duration::from_secs(now.second() as u64) + Duration::from_nanos(now.subsec_nanosecond() as u64);
    let window_opens = started + Duration::from_secs(60) - into_minute;
    std::thread::sleep(Duration::from_secs(5).min(window_opens.saturating_duration_since(Instant::now())));
    assert!(walk(&target).is_empty(), "data moved during the pause ({timetable})");
    let out = sync.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(Instant::now() + Duration::from_millis(500) >= window_opens, "done before the window opened");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["in_sync"], true);
    assert_eq!(report["connections"], 1, "the paused connection stayed up: {report}");
    assert_same_tree(&source, &target, |_| false);
}

#[test]
fn the_destination_caps_what_a_peer_sends() {
    let setup = Setup::new();
    let (source, target) = (setup.path("export"), setup.path("migration"));
    let tree_bytes = random_tree(&source, 40, 256 << 10, 6);
    setup.job("zimbra", &source, &target);
    setup.dest.ok(&["trust", &setup.source.id, "--name", "source", "--receive-bwlimit", "2M"]);
    let started = Instant::now();
    assert_eq!(setup.source.sync("zimbra")["in_sync"], true);
    let took = started.elapsed().as_secs_f64();
    // 10 MiB at 2 MiB/s, less the receive window the sender may fill ahead (4 MiB): at least 3 s.
    assert!(took >= 3.0, "{tree_bytes} bytes in {took:.1} s under a 2 MiB/s receive cap");
}

#[test]
fn an_unreachable_peer_exits_with_its_own_code() {
    let setup = Setup::new();
    let (source, target) = (setup.path("export"), setup.path("migration"));
    random_tree(&source, 2, 64 << 10, 7);
    setup.job("zimbra", &source, &target);
    let closed = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    setup.source.ok(&["trust", &setup.dest.id, "--name", "dest", "--addr", &closed.to_string()]);
    // Found before the export hook and the scan, which on a real store take hours.
    let exported = setup.path("exported");
    setup.source.ok(&["job", "set", "zimbra", "--export-cmd", &format!("touch {}", exported.display())]);
    let out = setup.source.run(&["sync", "--round", "zimbra"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(ferry::exit::UNREACHABLE), "{stderr}");
    assert!(stderr.contains("cannot connect") && stderr.contains("ferry serve"), "{stderr}");
    assert!(
        !exported.exists() && !stderr.contains("scanning"),
        "exported or scanned for an unreachable peer:\n{stderr}"
    );
}

/// Without a terminal (cron, systemd), `sync` logs its progress every `--progress-interval` with the
/// rate and an estimate of the time left, and every line names the job and the round.
#[test]
fn a_run_without_a_terminal_logs_progress_with_an_eta() {
    let setup = Setup::new();
    let (source, target) = (setup.path("export"), setup.path("migration"));
    random_tree(&source, 24, 256 << 10, 8);
    setup.job("zimbra", &source, &target);
    let out = setup.source.run(&["sync", "--round", "zimbra", "--bwlimit", "1M", "--progress-interval", "1s"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(ferry::exit::OK), "{stderr}");
    assert!(!stderr.contains('\u{1b}'), "colours in a log that is not a terminal:\n{stderr}");
    let progress: Vec<&str> = stderr.lines().filter(|l| l.contains("on the wire,")).collect();
    assert!(progress.len() >= 3, "{stderr}");
    assert!(progress.iter().all(|l| l.contains("sync{job=zimbra round=1}")), "{stderr}");
    let percents: Vec<u32> =
        progress.iter().filter_map(|l| l.split("; ").nth(1)?.split('%').next()?.parse().ok()).collect();
    assert!(percents.len() >= 2, "no ETA in the progress lines:\n{stderr}");
    assert!(percents.windows(2).all(|w| w[0] <= w[1]) && percents.iter().all(|p| *p <= 100), "{percents:?}");
    assert!(progress.iter().any(|l| l.contains("% of the changed data, about") && l.ends_with(" left")), "{stderr}");
    println!("{}", progress.join("\n"));
}

/// A file larger than the destination's 48 MiB window: its chunks past the memory budget wait in a
/// spill file on disk, so the daemon's memory does not grow with the file (it held the whole file
/// before: 4.2 GiB for a 4 GiB file). Repeated blocks inside the file exercise chunks asked for once
/// and written at several offsets.
#[test]
fn a_file_larger_than_the_window_does_not_grow_the_destinations_memory() {
    let setup = Setup::new();
    let (source, target) = (setup.path("export"), setup.path("migration"));
    let repeated = random_bytes(1 << 20, 42);
    let mut data = Vec::with_capacity(400 << 20);
    for i in 0..400u64 {
        if i % 50 == 7 {
            data.extend_from_slice(&repeated)
        } else {
            data.extend_from_slice(&random_bytes(1 << 20, 1000 + i))
        }
    }
    crate::util::write(&source.join("server/big.tar.gz"), &data);
    drop(data);
    setup.job("zimbra", &source, &target);
    assert_eq!(setup.source.sync("zimbra")["in_sync"], true);
    assert_same_tree(&source, &target, |_| false);
    let status = std::fs::read_to_string(format!("/proc/{}/status", setup.daemon.child.id())).unwrap();
    let peak_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    println!("destination peak RSS for a 400 MiB file: {} MiB", peak_kib >> 10);
    assert!(peak_kib < 350 << 10, "the destination peaked at {} MiB for a 400 MiB file", peak_kib >> 10);
}

/// A timetable's pause may last all day, far longer than the destination's stall timeout (2 minutes;
/// 3 s here): the source tells it every second that it is paused, and the round goes on when the
/// pause ends, on the same connection.
#[test]
fn a_pause_longer_than_the_destinations_stall_timeout_keeps_the_round() {
    let mut setup = Setup::new();
    setup.restart_daemon(&[], &["--stall-timeout", "3s"]);
    let (source, target) = (setup.path("export"), setup.path("migration"));
    random_tree(&source, 8, 256 << 10, 5);
    setup.job("zimbra", &source, &target);
    let out = paused_round_resumed_by_sighup(&setup, &target, Duration::from_secs(10));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["in_sync"], true);
    assert_eq!(report["connections"], 1, "the paused round was cut: {report}");
    // The round began paused: the pause held its list of changes too, not only the chunks.
    let (resumed, listed) = (stderr.find("SIGHUP: re-read"), stderr.find("changes sent"));
    assert!(resumed.is_some() && listed > resumed, "the list went during the pause:\n{stderr}");
    assert_same_tree(&source, &target, |_| false);
}

/// A pause that begins during the transfer: the progress lines say so, instead of an average rate and
/// a time left, and the round goes on when it ends.
#[test]
fn a_pause_during_the_transfer_shows_in_the_progress_lines() {
    let setup = Setup::new();
    let (source, target) = (setup.path("export"), setup.path("migration"));
    random_tree(&source, 16, 256 << 10, 9);
    setup.job("zimbra", &source, &target);
    setup.source.ok(&["job", "set", "zimbra", "--bwlimit", "256K"]);
    let sync = spawn_round(&setup, &["--progress-interval", "1s"]);
    // 4 MiB at 256 KiB/s: the transfer is under way after 3 s and far from done.
    std::thread::sleep(Duration::from_secs(3));
    set_limit_and_hangup(&setup, &sync, "0");
    std::thread::sleep(Duration::from_secs(3));
    set_limit_and_hangup(&setup, &sync, "off");
    let out = sync.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["in_sync"], true);
    let paused: Vec<&str> = stderr.lines().filter(|l| l.contains("paused by the bandwidth limit: sent")).collect();
    assert!(!paused.is_empty(), "no progress line said paused:\n{stderr}");
    assert!(paused.iter().all(|l| !l.contains("/s") && !l.contains(" left")), "{paused:?}");
    assert!(stderr.lines().any(|l| l.contains("on the wire, ") && l.contains("/s")), "{stderr}");
    assert_same_tree(&source, &target, |_| false);
}

/// Starts a round of job `zimbra` with its limit in ferry.toml at 0 (paused), checks after `paused`
/// that nothing reached `target`, lifts the limit, tells the round with SIGHUP, and waits for it.
fn paused_round_resumed_by_sighup(setup: &Setup, target: &Path, paused: Duration) -> std::process::Output {
    setup.source.ok(&["job", "set", "zimbra", "--bwlimit", "0"]);
    let sync = spawn_round(setup, &[]);
    std::thread::sleep(paused);
    assert!(walk(target).is_empty(), "data moved while paused");
    set_limit_and_hangup(setup, &sync, "off");
    sync.wait_with_output().unwrap()
}

/// `ferry sync --round zimbra --json` with `extra`, started in the background, its output piped.
fn spawn_round(setup: &Setup, extra: &[&str]) -> Child {
    let mut command = setup.source.ferry();
    command.args(["sync", "--round", "zimbra", "--json"]).args(extra);
    command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
}

/// Sets job `zimbra`'s limit in ferry.toml to `rate` and tells the running `sync` with SIGHUP.
fn set_limit_and_hangup(setup: &Setup, sync: &Child, rate: &str) {
    setup.source.ok(&["job", "set", "zimbra", "--bwlimit", rate]);
    let pid = rustix::process::Pid::from_raw(sync.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::HUP).unwrap();
}
