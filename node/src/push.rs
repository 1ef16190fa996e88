//! `ferry sync --round JOB`: the source's side of a round, pushed to the job's peer.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use ferry_certs::Identity;
use ferry_engine::{
    ChunkHash, EntryKind, ManifestReader, RawEntry, RecordFileError, RootDir, ScanOptions, SettledBefore, diff, scan,
};
use ferry_proto::{
    Change, ChangesEnd, Committed, Hello, Message, NeedChunk, PROTOCOL_VERSION, Refusal, RoundOptions, RoundRef,
};
use serde::Serialize;
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::config::ConfigDir;
use crate::net::{self, FrameReader};
use crate::refused::Refused;

/// What `sync --round JOB` was asked to do.
#[derive(Debug, Clone)]
pub struct PushOptions {
    /// The job.
    pub job: String,
    /// `--delete`.
    pub delete: bool,
    /// `--numeric-ids`.
    pub numeric_ids: bool,
    /// `--skip-special`.
    pub skip_special: bool,
    /// `--import`.
    pub import: ferry_proto::ImportMode,
    /// Wait for the import's result (not `--no-wait`).
    pub wait_for_import: bool,
    /// `--wait`: when the destination is busy with this job, wait instead of giving up.
    pub wait_if_busy: bool,
    /// `--bwlimit`: the most bytes per second this round puts on the network for chunk data and the
    /// list of changes, fixed or by the time of the week. `None`: the job's or the peer's limit in
    /// ferry.toml, if any.
    pub bwlimit: Option<ferry_engine::Timetable>,
    /// `--max-duration`: stop cleanly after this long.
    pub max_duration: Option<Duration>,
    /// `--dry-run`: plan only.
    pub dry_run: bool,
    /// `--reconnect-grace`: how long to keep reconnecting after the connection is lost.
    pub reconnect_grace: Duration,
    /// `--low-priority`: a delay-based congestion controller that yields to other traffic.
    pub congestion: crate::net::Congestion,
    /// `--progress-interval`: how often a run without a terminal (cron, systemd) logs its progress.
    pub progress_interval: Duration,
}

/// The version of the `--json` reports' layout: it changes only when a field changes meaning or goes
/// away (new fields may appear without it).
pub const REPORT_SCHEMA: u32 = 1;

/// The report of a network round (`--json` prints it).
#[derive(Debug, Clone, Serialize)]
pub struct PushReport {
    /// [`REPORT_SCHEMA`].
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
    /// Entries of the tree the round did not carry (a sample, with why): special files, unreadable
    /// files, paths too long. The round is not in sync while there are any (devices, FIFOs and sockets
    /// aside with `--skip-special`).
    pub skipped: Vec<String>,
    /// How many.
    pub skipped_count: u64,
    /// Wall time in milliseconds.
    pub duration_ms: u64,
    /// Of which the scan of the source tree (stat every file, read and hash the changed ones).
    pub scan_ms: u64,
}

/// The source's state for a job.
struct SourceState {
    dir: PathBuf,
}

impl SourceState {
    fn cache(&self) -> PathBuf {
        self.dir.join("cache")
    }
    fn scanned(&self) -> PathBuf {
        self.dir.join("manifest.scan")
    }
    fn base(&self) -> PathBuf {
        self.dir.join("manifest.base")
    }
    fn base_round(&self) -> Option<RoundRef> {
        let bytes = std::fs::read(self.dir.join("base.json")).ok()?;
        serde_json::from_slice(&bytes).ok()
    }
    /// The scanned manifest becomes the base of the next round's changes. When the base already holds
    /// the same records (nothing changed), the base stays and the scan's copy goes: nothing to sync.
    /// Else the scan's manifest (not fsynced by the scan) is made durable first, then named the base,
    /// then `base.json` says which round it is.
    fn promote(&self, round: RoundRef) -> anyhow::Result<()> {
        if ferry_engine::same_records(&self.scanned(), &self.base()) {
            let _ = std::fs::remove_file(self.scanned());
        } else {
            ferry_engine::sync_record_file(&self.scanned())?;
            std::fs::rename(self.scanned(), self.base())?;
        }
        crate::write_durably(&self.dir.join("base.json"), &serde_json::to_vec(&round)?)?;
        Ok(())
    }
    fn forget_base(&self) {
        let _ = std::fs::remove_file(self.dir.join("base.json"));
    }
}

/// The peer could not be reached, or was lost and did not come back in time.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unreachable(pub String);

/// `--max-duration` ran out: the round stopped cleanly and the next one goes on from there.
#[derive(Debug, thiserror::Error)]
#[error(
    "stopped at the deadline (--max-duration {limit}) after sending {sent} in {chunks} chunks; the files that arrived whole are kept (a file still in progress is sent again whole): run the round again to go on"
)]
pub struct StoppedAtDeadline {
    limit: String,
    sent: String,
    chunks: u64,
}

/// The connection was lost in the middle of the round: worth reconnecting.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Lost(String);

/// Runs one round of `options.job`; with `wait_if_busy`, waits while the destination is busy with it.
pub async fn push(config_dir: &ConfigDir, options: &PushOptions) -> anyhow::Result<PushReport> {
    let span = tracing::info_span!("sync", job = %options.job, round = tracing::field::Empty);
    async {
        loop {
            match push_once(config_dir, options).await {
                // The check before the export hook waits while the job is busy; this is for a round that
                // became busy after it.
                Err(e) if options.wait_if_busy && is_busy(&e) => {
                    tracing::info!("{e}; trying again in {} s (--wait)", BUSY_RETRY.as_secs());
                    tokio::time::sleep(BUSY_RETRY).await;
                }
                other => return other,
            }
        }
    }
    .instrument(span)
    .await
}

/// What `sync --round JOB --dry-run` found (`--json` prints it).
#[derive(Debug, Clone, Serialize)]
pub struct DryRunReport {
    /// [`REPORT_SCHEMA`].
    pub schema: u32,
    /// The job.
    pub job: String,
    /// Entries in the tree.
    pub entries: u64,
    /// Changes the round would send.
    pub changes: u64,
    /// Files the destination would write.
    pub files: u64,
    /// Bytes of the files whose content changed (before deduplication).
    pub changed_bytes: u64,
    /// Chunk bytes the destination lacks (after deduplication).
    pub need_bytes: u64,
    /// The estimate of everything the round would put on the network, both directions.
    pub bytes_on_wire: u64,
    /// Seconds the transfer would take under the bandwidth timetable, when the limits decide it.
    pub seconds: Option<u64>,
    /// When it would be done (local time, RFC 3339), when the limits decide it.
    pub done_at: Option<String>,
    /// The schedule in words ("done Thu 04:10 at the current schedule", "paused for good", ...).
    pub schedule: String,
    /// Disk space the round needs on the destination (with the margin) and what is free there.
    pub space_needed: u64,
    /// Free space on the destination.
    pub space_available: u64,
    /// Wall time of the dry run, in milliseconds.
    pub duration_ms: u64,
}

/// `sync --round JOB --dry-run`: scans, exchanges manifests, lets the destination plan, and sizes what
/// it asks for (read and compressed here, not sent). Nothing is written on the destination.
pub async fn dry_run(config_dir: &ConfigDir, options: &PushOptions) -> anyhow::Result<DryRunReport> {
    let span = tracing::info_span!("dry-run", job = %options.job, round = tracing::field::Empty);
    dry_run_in_span(config_dir, options).instrument(span).await
}

