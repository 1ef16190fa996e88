//! The `ferry` binary as an operator runs it: real processes, exit codes, kill -9 at any moment.

use std::process::{Command, Stdio};
use std::time::Duration;

use ferry_testkit::{TreeGenerator, TreeSpec};

use crate::util::{Pair, assert_same_tree, ferry_bin, no_staging_leftovers, random_bytes, write};

fn sync(pair: &Pair, extra: &[&str]) -> Command {
    let mut cmd = Command::new(ferry_bin());
    cmd.args(["sync", "--round"]).arg(pair.source()).arg(pair.target()).arg("--state-dir").arg(pair.state());
    cmd.args(extra);
    cmd
}

#[test]
fn a_round_prints_a_summary_and_a_json_report() {
    let pair = Pair::new();
    write(&pair.source().join("a/b"), b"hello");
    write(&pair.source().join("c"), &random_bytes(300_000, 1));
    let out = sync(&pair, &[]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("2 files written") && stdout.contains("matches the source"), "{stdout}");
    assert_same_tree(&pair.source(), &pair.target(), |_| false);

    let out = sync(&pair, &["--json"]).output().unwrap();
    assert!(out.status.success());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["apply"]["files_written"], 0);
    assert_eq!(report["scan"]["files"], 2);
    assert_eq!(report["in_sync"], true);
}

#[test]
fn errors_are_clear_and_exit_codes_distinct() {
    let pair = Pair::new();
    let out =
        Command::new(ferry_bin()).args(["sync", "--round", "/no/such/folder"]).arg(pair.target()).output().unwrap();
    assert_eq!(out.status.code(), Some(ferry::exit::ERROR));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/no/such/folder") && stderr.contains("does not exist"), "{stderr}");

    let out = Command::new(ferry_bin()).args(["sync", "--round"]).output().unwrap();
    assert_eq!(out.status.code(), Some(ferry::exit::USAGE));

    // An entry that cannot be applied: the round goes on, reports it and exits 3. (After a first round,
    // which adopts what it finds.)
    write(&pair.source().join("e"), b"y");
    assert!(sync(&pair, &[]).output().unwrap().status.success());
    write(&pair.source().join("d/f"), b"x");
    write(&pair.target().join("d"), b"destination-only file where the source has a folder");
    let out = sync(&pair, &[]).output().unwrap();
    assert_eq!(out.status.code(), Some(ferry::exit::INCOMPLETE));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("d: holds a file that ferry did not put there"), "{stderr}");
    assert_eq!(std::fs::read(pair.target().join("e")).unwrap(), b"y");
    assert_eq!(std::fs::read(pair.target().join("d")).unwrap(), b"destination-only file where the source has a folder");
}

