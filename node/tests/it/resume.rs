//! A large file in progress through each kind of interruption: what arrived stays in its partial file
//! (durable, and in the destination's chunk index), and the next attempt sends only the rest. Every
//! byte between the nodes goes through a proxy that counts it and outlives both of them.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use ferry_testkit::UdpProxy;

use crate::network::{Daemon, Setup};
use crate::util::{Tmpfs, io_counter, may_mount, no_staging_leftovers, random_bytes, wait_within};

/// The file: 64 MiB of random bytes, sent at 8 MiB/s (8 s for a round that runs through).
const SIZE: u64 = 64 << 20;
const RATE: &str = "8M";
/// How much of the file has arrived when the round is interrupted.
const INTERRUPTED_AT: u64 = 24 << 20;

struct Scene {
    setup: Setup,
    proxy: UdpProxy,
    source: PathBuf,
    target: PathBuf,
    /// The filesystem the target is on, when the test made one.
    disk: Option<Tmpfs>,
}

impl Scene {
    fn new(seed: u64) -> Self {
        Self::with_disk(seed, None)
    }

    /// The target on a filesystem of its own of `size` (a tmpfs), when given.
    fn with_disk(seed: u64, size: Option<&str>) -> Self {
        let setup = Setup::new();
        let disk = size.map(|size| Tmpfs::mount(&setup.path("disk"), size));
        let source = setup.path("export");
        let target = disk.as_ref().map_or_else(|| setup.path("migration"), |disk| disk.0.join("migration"));
        crate::util::write(&source.join("server/backup.tgz"), &random_bytes(SIZE as usize, seed));
        setup.job("zimbra", &source, &target);
        let proxy = UdpProxy::start(setup.daemon.addr.parse().unwrap()).unwrap();
        setup.source.ok(&["trust", &setup.dest.id, "--name", "dest", "--addr", &proxy.addr().to_string()]);
        Self { setup, proxy, source, target, disk }
    }

    /// The target on a tmpfs of 100 MiB, for `what`; `None` (the test skipped) unless root.
    fn on_tmpfs(seed: u64, what: &str) -> Option<Self> {
        if !may_mount(what) {
            return None;
        }
        Some(Self::with_disk(seed, Some("100m")))
    }

    fn start_sync(&self, extra: &[&str]) -> Child {
        let args = [&["sync", "--round", "zimbra", "--bwlimit", RATE, "--json"], extra].concat();
        let stderr = crate::network::debug_log("sync");
        self.setup.source.ferry().args(args).stdout(Stdio::piped()).stderr(stderr).spawn().unwrap()
    }

