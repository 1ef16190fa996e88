//! rsync over ssh to an sshd the harness starts, and the network the rounds cross.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::args::Result;
use crate::measure::{Measure, children_cpu, wait_sampling};
use ferry_testkit::ShapedLink;

/// An sshd on loopback and the rsync command that goes through it.
pub(crate) struct Rsync {
    pub(crate) sshd: Child,
    pub(crate) port: u16,
    pub(crate) key: PathBuf,
    pub(crate) target: PathBuf,
    pub(crate) wrapper: PathBuf,
    pub(crate) remote_usage: PathBuf,
    pub(crate) net: Net,
    /// `rsync --bwlimit`, if any.
    pub(crate) bwlimit: Option<String>,
}

/// Where each side runs: both on loopback, or each in its own network namespace.
#[derive(Clone)]
pub(crate) struct Net {
    pub(crate) source_ns: Option<String>,
    pub(crate) dest_ns: Option<String>,
    /// The destination's address, as the source reaches it.
    pub(crate) dest_host: String,
    /// Each side on a core of its own (`--one-core-each`): the source's processes on CPU 0, the
    /// destination's on CPU 1, as two machines would not share their cores.
    pub(crate) one_core_each: bool,
}

impl Net {
    pub(crate) fn loopback() -> Self {
        Self { source_ns: None, dest_ns: None, dest_host: "127.0.0.1".into(), one_core_each: false }
    }

    /// Each side in its own namespace of `link`.
    pub(crate) fn across(link: &ShapedLink) -> Self {
        Self {
            source_ns: Some(link.source_ns().to_owned()),
            dest_ns: Some(link.dest_ns().to_owned()),
            dest_host: ShapedLink::DEST_ADDR.into(),
            one_core_each: false,
        }
    }

    pub(crate) fn command(ns: Option<&str>, program: impl AsRef<std::ffi::OsStr>) -> Command {
        match ns {
            Some(ns) => ShapedLink::exec(ns, program),
            None => Command::new(program),
        }
    }

    pub(crate) fn source_command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        self.on_core(self.source_ns.as_deref(), "0", program)
    }

    pub(crate) fn dest_command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        self.on_core(self.dest_ns.as_deref(), "1", program)
    }

    /// `program` in namespace `ns`, on CPU `cpu` with `--one-core-each` (`taskset`, util-linux).
    fn on_core(&self, ns: Option<&str>, cpu: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        if !self.one_core_each {
            return Self::command(ns, program);
        }
        let mut command = Self::command(ns, "taskset");
        command.args(["--cpu-list", cpu]).arg(program);
        command
    }
}