async fn dry_run_in_span(config_dir: &ConfigDir, options: &PushOptions) -> anyhow::Result<DryRunReport> {
    let started = Instant::now();
    let options = PushOptions { dry_run: true, ..options.clone() };
    let prepared = prepare(config_dir, &options).await?;
    let timetable = timetable(config_dir, &options, &prepared.job.name)?;
    let mut session = open_session(&prepared, &options).await?;
    // A dry run moves no chunks; its list of changes is what it puts on the network.
    // A pause does not hold it: the operator asked for the plan now, and the list is all it sends.
    let limiter = crate::limit::Limiter::new(timetable.clone());
    let (changes, positions) = send_all_changes(&prepared, &mut session, &limiter, ListPause::LetsThrough).await?;
    let changed_bytes = positions.total;
    let mut payload = 0u64;
    let plan = loop {
        match session.reader.next().await? {
            Some(Message::Need(chunks)) => {
                let (root, settled) = (prepared.job.path.clone(), prepared.scanned.settled_before);
                payload += tokio::task::spawn_blocking(move || estimate_chunks(&root, settled, &chunks))
                    .await
                    .context("sizing chunks panicked")??;
            }
            Some(Message::Planned(plan)) => break plan,
            Some(Message::Notice { text }) => tracing::warn!("{}: {text}", prepared.peer.name),
            Some(Message::Refused { refusal, reason }) => return Err(Refused::new(refusal, reason).into()),
            Some(other) => bail!("unexpected {other:?} from {} during a dry run", prepared.peer.name),
            None => bail!("{} ended the dry run: {}", prepared.peer.name, why_closed(&session.connection).await),
        }
    };
    let stats = session.connection.stats();
    session.connection.close(net::close::DONE.into(), b"dry run over");
    // What this connection carried (the manifest exchange and the requests, which the real round
    // repeats) plus the chunk payload with QUIC's framing and acknowledgements (about 3%, measured).
    let bytes_on_wire = stats.udp_tx.bytes + stats.udp_rx.bytes + payload + payload * 3 / 100;
    let chunk_wire = payload + payload * 3 / 100;
    let (seconds, done_at, schedule) = finish_time(&timetable, chunk_wire);
    Ok(DryRunReport {
        schema: REPORT_SCHEMA,
        job: prepared.job.name.clone(),
        entries: prepared.scanned.entries,
        changes,
        files: plan.files,
        changed_bytes,
        need_bytes: plan.need_bytes,
        bytes_on_wire,
        seconds,
        done_at,
        schedule,
        space_needed: plan.space_needed,
        space_available: plan.space_available,
        duration_ms: started.elapsed().as_millis() as u64,
    })
}

/// When sending `bytes` from now would be done under `timetable`.
fn finish_time(timetable: &ferry_engine::Timetable, bytes: u64) -> (Option<u64>, Option<String>, String) {
    let now = jiff::ZonedDateTime::now();
    let at = |seconds: u64| now.checked_add(jiff::SignedDuration::from_secs(seconds as i64)).ok();
    match timetable.time_to_send(bytes, crate::limit::second_of_week_now()) {
        ferry_engine::SendTime::Limited { seconds } => {
            let done = at(seconds);
            let when = done.as_ref().map(|d| d.strftime("%a %H:%M").to_string()).unwrap_or_default();
            let schedule = format!(
                "done {when} at the current schedule ({})",
                crate::human::duration(Duration::from_secs(seconds))
            );
            (Some(seconds), done.map(|d| d.to_string()), schedule)
        }
        ferry_engine::SendTime::AtLinkSpeed { after: 0 } => {
            (None, None, "no bandwidth limit now: as fast as the link allows".to_owned())
        }
        ferry_engine::SendTime::AtLinkSpeed { after } => {
            let when = at(after).map(|d| d.strftime("%a %H:%M").to_string()).unwrap_or_default();
            (None, None, format!("not done before {when}; from then on there is no limit and the link decides"))
        }
        ferry_engine::SendTime::Never => (None, None, "never: the timetable pauses the transfer for good".to_owned()),
    }
}

/// Reads the asked-for chunks and returns what they would weigh on the wire: compressed when the
/// round would compress them, else raw. Chunks that changed since the scan weigh nothing.
fn estimate_chunks(root: &Path, settled: SettledBefore, chunks: &[NeedChunk]) -> anyhow::Result<u64> {
    let mut reader = SourceChunks::open(root, settled)?;
    let mut compressor = zstd::bulk::Compressor::new(1)?;
    let mut total = 0u64;
    for need in chunks {
        let Some(chunk) = reader.read(need) else { continue };
        total += if crate::chunks::compressible(chunk, &mut compressor) {
            compressor.compress(chunk).map_or(chunk.len(), |c| c.len().min(chunk.len())) as u64
        } else {
            chunk.len() as u64
        };
    }
    Ok(total)
}

/// Reads asked-for chunks from the source tree, beneath its root, keeping the last file open
/// (requests come in file order).
struct SourceChunks {
    root: RootDir,
    settled: SettledBefore,
    open: Option<(ferry_engine::RelPath, std::fs::File)>,
    buf: Vec<u8>,
}

impl SourceChunks {
    /// Reads beneath `root`. A chunk read from a file that the scan's `settled` still holds for is
    /// what the scan hashed, and is not hashed again. Other chunks are checked against the scan's
    /// hashes. The destination checks every chunk in any case.
    fn open(root: &Path, settled: SettledBefore) -> anyhow::Result<Self> {
        let root = RootDir::open(root).with_context(|| format!("cannot open {}", root.display()))?;
        Ok(Self { root, settled, open: None, buf: Vec::new() })
    }

    /// The chunk's bytes, or `None` when it is too large, unreadable, or no longer hashes to what the
    /// scan saw.
    fn read(&mut self, need: &NeedChunk) -> Option<&[u8]> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        let read = self.read_into(need, &mut buf);
        self.buf = buf;
        read.then_some(&self.buf[..])
    }

    /// Like [`SourceChunks::read`], appending the chunk to `out`; `false` leaves `out` as it was.
    fn read_into(&mut self, need: &NeedChunk, out: &mut Vec<u8>) -> bool {
        use std::os::unix::fs::FileExt;
        if need.len as usize > (16 << 20) {
            return false;
        }
        if self.open.as_ref().is_none_or(|(p, _)| *p != need.path) {
            self.open = self.root.open_file(&need.path).ok().map(|f| (need.path.clone(), f));
        }
        let Some((_, file)) = self.open.as_ref() else { return false };
        let start = out.len();
        out.resize(start + need.len as usize, 0);
        // The ctime is looked at after the read: unchanged then, the bytes read are the scan's.
        let read = file.read_exact_at(&mut out[start..], need.offset).is_ok()
            && (self.settled.holds(file) || ChunkHash::of(&out[start..]) == need.hash);
        if !read {
            out.truncate(start);
        }
        read
    }
}

/// Prints one JSON document on stdout.
fn print_json(report: &impl Serialize) {
    match serde_json::to_string_pretty(report) {
        Ok(text) => println!("{text}"),
        Err(e) => eprintln!("ferry: cannot print the report: {e}"),
    }
}

/// Prints a dry run's report: one JSON object, or a summary for people.
pub fn print_dry_run(report: &DryRunReport, json: bool) {
    if json {
        return print_json(report);
    }
    println!(
        "dry run of {}: {} changes, {} files to write ({} of changed files, {} after deduplication)",
        report.job,
        crate::human::count(report.changes),
        crate::human::count(report.files),
        crate::human::bytes(report.changed_bytes),
        crate::human::bytes(report.need_bytes)
    );
    println!("  needs {} on the wire, {}", crate::human::bytes(report.bytes_on_wire), report.schedule);
    println!(
        "  destination space: needs {}, {} free{}",
        crate::human::bytes(report.space_needed),
        crate::human::bytes(report.space_available),
        if report.space_needed > report.space_available { ": THE ROUND WOULD BE REFUSED" } else { "" }
    );
    println!("  nothing was written");
}

/// A round's source side, ready to connect: the job, its peer and the new scan.
struct Prepared {
    /// Where the round's connections go out from: the check's, the round's and any reconnection's.
    client: net::Client,
    job: crate::config::JobConfig,
    peer: crate::config::PeerConfig,
    addr: String,
    identity: Identity,
    state: SourceState,
    scanned: ferry_engine::ScanReport,
    new_root: ferry_engine::RootHash,
    _lock: ferry_engine::StateLock,
}

