//! README.md's migration walkthrough, run as written: every ```` ```sh source ```` and
//! ```` ```sh destination ```` block of its "Migrating a Zimbra server" section, in order, by bash,
//! against two nodes on loopback.
//!
//! What a test machine cannot be is mapped, and nothing else:
//! - the servers' paths (`/opt/zimbra/backup/ng`, `/srv/migration/ng`, `/mnt/usb/ng`) and
//!   `new-mail.example.com:7373` go to a temporary folder and a loopback port;
//! - `zimbra` in `--import-user` / `--export-user` becomes the user running the test;
//! - `/opt/zimbra/bin/zxsuite` is a stand-in script: `doSmartScan` adds a few items to the export,
//!   `doExternalRestore` checks its folder and leaves a `map_*` file there as the real import does,
//!   and both log who ran them with what;
//! - `systemctl` is a stand-in that runs the ExecStart of the units in `dist/systemd` (the daemon in the
//!   background, a oneshot in the foreground, honouring `SuccessExitStatus`);
//! - `/etc/ferry` is each node's own folder (`FERRY_CONFIG_DIR`), local-round state goes to
//!   `FERRY_STATE_DIR`, and `ferry` on `PATH` is the binary under test.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferry_testkit::{TreeGenerator, TreeSpec};

use crate::util::{assert_same_tree, ferry_bin};

/// One runnable block of the walkthrough.
#[derive(Debug)]
struct Block {
    node: &'static str,
    text: String,
}

/// The walkthrough section's runnable blocks, in order.
fn blocks(readme: &str) -> Vec<Block> {
    let section = readme.split("\n## Migrating a Zimbra server").nth(1).expect("README has the walkthrough section");
    let section = section.split("\n## ").next().unwrap_or(section);
    let mut blocks = Vec::new();
    let mut lines = section.lines();
    while let Some(line) = lines.next() {
        let node = match line.trim() {
            "```sh source" => "source",
            "```sh destination" => "destination",
            _ => continue,
        };
        let text: Vec<&str> = lines.by_ref().take_while(|l| l.trim() != "```").collect();
        blocks.push(Block { node, text: text.join("\n") + "\n" });
    }
    blocks
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn current_user() -> String {
    let out = Command::new("id").arg("-un").output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn write_script(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

const ZXSUITE: &str = r#"#!/bin/bash
# zxsuite stand-in for the README walkthrough test.
set -euo pipefail
echo "$(id -un) $*" >> '@LOG@'
case "${2:-}" in
  doSmartScan)
    n=$(find '@EXPORT@' -maxdepth 1 -name 'export-*' | wc -l)
    mkdir -p "@EXPORT@/export-$n"
    for i in 1 2 3 4 5; do head -c 30000 /dev/urandom > "@EXPORT@/export-$n/item-$i"; done
    echo "SmartScan done: 5 new items" ;;
  doExternalRestore)
    test -d "$3" || { echo "zxsuite: no folder $3" >&2; exit 1; }
    test -n "$(ls "$3")" || { echo "zxsuite: $3 is empty" >&2; exit 1; }
    echo "old-mail-server-id" > "$3/map_old-mail"
    echo "import of $3 done" ;;
  *) echo "zxsuite stand-in: not simulated: $*" >&2; exit 1 ;;
esac
"#;

const SYSTEMCTL: &str = r#"#!/bin/bash
# systemctl stand-in for the README walkthrough test: runs the ExecStart of the units in dist/systemd.
set -euo pipefail
units='@UNITS@'; state='@STATE@'; listen='@LISTEN@'
unit_file() {
  local unit=$1
  if [[ $unit == *@*.* ]]; then echo "$units/${unit%%@*}@.${unit##*.}"; else echo "$units/$unit"; fi
}
exec_start() {
  local unit=$1 instance="" file
  file=$(unit_file "$unit")
  if [[ $unit == *@*.* ]]; then instance=${unit#*@}; instance=${instance%.*}; fi
  grep -m1 '^ExecStart=' "$file" | sed -e 's/^ExecStart=//' -e 's#^/usr/local/bin/ferry #ferry #' -e "s/%i/$instance/g"
}
verb=$1; shift
now=no
if [[ ${1:-} == --now ]]; then now=yes; shift; fi
unit=${1:-}
if [[ $verb != daemon-reload ]]; then
  file=$(unit_file "$unit")
  [[ -f $file ]] || { echo "systemctl stand-in: no unit file $file" >&2; exit 5; }
fi
case "$verb" in
  daemon-reload) ;;
  enable)
    if [[ $unit == *.service && $now == yes ]]; then
      $(exec_start "$unit") --listen "$listen" > "$state/$unit.log" 2>&1 &
      echo $! > "$state/$unit.pid"
      for _ in $(seq 100); do grep -qs 'listening on' "$state/$unit.log" && exit 0; sleep 0.1; done
      echo "systemctl stand-in: $unit did not start:" >&2; cat "$state/$unit.log" >&2; exit 1
    fi ;;
  disable)
    if [[ -f $state/$unit.pid ]]; then
      pid=$(cat "$state/$unit.pid"); kill "$pid"
      for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      rm "$state/$unit.pid"
    fi ;;
  start)
    ok=$(grep -m1 '^SuccessExitStatus=' "$file" | sed 's/^SuccessExitStatus=//' || true)
    set +e; $(exec_start "$unit"); code=$?; set -e
    for c in 0 $ok; do [[ $code == "$c" ]] && exit 0; done
    echo "systemctl stand-in: $unit failed with exit code $code" >&2; exit 3 ;;
  *) echo "systemctl stand-in: not simulated: $verb" >&2; exit 1 ;;