#[test]
fn a_round_killed_at_random_points_ends_identical_when_rerun() {
    use rand::{RngExt, SeedableRng};
    let pair = Pair::new();
    std::fs::remove_dir(pair.source()).unwrap();
    let mut spec = TreeSpec::with_files(4000, 11);
    spec.max_blob = 2 << 20;
    let mut tree = TreeGenerator::create(&pair.source(), spec).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let (mut kills, mut runs) = (0, Vec::new());
    for day in 0..3 {
        if day > 0 {
            tree.next_day().unwrap();
        }
        for _ in 0..4 {
            let mut child = sync(&pair, &["--delete"]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
            // A day's round moves far less than the first one: it is over in a few hundred ms.
            let ms = if day == 0 { rng.random_range(20..900) } else { rng.random_range(5..300) };
            std::thread::sleep(Duration::from_millis(ms));
            let killed = child.try_wait().unwrap().is_none();
            if killed {
                child.kill().unwrap(); // SIGKILL
                kills += 1;
            }
            let out = child.wait_with_output().unwrap();
            let status = out.status;
            runs.push(format!(
                "day {day}, {ms} ms: {}{}",
                if killed { "killed".to_string() } else { status.to_string() },
                if killed || status.success() {
                    String::new()
                } else {
                    format!(": {}", String::from_utf8_lossy(&out.stderr))
                }
            ));
            // A round that ended by itself, after a killed one or not, succeeded.
            assert!(killed || status.success(), "{runs:#?}");
        }
        let out = sync(&pair, &["--delete"]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_same_tree(&pair.source(), &pair.target(), |_| false);
        assert!(no_staging_leftovers(&pair.target()));
        assert!(!pair.target().join(ferry_engine::STAGING_DIR).exists());
    }
    assert!(kills >= 3, "only {kills} runs were killed mid-round, the tree is too small to test this: {runs:#?}");
}

/// README's exit-code table lists exactly the codes of `ferry::exit`, and each row names a test that
/// exists and asserts that code (by its constant).
#[test]
fn the_exit_code_table_is_true() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("../README.md")).unwrap();
    let table = readme.split("## Exit codes").nth(1).unwrap().split("\n## ").next().unwrap();
    let rows: Vec<(i32, Vec<String>)> = table
        .lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let code = cells.get(1)?.parse().ok()?;
            // The man pages' EXIT STATUS says the same words.
            assert_eq!(
                cells.get(2).copied(),
                Some(ferry::exit::meaning(code)),
                "exit code {code}: README and exit::meaning differ"
            );
            let tests = cells.get(3)?.split(',').map(|t| t.trim().trim_matches('`').to_owned()).collect();
            Some((code, tests))
        })
        .collect();
    let codes: Vec<i32> = rows.iter().map(|(code, _)| *code).collect();
    assert_eq!(codes, ferry::exit::ALL.map(|(_, code)| code), "README's table and ferry::exit differ");
    let sources: Vec<String> = std::fs::read_dir(root.join("tests/it"))
        .unwrap()
        .map(|entry| std::fs::read_to_string(entry.unwrap().path()).unwrap())
        .collect();
    for ((name, code), (_, tests)) in ferry::exit::ALL.iter().zip(&rows) {
        for test in tests {
            let body = sources
                .iter()
                .find_map(|source| source.split(&format!("fn {test}()")).nth(1))
                .unwrap_or_else(|| panic!("exit code {code}: no test called {test}"));
            let body = body.split("\n}\n").next().unwrap();
            assert!(
                body.contains(&format!("ferry::exit::{name})")),
                "exit code {code}: {test} does not assert ferry::exit::{name}"
            );
        }
    }
}