/// Loads the job, asks the destination whether it would take a round now, runs the export hook, and
/// scans.
async fn prepare(config_dir: &ConfigDir, options: &PushOptions) -> anyhow::Result<Prepared> {
    let job_name = &options.job;
    let config = config_dir.load()?;
    let identity = Identity::load(config_dir.path()).context("cannot load this node's identity (run `ferry init`)")?;
    let job = config
        .job(job_name)
        .ok_or_else(|| anyhow!("no job {job_name:?} here (ferry job add {job_name} --path SOURCE --peer PEER)"))?
        .clone();
    let peer = config
        .peer(&job.peer)
        .ok_or_else(|| anyhow!("job {} names peer {:?}, which is not trusted here (ferry trust)", job.name, job.peer))?
        .clone();
    let addr = peer.addr.clone().ok_or_else(|| {
        anyhow!("peer {} has no address: ferry trust {} --name {} --addr HOST:PORT", peer.name, peer.id, peer.name)
    })?;
    let state = SourceState { dir: config_dir.data_dir(&config).join("jobs").join(&job.name).join("source") };
    std::fs::create_dir_all(&state.dir).with_context(|| format!("cannot create {}", state.dir.display()))?;
    let lock = ferry_engine::lock_state(&state.dir)?;
    let client = net::Client::default();

    loop {
        match check_peer(&client, &job, &peer, &addr, &identity, options).await {
            Err(e) if options.wait_if_busy && is_busy(&e) => {
                tracing::info!("{e}; asking again in {} s (--wait)", BUSY_RETRY.as_secs());
                tokio::time::sleep(BUSY_RETRY).await;
            }
            other => break other?,
        }
    }

    if let Some(command) = &job.export_cmd {
        let argv = crate::config::export_argv(command, &job.path, &job.name)?;
        let log = state.dir.join("export.log");
        let user = job.export_user.clone();
        let run = tokio::task::spawn_blocking(move || {
            crate::import::run(&argv, user.as_deref(), 0, Duration::from_secs(24 * 3600), &log)
        });
        let result = run.await.context("the export hook panicked")?;
        if !result.success {
            let code = crate::import::exit_code_text(result.exit_code);
            bail!(
                "the export command of job {} failed (exit code {code}), so no round was started; the last lines of its output:\n  | {}",
                job.name,
                result.tail.join("\n  | ")
            );
        }
        // Asked again right before the scan: the destination checks its target while this node
        // scans, and the export may have taken hours.
        check_peer(&client, &job, &peer, &addr, &identity, options).await?;
    }

    tracing::info!("scanning {}", job.path.display());
    let scanned = {
        let (path, cache, out) = (job.path.clone(), state.cache(), state.scanned());
        tokio::task::spawn_blocking(move || scan(&path, Some(&cache), &out, &cache, &ScanOptions::default()))
            .await
            .context("the scan panicked")??
    };
    if scanned.changed_while_read_count > 0 {
        tracing::warn!(
            "{} files changed while they were read; they are left for the next round (e.g. {})",
            scanned.changed_while_read_count,
            scanned.changed_while_read.join(", ")
        );
    }
    let new_root = scanned.root_hash.ok_or_else(|| anyhow!("the scan produced no root hash"))?;
    Ok(Prepared { client, job, peer, addr, identity, state, scanned, new_root, _lock: lock })
}

/// The bandwidth timetable of a round: `--bwlimit`, else the job's, else the peer's, else none.
fn timetable(config_dir: &ConfigDir, options: &PushOptions, job: &str) -> anyhow::Result<ferry_engine::Timetable> {
    if let Some(timetable) = &options.bwlimit {
        return Ok(timetable.clone());
    }
    let config = config_dir.load()?;
    let job = config.job(job).ok_or_else(|| anyhow!("job {job} is no longer in ferry.toml"))?;
    Ok(crate::config::job_bwlimit(&config, job)?.unwrap_or_else(crate::unlimited))
}

/// An open round: the connection and its control stream, after `Welcome`.
struct Session {
    connection: quinn::Connection,
    send: quinn::SendStream,
    reader: FrameReader,
    /// The round whose manifest this node kept, as sent in `Hello`.
    base: Option<RoundRef>,
    holds: Option<RoundRef>,
}

/// Opens a connection to the job's peer; failures are [`Unreachable`] or, when trust is what failed,
/// [`Refused`].
async fn connect(
    client: &net::Client,
    peer: &crate::config::PeerConfig,
    addr: &str,
    identity: &Identity,
    options: &PushOptions,
) -> anyhow::Result<quinn::Connection> {
    let remote = net::resolve(addr)?;
    tracing::info!("connecting to {} ({}) at {remote}", peer.name, peer.id);
    match client.connect(identity, peer.id, remote, options.congestion).await {
        Ok(connection) => Ok(connection),
        Err(e) => {
            let e = explain_connect_error(e, &peer.name, peer.id, addr, identity.node_id());
            let text = format!("{e:#}");
            // The TLS handshake's refusal is rustls's, before any of ferry's codes can be sent.
            Err(if text.contains("trust") {
                Refused::new(Refusal::Untrusted, text).into()
            } else {
                Unreachable(text).into()
            })
        }
    }
}

/// What the peer's closing of a connection means for the round, from its close code.
fn closed_error(why: Closed, peer: &crate::config::PeerConfig, addr: &str, identity: &Identity) -> anyhow::Error {
    match why.refusal {
        Some(Refusal::Untrusted) => Refused::new(
            Refusal::Untrusted,
            format!("{:#}", explain_connect_error(anyhow!(why.text), &peer.name, peer.id, addr, identity.node_id())),
        )
        .into(),
        Some(refusal) => Refused::new(refusal, format!("{} refused the round: {}", peer.name, why.text)).into(),
        // The TLS handshake's refusal (rustls's alert, with its text), before any of ferry's codes.
        None if why.text.contains("not trusted") => Refused::new(
            Refusal::Untrusted,
            format!("{:#}", explain_connect_error(anyhow!(why.text), &peer.name, peer.id, addr, identity.node_id())),
        )
        .into(),
        None => anyhow!("{} ended the round: {}", peer.name, why.text),
    }
}

/// Whether the destination refused because the job is busy there (a round or an import).
fn is_busy(error: &anyhow::Error) -> bool {
    error.downcast_ref::<Refused>().is_some_and(|r| r.refusal.is_busy())
}

/// `--wait`: how long to wait before asking a destination busy with the job again.
const BUSY_RETRY: Duration = Duration::from_secs(15);

/// How long the destination has to answer a `Check`.
const CHECK_TIMEOUT: Duration = Duration::from_secs(30);

/// Asks the destination, on a connection of its own, whether it would accept a round of `job` now
/// (`Check`). This comes before the export hook and the scan, which on a large store take hours: a
/// peer that is down, does not trust this node, lacks the job or is busy with it is found in seconds,
/// with the error (and exit code) the round would have met. A peer that answers anything else (a
/// build without `Check`) is left to the round itself.
async fn check_peer(
    client: &net::Client,
    job: &crate::config::JobConfig,
    peer: &crate::config::PeerConfig,
    addr: &str,
    identity: &Identity,
    options: &PushOptions,
) -> anyhow::Result<()> {
    let connection = connect(client, peer, addr, identity, options).await?;
    let answer = tokio::time::timeout(CHECK_TIMEOUT, async {
        let (mut send, recv) = connection.open_bi().await.map_err(|_| ())?;
        net::send(&mut send, &Message::Check { job: job.name.clone() }).await.map_err(|_| ())?;
        let _ = send.finish();
        FrameReader::new(recv).next().await.map_err(|_| ())
    })
    .await;
    let result = match answer {
        Err(_) => Err(Unreachable(format!(
            "{} accepted the connection but did not answer within {} s whether it would take a round",
            peer.name,
            CHECK_TIMEOUT.as_secs()
        ))
        .into()),
        Ok(Ok(Some(Message::Welcome { .. }))) => {
            tracing::info!("{} would take a round of job {} now", peer.name, job.name);
            Ok(())
        }
        Ok(Ok(Some(Message::Refused { refusal, reason }))) => {
            Err(Refused::new(refusal, format!("{} refused the round: {reason}", peer.name)).into())
        }
        Ok(Ok(Some(other))) => {
            tracing::warn!("{} answered the check with {other:?}; going on with the round", peer.name);
            Ok(())
        }
        Ok(_) => match closed_error(why_closed(&connection).await, peer, addr, identity) {
            e if e.downcast_ref::<Refused>().is_some() => Err(e),
            e => {
                tracing::warn!("{} did not answer the check ({e:#}); going on with the round", peer.name);
                Ok(())
            }
        },
    };
    connection.close(net::close::DONE.into(), b"checked");
    result
}