esac
"#;

/// Kills the daemon the stand-in started, whatever happens to the test.
struct Daemon(PathBuf);

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(&self.0) {
            let _ = Command::new("kill").arg("-9").arg(pid.trim()).status();
        }
    }
}

#[test]
fn the_readme_walkthrough_runs_as_written() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let blocks = blocks(&readme);
    assert!(blocks.len() >= 10, "only {} runnable blocks found", blocks.len());

    let dir = tempfile::Builder::new().prefix("ferry-walkthrough-").tempdir().unwrap();
    let w = dir.path();
    let (bin, state) = (w.join("bin"), w.join("systemd"));
    for sub in [&bin, &state] {
        std::fs::create_dir_all(sub).unwrap();
    }
    let export = w.join("source-tree/ng");
    let mut spec = TreeSpec::with_files(400, 5);
    spec.max_blob = 256 << 10;
    TreeGenerator::create(&export, spec).unwrap();
    let port = free_udp_port();
    let listen = format!("127.0.0.1:{port}");
    let zx_log = w.join("zxsuite.log");
    std::os::unix::fs::symlink(ferry_bin(), bin.join("ferry")).unwrap();
    write_script(
        &bin.join("zxsuite"),
        &ZXSUITE.replace("@LOG@", zx_log.to_str().unwrap()).replace("@EXPORT@", export.to_str().unwrap()),
    );
    write_script(
        &bin.join("systemctl"),
        &SYSTEMCTL
            .replace("@UNITS@", repo().join("dist/systemd").to_str().unwrap())
            .replace("@STATE@", state.to_str().unwrap())
            .replace("@LISTEN@", &listen),
    );
    let _daemon = Daemon(state.join("ferry.service.pid"));

    let user = current_user();
    let target = w.join("target/ng");
    let substitutions = [
        ("/opt/zimbra/bin/zxsuite", bin.join("zxsuite").display().to_string()),
        ("/opt/zimbra/backup/ng", export.display().to_string()),
        ("/srv/migration/ng", target.display().to_string()),
        ("/mnt/usb/ng", w.join("usb/ng").display().to_string()),
        ("new-mail.example.com:7373", listen.clone()),
        ("--import-user zimbra", format!("--import-user {user}")),
        ("--export-user zimbra", format!("--export-user {user}")),
    ];
    let config_dir = |node: &str| w.join(node).join("etc");
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let mut ids: Vec<(&str, String)> = Vec::new();
    let mut transcript = String::new();
    for (number, block) in blocks.iter().enumerate() {
        let mut text = block.text.clone();
        for (from, to) in &substitutions {
            text = text.replace(from, to);
        }
        let mut command = Command::new("bash");
        command
            .args(["-euo", "pipefail", "-c", &text])
            .current_dir(w)
            .env("PATH", &path)
            .env("FERRY_CONFIG_DIR", config_dir(block.node))
            .env("FERRY_STATE_DIR", w.join("local-state"))
            .env_remove("FERRY_DATA_DIR")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (name, id) in &ids {
            command.env(name, id);
        }
        let started = Instant::now();
        let child = command.spawn().unwrap();
        let out = wait_bounded(child, Duration::from_secs(300));
        let output = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        transcript.push_str(&format!(
            "--- block {number} on the {} ({:.1} s):\n{}{output}\n",
            block.node,
            started.elapsed().as_secs_f64(),
            block.text
        ));
        assert!(
            out.status.success(),
            "block {number} on the {} failed ({}):\n{}\n{transcript}",
            block.node,
            out.status,
            block.text
        );
        // The operator copies each ID printed by `ferry init` to the other server.
        for (node, name) in [("source", "SOURCE_ID"), ("destination", "DEST_ID")] {
            if !ids.iter().any(|(n, _)| *n == name) && config_dir(node).join("ferry.toml").exists() {
                let out =
                    Command::new(ferry_bin()).env("FERRY_CONFIG_DIR", config_dir(node)).arg("init").output().unwrap();
                let id = String::from_utf8(out.stdout).unwrap().lines().next().unwrap().to_owned();
                ids.push((name, id));
            }
        }
    }
    println!("{transcript}");

    // The target is the export, plus the import's map file.
    assert_same_tree(&export, &target, |path| path == b"map_old-mail");
    assert!(target.join("map_old-mail").exists());

    // The hooks ran as the mapped user, in the order of the walkthrough: an export before every round
    // (dry run included), the provisioning-only import once, the full import after each other round.
    let log = std::fs::read_to_string(&zx_log).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert!(lines.iter().all(|l| l.starts_with(&format!("{user} "))), "{log}");
    let count = |what: &str| lines.iter().filter(|l| l.contains(what)).count();
    assert_eq!(count("doSmartScan"), 6, "a dry run and five rounds, each after an export:\n{log}");
    assert_eq!(count("provisioning_only TRUE"), 1, "{log}");
    assert_eq!(count("doExternalRestore"), 5, "{log}");
    let provisioning = lines.iter().position(|l| l.contains("provisioning_only")).unwrap();
    assert!(lines[provisioning - 1].contains("doSmartScan") && lines[provisioning - 2].contains("doExternalRestore"));

    // The destination committed five rounds and imported after each; its daemon was stopped by the
    // last block.
    let status = |node: &str| -> serde_json::Value {
        let out = Command::new(ferry_bin())
            .env("FERRY_CONFIG_DIR", config_dir(node))
            .args(["status", "--json", "zimbra"])
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let received = status("destination");
    assert_eq!(received["schema"], 1);
    let rounds = |records: &serde_json::Value, event: &str| -> Vec<u64> {
        records
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["event"] == event)
            .map(|r| r["round"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(rounds(&received["jobs"][0]["received"], "committed"), [1, 2, 3, 4, 5], "{received:#}");
    assert!(!state.join("ferry.service.pid").exists());
    // The shipped disk: the first network round sent only what the disk lacked (the export's new
    // items), a fraction of the tree.
    let pushed = status("source");
    let first = pushed["jobs"][0]["pushed"].as_array().unwrap().iter().find(|r| r["round"] == 1).unwrap().clone();
    let tree = tree_bytes(&w.join("usb/ng"));
    let sent = first["bytes"].as_u64().unwrap();
    assert!(sent * 4 < tree, "the first round sent {sent} bytes for a {tree}-byte tree already on the disk");
}

fn tree_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let meta = entry.metadata().unwrap();
        total += if meta.is_dir() { tree_bytes(&entry.path()) } else { meta.len() };
    }
    total
}

