//! Helpers shared by the integration tests.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_engine::{LocalRoundOptions, LocalRoundReport, local_round};
use ferry_testkit::{Snapshot, compare_trees, snapshot};

/// The `ferry` binary built for these tests.
pub(crate) fn ferry_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ferry"))
}

/// A source, a target and a state folder in one temporary folder.
pub(crate) struct Pair {
    pub(crate) dir: tempfile::TempDir,
}

impl Pair {
    pub(crate) fn new() -> Self {
        Self::new_in(&std::env::temp_dir())
    }

    /// On a memory filesystem when there is one: for tests about what is read, not about disks, where
    /// creating 100k files on a shared disk would only measure the disk.
    pub(crate) fn in_memory() -> Self {
        let shm = Path::new("/dev/shm");
        Self::new_in(if shm.is_dir() { shm } else { Path::new("/tmp") })
    }

    fn new_in(base: &Path) -> Self {
        let dir = tempfile::Builder::new().prefix("ferry-test-").tempdir_in(base).unwrap();
        for sub in ["source", "target", "state"] {
            std::fs::create_dir(dir.path().join(sub)).unwrap();
        }
        Self { dir }
    }

    pub(crate) fn source(&self) -> PathBuf {
        self.dir.path().join("source")
    }

    pub(crate) fn target(&self) -> PathBuf {
        self.dir.path().join("target")
    }

    pub(crate) fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// A sibling of the target that no round may ever touch.
    pub(crate) fn outside(&self) -> PathBuf {
        self.dir.path().join("outside")
    }

    /// One local round in this process.
    pub(crate) fn round(&self, options: &LocalRoundOptions) -> LocalRoundReport {
        local_round(&self.source(), &self.target(), &self.state(), options).unwrap()
    }
}

/// Asserts that `target` holds exactly `source`, except paths `extra` allows.
pub(crate) fn assert_same_tree(source: &Path, target: &Path, extra: impl Fn(&[u8]) -> bool) {
    let want = snapshot(source, &[]).unwrap();
    let got = snapshot(target, &[]).unwrap();
    if let Err(differences) = compare_trees(&want, &got, extra) {
        panic!("target differs from source: {differences}");
    }
}

/// A snapshot of a folder that must not change.
pub(crate) fn sentinel(path: &Path) -> Snapshot {
    snapshot(path, &[]).unwrap()
}

/// True if a folder holds no leftover staging files.
pub(crate) fn no_staging_leftovers(target: &Path) -> bool {
    let staging = target.join(ferry_engine::STAGING_DIR);
    !staging.exists() || std::fs::read_dir(&staging).unwrap().next().is_none()
}

pub(crate) fn write(path: &Path, content: &[u8]) {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(path, content).unwrap();
}

pub(crate) fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    use rand::{RngExt, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut data = vec![0u8; len];
    rng.fill(&mut data[..]);
    data
}

/// Waits at most `limit` for a `sync --round --json` started in the background (killing it after
/// that), checks that it succeeded, and returns its report.
pub(crate) fn finish_round(child: std::process::Child, limit: Duration) -> serde_json::Value {
    let out = wait_within(child, limit);
    assert!(out.status.success(), "sync failed with {:?}: {}", out.status, String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Waits at most `limit` for a round started in the background (killing it after that), however it ends.
pub(crate) fn wait_within(mut child: std::process::Child, limit: Duration) -> std::process::Output {
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the round did not end within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.wait_with_output().unwrap()
}

pub(crate) fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Whether a test that mounts a tmpfs can run (as root); otherwise it says that `what` is skipped.
pub(crate) fn may_mount(what: &str) -> bool {
    if !is_root() {
        eprintln!("SKIPPED: {what} mounts a tmpfs and needs root");
    }
    is_root()
}

/// A tmpfs mounted for a test (root only), unmounted when dropped.
pub(crate) struct Tmpfs(pub(crate) PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (as `mount -o size=` takes it, e.g. `8m`) at `path`.
    pub(crate) fn mount(path: &Path, size: &str) -> Self {
        std::fs::create_dir_all(path).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "ferry-test"])
            .arg(path)
            .status()
            .unwrap();
        assert!(status.success(), "mount a tmpfs at {}", path.display());
        Self(path.to_owned())
    }

    /// Remounts it read-only, or read-write again.
    pub(crate) fn set_read_only(&self, read_only: bool) {
        let mode = if read_only { "remount,ro" } else { "remount,rw" };
        let status = std::process::Command::new("mount").args(["-o", mode]).arg(&self.0).status().unwrap();
        assert!(status.success(), "mount -o {mode} {}", self.0.display());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// `program` on this machine, installed with apt-get when missing and this is root (as the benchmark
/// installs rsync); `None` when it cannot be had, and the caller says it skipped.
pub(crate) fn tool(program: &str, package: &str) -> Option<PathBuf> {
    let find = || {
        std::env::var_os("PATH")
            .into_iter()
            .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
            .map(|dir| dir.join(program))
            .find(|candidate| candidate.is_file())
    };
    if let Some(found) = find() {
        return Some(found);
    }
    if !is_root() {
        return None;
    }
    eprintln!("installing {package} with apt-get for this test");
    let apt = |args: &[&str]| {
        std::process::Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let _ = apt(&["update", "-qq"]);
    if !apt(&["install", "-y", "-qq", package]) {
        return None;
    }
    find()
}

/// strace, when it is here (or can be installed) and may trace here (ptrace allowed); `None` after
/// saying why the caller's test skips `what`.
pub(crate) fn strace(what: &str) -> Option<PathBuf> {
    let Some(strace) = tool("strace", "strace") else {
        eprintln!("SKIPPED: strace is not installed and cannot be (not root): {what}");
        return None;
    };
    if !std::process::Command::new(&strace)
        .args(["-f", "-qq", "-o", "/dev/null", "true"])
        .status()
        .is_ok_and(|s| s.success())
    {
        eprintln!("SKIPPED: strace cannot trace here (ptrace not allowed): {what}");
        return None;
    }
    Some(strace)
}

/// The regular files under `dir` (symlinks not followed), with what `lstat` says of each.
pub(crate) fn regular_files(dir: &Path) -> Vec<(PathBuf, std::fs::Metadata)> {
    let (mut files, mut folders) = (Vec::new(), vec![dir.to_owned()]);
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).unwrap() {
            let entry = entry.unwrap();
            let meta = entry.metadata().unwrap();
            if meta.is_dir() {
                folders.push(entry.path());
            } else if meta.is_file() {
                files.push((entry.path(), meta));
            }
        }
    }
    files
}

/// One of the kernel's I/O counters of process `pid` (`rchar`: bytes its read calls returned, from
/// the page cache or the disk; `wchar`: bytes its write calls took), when `/proc` shows it.
pub(crate) fn io_counter(pid: u32, field: &str) -> Option<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    io.lines().find_map(|l| l.strip_prefix(field)?.strip_prefix(": ")?.parse().ok())
}