/// Connects, says `Hello` and waits for `Welcome`.
async fn open_session(prepared: &Prepared, options: &PushOptions) -> anyhow::Result<Session> {
    let Prepared { client, peer, addr, identity, state, job, .. } = prepared;
    let connection = connect(client, peer, addr, identity, options).await?;
    let refused = |why: Closed| closed_error(why, peer, addr, identity);
    // With TLS 1.3 the server checks this node's certificate after the client considers the handshake
    // done: a refusal shows up on the first stream operations.
    let (mut send, recv) = match connection.open_bi().await {
        Ok(streams) => streams,
        Err(_) => return Err(refused(why_closed(&connection).await)),
    };
    let mut reader = FrameReader::new(recv);
    let base = state.base_round().filter(|_| state.base().exists());
    let hello = Hello {
        version: PROTOCOL_VERSION,
        job: job.name.clone(),
        base,
        delete: options.delete,
        numeric_ids: options.numeric_ids,
    };
    let mut opening = vec![Message::Hello(hello), Message::RoundOptions(RoundOptions { import: options.import })];
    if options.dry_run {
        opening.push(Message::DryRun);
    }
    for message in &opening {
        if net::send(&mut send, message).await.is_err() {
            return Err(refused(why_closed(&connection).await));
        }
    }
    let holds = loop {
        match reader.next().await {
            Ok(Some(Message::Welcome { holds })) => break holds,
            Ok(Some(Message::Notice { text })) => tracing::warn!("{}: {text}", peer.name),
            Ok(Some(Message::Refused { refusal, reason })) => {
                return Err(Refused::new(refusal, format!("{} refused the round: {reason}", peer.name)).into());
            }
            Ok(Some(Message::Failed { reason })) => bail!("{} failed the round: {reason}", peer.name),
            Ok(Some(other)) => bail!("{} answered {other:?} instead of Welcome", peer.name),
            Ok(None) | Err(_) => return Err(refused(why_closed(&connection).await)),
        }
    };
    tracing::Span::current().record("round", holds.map_or(1, |h| h.round + 1));
    Ok(Session { connection, send, reader, base, holds })
}

/// What a bandwidth pause (rate 0) does to the list of changes.
enum ListPause<'a> {
    /// The list waits between its messages, telling the destination every second, until the pause
    /// ends or `deadline` (`--max-duration`) passes.
    Holds { deadline: Option<Instant>, options: &'a PushOptions, sent: &'a Counters },
    /// The list goes on (a dry run: the operator asked for its plan now).
    LetsThrough,
}

impl ListPause<'_> {
    /// Waits while `limiter` pauses the round, sending `Paused` every second, and saying so in the log
    /// every `--progress-interval` (a log without it would look hung for the hours of a pause).
    async fn wait(&self, session: &mut Session, limiter: &crate::limit::Limiter) -> anyhow::Result<()> {
        let ListPause::Holds { deadline, options, sent } = self else { return Ok(()) };
        let mut told: Option<Instant> = None;
        while limiter.is_paused() {
            match told {
                None => {
                    tracing::info!("the bandwidth limit pauses the round: the list of changes waits for it to open");
                    told = Some(Instant::now());
                }
                Some(at) if at.elapsed() >= options.progress_interval => {
                    tracing::info!("paused by the bandwidth limit: the list of changes still waits");
                    told = Some(Instant::now());
                }
                Some(_) => {}
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                let error = deadline_error(options, sent);
                let reason = format!("{error}, paused by the bandwidth limit");
                let _ = net::send(&mut session.send, &Message::Failed { reason }).await;
                return Err(error.into());
            }
            net::send(&mut session.send, &Message::Paused).await?;
            tokio::time::sleep(PAUSE_NOTICE).await;
        }
        if told.is_some() {
            tracing::info!("the bandwidth limit opened: the list of changes goes on");
        }
        Ok(())
    }
}

/// Sends the changes since what the destination holds (all of them when this node no longer has
/// that manifest). Returns how many, and where each file whose content changed starts in those bytes.
async fn send_all_changes(
    prepared: &Prepared,
    session: &mut Session,
    limiter: &crate::limit::Limiter,
    pause: ListPause<'_>,
) -> anyhow::Result<(u64, Positions)> {
    let state = &prepared.state;
    let delta_base = session.base.filter(|b| Some(*b) == session.holds);
    if let Some(base) = delta_base.filter(|b| b.root == prepared.new_root) {
        // The tree is what the destination holds: no changes, and no need to read both manifests
        // through to find none.
        let end = ChangesEnd { base: delta_base, root: prepared.new_root, entries: prepared.scanned.entries };
        net::send(&mut session.send, &Message::ChangesEnd(end)).await?;
        tracing::info!("0 changes sent (the tree is as in round {})", base.round);
        return Ok((0, Positions::default()));
    }
    let (changes_tx, mut changes_rx) = mpsc::channel::<Vec<Change>>(4);
    let base_path = delta_base.map(|_| state.base());
    let scanned_path = state.scanned();
    let differ = tokio::task::spawn_blocking(move || send_changes(base_path.as_deref(), &scanned_path, &changes_tx));
    let mut change_count = 0u64;
    while let Some(batch) = changes_rx.recv().await {
        change_count += batch.len() as u64;
        pause.wait(session, limiter).await?;
        net::send_limited(&mut session.send, &Message::Changes(batch), limiter).await?;
    }
    let positions = differ.await.context("the diff panicked")??;
    let end = ChangesEnd { base: delta_base, root: prepared.new_root, entries: prepared.scanned.entries };
    net::send(&mut session.send, &Message::ChangesEnd(end)).await?;
    match delta_base {
        Some(base) => tracing::info!("{change_count} changes sent (against round {})", base.round),
        None => tracing::info!("{change_count} changes sent (the whole manifest: no round held in common)"),
    }
    Ok((change_count, positions))
}

/// What the attempts of a round added up to.
#[derive(Default)]
struct Totals {
    bytes_on_wire: u64,
    bytes_lost: u64,
    path_mtu: u16,
    attempts: u64,
}

impl Totals {
    fn add(&mut self, connection: &quinn::Connection) {
        let stats = connection.stats();
        self.bytes_on_wire += stats.udp_tx.bytes + stats.udp_rx.bytes;
        self.bytes_lost += stats.path.lost_bytes;
        self.path_mtu = stats.path.current_mtu;
    }
}

/// A committed round, as one attempt saw it end.
struct Finished {
    committed: Committed,
    changes: u64,
    changed_bytes: u64,
    import: Option<ferry_proto::ImportResult>,
    notices: Vec<String>,
}

