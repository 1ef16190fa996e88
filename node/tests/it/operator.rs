//! What an operator sees of two real nodes: the metrics file, signals, the history, `ferry log`,
//! JSON reports, config edits and removals, systemd's readiness.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferry_testkit::{TreeGenerator, TreeSpec};

use crate::network::{Node, Setup};
use crate::util::assert_same_tree;

/// With `metrics_file` set, both nodes rewrite a node_exporter textfile after every round: valid
/// Prometheus text, each job's last round on each side, a failed night shown as one, and the time of
/// the last round in sync left where it was.
#[test]
fn both_nodes_keep_a_metrics_file_that_says_how_the_last_round_ended() {
    let mut setup = Setup::new();
    let (source, target) = (setup.path("export"), setup.path("migration"));
    crate::util::write(&source.join("a"), b"a");
    setup.job("zimbra", &source, &target);
    let metrics = |node: &Node| node.config.join("ferry.prom");
    for node in [&setup.source, &setup.dest] {
        let toml = node.config.join("ferry.toml");
        let text = std::fs::read_to_string(&toml).unwrap();
        let line = format!("metrics_file = \"{}\"\n", metrics(node).display());
        std::fs::write(&toml, line + &text).unwrap();
    }
    assert_eq!(setup.source.sync("zimbra")["in_sync"], true);
    // Samples by name and labels, every line checked against the text format.
    let read = |path: &Path| -> std::collections::HashMap<String, f64> {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let mut samples = std::collections::HashMap::new();
        for line in text.lines() {
            if let Some(comment) = line.strip_prefix("# ") {
                assert!(comment.starts_with("HELP ferry_") || comment.starts_with("TYPE ferry_"), "{line}");
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {line}"));
            let (name, labels) = series.split_once('{').unwrap_or_else(|| panic!("no labels: {line}"));
            assert!(name.chars().all(|c| c.is_ascii_lowercase() || c == '_') && labels.ends_with('}'), "{line}");
            samples.insert(series.to_owned(), value.parse::<f64>().unwrap_or_else(|_| panic!("{line}")));
        }
        samples
    };
    let sent = |name: &str| format!("{name}{{job=\"zimbra\",side=\"sent\"}}");
    let source_metrics = read(&metrics(&setup.source));
    assert_eq!(source_metrics.get(&sent("ferry_round_last")), Some(&1.0), "{source_metrics:?}");
    assert_eq!(source_metrics.get(&sent("ferry_round_last_success")), Some(&1.0));
    assert_eq!(source_metrics.get(&sent("ferry_round_last_in_sync")), Some(&1.0));
    let in_sync_at = source_metrics[&sent("ferry_round_last_in_sync_timestamp_seconds")];
    assert!(in_sync_at > 1.7e9, "{in_sync_at}");
    // The destination writes its own once its side of the round has ended.
    let received = "ferry_round_last_success{job=\"zimbra\",side=\"received\"}";
    let deadline = Instant::now() + Duration::from_secs(15);
    while read(&metrics(&setup.dest)).get(received) != Some(&1.0) {
        assert!(Instant::now() < deadline, "{:?}", read(&metrics(&setup.dest)));
        std::thread::sleep(Duration::from_millis(100));
    }

    // A night the destination is down: the source's metrics say the round failed.
    setup.daemon.child.kill().unwrap();
    setup.daemon.child.wait().unwrap();
    crate::util::write(&source.join("b"), b"b");
    let out = setup.source.run(&["sync", "--round", "zimbra"]);
    assert_eq!(out.status.code(), Some(ferry::exit::UNREACHABLE));
    let source_metrics = read(&metrics(&setup.source));
    assert_eq!(source_metrics.get(&sent("ferry_round_last")), Some(&2.0), "{source_metrics:?}");
    assert_eq!(source_metrics.get(&sent("ferry_round_last_success")), Some(&0.0));
    assert_eq!(source_metrics.get(&sent("ferry_round_last_in_sync")), Some(&0.0));
    assert_eq!(source_metrics.get(&sent("ferry_round_last_in_sync_timestamp_seconds")), Some(&in_sync_at));
    assert!(
        !std::fs::read_dir(&setup.source.config).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .ends_with(".tmp"))
    );
}

