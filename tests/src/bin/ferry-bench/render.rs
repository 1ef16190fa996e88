//! The report: the rounds' table, ratios, floors and the bounds under ferry's rounds.

use std::io::Write;
use std::time::Duration;

use crate::args::Args;
use crate::floors::Floors;
use crate::measure::Measure;
use crate::rsync::tcp_congestion_control;

pub(crate) fn render(
    args: &Args,
    files: u64,
    bytes: u64,
    rows: &[(String, Measure, Option<Measure>)],
    floors: &Floors,
) -> String {
    let mut out = Vec::new();
    let machine = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let _ = writeln!(out, "# ferry benchmarks\n");
    let _ = writeln!(
        out,
        "Made by `ferry-bench --files {} --seed {}{}{}{}{}` on {machine} ({cores} cores), {}; \
         {files} files, {:.1} MiB. ferry: `ferry sync --round` against `ferry serve` (QUIC). rsync: \
         `rsync -aH --stats` over ssh to an sshd on the destination's side, over TCP with this machine's \
         congestion control ({}).{}\n",
        args.files,
        args.seed,
        args.shaped.map_or(String::new(), |mbit| format!(" --shaped {mbit}")),
        args.bwlimit.as_ref().map_or(String::new(), |rate| format!(" --bwlimit {rate}")),
        if args.rsync_first { " --rsync-first" } else { "" },
        args.extra_flags(),
        args.shaped.map_or("loopback".to_owned(), |mbit| format!(
            "between two network namespaces joined through a router namespace, its way to the destination \
             shaped by `tc tbf` to {mbit} Mbit/s with a 50 ms queue"
        )),
        bytes as f64 / 1048576.0,
        tcp_congestion_control(),
        args.bwlimit.as_ref().map_or(String::new(), |rate| format!(
            " Both tools limited themselves to {rate} (1024-based, per second: `ferry sync --bwlimit {rate}`, \
             `rsync --bwlimit={rate}`)."
        )),
    );
    let _ = writeln!(
        out,
        "In each round {} went first. Before each tool's round the harness runs sync(2), so that neither pays \
         for the other's unwritten data; ferry makes every file durable (fsync/syncfs) before it counts as done, rsync does not. \
         Wire bytes: ferry counts its UDP payloads both ways (QUIC headers and acknowledgements included); \
         rsync counts its own protocol bytes both ways (ssh's encryption and TCP/IP headers not included), \
         which favours rsync. Dest. sync wait: of the round, how long ferry's destination waited for its disk's \
         syncs (from its log). Dest. check: how long its check of the target took (from its log; it runs beside \
         the exchange of changes). CPU: seconds of the sending side / the receiving side. RSS: peak MiB of the \
         sending side / the receiving side.\n",
        if args.rsync_first { "rsync" } else { "ferry" }
    );
    if args.fill_memory.is_some() {
        let _ = writeln!(
            out,
            "Before the run a file filled the free memory with page cache (`--fill-memory`), so that both \
             tools wrote into memory taken back from that cache, as on a server that has been up a while.\n"
        );
    }
    let _ = writeln!(
        out,
        "| round | tool | wall s | of which scan s | dest. sync wait s | dest. check s | files/s | CPU send/recv s | RSS send/recv MiB | wire bytes | wall ratio | wire ratio |"
    );
    let _ = writeln!(out, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let line = |out: &mut Vec<u8>, round: &str, tool: &str, m: &Measure, ratio: Option<(f64, f64)>| {
        let _ = writeln!(
            out,
            "| {round} | {tool} | {:.2} | {} | {} | {} | {:.0} | {:.2} / {:.2} | {:.0} / {:.0} | {} | {} | {} |",
            m.wall.as_secs_f64(),
            m.scan.map_or(String::new(), |d| format!("{:.2}", d.as_secs_f64())),
            m.sync_wait.map_or(String::new(), |d| format!("{:.1}", d.as_secs_f64())),
            m.check.map_or(String::new(), |d| format!("{:.2}", d.as_secs_f64())),
            files as f64 / m.wall.as_secs_f64().max(1e-9),
            m.cpu_send,
            m.cpu_recv,
            m.rss_send as f64 / 1024.0,
            m.rss_recv as f64 / 1024.0,
            m.wire,
            ratio.map_or(String::new(), |r| format!("{:.2}", r.0)),
            ratio.map_or(String::new(), |r| format!("{:.3}", r.1)),
        );
    };
    for (round, f, r) in rows {
        let ratio = r
            .as_ref()
            .map(|r| (f.wall.as_secs_f64() / r.wall.as_secs_f64().max(1e-9), f.wire as f64 / (r.wire as f64).max(1.0)));
        line(&mut out, round, "ferry", f, ratio);
        if let Some(r) = r {
            line(&mut out, round, "rsync", r, None);
        }
    }
    let _ = writeln!(out, "\nRatios are ferry / rsync (below 1: ferry is faster or sends less).");
    let through_ssh: Vec<String> = rows
        .iter()
        .filter_map(|(round, f, r)| {
            let ssh = r.as_ref()?.wire_ssh?;
            Some(format!("{round} {ssh} bytes (ferry / ssh {:.3})", f.wire as f64 / (ssh as f64).max(1.0)))
        })
        .collect();
    if !through_ssh.is_empty() {
        let _ = writeln!(
            out,
            "\nrsync's bytes as ssh carried them (encrypted and framed, both ways, ssh's own count: the TCP \
             payload, the layer at which ferry's UDP payloads are counted): {}.",
            through_ssh.join("; ")
        );
    }
    if rows.iter().any(|(_, f, _)| f.kinds.is_some()) {
        let _ = writeln!(
            out,
            "\nferry's wire bytes by what they carried (the rest: QUIC's own bytes and the other messages):\n"
        );
        for (round, f, _) in rows {
            if let Some(k) = f.kinds {
                let rest = f.wire.saturating_sub(k.changes + k.needs + k.chunks);
                let _ = writeln!(
                    out,
                    "- {}: changes {}, needs {}, chunk data {}, the rest {}.",
                    capitalized(round),
                    k.changes,
                    k.needs,
                    k.chunks,
                    rest
                );
            }
        }
    }
    let fresh = rows.iter().find(|(r, _, _)| r == "fresh export").map(|(_, f, _)| f.wire as f64 / bytes as f64);
    if let Some(fresh) = fresh {
        let _ = writeln!(out, "Fresh export: ferry put {:.2}% of the tree's bytes on the wire.", fresh * 100.0);
    }
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    // rsync's round: its wall time and wire bytes.
    let rsync = |round: &str| rows.iter().find(|(r, _, _)| r == round).and_then(|(_, _, r)| r.as_ref());
    let of_rsync = |round: &str, took: Duration| {
        rsync(round).map_or(String::new(), |r| {
            format!(", {:.2}× rsync's round", took.as_secs_f64() / r.wall.as_secs_f64().max(1e-9))
        })
    };
    let _ = writeln!(
        out,
        "\nFloors, measured on the same tree and disk right after both tools' round (what any tool must at least \
         do, with no network, hashing or comparison):\n"
    );
    if let Some((copy, sync)) = floors.initial {
        let _ = writeln!(
            out,
            "- Initial: copying the tree on the same disk (folders, then files on {threads} threads with \
             `copy_file_range`, then links) took {:.2} s{}, and one `syncfs` after it {:.2} s more: {:.2} s{} \
             for a tool that makes every file durable.",
            copy.as_secs_f64(),
            of_rsync("initial", copy),
            sync.as_secs_f64(),
            (copy + sync).as_secs_f64(),
            of_rsync("initial", copy + sync),
        );
    }
    if let Some(floor) = floors.no_change {
        let _ = writeln!(
            out,
            "- No change: listing every folder and `lstat`ing every entry (one thread lists, {threads} stat) took \
             {:.2} s{}.",
            floor.as_secs_f64(),
            of_rsync("no change", floor),
        );
    }
    if let Some((stat, copy, sync, files)) = floors.day {
        let _ = writeln!(
            out,
            "- One day of changes: listing and `lstat`ing the tree took {:.2} s, then copying the {files} files \
             the day changed over the initial copy {:.2} s and one `syncfs` {:.2} s: {:.2} s{}.",
            stat.as_secs_f64(),
            copy.as_secs_f64(),
            sync.as_secs_f64(),
            (stat + copy + sync).as_secs_f64(),
            of_rsync("one day of changes", stat + copy + sync),
        );
    }
    if let Some(random) = floors.day_random_bytes {
        let _ = writeln!(
            out,
            "- One day of changes: the day wrote {random} bytes of fresh random content (new BLOBs and archives), \
             which no tool can send in fewer bytes{}.",
            rsync("one day of changes").map_or(String::new(), |r| format!(
                ": {:.3}× rsync's wire bytes",
                random as f64 / (r.wire as f64).max(1.0)
            )),
        );
    }
    let bounds: Vec<String> =
        rows.iter().filter_map(|(round, f, _)| ferry_bound(round, f, threads, &of_rsync)).collect();
    if !bounds.is_empty() {
        let _ = writeln!(
            out,
            "\nBounds under ferry's own rounds, from its figures above: its two processes' CPU time spread over \
             all {threads} cores (its round cannot be shorter without using less CPU), and its round after the \
             scan (what hiding the scan entirely, by streaming it into the transfer, would leave if the rest \
             took as long). Neither is a measurement of a faster ferry:\n"
        );
        for bound in bounds {
            let _ = writeln!(out, "{bound}");
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What ferry's own figures of a round bound it by.
pub(crate) struct Bounds {
    /// Both processes' CPU-seconds.
    pub(crate) cpu: f64,
    /// `cpu` spread over all the cores: the round cannot be shorter without using less CPU.
    pub(crate) on_cores: Duration,
    /// The scan, and the round after it (what hiding the scan entirely would leave); `None` without a
    /// scan time.
    pub(crate) after_scan: Option<(Duration, Duration)>,
}

impl Bounds {
    pub(crate) fn of(ferry: &Measure, cores: usize) -> Self {
        let cpu = ferry.cpu_send + ferry.cpu_recv;
        Self {
            cpu,
            on_cores: Duration::from_secs_f64(cpu / cores.max(1) as f64),
            after_scan: ferry.scan.map(|scan| (scan, ferry.wall.saturating_sub(scan))),
        }
    }
}

/// The line of one of ferry's rounds under "Bounds" (`None` for a round without a scan time).
/// `of_rsync` gives the ratio to rsync's round, if it ran.
pub(crate) fn ferry_bound(
    round: &str,
    ferry: &Measure,
    cores: usize,
    of_rsync: &dyn Fn(&str, Duration) -> String,
) -> Option<String> {
    let bounds = Bounds::of(ferry, cores);
    let (scan, after_scan) = bounds.after_scan?;
    Some(format!(
        "- {}: {:.2} CPU-seconds, at least {:.2} s on {cores} cores{}; {:.2} s after its {:.2} s scan{}.",
        capitalized(round),
        bounds.cpu,
        bounds.on_cores.as_secs_f64(),
        of_rsync(round, bounds.on_cores),
        after_scan.as_secs_f64(),
        scan.as_secs_f64(),
        of_rsync(round, after_scan),
    ))
}

pub(crate) fn capitalized(text: &str) -> String {
    let mut chars = text.chars();
    chars.next().map_or_else(String::new, |first| first.to_uppercase().chain(chars).collect())
}

/// The bounds under ferry's round of one file of `bytes`, from its own figures, as rates.
pub(crate) fn single_file_bounds(ferry: &Measure, bytes: u64, cores: usize) -> String {
    let rate = |took: Duration| bytes as f64 / took.as_secs_f64().max(1e-9) / 1e6;
    let bounds = Bounds::of(ferry, cores);
    let mut text = format!(
        "Bounds under ferry's round, from its figures: its two processes used {:.2} CPU-seconds, at least \
         {:.2} s on {cores} cores, so at most {:.0} MB/s without using less CPU",
        bounds.cpu,
        bounds.on_cores.as_secs_f64(),
        rate(bounds.on_cores),
    );
    if let Some((scan, after_scan)) = bounds.after_scan {
        text.push_str(&format!(
            "; after its {:.2} s scan the round took {:.2} s, {:.0} MB/s (what hiding the scan entirely would \
             leave)",
            scan.as_secs_f64(),
            after_scan.as_secs_f64(),
            rate(after_scan),
        ));
    }
    text + ".\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measure(wall: f64, scan: Option<f64>, cpu_send: f64, cpu_recv: f64) -> Measure {
        Measure {
            wall: Duration::from_secs_f64(wall),
            cpu_send,
            cpu_recv,
            scan: scan.map(Duration::from_secs_f64),
            ..Measure::default()
        }
    }

    #[test]
    fn ssh_says_the_bytes_its_stream_carried_as_it_ends() {
        let log = "Authenticated to 127.0.0.1 ([127.0.0.1]:2222) using \"publickey\".\n\
                   Transferred: sent 1234567, received 8910 bytes, in 2.5 seconds\n\
                   Bytes per second: sent 493826.8, received 3564.0\n";
        assert_eq!(crate::rsync::ssh_transferred(log), Some(1234567 + 8910));
        assert_eq!(crate::rsync::ssh_transferred("no such line"), None);
    }

    #[test]
    fn a_bound_spreads_both_processes_cpu_over_the_cores_and_takes_the_scan_off_the_wall_time() {
        let rsync = |round: &str, took: Duration| format!(" [{round} {:.2}×]", took.as_secs_f64() / 4.0);
        let bound = ferry_bound("one day of changes", &measure(2.0, Some(0.5), 1.5, 1.0), 2, &rsync).unwrap();
        assert_eq!(
            bound,
            "- One day of changes: 2.50 CPU-seconds, at least 1.25 s on 2 cores [one day of changes 0.31×]; \
             1.50 s after its 0.50 s scan [one day of changes 0.38×]."
        );
    }

    #[test]
    fn a_single_files_bounds_are_rates() {
        let bounds = single_file_bounds(&measure(10.0, Some(2.0), 6.0, 4.0), 4_000_000_000, 2);
        assert_eq!(
            bounds,
            "Bounds under ferry's round, from its figures: its two processes used 10.00 CPU-seconds, at least \
             5.00 s on 2 cores, so at most 800 MB/s without using less CPU; after its 2.00 s scan the round \
             took 8.00 s, 500 MB/s (what hiding the scan entirely would leave).\n"
        );
    }

    #[test]
    fn rsync_has_no_bound_of_ferrys() {
        assert_eq!(ferry_bound("initial", &measure(20.0, None, 10.0, 9.0), 2, &|_, _| String::new()), None);
    }
}