#[test]
fn config_check_names_the_line_and_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let ferry =
        |args: &[&str]| Command::new(ferry_bin()).env("FERRY_CONFIG_DIR", dir.path()).args(args).output().unwrap();
    assert!(ferry(&["init"]).status.success());
    let id = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let file = dir.path().join("ferry.toml");
    std::fs::write(&file, format!("[[peer]]\nname = \"dest\"\nid = \"{id}\"\nadress = \"x:1\"\n")).unwrap();
    let out = ferry(&["config", "check"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(ferry::exit::ERROR), "{stderr}");
    assert!(stderr.contains(&format!("{}:4:1: error: adress: unknown field `adress`", file.display())), "{stderr}");
    // Every command that reads the file says the same, not only `config check`.
    let out = ferry(&["job", "list"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("ferry.toml:4:1: error: adress"));

    // A file given by path, with a bad value three tables down.
    let other = dir.path().join("new.toml");
    std::fs::write(
        &other,
        format!("[[peer]]\nname = \"dest\"\nid = \"{id}\"\n\n[[job]]\nname = \"z\"\npath = \"/z\"\npeer = \"dest\"\nbwlimit = \"08:00,fast\"\n"),
    )
    .unwrap();
    let out = ferry(&["config", "check", other.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(ferry::exit::ERROR), "{stderr}");
    assert!(stderr.contains("new.toml:9:1: error: job \"z\" bwlimit:") && stderr.contains("fast"), "{stderr}");

    std::fs::write(&other, format!("[[peer]]\nname = \"dest\"\nid = \"{id}\"\n")).unwrap();
    let out = ferry(&["config", "check", other.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(ferry::exit::OK));
    assert!(String::from_utf8_lossy(&out.stdout).contains("is valid: 1 peer, 0 jobs"));
}

#[test]
fn commands_check_their_input_where_it_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let ferry =
        |args: &[&str]| Command::new(ferry_bin()).env("FERRY_CONFIG_DIR", dir.path()).args(args).output().unwrap();
    assert!(ferry(&["init"]).status.success());
    let id = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    // An address that does not parse is refused at `trust`, and the file stays loadable.
    let out = ferry(&["trust", id, "--name", "dest", "--addr", "nonsense"]);
    assert_eq!(out.status.code(), Some(ferry::exit::ERROR), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(ferry(&["trust", id, "--name", "dest", "--addr", "127.0.0.1:7373"]).status.success());
    assert!(ferry(&["job", "add", "zimbra", "--path", "/srv/a", "--peer", "dest"]).status.success());
    // `job add` of a name that exists is refused (that is `job set`), and the job keeps its folder.
    let out = ferry(&["job", "add", "zimbra", "--path", "/srv/b", "--peer", "dest"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(ferry::exit::ERROR), "{stderr}");
    assert!(stderr.contains("ferry job set zimbra"), "{stderr}");
    let config = std::fs::read_to_string(dir.path().join("ferry.toml")).unwrap();
    assert!(config.contains("/srv/a") && !config.contains("/srv/b"), "{config}");
}

#[test]
fn a_local_round_that_does_not_fit_is_refused_before_it_writes() {
    if !crate::util::is_root() {
        eprintln!("SKIPPED: the local space test mounts a tmpfs and needs root");
        return;
    }
    let pair = Pair::new();
    let _disk = crate::util::Tmpfs::mount(&pair.target(), "8m");
    write(&pair.source().join("a"), &random_bytes(3 << 20, 1));
    assert!(sync(&pair, &[]).output().unwrap().status.success());
    let before = ferry_testkit::snapshot(&pair.target(), &[]).unwrap();

    // 5 MiB more beside the 3 held on 8: the dry run says it does not fit, and the round refuses.
    write(&pair.source().join("b"), &random_bytes(5 << 20, 2));
    let plan = sync(&pair, &["--dry-run", "--json"]).output().unwrap();
    let plan: serde_json::Value = serde_json::from_slice(&plan.stdout).unwrap();
    assert!(plan["space_needed"].as_u64().unwrap() > 5 << 20, "{plan}");
    assert!(plan["space_needed"].as_u64() > plan["space_available"].as_u64(), "{plan}");
    let out = sync(&pair, &[]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(ferry::exit::REFUSED), "{stderr}");
    assert!(stderr.contains("not enough space") && stderr.contains("(5.0 MiB)"), "{stderr}");
    let after = ferry_testkit::snapshot(&pair.target(), &[]).unwrap();
    assert!(ferry_testkit::compare_trees(&before, &after, |_| false).is_ok(), "the refused round wrote");

    // Smaller, it fits.
    write(&pair.source().join("b"), &random_bytes(2 << 20, 2));
    assert!(sync(&pair, &[]).output().unwrap().status.success());
    assert_same_tree(&pair.source(), &pair.target(), |_| false);
}

#[test]
fn a_local_round_keeps_its_state_under_the_data_dir_it_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let (source, target, data) = (dir.path().join("src"), dir.path().join("dst"), dir.path().join("data"));
    std::fs::create_dir_all(&source).unwrap();
    std::fs::write(source.join("a"), b"a").unwrap();
    let out = Command::new(ferry_bin())
        .env_remove("FERRY_STATE_DIR")
        .args(["--data-dir", data.to_str().unwrap(), "sync", "--round"])
        .args([&source, &target])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let pairs: Vec<_> = std::fs::read_dir(data.join("local")).unwrap().collect();
    assert_eq!(pairs.len(), 1, "one state folder for the pair under the data dir");
}

#[test]
fn completions_and_man_pages_come_from_the_command_line() {
    let out = Command::new(ferry_bin()).args(["completions", "bash"]).output().unwrap();
    let script = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && script.contains("--max-duration") && script.contains("complete -F"), "{script}");
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(ferry_bin()).arg("man").arg(dir.path()).output().unwrap();
    assert!(out.status.success());
    let sync = std::fs::read_to_string(dir.path().join("ferry-sync.1")).unwrap();
    assert!(sync.starts_with(".ie") || sync.contains(".TH"), "{sync}");
    assert!(sync.contains("max\\-duration") && sync.contains("Examples"), "{}", &sync[..sync.len().min(2000)]);
    assert!(dir.path().join("ferry.1").exists() && dir.path().join("ferry-config-check.1").exists());
    // The sections clap does not make: every exit code with its meaning, the files, the environment.
    for (_, code) in ferry::exit::ALL {
        assert!(sync.contains(&format!(".TP\n\\fB{code}\\fR\n")), "exit code {code} missing");
    }
    assert!(sync.contains("stopped the round cleanly") && sync.contains("\\-\\-max\\-duration ran out"), "{sync}");
    for section in [".SH \"EXIT STATUS\"", ".SH FILES", "/etc/ferry/ferry.toml", ".SH ENVIRONMENT", "FERRY_DATA_DIR"] {
        assert!(sync.contains(section), "{section} missing");
    }
}

/// Under systemd, with stderr connected to the journal (JOURNAL_STREAM names its device and inode), log
/// lines carry their priority as `<N>` and no timestamp of their own (the journal keeps one); anywhere
/// else they keep theirs.
#[test]
fn logs_into_the_journal_carry_priorities_and_no_timestamp() {
    use std::os::unix::fs::MetadataExt;
    let pair = Pair::new();
    write(&pair.source().join("a"), b"hello");
    let log = pair.state().with_extension("log");
    let run = |journal: bool| -> String {
        let file = std::fs::File::create(&log).unwrap();
        let meta = file.metadata().unwrap();
        let mut cmd = sync(&pair, &["-v"]);
        if journal {
            cmd.env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()));
        } else {
            cmd.env("JOURNAL_STREAM", "1:2");
        }
        let out = cmd.stdout(Stdio::null()).stderr(file).status().unwrap();
        assert!(out.success());
        std::fs::read_to_string(&log).unwrap()
    };
    let journal = run(true);
    let lines: Vec<&str> = journal.lines().filter(|l| !l.starts_with(' ')).collect();
    assert!(!lines.is_empty(), "nothing logged");
    for line in &lines {
        let (priority, rest) = line.strip_prefix('<').and_then(|l| l.split_once('>')).unwrap_or(("", line));
        assert!(["3", "4", "6", "7"].contains(&priority), "no priority: {line}");
        assert!(!rest.trim_start().starts_with(|c: char| c.is_ascii_digit()), "a timestamp of its own: {line}");
    }
    assert!(lines.iter().any(|l| l.starts_with("<6>")), "{journal}");
    let elsewhere = run(false);
    assert!(elsewhere.lines().any(|l| l.starts_with("20")), "{elsewhere}");
    assert!(!elsewhere.contains("<6>"), "{elsewhere}");
}

