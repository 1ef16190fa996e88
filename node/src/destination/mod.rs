//! `ferry serve`: the destination daemon, and the destination's side of a round.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ferry_certs::{Identity, NodeId, TrustedPeers};
use ferry_proto::{
    DestinationEnd, DestinationEvent, DestinationInput, DestinationRound, Message, ProtocolError, Refusal, Transmit,
};
use sd_notify::NotifyState;
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::config::{Config, DEFAULT_PORT, JobConfig, PeerConfig};
use crate::config_dir::ConfigDir;
use crate::net::{self, FrameReader, close};
use crate::refused::Refused;

mod early;
mod merge;
mod notify;
mod round;
mod space;
mod streamed;
mod transfer;
mod window;

use crate::state::TargetState;
use early::EarlyChecks;
use notify::{Importing, Running, STATUS_EVERY, StatusLine, tell_systemd};
use round::{Imports, Round, RoundEnd, destination_round, is_refusal};
use window::{Window, receive_chunks};

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
        let listening = format!("listening on {} as node {node_id}", endpoint.local_addr()?);
        tracing::info!("{listening}");
        tokio::pin!(shutdown);
        // SIGHUP, which would end the process by default, re-reads the configuration instead (as
        // `sync` does for its limit): the trusted peers now, each job's settings as its round starts.
        let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .inspect_err(|e| tracing::warn!("cannot handle SIGHUP ({e}); it will end the daemon"))
            .ok();
        // Under systemd (`Type=notify`): ready once the port is bound and the signals are handled,
        // not when the process starts.
        tell_systemd(&[NotifyState::Ready, NotifyState::Status(&listening)]);
        let mut status = StatusLine::new(listening.clone());
        let mut status_tick = tokio::time::interval(STATUS_EVERY);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = status_tick.tick() => {
                    let (rounds, imports) = context.running();
                    if let Some(line) = status.update(&rounds, &imports, Instant::now()) {
                        tell_systemd(&[NotifyState::Status(&line)]);
                    }
                }
                Some(()) = async {
                    match hangup.as_mut() {
                        Some(signal) => signal.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    tracing::info!(
                        "SIGHUP: re-read {}; job settings are read as each round starts",
                        context.config_dir.config_file().display()
                    );
                    context.refresh_trusted();
                    tell_systemd(&[NotifyState::Status(&format!("{listening}; re-read ferry.toml (SIGHUP)"))]);
                }
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
        tell_systemd(&[NotifyState::Stopping, NotifyState::Status("shutting down")]);
        endpoint.close(Refusal::ShuttingDown.code().into(), b"the destination is shutting down");
        endpoint.wait_idle().await;
        Ok(())
    }
}

/// Who runs a job's round: which peer, which of its sources ([`ferry_proto::Hello::source`]), on
/// which connection.
struct Holder {
    peer: NodeId,
    source: u64,
    connection: quinn::Connection,
}

/// How long a round's connection may stay silent and still be taken as alive: a live source sends
/// at least a keep-alive every 5 s.
const ALIVE_WITHIN: Duration = Duration::from_secs(7);

/// Whether `connection`'s peer is alive: it sends something within [`ALIVE_WITHIN`].
async fn answers(connection: &quinn::Connection) -> bool {
    let before = connection.stats().udp_rx.datagrams;
    let until = Instant::now() + ALIVE_WITHIN;
    while Instant::now() < until && connection.close_reason().is_none() {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if connection.stats().udp_rx.datagrams > before {
            return true;
        }
    }
    false
}

/// Another source of the same peer holds `job`, and is alive.
fn running_elsewhere(job: &str) -> Refused {
    Refused::new(
        Refusal::Busy,
        format!(
            "a round of job {job} from this node is running here, from another source: a second data folder, or a copy \
             of this node's identity on another host (each runs as its own source); wait for it, or stop it"
        ),
    )
}

