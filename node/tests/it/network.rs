//! Two real `ferry` processes over QUIC on loopback: init, trust, job add, serve, sync.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use ferry_testkit::{TreeGenerator, TreeSpec};

use crate::util::{assert_same_tree, ferry_bin, strace};

/// One node: its config folder.
pub(crate) struct Node {
    pub(crate) config: PathBuf,
    pub(crate) id: String,
}

impl Node {
    pub(crate) fn init(dir: &Path, name: &str) -> Self {
        let config = dir.join(name);
        let out = Command::new(ferry_bin()).arg("--config-dir").arg(&config).arg("init").output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let id = String::from_utf8(out.stdout).unwrap().lines().next().unwrap().to_owned();
        assert_eq!(id.len(), 32, "{id}");
        Self { config, id }
    }

    pub(crate) fn ferry(&self) -> Command {
        let mut cmd = Command::new(ferry_bin());
        cmd.arg("--config-dir").arg(&self.config);
        cmd
    }

    pub(crate) fn run(&self, args: &[&str]) -> std::process::Output {
        self.ferry().args(args).output().unwrap()
    }

    pub(crate) fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.status.success(), "ferry {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    /// `sync --round JOB --json`, parsed.
    pub(crate) fn sync(&self, job: &str) -> serde_json::Value {
        let out = self.run(&["sync", "--round", job, "--json"]);
        assert!(out.status.success(), "sync: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

/// A running `ferry serve`, stopped when dropped.
/// Where a process's log goes: nowhere, or a file in `$FERRY_TEST_LOGS` when debugging a test.
pub(crate) fn debug_log(what: &str) -> Stdio {
    match std::env::var_os("FERRY_TEST_LOGS") {
        Some(dir) => {
            let path = Path::new(&dir).join(format!("{what}-{}.log", std::process::id()));
            std::fs::OpenOptions::new().create(true).append(true).open(path).map_or(Stdio::null(), Stdio::from)
        }
        None => Stdio::null(),
    }
}

pub(crate) struct Daemon {
    pub(crate) child: Child,
    pub(crate) addr: String,
}

impl Daemon {
    pub(crate) fn start(node: &Node) -> Self {
        Self::start_wrapped(node, &[], &[])
    }

    /// `ferry serve` run by another program (`strace ...`), with more flags.
    pub(crate) fn start_wrapped(node: &Node, wrapper: &[&str], extra: &[&str]) -> Self {
        let mut command = match wrapper.split_first() {
            None => node.ferry(),
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(ferry_bin()).arg("--config-dir").arg(&node.config);
                command
            }
        };
        command.arg("serve");
        if !extra.contains(&"--listen") {
            command.args(["--listen", "127.0.0.1:0"]);
        }
        let mut child = command.args(extra).stdout(Stdio::piped()).stderr(debug_log("serve")).spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let addr = line.split_whitespace().nth(2).unwrap_or_default().to_owned();
        assert!(addr.contains(':'), "{line}");
        Self { child, addr }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        use rustix::process::{Pid, Signal, kill_process};
        // A wrapper (strace) stops with its children: signal them first.
        let id = self.child.id();
        let children = std::fs::read_to_string(format!("/proc/{id}/task/{id}/children")).unwrap_or_default();
        for pid in children.split_whitespace().filter_map(|p| p.parse::<i32>().ok()).chain([id as i32]) {
            if let Some(pid) = Pid::from_raw(pid) {
                let _ = kill_process(pid, Signal::TERM);
            }
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while self.child.try_wait().ok().flatten().is_none() {
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = self.child.wait();
    }
}

pub(crate) struct Setup {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) source: Node,
    pub(crate) dest: Node,
    pub(crate) daemon: Daemon,
}

impl Setup {
    pub(crate) fn new() -> Self {
        let dir = tempfile::Builder::new().prefix("ferry-net-").tempdir().unwrap();
        let source = Node::init(dir.path(), "source-node");
        let dest = Node::init(dir.path(), "dest-node");
        dest.ok(&["trust", &source.id, "--name", "source"]);
        let daemon = Daemon::start(&dest);
        source.ok(&["trust", &dest.id, "--name", "dest"]);
        // Again, with the address: updates the same peer.
        source.ok(&["trust", &dest.id, "--name", "dest", "--addr", &daemon.addr]);
        Self { dir, source, dest, daemon }
    }

    /// Replaces the daemon with one run by `wrapper` (`strace ...`, or nothing) with `extra` flags, and
    /// points the source at its new address.
    pub(crate) fn restart_daemon(&mut self, wrapper: &[&str], extra: &[&str]) {
        self.daemon = Daemon::start_wrapped(&self.dest, wrapper, extra);
        self.source.ok(&["trust", &self.dest.id, "--name", "dest", "--addr", &self.daemon.addr]);
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub(crate) fn job(&self, name: &str, source: &Path, target: &Path) {
        self.dest.ok(&["job", "add", name, "--path", target.to_str().unwrap(), "--peer", "source"]);
        self.source.ok(&["job", "add", name, "--path", source.to_str().unwrap(), "--peer", "dest"]);
    }
}

/// A fresh export (`doExport` into a new folder: the same bytes, every mtime new) costs a few bytes
/// per file on the wire: each change is its place in the round both nodes hold and its new mtime,
/// compressed with its neighbours. Counted against a round with no change on the same tree (the two
/// connections' handshakes and QUIC's probes are in both).
#[test]
fn a_fresh_export_costs_a_few_bytes_per_file_on_the_wire() {
    let setup = Setup::new();
    let (source, target) = (setup.path("export"), setup.path("migration"));
    let mut tree = TreeGenerator::create(&source, TreeSpec::with_files(6000, 37)).unwrap();
    setup.job("zimbra", &source, &target);
    assert_eq!(setup.source.sync("zimbra")["in_sync"], true);
    let unchanged = setup.source.sync("zimbra");
    assert_eq!(unchanged["changes"], 0, "{unchanged}");
    let fresh = tree.fresh_export().unwrap();
    let report = setup.source.sync("zimbra");
    assert_eq!(report["in_sync"], true, "{report}");
    assert_same_tree(&source, &target, |_| false);
    let changes = report["changes"].as_u64().unwrap();
    assert!(changes >= fresh.files_rewritten, "{changes} changes for {} files", fresh.files_rewritten);
    let list = report["bytes_on_wire"].as_u64().unwrap().saturating_sub(unchanged["bytes_on_wire"].as_u64().unwrap());
    let per_change = list as f64 / changes as f64;
    eprintln!(
        "fresh export: {list} bytes more than a round with no change, for {changes} changes: {per_change:.1} each"
    );
    assert!(per_change <= 12.0, "{per_change:.1} bytes per changed entry ({list} for {changes})");
    // The report says where the bytes went: the list, and no request for a chunk.
    let (listed, needs) = (report["list_bytes"].as_u64().unwrap(), report["need_bytes"].as_u64().unwrap());
    assert!(listed > 0 && listed <= list, "{listed} bytes of list in {list}: {report}");
    assert_eq!((needs, report["first_byte_ms"].clone()), (0, serde_json::Value::Null), "{report}");
}

#[test]
fn chunks_leave_while_the_source_still_scans() {
    let setup = Setup::new();
    let (source, target) = (setup.path("export"), setup.path("migration"));
    // About 180 MB: more than the list may go ahead of the destination (64 MiB of changed files),
    // so the scan waits for the transfer and ends near the end of the round.
    TreeGenerator::create(&source, TreeSpec::with_files(8000, 41)).unwrap();
    setup.job("zimbra", &source, &target);
    let first = setup.source.sync("zimbra");
    assert_eq!(first["in_sync"], true, "{first}");
    assert_same_tree(&source, &target, |_| false);
    let ms = |name: &str| first[name].as_u64().unwrap();
    assert!(ms("first_byte_ms") < ms("scan_ms") / 2, "the first chunk left before the scan was half done: {first}");
}

#[test]
fn a_large_file_leaves_while_the_source_still_reads_it() {
    let setup = Setup::new();
    let (source, target) = (setup.path("export"), setup.path("migration"));
    // Twice what the list may go ahead of the destination: the scan reads the file as its chunks
    // are asked for, not before.
    let content = crate::util::random_bytes(160 << 20, 43);
    crate::util::write(&source.join("server/backup.tgz"), &content);
    setup.job("zimbra", &source, &target);
    let first = setup.source.sync("zimbra");
    assert_eq!(first["in_sync"], true, "{first}");
    assert!(
        std::fs::read(target.join("server/backup.tgz")).unwrap() == content,
        "the file in place is not the source's"
    );
    let ms = |name: &str| first[name].as_u64().unwrap();
    eprintln!("first chunk after {} ms, scan {} ms", ms("first_byte_ms"), ms("scan_ms"));
    // Listed once read whole, its first chunk left after its scan: at 248 ms of a 121 ms scan here.
    assert!(ms("first_byte_ms") < ms("scan_ms") / 2, "the first chunk left before the file was half read: {first}");
    // Each chunk once, and the file's bytes once on the wire.
    assert_eq!(first["chunk_bytes"].as_u64(), Some(160 << 20), "{first}");
}

#[test]
fn three_rounds_send_little_more_than_what_is_new() {
    let setup = Setup::new();
    let (source, target) = (setup.path("export"), setup.path("migration"));
    let mut tree = TreeGenerator::create(&source, TreeSpec::with_files(3000, 31)).unwrap();
    setup.job("zimbra", &source, &target);
    let jobs = setup.dest.ok(&["job", "list"]);
    assert!(jobs.contains("zimbra") && jobs.contains("migration"), "{jobs}");

    let first = setup.source.sync("zimbra");
    assert_eq!(first["round"], 1);
    assert_eq!(first["in_sync"], true);
    assert_same_tree(&source, &target, |_| false);
    let tree_bytes = first["chunk_bytes"].as_u64().unwrap();
    // What was sent once: packets lost and sent again (on a loopback starved of CPU by the tests
    // beside this one, the socket buffers overflow) are QUIC's business, not a chunk sent twice.
    let sent_once = first["bytes_on_wire"].as_u64().unwrap().saturating_sub(first["bytes_lost"].as_u64().unwrap());
    assert!(sent_once < tree_bytes + tree_bytes / 10, "{sent_once} bytes sent for {tree_bytes}: {first}");
    // Where the bytes went: chunk data (the metadata compressed), the list, the requests; the rest is
    // QUIC's own. The first chunk left within the round (the list streams: perhaps before the scan ended).
    let kind = |name: &str| first[name].as_u64().unwrap();
    assert!(kind("payload_bytes") < tree_bytes && kind("payload_bytes") > tree_bytes / 2, "{first}");
    assert!(kind("list_bytes") > 0 && kind("need_bytes") > 0, "{first}");
    assert!(kind("payload_bytes") + kind("list_bytes") + kind("need_bytes") < kind("bytes_on_wire"), "{first}");
    assert!(kind("first_byte_ms") <= kind("duration_ms"), "{first}");

    let mut kept = ferry_testkit::snapshot(&source, &[]).unwrap();
    for round in 2..=3 {
        let day = tree.next_day().unwrap();
        let report = setup.source.sync("zimbra");
        assert_eq!(report["round"], round);
        assert_eq!(report["in_sync"], true, "{report}");
        assert_same_tree(&source, &target, |p| kept.contains_key(p));
        let wire = report["bytes_on_wire"].as_u64().unwrap();
        // What the day wrote (new BLOBs, rewritten metadata), compressed where it pays, plus the
        // manifest changes and QUIC's own bytes: never the whole tree again.
        assert!(
            wire < day.bytes_written + day.bytes_written / 5 + 200_000,
            "round {round}: {wire} bytes on the wire for {} new",
            day.bytes_written
        );
        assert!(wire < tree_bytes / 4, "round {round}: {wire} bytes on the wire");
        assert!(report["changes"].as_u64().unwrap() < 2000, "{report}");
        kept.extend(ferry_testkit::snapshot(&source, &[]).unwrap());
    }

    // Nothing changed: about a hundred kilobytes, and the destination commits the round without
    // rewriting its manifest or touching the target (not even the top folder's mtime, which a staging
    // folder moves). Most of those bytes are QUIC's path MTU probes: on loopback each side searches up
    // to 6500 bytes with padded datagrams, once per connection (16 KB without them).
    let manifest = setup.dest.config.join("data/jobs/zimbra/target/manifest");
    let identity = |path: &Path| {
        let meta = std::fs::metadata(path).unwrap();
        (std::os::unix::fs::MetadataExt::ino(&meta), meta.modified().unwrap())
    };
    let (manifest_before, target_before) = (identity(&manifest), identity(&target));
    let idle = setup.source.sync("zimbra");
    assert_eq!(idle["changes"], 0);
    assert_eq!((idle["round"].as_u64(), idle["in_sync"].as_bool()), (Some(4), Some(true)), "{idle}");
    assert!(idle["bytes_on_wire"].as_u64().unwrap() < 160 << 10, "{idle}");
    assert_eq!(identity(&manifest), manifest_before, "the manifest was rewritten");
    assert_eq!(identity(&target), target_before);
    // What a cut attempt leaves in the staging folder sends the next idle round the full way, which
    // empties it, and the target's mtime is still the source's.
    std::fs::create_dir(target.join(".ferry-staging")).unwrap();
    std::fs::write(target.join(".ferry-staging/tmp-1"), b"half a file").unwrap();
    let idle = setup.source.sync("zimbra");
    assert_eq!((idle["round"].as_u64(), idle["in_sync"].as_bool()), (Some(5), Some(true)), "{idle}");
    assert!(!target.join(".ferry-staging").exists());
    assert_ne!(identity(&manifest).0, manifest_before.0, "the full way commits a new manifest");
    assert_eq!(identity(&target).1, std::fs::metadata(&source).unwrap().modified().unwrap());
    assert_same_tree(&source, &target, |p| kept.contains_key(p));

    // verify re-reads the target: clean, then a flipped byte and a changed mode are found; a file only
    // the target has (the import's) is not a difference.
    std::fs::write(target.join("map_source"), b"import map").unwrap();
    let out = setup.dest.run(&["verify", "zimbra"]);
    assert_eq!(out.status.code(), Some(ferry::exit::OK), "{}", String::from_utf8_lossy(&out.stdout));
    let victim = target.join("backupstat");
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[0] ^= 1;
    let mtime = std::fs::metadata(&victim).unwrap().modified().unwrap();
    std::fs::write(&victim, &bytes).unwrap();
    std::fs::File::options().write(true).open(&victim).unwrap().set_modified(mtime).unwrap();
    let account_info =
        std::fs::read_dir(target.join("accounts")).unwrap().next().unwrap().unwrap().path().join("account_info");
    std::fs::set_permissions(&account_info, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    // A folder's mtime moved by hand (no file of the import in it) is a difference; the top folder's,
    // moved by the import's map file, is listed apart.
    let accounts = target.join("accounts");
    let moved = std::fs::metadata(&accounts).unwrap().modified().unwrap() - std::time::Duration::from_secs(3600);
    std::fs::File::open(&accounts).unwrap().set_modified(moved).unwrap();
    let out = setup.dest.run(&["verify", "zimbra", "--json"]);
    assert_eq!(out.status.code(), Some(ferry::exit::DIFFERENCES));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let differences: Vec<String> =
        report["differences"].as_array().unwrap().iter().map(|d| d.as_str().unwrap().to_owned()).collect();
    assert_eq!(differences.len(), 3, "{differences:?}");
    assert!(differences[1].starts_with("backupstat: content differs"), "{differences:?}");
    assert!(differences[0].ends_with("account_info: mode 600, should be 644"), "{differences:?}");
    assert_eq!(differences[2], "accounts: mtime differs", "{differences:?}");
    assert_eq!(report["folder_mtimes_moved"], serde_json::json!(["."]), "{report}");
}

#[test]
fn strangers_are_refused_with_a_message_that_says_what_to_do() {
    let setup = Setup::new();
    let (source, target) = (setup.path("export"), setup.path("migration"));
    std::fs::create_dir_all(&source).unwrap();
    std::fs::write(source.join("f"), b"data").unwrap();
    setup.job("zimbra", &source, &target);

    // A node the destination does not trust.
    // Every refusal comes from the check before the export hook: the hook never runs.
    let stranger = Node::init(setup.dir.path(), "stranger");
    stranger.ok(&["trust", &setup.dest.id, "--name", "dest", "--addr", &setup.daemon.addr]);
    stranger.ok(&["job", "add", "zimbra", "--path", source.to_str().unwrap(), "--peer", "dest"]);
    let exported = setup.path("exported");
    let export_cmd = format!("touch {}", exported.display());
    stranger.ok(&["job", "set", "zimbra", "--export-cmd", &export_cmd]);
    setup.source.ok(&["job", "set", "zimbra", "--export-cmd", &export_cmd]);
    let out = stranger.run(&["sync", "--round", "zimbra"]);
    assert_eq!(out.status.code(), Some(ferry::exit::REFUSED));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&stranger.id) && stderr.contains("ferry trust"), "{stderr}");
    assert!(!exported.exists(), "the export hook ran for a round the destination refuses");

    // A destination that is not the pinned node.
    setup.source.ok(&["trust", &stranger.id, "--name", "dest", "--addr", &setup.daemon.addr]);
    let out = setup.source.run(&["sync", "--round", "zimbra"]);
    assert_eq!(out.status.code(), Some(ferry::exit::REFUSED));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&setup.dest.id) && stderr.contains("ferry trust"), "{stderr}");
    assert!(!target.join("f").exists(), "something was transferred");
    assert!(!exported.exists(), "the export hook ran for a round the destination refuses");

    // A trusted node writing a job that is not its own.
    setup.source.ok(&["trust", &setup.dest.id, "--name", "dest", "--addr", &setup.daemon.addr]);
    setup.dest.ok(&["trust", &stranger.id, "--name", "other"]);
    let out = stranger.run(&["sync", "--round", "zimbra"]);
    assert_eq!(out.status.code(), Some(ferry::exit::REFUSED));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("belongs to peer source"), "{stderr}");
    assert!(!target.join("f").exists(), "something was transferred");
    assert!(!exported.exists(), "the export hook ran for a round the destination refuses");

