//! `ferry sync --round JOB`: the source's side of a round, pushed to the job's peer.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use ferry_certs::Identity;
use ferry_engine::{ChunkHash, Entry, EntryKind, ManifestReader, RecordFileError, RootDir, ScanOptions, diff, scan};
use ferry_proto::{Change, ChangesEnd, Committed, Hello, Message, NeedChunk, PROTOCOL_VERSION, RoundOptions, RoundRef};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::config::ConfigDir;
use crate::net::{self, FrameReader};

/// What `sync --round JOB` was asked to do.
#[derive(Debug, Clone)]
pub struct PushOptions {
    /// The job.
    pub job: String,
    /// `--delete`.
    pub delete: bool,
    /// `--numeric-ids`.
    pub numeric_ids: bool,
    /// `--import`.
    pub import: ferry_proto::ImportMode,
    /// Wait for the import's result (not `--no-wait`).
    pub wait_for_import: bool,
    /// `--wait`: when the destination is busy with this job, wait instead of giving up.
    pub wait_if_busy: bool,
    /// `--bwlimit`: the most bytes per second this round puts on the network for chunk data, fixed or
    /// by the time of the week.
    pub bwlimit: ferry_engine::Timetable,
}

/// The report of a network round (`--json` prints it).
#[derive(Debug, Clone, Serialize)]
pub struct PushReport {
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
    /// Entries the destination could not apply.
    pub failures: Vec<String>,
    /// How many.
    pub failure_count: u64,
    /// How the destination's import of this round ended (when one ran and was waited for).
    pub import: Option<ferry_proto::ImportResult>,
    /// Wall time in milliseconds.
    pub duration_ms: u64,
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
    /// The scanned manifest becomes the base of the next round's changes.
    fn promote(&self, round: RoundRef) -> anyhow::Result<()> {
        std::fs::rename(self.scanned(), self.base())?;
        let tmp = self.dir.join("base.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec(&round)?)?;
        std::fs::rename(&tmp, self.dir.join("base.json"))?;
        Ok(())
    }
    fn forget_base(&self) {
        let _ = std::fs::remove_file(self.dir.join("base.json"));
    }
}

/// The rate the timetable gives for now, in local time.
fn rate_now(timetable: &ferry_engine::Timetable) -> ferry_engine::Rate {
    let now = jiff::ZonedDateTime::now();
    timetable.rate_at_time(now.weekday().to_monday_zero_offset() as u32, now.hour() as u32, now.minute() as u32)
}

fn describe_rate(rate: ferry_engine::Rate) -> String {
    match rate.bytes_per_second() {
        None => "off (unlimited)".to_owned(),
        Some(0) => "0 (paused)".to_owned(),
        Some(bps) => format!("{}/s", crate::human::bytes(bps)),
    }
}

/// The destination refused the round (busy, unknown job, ...).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Refused(String);

/// Runs one round of `options.job`; with `wait_if_busy`, waits while the destination is busy with it.
pub async fn push(config_dir: &ConfigDir, options: &PushOptions) -> anyhow::Result<PushReport> {
    loop {
        match push_once(config_dir, options).await {
            Err(e) if options.wait_if_busy && e.downcast_ref::<Refused>().is_some_and(|r| r.0.contains("running")) => {
                tracing::info!("{e}; trying again in 15 s (--wait)");
                tokio::time::sleep(Duration::from_secs(15)).await;
            }
            other => return other,
        }
    }
}

async fn push_once(config_dir: &ConfigDir, options: &PushOptions) -> anyhow::Result<PushReport> {
    let started = Instant::now();
    let config = config_dir.load()?;
    let identity = Identity::load(config_dir.path()).context("cannot load this node's identity (run `ferry init`)")?;
    let job = config
        .job(&options.job)
        .ok_or_else(|| {
            anyhow!("no job {:?} here (ferry job add {} --path SOURCE --peer PEER)", options.job, options.job)
        })?
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
    let _lock = ferry_engine::lock_state(&state.dir)?;

    tracing::info!(job = %job.name, "scanning {}", job.path.display());
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

    let remote = net::resolve(&addr)?;
    tracing::info!(job = %job.name, "connecting to {} ({}) at {remote}", peer.name, peer.id);
    let connection = net::connect(&identity, peer.id, remote)
        .await
        .map_err(|e| explain_connect_error(e, &peer.name, peer.id, &addr, identity.node_id()))?;
    let me = identity.node_id();
    let refused = |why: String| {
        if why.contains("not trusted") {
            explain_connect_error(anyhow!(why), &peer.name, peer.id, &addr, me)
        } else if let Some(reason) = why.strip_prefix("refused: ") {
            Refused(format!("{} refused the round: {reason}", peer.name)).into()
        } else {
            anyhow!("{} ended the round: {why}", peer.name)
        }
    };
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
    let options_message = Message::RoundOptions(RoundOptions { import: options.import });
    if net::send(&mut send, &Message::Hello(hello)).await.is_err()
        || net::send(&mut send, &options_message).await.is_err()
    {
        return Err(refused(why_closed(&connection).await));
    }
    let holds = loop {
        match reader.next().await {
            Ok(Some(Message::Welcome { holds })) => break holds,
            Ok(Some(Message::Notice { text })) => tracing::warn!("{}: {text}", peer.name),
            Ok(Some(Message::Refused { reason })) => {
                return Err(Refused(format!("{} refused the round: {reason}", peer.name)).into());
            }
            Ok(Some(other)) => bail!("{} answered {other:?} instead of Welcome", peer.name),
            Ok(None) | Err(_) => return Err(refused(why_closed(&connection).await)),
        }
    };

    // Changes since what the destination holds, when this node still has that manifest; else all.
    let delta_base = base.filter(|b| Some(*b) == holds);
    let (changes_tx, mut changes_rx) = mpsc::channel::<Vec<Change>>(4);
    let base_path = delta_base.map(|_| state.base());
    let scanned_path = state.scanned();
    let differ = tokio::task::spawn_blocking(move || send_changes(base_path.as_deref(), &scanned_path, &changes_tx));
    let mut change_count = 0u64;
    while let Some(batch) = changes_rx.recv().await {
        change_count += batch.len() as u64;
        net::send(&mut send, &Message::Changes(batch)).await?;
    }
    let changed_bytes = differ.await.context("the diff panicked")??;
    net::send(
        &mut send,
        &Message::ChangesEnd(ChangesEnd { base: delta_base, root: new_root, entries: scanned.entries }),
    )
    .await?;
    tracing::info!(job = %job.name, "{change_count} changes sent (against {:?})", delta_base.map(|b| b.round));

    // Serve the chunks the destination asks for, until it commits.
    let sent = Arc::new(Counters::default());
    let (batches_tx, batches_rx) = async_channel();
    let bucket =
        Arc::new(std::sync::Mutex::new(ferry_engine::TokenBucket::new(rate_now(&options.bwlimit), Instant::now())));
    // The timetable moves on while the round runs: look at the clock every 20 s.
    let timetable_task = {
        let (bucket, timetable) = (bucket.clone(), options.bwlimit.clone());
        tokio::spawn(async move {
            let mut current = rate_now(&timetable);
            loop {
                tokio::time::sleep(Duration::from_secs(20)).await;
                let rate = rate_now(&timetable);
                if rate != current {
                    tracing::info!("bandwidth limit now {}", describe_rate(rate));
                    current = rate;
                    if let Ok(mut bucket) = bucket.lock() {
                        bucket.set_rate(rate, Instant::now());
                    }
                }
            }
        })
    };
    let senders: Vec<_> = (0..4)
        .map(|_| {
            let connection = connection.clone();
            let rx = batches_rx.clone();
            let bucket = bucket.clone();
            tokio::spawn(async move {
                let mut stream = connection.open_uni().await?;
                while let Ok(batch) = rx.recv().await {
                    net::send_limited(&mut stream, &Message::ChunkBatch(batch), &bucket).await?;
                }
                let _ = stream.finish();
                anyhow::Ok(())
            })
        })
        .collect();
    drop(batches_rx);
    let (stop_progress, stop) = tokio::sync::oneshot::channel();
    let progress = spawn_progress(sent.clone(), connection.clone(), stop);
    let committed: Committed = loop {
        match reader.next().await {
            Ok(Some(Message::Need(chunks))) => {
                let root = job.path.clone();
                let tx = batches_tx.clone();
                let counters = sent.clone();
                let missing = tokio::task::spawn_blocking(move || read_chunks(&root, chunks, &tx, &counters))
                    .await
                    .context("reading chunks panicked")??;
                if !missing.is_empty() {
                    tracing::warn!("{} chunks could not be read (files changed since the scan)", missing.len());
                    net::send(&mut send, &Message::Missing(missing)).await?;
                }
            }
            Ok(Some(Message::Done)) => {}
            Ok(Some(Message::Committed(committed))) => break committed,
            Ok(Some(Message::Failed { reason })) => bail!("{} failed the round: {reason}", peer.name),
            Ok(Some(other)) => bail!("unexpected {other:?} from {}", peer.name),
            Ok(None) | Err(_) => {
                bail!("{} ended the round before committing it: {}", peer.name, why_closed(&connection).await)
            }
        }
    };
    drop(batches_tx);
    for sender in senders {
        let _ = sender.await;
    }
    let _ = stop_progress.send(());
    let _ = progress.await;
    timetable_task.abort();
    let _ = send.finish();
    // The destination runs its import now, if it has one; wait for its result unless told not to.
    let mut import = None;
    if options.wait_for_import {
        loop {
            match reader.next().await {
                Ok(Some(Message::ImportStarted { round, command })) => {
                    tracing::info!("{} imports round {round}: {}", peer.name, command.join(" "));
                }
                Ok(Some(Message::ImportDone(result))) => {
                    import = Some(result);
                    break;
                }
                Ok(Some(Message::Notice { text })) => tracing::warn!("{}: {text}", peer.name),
                Ok(Some(other)) => bail!("unexpected {other:?} from {} after the commit", peer.name),
                Ok(None) => break,
                Err(e) => {
                    bail!("lost {} while waiting for the import of round {}: {e:#}", peer.name, committed.round.round)
                }
            }
        }
    }
    let in_sync = committed.round.root == new_root;
    if in_sync {
        state.promote(committed.round)?;
    } else {
        state.forget_base();
    }
    let stats = connection.stats();
    connection.close(net::close::DONE.into(), b"round over");
    let history_path = state.dir.join("history.jsonl");
    let bytes_on_wire = stats.udp_tx.bytes + stats.udp_rx.bytes;
    let report = PushReport {
        job: job.name,
        round: committed.round.round,
        root_hash: committed.round.root.to_string(),
        in_sync,
        entries: scanned.entries,
        changes: change_count,
        files_changed: committed.files_written,
        changed_bytes,
        bytes_read: scanned.bytes_read,
        chunks_sent: sent.chunks.load(Ordering::Relaxed),
        chunk_bytes: sent.bytes.load(Ordering::Relaxed),
        bytes_on_wire,
        bytes_lost: stats.path.lost_bytes,
        failures: committed.failures,
        failure_count: committed.failure_count,
        import,
        duration_ms: started.elapsed().as_millis() as u64,
    };
    crate::history::append(&history_path, &crate::history::Record::pushed(&report, &peer.name))?;
    Ok(report)
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
async fn why_closed(connection: &quinn::Connection) -> String {
    let error = match tokio::time::timeout(Duration::from_secs(5), connection.closed()).await {
        Ok(error) => error,
        Err(_) => return "it stopped answering".to_owned(),
    };
    match error {
        quinn::ConnectionError::ApplicationClosed(close) => String::from_utf8_lossy(&close.reason).into_owned(),
        other => other.to_string(),
    }
}

#[derive(Default)]
struct Counters {
    chunks: AtomicU64,
    bytes: AtomicU64,
}

/// A multi-consumer queue of batches for the data streams.
fn async_channel() -> (BatchSender, BatchReceiver) {
    let (tx, rx) = mpsc::channel(8);
    (BatchSender(tx), BatchReceiver(Arc::new(tokio::sync::Mutex::new(rx))))
}

#[derive(Clone)]
struct BatchSender(mpsc::Sender<ferry_proto::ChunkBatch>);
#[derive(Clone)]
struct BatchReceiver(Arc<tokio::sync::Mutex<mpsc::Receiver<ferry_proto::ChunkBatch>>>);

impl BatchReceiver {
    async fn recv(&self) -> Result<ferry_proto::ChunkBatch, ()> {
        self.0.lock().await.recv().await.ok_or(())
    }
}

/// Diffs the base (or nothing) against the new manifest and hands out changes in batches.
/// Returns the bytes of the files whose content changed.
fn send_changes(base: Option<&Path>, new: &Path, tx: &mpsc::Sender<Vec<Change>>) -> anyhow::Result<u64> {
    let mut changed_bytes = 0u64;
    let old: Box<dyn Iterator<Item = Result<Entry, RecordFileError>>> = match base {
        Some(path) => Box::new(ManifestReader::open(path)?),
        None => Box::new(std::iter::empty()),
    };
    let mut batch = Vec::with_capacity(1024);
    for pair in diff(old, ManifestReader::open(new)?) {
        let pair = pair?;
        let path = pair.path().clone();
        let change = match (pair.old, pair.new) {
            (Some(old), Some(mut new)) if new.kind == EntryKind::File && old.same_content(&new) => {
                new.chunks.clear();
                Change { path, entry: Some(new), chunks_as_before: true }
            }
            (_, new) => {
                if let Some(entry) = new.as_ref().filter(|e| e.kind == EntryKind::File && e.hard_link_to.is_none()) {
                    changed_bytes += entry.size;
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
    Ok(changed_bytes)
}

/// Chunks gathered for one batch: their names and lengths, and their bytes end to end.
type PendingBatch = (Vec<(ChunkHash, u32)>, Vec<u8>);

/// Reads the asked-for chunks from the source tree and queues them in batches; returns those that no
/// longer hash to what the scan saw.
fn read_chunks(
    root: &Path,
    chunks: Vec<NeedChunk>,
    tx: &BatchSender,
    counters: &Counters,
) -> anyhow::Result<Vec<ChunkHash>> {
    use std::os::unix::fs::FileExt;
    let root = RootDir::open(root).with_context(|| format!("cannot open {}", root.display()))?;
    let mut compressor = zstd::bulk::Compressor::new(1)?;
    let mut missing = Vec::new();
    let mut open: Option<(ferry_engine::RelPath, std::fs::File)> = None;
    // Two batches fill side by side: chunks that compress, and chunks sent as they are.
    let mut batches: [PendingBatch; 2] = Default::default();
    let mut buf = Vec::new();
    for need in chunks {
        if need.len as usize > (16 << 20) {
            missing.push(need.hash);
            continue;
        }
        if open.as_ref().is_none_or(|(p, _)| *p != need.path) {
            open = root.open_file(&need.path).ok().map(|f| (need.path.clone(), f));
        }
        buf.resize(need.len as usize, 0);
        let ok = match &open {
            Some((_, file)) => file.read_exact_at(&mut buf, need.offset).is_ok(),
            None => false,
        };
        if !ok || ChunkHash::of(&buf) != need.hash {
            missing.push(need.hash);
            continue;
        }
        counters.chunks.fetch_add(1, Ordering::Relaxed);
        counters.bytes.fetch_add(u64::from(need.len), Ordering::Relaxed);
        let which = usize::from(crate::chunks::compressible(&buf, &mut compressor));
        let (list, data) = &mut batches[which];
        list.push((need.hash, need.len));
        data.extend_from_slice(&buf);
        if data.len() >= crate::chunks::BATCH_BYTES {
            let (list, data) = (std::mem::take(list), std::mem::take(data));
            let batch = crate::chunks::encode_batch(list, data, which == 1, &mut compressor);
            tx.0.blocking_send(batch).map_err(|_| anyhow!("connection closed"))?;
        }
    }
    for (which, (list, data)) in batches.into_iter().enumerate() {
        if !list.is_empty() {
            let batch = crate::chunks::encode_batch(list, data, which == 1, &mut compressor);
            tx.0.blocking_send(batch).map_err(|_| anyhow!("connection closed"))?;
        }
    }
    Ok(missing)
}

/// Progress while chunks flow: a live line on a terminal, a log line every 10 s otherwise (cron).
fn spawn_progress(
    counters: Arc<Counters>,
    connection: quinn::Connection,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> tokio::task::JoinHandle<()> {
    use std::io::IsTerminal;
    tokio::spawn(async move {
        let started = Instant::now();
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new_spinner();
            bar.set_style(
                indicatif::ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            );
            bar
        });
        let period = if bar.is_some() { Duration::from_millis(250) } else { Duration::from_secs(10) };
        loop {
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = &mut stop => break,
            }
            let stats = connection.stats();
            let secs = started.elapsed().as_secs_f64().max(0.001);
            let line = format!(
                "sent {} chunks ({}), {} on the wire, {}/s",
                crate::human::count(counters.chunks.load(Ordering::Relaxed)),
                crate::human::bytes(counters.bytes.load(Ordering::Relaxed)),
                crate::human::bytes(stats.udp_tx.bytes),
                crate::human::bytes((stats.udp_tx.bytes as f64 / secs) as u64)
            );
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

/// Prints a round's report: one JSON object, or a summary for people.
pub fn print_push_report(report: &PushReport, json: bool) {
    if json {
        match serde_json::to_string_pretty(report) {
            Ok(text) => println!("{text}"),
            Err(e) => eprintln!("ferry: cannot print the report: {e}"),
        }
        return;
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
        "  sent {} chunks ({}), {} on the wire; read {} here",
        crate::human::count(report.chunks_sent),
        crate::human::bytes(report.chunk_bytes),
        crate::human::bytes(report.bytes_on_wire),
        crate::human::bytes(report.bytes_read)
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
                import.exit_code.map_or("none: killed or timed out".to_owned(), |c| c.to_string())
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
    println!(
        "  destination {} (root {})",
        if report.in_sync { "matches this tree" } else { "does not match yet: run the round again" },
        &report.root_hash[..8.min(report.root_hash.len())]
    );
}