struct ServerContext {
    config_dir: ConfigDir,
    trusted: TrustedPeers,
    /// Jobs with a round running: who runs it, on which connection.
    busy: Mutex<HashMap<String, Holder>>,
    /// Jobs whose import is running: which round, since when.
    imports: Imports,
    /// Checks of jobs' targets begun when their sources asked whether a round would be taken.
    early_checks: EarlyChecks,
    /// See [`STALL_TIMEOUT`].
    stall_timeout: Duration,
}

impl ServerContext {
    /// The rounds and imports running now, for the status line.
    fn running(&self) -> (Vec<Running>, Vec<Importing>) {
        let mut rounds: Vec<Running> = self
            .busy
            .lock()
            .map(|busy| {
                busy.iter()
                    .map(|(job, holder)| Running { job: job.clone(), received: holder.connection.stats().udp_rx.bytes })
                    .collect()
            })
            .unwrap_or_default();
        rounds.sort_by(|a, b| a.job.cmp(&b.job));
        let mut imports: Vec<Importing> = self
            .imports
            .lock()
            .map(|imports| {
                imports
                    .iter()
                    .map(|(job, import)| Importing { job: job.clone(), round: import.round, since: import.since })
                    .collect()
            })
            .unwrap_or_default();
        imports.sort_by(|a, b| a.job.cmp(&b.job));
        (rounds, imports)
    }

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
            && busy.get(&self.1).is_some_and(|holder| holder.connection.stable_id() == self.2)
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

    /// Why a round of `job` from `peer`'s `source` would be refused now, without claiming it: an
    /// import runs, another peer's round, or a live round of another source of the same peer. A round
    /// of the same source would replace its own (see [`Self::claim`]).
    async fn busy_for(&self, job: &str, peer: NodeId, source: u64) -> Result<(), Refused> {
        self.no_import(job)?;
        let other = {
            let busy = self.busy.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            match busy.get(job) {
                Some(holder) if holder.peer != peer => return Err(already_running(job)),
                Some(holder) if holder.source != source => holder.connection.clone(),
                _ => return Ok(()),
            }
        };
        if answers(&other).await { Err(running_elsewhere(job)) } else { Ok(()) }
    }