/// The check before the export hook and the round go out from one UDP socket (one quinn endpoint):
/// quinn gives each endpoint a 13 MB receive buffer and zeroes it when it is made.
#[test]
fn sighup_makes_the_daemon_reread_its_config_not_end() {
    let mut setup = Setup::new();
    let (source, target) = (setup.path("src"), setup.path("dst"));
    std::fs::create_dir_all(&source).unwrap();
    std::fs::write(source.join("a"), b"before the signal").unwrap();
    setup.job("zimbra", &source, &target);
    let pid = rustix::process::Pid::from_raw(setup.daemon.child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::HUP).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(setup.daemon.child.try_wait().unwrap().is_none(), "SIGHUP ended the daemon");
    let report = setup.source.sync("zimbra");
    assert_eq!(report["in_sync"], true, "{report}");
    assert_eq!(std::fs::read(target.join("a")).unwrap(), b"before the signal");
}

#[test]
fn a_round_that_fails_is_in_the_history_status_shows() {
    let mut setup = Setup::new();
    let (source, target) = (setup.path("src"), setup.path("dst"));
    std::fs::create_dir_all(&source).unwrap();
    std::fs::write(source.join("a"), b"a").unwrap();
    setup.job("zimbra", &source, &target);
    assert_eq!(setup.source.sync("zimbra")["in_sync"], true);
    // The destination goes away: the next night's round cannot reach it.
    setup.daemon.child.kill().unwrap();
    setup.daemon.child.wait().unwrap();
    let out = setup.source.run(&["sync", "--round", "zimbra"]);
    assert_eq!(out.status.code(), Some(ferry::exit::UNREACHABLE), "{}", String::from_utf8_lossy(&out.stderr));
    let status: serde_json::Value = serde_json::from_slice(&setup.source.run(&["status", "--json"]).stdout).unwrap();
    let pushed = status["jobs"][0]["pushed"].as_array().unwrap();
    let last = pushed.last().unwrap();
    assert_eq!((last["event"].as_str(), last["round"].as_u64()), (Some("failed"), Some(2)), "{status}");
    assert!(!last["error"].as_str().unwrap_or_default().is_empty(), "{status}");
    let text = String::from_utf8_lossy(&setup.source.run(&["status"]).stdout).into_owned();
    assert!(text.contains("failed"), "{text}");
}