async fn push_once(config_dir: &ConfigDir, options: &PushOptions) -> anyhow::Result<PushReport> {
    let started = Instant::now();
    let deadline = options.max_duration.map(|d| started + d);
    // SIGHUP re-reads the job's and the peer's limits (from now on, not only during the transfer).
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let prepared = prepare(config_dir, options).await?;
    let limiter = crate::limit::Limiter::new(timetable(config_dir, options, &prepared.job.name)?);
    if limiter.rate() != ferry_engine::Rate::UNLIMITED {
        tracing::info!("bandwidth limit {}", crate::limit::describe_rate(limiter.rate()));
    }
    let follow = limiter.follow("bandwidth limit");
    let reload = {
        let (limiter, config_dir, options, job) =
            (limiter.clone(), config_dir.clone(), options.clone(), prepared.job.name.clone());
        crate::spawn_in_span(async move {
            let Some(hangup) = hangup.as_mut() else { return };
            while hangup.recv().await.is_some() {
                if options.bwlimit.is_some() {
                    tracing::warn!("SIGHUP: --bwlimit on the command line wins over ferry.toml; the limit stays");
                    continue;
                }
                match timetable(&config_dir, &options, &job) {
                    Ok(timetable) => {
                        limiter.set_timetable(timetable);
                        tracing::info!(
                            "SIGHUP: re-read ferry.toml; bandwidth limit now {}",
                            crate::limit::describe_rate(limiter.rate())
                        );
                    }
                    Err(e) => tracing::warn!("SIGHUP: cannot re-read the limits, keeping the current one: {e:#}"),
                }
            }
        })
    };
    let sent = Arc::new(Counters::default());
    let mut totals = Totals::default();
    let mut lost_since: Option<Instant> = None;
    let first_backoff = Duration::from_millis(250);
    let mut backoff = first_backoff;
    let result = loop {
        totals.attempts += 1;
        let attempt = attempt(&prepared, options, &limiter, &sent, &mut totals, deadline).await;
        match attempt {
            Ok(finished) => break Ok(finished),
            Err(e)
                if e.downcast_ref::<Lost>().is_some()
                    || (totals.attempts > 1 && e.downcast_ref::<Unreachable>().is_some()) =>
            {
                if e.downcast_ref::<Lost>().is_some() {
                    // It was connected: the grace period starts now.
                    lost_since = Some(Instant::now());
                    backoff = first_backoff;
                }
                let since = *lost_since.get_or_insert_with(Instant::now);
                if since.elapsed() + backoff > options.reconnect_grace {
                    break Err(Unreachable(format!(
                        "lost {} and could not reconnect within {} (--reconnect-grace): {e:#}; the files that arrived whole are kept, run the round again",
                        prepared.peer.name,
                        humantime::format_duration(options.reconnect_grace)
                    ))
                    .into());
                }
                if deadline.is_some_and(|d| Instant::now() + backoff >= d) {
                    break Err(deadline_error(options, &sent).into());
                }
                tracing::warn!(
                    "{e:#}; reconnecting to {} in {:.1} s (giving up {} s after the loss)",
                    prepared.peer.name,
                    backoff.as_secs_f64(),
                    options.reconnect_grace.as_secs()
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
            Err(e) => break Err(e),
        }
    };
    follow.abort();
    reload.abort();
    let finished = result?;
    let Prepared { job, peer, state, scanned, new_root, .. } = prepared;
    let committed = finished.committed;
    // The destination holds the scanned tree: the base of the next round's changes. In sync only if the
    // scan left nothing of the tree out.
    let holds_tree = committed.round.root == new_root;
    let not_carried = scanned.not_carried(options.skip_special);
    let in_sync = holds_tree && not_carried == 0;
    if holds_tree {
        state.promote(committed.round)?;
    } else {
        state.forget_base();
    }
    let report = PushReport {
        schema: REPORT_SCHEMA,
        job: job.name,
        round: committed.round.round,
        root_hash: committed.round.root.to_string(),
        in_sync,
        entries: scanned.entries,
        changes: finished.changes,
        files_changed: committed.files_written,
        changed_bytes: finished.changed_bytes,
        bytes_read: scanned.bytes_read,
        chunks_sent: sent.chunks.load(Ordering::Relaxed),
        chunk_bytes: sent.bytes.load(Ordering::Relaxed),
        bytes_on_wire: totals.bytes_on_wire,
        bytes_lost: totals.bytes_lost,
        path_mtu: totals.path_mtu,
        connections: totals.attempts,
        failures: committed.failures,
        failure_count: committed.failure_count,
        import: finished.import,
        notices: finished.notices,
        skipped: scanned.skipped.clone(),
        skipped_count: not_carried,
        duration_ms: started.elapsed().as_millis() as u64,
        scan_ms: scanned.duration.as_millis() as u64,
    };
    crate::history::append(&state.dir.join("history.jsonl"), &crate::history::Record::pushed(&report, &peer.name))?;
    Ok(report)
}

/// `--max-duration` as the operator wrote it, for messages.
fn max_duration_text(options: &PushOptions) -> String {
    options.max_duration.map(|d| humantime::format_duration(d).to_string()).unwrap_or_default()
}

fn deadline_error(options: &PushOptions, sent: &Counters) -> StoppedAtDeadline {
    StoppedAtDeadline {
        limit: max_duration_text(options),
        sent: crate::human::bytes(sent.bytes.load(Ordering::Relaxed)),
        chunks: sent.chunks.load(Ordering::Relaxed),
    }
}

/// What the chunk reader tells the control loop.
enum FromReader {
    /// Chunks that could not be read as the scan saw them.
    Missing(Vec<ChunkHash>),
    /// Reading failed for good.
    Failed(String),
}

/// One connection's worth of a round: open, send the changes, serve chunks until the commit (or the
/// deadline), wait for the import. A lost connection comes back as [`Lost`].
async fn attempt(
    prepared: &Prepared,
    options: &PushOptions,
    limiter: &crate::limit::Limiter,
    sent: &Arc<Counters>,
    totals: &mut Totals,
    deadline: Option<Instant>,
) -> anyhow::Result<Finished> {
    if deadline.is_some_and(|d| Instant::now() >= d) {
        return Err(deadline_error(options, sent).into());
    }
    let mut session = open_session(prepared, options).await?;
    let connection = session.connection.clone();
    let result = serve_round(prepared, options, limiter, sent, &mut session, deadline).await;
    totals.add(&connection);
    match result {
        Ok(finished) => {
            connection.close(net::close::DONE.into(), b"round over");
            Ok(finished)
        }
        Err(e) => {
            if e.downcast_ref::<StoppedAtDeadline>().is_none() && is_lost(&connection) {
                return Err(Lost(format!("lost {} in the middle of the round: {e:#}", prepared.peer.name)).into());
            }
            connection.close(net::close::ERROR.into(), b"the source gave up");
            Err(e)
        }
    }
}

/// True when the connection ended in a way a new connection may cure: a timeout, a reset, the
/// daemon shutting down or restarting.
fn is_lost(connection: &quinn::Connection) -> bool {
    match connection.close_reason() {
        Some(quinn::ConnectionError::TimedOut | quinn::ConnectionError::Reset) => true,
        // "Replaced": a connection of a killed earlier run whose Hello arrived late took the job over;
        // reconnecting takes it back (two live runs of one node cannot happen: the state lock).
        Some(quinn::ConnectionError::ApplicationClosed(close)) => {
            Refusal::from_code(close.error_code.into_inner()).is_some_and(Refusal::may_reconnect)
        }
        Some(quinn::ConnectionError::ConnectionClosed(_)) => true,
        _ => false,
    }
}

/// How often a paused round tells the destination that it is paused (see `Message::Paused`).
const PAUSE_NOTICE: Duration = Duration::from_secs(1);

async fn serve_round(
    prepared: &Prepared,
    options: &PushOptions,
    limiter: &crate::limit::Limiter,
    sent: &Arc<Counters>,
    session: &mut Session,
    deadline: Option<Instant>,
) -> anyhow::Result<Finished> {
    let peer = &prepared.peer;
    let pause = ListPause::Holds { deadline, options, sent };
    let (changes, positions) = send_all_changes(prepared, session, limiter, pause).await?;
    let changed_bytes = positions.total;
    sent.changed.store(changed_bytes, Ordering::Relaxed);
    let positions = Arc::new(positions);
    let connection = session.connection.clone();

    // The chunk reader: a blocking task reading what the destination asks for, in order.
    // Bounded: a destination that asks faster than this node reads waits (QUIC's flow control then
    // slows it down) instead of queueing without end here.
    let (needs_tx, mut needs_rx) = mpsc::channel::<Vec<NeedChunk>>(16);
    let (reader_tx, mut from_reader) = mpsc::unbounded_channel::<FromReader>();
    let (batches_tx, batches_rx) = async_channel();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader_task = {
        let (root, settled) = (prepared.job.path.clone(), prepared.scanned.settled_before);
        let (counters, stop, limiter) = (sent.clone(), stop.clone(), limiter.clone());
        let mut cursor = PositionCursor { positions, at: 0 };
        tokio::task::spawn_blocking(move || {
            while let Some(chunks) = needs_rx.blocking_recv() {
                // Under a limit, smaller batches: an interruption loses at most the batches on the
                // wire, and each should take a fraction of a second.
                let batch_bytes = limiter.rate().bytes_per_second().map_or(crate::chunks::BATCH_BYTES, |bps| {
                    (bps as usize / 16).clamp(64 << 10, crate::chunks::BATCH_BYTES)
                });
                let read = SourceChunks::open(&root, settled).and_then(|mut reader| {
                    read_chunks(&mut reader, chunks, &batches_tx, &counters, &mut cursor, &stop, batch_bytes)
                });
                match read {
                    Ok(missing) if missing.is_empty() => {}
                    Ok(missing) => {
                        let _ = reader_tx.send(FromReader::Missing(missing));
                    }
                    Err(e) => {
                        let _ = reader_tx.send(FromReader::Failed(format!("{e:#}")));
                        return;
                    }
                }
            }
        })
    };
    let batches_sent = Arc::new(AtomicU64::new(0));
    let senders: Vec<_> = (0..4)
        .map(|_| {
            let (connection, rx, limiter, stop, count, counters) = (
                connection.clone(),
                batches_rx.clone(),
                limiter.clone(),
                stop.clone(),
                batches_sent.clone(),
                sent.clone(),
            );
            crate::spawn_in_span(async move {
                let mut stream = connection.open_uni().await?;
                while !stop.load(Ordering::Relaxed) {
                    let Ok(Outgoing { batch, covered }) = rx.recv().await else { break };
                    let bytes = batch.declared_len();
                    net::send_batch_limited(&mut stream, &batch, &limiter).await?;
                    count.fetch_add(1, Ordering::Relaxed);
                    counters.sent_bytes.fetch_add(bytes, Ordering::Relaxed);
                    counters.covered.fetch_max(covered, Ordering::Relaxed);
                }
                let _ = stream.finish();
                anyhow::Ok(())
            })
        })
        .collect();
    drop(batches_rx);
    let (stop_progress, stop_rx) = tokio::sync::oneshot::channel();
    let progress =
        spawn_progress(sent.clone(), connection.clone(), limiter.clone(), options.progress_interval, stop_rx);
    let deadline_sleep = async {
        match deadline {
            Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline_sleep);
    // While the limit pauses the chunks, the destination hears every second that the round is alive:
    // its stall timer would otherwise end the round two minutes into a timetable's pause.
    let mut pause_notice = tokio::time::interval(PAUSE_NOTICE);
    pause_notice.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut notices = Vec::new();
    let outcome: anyhow::Result<Committed> = loop {
        tokio::select! {
            _ = pause_notice.tick() => {
                if limiter.is_paused() {
                    net::send(&mut session.send, &Message::Paused).await?;
                }
            }
            message = session.reader.next() => match message {
                Ok(Some(Message::Need(chunks))) => {
                    if needs_tx.send(chunks).await.is_err() {
                        break Err(anyhow!("the chunk reader stopped"));
                    }
                }
                Ok(Some(Message::Done)) => {}
                Ok(Some(Message::Notice { text })) => {
                    tracing::warn!("{}: {text}", peer.name);
                    notices.push(text);
                }
                Ok(Some(Message::Committed(committed))) => break Ok(committed),
                Ok(Some(Message::Failed { reason })) => break Err(anyhow!("{} failed the round: {reason}", peer.name)),
                Ok(Some(Message::Refused { refusal, reason })) => {
                    break Err(Refused::new(refusal, format!("{} refused the round: {reason}", peer.name)).into());
                }
                Ok(Some(other)) => break Err(anyhow!("unexpected {other:?} from {}", peer.name)),
                Ok(None) | Err(_) => {
                    break Err(anyhow!("{} ended the round before committing it: {}", peer.name, why_closed(&connection).await));
                }
            },
            Some(report) = from_reader.recv() => match report {
                FromReader::Missing(missing) => {
                    tracing::warn!("{} chunks could not be read (files changed since the scan)", missing.len());
                    net::send(&mut session.send, &Message::Missing(missing)).await?;
                }
                FromReader::Failed(why) => {
                    let _ = net::send(&mut session.send, &Message::Failed { reason: why.clone() }).await;
                    break Err(anyhow!("reading the source failed: {why}"));
                }
            },
            () = &mut deadline_sleep => {
                // Finish the batches on the wire, tell the destination how many there were, and let it
                // keep them.
                stop.store(true, Ordering::Relaxed);
                drop(needs_tx);
                for sender in senders {
                    let _ = sender.await;
                }
                let batches = batches_sent.load(Ordering::Relaxed);
                tracing::info!("deadline reached: stopping after {batches} chunk batches");
                let reason = format!("the source's deadline (--max-duration {})", max_duration_text(options));
                let stopping = Message::Stop { reason, batches };
                if net::send(&mut session.send, &stopping).await.is_ok() {
                    let _ = session.send.finish();
                    // The destination applies what arrived, then closes.
                    let _ = tokio::time::timeout(Duration::from_secs(120), connection.closed()).await;
                }
                let _ = stop_progress.send(());
                let _ = progress.await;
                let _ = reader_task.await;
                return Err(deadline_error(options, sent).into());
            }
        }
    };
    stop.store(true, Ordering::Relaxed);
    drop(needs_tx);
    for sender in senders {
        let _ = sender.await;
    }
    let _ = stop_progress.send(());
    let _ = progress.await;
    let _ = reader_task.await;
    let committed = outcome?;
    let _ = session.send.finish();
    // The destination runs its import now, if it has one; wait for its result unless told not to.
    let mut import = None;
    if options.wait_for_import {
        loop {
            match session.reader.next().await {
                Ok(Some(Message::ImportStarted { round, command })) => {
                    tracing::info!("{} imports round {round}: {}", peer.name, command.join(" "));
                }
                Ok(Some(Message::ImportDone(result))) => {
                    import = Some(result);
                    break;
                }
                Ok(Some(Message::Notice { text })) => {
                    tracing::info!("{}: {text}", peer.name);
                    notices.push(text);
                }
                Ok(Some(other)) => bail!("unexpected {other:?} from {} after the commit", peer.name),
                Ok(None) => break,
                // Committed is committed: no reconnection (it would start another round).
                Err(e) => {
                    tracing::warn!(
                        "lost {} while waiting for the import of round {}: {e:#}; see `ferry status` on it",
                        peer.name,
                        committed.round.round
                    );
                    break;
                }
            }
        }
    }
    Ok(Finished { committed, changes, changed_bytes, import, notices })
}

fn explain_connect_error(
    error: anyhow::Error,
    name: &str,
    pinned: ferry_certs::NodeId,
    addr: &str,
    me: ferry_certs::NodeId,
) -> anyhow::Error {
    let text = format!("{error:#}");
    if text.contains("aborted by peer") && text.contains("not trusted") {
        return anyhow!(
            "{name} at {addr} refused this node ({me}): it does not trust it. On {name}, run: ferry trust {me} --name <a name for this node>"
        );
    }
    if text.contains("not trusted") {
        let actual =
            text.split("node ").nth(1).and_then(|rest| rest.split_whitespace().next()).unwrap_or("another node");
        return anyhow!(
            "the node at {addr} is {actual}, not {pinned}, the node pinned as {name}: refusing it. If {name} was \
             re-initialised, pin its new ID: ferry trust {actual} --name {name} --addr {addr}"
        );
    }
    anyhow!("cannot connect to {name} ({pinned}) at {addr}: {text}")
}

/// Why the peer closed the connection: its own words when it gave them.
async fn why_closed(connection: &quinn::Connection) -> Closed {
    let error = match tokio::time::timeout(Duration::from_secs(5), connection.closed()).await {
        Ok(error) => error,
        Err(_) => return Closed { refusal: None, text: "it stopped answering".to_owned() },
    };
    match error {
        quinn::ConnectionError::ApplicationClosed(close) => Closed {
            refusal: Refusal::from_code(close.error_code.into_inner()),
            text: String::from_utf8_lossy(&close.reason).into_owned(),
        },
        other => Closed { refusal: None, text: other.to_string() },
    }
}

/// Why the peer closed a connection: its refusal, when its close code is one, and its words.
struct Closed {
    refusal: Option<Refusal>,
    text: String,
}

impl std::fmt::Display for Closed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

#[derive(Default)]
struct Counters {
    chunks: AtomicU64,
    bytes: AtomicU64,
    /// Chunk bytes handed to the data streams (the two above count what was read).
    sent_bytes: AtomicU64,
    /// How far into the changed bytes the chunks sent have gone (see [`Positions`]).
    covered: AtomicU64,
    /// The changed bytes of the round.
    changed: AtomicU64,
}

/// A multi-consumer queue of batches for the data streams.
fn async_channel() -> (BatchSender, BatchReceiver) {
    let (tx, rx) = mpsc::channel(8);
    (BatchSender(tx), BatchReceiver(Arc::new(tokio::sync::Mutex::new(rx))))
}

/// A batch on its way to a data stream, and how far into the changed bytes the round is once it is
/// sent (see [`Positions`]).
struct Outgoing {
    batch: ferry_proto::ChunkBatch,
    covered: u64,
}

#[derive(Clone)]
struct BatchSender(mpsc::Sender<Outgoing>);
#[derive(Clone)]
struct BatchReceiver(Arc<tokio::sync::Mutex<mpsc::Receiver<Outgoing>>>);

impl BatchReceiver {
    async fn recv(&self) -> Result<Outgoing, ()> {
        self.0.lock().await.recv().await.ok_or(())
    }
}

/// Diffs the base (or nothing) against the new manifest and hands out changes in batches.
/// Returns the bytes of the files whose content changed.
fn send_changes(base: Option<&Path>, new: &Path, tx: &mpsc::Sender<Vec<Change>>) -> anyhow::Result<Positions> {
    let mut positions = Positions::default();
    // Compared as stored: an entry whose bytes did not change is not decoded (most of a day's tree).
    let old: Box<dyn Iterator<Item = Result<RawEntry, RecordFileError>>> = match base {
        Some(path) => Box::new(ManifestReader::open(path)?.raw()),
        None => Box::new(std::iter::empty()),
    };
    let mut batch = Vec::with_capacity(1024);
    for pair in diff(old, ManifestReader::open(new)?.raw()) {
        let pair = pair?;
        let path = pair.path().clone();
        let change = match (pair.old, pair.new) {
            (Some(old), Some(mut new)) if new.kind == EntryKind::File && old.same_content(&new) => {
                new.chunks.clear();
                Change { path, entry: Some(new), chunks_as_before: true }
            }
            (_, new) => {
                if let Some(entry) = new.as_ref().filter(|e| e.kind == EntryKind::File && e.hard_link_to.is_none()) {
                    positions.push(&path, entry.size);
                }
                Change { path, entry: new, chunks_as_before: false }
            }
        };
        batch.push(change);
        if batch.len() == 1024 {
            tx.blocking_send(std::mem::replace(&mut batch, Vec::with_capacity(1024)))
                .map_err(|_| anyhow!("connection closed"))?;
        }
    }
    if !batch.is_empty() {
        tx.blocking_send(batch).map_err(|_| anyhow!("connection closed"))?;
    }
    Ok(positions)
}

/// Where each file whose content changed starts in the round's changed bytes, in manifest order: the
/// destination asks for chunks in that order, so the chunks read tell how far the round is (for the
/// progress line's ETA). 16 bytes a file: a hash of its path and the bytes before it.
#[derive(Debug, Default)]
struct Positions {
    files: Vec<(u64, u64)>,
    total: u64,
}

impl Positions {
    fn push(&mut self, path: &ferry_engine::RelPath, size: u64) {
        self.files.push((path_key(path), self.total));
        self.total += size;
    }
}

fn path_key(path: &ferry_engine::RelPath) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    path.hash(&mut hasher);
    hasher.finish()
}

/// Follows the chunks read through [`Positions`], forward only.
struct PositionCursor {
    positions: Arc<Positions>,
    at: usize,
}

impl PositionCursor {
    /// How far into the changed bytes the round is once `need` is read, if its file is found in the
    /// next few thousand (a need for a file that is not there, which should not happen, costs a
    /// bounded search and moves nothing).
    fn advance(&mut self, need: &NeedChunk) -> Option<u64> {
        let key = path_key(&need.path);
        let mut ahead = self.positions.files.get(self.at..)?.iter().take(4096);
        let found = ahead.position(|(k, _)| *k == key)?;
        self.at += found;
        Some(self.positions.files[self.at].1 + need.offset + u64::from(need.len))
    }
}

/// Chunks gathered for one batch: their names and lengths, their bytes end to end, how far into the
/// changed bytes they reach, and how many bytes the reader had read when the first of them came.
struct PendingBatch {
    list: Vec<(ChunkHash, u32)>,
    data: Vec<u8>,
    /// Room made for `data` each time: a full batch, plus the chunk that fills it.
    capacity: usize,
    covered: u64,
    opened_at: u64,
}

impl PendingBatch {
    fn new(batch_bytes: usize) -> Self {
        let capacity = batch_bytes + (256 << 10);
        Self { list: Vec::new(), data: Vec::with_capacity(capacity), capacity, covered: 0, opened_at: 0 }
    }

    /// Records a chunk whose bytes were just appended to `data`.
    fn push(&mut self, need: &NeedChunk, reached: Option<u64>, read: u64) {
        if self.list.is_empty() {
            self.opened_at = read;
        }
        self.list.push((need.hash, need.len));
        if let Some(reached) = reached {
            self.covered = self.covered.max(reached);
        }
    }

    /// Sends what is gathered, if anything.
    fn send(
        &mut self,
        compress: bool,
        compressor: &mut zstd::bulk::Compressor<'_>,
        tx: &BatchSender,
    ) -> anyhow::Result<()> {
        if self.list.is_empty() {
            return Ok(());
        }
        let list = std::mem::take(&mut self.list);
        let data = std::mem::replace(&mut self.data, Vec::with_capacity(self.capacity));
        let batch = crate::chunks::encode_batch(list, data, compress, compressor);
        tx.0.blocking_send(Outgoing { batch, covered: self.covered }).map_err(|_| anyhow!("connection closed"))
    }
}

/// Reads the asked-for chunks from the source tree and queues them in batches; returns those that no
/// longer hash to what the scan saw.
///
/// Two batches fill side by side: chunks sent as they are, and chunks that compress. A batch is sent
/// when it is full, or when `2 × batch_bytes` have been read since its first chunk: the destination
/// applies files in the order it asked for them, so a text chunk must not wait behind megabytes of
/// BLOBs for its batch to fill (with a 48 MiB request, that wait held up the whole window for seconds
/// on a 100 Mbit/s link).
fn read_chunks(
    reader: &mut SourceChunks,
    chunks: Vec<NeedChunk>,
    tx: &BatchSender,
    counters: &Counters,
    cursor: &mut PositionCursor,
    stop: &std::sync::atomic::AtomicBool,
    batch_bytes: usize,
) -> anyhow::Result<Vec<ChunkHash>> {
    let mut compressor = zstd::bulk::Compressor::new(1)?;
    let mut missing = Vec::new();
    let mut batches = [PendingBatch::new(batch_bytes), PendingBatch::new(batch_bytes)];
    let mut read = 0u64;
    for need in chunks {
        if stop.load(Ordering::Relaxed) {
            return Ok(missing);
        }
        // Each chunk is read into the raw batch; one that compresses moves to the other.
        let [raw, text] = &mut batches;
        let start = raw.data.len();
        if !reader.read_into(&need, &mut raw.data) {
            missing.push(need.hash);
            continue;
        }
        counters.chunks.fetch_add(1, Ordering::Relaxed);
        counters.bytes.fetch_add(u64::from(need.len), Ordering::Relaxed);
        read += u64::from(need.len);
        let compress = crate::chunks::compressible(&raw.data[start..], &mut compressor);
        if compress {
            text.data.extend_from_slice(&raw.data[start..]);
            raw.data.truncate(start);
        }
        let reached = cursor.advance(&need);
        batches[usize::from(compress)].push(&need, reached, read);
        for (which, batch) in batches.iter_mut().enumerate() {
            let full = batch.data.len() >= batch_bytes;
            let overdue = !batch.list.is_empty() && read - batch.opened_at >= 2 * batch_bytes as u64;
            if full || overdue {
                batch.send(which == 1, &mut compressor, tx)?;
            }
        }
    }
    for (which, batch) in batches.iter_mut().enumerate() {
        batch.send(which == 1, &mut compressor, tx)?;
    }
    Ok(missing)
}

/// Progress while chunks flow: a live line on a terminal, a log line every `interval` otherwise (cron,
/// systemd), with the rate and an estimate of the time left.
fn spawn_progress(
    counters: Arc<Counters>,
    connection: quinn::Connection,
    limiter: crate::limit::Limiter,
    interval: Duration,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> tokio::task::JoinHandle<()> {
    use std::io::IsTerminal;
    crate::spawn_in_span(async move {
        let started = Instant::now();
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new_spinner();
            bar.set_style(
                indicatif::ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            );
            bar
        });
        let period = if bar.is_some() { Duration::from_millis(250) } else { interval };
        loop {
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = &mut stop => break,
            }
            let stats = connection.stats();
            let secs = started.elapsed().as_secs_f64().max(0.001);
            // A rate and a time left would be the pause's average, not what comes when it ends.
            let line = if limiter.is_paused() {
                format!(
                    "paused by the bandwidth limit: sent {} of chunks, {} on the wire so far",
                    crate::human::bytes(counters.sent_bytes.load(Ordering::Relaxed)),
                    crate::human::bytes(stats.udp_tx.bytes),
                )
            } else {
                format!(
                    "sent {} of chunks, {} on the wire, {}/s{}",
                    crate::human::bytes(counters.sent_bytes.load(Ordering::Relaxed)),
                    crate::human::bytes(stats.udp_tx.bytes),
                    crate::human::bytes((stats.udp_tx.bytes as f64 / secs) as u64),
                    eta(
                        counters.covered.load(Ordering::Relaxed),
                        counters.changed.load(Ordering::Relaxed),
                        started.elapsed()
                    )
                )
            };
            match &bar {
                Some(bar) => bar.set_message(line),
                None => tracing::info!("{line}"),
            }
        }
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
    })
}