    /// Marks `job` busy for this connection. When the same source is still running it on another
    /// connection, that one is presumed dead (a killed or cut-off source whose connection has not timed
    /// out yet): it is closed, and this round waits for it to let go. Another source of the same peer
    /// (a second data folder, a copied identity) is refused while its round is alive; a silent one is
    /// closed as dead.
    async fn claim(
        self: &Arc<Self>,
        job: &str,
        (peer, source): (NodeId, u64),
        connection: &quinn::Connection,
    ) -> Result<BusyGuard, Refused> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            self.no_import(job)?;
            let other = {
                let mut busy = self.busy.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                match busy.get(job) {
                    None => {
                        busy.insert(job.to_owned(), Holder { peer, source, connection: connection.clone() });
                        return Ok(BusyGuard(self.clone(), job.to_owned(), connection.stable_id()));
                    }
                    Some(holder) if holder.peer == peer && holder.source == source => {
                        tracing::info!(
                            "job {job}: a new connection from the same source replaces the round still open"
                        );
                        let words = b"replaced by a new connection from the same source";
                        holder.connection.close(Refusal::Replaced.code().into(), words);
                        None
                    }
                    Some(holder) if holder.peer == peer => Some(holder.connection.clone()),
                    Some(_) => return Err(already_running(job)),
                }
            };
            if let Some(other) = other {
                if answers(&other).await {
                    return Err(running_elsewhere(job));
                }
                tracing::info!("job {job}: the round open from another source of this peer is silent: closed as dead");
                other.close(Refusal::Replaced.code().into(), b"silent, replaced by another source of the same peer");
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
    if let Some(theirs) = net::older_version(&connection) {
        refuse_older(&connection, peer_id, &theirs).await;
        return;
    }
    let span = tracing::info_span!(
        "round",
        peer = tracing::field::Empty,
        job = tracing::field::Empty,
        round = tracing::field::Empty
    );
    let config_dir = context.config_dir.clone();
    async move { finish_round(&connection, round(&connection, peer_id, context).await, peer_id).await }
        .instrument(span)
        .await;
    // The round, and the import it ran, are in the history: the metrics say so.
    let _ = tokio::task::spawn_blocking(move || crate::metrics::refresh(&config_dir)).await;
}

/// Answers a peer that speaks an older protocol, in words it can read: its first message is encoded
/// as it is here, and so is `Refused`.
async fn refuse_older(connection: &quinn::Connection, peer_id: NodeId, theirs: &str) {
    let text = net::version_words(&format!("node {peer_id}"), theirs);
    tracing::warn!("refused a connection from {}: {text}", connection.remote_address());
    let answer = async {
        let (mut send, _recv) = connection.accept_bi().await?;
        let words = text.replace("this node", "the destination");
        net::send(&mut send, &Message::Refused { refusal: Refusal::ProtocolViolation, reason: words }).await?;
        let _ = send.finish();
        anyhow::Ok(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), answer).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), connection.closed()).await;
    connection.close(Refusal::ProtocolViolation.code().into(), text.as_bytes());
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
            let reason = crate::helpers::describe(&e);
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
    (job, source): (&str, u64),
    mut send: quinn::SendStream,
) -> anyhow::Result<()> {
    tracing::Span::current().record("job", job);
    let answer = match job_of_peer(config, job, peer) {
        Ok(job) => context.busy_for(&job.name, peer_id, source).await.map(|()| job),
        Err(refused) => Err(refused),
    };
    let message = match answer {
        Ok(job_config) => {
            let state = TargetState::new(&context.config_dir.data_dir(config), &job_config.name);
            let unmounted = crate::adoption::unmounted(&state, &job_config.name, &job_config.path);
            match state.holds() {
                Ok(_) if let Some(why) = unmounted => Message::Failed { reason: why },
                Ok(holds) => {
                    tracing::info!("{} checked job {job}: a round would be accepted", peer.name);
                    // The source exports and scans now: the target is checked meanwhile.
                    early::begin(&context.early_checks, &job_config, &state, holds);
                    Message::Welcome { holds }
                }
                // Not a refusal (no code to wait on): the source stops before its export.
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
    let bytes_arrived = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut reader = FrameReader::counting(recv, bytes_arrived.clone());
    let mut machine = DestinationRound::new(context.stall_timeout);
    let first = reader.next().await?.ok_or_else(|| anyhow::anyhow!("the source closed without a word"))?;
    machine.handle(DestinationInput::Message(first), Instant::now());
    let hello = match machine.poll() {
        Some(DestinationEvent::Opened(hello)) => hello,
        Some(DestinationEvent::Check { job, source }) => {
            return answer_check(&context, &config, &peer, peer_id, (&job, source), send).await;
        }
        Some(DestinationEvent::Ended(DestinationEnd::Violation(error))) => return Err(error.into()),
        other => bail!("expected Hello, got {other:?}"),
    };
    let refuse = |mut send: quinn::SendStream, mut machine: DestinationRound, refused: Refused| async move {
        machine.handle(
            DestinationInput::Refuse { refusal: refused.refusal, reason: refused.text.clone() },
            Instant::now(),
        );
        while let Some(transmit) = machine.poll_transmit() {
            match transmit {
                Transmit::Message(message) => net::send(&mut send, &message).await?,
                Transmit::Finish => {
                    let _ = send.finish();
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        Err(refused.into())
    };
    let job = match job_of_peer(&config, &hello.job, &peer) {
        Ok(job) => job,
        Err(refused) => return refuse(send, machine, refused).await,
    };
    let _guard = match context.claim(&job.name, (peer_id, hello.source), connection).await {
        Ok(guard) => guard,
        Err(refused) => return refuse(send, machine, refused).await,
    };
    tracing::Span::current().record("job", job.name.as_str());
    tracing::info!("round from {} into {}", peer.name, job.path.display());

    let data_dir = context.config_dir.data_dir(&config);
    let (outbox_tx, mut outbox) = mpsc::unbounded_channel::<Transmit>();
    let (inbox_tx, inbox) = mpsc::channel::<DestinationEvent>(64);
    // Chunks beyond the memory budget (one file larger than the window) wait in a file in this job's
    // state folder, on the destination's disk.
    let window = Arc::new(Window::new(machine, TargetState::new(&data_dir, &job.name).dir, outbox_tx, bytes_arrived));

    // Control stream: what the machine says goes out; what the source says goes to the machine, and
    // its changes on to the round thread. The machine's timers (the stall timeout, the wait for a
    // stopped source's last batches) are kept here.
    let writer = tokio::spawn(async move {
        while let Some(transmit) = outbox.recv().await {
            match transmit {
                Transmit::Message(message) => net::send(&mut send, &message).await?,
                Transmit::Finish => break,
            }
        }
        let _ = send.finish();
        anyhow::Ok(())
    });
    let control_window = window.clone();
    let control = tokio::spawn(async move {
        loop {
            let timeout = control_window.poll_timeout();
            let (events, open) = tokio::select! {
                next = reader.next() => match next {
                    Ok(Some(message)) => (control_window.input(DestinationInput::Message(message))?, true),
                    Ok(None) => {
                        let why = "the source closed the control stream".to_owned();
                        (control_window.input(DestinationInput::Closed(why))?, false)
                    }
                    Err(e) => (control_window.input(DestinationInput::Closed(format!("{e:#}")))?, false),
                },
                () = sleep_until(timeout) => (control_window.timeout()?, true),
                () = control_window.timer_moved.notified() => (Vec::new(), true),
            };
            for event in events {
                if inbox_tx.send(event).await.is_err() {
                    return Ok(());
                }
            }
            match control_window.end() {
                Some(DestinationEnd::Violation(error)) => return Err(anyhow::Error::from(error)),
                Some(_) => return Ok(()),
                None if !open => return Ok(()),
                None => {}
            }
        }
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
    let target_state = TargetState::new(&data_dir, &job.name);
    let imports = context.imports.clone();
    let early_checks = context.early_checks.clone();
    let peer_name = peer.name.clone();
    let span = tracing::Span::current();
    let round_window = window.clone();
    let result = tokio::task::spawn_blocking(move || {
        let _entered = span.enter();
        let round = Round {
            job: &job,
            data_dir: &data_dir,
            hello: &hello,
            peer: &peer_name,
            imports: &imports,
            early_checks: &early_checks,
        };
        destination_round(&round, inbox, &round_window).map_err(|e| {
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
    match failed {
        Some(e) => drop(window.input(DestinationInput::Failed(crate::helpers::describe(e)))),
        None => drop(window.input(DestinationInput::Finish)),
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), writer).await;
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
    // A round that ends without a commit is in the job's history too, with why (`ferry status`); a
    // refusal was put there before the source heard of it.
    let unfinished = match &result {
        Err(e) if is_refusal(e) => None,
        Err(e) => Some(("failed", crate::helpers::describe(e))),
        Ok(RoundEnd::Stopped(reason)) => Some(("stopped", reason.clone())),
        Ok(_) => None,
    };
    if let Some((event, why)) = unfinished {
        record_unfinished(&target_state, event, why, &peer.name);
    }
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

/// Adds a round that ended without a commit to the job's history (what it would have been numbered).
pub(super) fn record_unfinished(state: &TargetState, event: &str, why: String, peer: &str) {
    let round = state.holds().ok().flatten().map_or(1, |holds| holds.round + 1);
    let record = crate::history::Record {
        error: Some(why),
        peer: Some(peer.to_owned()),
        ..crate::history::Record::new(event, round)
    };
    if let Err(e) = crate::history::append(&state.history(), &record) {
        tracing::warn!("cannot add the round to {}: {e:#}", state.history().display());
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
