//! `ferry serve`: the destination daemon, and the destination's side of a round.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use ferry_certs::{Identity, NodeId, TrustedPeers};
use ferry_engine::{
    Adopt, Applier, ApplyOptions, ApplyReport, CheckOptions, Checked, ChunkBuf, ChunkHash, ChunkIndex, ChunkLocation,
    ChunkRef, ChunkSource, Entry, EntryKind, FetchError, Fetched, Finding, LARGE_FILE, ManifestReader, ManifestWriter,
    MergeJoin, Pair, RawEntry, RecordFileError, RecordReader, RecordWriter, RootHash, ScanOptions, Step, check_target,
    lap, with_findings,
};
use ferry_proto::window::{Arrival, Ledger, StallTimer, WindowEnd};
use ferry_proto::{Change, Committed, DestinationRound, Hello, Message, NeedChunk, ProtocolError, Refusal, RoundRef};
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::config::{Config, ConfigDir, DEFAULT_PORT, JobConfig, PeerConfig};
use crate::net::{self, FrameReader, close};
use crate::refused::Refused;

/// How many chunk bytes a round holds in memory at most: asked for and not yet applied, or applied and
/// not yet flushed (48 MiB is about a bandwidth-delay product of 1 Gbit/s at 400 ms).
const WINDOW_MAX: u64 = 48 << 20;
/// Applied chunk bytes that make a flush due before its time (so that a fast transfer does not wait
/// for the clock to free memory).
const FLUSH_BYTES: u64 = 16 << 20;
/// How often a flush begins. What was applied is durable by the next one, so a crash of this node
/// costs at most about twice this of the transfer.
const FLUSH_EVERY: Duration = Duration::from_millis(250);
/// How many entries wait for their chunks at most.
const WINDOW_ENTRIES: usize = 20_000;
/// A source that sends nothing for this long loses its round (`serve --stall-timeout`): a stalled
/// or hostile peer must not hold a job, and the deadline is this node's, not the peer's.
pub(crate) const STALL_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs the daemon until `shutdown` completes.
pub async fn serve(
    config_dir: ConfigDir,
    listen: Option<String>,
    stall_timeout: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let daemon = Daemon::bind(config_dir, listen, stall_timeout)?;
    println!("listening on {} as node {}", daemon.local_addr()?, daemon.node_id);
    daemon.run(shutdown).await
}

/// The destination daemon, bound to its address.
pub struct Daemon {
    endpoint: quinn::Endpoint,
    context: Arc<ServerContext>,
    node_id: NodeId,
}

impl Daemon {
    /// Binds the daemon's endpoint (`listen`, else the config's, else `[::]:7373`); a source that sends
    /// nothing for `stall_timeout` loses its round (`serve --stall-timeout`, 2 minutes by default).
    pub fn bind(config_dir: ConfigDir, listen: Option<String>, stall_timeout: Duration) -> anyhow::Result<Self> {
        let config = config_dir.load()?;
        let identity =
            Identity::load(config_dir.path()).context("cannot load this node's identity (run `ferry init`)")?;
        let listen = listen.or(config.listen.clone()).unwrap_or_else(|| format!("[::]:{DEFAULT_PORT}"));
        let addr = net::resolve(&listen)?;
        let trusted: TrustedPeers = Arc::new(RwLock::new(config.peers.iter().map(|p| p.id).collect()));
        let endpoint = net::server_endpoint(&identity, trusted.clone(), addr)?;
        let context = Arc::new(ServerContext {
            config_dir,
            trusted,
            busy: Mutex::new(HashMap::new()),
            imports: Arc::new(Mutex::new(HashMap::new())),
            early_checks: Arc::new(Mutex::new(HashMap::new())),
            stall_timeout,
        });
        Ok(Self { endpoint, context, node_id: identity.node_id() })
    }

    /// Where it listens.
    pub fn local_addr(&self) -> anyhow::Result<std::net::SocketAddr> {
        Ok(self.endpoint.local_addr()?)
    }

    /// Serves rounds until `shutdown` completes.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
        let Self { endpoint, context, node_id } = self;
        tracing::info!("node {node_id} listening on {}", endpoint.local_addr()?);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                incoming = endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    // Peers trusted since the daemon started are let in without a restart.
                    context.refresh_trusted();
                    let context = context.clone();
                    tokio::spawn(async move {
                        let remote = incoming.remote_address();
                        match incoming.await {
                            Ok(connection) => handle_connection(connection, context).await,
                            Err(e) => {
                                let text = e.to_string();
                                match text.split("node ").nth(1).and_then(|r| r.split_whitespace().next()) {
                                    Some(id) if text.contains("not trusted") => tracing::warn!(
                                        "refused node {id} from {remote}: it is not trusted here (to allow it: ferry trust {id} --name NAME)"
                                    ),
                                    _ => tracing::warn!("connection attempt from {remote} failed: {text}"),
                                }
                            }
                        }
                    });
                }
            }
        }
        tracing::info!("shutting down");
        endpoint.close(Refusal::ShuttingDown.code().into(), b"the destination is shutting down");
        endpoint.wait_idle().await;
        Ok(())
    }
}

struct ServerContext {
    config_dir: ConfigDir,
    trusted: TrustedPeers,
    /// Jobs with a round running: who runs it, on which connection.
    busy: Mutex<HashMap<String, (NodeId, quinn::Connection)>>,
    /// Jobs whose import is running: which round, since when.
    imports: Imports,
    /// Checks of jobs' targets begun when their sources asked whether a round would be taken.
    early_checks: EarlyChecks,
    /// See [`STALL_TIMEOUT`].
    stall_timeout: Duration,
}

/// A check of a job's target begun when its source asked whether it would take a round (before the
/// source's export hook, and again right before its scan): it runs while the source scans, and the
/// round that follows takes it instead of checking at its own start, if it began at most
/// [`EARLY_CHECK_MAX_AGE`] before and against the round the destination still holds.
struct EarlyCheck {
    started: Instant,
    holds: Option<RoundRef>,
    adopt: bool,
    thread: std::thread::JoinHandle<Result<ferry_engine::CheckReport, ferry_engine::CheckError>>,
}

type EarlyChecks = Arc<Mutex<HashMap<String, EarlyCheck>>>;

/// How old a check begun before the round may be for the round to take it: what changes in the
/// target between the check and the round is found by the next round's check.
const EARLY_CHECK_MAX_AGE: Duration = Duration::from_secs(10 * 60);

impl ServerContext {
    /// Begins checking `job`'s target on a thread of its own, unless a check of it runs already or
    /// it has never had a round (nothing to check).
    fn begin_early_check(&self, job: &JobConfig, state: &TargetState, holds: Option<RoundRef>) {
        if holds.is_none() {
            return;
        }
        let Ok(mut checks) = self.early_checks.lock() else { return };
        if checks.get(&job.name).is_some_and(|c| !c.thread.is_finished()) {
            return;
        }
        let adopt = ferry_engine::TargetIdentity::read(&state.identity(), &job.path).changed;
        let (target, committed, findings) = (job.path.clone(), state.manifest(), state.early_findings());
        let index_path = state.dir.join("chunks.redb");
        let span = tracing::Span::current();
        let thread = std::thread::Builder::new().name("ferry-early-check".into()).spawn(move || {
            let _entered = span.enter();
            // The round waits for this thread before it opens the index itself.
            let mut index = ChunkIndex::open(&index_path).map_err(ferry_engine::CheckError::from)?;
            let options = CheckOptions { adopt, read_only: false };
            let report = check_target(&target, &committed, &mut index, &findings, options)?;
            let ms = report.duration.as_millis();
            tracing::info!("checked {} entries of {} in {ms} ms", report.entries, target.display());
            Ok(report)
        });
        match thread {
            Ok(thread) => {
                checks.insert(job.name.clone(), EarlyCheck { started: Instant::now(), holds, adopt, thread });
            }
            Err(e) => tracing::warn!("cannot begin checking {} early: {e}", job.path.display()),
        }
    }

    /// The early check of `job`, finished, if the round can take it (see [`EarlyCheck`]).
    fn take_early_check(
        checks: &EarlyChecks,
        job: &str,
        holds: Option<RoundRef>,
        adopt: bool,
    ) -> Option<ferry_engine::CheckReport> {
        let early = checks.lock().ok()?.remove(job)?;
        let usable = early.holds == holds && early.adopt == adopt && early.started.elapsed() < EARLY_CHECK_MAX_AGE;
        // Waited for in any case: it holds the job's index.
        match early.thread.join() {
            Ok(Ok(report)) if usable => Some(report),
            Ok(Err(e)) => {
                tracing::warn!("the check begun before the round failed ({e}); checking again");
                None
            }
            _ => None,
        }
    }
}

impl ServerContext {
    fn refresh_trusted(&self) {
        match self.config_dir.load() {
            Ok(config) => {
                if let Ok(mut trusted) = self.trusted.write() {
                    *trusted = config.peers.iter().map(|p| p.id).collect();
                }
            }
            Err(e) => tracing::warn!("cannot re-read the config, keeping the peers trusted so far: {e:#}"),
        }
    }
}

/// Releases a job's busy mark when the round ends, however it ends.
struct BusyGuard(Arc<ServerContext>, String, usize);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        if let Ok(mut busy) = self.0.busy.lock()
            && busy.get(&self.1).is_some_and(|(_, c)| c.stable_id() == self.2)
        {
            busy.remove(&self.1);
        }
    }
}

