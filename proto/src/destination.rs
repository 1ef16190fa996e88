//! The destination's side of one connection of a round, as a state machine without I/O.
//!
//! The shape is [`crate::SourceRound`]'s: [`DestinationRound::handle`] and
//! [`DestinationRound::handle_timeout`] take what happened and when; [`DestinationRound::poll_transmit`],
//! [`DestinationRound::poll`] and [`DestinationRound::poll_timeout`] say what to send, what to do and
//! when to wake it. It checks the order of the source's messages, keeps the window's [`Ledger`] (what
//! was asked for, what will not come, the unwanted budget), calls the source stalled when nothing
//! moves for the stall timeout, and waits for the last batches of a stopped source. Where chunk bytes
//! wait, the target, the manifests and the import are the driver's.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use ferry_engine::{ChunkHash, FilePrefix};

use crate::message::{
    Change, ChangesEnd, Checked, Committed, Hello, ImportMode, ImportResult, Message, NeedChunk, Plan, RoundRef,
    Transmit,
};
use crate::refusal::Refusal;
use crate::window::{Arrival, Ledger, StallTimer, WindowEnd};

/// How long a destination waits for the batches a stopped source says it sent.
pub const STOPPED_BATCHES_WAIT: Duration = Duration::from_secs(30);

/// Where a round is, on the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for `Hello` (or a `Check`).
    Greeting,
    /// `Hello` came: the driver decides whether to take the round.
    Opened,
    /// Receiving `Changes` until `ChangesEnd`; the transfer may begin before the list ends.
    Changes,
    /// Sending `Need`, receiving chunks, until the commit.
    Transfer,
    /// The source stopped (its deadline): waiting for the batches it sent.
    Stopping,
    /// Committed: the import's messages may follow, until [`DestinationInput::Finish`].
    Committed,
    /// Committed, planned, refused or failed: nothing more may come.
    Closed,
}

/// A message that does not belong where it came.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("protocol violation: {message} is not allowed while {phase:?}")]
pub struct ProtocolError {
    /// The message's name.
    pub message: &'static str,
    /// Where the round was.
    pub phase: Phase,
}

/// What the driver feeds the machine, besides chunks ([`DestinationRound::arrive`]).
#[derive(Debug)]
pub enum DestinationInput {
    /// A message from the source on the control stream.
    Message(Message),
    /// Take the round: this node holds `holds`.
    Welcome {
        /// The last round committed here.
        holds: Option<RoundRef>,
    },
    /// Do not take it.
    Refuse {
        /// Why, as a code.
        refusal: Refusal,
        /// The details.
        reason: String,
    },
    /// Ask for these chunks.
    Need(Vec<NeedChunk>),
    /// Every entry before this place of the new manifest is planned (see `Message::Passed`).
    Passed(u64),
    /// The prefix at this place that came last is planned (see `Message::PrefixPlanned`).
    PrefixPlanned(u64),
    /// Something the operator on the source should know.
    Notice(String),
    /// What the check of the target found (sent as it is told).
    Checked(Checked),
    /// A batch of chunks was received whole (after its chunks were given to `arrive`).
    BatchReceived,
    /// Bytes read from the streams so far, whole messages or not: under a slow limit one message
    /// takes longer than the stall timeout, and its bytes show that the source is alive.
    BytesArrived(u64),
    /// The driver applied entries: the round moves.
    Applied,
    /// Everything arrived and is durable: the round is committed.
    Committed(Committed),
    /// A dry run's plan.
    Planned(Plan),
    /// The import of the committed round began.
    ImportStarted {
        /// The round.
        round: u64,
        /// The command.
        command: Vec<String>,
    },
    /// The import ended.
    ImportDone(ImportResult),
    /// Nothing more to say: finish the control stream.
    Finish,
    /// This node failed the round: the source hears why.
    Failed(String),
    /// The control stream or the connection ended.
    Closed(String),
}