/// "; 40% of the changed data, about 1h 20m left": how far the chunks read are into the changed files,
/// and that pace kept up. Empty until there is something to go by.
fn eta(covered: u64, changed: u64, elapsed: Duration) -> String {
    if covered == 0 || changed == 0 || elapsed < Duration::from_secs(3) {
        return String::new();
    }
    let done = (covered as f64 / changed as f64).min(1.0);
    let left = elapsed.as_secs_f64() * (1.0 - done) / done;
    format!(
        "; {:.0}% of the changed data, about {} left",
        done * 100.0,
        crate::human::duration(Duration::from_secs(left.round() as u64))
    )
}

/// Prints a round's report: one JSON object, or a summary for people.
pub fn print_push_report(report: &PushReport, json: bool) {
    if json {
        return print_json(report);
    }
    println!(
        "round {} of {} committed in {}: {} changes, {} files written on the destination",
        report.round,
        report.job,
        crate::human::duration(Duration::from_millis(report.duration_ms)),
        crate::human::count(report.changes),
        crate::human::count(report.files_changed)
    );
    println!(
        "  sent {} chunks ({}), {} on the wire; read {} here, scanned in {}",
        crate::human::count(report.chunks_sent),
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
    if report.failure_count > 0 {
        eprintln!("error: {} entries could not be applied on the destination:", report.failure_count);
        for failure in &report.failures {
            eprintln!("  {failure}");
        }
    }
    for notice in &report.notices {
        println!("  note: {notice}");
    }
    if report.skipped_count > 0 {
        eprintln!("error: {} entries of this tree were not carried (so it cannot match):", report.skipped_count);
        for skipped in &report.skipped {
            eprintln!("  {skipped}");
        }
    }
    println!(
        "  destination {} (root {})",
        if report.in_sync {
            "matches this tree"
        } else if report.skipped_count > 0 && report.failure_count == 0 {
            "does not match this tree: entries of it are not carried (listed above)"
        } else {
            "does not match yet: run the round again"
        },
        &report.root_hash[..8.min(report.root_hash.len())]
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng};

    fn need(path: &str, data: &[u8], offset: usize, len: usize) -> NeedChunk {
        let chunk = &data[offset..offset + len];
        NeedChunk {
            path: ferry_engine::RelPath::new(path).unwrap(),
            offset: offset as u64,
            len: len as u32,
            hash: ChunkHash::of(chunk),
        }
    }

    /// A chunk of a file untouched since before the scan is taken as the scan hashed it; a chunk of a
    /// file changed since is checked, and is missing when it no longer matches.
    #[test]
    fn only_files_changed_since_the_scan_are_hashed_again() {
        let dir = tempfile::tempdir().unwrap();
        let content = b"Subject: minutes\r\n\r\nAs agreed.\r\n".to_vec();
        std::fs::write(dir.path().join("mail"), &content).unwrap();
        let good = need("mail", &content, 0, content.len());
        // What the scan would have named, had the file held other bytes of the same length then.
        let stale = NeedChunk { hash: ChunkHash::of(b"something else"), ..good.clone() };

        // The scan began a minute after the file's last change.
        let later = SettledBefore::scan_at(std::time::SystemTime::now() + Duration::from_secs(60));
        let mut reader = SourceChunks::open(dir.path(), later).unwrap();
        assert_eq!(reader.read(&stale), Some(&content[..]), "a settled file's chunk is not hashed again");

        // The scan began before it.
        let mut reader = SourceChunks::open(dir.path(), SettledBefore::default()).unwrap();
        assert_eq!(reader.read(&stale), None, "a changed file's chunk is checked");
        assert_eq!(reader.read(&good), Some(&content[..]));
    }

    /// A text chunk asked for before megabytes of BLOB goes out after at most two batches of them, not
    /// at the end of the request: the destination applies files in the order it asked for them.
    #[test]
    fn a_text_chunk_does_not_wait_behind_the_blobs_for_its_batch_to_fill() {
        const BATCH: usize = 64 << 10;
        let dir = tempfile::tempdir().unwrap();
        let text = "Subject: the quarterly report\r\n\r\nPlease find it attached.\r\n".repeat(100).into_bytes();
        let mut blob = vec![0u8; 6 * BATCH];
        rand_chacha::ChaCha8Rng::seed_from_u64(7).fill(&mut blob[..]);
        std::fs::write(dir.path().join("text"), &text).unwrap();
        std::fs::write(dir.path().join("blob"), &blob).unwrap();

        let mut needs = vec![need("text", &text, 0, text.len())];
        needs.extend((0..6).map(|i| need("blob", &blob, i * BATCH, BATCH)));
        let (tx, rx) = async_channel();
        let mut cursor = PositionCursor { positions: Arc::default(), at: 0 };
        let stop = std::sync::atomic::AtomicBool::new(false);
        let mut reader = SourceChunks::open(dir.path(), SettledBefore::default()).unwrap();
        let missing = read_chunks(&mut reader, needs, &tx, &Counters::default(), &mut cursor, &stop, BATCH).unwrap();
        assert!(missing.is_empty());
        drop(tx);

        let mut rx = rx.0.try_lock().unwrap();
        let mut sent = Vec::new();
        while let Ok(Outgoing { batch, .. }) = rx.try_recv() {
            sent.push(batch.chunks.iter().map(|(hash, _)| *hash).collect::<Vec<_>>());
        }
        let text_hash = ChunkHash::of(&text);
        let text_at = sent.iter().position(|batch| batch.contains(&text_hash)).expect("the text chunk was sent");
        assert_eq!(sent.len(), 7, "six BLOB batches and the text's: {sent:?}");
        // Its batch opens at about 6 KiB read and is overdue 128 KiB later: after the second BLOB batch.
        assert_eq!(text_at, 2, "the text chunk went out in batch {text_at} of {}", sent.len());
    }
}