impl ServerContext {
    /// Refuses a round of `job` while its import runs, saying which and since when.
    fn no_import(&self, job: &str) -> Result<(), Refused> {
        match self.imports.lock().ok().and_then(|i| i.get(job).cloned()) {
            Some(import) => Err(Refused::new(
                Refusal::ImportRunning,
                format!(
                    "the import of round {} of job {job} has been running since {} ({})",
                    import.round,
                    humantime::format_rfc3339_seconds(import.since),
                    import.command.join(" ")
                ),
            )),
            None => Ok(()),
        }
    }

    /// Why a round of `job` from `peer` would be refused now, without claiming it: an import runs, or
    /// another peer's round. A round of the same peer would replace its own (see [`Self::claim`]).
    fn busy_for(&self, job: &str, peer: NodeId) -> Result<(), Refused> {
        self.no_import(job)?;
        let busy = self.busy.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match busy.get(job) {
            Some((holder, _)) if *holder != peer => Err(already_running(job)),
            _ => Ok(()),
        }
    }

    /// Marks `job` busy for this connection. When the same peer is still running it on another
    /// connection, that one is presumed dead (a killed or cut-off source whose connection has not timed
    /// out yet): it is closed, and this round waits for it to let go.
    async fn claim(
        self: &Arc<Self>,
        job: &str,
        peer: NodeId,
        connection: &quinn::Connection,
    ) -> Result<BusyGuard, Refused> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            self.no_import(job)?;
            {
                let mut busy = self.busy.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                match busy.get(job) {
                    None => {
                        busy.insert(job.to_owned(), (peer, connection.clone()));
                        return Ok(BusyGuard(self.clone(), job.to_owned(), connection.stable_id()));
                    }
                    Some((holder, old)) if *holder == peer => {
                        tracing::info!("job {job}: a new connection from the same peer replaces the round still open");
                        old.close(Refusal::Replaced.code().into(), b"replaced by a new connection from the same peer");
                    }
                    Some(_) => return Err(already_running(job)),
                }
            }
            if Instant::now() > deadline {
                return Err(Refused::new(
                    Refusal::Busy,
                    format!("the previous round of job {job} did not stop in time"),
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Another peer's round holds `job`.
fn already_running(job: &str) -> Refused {
    Refused::new(Refusal::Busy, format!("a round of job {job} is already running here"))
}

async fn handle_connection(connection: quinn::Connection, context: Arc<ServerContext>) {
    let Some(peer_id) = net::peer_id(&connection) else {
        connection.close(close::ERROR.into(), b"no peer identity");
        return;
    };
    let span = tracing::info_span!(
        "round",
        peer = tracing::field::Empty,
        job = tracing::field::Empty,
        round = tracing::field::Empty
    );
    async move { finish_round(&connection, round(&connection, peer_id, context).await, peer_id).await }
        .instrument(span)
        .await;
}

/// Closes a round's connection: after the source has read the last messages, or at once with the error.
async fn finish_round(connection: &quinn::Connection, result: anyhow::Result<()>, peer_id: NodeId) {
    let remote = connection.remote_address();
    match result {
        Ok(()) => {
            // Let the source read the last messages and close first.
            let _ = tokio::time::timeout(Duration::from_secs(5), connection.closed()).await;
            connection.close(close::DONE.into(), b"round over");
        }
        Err(e) => {
            let reason = crate::describe(&e);
            tracing::warn!("round from {remote} (node {peer_id}) failed: {reason}");
            // A refusal's code says why without words; its text is the details alone.
            let (code, text) = match e.downcast_ref::<Refused>() {
                Some(refused) => (refused.refusal.code(), refused.text.as_str()),
                None if e.downcast_ref::<ProtocolError>().is_some() => {
                    (Refusal::ProtocolViolation.code(), reason.as_str())
                }
                None => (close::ERROR, reason.as_str()),
            };
            connection.close(code.into(), &text.as_bytes()[..text.len().min(1000)]);
        }
    }
}

/// The job named `name`, when it is `peer`'s; else why not, in the words the source prints.
fn job_of_peer(config: &Config, name: &str, peer: &PeerConfig) -> Result<JobConfig, Refused> {
    match config.job(name) {
        Some(job) if job.peer == peer.name => Ok(job.clone()),
        Some(job) => Err(Refused::new(
            Refusal::NotYourJob,
            format!("job {:?} belongs to peer {} here, not to {}", job.name, job.peer, peer.name),
        )),
        None => Err(Refused::new(
            Refusal::NotYourJob,
            format!(
                "there is no job {name:?} here (on the destination: ferry job add {name} --path TARGET --peer {})",
                peer.name
            ),
        )),
    }
}

/// Answers a source's `Check`: whether a round of `job` from it would be accepted now (the job is this
/// peer's, and neither an import nor another peer's round holds it), without opening one.
async fn answer_check(
    context: &Arc<ServerContext>,
    config: &Config,
    peer: &PeerConfig,
    peer_id: NodeId,
    job: &str,
    mut send: quinn::SendStream,
) -> anyhow::Result<()> {
    tracing::Span::current().record("job", job);
    let answer = job_of_peer(config, job, peer).and_then(|job| context.busy_for(&job.name, peer_id).map(|()| job));
    let message = match answer {
        Ok(job_config) => {
            let state = TargetState::new(&context.config_dir.data_dir(config), &job_config.name);
            match state.holds() {
                Ok(holds) => {
                    tracing::info!("{} checked job {job}: a round would be accepted", peer.name);
                    // The source exports and scans now: the target is checked meanwhile.
                    context.begin_early_check(&job_config, &state, holds);
                    Message::Welcome { holds }
                }
                // Not a refusal: the round itself will meet it and say so.
                Err(e) => Message::Failed { reason: format!("cannot read the state of job {job}: {e:#}") },
            }
        }
        Err(refused) => {
            tracing::info!("{} checked job {job}: a round would be refused: {refused}", peer.name);
            Message::Refused { refusal: refused.refusal, reason: refused.text }
        }
    };
    net::send(&mut send, &message).await?;
    let _ = send.finish();
    Ok(())
}

async fn round(connection: &quinn::Connection, peer_id: NodeId, context: Arc<ServerContext>) -> anyhow::Result<()> {
    let config = context.config_dir.load()?;
    let peer = config
        .peer_by_id(peer_id)
        .ok_or_else(|| Refused::new(Refusal::Untrusted, format!("node {peer_id} is no longer trusted")))?
        .clone();
    tracing::Span::current().record("peer", peer.name.as_str());
    tracing::info!("connection from {} ({peer_id}) at {}", peer.name, connection.remote_address());
    let (mut send, recv) = connection.accept_bi().await.context("the peer opened no stream")?;
    let mut reader = FrameReader::new(recv);
    let mut order = DestinationRound::default();
    let hello = match reader.next().await? {
        Some(message @ Message::Hello(_)) => {
            order.handle(&message)?;
            let Message::Hello(hello) = message else { unreachable!("matched above") };
            hello
        }
        Some(Message::Check { job }) => return answer_check(&context, &config, &peer, peer_id, &job, send).await,
        other => bail!("expected Hello, got {other:?}"),
    };
    let refuse = |mut send: quinn::SendStream, refused: Refused| async move {
        let message = Message::Refused { refusal: refused.refusal, reason: refused.text.clone() };
        net::send(&mut send, &message).await?;
        let _ = send.finish();
        tokio::time::sleep(Duration::from_millis(200)).await;
        Err(refused.into())
    };
    let job = match job_of_peer(&config, &hello.job, &peer) {
        Ok(job) => job,
        Err(refused) => return refuse(send, refused).await,
    };
    let _guard = match context.claim(&job.name, peer_id, connection).await {
        Ok(guard) => guard,
        Err(refused) => return refuse(send, refused).await,
    };
    tracing::Span::current().record("job", job.name.as_str());
    tracing::info!("round from {} into {}", peer.name, job.path.display());

    let data_dir = context.config_dir.data_dir(&config);
    let (to_net, mut outbox) = mpsc::channel::<Message>(64);
    let (inbox_tx, inbox) = mpsc::channel::<Message>(64);
    // Chunks beyond the memory budget (one file larger than the window) wait in a file in this job's
    // state folder, on the destination's disk.
    let window = Arc::new(Window::spilling_into(TargetState::new(&data_dir, &job.name).dir));

    // Control stream: the round thread's messages out, the source's messages in (order checked).
    let writer = tokio::spawn(async move {
        while let Some(message) = outbox.recv().await {
            net::send(&mut send, &message).await?;
        }
        let _ = send.finish();
        anyhow::Ok(())
    });
    let stall_timeout = context.stall_timeout;
    let control_window = window.clone();
    let control = tokio::spawn(async move {
        loop {
            // Until all changes are in, the source has no reason to be silent: a stalled peer must not
            // hold the job. Bytes count, not whole messages: under a slow limit one message of the list
            // takes minutes. A paused source says so every second. (During the transfer, silence on
            // this stream is normal.)
            let next = if order.phase() == ferry_proto::Phase::Changes {
                match reader.next_within(stall_timeout).await {
                    Err(e) if e.is::<net::Silent>() => {
                        bail!("the source sent nothing for {} s", stall_timeout.as_secs())
                    }
                    next => next?,
                }
            } else {
                reader.next().await?
            };
            let Some(message) = next else { break };
            order.handle(&message)?;
            // The window learns at once what will not come: a large file being built waits in it.
            // `Missing` is only the window's business; the round thread also ends on a stop or a failure.
            let message = match message {
                Message::Missing(hashes) => {
                    control_window.missing(hashes);
                    continue;
                }
                Message::Paused => {
                    control_window.paused();
                    continue;
                }
                message => message,
            };
            match &message {
                Message::Stop { batches, .. } => control_window.stopped(*batches),
                Message::Failed { reason } => control_window.fail(format!("the source gave up: {reason}")),
                _ => {}
            }
            if inbox_tx.send(message).await.is_err() {
                break;
            }
        }
        anyhow::Ok(())
    });
    // Data streams: chunk batches, checked and decoded as they arrive, at most as fast as this peer's
    // `receive_bwlimit` allows (reading slower makes QUIC's flow control slow the sender down).
    let receive_limit = match &peer.receive_bwlimit {
        Some(text) => Some(
            ferry_engine::Timetable::parse(text)
                .with_context(|| format!("the receive_bwlimit of peer {} in ferry.toml", peer.name))?,
        ),
        None => None,
    };
    let limiter = receive_limit.map(crate::limit::Limiter::new);
    let follow = limiter.as_ref().map(|l| l.follow("receive limit"));
    if let Some(bps) = limiter.as_ref().and_then(|l| l.rate().bytes_per_second()) {
        connection.set_receive_window((2 * bps).clamp(2 << 20, 64 << 20).try_into().unwrap_or(quinn::VarInt::MAX));
        tracing::info!("receiving at most {}/s from {}", crate::human::bytes(bps), peer.name);
    }
    let data = tokio::spawn(receive_chunks(connection.clone(), window.clone(), limiter).in_current_span());

    let target = job.path.clone();
    let imports = context.imports.clone();
    let early_checks = context.early_checks.clone();
    let peer_name = peer.name.clone();
    let span = tracing::Span::current();
    let failed_tx = to_net.clone();
    let result = tokio::task::spawn_blocking(move || {
        let _entered = span.enter();
        let round = Round {
            job: &job,
            data_dir: &data_dir,
            hello: &hello,
            peer: &peer_name,
            imports: &imports,
            early_checks: &early_checks,
            stall_timeout: context.stall_timeout,
        };
        destination_round(&round, inbox, to_net, &window).map_err(|e| {
            // A refusal stays one: its code goes to the source as it is.
            if is_refusal(&e) {
                return e;
            }
            let target = job.path.display();
            e.context(format!(
                "the round into {target} failed (the files that arrived whole are kept; run it again once this is fixed)"
            ))
        })
    })
    .await
    .context("the round thread panicked")?;
    // Why the round failed goes to the source on the control stream, which delivers it: the close of
    // the connection is sent once, and a source that misses it sees a reset and no reason. The source
    // closes once it has read it.
    let failed = result.as_ref().err().filter(|e| !is_refusal(e));
    if let Some(e) = failed {
        let _ = failed_tx.send(Message::Failed { reason: crate::describe(e) }).await;
    }
    drop(failed_tx);
    let _ = writer.await;
    if failed.is_some() {
        let _ = tokio::time::timeout(Duration::from_secs(2), connection.closed()).await;
    }
    // A malformed or out-of-order message ends the control stream first: its error says why the
    // round ended, not the round thread's "the connection closed".
    let control_error = if control.is_finished() {
        control.await.ok().and_then(Result::err)
    } else {
        control.abort();
        None
    };
    data.abort();
    if let Some(follow) = follow {
        follow.abort();
    }
    let result = match (result, control_error) {
        (Err(_), Some(e)) => Err(e),
        (result, _) => result,
    };
    match result? {
        RoundEnd::Committed(done) => {
            tracing::info!("round {} into {} done, root {}", done.round, target.display(), done.root.short());
        }
        RoundEnd::Stopped(reason) => {
            tracing::info!(
                "round into {} stopped by the source ({reason}); the files that arrived whole are kept",
                target.display()
            );
            let text = format!("stopped: {reason}; the files that arrived whole are kept for the next round");
            connection.close(close::DONE.into(), text.as_bytes());
        }
        RoundEnd::Planned => tracing::info!("dry run for {} planned", target.display()),
    }
    Ok(())
}

/// The round's check of its target: taken from the one begun while the source scanned, or running.
enum Check {
    Done(ferry_engine::CheckReport),
    Running(std::thread::JoinHandle<Result<ferry_engine::CheckReport, ferry_engine::CheckError>>),
}

/// How a destination round ended.
enum RoundEnd {
    /// Committed as this round.
    Committed(RoundRef),
    /// The source stopped it (its deadline): what arrived was applied, nothing committed.
    Stopped(String),
    /// A dry run: planned, nothing written.
    Planned,
}

/// The chunks of the window in flight, shared between the network tasks and the round thread.
#[derive(Default)]
struct Window {
    state: Mutex<WindowState>,
    changed: Condvar,
    /// Bytes read from the data streams, whole batches or not: under a slow limit one batch takes
    /// longer than the stall timeout, and its bytes show that the source is alive.
    bytes_arrived: Arc<AtomicU64>,
}

/// Where an arrived chunk waits: in memory, or (past [`WINDOW_MAX`] in memory, which only a file
/// larger than the window reaches) in the spill file.
enum Stored {
    Memory(Bytes),
    Spilled {
        offset: u64,
        len: u32,
    },
    /// Written into a large file being built (see `ChunkSource::written`).
    Written {
        file: Arc<std::fs::File>,
        offset: u64,
        len: u32,
    },
}

/// The spill file: created on first use, emptied when nothing in it is waiting any more.
#[derive(Default)]
struct Spill {
    dir: PathBuf,
    file: Option<std::fs::File>,
    end: u64,
    waiting: usize,
}

impl Spill {
    fn put(&mut self, data: &[u8]) -> std::io::Result<Stored> {
        use std::os::unix::fs::FileExt;
        if self.file.is_none() {
            std::fs::create_dir_all(&self.dir)?;
            self.file = Some(tempfile::tempfile_in(&self.dir)?);
        }
        let Some(file) = &self.file else { unreachable!("created above") };
        file.write_all_at(data, self.end)?;
        let stored = Stored::Spilled { offset: self.end, len: data.len() as u32 };
        self.end += data.len() as u64;
        self.waiting += 1;
        Ok(stored)
    }

    fn release(&mut self) {
        self.waiting = self.waiting.saturating_sub(1);
        if self.waiting == 0 && self.end > 0 {
            if let Some(file) = &self.file {
                let _ = file.set_len(0);
            }
            self.end = 0;
        }
    }
}

#[derive(Default)]
struct WindowState {
    /// What was asked for, what will not come, what came unasked, whether the source stopped.
    ledger: Ledger,
    chunks: HashMap<ChunkHash, Stored>,
    /// Bytes of `chunks` in memory.
    memory: u64,
    spill: Spill,
    /// Set when the data streams fail, or the source floods the window.
    error: Option<String>,
}

async fn receive_chunks(connection: quinn::Connection, window: Arc<Window>, limiter: Option<crate::limit::Limiter>) {
    loop {
        let stream = match connection.accept_uni().await {
            Ok(stream) => stream,
            Err(e) => return window.fail(format!("the connection ended: {e}")),
        };
        let window = window.clone();
        let limiter = limiter.clone();
        tokio::spawn(async move {
            let mut reader = FrameReader::counting(stream, window.bytes_arrived.clone());
            let mut decompressor = match zstd::bulk::Decompressor::new() {
                Ok(d) => d,
                Err(e) => {
                    window.fail(format!("zstd: {e}"));
                    return;
                }
            };
            loop {
                match reader.next().await {
                    Ok(Some(Message::ChunkBatch(batch))) => {
                        if let Some(limiter) = &limiter {
                            let cost = batch.payload.len() as u64 + 40 * batch.chunks.len() as u64;
                            if let Err(e) = limiter.acquire(cost).await {
                                return window.fail(format!("{e:#}"));
                            }
                        }
                        match crate::chunks::decode_batch(batch, &mut decompressor) {
                            Ok((good, bad)) => window.arrive(good, bad),
                            Err(e) => return window.fail(e.to_string()),
                        }
                    }
                    Ok(None) => return,
                    Ok(Some(other)) => return window.fail(format!("unexpected message on a data stream: {other:?}")),
                    Err(e) => return window.fail(format!("{e:#}")),
                }
            }
        });
    }
}

impl Window {
    fn spilling_into(dir: PathBuf) -> Self {
        let window = Self::default();
        if let Ok(mut state) = window.state.lock() {
            state.spill.dir = dir;
        }
        window
    }

    /// Records that `hashes` were asked for.
    fn want(&self, hashes: impl IntoIterator<Item = ChunkHash>) {
        if let Ok(mut state) = self.state.lock() {
            state.ledger.want(hashes);
        }
    }

    fn arrive(&self, good: Vec<(ChunkHash, Bytes)>, bad: Vec<ChunkHash>) {
        if let Ok(mut state) = self.state.lock() {
            let damaged = bad.iter().filter(|h| state.ledger.damaged(h)).count();
            if damaged > 0 {
                tracing::warn!(
                    "{damaged} chunks arrived damaged (hash mismatch); their files are left for the next round"
                );
            }
            for (hash, data) in good {
                let held = state.chunks.contains_key(&hash);
                if state.ledger.arrive(&hash, data.len() as u64, held) == Arrival::Keep {
                    let stored = if state.memory + data.len() as u64 <= WINDOW_MAX {
                        state.memory += data.len() as u64;
                        Stored::Memory(data)
                    } else {
                        match state.spill.put(&data) {
                            Ok(stored) => stored,
                            Err(e) => {
                                state.error = Some(format!("cannot keep a chunk in the spill file: {e}"));
                                break;
                            }
                        }
                    };
                    state.chunks.insert(hash, stored);
                }
            }
            if let Some(WindowEnd::Flooded(bytes)) = state.ledger.end()
                && state.error.is_none()
            {
                let text =
                    format!("the source sent {} of chunks this node did not ask for", crate::human::bytes(bytes));
                state.error = Some(text);
            }
            state.ledger.batch_received();
            self.changed.notify_all();
        }
    }

    /// Drops chunks that are now in the target and its index.
    fn forget(&self, hashes: &[ChunkHash]) {
        if let Ok(mut state) = self.state.lock() {
            for hash in hashes {
                match state.chunks.remove(hash) {
                    Some(Stored::Memory(data)) => state.memory -= data.len() as u64,
                    Some(Stored::Spilled { .. }) => state.spill.release(),
                    Some(Stored::Written { .. }) | None => {}
                }
                state.ledger.forget(hash);
            }
        }
    }

    /// Whether `waiting` can be applied now: once its chunks are in, or, a large file, as they arrive.
    fn can_apply(&self, waiting: &mut Waiting) -> bool {
        waiting.bytes >= LARGE_FILE || self.holds_all(waiting)
    }

    /// True when every one of `waiting`'s chunks has arrived or is known missing. Resumes where the
    /// last call stopped (a chunk that arrived stays until its entry is applied), so that a file of
    /// many chunks costs one look per chunk, not one per arrival.
    fn holds_all(&self, waiting: &mut Waiting) -> bool {
        let Ok(state) = self.state.lock() else { return false };
        while let Some(hash) = waiting.hashes.get(waiting.ready) {
            if !(state.chunks.contains_key(hash) || state.ledger.is_missing(hash)) {
                return false;
            }
            waiting.ready += 1;
        }
        true
    }

    fn fail(&self, error: String) {
        if let Ok(mut state) = self.state.lock() {
            state.error = Some(error);
            self.changed.notify_all();
        }
    }

    /// Why the data streams failed, if they did.
    fn error(&self) -> Option<String> {
        self.state.lock().map_or_else(|_| Some("window lock poisoned".into()), |state| state.error.clone())
    }

    /// The source said it cannot send these chunks.
    fn missing(&self, hashes: Vec<ChunkHash>) {
        if let Ok(mut state) = self.state.lock() {
            state.ledger.source_missing(hashes);
            self.changed.notify_all();
        }
    }

    /// What changes while the source is alive: bytes on the data streams, chunks it cannot send,
    /// notices that it is paused. The stall timers watch this.
    fn progress(&self, state: &WindowState) -> u64 {
        self.bytes_arrived.load(Ordering::Relaxed) + state.ledger.events()
    }

    /// The source says its bandwidth limit pauses it: not stalled.
    fn paused(&self) {
        if let Ok(mut state) = self.state.lock() {
            state.ledger.paused();
            self.changed.notify_all();
        }
    }

    /// The source stopped after sending `batches` batches.
    fn stopped(&self, batches: u64) {
        if let Ok(mut state) = self.state.lock() {
            state.ledger.stopped(batches);
            self.changed.notify_all();
        }
    }

    /// Waits until `hash`, if it was asked for and has not come yet, arrives or cannot come any more
    /// (missing, the data streams failed, the source stopped, or nothing came for `stall_timeout`).
    fn wait_for<'a>(
        &'a self,
        mut state: std::sync::MutexGuard<'a, WindowState>,
        hash: &ChunkHash,
        stall_timeout: Duration,
    ) -> Result<std::sync::MutexGuard<'a, WindowState>, FetchError> {
        let poisoned = || FetchError("window lock poisoned".into());
        let mut stall = StallTimer::new(stall_timeout);
        stall.observe(self.progress(&state), Instant::now());
        while state.ledger.is_wanted(hash) && state.error.is_none() {
            if let Some(end @ WindowEnd::Stopped) = state.ledger.end() {
                return Err(FetchError(end.to_string()));
            }
            if stall.observe(self.progress(&state), Instant::now()) {
                let error = stalled(stall_timeout);
                state.error = Some(error.clone());
                self.changed.notify_all();
                return Err(FetchError(error));
            }
            state = self.changed.wait_timeout(state, Duration::from_millis(200)).map_err(|_| poisoned())?.0;
        }
        Ok(state)
    }
}

/// Serves `Applier` the window's chunks. A large file is applied as its chunks arrive: a chunk asked
/// for and not yet arrived is waited for.
struct WindowSource {
    window: Arc<Window>,
    stall_timeout: Duration,
}

impl ChunkSource for WindowSource {
    fn fetch(&mut self, _: &Entry, _: u64, chunk: &ChunkRef, out: &mut ChunkBuf) -> Result<Fetched, FetchError> {
        let state = self.window.state.lock().map_err(|_| FetchError("window lock poisoned".into()))?;
        let state = self.window.wait_for(state, &chunk.hash, self.stall_timeout)?;
        if let Some(error) = &state.error {
            return Err(FetchError(format!("receiving chunks failed: {error}")));
        }
        let stored = state.chunks.get(&chunk.hash).ok_or_else(|| {
            FetchError("the source could not send this chunk (the file changed since its scan)".into())
        })?;
        match stored {
            // Hashed by `decode_batch` as it arrived, and held in memory since: shared, not copied.
            Stored::Memory(data) => {
                out.share(data.clone());
                Ok(Fetched::Verified)
            }
            Stored::Spilled { offset, len } => {
                let file = state.spill.file.as_ref().ok_or_else(|| FetchError("the spill file is gone".into()))?;
                read_back(file, *offset, *len, out.owned())
                    .map_err(|e| FetchError(format!("reading the spill file: {e}")))
            }
            Stored::Written { file, offset, len } => read_back(file, *offset, *len, out.owned())
                .map_err(|e| FetchError(format!("reading back a chunk of a file being built: {e}"))),
        }
    }

    fn written(&mut self, hash: &ChunkHash, file: &Arc<std::fs::File>, offset: u64) {
        let Ok(mut state) = self.window.state.lock() else { return };
        let state = &mut *state;
        let Some(stored) = state.chunks.get_mut(hash) else { return };
        let len = match stored {
            Stored::Memory(data) => {
                state.memory -= data.len() as u64;
                data.len() as u32
            }
            Stored::Spilled { len, .. } => {
                let len = *len;
                state.spill.release();
                len
            }
            Stored::Written { .. } => return,
        };
        *stored = Stored::Written { file: file.clone(), offset, len };
    }

    fn holds(&mut self, hash: &ChunkHash) -> bool {
        self.window.state.lock().is_ok_and(|state| state.chunks.contains_key(hash))
    }
}

/// Reads a chunk back from a file it was written to: the applier checks it again.
fn read_back(file: &std::fs::File, offset: u64, len: u32, out: &mut Vec<u8>) -> std::io::Result<Fetched> {
    use std::os::unix::fs::FileExt;
    out.resize(len as usize, 0);
    file.read_exact_at(out, offset)?;
    Ok(Fetched::Unchecked)
}

/// The paths of a job's state on the destination.
pub(crate) struct TargetState {
    pub(crate) dir: PathBuf,
}

impl TargetState {
    pub(crate) fn new(data_dir: &Path, job: &str) -> Self {
        Self { dir: data_dir.join("jobs").join(job).join("target") }
    }
    pub(crate) fn manifest(&self) -> PathBuf {
        self.dir.join("manifest")
    }
    fn round_file(&self) -> PathBuf {
        self.dir.join("round.json")
    }
    pub(crate) fn history(&self) -> PathBuf {
        self.dir.join("history.jsonl")
    }
    pub(crate) fn import_marker(&self) -> PathBuf {
        self.dir.join("import.running")
    }
    pub(crate) fn round_marker(&self) -> PathBuf {
        self.dir.join("round.running")
    }
    /// What a check begun before the round found.
    fn early_findings(&self) -> PathBuf {
        self.dir.join("findings.early")
    }
    /// What the round's check of the target found.
    fn findings(&self) -> PathBuf {
        self.dir.join("findings")
    }
    /// The device and inode of the target folder ferry last filled.
    fn identity(&self) -> PathBuf {
        self.dir.join("identity")
    }
    /// The last committed round.
    pub(crate) fn holds(&self) -> anyhow::Result<Option<RoundRef>> {
        match std::fs::read(self.round_file()) {
            Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).context("round.json is damaged")?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
    fn set_holds(&self, round: RoundRef) -> anyhow::Result<()> {
        crate::write_durably(&self.round_file(), &serde_json::to_vec(&round)?)
            .with_context(|| format!("cannot record the round in {}", self.round_file().display()))
    }
}

/// An import in progress.
#[derive(Debug, Clone)]
struct RunningImport {
    round: u64,
    since: std::time::SystemTime,
    command: Vec<String>,
}

type Imports = Arc<Mutex<HashMap<String, RunningImport>>>;

/// What a destination round works with.
struct Round<'a> {
    job: &'a JobConfig,
    data_dir: &'a Path,
    hello: &'a Hello,
    peer: &'a str,
    imports: &'a Imports,
    early_checks: &'a EarlyChecks,
    stall_timeout: Duration,
}

fn destination_round(
    round: &Round<'_>,
    mut inbox: mpsc::Receiver<Message>,
    to_net: mpsc::Sender<Message>,
    window: &Arc<Window>,
) -> anyhow::Result<RoundEnd> {
    let (job, hello) = (round.job, round.hello);
    let send = |message: Message| to_net.blocking_send(message).map_err(|_| anyhow!("the connection closed"));
    let state = TargetState::new(round.data_dir, &job.name);
    std::fs::create_dir_all(&state.dir).with_context(|| format!("cannot create {}", state.dir.display()))?;
    std::fs::create_dir_all(&job.path)
        .with_context(|| format!("cannot create target folder {}", job.path.display()))?;
    let _lock = ferry_engine::lock_state(&state.dir)?;
    let holds = state.holds()?;
    tracing::Span::current().record("round", holds.map_or(1, |h| h.round + 1));
    // An import marker left behind means the daemon stopped during an import: say so, do not rerun it.
    if let Some(stale) = crate::history::read_marker(&state.import_marker()) {
        let text = format!(
            "the import of round {} of job {} started at {} was interrupted (the daemon stopped); it was not run again: check it, and run it by hand if needed",
            stale.round, job.name, stale.since
        );
        tracing::warn!("{text}");
        crate::history::append(&state.history(), &crate::history::Record::import_interrupted(stale.round))?;
        let _ = std::fs::remove_file(state.import_marker());
        send(Message::Notice { text })?;
    }
    crate::history::write_marker(
        &state.round_marker(),
        &crate::history::Marker::now(holds.map_or(1, |h| h.round + 1), vec![round.peer.to_owned()]),
    )?;
    let _round_marker = crate::history::MarkerGuard(state.round_marker());
    // A target folder that is not the one ferry filled (removed and made again, another disk mounted
    // there, a restored copy) is adopted whole, as a first round adopts what it finds.
    let identity = ferry_engine::TargetIdentity::read(&state.identity(), &job.path);
    let other_target = identity.changed;
    let adopt_whole = holds.is_none() || other_target;
    let early = ServerContext::take_early_check(round.early_checks, &job.name, holds, adopt_whole);
    let mut index = ChunkIndex::open(&state.dir.join("chunks.redb"))?;
    let indexed = state.dir.join("existing.indexed");
    if other_target {
        tracing::warn!(
            "{} is not the folder ferry filled in the last round: it is indexed and adopted",
            job.path.display()
        );
        let _ = std::fs::remove_file(&indexed);
    }
    if adopt_whole && !indexed.exists() {
        // What is already in the target (a shipped disk, an earlier rsync) is indexed, so that only
        // what differs is asked for. Once: an interrupted first round keeps its index.
        index_existing(&job.path, &state.dir, &mut index)?;
        std::fs::write(&indexed, b"")?;
    }
    // The target is checked against what ferry put there: while the source scanned (begun when it
    // asked whether a round would be taken), or now, while it sends its changes.
    let check = match early {
        Some(report) => {
            std::fs::rename(state.early_findings(), state.findings())?;
            tracing::info!("the check of {} begun while the source scanned is this round's", job.path.display());
            Check::Done(report)
        }
        None => {
            let (target, committed, findings) = (job.path.clone(), state.manifest(), state.findings());
            let mut index = index.clone();
            let options = CheckOptions { adopt: adopt_whole, read_only: false };
            let span = tracing::Span::current();
            Check::Running(std::thread::Builder::new().name("ferry-check".into()).spawn(move || {
                let _entered = span.enter();
                check_target(&target, &committed, &mut index, &findings, options)
            })?)
        }
    };
    send(Message::Welcome { holds })?;

    // The changes, to disk (a full manifest can be large).
    let changes_path = state.dir.join("incoming-changes");
    let mut changes = RecordWriter::<Change>::create(&changes_path)?;
    let mut import_mode = ferry_proto::ImportMode::Default;
    let mut dry_run = false;
    let end = loop {
        match inbox.blocking_recv() {
            Some(Message::RoundOptions(options)) => import_mode = options.import,
            Some(Message::DryRun) => dry_run = true,
            Some(Message::Changes(batch)) => {
                for change in &batch {
                    changes.push(change)?;
                }
            }
            Some(Message::ChangesEnd(end)) => break end,
            Some(Message::Failed { reason }) => bail!("the source gave up: {reason}"),
            Some(other) => bail!("unexpected {other:?} while receiving changes"),
            None => bail!("the connection closed while receiving changes"),
        }
    };
    let change_count = changes.count();
    changes.finish()?;
    let check = match check {
        Check::Done(report) => report,
        Check::Running(thread) => {
            let report = thread.join().map_err(|_| anyhow!("the check of the target panicked"))??;
            let ms = report.duration.as_millis();
            tracing::info!("checked {} entries of {} in {ms} ms", report.entries, job.path.display());
            report
        }
    };
    if check.entries_differ() {
        let text = format!(
            "{} is not as ferry left it: {}; this round puts right what it can (e.g. {})",
            job.path.display(),
            check.summary(),
            check.differences.iter().take(5).cloned().collect::<Vec<_>>().join("; ")
        );
        tracing::warn!("{text}");
        send(Message::Notice { text })?;
    }
    if let Some(base) = end.base.filter(|_| end.base != holds) {
        let held =
            holds.map_or_else(|| "no round".to_owned(), |h| format!("round {} (root {})", h.round, h.root.short()));
        bail!("the source sent changes against round {}, but this node holds {held}", base.round);
    }
    // Nothing changed since the round this node holds, and it holds that round whole: its committed
    // manifest is the source's tree already. Applying would only read, hash and rewrite every entry
    // (most of a no-change round's time here). A staging folder left by a cut attempt takes the full
    // path, which empties it.
    let unchanged = change_count == 0
        && check.is_clean()
        && end.base.is_some()
        && holds.is_some_and(|h| h.root == end.root)
        && state.manifest().exists()
        && !job.path.join(ferry_engine::STAGING_DIR).exists();

    let open_steps = || -> anyhow::Result<_> {
        let old: Box<dyn Iterator<Item = Result<RawEntry, RecordFileError>> + Send> = if state.manifest().exists() {
            Box::new(ManifestReader::open(&state.manifest())?.raw())
        } else {
            Box::new(std::iter::empty())
        };
        let old = with_findings(old, RecordReader::<Finding>::open(&state.findings())?);
        Ok(patch(old, RecordReader::<Change>::open(&changes_path)?, end.base.is_some()))
    };

    if unchanged && !dry_run {
        let _ = std::fs::remove_file(&changes_path);
        tracing::info!("nothing changed since round {}: its manifest stands", holds.map_or(0, |h| h.round));
        send(Message::Done)?;
        return commit_round(round, &state, holds, (end.root, end.root), ApplyReport::default(), import_mode, &send);
    }

    // Before any data moves: does the round fit? Changes against the committed manifest say it alone,
    // without another pass over that manifest (the transfer's merge checks them against it).
    let space = if end.base.is_some() {
        Space::of_changes(RecordReader::<Change>::open(&changes_path)?, &job.path)?
    } else {
        Space::of_round(open_steps()?, &job.path)?
    };
    if dry_run {
        plan_only(open_steps()?, &index, &space, &send)?;
        let _ = std::fs::remove_file(&changes_path);
        return Ok(RoundEnd::Planned);
    }
    if let Some(reason) = space.refusal(&job.path) {
        tracing::warn!("{reason}");
        send(Message::Refused { refusal: Refusal::NoSpace, reason: reason.clone() })?;
        return Err(Refused::new(Refusal::NoSpace, reason).into());
    }

    let mut committed = ManifestWriter::create(&state.dir.join("manifest.next"))?;
    let mut source = WindowSource { window: window.clone(), stall_timeout: round.stall_timeout };
    let options = ApplyOptions {
        delete: hello.delete,
        numeric_ids: hello.numeric_ids,
        adopt: if adopt_whole { Adopt::All } else { Adopt::Nothing },
        ..ApplyOptions::default()
    };
    let mut applier = Applier::new(&job.path, &mut source, &mut index, &mut committed, &options)?;
    // The index's hints into what the check found gone or changed are stale: those chunks are asked for.
    applier.distrust(ferry_engine::stale_paths(&check, &state.findings())?);

    // The manifests are read and merged on a thread of their own: applying is this one's work.
    let steps = read_ahead(open_steps()?)?;
    match transfer(&mut applier, steps, &send, &mut inbox, window, round.stall_timeout)? {
        TransferEnd::Complete => {}
        TransferEnd::Stopped(reason) => return Ok(RoundEnd::Stopped(reason)),
        TransferEnd::Cut(why) => bail!("{why} (what had arrived is kept for the next round)"),
    }
    send(Message::Done)?;
    let report = applier.finish()?;
    let root = committed.finish()?;
    std::fs::rename(state.dir.join("manifest.next"), state.manifest())?;
    let _ = std::fs::remove_file(&changes_path);
    identity.record().with_context(|| format!("cannot record {}", state.identity().display()))?;
    commit_round(round, &state, holds, (root, end.root), report, import_mode, &send)
}

/// Ends a round whose files are all in place and durable, and whose manifest is committed: records
/// it, tells the source, and runs the import. `(root, expected)`: the committed manifest's root hash
/// and the source's (they differ when entries failed).
fn commit_round(
    round: &Round<'_>,
    state: &TargetState,
    holds: Option<RoundRef>,
    (root, expected): (RootHash, RootHash),
    report: ApplyReport,
    import_mode: ferry_proto::ImportMode,
    send: &impl Fn(Message) -> anyhow::Result<()>,
) -> anyhow::Result<RoundEnd> {
    let job = round.job;
    tracing::info!(
        "applied {} files ({}) in {:.1} s, {:.1} s of it waiting for the disk's syncs",
        report.files_written,
        crate::human::bytes(report.bytes_written),
        report.duration.as_secs_f64(),
        report.sync_wait.as_secs_f64()
    );
    tracing::debug!(
        "{:.2} s waiting for the small files of a batch to be made, {:.2} s for synced batches to be put into place",
        report.make_wait.as_secs_f64(),
        report.place_wait.as_secs_f64()
    );
    let done = RoundRef { round: holds.map_or(1, |h| h.round + 1), root };
    state.set_holds(done)?;
    let _ = std::fs::remove_file(state.round_marker());
    if root != expected {
        tracing::warn!("round {} is incomplete: {} entries failed", done.round, report.failure_count);
    }
    crate::history::append(
        &state.history(),
        &crate::history::Record::committed(done, round.peer, &report, root == expected),
    )?;
    send(Message::Committed(Committed {
        round: done,
        files_written: report.files_written,
        failures: report.failures.clone(),
        failure_count: report.failure_count,
    }))?;
    // The import runs once per committed round that brought something new, here, whether or not the
    // source still listens. A round that leaves the same tree as the one before (nothing changed, or
    // only what was put right) has nothing new to import, unless the source asks for one explicitly.
    let same_tree = holds.is_some_and(|h| h.root == root);
    if same_tree && import_mode == ferry_proto::ImportMode::Default && job.import_cmd.is_some() {
        let text = format!(
            "import skipped: nothing changed since round {} (run the round with --import full to import anyway)",
            done.round - 1
        );
        tracing::info!("{text}");
        let _ = send(Message::Notice { text });
    } else if let Some(argv) = import_command(job, import_mode, done.round)? {
        let running = RunningImport { round: done.round, since: std::time::SystemTime::now(), command: argv.clone() };
        round.imports.lock().map_err(|_| anyhow!("lock poisoned"))?.insert(job.name.clone(), running);
        let result = (|| {
            crate::history::write_marker(
                &state.import_marker(),
                &crate::history::Marker::now(done.round, argv.clone()),
            )?;
            let _ = send(Message::ImportStarted { round: done.round, command: argv.clone() });
            let timeout = match &job.import_timeout {
                Some(t) => humantime::parse_duration(t).with_context(|| format!("import_timeout {t:?}"))?,
                None => Duration::from_secs(24 * 3600),
            };
            let log = state.dir.join("import.log");
            let result = crate::import::run(&argv, job.import_user.as_deref(), done.round, timeout, &log);
            crate::history::append(&state.history(), &crate::history::Record::imported(&result))?;
            let _ = std::fs::remove_file(state.import_marker());
            anyhow::Ok(result)
        })();
        if let Ok(mut imports) = round.imports.lock() {
            imports.remove(&job.name);
        }
        let result = result?;
        if result.success {
            tracing::info!("import of round {} succeeded in {} ms", done.round, result.duration_ms);
        } else {
            tracing::warn!(
                "import of round {} failed (exit code {}): {}",
                done.round,
                crate::import::exit_code_text(result.exit_code),
                result.tail.join(" / ")
            );
        }
        let _ = send(Message::ImportDone(result));
    }
    Ok(RoundEnd::Committed(done))
}

/// The disk space a round needs on the destination, and what there is.
struct Space {
    /// Files the round writes.
    files: u64,
    /// Their bytes: each is built beside the old version before it replaces it.
    needed: u64,
    /// Free bytes for the target (for an unprivileged user).
    available: u64,
    /// The filesystem's size.
    total: u64,
}

impl Space {
    fn of_round(steps: impl Iterator<Item = anyhow::Result<Step>>, target: &Path) -> anyhow::Result<Self> {
        let (mut files, mut needed) = (0u64, 0u64);
        for step in steps {
            let step = step?;
            if let Some(pair) = step.pair()
                && ferry_engine::Planner::writes_content(pair)
                && let Some(new) = &pair.new
            {
                files += 1;
                needed = needed.saturating_add(new.size);
            }
        }
        Self::with(files, needed, target)
    }

    /// Like [`Space::of_round`], for changes against the committed manifest: a file whose content
    /// changed is one the round writes. (The one case this misses, a hard link whose content did not
    /// change becoming a file of its own, is rare and small beside the margin.)
    fn of_changes(changes: RecordReader<Change>, target: &Path) -> anyhow::Result<Self> {
        let (mut files, mut needed) = (0u64, 0u64);
        for change in changes {
            let change = change?;
            if let Some(entry) = &change.entry
                && entry.kind == EntryKind::File
                && entry.hard_link_to.is_none()
                && !change.chunks_as_before
            {
                files += 1;
                needed = needed.saturating_add(entry.size);
            }
        }
        Self::with(files, needed, target)
    }

    /// A round that writes `files` files of `needed` bytes into `target`'s filesystem.
    fn with(files: u64, needed: u64, target: &Path) -> anyhow::Result<Self> {
        let stat = rustix::fs::statvfs(target)
            .with_context(|| format!("cannot read the free space of {}", target.display()))?;
        Ok(Self {
            files,
            needed,
            available: stat.f_bavail.saturating_mul(stat.f_frsize),
            total: stat.f_blocks.saturating_mul(stat.f_frsize),
        })
    }

    /// Room kept free beyond the round's own bytes: 2% of the filesystem (at most 1 GiB), plus 1 MiB
    /// for folders and ferry's state.
    fn margin(&self) -> u64 {
        (self.total / 50).min(1 << 30) + (1 << 20)
    }

    /// Why the round cannot start, if it cannot.
    fn refusal(&self, target: &Path) -> Option<String> {
        let wanted = self.needed.saturating_add(self.margin());
        (wanted > self.available).then(|| {
            format!(
                "not enough space in {}: the round writes {} files ({}), which needs {} with the margin, and {} is free; free some space or grow the filesystem, then run the round again",
                target.display(),
                crate::human::count(self.files),
                crate::human::bytes(self.needed),
                crate::human::bytes(wanted),
                crate::human::bytes(self.available)
            )
        })
    }
}

/// A dry run: asks for the chunks the round would need (the source sizes them instead of sending
/// them), then says what the round would write.
fn plan_only(
    steps: impl Iterator<Item = anyhow::Result<Step>>,
    index: &ChunkIndex,
    space: &Space,
    send: &impl Fn(Message) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut planner = ferry_engine::Planner::default();
    let mut needed = Vec::new();
    let mut need_bytes = 0u64;
    for step in steps {
        let step = step?;
        let Some(pair) = step.pair() else { continue };
        for need in planner.plan(index, pair)? {
            need_bytes += u64::from(need.chunk.len);
            needed.push(NeedChunk { path: need.path, offset: need.offset, len: need.chunk.len, hash: need.chunk.hash });
            if needed.len() == 4096 {
                send(Message::Need(std::mem::take(&mut needed)))?;
            }
        }
    }
    if !needed.is_empty() {
        send(Message::Need(needed))?;
    }
    send(Message::Planned(ferry_proto::Plan {
        files: space.files,
        need_bytes,
        space_needed: space.needed.saturating_add(space.margin()),
        space_available: space.available,
    }))
}

/// The import command to run for this round, if any.
fn import_command(job: &JobConfig, mode: ferry_proto::ImportMode, round: u64) -> anyhow::Result<Option<Vec<String>>> {
    use ferry_proto::ImportMode;
    let command = match mode {
        ImportMode::None => return Ok(None),
        ImportMode::Default => job.import_cmd.as_ref(),
        ImportMode::Full => {
            Some(job.import_cmd.as_ref().ok_or_else(|| anyhow!("job {} has no import command on this node (ferry job set {} --import-cmd CMD)", job.name, job.name))?)
        }
        ImportMode::ProvisioningOnly => Some(job.import_provisioning_cmd.as_ref().ok_or_else(|| {
            anyhow!("job {} has no provisioning-only import command on this node (ferry job set {} --import-provisioning-cmd CMD)", job.name, job.name)
        })?),
    };
    command.map(|c| crate::config::import_argv(c, &job.path, &job.name, round)).transpose()
}

/// How the transfer ended.
enum TransferEnd {
    /// Every entry was applied.
    Complete,
    /// The source stopped the round (its deadline) after sending what it had started.
    Stopped(String),
    /// The connection or the source failed; what arrived was applied.
    Cut(String),
}

/// An entry waiting for the chunks it asked for.
struct Waiting {
    step: Step,
    hashes: Vec<ChunkHash>,
    /// How many of `hashes`, from the start, are known to be in (see [`Window::holds_all`]).
    ready: usize,
    bytes: u64,
}

/// The transfer, streamed: entries are planned ahead and their chunks asked for while at most
/// `WINDOW_MAX` bytes (and `WINDOW_ENTRIES` entries) are in memory, asked for and not yet flushed; each entry is
/// applied, in order, as soon as its chunks are in; every `FLUSH_EVERY` what was applied begins its way
/// to the disk (`begin_flush`), and its chunks leave memory once it is durable, at the next flush. A stop or a
/// cut keeps everything applied so far.
fn transfer(
    applier: &mut Applier<'_>,
    mut steps: impl Iterator<Item = anyhow::Result<Step>>,
    send: &impl Fn(Message) -> anyhow::Result<()>,
    inbox: &mut mpsc::Receiver<Message>,
    window: &Window,
    stall_timeout: Duration,
) -> anyhow::Result<TransferEnd> {
    let mut waiting: VecDeque<Waiting> = VecDeque::new();
    let mut outstanding = 0u64;
    let mut planned_all = false;
    let (mut applied, mut applied_bytes): (Vec<ChunkHash>, u64) = (Vec::new(), 0);
    // Applied before the last flush began, durable once the next one begins.
    let (mut syncing, mut syncing_bytes): (Vec<ChunkHash>, u64) = (Vec::new(), 0);
    let mut last_flush = Instant::now();
    let mut stall = StallTimer::new(stall_timeout);
    stall.restart(0, Instant::now());
    let mut spent = Spent::default();
    let end = loop {
        // Plan ahead and ask.
        let mut needs = Vec::new();
        let mut clock = Instant::now();
        while !planned_all && outstanding < WINDOW_MAX && waiting.len() < WINDOW_ENTRIES {
            let Some(step) = steps.next() else {
                planned_all = true;
                break;
            };
            let step = step?;
            let (mut hashes, mut bytes) = (Vec::new(), 0u64);
            let planned = match step.pair() {
                Some(pair) => applier.plan(pair)?,
                None => Vec::new(),
            };
            for need in planned {
                bytes += u64::from(need.chunk.len);
                hashes.push(need.chunk.hash);
                needs.push(NeedChunk {
                    path: need.path,
                    offset: need.offset,
                    len: need.chunk.len,
                    hash: need.chunk.hash,
                });
            }
            outstanding += bytes;
            waiting.push_back(Waiting { step, hashes, ready: 0, bytes });
        }
        window.want(needs.iter().map(|n| n.hash));
        for part in needs.chunks(4096) {
            send(Message::Need(part.to_vec()))?;
        }
        spent.planning += lap(&mut clock);
        if let Some(end) = source_messages(inbox, window)? {
            break end;
        }
        // Apply what is ready, in order. A large file is applied as its chunks arrive: the applier
        // writes each one as soon as it is in (and waits for the next), so that the file is written
        // and synced while the rest of it is on the way, and its chunks do not pile up here.
        // The loop yields when a flush is due: while chunks come as fast as they are applied, what was
        // applied must still become durable and leave the window, and more be asked for, or the
        // window runs dry and the link idles (for seconds, on the WAN bench).
        // A due flush waits for the batch before it to be durable; while that one is still syncing,
        // the loop applies on instead of waiting (the window still bounds what is applied).
        let mut progressed = false;
        let flush_due = |last_flush: Instant, applied_bytes: u64| {
            last_flush.elapsed() > FLUSH_EVERY || applied_bytes >= FLUSH_BYTES
        };
        while (!flush_due(last_flush, applied_bytes) || applier.is_syncing())
            && waiting.front_mut().is_some_and(|w| window.can_apply(w))
        {
            let Some(entry) = waiting.pop_front() else { break };
            applied_bytes += entry.bytes;
            applied.extend(entry.hashes);
            applier.step(entry.step)?;
            progressed = true;
        }
        spent.applying += lap(&mut clock);
        // A large file's wait ends early when the data streams fail or nothing comes for the stall
        // deadline: the round is cut there, not counted complete without that file.
        if let Some(error) = window.error() {
            // A `Failed` from the source also fails the window: its own words end the round.
            break source_messages(inbox, window)?
                .unwrap_or_else(|| TransferEnd::Cut(format!("receiving chunks failed: {error}")));
        }
        // Applied chunks stay in memory (and count) until they are durable in the target: the flush
        // begun here makes what the previous one began durable, while the disk syncs this one.
        let idle = !waiting.front_mut().is_some_and(|w| window.can_apply(w));
        if flush_due(last_flush, applied_bytes) && (idle || !applier.is_syncing()) {
            applier.begin_flush()?;
            window.forget(&syncing);
            outstanding -= syncing_bytes;
            syncing = std::mem::take(&mut applied);
            syncing_bytes = std::mem::take(&mut applied_bytes);
            last_flush = Instant::now();
            spent.flushing += lap(&mut clock);
        }
        if planned_all && waiting.is_empty() {
            break TransferEnd::Complete;
        }
        // Wait for chunks, unless some are ready (the loop above yielded) or there is room to plan more.
        let ready = waiting.front_mut().is_some_and(|w| window.can_apply(w));
        if ready || (progressed && !planned_all && outstanding < WINDOW_MAX && waiting.len() < WINDOW_ENTRIES) {
            continue;
        }
        let state = window.state.lock().map_err(|_| anyhow!("window lock poisoned"))?;
        if let Some(error) = &state.error {
            break TransferEnd::Cut(format!("receiving chunks failed: {error}"));
        }
        let seen = window.progress(&state);
        if progressed {
            stall.restart(seen, Instant::now());
        } else if stall.observe(seen, Instant::now()) {
            break TransferEnd::Cut(stalled(stall_timeout));
        }
        let _ = window
            .changed
            .wait_timeout(state, Duration::from_millis(200))
            .map_err(|_| anyhow!("window lock poisoned"))?;
        spent.waiting += lap(&mut clock);
    };
    // What arrived before a stop or a cut: the entries whose chunks are all in, then durable.
    while waiting.front_mut().is_some_and(|w| window.holds_all(w)) {
        let Some(entry) = waiting.pop_front() else { break };
        applier.step(entry.step)?;
    }
    let mut clock = Instant::now();
    applier.flush_batch()?;
    spent.flushing += lap(&mut clock);
    tracing::debug!(
        "transfer: {:.2} s planning (reading the manifests, looking chunks up), {:.2} s applying, {:.2} s flushing \
         (waiting for a batch's files to be made and synced, naming them into place), {:.2} s waiting for chunks",
        spent.planning.as_secs_f64(),
        spent.applying.as_secs_f64(),
        spent.flushing.as_secs_f64(),
        spent.waiting.as_secs_f64()
    );
    Ok(end)
}

/// Where the transfer's thread spent its time, for the debug log: in which part of its loop.
#[derive(Default)]
struct Spent {
    planning: Duration,
    applying: Duration,
    flushing: Duration,
    waiting: Duration,
}

/// Whether a round ended because this node refused it (its reason went to the source as `Refused`).
fn is_refusal(error: &anyhow::Error) -> bool {
    error.downcast_ref::<Refused>().is_some()
}

/// Why a transfer ended when nothing came for `stall_timeout`.
fn stalled(stall_timeout: Duration) -> String {
    format!("no chunk arrived for {} s", stall_timeout.as_secs())
}

/// Handles what the source sent on the control stream during the transfer: a stop, a failure. (Chunks
/// it cannot read go straight to the window, see `round`.)
fn source_messages(inbox: &mut mpsc::Receiver<Message>, window: &Window) -> anyhow::Result<Option<TransferEnd>> {
    let message = match inbox.try_recv() {
        Ok(message) => message,
        Err(mpsc::error::TryRecvError::Empty) => return Ok(None),
        Err(mpsc::error::TryRecvError::Disconnected) => {
            return Ok(Some(TransferEnd::Cut("the connection closed during the transfer".into())));
        }
    };
    match message {
        Message::Stop { reason, batches } => {
            // The batches the source sent before stopping are on their way on other streams.
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut state = window.state.lock().map_err(|_| anyhow!("window lock poisoned"))?;
            while state.ledger.batches() < batches && state.error.is_none() && Instant::now() < deadline {
                state = window
                    .changed
                    .wait_timeout(state, Duration::from_millis(200))
                    .map_err(|_| anyhow!("window lock poisoned"))?
                    .0;
            }
            Ok(Some(TransferEnd::Stopped(reason)))
        }
        Message::Failed { reason } => Ok(Some(TransferEnd::Cut(format!("the source gave up: {reason}")))),
        other => bail!("unexpected {other:?} during the transfer"),
    }
}

/// Runs `items` on a thread of its own, up to a few thousand items ahead of the caller. The thread
/// stops when `items` ends or the returned iterator is dropped; if it fails, the last item says so
/// (the items must never just stop short: a round would commit a manifest without the rest).
fn read_ahead<T: Send + 'static>(
    items: impl Iterator<Item = anyhow::Result<T>> + Send + 'static,
) -> anyhow::Result<impl Iterator<Item = anyhow::Result<T>>> {
    const BATCH: usize = 1024;
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<anyhow::Result<T>>>(4);
    let reader = std::thread::Builder::new()
        .name("ferry-manifests".into())
        .spawn(move || {
            let mut items = items.fuse();
            loop {
                let batch: Vec<_> = items.by_ref().take(BATCH).collect();
                if batch.is_empty() || tx.send(batch).is_err() {
                    return;
                }
            }
        })
        .context("cannot start the thread that reads the manifests")?;
    let mut reader = Some(reader);
    Ok(rx.into_iter().flatten().chain(std::iter::from_fn(move || {
        let failed = reader.take()?.join().is_err();
        failed.then(|| Err(anyhow!("the thread reading the manifests failed")))
    })))
}

/// The old manifest merged with the changes: every path once, with its old and new entry. `delta`:
/// the changes are against the old manifest (an unlisted path is unchanged: a file or symlink is kept
/// as it is stored, undecoded); otherwise they are the whole new manifest.
fn patch<'a>(
    old: impl Iterator<Item = Result<Checked, RecordFileError>> + Send + 'a,
    changes: RecordReader<Change>,
    delta: bool,
) -> impl Iterator<Item = anyhow::Result<Step>> + Send + 'a {
    let steps = MergeJoin::new(old, changes).map(move |pair| {
        let pair = pair?;
        let pair = match (pair.old, pair.new) {
            // A folder is decoded here, off the applying thread: the applier needs it whole.
            (Some(old), None) if delta && old.found.is_none() && old.raw.kind() != EntryKind::Dir => {
                return Ok(Step::Keep(old.raw));
            }
            // Unchanged at the source, not as ferry left it here: back to what the source has.
            (Some(old), None) => Pair { new: if delta { Some(old.raw.decode()?) } else { None }, old: old.on_disk()? },
            (old, Some(change)) => {
                let committed = old.as_ref().map(|o| o.raw.decode()).transpose()?;
                let old = old.as_ref().map(Checked::on_disk).transpose()?.flatten();
                let new = match change.entry {
                    Some(mut entry) => {
                        if change.chunks_as_before {
                            let Some(previous) =
                                committed.as_ref().filter(|o| o.kind == EntryKind::File && o.size == entry.size)
                            else {
                                bail!("{}: sent as unchanged content, but this node has no such file", change.path);
                            };
                            entry.chunks.clone_from(&previous.chunks);
                        }
                        if entry.path != change.path {
                            bail!("{}: change and entry disagree on the path", change.path);
                        }
                        Some(entry)
                    }
                    None => None,
                };
                Pair { old, new }
            }
            (None, None) => unreachable!("a merged pair has one side"),
        };
        Ok(Step::Apply(Box::new(pair)))
    });
    // Gone at the source and not ferry's here (missing, or someone else's): nothing to do.
    steps.filter(|step| !matches!(step, Ok(Step::Apply(pair)) if pair.old.is_none() && pair.new.is_none()))
}