/// `--log-format json` (or `FERRY_LOG_FORMAT=json`): every log line on stderr is one JSON object with
/// its time, level and message, for a log shipper; the report on stdout is unchanged.
#[test]
fn json_logs_are_one_object_a_line() {
    let pair = Pair::new();
    write(&pair.source().join("a"), b"hello");
    let out = sync(&pair, &["-v", "--log-format", "json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(!lines.is_empty(), "nothing logged");
    for line in &lines {
        assert!(line["timestamp"].is_string() && line["level"].is_string(), "{line}");
        assert!(line["fields"]["message"].is_string(), "{line}");
    }
    assert!(lines.iter().any(|l| l["level"] == "INFO"), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("matches"), "the summary is as before");
    // The environment says the same.
    let out = sync(&pair, &["-v"]).env("FERRY_LOG_FORMAT", "json").output().unwrap();
    let first = String::from_utf8_lossy(&out.stderr).lines().next().map(str::to_owned).unwrap_or_default();
    assert!(serde_json::from_str::<serde_json::Value>(&first).is_ok(), "{first}");
}

/// A local round shows its progress: log lines every `--progress-interval` without a terminal, a live
/// bar on one (a pseudo-terminal from `script`), and nothing with `-q`. The summary follows either way.
#[test]
fn a_local_round_shows_progress_unless_quiet() {
    let pair = Pair::new();
    for i in 0..4 {
        write(&pair.source().join(format!("blobs/{i}")), &random_bytes(16 << 20, i));
    }
    let lines = |extra: &[&str]| {
        let out = sync(&pair, extra).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        std::fs::remove_dir_all(pair.target()).unwrap();
        std::fs::remove_dir_all(pair.state()).unwrap();
        std::fs::create_dir(pair.target()).unwrap();
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let logged = lines(&["--progress-interval", "20ms"]);
    let progress: Vec<&str> = logged.lines().filter(|l| l.contains("scanning: ") || l.contains("applying: ")).collect();
    assert!(!progress.is_empty(), "no progress line:\n{logged}");
    assert!(progress.iter().all(|l| l.contains(" entries, ") && l.ends_with("/s)")), "{logged}");
    assert!(!logged.contains('\u{1b}'), "a live line in a log:\n{logged}");
    let quiet = lines(&["--progress-interval", "20ms", "-q"]);
    assert!(!quiet.contains("scanning: ") && !quiet.contains("applying: "), "-q showed progress:\n{quiet}");

    // On a terminal: a bar that redraws itself, cleared before the summary; -q: none.
    let on_terminal = |quiet: bool| {
        let command = format!(
            "{} {} sync --round {} {} --state-dir {}",
            ferry_bin().display(),
            if quiet { "-q" } else { "" },
            pair.source().display(),
            pair.target().display(),
            pair.state().display()
        );
        let out = Command::new("script").args(["-qec", &command, "/dev/null"]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
        std::fs::remove_dir_all(pair.target()).unwrap();
        std::fs::remove_dir_all(pair.state()).unwrap();
        std::fs::create_dir(pair.target()).unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let shown = on_terminal(false);
    assert!(shown.contains("\u{1b}[2K") && shown.contains("scanning: "), "no live bar:\n{shown:?}");
    assert!(shown.contains("matches the source"), "{shown}");
    let quiet = on_terminal(true);
    assert!(!quiet.contains("\u{1b}[2K") && !quiet.contains("scanning: "), "-q drew a bar:\n{quiet:?}");
    assert!(quiet.contains("matches the source"), "{quiet}");
}

/// The Debian package (dist/deb/build, cargo-deb) carries every file its asset list in node/Cargo.toml
/// names: the man pages and completions the binary writes, the units with the packaged binary's path,
/// and the docs. Checked without cargo-deb: the same script that prepares the package's files runs here
/// with the test's binary.
#[test]
fn the_debian_package_carries_every_file_it_names() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let manifest: toml::Table =
        toml::from_str(&std::fs::read_to_string(root.join("node/Cargo.toml")).unwrap()).unwrap();
    let assets = manifest["package"]["metadata"]["deb"]["assets"].as_array().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let generated = dir.path().join("deb-assets");
    let out = Command::new(root.join("dist/deb/assets")).arg(ferry_bin()).arg(&generated).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut targets = Vec::new();
    for asset in assets {
        let [source, target, mode] = &asset.as_array().unwrap()[..] else { panic!("{asset}") };
        let (source, target) = (source.as_str().unwrap(), target.as_str().unwrap());
        targets.push(target.to_owned());
        assert!(["644", "755"].contains(&mode.as_str().unwrap()), "{asset}");
        let path = match source.strip_prefix("target/release/deb-assets/") {
            Some(rest) => generated.join(rest),
            None if source == "target/release/ferry" => continue,
            None => root.join("node").join(source),
        };
        match path.to_str().unwrap().strip_suffix("*.1") {
            Some(folder) => {
                let pages: Vec<String> = std::fs::read_dir(folder)
                    .unwrap()
                    .map(|e| e.unwrap().file_name().into_string().unwrap())
                    .filter(|name| name.ends_with(".1"))
                    .collect();
                for page in ["ferry.1", "ferry-sync.1", "ferry-serve.1", "ferry-log.1", "ferry-verify.1"] {
                    assert!(pages.iter().any(|p| p == page), "no {page} among {pages:?}");
                }
            }
            None => assert!(path.is_file(), "the package names {source}, which is not made"),
        }
    }
    // Every unit the repository ships is packaged, and points at the packaged binary.
    for unit in std::fs::read_dir(root.join("dist/systemd")).unwrap() {
        let name = unit.unwrap().file_name().into_string().unwrap();
        let packaged = std::fs::read_to_string(generated.join("systemd").join(&name)).unwrap();
        assert!(assets.iter().any(|a| a[0].as_str().unwrap().ends_with(&format!("/{name}"))), "{name} not packaged");
        assert!(!packaged.contains("/usr/local/bin"), "{name}");
        if name.ends_with(".service") {
            assert!(packaged.contains("ExecStart=/usr/bin/ferry "), "{name}");
        }
    }
    for place in ["usr/bin/", "lib/systemd/system/", "usr/share/man/man1/", "usr/share/bash-completion/completions/"] {
        assert!(targets.iter().any(|t| t == place), "nothing goes to {place}");
    }
}