/// What the driver must do.
#[derive(Debug, PartialEq)]
pub enum DestinationEvent {
    /// A source opens a round: answer with [`DestinationInput::Welcome`] or [`DestinationInput::Refuse`].
    Opened(Hello),
    /// A source asks whether a round of a job would be taken; nothing else comes on this connection.
    Check {
        /// The job.
        job: String,
        /// Which source asks ([`Hello::source`]).
        source: u64,
    },
    /// Changes to keep (a full manifest can be large: they go to disk).
    Changes(Vec<Change>),
    /// The next chunks of a large file whose change is still to come (see `Message::Prefix`).
    Prefix(FilePrefix),
    /// All changes are in: plan the round.
    ChangesEnd(ChangesEnd),
    /// No more chunks will come: apply what arrived, then end.
    Ended(DestinationEnd),
}

/// Why chunks stopped coming before the round was committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DestinationEnd {
    /// The source stopped at its deadline, and its last batch is in (or did not come in time).
    Stopped(String),
    /// The source failed, stalled, flooded the window or lost the connection.
    Cut(String),
    /// The source broke the protocol.
    Violation(ProtocolError),
}

/// The destination's side of one connection of a round.
#[derive(Debug)]
pub struct DestinationRound {
    phase: Phase,
    ledger: Ledger,
    stall: StallTimer,
    stall_timeout: Duration,
    /// Progress the stall timer watches: bytes read; messages, chunks arrived and entries applied.
    bytes: u64,
    moves: u64,
    stop: Option<(String, Instant)>,
    import: ImportMode,
    dry_run: bool,
    transmit: VecDeque<Transmit>,
    events: VecDeque<DestinationEvent>,
}