/// Records where the chunks of files already in `target` are, before a first round.
fn index_existing(target: &Path, state: &Path, index: &mut ChunkIndex) -> anyhow::Result<()> {
    let (manifest, cache) = (state.join("existing.manifest"), state.join("existing.cache"));
    let started = Instant::now();
    let report = ferry_engine::scan(target, None, &manifest, &cache, &ScanOptions::default())?;
    let mut batch = Vec::new();
    for entry in ManifestReader::open(&manifest)? {
        let entry = entry?;
        let mut offset = 0u64;
        for chunk in &entry.chunks {
            batch.push((chunk.hash, ChunkLocation { path: entry.path.clone(), offset, len: chunk.len }));
            offset += u64::from(chunk.len);
        }
        if batch.len() >= 50_000 {
            index.insert(batch.iter().map(|(h, l)| (h, l)), false)?;
            batch.clear();
        }
    }
    index.insert(batch.iter().map(|(h, l)| (h, l)), true)?;
    let _ = std::fs::remove_file(&manifest);
    let _ = std::fs::remove_file(&cache);
    if report.files > 0 {
        tracing::info!(
            "indexed {} files ({} bytes) already in {} in {:.1} s",
            report.files,
            report.file_bytes,
            target.display(),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, size: u64, seed: u8) -> Entry {
        Entry {
            mtime_ns: 1,
            size,
            chunks: vec![ChunkRef { hash: ChunkHash::of(&[seed]), len: size as u32 }],
            ..Entry::new(ferry_engine::RelPath::new(path.as_bytes().to_vec()).unwrap(), EntryKind::File)
        }
    }

    /// The committed manifest at `manifest`, with the check having found everything as ferry left it.
    fn as_found(manifest: &Path) -> impl Iterator<Item = Result<Checked, RecordFileError>> + Send + use<> {
        ManifestReader::open(manifest).unwrap().raw().map(|raw| raw.map(Checked::from))
    }

    #[test]
    fn an_entry_the_check_found_missing_or_changed_is_applied_again_though_the_source_did_not_change_it() {
        let dir = tempfile::tempdir().unwrap();
        let (manifest, changes) = (dir.path().join("manifest"), dir.path().join("changes"));
        let mut old = ManifestWriter::create(&manifest).unwrap();
        for entry in [file("a", 100, 1), file("b", 200, 2), file("c", 300, 3), file("d", 400, 4)] {
            old.push(&entry).unwrap();
        }
        old.finish().unwrap();
        RecordWriter::<Change>::create(&changes).unwrap().finish().unwrap();
        let found = |path: &str| match path {
            "a" => Some(ferry_engine::Found::Missing),
            "b" => Some(ferry_engine::Found::Changed("edited".into())),
            "c" => Some(ferry_engine::Found::Foreign("replaced".into())),
            _ => None,
        };
        let checked = ManifestReader::open(&manifest)
            .unwrap()
            .raw()
            .map(|raw| raw.map(|raw| Checked { found: found(&raw.path().to_string()), raw }));
        let steps: Vec<Step> =
            patch(checked, RecordReader::open(&changes).unwrap(), true).map(Result::unwrap).collect();
        let described: Vec<String> = steps
            .iter()
            .map(|step| match step {
                Step::Keep(raw) => format!("keep {}", raw.path()),
                Step::Apply(pair) => format!(
                    "{}: old {:?}, new size {:?}",
                    pair.path(),
                    pair.old.as_ref().map(|o| o.size),
                    pair.new.as_ref().map(|n| n.size)
                ),
            })
            .collect();
        // a is made again, b written again whole (its old content unknown), c is the administrator's
        // now (the apply leaves it alone), d stays.
        assert_eq!(
            described,
            [
                "a: old None, new size Some(100)",
                "b: old Some(0), new size Some(200)",
                "c: old None, new size Some(300)",
                "keep d"
            ]
        );
    }

    #[test]
    fn the_space_of_changes_is_the_space_of_the_merged_round() {
        let dir = tempfile::tempdir().unwrap();
        let (manifest, changes) = (dir.path().join("manifest"), dir.path().join("changes"));
        let mut old = ManifestWriter::create(&manifest).unwrap();
        for entry in [file("a", 100, 1), file("b", 200, 2), file("c", 300, 3), file("e", 500, 5)] {
            old.push(&entry).unwrap();
        }
        old.finish().unwrap();
        // a: new content; b: only its mtime (chunks as before); c: unchanged; d: new; e: removed.
        let mut b = file("b", 200, 2);
        b.mtime_ns = 2;
        b.chunks.clear();
        let listed = [
            Change { path: file("a", 0, 0).path, entry: Some(file("a", 150, 9)), chunks_as_before: false },
            Change { path: b.path.clone(), entry: Some(b), chunks_as_before: true },
            Change { path: file("d", 0, 0).path, entry: Some(file("d", 400, 4)), chunks_as_before: false },
            Change { path: file("e", 0, 0).path, entry: None, chunks_as_before: false },
        ];
        let mut writer = RecordWriter::<Change>::create(&changes).unwrap();
        for change in &listed {
            writer.push(change).unwrap();
        }
        writer.finish().unwrap();

        // Only c, which no change lists, is kept as it is stored.
        let merged = patch(as_found(&manifest), RecordReader::open(&changes).unwrap(), true);
        let kept: Vec<String> = merged
            .map(Result::unwrap)
            .filter_map(|step| match step {
                Step::Keep(raw) => Some(raw.path().to_string()),
                Step::Apply(_) => None,
            })
            .collect();
        assert_eq!(kept, ["c"]);
        let merged = patch(as_found(&manifest), RecordReader::open(&changes).unwrap(), true);
        let by_pairs = Space::of_round(merged, dir.path()).unwrap();
        let by_changes = Space::of_changes(RecordReader::open(&changes).unwrap(), dir.path()).unwrap();
        assert_eq!((by_pairs.files, by_pairs.needed), (2, 550));
        assert_eq!((by_changes.files, by_changes.needed), (by_pairs.files, by_pairs.needed));
    }

    #[test]
    fn read_ahead_yields_every_item_in_order() {
        let got: Vec<u32> = read_ahead((0..5000u32).map(Ok)).unwrap().collect::<anyhow::Result<_>>().unwrap();
        assert_eq!(got, (0..5000).collect::<Vec<_>>());
    }

    #[test]
    fn read_ahead_ends_with_an_error_when_its_thread_fails() {
        let items = (0..3000u32).map(|i| if i == 2500 { panic!("a reader bug") } else { Ok(i) });
        let got: Vec<anyhow::Result<u32>> = read_ahead(items).unwrap().collect();
        assert!(got.len() <= 2501, "{} items", got.len());
        assert!(got.last().is_some_and(|last| last.is_err()), "the items stopped short without an error");
    }
}