impl Rsync {
    pub(crate) fn start(root: &Path, net: &Net) -> Result<Self> {
        install_if_missing()?;
        let dir = root.join("ssh");
        std::fs::create_dir_all(&dir)?;
        for key in ["host_key", "client_key"] {
            let status = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(dir.join(key))
                .stdout(Stdio::null())
                .status()?;
            if !status.success() {
                return Err("ssh-keygen failed".into());
            }
        }
        std::fs::copy(dir.join("client_key.pub"), dir.join("authorized_keys"))?;
        let port = free_tcp_port()?;
        let config = dir.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress {}\nHostKey {}\nAuthorizedKeysFile {}\nPermitRootLogin prohibit-password\n\
                 PasswordAuthentication no\nStrictModes no\nUsePAM no\nPidFile {}\n",
                net.dest_host,
                dir.join("host_key").display(),
                dir.join("authorized_keys").display(),
                dir.join("sshd.pid").display()
            ),
        )?;
        std::fs::create_dir_all("/run/sshd")?;
        let sshd = net
            .dest_command("/usr/sbin/sshd")
            .arg("-D")
            .arg("-f")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        // The remote rsync runs under a wrapper that records its CPU time and peak RSS.
        let wrapper = dir.join("usage.py");
        let remote_usage = dir.join("remote-usage");
        std::fs::write(
            &wrapper,
            format!(
                "import resource, subprocess, sys\nrc = subprocess.call(sys.argv[1:])\n\
                 u = resource.getrusage(resource.RUSAGE_CHILDREN)\n\
                 open({:?}, 'w').write(f'{{u.ru_utime + u.ru_stime}} {{u.ru_maxrss}}')\nsys.exit(rc)\n",
                remote_usage.display().to_string()
            ),
        )?;
        let rsync = Self {
            sshd,
            port,
            key: dir.join("client_key"),
            target: root.join("rsync-target"),
            wrapper,
            remote_usage,
            net: net.clone(),
            bwlimit: None,
        };
        // Wait for sshd to answer (slow to start on a loaded machine).
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let answered = rsync.ssh_command().arg("true").stderr(Stdio::null()).status();
            if answered.is_ok_and(|s| s.success()) {
                return Ok(rsync);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Err("sshd did not answer within 30 s".into())
    }

    /// ssh's options; `log_level` `ERROR` keeps it quiet, `VERBOSE` makes it say, as it ends, how many
    /// bytes its encrypted stream carried (ssh takes an option's first value: one level only).
    pub(crate) fn ssh_args(&self, log_level: &str) -> Vec<String> {
        vec![
            "-p".into(),
            self.port.to_string(),
            "-i".into(),
            self.key.display().to_string(),
            "-o".into(),
            "StrictHostKeyChecking=no".into(),
            "-o".into(),
            "UserKnownHostsFile=/dev/null".into(),
            "-o".into(),
            "BatchMode=yes".into(),
            "-o".into(),
            format!("LogLevel={log_level}"),
        ]
    }

    pub(crate) fn ssh_command(&self) -> Command {
        let mut command = self.net.source_command("ssh");
        command.args(self.ssh_args("ERROR")).arg(format!("{}@{}", user(), self.net.dest_host));
        command
    }

    pub(crate) fn round(&self, source: &Path) -> Result<Measure> {
        let _ = std::fs::remove_file(&self.remote_usage);
        let cpu_children = children_cpu();
        let started = Instant::now();
        let child = self
            .net
            .source_command("rsync")
            .args(["-aH", "--stats", "-e", &format!("ssh {}", self.ssh_args("VERBOSE").join(" "))])
            .args(self.bwlimit.iter().map(|rate| format!("--bwlimit={rate}")))
            .arg(format!("--rsync-path=python3 {} rsync", self.wrapper.display()))
            .arg(format!("{}/", source.display()))
            .arg(format!("{}@{}:{}/", user(), self.net.dest_host, self.target.display()))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let (out, rss_send) = wait_sampling(child)?;
        let wall = started.elapsed();
        if !out.status.success() {
            return Err(format!("rsync failed: {:?}", out.status).into());
        }
        let stats = String::from_utf8_lossy(&out.stdout);
        let number = |label: &str| -> u64 {
            stats
                .lines()
                .find_map(|l| l.strip_prefix(label))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.replace(',', "").parse().ok())
                .unwrap_or(0)
        };
        let usage = std::fs::read_to_string(&self.remote_usage).unwrap_or_default();
        let mut usage = usage.split_whitespace();
        Ok(Measure {
            wall,
            cpu_send: children_cpu() - cpu_children,
            cpu_recv: usage.next().and_then(|v| v.parse().ok()).unwrap_or(0.0),
            rss_send,
            rss_recv: usage.next().and_then(|v| v.parse().ok()).unwrap_or(0),
            wire: number("Total bytes sent:") + number("Total bytes received:"),
            wire_ssh: ssh_transferred(&String::from_utf8_lossy(&out.stderr)),
            scan: None,
            sync_wait: None,
            check: None,
            kinds: None,
            first_byte: None,
            disk_read: None,
        })
    }
}

/// "Transferred: sent 3912, received 3632 bytes, in 0.1 seconds" (ssh at LogLevel=VERBOSE, as it
/// ends): both counts added.
pub(crate) fn ssh_transferred(log: &str) -> Option<u64> {
    let line = log.lines().find_map(|l| l.split("Transferred: sent ").nth(1))?;
    let (sent, rest) = line.split_once(", received ")?;
    let received = rest.split_whitespace().next()?;
    Some(sent.trim().parse::<u64>().ok()? + received.parse::<u64>().ok()?)
}

impl Drop for Rsync {
    fn drop(&mut self) {
        let _ = self.sshd.kill();
        let _ = self.sshd.wait();
    }
}

pub(crate) fn user() -> String {
    std::env::var("USER").ok().filter(|u| !u.is_empty()).unwrap_or_else(|| "root".into())
}

pub(crate) fn free_tcp_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub(crate) fn install_if_missing() -> Result<()> {
    let have = |program: &str| Command::new("sh").args(["-c", &format!("command -v {program}")]).output();
    let missing = ["rsync", "ssh", "/usr/sbin/sshd"]
        .iter()
        .any(|p| have(p).map(|o| !o.status.success() || o.stdout.is_empty()).unwrap_or(true));
    if !missing {
        return Ok(());
    }
    if !rustix::process::geteuid().is_root() {
        return Err("rsync or openssh-server is missing, and installing them needs root".into());
    }
    eprintln!("installing rsync and openssh-server with apt-get");
    let ok = Command::new("sh")
        .args([
            "-c",
            "apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q rsync openssh-server openssh-client >/dev/null",
        ])
        .status()?
        .success();
    if ok { Ok(()) } else { Err("apt-get install rsync openssh-server failed".into()) }
}

/// This machine's default TCP congestion control, which rsync's ssh uses (network namespaces start with
/// the host's).
pub(crate) fn tcp_congestion_control() -> String {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control")
        .map_or_else(|_| "unknown".to_owned(), |name| name.trim().to_owned())
}