    // A job the destination does not have.
    setup.source.ok(&["job", "add", "mailbox", "--path", source.to_str().unwrap(), "--peer", "dest"]);
    setup.source.ok(&["job", "set", "mailbox", "--export-cmd", &export_cmd]);
    let out = setup.source.run(&["sync", "--round", "mailbox"]);
    assert_eq!(out.status.code(), Some(ferry::exit::REFUSED));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("there is no job \"mailbox\"") && stderr.contains("ferry job add mailbox"), "{stderr}");
    assert!(!exported.exists(), "the export hook ran for a round the destination refuses");
    assert!(!stderr.contains("scanning"), "the tree was scanned for a round the destination refuses:\n{stderr}");

    // The rightful source still gets through, its export hook run once.
    assert_eq!(setup.source.sync("zimbra")["in_sync"], true);
    assert_eq!(std::fs::read(target.join("f")).unwrap(), b"data");
    assert!(exported.exists());
    let dest: serde_json::Value = serde_json::from_slice(&setup.dest.run(&["status", "--json"]).stdout).unwrap();
    assert_eq!(dest["jobs"][0]["received"].as_array().unwrap().len(), 1, "a check opened a round: {dest}");
}

#[test]
fn the_check_and_the_round_go_out_from_one_socket() {
    let Some(strace) = strace("cannot count the source's sockets") else { return };
    let setup = Setup::new();
    let (source, target) = (setup.path("export"), setup.path("migration"));
    std::fs::create_dir_all(&source).unwrap();
    std::fs::write(source.join("f"), b"data").unwrap();
    setup.job("zimbra", &source, &target);
    let trace = setup.path("sync.trace");
    let out = Command::new(strace)
        .args(["-f", "-qq", "-e", "trace=bind", "-o"])
        .arg(&trace)
        .arg(ferry_bin())
        .arg("--config-dir")
        .arg(&setup.source.config)
        .args(["sync", "--round", "zimbra", "--json"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("would take a round"), "no check before the round:\n{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["in_sync"], true, "{report}");
    let trace = std::fs::read_to_string(&trace).unwrap();
    // An endpoint's socket is bound to 0.0.0.0 (quinn-udp's probes for GSO and GRO bind others).
    let bound = trace.lines().filter(|l| l.contains("inet_addr(\"0.0.0.0\")")).count();
    assert_eq!(bound, 1, "the source bound {bound} sockets for a check and a round:\n{trace}");
}

#[test]
fn a_target_prefilled_by_cp_sends_only_what_differs() {
    let setup = Setup::new();
    let (source, target) = (setup.path("export"), setup.path("shipped"));
    let mut tree = TreeGenerator::create(&source, TreeSpec::with_files(2000, 41)).unwrap();
    let status = Command::new("cp").arg("-a").arg(&source).arg(&target).status().unwrap();
    assert!(status.success());
    tree.next_day().unwrap();
    setup.job("zimbra", &source, &target);
    // The copy was made well before the round (a shipped disk), not within the second before it,
    // when what a scan sees of a file cannot be trusted.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let daemon = setup.daemon.child.id();
    let read_before = crate::util::io_counter(daemon, "rchar");
    let report = setup.source.sync("zimbra");
    assert_eq!(report["in_sync"], true, "{report}");
    assert_same_tree(&source, &target, |_| true);
    let wire = report["bytes_on_wire"].as_u64().unwrap();
    let tree_bytes: u64 = walk_bytes(&source);
    assert!(wire < tree_bytes / 8, "{wire} bytes on the wire for a {tree_bytes}-byte tree already mostly there");
    // What is there is read once, to index it; a file taken over in place is not read again.
    if let (Some(before), Some(after)) = (read_before, crate::util::io_counter(daemon, "rchar")) {
        let read = after - before;
        eprintln!(
            "the destination read {read} bytes for a {tree_bytes}-byte tree ({:.2}×)",
            read as f64 / tree_bytes as f64
        );
        assert!(read < tree_bytes * 3 / 2, "the destination read {read} bytes for a {tree_bytes}-byte tree");
    }
}

fn walk_bytes(root: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(root).unwrap() {
        let entry = entry.unwrap();
        let meta = std::fs::symlink_metadata(entry.path()).unwrap();
        if meta.is_dir() {
            total += walk_bytes(&entry.path());
        } else if meta.is_file() {
            total += meta.len();
        }
    }
    total
}

#[test]
fn a_source_killed_mid_round_resumes_at_once_and_converges() {
    let setup = Setup::new();
    let (source, target) = (setup.path("export"), setup.path("migration"));
    let mut spec = TreeSpec::with_files(3000, 51);
    spec.max_blob = 4 << 20;
    TreeGenerator::create(&source, spec).unwrap();
    setup.job("zimbra", &source, &target);
    let mut killed_mid_transfer = false;
    for delay_ms in [400, 900, 1500] {
        let mut child = setup
            .source
            .ferry()
            .args(["sync", "--round", "zimbra"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            killed_mid_transfer = true;
        }
        child.wait().unwrap();
    }
    // The destination still has the dead connection open (UDP says nothing when a process dies): the
    // next round from the same peer replaces it instead of being refused as busy.
    let started = std::time::Instant::now();
    let report = setup.source.sync("zimbra");
    assert_eq!(report["in_sync"], true, "{report}");
    assert!(started.elapsed() < std::time::Duration::from_secs(50), "the rerun waited for the dead round to time out");
    assert_same_tree(&source, &target, |_| false);
    assert!(!target.join(ferry_engine::STAGING_DIR).exists());
    assert!(killed_mid_transfer, "no run was interrupted: make the tree bigger");
}

/// Two sources of one job under the same node identity at once (a second data folder here, and a copy
/// of the first; a copy of the identity on another host is the same to the destination): the second is refused as busy, in
/// words that say why, while the first runs to its end, instead of the two taking the round from each
/// other. A source that died is taken over by another once it is silent.
#[test]
fn a_second_source_under_the_same_identity_is_refused_while_the_first_runs() {
    let setup = Setup::new();
    let (source, target) = (setup.path("export"), setup.path("migration"));
    for i in 0..4 {
        crate::util::write(&source.join(format!("blob{i}")), &crate::util::random_bytes(2 << 20, 40 + i));
    }
    setup.job("zimbra", &source, &target);
    let limited = |data_dir: &Path| {
        let mut sync = setup.source.ferry();
        sync.arg("--data-dir").arg(data_dir).args(["sync", "--round", "zimbra", "--json", "--bwlimit", "2M"]);
        sync.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
    };
    let transfer_begun = || {
        let started = std::time::Instant::now();
        while !target.join(ferry_engine::STAGING_DIR).exists() {
            assert!(started.elapsed() < std::time::Duration::from_secs(30), "the first round did not begin");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    let refused_beside_the_first = |data_dir: &Path| {
        let mut other = setup.source.ferry();
        other.arg("--data-dir").arg(data_dir).args(["sync", "--round", "zimbra"]);
        let other = other.output().unwrap();
        let stderr = String::from_utf8_lossy(&other.stderr);
        assert_eq!(other.status.code(), Some(ferry::exit::REFUSED), "{stderr}");
        assert!(stderr.contains("from another source"), "{stderr}");
    };
    let (first_data, second_data) = (setup.path("data-1"), setup.path("data-2"));

    // 8 MiB at 2 MiB/s: the first round runs for about 4 s.
    let first = limited(&first_data);
    transfer_begun();
    refused_beside_the_first(&second_data);
    let report = crate::util::finish_round(first, std::time::Duration::from_secs(60));
    assert_eq!(report["in_sync"], true, "{report}");
    assert_same_tree(&source, &target, |_| false);

    // A copy of the first's data folder is another source too (its folder has other inodes).
    let copied = setup.path("data-copy");
    assert!(Command::new("cp").arg("-a").arg(&first_data).arg(&copied).status().unwrap().success());
    // The first source dies mid-round; the second takes the job once the first is silent (the
    // destination cannot tell a dead source from a live one sooner).
    crate::util::write(&source.join("blob9"), &crate::util::random_bytes(6 << 20, 49));
    let mut first = limited(&first_data);
    transfer_begun();
    refused_beside_the_first(&copied);
    first.kill().unwrap();
    first.wait().unwrap();
    let mut second = setup.source.ferry();
    second.arg("--data-dir").arg(&second_data).args(["sync", "--round", "zimbra", "--json"]);
    let second = second.output().unwrap();
    assert!(second.status.success(), "{}", String::from_utf8_lossy(&second.stderr));
    let report: serde_json::Value = serde_json::from_slice(&second.stdout).unwrap();
    assert_eq!(report["in_sync"], true, "{report}");
    assert_same_tree(&source, &target, |_| false);
}

#[test]
fn the_import_runs_once_per_committed_round_and_reports_back() {
    let setup = Setup::new();
    let (source, target) = (setup.path("export"), setup.path("migration"));
    let mut tree = TreeGenerator::create(&source, TreeSpec::with_files(500, 61)).unwrap();
    setup.job("zimbra", &source, &target);
    // A stand-in for zxsuite that records its calls; it fails when told to, and can be slow.
    let calls = setup.path("calls.log");
    let script = setup.path("zxsuite");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$*\" >> '{}'\necho importing \"$3\"\nif [ -e '{}' ]; then echo 'account x: restore failed' >&2; exit 7; fi\nif [ -e '{}' ]; then sleep 3; fi\n",
            calls.display(),
            setup.path("fail").display(),
            setup.path("slow").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let script = script.to_str().unwrap();
    setup.dest.ok(&[
        "job",
        "set",
        "zimbra",
        "--import-cmd",
        &format!("{script} backup doExternalRestore {{target}} round={{round}}"),
        "--import-provisioning-cmd",
        &format!("{script} backup doExternalRestore {{target}} provisioning_only TRUE"),
    ]);
    let calls_now =
        || std::fs::read_to_string(&calls).unwrap_or_default().lines().map(str::to_owned).collect::<Vec<_>>();

    // Round 1, provisioning only.
    let out = setup.source.run(&["sync", "--round", "zimbra", "--import", "provisioning-only", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["import"]["success"], true, "{report}");
    assert_eq!(calls_now(), [format!("backup doExternalRestore {} provisioning_only TRUE", target.display())]);

    // Round 2, the full import (the default).
    tree.next_day().unwrap();
    let report = setup.source.sync("zimbra");
    assert_eq!(report["round"], 2);
    assert_eq!(calls_now().len(), 2);
    assert_eq!(calls_now()[1], format!("backup doExternalRestore {} round=2", target.display()));
    assert_eq!(report["import"]["tail"][0], format!("importing {}", target.display()));

    // Round 3 with no import.
    setup.source.ok(&["sync", "--round", "zimbra", "--import", "none"]);
    assert_eq!(calls_now().len(), 2);

    // A failing import: the round is committed, sync exits 4 and shows the output's tail. (Each of
    // these rounds brings a day of changes: a round with nothing new runs no import.)
    tree.next_day().unwrap();
    std::fs::write(setup.path("fail"), b"").unwrap();
    let out = setup.source.run(&["sync", "--round", "zimbra"]);
    assert_eq!(out.status.code(), Some(ferry::exit::IMPORT_FAILED));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("exit code 7") && stderr.contains("restore failed"), "{stderr}");
    std::fs::remove_file(setup.path("fail")).unwrap();
    assert_eq!(calls_now().len(), 3);

    // While an import runs, another round of the job is refused (and says why), or waits with --wait.
    std::fs::write(setup.path("slow"), b"").unwrap();
    tree.next_day().unwrap();
    let mut slow = setup
        .source
        .ferry()
        .args(["sync", "--round", "zimbra", "--no-wait"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(slow.wait().unwrap().success());
    let out = setup.source.run(&["sync", "--round", "zimbra", "--import", "none"]);
    assert_eq!(out.status.code(), Some(ferry::exit::REFUSED));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("import of round 5") && stderr.contains("running since"), "{stderr}");
    std::fs::remove_file(setup.path("slow")).unwrap();
    // --wait asks again until the import is over, and only then runs the export hook and scans: once.
    let exports = setup.path("exports.log");
    let export_cmd = format!("sh -c 'echo export >> {}'", exports.display());
    setup.source.ok(&["job", "set", "zimbra", "--export-cmd", &export_cmd]);
    let waited = setup.source.run(&["sync", "--round", "zimbra", "--import", "none", "--wait"]);
    let stderr = String::from_utf8_lossy(&waited.stderr);
    assert!(waited.status.success(), "{stderr}");
    assert!(stderr.contains("running since") && stderr.contains("asking again in 15 s (--wait)"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&exports).unwrap(), "export\n", "{stderr}");
    assert_eq!(calls_now().len(), 4, "each committed round with an import ran it exactly once");

    // Both nodes keep the history.
    let status: serde_json::Value = serde_json::from_slice(&setup.dest.run(&["status", "--json"]).stdout).unwrap();
    let received = status["jobs"][0]["received"].as_array().unwrap();
    let committed = received.iter().filter(|r| r["event"] == "committed").count();
    let imported = received.iter().filter(|r| r["event"] == "imported").count();
    assert_eq!((committed, imported), (6, 4), "{status}");
    let status: serde_json::Value = serde_json::from_slice(&setup.source.run(&["status", "--json"]).stdout).unwrap();
    let pushed = status["jobs"][0]["pushed"].as_array().unwrap();
    let events: Vec<&str> = pushed.iter().filter_map(|r| r["event"].as_str()).collect();
    assert_eq!(events.iter().filter(|e| **e == "pushed").count(), 6, "{status}");
    // The round refused while the import ran is there too, with why.
    assert_eq!(events.iter().filter(|e| **e == "refused").count(), 1, "{status}");
    // `status` shows the last round and the last import; `log` every one, the failed import too.
    let text = setup.dest.ok(&["status", "zimbra"]);
    assert!(text.contains("committed          round    6") && text.contains("ferry log zimbra"), "{text}");
    assert!(!text.contains("round    1"), "{text}");
    let text = setup.dest.ok(&["log", "zimbra"]);
    assert!(text.contains("import FAILED (exit code 7)") && text.contains("round    6"), "{text}");
}

#[test]
fn a_limited_round_is_never_faster_than_its_limit_and_uses_it() {
    let setup = Setup::new();
    let (source, target) = (setup.path("export"), setup.path("migration"));
    std::fs::create_dir_all(&source).unwrap();
    std::fs::write(source.join("blob.gz"), crate::util::random_bytes(20 << 20, 71)).unwrap();
    setup.job("zimbra", &source, &target);
    let out = setup.source.run(&["sync", "--round", "zimbra", "--bwlimit", "2M", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let seconds = report["duration_ms"].as_f64().unwrap() / 1000.0;
    let wire = report["bytes_on_wire"].as_f64().unwrap();
    assert!(seconds >= 9.5, "20 MiB at 2 MiB/s took {seconds} s");
    assert!(seconds <= 14.0, "20 MiB at 2 MiB/s took {seconds} s: the limit is not used well");
    assert!(wire / seconds <= 2.0 * 1024.0 * 1024.0 * 1.05, "{wire} bytes in {seconds} s");
    assert_same_tree(&source, &target, |_| false);
    let bad = setup.source.run(&["sync", "--round", "zimbra", "--bwlimit", "fast"]);
    assert_eq!(bad.status.code(), Some(ferry::exit::USAGE));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("bad rate \"fast\""));
    let bad = setup.source.run(&["sync", "--round", "zimbra", "--bwlimit", "Mon-Fri 08:00,1M 25:00,off"]);
    assert_eq!(bad.status.code(), Some(ferry::exit::USAGE));
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("\"25:00,off\" (word 3)"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    // A timetable with the same rate all week behaves like the fixed rate.
    std::fs::write(source.join("blob2.gz"), crate::util::random_bytes(4 << 20, 72)).unwrap();
    let report = setup.source.run(&["sync", "--round", "zimbra", "--bwlimit", "00:00,1M 12:00,1M", "--json"]);
    assert!(report.status.success(), "{}", String::from_utf8_lossy(&report.stderr));
    let report: serde_json::Value = serde_json::from_slice(&report.stdout).unwrap();
    let seconds = report["duration_ms"].as_f64().unwrap() / 1000.0;
    assert!((3.7..=7.0).contains(&seconds), "4 MiB at 1 MiB/s took {seconds} s");
}
