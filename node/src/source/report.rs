//! The source's report of a round, for people and as JSON.

use std::time::Duration;

use serde::Serialize;

/// The report of a network round (`--json` prints it).
#[derive(Debug, Clone, Serialize)]
pub struct PushReport {
    /// [`REPORT_SCHEMA`](crate::REPORT_SCHEMA).
    pub schema: u32,
    /// The job.
    pub job: String,
    /// The round now committed on the destination.
    pub round: u64,
    /// Its manifest's root hash.
    pub root_hash: String,
    /// True when the destination now holds exactly this tree.
    pub in_sync: bool,
    /// Entries in the tree.
    pub entries: u64,
    /// Changes sent (new, changed or removed paths).
    pub changes: u64,
    /// Files the destination wrote.
    pub files_changed: u64,
    /// Bytes in the files whose content changed (what a file-level copy would send).
    pub changed_bytes: u64,
    /// Bytes read from files by the scan.
    pub bytes_read: u64,
    /// Chunks the destination asked for.
    pub chunks_sent: u64,
    /// Bytes of those chunks before compression.
    pub chunk_bytes: u64,
    /// Bytes of chunk data as sent (compressed where it paid).
    pub payload_bytes: u64,
    /// Bytes of the list of changes sent (its frames).
    pub list_bytes: u64,
    /// Bytes of the destination's requests for chunks (its `Need` frames).
    pub need_bytes: u64,
    /// All bytes this round put on the network, both directions (UDP payloads, as QUIC counts them).
    pub bytes_on_wire: u64,
    /// Bytes QUIC had to send again because packets were lost.
    pub bytes_lost: u64,
    /// The largest UDP payload the last connection's path MTU discovery found: 1452 on an Ethernet
    /// path, more on loopback or jumbo frames.
    pub path_mtu: u16,
    /// Connections the round took (more than one after a reconnection).
    pub connections: u64,
    /// Entries the destination could not apply.
    pub failures: Vec<String>,
    /// How many.
    pub failure_count: u64,
    /// How the destination's import of this round ended (when one ran and was waited for).
    pub import: Option<ferry_proto::ImportResult>,
    /// What the destination said of the round besides: what its check of the target found, an import
    /// skipped because nothing changed.
    pub notices: Vec<String>,
    /// What the destination's check of its target found this round (entries, missing, changed,
    /// foreign, folders) and how long it took (`None`: the destination said nothing of it).
    pub check: Option<ferry_proto::Checked>,
    /// Entries of the tree the round did not carry (a sample, with why): special files, unreadable
    /// files, paths too long. The round is not in sync while there are any (devices, FIFOs and sockets
    /// aside with `--skip-special`).
    pub skipped: Vec<String>,
    /// How many.
    pub skipped_count: u64,
    /// Files that changed while the scan read them (a sample): the target keeps what it had of
    /// each (a new one is not there), and the next round reads them again. The round is not in
    /// sync while there are any.
    pub changed_while_read: Vec<String>,
    /// How many.
    pub changed_while_read_count: u64,
    /// Wall time in milliseconds.
    pub duration_ms: u64,
    /// Of which the scan of the source tree (stat every file, read and hash the changed ones).
    pub scan_ms: u64,
    /// From the start to the first chunk data handed to QUIC (`None`: no chunk was sent).
    pub first_byte_ms: Option<u64>,
    /// Bytes this process read from storage (the kernel's count, `/proc/self/io`: the page cache's
    /// misses; `None` where the kernel does not say). A first round reads each changed byte once.
    pub disk_read_bytes: Option<u64>,
}

/// Prints one JSON document on stdout.
pub(super) fn print_json(report: &impl Serialize) {
    match serde_json::to_string_pretty(report) {
        Ok(text) => println!("{text}"),
        Err(e) => eprintln!("ferry: cannot print the report: {e}"),
    }
}

/// Prints a round's report: one JSON object, or a summary for people.
pub fn print_push_report(report: &PushReport, json: bool) {
    if json {
        return print_json(report);
    }
    println!(
        "round {} of {} committed in {}: {}, {} written on the destination",
        report.round,
        report.job,
        crate::human::duration(Duration::from_millis(report.duration_ms)),
        crate::human::counted(report.changes, "change"),
        crate::human::counted(report.files_changed, "file")
    );
    println!(
        "  sent {} ({}), {} on the wire; read {} here, scanned in {}",
        crate::human::counted(report.chunks_sent, "chunk"),
        crate::human::bytes(report.chunk_bytes),
        crate::human::bytes(report.bytes_on_wire),
        crate::human::bytes(report.bytes_read),
        crate::human::duration(Duration::from_millis(report.scan_ms))
    );
    match &report.import {
        Some(import) if import.success => {
            println!(
                "  import of round {} succeeded in {}",
                import.round,
                crate::human::duration(Duration::from_millis(import.duration_ms))
            );
        }
        Some(import) => {
            eprintln!(
                "error: the import of round {} failed (exit code {}); the last lines of its output:",
                import.round,
                crate::import::exit_code_text(import.exit_code)
            );
            for line in &import.tail {
                eprintln!("  | {line}");
            }
        }
        None => {}
    }
    listed(report.failure_count, &report.failures, |count| {
        format!("error: {} could not be applied on the destination:", crate::human::counted(count, "entry"))
    });
    for notice in &report.notices {
        println!("  note: {notice}");
    }
    if let Some(check) = &report.check {
        let found = check.missing + check.changed + check.foreign + check.folders;
        let what =
            if found == 0 { "all as ferry left them".to_owned() } else { format!("{found} not as ferry left them") };
        let entries = crate::human::counted(check.entries, "entry");
        println!("  destination checked {entries} of its target in {} ms: {what}", check.duration_ms);
    }
    listed(report.skipped_count, &report.skipped, |count| {
        format!("error: {} of this tree not carried (so it cannot match):", crate::human::counted(count, "entry"))
    });
    listed(report.changed_while_read_count, &report.changed_while_read, |count| {
        let files = crate::human::counted(count, "file");
        format!(
            "warning: {files} changed while read (the destination keeps what it had; the next round reads them again):"
        )
    });
    println!(
        "  destination {} (root {})",
        if report.in_sync {
            "matches this tree"
        } else if report.skipped_count > 0 && report.failure_count == 0 && report.changed_while_read_count == 0 {
            "does not match this tree: entries of it are not carried (listed above)"
        } else {
            "does not match yet: run the round again"
        },
        &report.root_hash[..8.min(report.root_hash.len())]
    );
}

/// Prints, on stderr, the heading `count` makes and the sample `items` under it, when `count` is not
/// zero.
fn listed(count: u64, items: &[String], heading: impl FnOnce(u64) -> String) {
    if count > 0 {
        eprintln!("{}", heading(count));
        for item in items {
            eprintln!("  {item}");
        }
    }
}

impl PushReport {
    /// The line this round adds to the job's history.
    pub(super) fn history_record(&self, peer: &str) -> crate::history::Record {
        crate::history::Record {
            root_hash: Some(self.root_hash.clone()),
            peer: Some(peer.to_owned()),
            files_written: Some(self.files_changed),
            bytes: Some(self.bytes_on_wire),
            failures: Some(self.failure_count),
            in_sync: Some(self.in_sync),
            import: self.import.clone(),
            duration_ms: Some(self.duration_ms),
            ..crate::history::Record::new("pushed", self.round)
        }
    }
}