/// Every `--json` report carries `schema` 1 and exactly the fields README.md's table lists.
#[test]
fn json_reports_are_versioned_and_documented() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md")).unwrap();
    let table = readme.split("## JSON reports").nth(1).unwrap().split("\n## ").next().unwrap();
    let documented = |label: &str| -> Vec<String> {
        let row =
            table.lines().find(|l| l.starts_with(&format!("| {label} |"))).unwrap_or_else(|| panic!("no row {label}"));
        let fields = row.rsplit('|').nth(1).unwrap();
        let mut fields: Vec<String> = fields.split(',').map(|f| f.trim().trim_matches('`').to_owned()).collect();
        fields.sort();
        fields
    };
    let keys = |value: &serde_json::Value| -> Vec<String> {
        let mut keys: Vec<String> = value.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        keys
    };
    let json = |out: std::process::Output| -> serde_json::Value {
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };

    let setup = Setup::new();
    let (source, target) = (setup.path("export"), setup.path("migration"));
    TreeGenerator::create(&source, TreeSpec::with_files(100, 2)).unwrap();
    setup.job("zimbra", &source, &target);
    setup.dest.ok(&["job", "set", "zimbra", "--import-cmd", "true"]);

    let dry = json(setup.source.run(&["sync", "--round", "zimbra", "--dry-run", "--json"]));
    assert_eq!(keys(&dry), documented("`ferry sync --round JOB --dry-run --json`"));
    let round = setup.source.sync("zimbra");
    assert_eq!(keys(&round), documented("`ferry sync --round JOB --json`"));
    assert_eq!(keys(&round["import"]), documented("its `import` (null when none ran or `--no-wait`)"));
    let check = "its `check`: what the destination's check of its target found, and how long it took";
    assert_eq!(keys(&round["check"]), documented(check));
    let status = json(setup.dest.run(&["status", "--json"]));
    assert_eq!(keys(&status), documented("`ferry status --json`"));
    assert_eq!(keys(&status["jobs"][0]), documented("each of its `jobs`"));
    let verify = json(setup.dest.run(&["verify", "zimbra", "--json"]));
    assert_eq!(keys(&verify), documented("`ferry verify JOB --json`"));
    let local_round = |extra: &[&str]| {
        json(
            setup
                .source
                .ferry()
                .args(["sync", "--round", "--json", "--state-dir"])
                .arg(setup.path("local-state"))
                .arg(&source)
                .arg(setup.path("copy"))
                .args(extra)
                .output()
                .unwrap(),
        )
    };
    let local_plan = local_round(&["--dry-run"]);
    assert_eq!(keys(&local_plan), documented("`ferry sync --round SRC DEST --dry-run --json`"));
    let local = local_round(&[]);
    assert_eq!(keys(&local), documented("`ferry sync --round SRC DEST --json`"));
    // A round that ends in an error prints a document too, with how it ended.
    let out = setup.source.run(&["sync", "--round", "no-such-job", "--json"]);
    assert_eq!(out.status.code(), Some(ferry::exit::ERROR));
    let failed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        keys(&failed),
        documented("`ferry sync ... --json` that ends without its report (exit 1, 6, 7, 8 or 9)")
    );
    assert_eq!((failed["outcome"].as_str(), failed["exit_code"].as_i64()), (Some("error"), Some(1)), "{failed}");
    assert!(failed["error"].as_str().unwrap().contains("no-such-job"), "{failed}");
    for report in [&dry, &round, &status, &verify, &local_plan, &local, &failed] {
        assert_eq!(report["schema"], ferry::REPORT_SCHEMA);
    }
    assert_eq!(ferry::REPORT_SCHEMA, 1, "README says the schema is 1");
}

/// What a person wrote in `ferry.toml` survives the CLI's changes to it: comments, blank lines, the
/// order of tables, each kept line byte for byte; the change adds only its own lines.
#[test]
fn a_cli_change_keeps_every_comment_of_ferry_toml() {
    let setup = Setup::new();
    setup.job("zimbra", &setup.path("export"), &setup.path("migration"));
    let file = setup.source.config.join("ferry.toml");
    let written = std::fs::read_to_string(&file).unwrap();
    let by_hand = format!("# OPS-1234: the new mail server, until the cut-over\n\n{written}")
        .replace("\n[[job]]", "\n# the nightly Backup NG export\n[[job]]")
        .replacen("addr = ", "addr =   ", 1)
        .replace("\"\n\n# the nightly", "\" # via the VPN\n\n# the nightly");
    assert!(by_hand.contains("# via the VPN") && by_hand.contains("addr =   "), "{by_hand}");
    std::fs::write(&file, &by_hand).unwrap();

    setup.source.ok(&["job", "set", "zimbra", "--bwlimit", "10M"]);
    let spare = Node::init(&setup.path("spare"), "spare");
    setup.source.ok(&["trust", &spare.id, "--name", "spare", "--addr", "127.0.0.1:9"]);
    let after = std::fs::read_to_string(&file).unwrap();
    // Every line written by hand is there, in its order; what is new is the change's alone.
    let mut added = Vec::new();
    let mut kept = by_hand.lines().peekable();
    for line in after.lines() {
        if kept.peek() == Some(&line) {
            kept.next();
        } else if !line.is_empty() {
            added.push(line);
        }
    }
    assert_eq!(kept.next(), None, "a line written by hand is gone or changed:\n{after}");
    let spare_id = format!("id = \"{}\"", spare.id);
    // The new peer goes after the other peers, the job's new key at the end of its table.
    let expected = ["[[peer]]", "name = \"spare\"", &spare_id, "addr = \"127.0.0.1:9\"", "bwlimit = \"10M\""];
    assert_eq!(added, expected, "{after}");
    setup.source.ok(&["config", "check"]);
}

