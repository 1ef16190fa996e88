//! Running the destination's import command: never through a shell, with a timeout, its output
//! appended to a log and its last lines kept for the source.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferry_proto::ImportResult;

/// How many lines of output go back to the source.
const TAIL_LINES: usize = 20;

/// How an import ended, in the words `status` and `log` print.
pub(crate) fn result_words(result: &ferry_proto::ImportResult) -> String {
    if result.success {
        "import ok".to_owned()
    } else {
        format!("import FAILED (exit code {})", exit_code_text(result.exit_code))
    }
}

/// An import's or export's exit code as the operator reads it; there is none when the command could
/// not start, was killed by a signal, or ran past its timeout (its output's last lines say which).
pub(crate) fn exit_code_text(code: Option<i32>) -> String {
    code.map_or_else(|| "none: not started, killed or timed out".to_owned(), |c| c.to_string())
}

/// Runs `argv` (as `user` when given), appending its output to `log`. `round` 0 is the export hook,
/// which runs before a round has a number.
pub(crate) fn run(argv: &[String], user: Option<&str>, round: u64, timeout: Duration, log: &Path) -> ImportResult {
    let hook = if round == 0 { "export".to_owned() } else { format!("import of round {round}") };
    let started = Instant::now();
    let failed = |why: String| ImportResult {
        round,
        success: false,
        exit_code: None,
        tail: vec![why],
        duration_ms: started.elapsed().as_millis() as u64,
    };
    let Some((program, args)) = argv.split_first() else { return failed(format!("the {hook} command is empty")) };
    let mut log_file = match std::fs::OpenOptions::new().create(true).append(true).read(true).open(log) {
        Ok(file) => file,
        Err(e) => return failed(format!("cannot open {}: {e}", log.display())),
    };
    let start = log_file.seek(SeekFrom::End(0)).unwrap_or(0);
    let _ = writeln!(log_file, "== {hook}: {}", argv.join(" "));
    let (stdout, stderr) = match (log_file.try_clone(), log_file.try_clone()) {
        (Ok(a), Ok(b)) => (a, b),
        _ => return failed(format!("cannot share the log with the {hook}")),
    };
    tracing::info!("{hook}: {}", argv.join(" "));
    let mut command = Command::new(program);
    command.args(args).stdin(Stdio::null()).stdout(stdout).stderr(stderr);
    if let Some(name) = user {
        use std::os::unix::process::CommandExt;
        use uzers::os::unix::UserExt;
        let Some(account) = uzers::get_user_by_name(name) else {
            return failed(format!("cannot run the command as {name}: no such user"));
        };
        // As root, std also drops the supplementary groups before switching.
        command
            .uid(account.uid())
            .gid(account.primary_group_id())
            .env("USER", name)
            .env("LOGNAME", name)
            .env("HOME", account.home_dir());
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => return failed(format!("cannot run {program}: {e}")),
    };
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if started.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                let _ = writeln!(log_file, "== killed after {} s ({hook} timeout)", timeout.as_secs());
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => return failed(format!("cannot wait for the {hook}: {e}")),
        }
    };
    let mut output = String::new();
    if log_file.seek(SeekFrom::Start(start)).is_ok() {
        let _ = log_file.take(16 << 20).read_to_string(&mut output);
    }
    let lines: Vec<&str> = output.lines().skip(1).collect();
    let tail = lines[lines.len().saturating_sub(TAIL_LINES)..].iter().map(|l| (*l).to_owned()).collect();
    ImportResult {
        round,
        success: status.is_some_and(|s| s.success()),
        exit_code: status.and_then(|s| s.code()),
        tail,
        duration_ms: started.elapsed().as_millis() as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn success_failure_and_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("import.log");
        let argv = |s: &[&str]| s.iter().map(|w| (*w).to_owned()).collect::<Vec<_>>();
        let ok = run(&argv(&["sh", "-c", "echo one; echo two"]), None, 1, Duration::from_secs(10), &log);
        assert!(ok.success && ok.tail == ["one", "two"], "{ok:?}");
        let bad = run(&argv(&["sh", "-c", "echo broken >&2; exit 3"]), None, 2, Duration::from_secs(10), &log);
        assert_eq!((bad.success, bad.exit_code), (false, Some(3)));
        assert_eq!(bad.tail, ["broken"]);
        let slow = run(&argv(&["sleep", "10"]), None, 3, Duration::from_millis(300), &log);
        assert!(!slow.success && slow.exit_code.is_none() && slow.duration_ms < 5000);
        let missing = run(&argv(&["/no/such/program"]), None, 4, Duration::from_secs(1), &log);
        assert!(!missing.success && missing.tail[0].contains("cannot run"));
        let nobody = run(&argv(&["id", "-un"]), Some("no-such-user-here"), 5, Duration::from_secs(5), &log);
        assert!(!nobody.success && nobody.tail[0].contains("no such user"), "{nobody:?}");
        if rustix::process::geteuid().is_root() {
            let nobody = run(&argv(&["id", "-un"]), Some("nobody"), 6, Duration::from_secs(5), &log);
            assert_eq!(nobody.tail, ["nobody"], "{nobody:?}");
        }
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains("== import of round 1: sh -c") && text.contains("killed after"));
    }
}