    /// Waits until the destination's partial file holds at least `bytes`.
    fn wait_for_partial(&self, bytes: u64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while partial_bytes(&self.target) < bytes {
            assert!(Instant::now() < deadline, "the partial file did not grow to {bytes} bytes");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs a round that stops at a deadline with part of the file in; returns how much is kept.
    fn stop_at_a_deadline(&self) -> u64 {
        let out = wait_within(self.start_sync(&["--max-duration", "4s"]), Duration::from_secs(60));
        assert_eq!(out.status.code(), Some(ferry::exit::DEADLINE));
        let kept = partial_bytes(&self.target);
        assert!(kept >= 16 << 20, "only {kept} bytes kept at the deadline");
        kept
    }

    /// Runs the round again to its end and checks the file and the bytes on the wire over every
    /// attempt: the file once, what was in flight at the interruption, and QUIC's own bytes.
    fn finish(&self, kind: &str) -> u64 {
        let report = self.setup.source.sync("zimbra");
        assert_eq!(report["in_sync"], true, "{report}");
        self.check(kind)
    }

    /// Checks the file in place and the bytes on the wire; returns those.
    fn check(&self, kind: &str) -> u64 {
        let relative = Path::new("server/backup.tgz");
        assert!(
            std::fs::read(self.target.join(relative)).unwrap() == std::fs::read(self.source.join(relative)).unwrap(),
            "the file in place is not the source's"
        );
        assert!(no_staging_leftovers(&self.target), "a partial file was left behind");
        let (up, down) = self.proxy.bytes();
        let total = up + down;
        eprintln!("{kind}: {total} bytes on the wire for a {SIZE}-byte file ({:.3}×)", total as f64 / SIZE as f64);
        // Before partial files were kept, the interrupted attempt's 24 MiB were sent again: 1.4×.
        assert!(total < SIZE + SIZE / 4, "{kind}: {total} bytes on the wire for {SIZE}");
        total
    }
}

/// How many bytes the partial files in `target`'s staging folder hold.
fn partial_bytes(target: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(target.join(ferry_engine::STAGING_DIR)) else { return 0 };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("partial-"))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

#[test]
fn a_large_file_survives_a_kill_of_the_destination() {
    let mut scene = Scene::new(71);
    let sync = scene.start_sync(&[]);
    scene.wait_for_partial(INTERRUPTED_AT);
    scene.setup.daemon.child.kill().unwrap();
    scene.setup.daemon.child.wait().unwrap();
    // The restarted daemon's reset tells the source, which reconnects by itself.
    scene.setup.daemon = Daemon::start(&scene.setup.dest);
    scene.proxy.set_upstream(scene.setup.daemon.addr.parse().unwrap());
    let out = wait_within(sync, Duration::from_secs(90));
    assert!(out.status.success(), "the round did not end well after the destination's restart");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["connections"].as_u64().unwrap() >= 2, "{report}");
    assert_eq!(report["in_sync"], true, "{report}");
    scene.check("kill -9 of the destination");
}

#[test]
fn a_large_file_survives_a_restart_of_the_daemon() {
    let mut scene = Scene::new(79);
    let sync = scene.start_sync(&[]);
    scene.wait_for_partial(INTERRUPTED_AT);
    // As `systemctl restart` stops it: SIGTERM, then a new daemon.
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(scene.setup.daemon.child.id() as i32).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let stopped = scene.setup.daemon.child.wait().unwrap();
    assert!(stopped.success(), "the daemon did not stop cleanly on SIGTERM: {stopped}");
    let kept = partial_bytes(&scene.target);
    scene.setup.daemon = Daemon::start(&scene.setup.dest);
    scene.proxy.set_upstream(scene.setup.daemon.addr.parse().unwrap());
    let out = wait_within(sync, Duration::from_secs(90));
    assert!(out.status.success(), "the round did not end well after the daemon's restart");
    scene.check("a restart of the daemon");
    // A daemon stopped cleanly records what it wrote: the new one does not read it again.
    let daemon = scene.setup.daemon.child.id();
    if let Some(read) = io_counter(daemon, "rchar") {
        eprintln!("the restarted destination read {read} bytes; {kept} had arrived");
        assert!(read < kept / 4, "the restarted destination read {read} bytes, {kept} had arrived");
    }
}

#[test]
fn a_large_file_survives_a_kill_of_the_source() {
    let scene = Scene::new(72);
    let mut sync = scene.start_sync(&[]);
    scene.wait_for_partial(INTERRUPTED_AT);
    sync.kill().unwrap();
    sync.wait().unwrap();
    scene.finish("kill -9 of the source");
}

#[test]
fn a_large_file_survives_a_deadline() {
    let scene = Scene::new(73);
    let kept = scene.stop_at_a_deadline();
    let daemon = scene.setup.daemon.child.id();
    let read_before = io_counter(daemon, "rchar");
    scene.finish("--max-duration");
    // What arrived is kept without being read again: nothing wrote to the partial file since its
    // chunks were recorded (a night's part of a file that takes several is not read each night).
    match (read_before, io_counter(daemon, "rchar")) {
        (Some(before), Some(after)) => {
            let read = after - before;
            eprintln!("the destination read {read} bytes to finish a file of which {kept} had arrived");
            assert!(read < kept / 4, "the destination read {read} bytes, {kept} had arrived");
        }
        _ => eprintln!("SKIPPED (one check): /proc/{daemon}/io is not readable here"),
    }
}

#[test]
fn a_partial_file_written_to_behind_ferrys_back_is_read_again() {
    let scene = Scene::new(76);
    let kept = scene.stop_at_a_deadline();
    // Someone writes into what arrived, a MiB before its end, keeping its length: its ctime moves, so
    // the next round reads it again, keeps what still holds and fetches the rest in the same round.
    let partial = std::fs::read_dir(scene.target.join(ferry_engine::STAGING_DIR))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .find(|path| path.file_name().unwrap().to_string_lossy().starts_with("partial-"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(
        &std::fs::File::options().write(true).open(&partial).unwrap(),
        b"X",
        kept - (1 << 20),
    )
    .unwrap();
    assert_eq!(partial_bytes(&scene.target), kept);
    scene.finish("a partial file written to");
}

#[test]
fn a_large_file_whose_start_changed_at_the_source_is_not_resumed_from_its_old_start() {
    changed_at_the_source_after_a_deadline(77, 0, "a start changed");
}

#[test]
fn a_large_file_changed_in_its_middle_keeps_what_arrived_past_the_change() {
    changed_at_the_source_after_a_deadline(78, 8 << 20, "a middle changed");
}

/// Stops a round at a deadline, then writes 4 KiB into the source's file at `offset`: what arrived
/// no longer begins the file, and must not be kept on the strength of its record; but what arrived
/// past the change is still the file's, and is not sent again. A dry run knows it as well.
fn changed_at_the_source_after_a_deadline(seed: u64, offset: u64, kind: &str) {
    let scene = Scene::new(seed);
    scene.stop_at_a_deadline();
    let path = scene.source.join("server/backup.tgz");
    let file = std::fs::File::options().write(true).open(&path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &random_bytes(4096, seed + 100), offset).unwrap();
    let plan = scene.setup.source.ok(&["sync", "--round", "zimbra", "--dry-run", "--json"]);
    let plan: serde_json::Value = serde_json::from_str(&plan).unwrap();
    let report = scene.setup.source.sync("zimbra");
    assert_eq!(report["in_sync"], true, "{report}");
    assert_eq!(plan["need_bytes"], report["chunk_bytes"], "{plan}");
    // Before what arrived was kept aside, the chunks past the change were sent again: 1.5×.
    scene.check(kind);
}

#[test]
fn a_large_file_survives_a_connection_lost_beyond_the_grace() {
    let scene = Scene::new(74);
    let sync = scene.start_sync(&["--reconnect-grace", "0s"]);
    scene.wait_for_partial(INTERRUPTED_AT);
    // Nothing passes any more: both sides give the connection up at QUIC's idle timeout.
    scene.proxy.blackout(true);
    let out = wait_within(sync, Duration::from_secs(90));
    assert!(!out.status.success(), "the round cannot end well without its connection");
    scene.proxy.blackout(false);
    scene.finish("a lost connection");
}

#[test]
fn a_large_file_survives_a_full_disk() {
    // Room for the file when the round begins (the preflight lets it through); a third of the way,
    // something else takes all the room left.
    let Some(scene) = Scene::on_tmpfs(75, "the full-disk resume test") else { return };
    let sync = scene.start_sync(&[]);
    scene.wait_for_partial(INTERRUPTED_AT);
    let filler = scene.disk.as_ref().unwrap().0.join("filler");
    fill(&filler, u64::MAX);
    let out = wait_within(sync, Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(ferry::exit::ERROR), "the round cannot end well on a full disk");
    let kept = partial_bytes(&scene.target);
    assert!(kept >= 16 << 20, "only {kept} bytes kept when the disk filled");
    std::fs::remove_file(&filler).unwrap();
    let total = scene.finish("a full disk");
    // What was written before the write that failed is kept too (without it, 1.19×).
    assert!(total < SIZE + SIZE / 8, "{total} bytes on the wire for {SIZE}");
}

#[test]
fn a_large_file_in_progress_resumes_on_a_disk_without_room_for_it_whole() {
    let Some(scene) = Scene::on_tmpfs(76, "the nearly-full-disk resume test") else { return };
    let kept = scene.stop_at_a_deadline();
    // Something else takes the room, leaving what the rest of the file needs with the preflight's
    // margin (2% of the filesystem and 1 MiB) and a little more, but not room for the whole file:
    // the part in progress already takes its own.
    let disk = &scene.disk.as_ref().unwrap().0;
    let stat = rustix::fs::statvfs(disk).unwrap();
    let (free, total) = (stat.f_bavail * stat.f_frsize, stat.f_blocks * stat.f_frsize);
    let margin = total / 50 + (1 << 20);
    let leave = (SIZE - kept) + margin + (4 << 20);
    assert!(leave < SIZE + margin, "{kept} bytes kept: the whole file would fit");
    assert_eq!(fill(&disk.join("filler"), free - leave), free - leave);
    scene.finish("a nearly full disk");
}

/// Writes `bytes` into a new file at `path`, or as many as fit; returns how many.
fn fill(path: &Path, bytes: u64) -> u64 {
    use std::io::Write;
    let mut file = std::fs::File::create(path).unwrap();
    let block = vec![7u8; 1 << 20];
    let mut written = 0;
    while written < bytes {
        let n = (bytes - written).min(block.len() as u64) as usize;
        if file.write_all(&block[..n]).is_err() {
            break;
        }
        written += n as u64;
    }
    written
}

#[test]
fn a_partial_file_removed_by_hand_is_sent_again() {
    let scene = Scene::new(77);
    scene.stop_at_a_deadline();
    // At 3 a.m., a nearly full disk, and a large `.ferry-staging` folder: the operator removes it.
    std::fs::remove_dir_all(scene.target.join(ferry_engine::STAGING_DIR)).unwrap();
    let report = scene.setup.source.sync("zimbra");
    assert_eq!(report["in_sync"], true, "{report}");
    let relative = Path::new("server/backup.tgz");
    assert!(std::fs::read(scene.target.join(relative)).unwrap() == std::fs::read(scene.source.join(relative)).unwrap());
}

#[test]
fn a_partial_file_whose_source_file_is_gone_is_removed_by_the_next_round() {
    let scene = Scene::new(79);
    scene.stop_at_a_deadline();
    std::fs::remove_file(scene.source.join("server/backup.tgz")).unwrap();
    let report = scene.setup.source.sync("zimbra");
    assert_eq!(report["in_sync"], true, "{report}");
    assert!(!scene.target.join("server/backup.tgz").exists());
    assert!(no_staging_leftovers(&scene.target), "the partial file of a file the source no longer has stayed");
}

/// A file that changes at the source again before it has arrived: what the second attempt brought
/// (what it kept of the first's, and more) is set aside in turn, in place of the first's, rather
/// than cut at the change.
#[test]
fn a_large_file_changed_at_the_source_twice_keeps_what_each_attempt_brought() {
    let scene = Scene::new(79);
    let path = scene.source.join("server/backup.tgz");
    let change = |seed: u64| {
        let file = std::fs::File::options().write(true).open(&path).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, &random_bytes(4096, seed), 0).unwrap();
    };
    let first = scene.stop_at_a_deadline();
    change(200);
    let out = wait_within(scene.start_sync(&["--max-duration", "3s"]), Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(ferry::exit::DEADLINE));
    let second = partial_bytes(&scene.target);
    eprintln!("kept {first} bytes, then {second} with the first attempt's aside");
    // The second attempt holds as much as the first (what is set aside again replaces it).
    assert!(second >= 2 * first, "the second attempt kept {} bytes, the first {first}", second.saturating_sub(first));
    change(201);
    let total = scene.finish("changed twice");
    // Cut at the second change, the second attempt's chunks were sent again: 1.3×.
    assert!(total < SIZE + SIZE / 8, "{total} bytes on the wire for {SIZE}");
}

/// A large file that grows while its source reads it (listed as it is cut): its chunks went out
/// as it was read, the round ends not in sync without it, and what arrived stays for the next
/// round, which sends only the rest.
#[test]
fn a_large_file_that_changes_while_the_source_reads_it_keeps_what_arrived() {
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};
    let scene = Scene::new(13);
    let relative = Path::new("server/backup.tgz");
    // Larger than the scan may read ahead of the transfer at this rate (a tenth of memory, at most
    // 64 MiB, and the prefixes its tee holds): it is still being read when it grows.
    crate::util::write(&scene.source.join(relative), &random_bytes(4 * SIZE as usize, 14));
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, path) = (stop.clone(), scene.source.join(relative));
        std::thread::spawn(move || {
            let mut file = std::fs::OpenOptions::new().append(true).open(path).unwrap();
            while !stop.load(Ordering::Relaxed) {
                file.write_all(&[7; 4096]).unwrap();
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let args = ["sync", "--round", "zimbra", "--bwlimit", "64M", "--json"];
    let first = wait_within(
        scene.setup.source.ferry().args(args).stdout(Stdio::piped()).spawn().unwrap(),
        Duration::from_secs(120),
    );
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    let report: serde_json::Value = serde_json::from_slice(&first.stdout).unwrap();
    assert_eq!(first.status.code(), Some(ferry::exit::INCOMPLETE), "{report}");
    assert_eq!(report["changed_while_read"], serde_json::json!([relative.to_str().unwrap()]), "{report}");
    let kept = partial_bytes(&scene.target);
    let size = std::fs::metadata(scene.source.join(relative)).unwrap().len();
    assert!(kept > size / 2, "only {kept} bytes kept of a {size}-byte file whose chunks went out as it was read");

    let second = scene.setup.source.sync("zimbra");
    assert_eq!(second["in_sync"], true, "{second}");
    assert!(std::fs::read(scene.target.join(relative)).unwrap() == std::fs::read(scene.source.join(relative)).unwrap());
    assert!(no_staging_leftovers(&scene.target), "a partial file was left behind");
    let (up, down) = scene.proxy.bytes();
    eprintln!(
        "changed while read: {} bytes on the wire for a {size}-byte file ({:.3}×)",
        up + down,
        (up + down) as f64 / size as f64
    );
    // Its partial file removed by the round that committed without it, the whole file went twice.
    assert!(up + down < size + size / 8, "{} bytes on the wire for {size}", up + down);
}

/// A large file listed as its source reads it that the target's disk has no room for: the round is
/// refused (exit 8) when its first chunks come, with what it needs and what is free, before any of
/// it is written; not left to fill the disk.
#[test]
fn a_large_file_listed_as_it_is_read_is_refused_before_it_fills_the_disk() {
    let Some(scene) = Scene::on_tmpfs(15, "the refused large file") else { return };
    let relative = Path::new("server/backup.tgz");
    crate::util::write(&scene.source.join(relative), &random_bytes(2 * SIZE as usize, 16));
    let out = wait_within(scene.start_sync(&[]), Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(ferry::exit::REFUSED), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert_eq!(partial_bytes(&scene.target), 0, "written before the refusal: {report}");
    // The operator hears what it needs against what is free.
    let status = scene.setup.dest.ok(&["status", "zimbra"]);
    assert!(status.contains("not enough space"), "{status}");
}
