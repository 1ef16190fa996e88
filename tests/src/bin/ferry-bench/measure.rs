//! What one tool did in one round, and how it is measured: CPU, peak RSS, wall time.

use std::path::Path;
use std::process::Child;
use std::time::Duration;

use crate::args::Result;
use crate::floors::walk;

/// What one tool did in one round.
#[derive(Debug, Clone, Default)]
pub(crate) struct Measure {
    pub(crate) wall: Duration,
    /// CPU seconds of the sending side (`ferry sync`; local `rsync` with its `ssh`).
    pub(crate) cpu_send: f64,
    /// CPU seconds of the receiving side (`ferry serve`; the remote `rsync --server` processes).
    pub(crate) cpu_recv: f64,
    /// ferry only: of `wall`, the source's scan (its report's `scan_ms`).
    pub(crate) scan: Option<Duration>,
    /// ferry only: how long the destination waited for its disk's syncs (from its log).
    pub(crate) sync_wait: Option<Duration>,
    /// ferry only: how long the destination's check of its target took (from its log; it runs
    /// beside the exchange of changes).
    pub(crate) check: Option<Duration>,
    /// Peak RSS in KiB of each side.
    pub(crate) rss_send: u64,
    pub(crate) rss_recv: u64,
    /// Bytes on the wire: ferry's UDP payloads both ways; rsync's own count of bytes both ways (ssh's
    /// encryption and TCP/IP headers not included, which favours rsync).
    pub(crate) wire: u64,
    /// ferry only: of `wire`, what each part of the round took (from its report).
    pub(crate) kinds: Option<WireKinds>,
    /// rsync only: the bytes of ssh's encrypted stream both ways, as ssh counts them (`Transferred:`,
    /// logged at `LogLevel=VERBOSE`): the TCP payload, the layer at which ferry's UDP payloads are
    /// counted.
    pub(crate) wire_ssh: Option<u64>,
    /// ferry only: when the first chunk left (its report's `first_byte_ms`).
    pub(crate) first_byte: Option<Duration>,
    /// ferry only: the source's reads from storage (its report's `disk_read_bytes`).
    pub(crate) disk_read: Option<u64>,
}

/// ferry's wire bytes by what they carried: its report's `list_bytes`, `need_bytes` and
/// `payload_bytes` (frames, before QUIC), the rest being QUIC's own bytes and the round's other
/// messages.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct WireKinds {
    pub(crate) changes: u64,
    pub(crate) needs: u64,
    pub(crate) chunks: u64,
}

pub(crate) fn tempfile_in(dir: &Path) -> Result<tempfile::TempDir> {
    Ok(tempfile::Builder::new().prefix("ferry-bench-").tempdir_in(dir)?)
}

pub(crate) fn tree_size(root: &Path) -> Result<(u64, u64)> {
    let (mut files, mut bytes) = (0, 0);
    walk(root, |_, entry, kind| {
        if kind.is_file() {
            files += 1;
            bytes += entry.metadata()?.len();
        }
        Ok(())
    })?;
    Ok((files, bytes))
}

/// CPU seconds of this process's waited-for children (`cutime + cstime` in `/proc/self/stat`).
pub(crate) fn children_cpu() -> f64 {
    proc_stat_times("self", 13).unwrap_or(0.0)
}

/// CPU seconds of `pid` itself (`utime + stime`).
pub(crate) fn process_cpu(pid: u32) -> f64 {
    proc_stat_times(&pid.to_string(), 11).unwrap_or(0.0)
}

/// Two consecutive times from `/proc/PID/stat`, starting at field `first` (0-based after the name).
pub(crate) fn proc_stat_times(pid: &str, first: usize) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = rustix::param::clock_ticks_per_second() as f64;
    Some((fields.get(first)?.parse::<f64>().ok()? + fields.get(first + 1)?.parse::<f64>().ok()?) / ticks)
}

/// Peak RSS (VmHWM) of a process, KiB.
pub(crate) fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Waits for `child`, sampling the peak RSS of it and its descendants; returns the output and the
/// largest peak seen.
pub(crate) fn wait_sampling(child: Child) -> Result<(std::process::Output, u64)> {
    wait_sampling_reads(child).map(|(output, peak, _)| (output, peak))
}

/// Like [`wait_sampling`], also sampling what `child` itself read from storage (`read_bytes` of
/// `/proc/PID/io`): the last sample, up to 20 ms before it ended.
pub(crate) fn wait_sampling_reads(mut child: Child) -> Result<(std::process::Output, u64, u64)> {
    let pid = child.id();
    let (mut peak, mut reads) = (0, 0);
    let read = |stream: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut out = Vec::new();
            if let Some(mut stream) = stream {
                let _ = stream.read_to_end(&mut out);
            }
            out
        })
    };
    let reader = read(child.stdout.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>));
    let error_reader = read(child.stderr.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>));
    loop {
        peak = peak.max(peak_rss(pid)).max(descendants(pid).into_iter().map(peak_rss).max().unwrap_or(0));
        reads = reads.max(storage_reads(pid).unwrap_or(0));
        if child.try_wait()?.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = child.wait()?;
    let stdout = reader.join().map_err(|_| "reader panicked")?;
    let stderr = error_reader.join().map_err(|_| "reader panicked")?;
    Ok((std::process::Output { status, stdout, stderr }, peak, reads))
}

/// What `pid` read from storage so far (`read_bytes` of `/proc/PID/io`).
pub(crate) fn storage_reads(pid: u32) -> Option<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    io.lines().find_map(|line| line.strip_prefix("read_bytes:")).and_then(|n| n.trim().parse().ok())
}

pub(crate) fn descendants(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut stack = vec![pid];
    while let Some(p) = stack.pop() {
        let children = std::fs::read_to_string(format!("/proc/{p}/task/{p}/children")).unwrap_or_default();
        for child in children.split_whitespace().filter_map(|c| c.parse().ok()) {
            out.push(child);
            stack.push(child);
        }
    }
    out
}
