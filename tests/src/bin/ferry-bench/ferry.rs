//! ferry's two nodes, their setup and one round between them.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::args::Result;
use crate::measure::{Measure, WireKinds, children_cpu, peak_rss, process_cpu, wait_sampling_reads};
use crate::rsync::Net;

/// Two ferry nodes: a daemon and the source's config.
pub(crate) struct FerryPair {
    pub(crate) bin: PathBuf,
    /// The daemon's log (its stderr).
    pub(crate) daemon_log: PathBuf,
    pub(crate) net: Net,
    pub(crate) source_node: PathBuf,
    pub(crate) daemon: Child,
    pub(crate) daemon_addr: String,
    pub(crate) daemon_id: String,
    pub(crate) congestion: String,
    /// `ferry sync --bwlimit`, if any.
    pub(crate) bwlimit: Option<String>,
    /// Where to keep the nodes' logs (`--logs`); otherwise the source's go nowhere.
    pub(crate) logs: Option<PathBuf>,
    /// A shell line that runs `ferry sync` in cgroups of its own (`--read-once`).
    pub(crate) cgroups: Option<String>,
}

impl FerryPair {
    pub(crate) fn start(bin: &Path, root: &Path, source: &Path, net: &Net) -> Result<Self> {
        let (src, dst) = (root.join("ferry-source"), root.join("ferry-dest"));
        let ferry = |node: &Path, args: &[&str]| -> Result<String> {
            let out = Command::new(bin).arg("--config-dir").arg(node).args(args).output()?;
            if !out.status.success() {
                return Err(format!("ferry {args:?}: {}", String::from_utf8_lossy(&out.stderr)).into());
            }
            Ok(String::from_utf8(out.stdout)?)
        };
        let src_id = ferry(&src, &["init"])?.lines().next().unwrap_or_default().to_owned();
        let dst_id = ferry(&dst, &["init"])?.lines().next().unwrap_or_default().to_owned();
        ferry(&dst, &["trust", &src_id, "--name", "source"])?;
        let target = root.join("ferry-target");
        ferry(&dst, &["job", "add", "bench", "--path", &target.to_string_lossy(), "--peer", "source"])?;
        let mut daemon = net
            .dest_command(bin)
            .arg("--config-dir")
            .arg(&dst)
            .args(["serve", "--listen", &format!("{}:0", net.dest_host)])
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(root.join("ferry-dest.log"))?)
            .spawn()?;
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(daemon.stdout.take().ok_or("no daemon stdout")?),
            &mut line,
        )?;
        let addr = line.split_whitespace().nth(2).ok_or("the daemon did not say where it listens")?.to_owned();
        ferry(&src, &["trust", &dst_id, "--name", "dest", "--addr", &addr])?;
        ferry(&src, &["job", "add", "bench", "--path", &source.to_string_lossy(), "--peer", "dest"])?;
        Ok(Self {
            bin: bin.to_owned(),
            daemon_log: root.join("ferry-dest.log"),
            net: net.clone(),
            source_node: src,
            daemon,
            daemon_addr: addr,
            daemon_id: dst_id,
            congestion: "cubic".into(),
            bwlimit: None,
            logs: None,
            cgroups: None,
        })
    }

    /// The destination's wait for its syncs in the last round, from its log line "applied N files (B) in
    /// S s, W s of it waiting for the disk's syncs".
    pub(crate) fn last_sync_wait(&self) -> Option<Duration> {
        let log = std::fs::read_to_string(&self.daemon_log).ok()?;
        let line = log.lines().rev().find(|l| l.ends_with("s of it waiting for the disk's syncs"))?;
        let seconds = line.rsplit(", ").next()?.split_whitespace().next()?.parse().ok()?;
        Some(Duration::from_secs_f64(seconds))
    }

    /// The destination's check of its target in the last round, from its log line "checked N entries
    /// of PATH in M ms" (absent from builds before the check).
    pub(crate) fn last_check(&self) -> Option<Duration> {
        let log = std::fs::read_to_string(&self.daemon_log).ok()?;
        let line = log.lines().rev().find(|l| l.contains(" checked ") && l.ends_with(" ms"))?;
        let ms = line.rsplit(" in ").next()?.split_whitespace().next()?.parse().ok()?;
        Some(Duration::from_millis(ms))
    }

    /// Where `ferry sync` writes its log: appended to `--logs DIR`/ferry-source.log, or nowhere.
    pub(crate) fn source_log(&self) -> Result<Stdio> {
        let Some(dir) = &self.logs else { return Ok(Stdio::null()) };
        std::fs::create_dir_all(dir)?;
        let file = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("ferry-source.log"))?;
        Ok(file.into())
    }

    /// Sends the source's rounds to `addr` (a proxy in front of the daemon).
    pub(crate) fn point_at(&self, addr: &str) -> Result<()> {
        let out = Command::new(&self.bin)
            .arg("--config-dir")
            .arg(&self.source_node)
            .args(["trust", &self.daemon_id, "--name", "dest", "--addr", addr])
            .output()?;
        if !out.status.success() {
            return Err(format!("ferry trust: {}", String::from_utf8_lossy(&out.stderr)).into());
        }
        Ok(())
    }

    pub(crate) fn round(&self) -> Result<Measure> {
        let daemon = self.daemon.id();
        // Reset the daemon's peak RSS to its current RSS, so that each round shows its own peak.
        let _ = std::fs::write(format!("/proc/{daemon}/clear_refs"), "5");
        let (cpu_children, cpu_daemon) = (children_cpu(), process_cpu(daemon));
        let started = Instant::now();
        let mut command = match &self.cgroups {
            Some(line) => {
                let mut shell = Command::new("sh");
                shell.args(["-c", line, "sh"]).arg(&self.bin);
                shell
            }
            None => self.net.source_command(&self.bin),
        };
        let child = command
            .arg("--config-dir")
            .arg(&self.source_node)
            .args(["sync", "--round", "bench", "--json", "--congestion", &self.congestion])
            .args(self.bwlimit.iter().flat_map(|rate| ["--bwlimit", rate.as_str()]))
            .stdout(Stdio::piped())
            .stderr(self.source_log()?)
            .spawn()?;
        let (out, rss_send, reads_sampled) = wait_sampling_reads(child)?;
        let wall = started.elapsed();
        if !out.status.success() {
            return Err(format!("ferry sync failed: {:?}", out.status).into());
        }
        let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        if let Some(dir) = &self.logs {
            // One line per round, for what the table leaves out (chunk bytes, path MTU, failures).
            let mut reports =
                std::fs::OpenOptions::new().create(true).append(true).open(dir.join("ferry-reports.jsonl"))?;
            writeln!(reports, "{report}")?;
        }
        let wire = report["bytes_on_wire"].as_u64().ok_or("no bytes_on_wire in ferry's report")?;
        let scan = report["scan_ms"].as_u64().map(Duration::from_millis);
        let kinds =
            match (report["list_bytes"].as_u64(), report["need_bytes"].as_u64(), report["payload_bytes"].as_u64()) {
                (Some(changes), Some(needs), Some(chunks)) => Some(WireKinds { changes, needs, chunks }),
                // A build from before the report said so (`--ferry PATH`).
                _ => None,
            };
        Ok(Measure {
            wall,
            scan,
            sync_wait: self.last_sync_wait(),
            check: self.last_check(),
            cpu_send: children_cpu() - cpu_children,
            cpu_recv: process_cpu(daemon) - cpu_daemon,
            rss_send,
            rss_recv: peak_rss(daemon),
            wire,
            kinds,
            wire_ssh: None,
            first_byte: report["first_byte_ms"].as_u64().map(Duration::from_millis),
            // A build from before the report said so: the last sample, up to 20 ms before the end.
            disk_read: report["disk_read_bytes"].as_u64().or(Some(reads_sampled)),
        })
    }
}

impl Drop for FerryPair {
    fn drop(&mut self) {
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
        // Appended, like the source's: `--memory` runs two pairs.
        if let Some(dir) = &self.logs {
            let append = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("ferry-dest.log"));
            if let (Ok(mut from), Ok(mut to)) = (std::fs::File::open(&self.daemon_log), append) {
                let _ = std::io::copy(&mut from, &mut to);
            }
        }
    }
}