/// `job remove` and `untrust` wait for what uses them: a job while a round of it runs (on either
/// node), a peer while jobs name it; the job's state stays unless `--purge`.
#[test]
fn a_job_is_removed_only_when_no_round_of_it_runs_and_a_peer_only_without_jobs() {
    let setup = Setup::new();
    let (source, target) = (setup.path("export"), setup.path("migration"));
    crate::rounds::random_tree(&source, 16, 256 << 10, 9);
    setup.job("zimbra", &source, &target);
    let mut round = setup
        .source
        .ferry()
        .args(["sync", "--round", "zimbra", "--bwlimit", "1M"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(round.stderr.take().unwrap()).lines();
    while !stderr.next().unwrap().unwrap().contains("changes sent") {}
    for node in [&setup.source, &setup.dest] {
        let refused = node.run(&["job", "remove", "zimbra"]);
        let text = String::from_utf8_lossy(&refused.stderr);
        assert_eq!(refused.status.code(), Some(ferry::exit::ERROR), "{text}");
        assert!(text.contains("a round of job zimbra is running on this node"), "{text}");
        assert!(node.ok(&["job", "list"]).contains("zimbra"));
    }
    let refused = setup.source.run(&["untrust", "dest"]);
    let text = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && text.contains("still the peer of job zimbra"), "{text}");
    std::thread::spawn(move || stderr.for_each(drop));
    assert!(round.wait().unwrap().success());

    let state = setup.source.config.join("data/jobs/zimbra");
    assert!(setup.source.ok(&["job", "remove", "zimbra"]).contains("its state stays"));
    assert!(state.exists() && !setup.source.ok(&["job", "list"]).contains("zimbra"));
    setup.source.ok(&["untrust", "dest"]);
    assert!(!std::fs::read_to_string(setup.source.config.join("ferry.toml")).unwrap().contains("[[peer]]"));
    let dest_state = setup.dest.config.join("data/jobs/zimbra");
    assert!(dest_state.exists());
    setup.dest.ok(&["job", "remove", "zimbra", "--purge"]);
    assert!(!dest_state.exists(), "--purge leaves the state");
    assert_same_tree(&source, &target, |_| false);
    let gone = setup.dest.run(&["job", "remove", "zimbra"]);
    assert!(String::from_utf8_lossy(&gone.stderr).contains("there is no job \"zimbra\" here"));
}

/// `ferry log JOB` lists the job's rounds on this node, oldest first, those that did not commit with
/// why; `--last N` keeps the newest N; `--json` has the fields README's table lists.
#[test]
fn the_log_lists_each_round_with_how_it_ended() {
    let setup = Setup::new();
    let (source, target) = (setup.path("export"), setup.path("migration"));
    crate::rounds::random_tree(&source, 4, 64 << 10, 5);
    setup.job("zimbra", &source, &target);
    assert_eq!(setup.source.sync("zimbra")["in_sync"], true);
    crate::rounds::random_tree(&source.join("more"), 32, 256 << 10, 6);
    let stopped = setup.source.run(&["sync", "--round", "zimbra", "--bwlimit", "1M", "--max-duration", "2s"]);
    assert_eq!(stopped.status.code(), Some(ferry::exit::DEADLINE), "{}", String::from_utf8_lossy(&stopped.stderr));

    let log = |node: &Node, extra: &[&str]| -> serde_json::Value {
        let out = node.run(&[&["log", "zimbra", "--json"], extra].concat());
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let events = |log: &serde_json::Value| -> Vec<(String, String, u64)> {
        log["rounds"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (r["side"].as_str().unwrap().into(), r["event"].as_str().unwrap().into(), r["round"].as_u64().unwrap())
            })
            .collect()
    };
    let sent = log(&setup.source, &[]);
    assert_eq!(events(&sent), [("sent".into(), "pushed".into(), 1), ("sent".into(), "stopped".into(), 2)], "{sent}");
    let received = log(&setup.dest, &[]);
    assert_eq!(
        events(&received),
        [("received".into(), "committed".into(), 1), ("received".into(), "stopped".into(), 2)],
        "{received}"
    );
    assert!(received["rounds"][1]["error"].as_str().unwrap().contains("--max-duration"), "{received}");
    assert_eq!(events(&log(&setup.source, &["--last", "1"])), [("sent".into(), "stopped".into(), 2)]);

    let keys: Vec<&str> = sent.as_object().unwrap().keys().map(String::as_str).collect();
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md")).unwrap();
    let row = readme
        .lines()
        .find(|l| l.starts_with("| `ferry log JOB --json` |"))
        .expect("README's JSON table has no row for ferry log");
    for key in &keys {
        assert!(row.contains(&format!("`{key}`")), "README's row lacks {key}: {row}");
    }
    let text = setup.source.ok(&["log", "zimbra"]);
    assert!(text.contains("round    1  pushed") && text.contains("round    2  stopped"), "{text}");
    assert!(text.contains("in sync") && text.contains("stopped at the deadline"), "{text}");
}

/// Under systemd (`Type=notify`), `serve` says READY=1 only once its port is bound, with a STATUS line
/// naming it, and STOPPING=1 when it shuts down.
#[test]
fn the_daemon_tells_systemd_it_is_ready_once_its_port_is_bound() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().unwrap();
    let node = Node::init(dir.path(), "dest");
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(std::time::Duration::from_secs(20))).unwrap();
    let mut daemon = node
        .ferry()
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("NOTIFY_SOCKET", &socket_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = socket.recv(&mut buf).expect("no READY from the daemon");
    let ready = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready}");
    let port: u16 = ready
        .split("listening on 127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|port| port.parse().ok())
        .unwrap_or_else(|| panic!("no address in {ready}"));
    // Bound by the time it says so: the port is taken.
    let taken = std::net::UdpSocket::bind(("127.0.0.1", port));
    assert!(taken.is_err(), "port {port} was free after READY=1");
    let killed = Command::new("kill").args(["-TERM", &daemon.id().to_string()]).status().unwrap();
    assert!(killed.success());
    // Status lines may come first (the daemon says it is idle).
    loop {
        let n = socket.recv(&mut buf).expect("no STOPPING from the daemon");
        let message = String::from_utf8_lossy(&buf[..n]).into_owned();
        if message.lines().any(|l| l == "STOPPING=1") {
            break;
        }
        assert!(message.starts_with("STATUS="), "{message}");
    }
    assert!(daemon.wait().unwrap().success());
}