impl DestinationRound {
    /// A connection whose source is called stalled after `stall_timeout` without progress.
    pub fn new(stall_timeout: Duration) -> Self {
        Self {
            phase: Phase::Greeting,
            ledger: Ledger::default(),
            stall: StallTimer::new(stall_timeout),
            stall_timeout,
            bytes: 0,
            moves: 0,
            stop: None,
            import: ImportMode::Default,
            dry_run: false,
            transmit: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// Where the round is.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The import the source asked for.
    pub fn import(&self) -> ImportMode {
        self.import
    }

    /// Whether the source asked for a plan only.
    pub fn dry_run(&self) -> bool {
        self.dry_run
    }

    /// The window's bookkeeping: what was asked for and what will not come.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// The next item for the control stream.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmit.pop_front()
    }

    /// The next thing for the driver to do.
    pub fn poll(&mut self) -> Option<DestinationEvent> {
        self.events.pop_front()
    }

    /// When to call [`Self::handle_timeout`] next, if at all.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::Changes => self.stall.deadline(),
            // While the destination plans or applies with nothing asked for, the source owes nothing.
            Phase::Transfer => self.stall.deadline().filter(|_| self.ledger.waiting()),
            Phase::Stopping => self.stop.as_ref().map(|(_, at)| *at),
            Phase::Greeting | Phase::Opened | Phase::Committed | Phase::Closed => None,
        }
    }

    /// A chunk of `len` bytes arrived whole and checked at `now`; `held` says, when asked, whether
    /// the driver holds it already. Keep it only when this says so.
    pub fn arrive(&mut self, hash: &ChunkHash, len: u64, held: impl FnOnce() -> bool, now: Instant) -> Arrival {
        let arrival = self.ledger.arrive(hash, len, held);
        self.moves += 1;
        if let Some(end @ WindowEnd::Flooded(_)) = self.ledger.end() {
            self.cut(DestinationEnd::Cut(end.to_string()));
        }
        self.progress(now);
        arrival
    }

    /// The hash need `number` asked for, if it was sent and not answered yet: a chunk that says it
    /// answers it has come.
    pub fn answer(&mut self, number: u64) -> Option<ChunkHash> {
        self.ledger.answer(number)
    }

    /// `len` bytes of chunks came that answer no need sent: against the unwanted budget, which a
    /// flood exhausts.
    pub fn unasked(&mut self, len: u64, now: Instant) {
        self.ledger.unasked(len);
        self.moves += 1;
        if let Some(end @ WindowEnd::Flooded(_)) = self.ledger.end() {
            self.cut(DestinationEnd::Cut(end.to_string()));
        }
        self.progress(now);
    }

    /// A chunk arrived damaged: it will not come this round.
    pub fn damaged(&mut self, hash: &ChunkHash) -> bool {
        self.ledger.damaged(hash)
    }

    /// Drops what is known of `hash` once its chunk is in the target.
    pub fn forget(&mut self, hash: &ChunkHash) {
        self.ledger.forget(hash);
    }

    /// Feeds what happened at `now`.
    pub fn handle(&mut self, input: DestinationInput, now: Instant) {
        match input {
            DestinationInput::Message(message) => {
                if let Err(error) = self.message(message, now) {
                    self.cut(DestinationEnd::Violation(error));
                }
            }
            DestinationInput::Welcome { holds } if self.phase == Phase::Opened => {
                self.send(Message::Welcome { holds });
                self.phase = Phase::Changes;
                self.stall.restart(self.progress_count(), now);
            }
            DestinationInput::Refuse { refusal, reason } => {
                self.send(Message::Refused { refusal, reason });
                self.close();
            }
            DestinationInput::Welcome { .. } => {}
            DestinationInput::Need(chunks) => {
                if matches!(self.phase, Phase::Changes | Phase::Transfer) && !chunks.is_empty() {
                    // Waiting starts now: time spent planning is not the source's.
                    if !self.ledger.waiting() {
                        self.stall.restart(self.progress_count(), now);
                    }
                    if !self.dry_run {
                        self.ledger.want(chunks.iter().map(|c| c.hash));
                    }
                    self.send(Message::Need(chunks.iter().map(NeedChunk::at).collect()));
                }
            }
            DestinationInput::Passed(place) => {
                if matches!(self.phase, Phase::Changes | Phase::Transfer) {
                    self.send(Message::Passed(place));
                }
            }
            DestinationInput::PrefixPlanned(place) => {
                if matches!(self.phase, Phase::Changes | Phase::Transfer) {
                    self.send(Message::PrefixPlanned(place));
                }
            }
            DestinationInput::Notice(text) => self.send(Message::Notice { text }),
            DestinationInput::Checked(checked) => self.send(Message::Checked(checked)),
            DestinationInput::BatchReceived => {
                self.ledger.batch_received();
                self.progress(now);
                self.stopped_if_in();
            }
            DestinationInput::BytesArrived(bytes) => {
                self.bytes = self.bytes.max(bytes);
                self.progress(now);
            }
            DestinationInput::Applied => {
                self.moves += 1;
                self.progress(now);
            }
            DestinationInput::Committed(committed) => {
                self.send(Message::Done);
                self.send(Message::Committed(committed));
                self.phase = Phase::Committed;
            }
            DestinationInput::Planned(plan) => {
                self.send(Message::Planned(plan));
                self.close();
            }
            DestinationInput::ImportStarted { round, command } => self.send(Message::ImportStarted { round, command }),
            DestinationInput::ImportDone(result) => self.send(Message::ImportDone(result)),
            DestinationInput::Finish => self.close(),
            DestinationInput::Failed(reason) => match self.phase {
                Phase::Closed => {}
                // Committed is committed: what fails after it (the import) is the destination's own.
                Phase::Committed => self.close(),
                _ => {
                    self.send(Message::Failed { reason });
                    self.close();
                }
            },
            DestinationInput::Closed(why) => {
                if !matches!(self.phase, Phase::Closed | Phase::Committed | Phase::Greeting) {
                    let end = match self.stop.take() {
                        Some((reason, _)) => DestinationEnd::Stopped(reason),
                        None => DestinationEnd::Cut(why),
                    };
                    self.end(end);
                }
            }
        }
    }

    /// Time passed: the stall timeout, or the end of the wait for a stopped source's last batches.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.phase {
            Phase::Changes | Phase::Transfer => {
                let owed = self.phase == Phase::Changes || self.ledger.waiting();
                if self.stall.observe(self.progress_count(), now) && owed {
                    let seconds = self.stall_timeout.as_secs();
                    let text = match self.phase {
                        Phase::Changes => format!("the source sent nothing for {seconds} s"),
                        _ => format!("no chunk arrived for {seconds} s"),
                    };
                    self.cut(DestinationEnd::Cut(text));
                }
            }
            Phase::Stopping => {
                if self.stop.as_ref().is_some_and(|(_, at)| now >= *at)
                    && let Some((reason, _)) = self.stop.take()
                {
                    self.end(DestinationEnd::Stopped(reason));
                }
            }
            Phase::Greeting | Phase::Opened | Phase::Committed | Phase::Closed => {}
        }
    }

    fn message(&mut self, message: Message, now: Instant) -> Result<(), ProtocolError> {
        use Phase::*;
        self.moves += 1;
        match (self.phase, message) {
            (Greeting, Message::Hello(hello)) => {
                self.phase = Opened;
                self.events.push_back(DestinationEvent::Opened(hello));
            }
            (Greeting, Message::Check { job, source }) => {
                self.phase = Closed;
                self.events.push_back(DestinationEvent::Check { job, source });
            }
            (Opened | Changes, Message::RoundOptions(options)) => self.import = options.import,
            (Opened | Changes, Message::DryRun) => self.dry_run = true,
            (Changes, Message::Changes(batch)) => self.events.push_back(DestinationEvent::Changes(batch)),
            // A dry run plans the list whole: a file's first chunks are nothing to it.
            (Changes, Message::Prefix(prefix)) if !self.dry_run => {
                self.events.push_back(DestinationEvent::Prefix(prefix));
            }
            (Changes, Message::ChangesEnd(end)) => {
                self.phase = Transfer;
                self.events.push_back(DestinationEvent::ChangesEnd(end));
            }
            (Changes | Transfer, Message::Missing(needs)) => self.ledger.source_missing(needs),
            (Changes, Message::Scanning) => {}
            // A paused source says so between the messages of its list and during the transfer; a
            // notice late for the commit is harmless.
            (Changes | Transfer | Stopping | Committed | Closed, Message::Paused) => self.ledger.paused(),
            (Opened | Changes | Transfer | Stopping, Message::Failed { reason }) => {
                self.end(DestinationEnd::Cut(format!("the source gave up: {reason}")));
            }
            (Changes | Transfer, Message::Stop { reason, batches }) => {
                self.ledger.stopped(batches);
                self.phase = Stopping;
                self.stop = Some((reason, now + STOPPED_BATCHES_WAIT));
                self.stopped_if_in();
            }
            (phase, other) => return Err(ProtocolError { message: other.name(), phase }),
        }
        self.progress(now);
        Ok(())
    }

    /// Counts as progress what moved at `now`; a timer not started yet starts.
    fn progress(&mut self, now: Instant) {
        let count = self.progress_count();
        self.stall.observe(count, now);
    }

    fn progress_count(&self) -> u64 {
        self.bytes + self.moves + self.ledger.events()
    }

    fn stopped_if_in(&mut self) {
        if self.phase == Phase::Stopping
            && self.ledger.end() == Some(WindowEnd::Stopped)
            && let Some((reason, _)) = self.stop.take()
        {
            self.end(DestinationEnd::Stopped(reason));
        }
    }

    /// Chunks stop coming for a reason of the source's: it hears why.
    fn cut(&mut self, end: DestinationEnd) {
        if matches!(self.phase, Phase::Closed | Phase::Committed) {
            return;
        }
        let reason = match &end {
            DestinationEnd::Cut(why) => why.clone(),
            DestinationEnd::Violation(error) => error.to_string(),
            DestinationEnd::Stopped(why) => why.clone(),
        };
        self.send(Message::Failed { reason });
        self.end(end);
    }

    fn end(&mut self, end: DestinationEnd) {
        self.close();
        self.events.push_back(DestinationEvent::Ended(end));
    }

    fn close(&mut self) {
        if self.phase != Phase::Closed {
            self.phase = Phase::Closed;
            self.transmit.push_back(Transmit::Finish);
        }
    }

    fn send(&mut self, message: Message) {
        self.transmit.push_back(Transmit::Message(message));
    }
}