/// Waits for a block, killing it after `limit`.
fn wait_bounded(mut child: std::process::Child, limit: Duration) -> std::process::Output {
    let started = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() || started.elapsed() > limit {
            let _ = child.kill();
            return child.wait_with_output().unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The unit files are valid for systemd itself, where `systemd-analyze` exists.
#[test]
fn the_unit_files_verify() {
    if Command::new("systemd-analyze").arg("--version").output().is_err() {
        eprintln!("systemd-analyze is not installed: skipped");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let units = ["ferry.service", "ferry-sync@.service", "ferry-sync@.timer"];
    for unit in units {
        let text = std::fs::read_to_string(repo().join("dist/systemd").join(unit)).unwrap();
        // systemd checks that the binary exists: point it at the one under test.
        let text = text.replace("/usr/local/bin/ferry", ferry_bin().to_str().unwrap());
        std::fs::write(dir.path().join(unit), text).unwrap();
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg("--man=no")
        .args(units.iter().map(|u| dir.path().join(u)))
        .env("SYSTEMD_LOG_LEVEL", "notice")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "{stderr}");
    // Each ExecStart is a command line ferry accepts.
    for unit in ["ferry.service", "ferry-sync@.service"] {
        let text = std::fs::read_to_string(repo().join("dist/systemd").join(unit)).unwrap();
        let exec = text.lines().find_map(|l| l.strip_prefix("ExecStart=")).unwrap().replace("%i", "zimbra");
        let parsed = <ferry::cli::Cli as clap::Parser>::try_parse_from(exec.split_whitespace());
        assert!(parsed.is_ok(), "{unit}: {exec}: {:?}", parsed.err());
    }
}