/// While a round runs, the daemon's status line (what `systemctl status ferry` shows) says which job's
/// round it is, how much it has received and at what rate; once it ends, that it is idle.
#[test]
fn the_daemons_status_line_shows_the_running_round() {
    use std::os::unix::net::UnixDatagram;
    let mut setup = Setup::new();
    let socket_path = setup.path("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    setup.restart_daemon(&["env", &format!("NOTIFY_SOCKET={}", socket_path.display())], &[]);
    let (source, target) = (setup.path("export"), setup.path("migration"));
    for i in 0..4 {
        crate::util::write(&source.join(format!("blobs/{i}")), &crate::util::random_bytes(2 << 20, i));
    }
    setup.job("zimbra", &source, &target);
    let round = setup.source.ferry().args(["sync", "--round", "zimbra", "--bwlimit", "2M"]).output().unwrap();
    assert!(round.status.success(), "{}", String::from_utf8_lossy(&round.stderr));
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut statuses = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        let n = socket.recv(&mut buf).expect("the daemon went silent");
        let message = String::from_utf8_lossy(&buf[..n]).into_owned();
        statuses.extend(message.lines().filter_map(|l| l.strip_prefix("STATUS=")).map(str::to_owned));
        if statuses.iter().any(|s| s.contains("round of zimbra:"))
            && statuses.last().is_some_and(|s| s.starts_with("idle"))
        {
            break;
        }
    }
    let during: Vec<&String> = statuses.iter().filter(|s| s.starts_with("round of zimbra: ")).collect();
    assert!(!during.is_empty(), "no status line during the round: {statuses:#?}");
    assert!(during.iter().any(|s| s.contains(" received, ") && s.contains("/s; listening on")), "{statuses:#?}");
    assert!(statuses.last().is_some_and(|s| s.starts_with("idle, listening on")), "{statuses:#?}");
}
